"""The figures of ``moekit eval`` as pure functions of scores: each with its standard error.

Language modelling: a corpus figure is a ratio of sums over documents (nats over tokens, bits over
bytes), so its standard error is the ratio estimator's over documents (the delta method, as for a
cluster sample): ``se(R) = sqrt(n / (n - 1) * sum((y_i - R x_i)^2)) / sum(x_i)``. Two models scored on the
same documents differ by a ratio of sums of differences (bits per byte: the bytes are the same for
both), whose standard error is the same formula: the *paired* error, much smaller than either alone.

Multiple choice: accuracy is a mean of 0/1 outcomes, with lm-eval's standard error (sample standard
deviation over sqrt(n)); paired differences likewise.

Calibration: the confidence of an answer is the softmax over the choices' log-likelihoods, taken at the
chosen choice; expected calibration error (Guo et al. 2017) over :data:`ECE_BINS` bins of equal count
("equal mass", Nixon et al. 2019): ``ECE = sum_b n_b / N * |accuracy_b - confidence_b|``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from moekit.eval.score import Scored, TextScore

ECE_BINS = 10
LN2 = math.log(2)


def ratio_se(y: Sequence[float], x: Sequence[float]) -> float:
    """Standard error of ``sum(y) / sum(x)`` over the n documents (y_i, x_i); NaN for one document."""
    y_, x_ = np.asarray(y, dtype=np.float64), np.asarray(x, dtype=np.float64)
    n = len(y_)
    if n < 2 or x_.sum() == 0:
        return math.nan
    r = y_.sum() / x_.sum()
    return float(math.sqrt(n / (n - 1) * float(((y_ - r * x_) ** 2).sum())) / x_.sum())


def mean_se(values: Sequence[float]) -> float:
    """Standard error of a mean (sample standard deviation / sqrt(n), lm-eval's ``mean_stderr``); NaN below 2."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan


def lm_metrics(scores: Sequence[TextScore]) -> dict:
    """Loss (nats/token), perplexity and bits per byte of a set of documents, each with its standard error."""
    nll = [-s.logprob for s in scores]
    tokens = [s.tokens for s in scores]
    nbytes = [s.bytes for s in scores]
    loss = math.fsum(nll) / sum(tokens)
    loss_se = ratio_se(nll, tokens)
    bpb = math.fsum(nll) / LN2 / sum(nbytes)
    return {"loss": loss, "loss_se": loss_se, "perplexity": math.exp(loss),
            "perplexity_se": math.exp(loss) * loss_se,  # delta method: d exp(L) = exp(L) dL
            "bits_per_byte": bpb, "bits_per_byte_se": ratio_se([v / LN2 for v in nll], nbytes),
            "documents": len(scores), "tokens": sum(tokens), "bytes": sum(nbytes)}


def ratio_difference(y1: Sequence[float], x1: Sequence[float], y2: Sequence[float], x2: Sequence[float]
                     ) -> tuple[float, float]:
    """``sum(y1)/sum(x1) - sum(y2)/sum(x2)`` over the same n documents, with its paired standard error.

    The delta method: document i moves the difference by ``u_i = (y1_i - R1 x1_i) / X1 - (y2_i - R2 x2_i) / X2``,
    so ``se = sqrt(n / (n - 1) * sum(u_i^2))``; with ``x1 == x2`` this is :func:`ratio_se` of ``y1 - y2``.
    """
    a = [np.asarray(v, dtype=np.float64) for v in (y1, x1, y2, x2)]
    if len({len(v) for v in a}) != 1:
        raise ValueError("ratio_difference needs the same documents on both sides")
    (ya, xa, yb, xb), n = a, len(a[0])
    ra, rb = ya.sum() / xa.sum(), yb.sum() / xb.sum()
    if n < 2:
        return float(ra - rb), math.nan
    u = (ya - ra * xa) / xa.sum() - (yb - rb * xb) / xb.sum()
    return float(ra - rb), float(math.sqrt(n / (n - 1) * float((u ** 2).sum())))


def bpb_difference(a: Sequence[TextScore], b: Sequence[TextScore]) -> tuple[float, float]:
    """Bits per byte of ``a`` minus ``b`` on the same documents (two models, or one text clean and perturbed),
    with its paired standard error."""
    return ratio_difference([-s.logprob / LN2 for s in a], [s.bytes for s in a],
                            [-s.logprob / LN2 for s in b], [s.bytes for s in b])


def choice_outcomes(choices: Sequence[str], scored: Sequence[Scored], answer: int) -> dict:
    """One item: which choice each rule picks, whether it is right, and the softmax confidence of the pick."""
    lp = np.array([s.logprob for s in scored], dtype=np.float64)
    per_byte = lp / np.array([max(len(c.encode("utf-8")), 1) for c in choices], dtype=np.float64)
    pick, pick_norm = int(np.argmax(lp)), int(np.argmax(per_byte))  # first of equals, as lm-eval
    p = np.exp(lp - lp.max())
    p /= p.sum()
    return {"pick": pick, "pick_norm": pick_norm, "correct": pick == answer, "correct_norm": pick_norm == answer,
            "confidence": float(p[pick]), "p_answer": float(p[answer])}


def mc_metrics(outcomes: Sequence[dict], n_choices: int) -> dict:
    """Accuracy and length-normalised accuracy (by bytes of the choice) with standard errors, and chance."""
    acc = [float(o["correct"]) for o in outcomes]
    norm = [float(o["correct_norm"]) for o in outcomes]
    return {"acc": float(np.mean(acc)) if acc else math.nan, "acc_se": mean_se(acc),
            "acc_norm": float(np.mean(norm)) if norm else math.nan, "acc_norm_se": mean_se(norm),
            "chance": 1.0 / n_choices, "items": len(outcomes)}


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean of ``a - b`` over the same items, with its standard error."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return float(d.mean()), mean_se(d)


def reliability(confidence: Sequence[float], correct: Sequence[bool], bins: int = ECE_BINS) -> list[dict]:
    """Equal-mass bins of the answers sorted by confidence: each bin's count, mean confidence and accuracy.

    The answers are split in order into ``bins`` groups whose sizes differ by at most one
    (``numpy.array_split``); ties in confidence keep the answers' order, so the bins are deterministic.
    """
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    order = np.argsort(conf, kind="stable")
    out = []
    for idx in np.array_split(order, bins):
        if len(idx):
            out.append({"count": int(len(idx)), "confidence": float(conf[idx].mean()), "accuracy": float(ok[idx].mean())})
    return out


def ece(confidence: Sequence[float], correct: Sequence[bool], bins: int = ECE_BINS) -> float:
    """Expected calibration error with ``bins`` equal-mass bins (NaN with no answers)."""
    table = reliability(confidence, correct, bins)
    n = sum(b["count"] for b in table)
    if n == 0:
        return math.nan
    return float(sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in table))
