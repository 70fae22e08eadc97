"""The figures of moekit eval against hand-computed cases: standard errors, language-modelling figures,
accuracy (a planted model scores 100% through the engine), ECE on known sets, bits per byte of a uniform model."""

import math

import pytest
import torch

from moekit import ModelConfig, Transformer
from moekit.data import load_tokenizer
from moekit.eval import metrics
from moekit.eval.run import _score_items
from moekit.eval.score import Scored, TextScore, score_texts, scoring_engine
from moekit.eval.tasks import Item


def test_ratio_se_by_hand():
    # y = [1, 2, 3], x = [1, 1, 2]: R = 6/4 = 1.5, residuals y - R x = [-0.5, 0.5, 0], sum of squares 0.5,
    # se = sqrt(3/2 * 0.5) / 4
    assert metrics.ratio_se([1, 2, 3], [1, 1, 2]) == pytest.approx(math.sqrt(0.75) / 4)
    assert math.isnan(metrics.ratio_se([1], [2]))
    assert metrics.mean_se([0, 1, 1, 0]) == pytest.approx(math.sqrt(1 / 3) / 2)  # sample std sqrt(1/3), n = 4


def test_lm_metrics_by_hand():
    scores = [TextScore(-2 * math.log(2), 2, 4), TextScore(-4 * math.log(2), 2, 4)]  # 2 and 4 bits
    m = metrics.lm_metrics(scores)
    assert m["loss"] == pytest.approx(6 * math.log(2) / 4)
    assert m["perplexity"] == pytest.approx(2 ** 1.5)
    assert m["bits_per_byte"] == pytest.approx(6 / 8)
    # bits per document [2, 4] over bytes [4, 4]: R = 0.75, residuals [-1, 1], se = sqrt(2 * 2) / 8
    assert m["bits_per_byte_se"] == pytest.approx(0.25)
    assert m["perplexity_se"] == pytest.approx(m["perplexity"] * m["loss_se"])
    assert (m["documents"], m["tokens"], m["bytes"]) == (2, 4, 8)


def test_paired_differences_by_hand():
    a = [TextScore(-2 * math.log(2), 1, 4), TextScore(-4 * math.log(2), 1, 4)]
    b = [TextScore(-1 * math.log(2), 1, 4), TextScore(-4 * math.log(2), 1, 4)]
    d, se = metrics.bpb_difference(a, b)
    # bits differ by [1, 0] over bytes [4, 4]: 1/8, residuals [0.5, -0.5], se = sqrt(2 * 0.5) / 8
    assert (d, se) == (pytest.approx(1 / 8), pytest.approx(1 / 8))
    # different byte counts (a perturbed text): the delta method of two ratios
    d, se = metrics.ratio_difference([2, 4], [4, 4], [1, 3], [2, 2])
    # R1 = 0.75, R2 = 1; u = ([2, 4] - 0.75 [4, 4]) / 8 - ([1, 3] - 1 [2, 2]) / 4 = [-0.125, 0.125] - [-0.25, 0.25]
    assert d == pytest.approx(-0.25) and se == pytest.approx(math.sqrt(2 * 2 * 0.125 ** 2))
    assert metrics.paired_difference([1, 1, 0, 1], [0, 1, 0, 0]) == (pytest.approx(0.5), pytest.approx(math.sqrt(1 / 3) / 2))


def test_choice_outcomes_norm_by_bytes_and_confidence():
    scored = [Scored(-4.0, 2, None), Scored(-6.0, 3, None)]
    o = metrics.choice_outcomes(["ab", "abcd"], scored, answer=1)
    assert (o["pick"], o["pick_norm"]) == (0, 1)  # -4 > -6, but -6/4 bytes > -4/2 bytes
    assert (o["correct"], o["correct_norm"]) == (False, True)
    assert o["confidence"] == pytest.approx(1 / (1 + math.exp(-2)))
    assert o["p_answer"] == pytest.approx(1 - o["confidence"])


def test_ece_on_known_sets():
    # Confidence equal to accuracy in every bin: 0.
    conf = [0.5] * 10 + [1.0] * 10
    ok = [True, False] * 5 + [True] * 10
    assert metrics.ece(conf, ok) == pytest.approx(0.0)
    # 20 answers, bins of 2: ten at 0.55 with half right (each bin |0.5 - 0.55|), ten at 0.95 all right (|1 - 0.95|)
    conf = [0.55] * 10 + [0.95] * 10
    ok = [True, False] * 5 + [True] * 10
    assert metrics.ece(conf, ok) == pytest.approx(0.05)
    # Fewer answers than bins: one answer per bin, ECE = mean |correct - confidence|
    assert metrics.ece([0.9, 0.6, 0.3], [False, True, False]) == pytest.approx((0.9 + 0.4 + 0.3) / 3)
    # Equal mass: bins hold 3 or 2 answers in confidence order (array_split), whatever the input order
    bins = metrics.reliability([0.9, 0.1, 0.5, 0.3, 0.7], [1, 0, 1, 0, 1], bins=2)
    assert [b["count"] for b in bins] == [3, 2]
    assert bins[0]["confidence"] == pytest.approx(0.3) and bins[0]["accuracy"] == pytest.approx(1 / 3)
    assert math.isnan(metrics.ece([], []))


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: a second thread only contends on a shared machine (conftest restores the count)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def tiny(vocab: int = 4096) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=32,
                      num_experts=4, top_k=2, expert_ffn_dim=32, tie_embeddings=False)
    return Transformer(cfg).eval()


def test_uniform_model_bits_per_byte_is_log2_vocab_times_tokens_over_bytes(tok):
    model = tiny()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    texts = ["MACBETH.\nIf it were done when 'tis done, then 'twere well\nIt were done quickly.\n" * 3, "Fair is foul."]
    scores = score_texts(scoring_engine(model, tok), texts)
    m = metrics.lm_metrics(scores)
    tokens = sum(len(tok.encode(t).ids) for t in texts)
    nbytes = sum(len(t.encode()) for t in texts)
    assert m["bits_per_byte"] == pytest.approx(math.log2(4096) * tokens / nbytes, rel=1e-6)
    assert m["loss"] == pytest.approx(math.log(4096), rel=1e-6) and m["perplexity"] == pytest.approx(4096, rel=1e-5)


def planted(tok, words: str) -> Transformer:
    """A model that writes only the tokens of ``words``, whatever came before: every token has the same
    embedding, so every position has the same hidden state h (attention mixes equal values), and the head
    gives the planted tokens logit 20 from h and every other token 0."""
    model = tiny()
    with torch.no_grad():
        model.embed.weight.copy_(torch.randn(model.cfg.dim).expand_as(model.embed.weight))
        seen = []
        hook = model.norm.register_forward_hook(lambda m, i, out: seen.append(out[0, -1].clone()))
        model(torch.tensor([[5, 6, 7]]))
        hook.remove()
        h = seen[0]
        model.lm_head.weight.zero_()
        for t in set(tok.encode(words).ids):
            model.lm_head.weight[t] = 20 * h / h.dot(h)
    return model


def test_a_planted_model_scores_every_item_right_through_the_engine(tok):
    right, wrong = " the king", [" a dog", " my horse", " no crown"]
    items = []
    for i in range(8):  # the right answer in each position twice
        choices = list(wrong)
        choices.insert(i % 4, right)
        items.append(Item("planted", f"Item {i}: who comes?", tuple(choices), i % 4))
    engine = scoring_engine(planted(tok, right), tok)
    outcomes = [metrics.choice_outcomes(it.choices, s, it.answer) for it, s in zip(items, _score_items(engine, items, None))]
    m = metrics.mc_metrics(outcomes, 4)
    assert (m["acc"], m["acc_norm"], m["acc_se"], m["items"]) == (1.0, 1.0, 0.0, 8)
    assert metrics.ece([o["confidence"] for o in outcomes], [o["correct"] for o in outcomes]) < 1e-6
    # planted on a wrong answer instead, the same model gets none right
    engine = scoring_engine(planted(tok, wrong[0]), tok)
    outcomes = [metrics.choice_outcomes(it.choices, s, it.answer) for it, s in zip(items, _score_items(engine, items, None))]
    assert metrics.mc_metrics(outcomes, 4)["acc"] == 0.0
