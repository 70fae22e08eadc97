"""Sampling: next-token logits -> token ids, as pure functions (unit-testable without a model).

Legend: B batch (rows sampled together), T sequence, V vocabulary, K kept tokens, N (row, token) pairs.

The order follows vLLM's ``Sampler`` (and, for the last steps, Hugging Face's logits processors and
gpt-fast's ``logits_to_probs``): logit bias -> repetition penalty (tokens of the prompt and the answer)
-> presence and frequency penalties (tokens of the answer) -> temperature -> top-k -> top-p -> softmax
-> draw. ``temperature == 0`` means greedy argmax after the bias and penalties (the filters cannot
change the argmax, so they are skipped).

Two forms of the same math:

- the batch path, used by the engine: every setting is a tensor with one value per row, so a batch of
  requests with different settings is one pass of tensor ops (:func:`apply_logit_bias`,
  :func:`apply_penalties`, :func:`top_k_top_p_filter`, :func:`sample`, :func:`draw`);
- the scalar reference filters (:func:`apply_repetition_penalty`, :func:`apply_temperature`,
  :func:`top_k_filter`, :func:`top_p_filter`), one setting for every row, which the tests hold the
  batch path to. :func:`sample_next` is the scalar front end of the batch path.

The draw is by inverse CDF from one uniform number per row (:func:`draw`): the engine takes each row's
number from that request's own ``torch.Generator``, so a request's tokens never depend on what else is
in the batch, and the rest of the draw is batch-wide.
"""

from __future__ import annotations

import math

import torch

PENALTY_RANGE = 2.0  # presence and frequency penalties lie in [-2, 2], as in OpenAI's API


def check_sampling_args(temperature: float, top_k: int, top_p: float, repetition_penalty: float = 1.0,
                        presence_penalty: float = 0.0, frequency_penalty: float = 0.0) -> None:
    """Raise a ValueError naming the bad value and the valid range; called once before generating."""
    if not _is_number(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature={temperature!r} must be a finite number >= 0 (0 = greedy argmax)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k={top_k!r} must be an integer >= 0 (0 = off)")
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} must be in (0, 1] (1 = off)")
    if not _is_number(repetition_penalty) or not math.isfinite(repetition_penalty) or repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty={repetition_penalty!r} must be a finite number > 0 "
                         "(1 = off, > 1 discourages repeats)")
    for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if not _is_number(value) or not -PENALTY_RANGE <= value <= PENALTY_RANGE:
            raise ValueError(f"{name}={value!r} must be a number in [-{PENALTY_RANGE:g}, {PENALTY_RANGE:g}] "
                             "(0 = off, > 0 discourages repeats)")


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def apply_temperature(logits_BV: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature``: < 1 sharpens the distribution, > 1 flattens it."""
    if not _is_number(temperature) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature={temperature!r} must be a finite number > 0 here "
                         "(temperature 0 is greedy argmax: sample_next handles it)")
    return logits_BV / temperature


def top_k_filter(logits_BV: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the ``k`` largest logits per row (others -> -inf); ``k == 0`` or ``k >= V`` is off.

    NOTE: masks by the top-k *indices*, not by ``logits < k-th value`` as gpt-fast does, so ties at
    the k-th value still keep exactly k tokens.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"top_k={k!r} must be an integer >= 0 (0 = off)")
    if k == 0 or k >= logits_BV.shape[-1]:
        return logits_BV
    idx_BK = logits_BV.topk(k, dim=-1).indices
    keep_BV = torch.zeros_like(logits_BV, dtype=torch.bool).scatter_(-1, idx_BK, True)
    return logits_BV.masked_fill(~keep_BV, float("-inf"))


def top_p_filter(logits_BV: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2019, "The Curious Case of Neural Text Degeneration", §3.1).

    Keep the smallest set of most probable tokens whose cumulative probability is >= ``p``; the top
    token is always kept. Others -> -inf. ``p == 1`` is off.
    """
    if not _is_number(p) or not 0 < p <= 1:
        raise ValueError(f"top_p={p!r} must be in (0, 1] (1 = off)")
    if p == 1:
        return logits_BV
    sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
    probs_BV = sorted_BV.float().softmax(dim=-1)
    # A token is dropped when the tokens ranked above it already reach p (exclusive cumulative sum).
    drop_sorted_BV = (probs_BV.cumsum(dim=-1) - probs_BV) >= p
    drop_sorted_BV[..., 0] = False
    drop_BV = torch.zeros_like(drop_sorted_BV).scatter_(-1, order_BV, drop_sorted_BV)  # back to vocab order
    return logits_BV.masked_fill(drop_BV, float("-inf"))


def apply_repetition_penalty(logits_BV: torch.Tensor, prev_ids_BT: torch.Tensor, penalty: float) -> torch.Tensor:
    """Discourage tokens already in ``prev_ids_BT`` (CTRL, Keskar et al. 2019, §4.1).

    CTRL divides a seen token's logit by ``penalty``; that would *raise* a negative logit, so, as in
    Hugging Face's ``RepetitionPenaltyLogitsProcessor``, negative logits are multiplied instead.
    ``penalty == 1`` is off.
    """
    if not _is_number(penalty) or not math.isfinite(penalty) or penalty <= 0:
        raise ValueError(f"repetition_penalty={penalty!r} must be a finite number > 0 (1 = off)")
    if penalty == 1:
        return logits_BV
    seen_BT = logits_BV.gather(-1, prev_ids_BT)
    seen_BT = torch.where(seen_BT > 0, seen_BT / penalty, seen_BT * penalty)
    return logits_BV.scatter(-1, prev_ids_BT, seen_BT)  # repeated ids write the same value


# ------------------------------------------------------------------------------ the batch path
def apply_logit_bias(logits_BV: torch.Tensor, rows_N: torch.Tensor, ids_N: torch.Tensor,
                     bias_N: torch.Tensor) -> torch.Tensor:
    """Add ``bias_N[n]`` to the logit of token ``ids_N[n]`` in row ``rows_N[n]`` (OpenAI's ``logit_bias``:
    +100 all but forces a token, -100 all but bans it). A new tensor; pairs that repeat add up."""
    return logits_BV.index_put((rows_N, ids_N), bias_N.to(logits_BV.dtype), accumulate=True)


def apply_penalties(logits_BV: torch.Tensor, counts_BV: torch.Tensor, presence_B: torch.Tensor,
                    frequency_B: torch.Tensor, repetition_B: torch.Tensor,
                    prompt_mask_BV: torch.Tensor | None = None) -> torch.Tensor:
    """Penalize tokens already used, each row with its own settings (vLLM's ``apply_penalties``).

    ``counts_BV``: how often each token was generated so far in this row's answer (not its prompt).
    1. repetition penalty (CTRL, as :func:`apply_repetition_penalty`) on every token of the prompt
       (``prompt_mask_BV``, None = no prompt tokens) or the answer: positive logits / p, negative x p;
    2. OpenAI's presence and frequency penalties on the answer's tokens:
       ``logits[t] -= presence * (count[t] > 0) + frequency * count[t]``.
    Off values (1, 0, 0) leave a row unchanged. A new tensor.
    """
    used_BV = counts_BV > 0
    seen_BV = used_BV if prompt_mask_BV is None else used_BV | prompt_mask_BV
    rep_B1 = repetition_B.to(logits_BV.dtype)[:, None]
    penalized_BV = torch.where(logits_BV > 0, logits_BV / rep_B1, logits_BV * rep_B1)
    logits_BV = torch.where(seen_BV, penalized_BV, logits_BV)
    return (logits_BV - frequency_B.to(logits_BV.dtype)[:, None] * counts_BV
            - presence_B.to(logits_BV.dtype)[:, None] * used_BV)


def top_k_top_p_filter(logits_BV: torch.Tensor, top_k_B: torch.Tensor, top_p_B: torch.Tensor | None = None,
                       ) -> torch.Tensor:
    """:func:`top_k_filter` then :func:`top_p_filter`, each row with its own ``k`` (0 = off) and ``p``
    (1 = off; ``top_p_B`` None: off for every row). Dropped tokens -> -inf; a new tensor.

    One sort of the batch; without top-p, when every row has a top-k, one ``topk`` of the largest k
    instead (much cheaper than sorting the vocabulary). NOTE: like :func:`top_k_filter`, keeps exactly
    ``k`` tokens even when several tie at the k-th value.
    """
    V = logits_BV.shape[-1]
    k_B = torch.where(top_k_B > 0, top_k_B.clamp(max=V), V)
    if top_p_B is None:
        k_max = int(k_B.max())  # NOTE: host sync (one per step, and only for top-k without top-p)
        if k_max < V:
            order_BK = logits_BV.topk(k_max, dim=-1).indices  # most likely first
            keep_BK = torch.arange(k_max, device=logits_BV.device)[None] < k_B[:, None]
            keep_BV = torch.zeros_like(logits_BV, dtype=torch.bool).scatter_(-1, order_BK, keep_BK)
            return logits_BV.masked_fill(~keep_BV, float("-inf"))
    sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True, stable=True)
    drop_sorted_BV = torch.arange(V, device=logits_BV.device)[None] >= k_B[:, None]
    if top_p_B is not None:
        probs_BV = sorted_BV.masked_fill(drop_sorted_BV, float("-inf")).float().softmax(dim=-1)
        # A token is dropped when the tokens ranked above it already reach p (exclusive cumulative sum);
        # rows with p = 1 skip this, as rounding can bring the sum to 1 before the last kept token.
        top_p_B1 = top_p_B.to(probs_BV.dtype)[:, None]
        drop_sorted_BV |= ((probs_BV.cumsum(dim=-1) - probs_BV) >= top_p_B1) & (top_p_B1 < 1)
    drop_sorted_BV[:, 0] = False
    drop_BV = torch.zeros_like(drop_sorted_BV).scatter_(-1, order_BV, drop_sorted_BV)  # back to vocab order
    return logits_BV.masked_fill(drop_BV, float("-inf"))


def draw(probs_BV: torch.Tensor, uniform_B: torch.Tensor) -> torch.Tensor:
    """One token per row by inverse CDF: the first token whose cumulative probability exceeds
    ``uniform_B[b]`` (in [0, 1)) times the row's total. ``probs_BV`` need not be normalized.

    A token of probability 0 is never drawn: its interval is empty, and the index is capped at the last
    token of nonzero probability in case rounding puts the target at the very end. The cumulative sum is
    in float64, so that a long vocabulary's rounding does not shift the tail tokens' intervals.
    """
    cdf_BV = probs_BV.double().cumsum(dim=-1)
    target_B1 = uniform_B.to(cdf_BV.dtype)[:, None] * cdf_BV[:, -1:]
    idx_B = torch.searchsorted(cdf_BV, target_B1, right=True)[:, 0]
    return torch.minimum(idx_B, cdf_BV.argmax(dim=-1))  # argmax: the first index where the cdf is complete


def sample(logits_BV: torch.Tensor, temperature_B: torch.Tensor, uniform_B: torch.Tensor,
           top_k_B: torch.Tensor | None = None, top_p_B: torch.Tensor | None = None) -> torch.Tensor:
    """One token id per row, LongTensor [B], from (biased, penalized) logits [B, V].

    Row b is greedy argmax when ``temperature_B[b] == 0``; otherwise it draws ``uniform_B[b]`` through
    the CDF of softmax(top-k/top-p filtered logits / temperature). ``top_k_B`` / ``top_p_B`` None: off
    for every row (saves the topk or the sort).
    """
    logits_BV = logits_BV.float()  # filters and softmax in float32, whatever the model dtype
    greedy_B = temperature_B == 0
    scaled_BV = logits_BV / torch.where(greedy_B, 1.0, temperature_B.to(logits_BV.dtype))[:, None]
    if top_k_B is not None or top_p_B is not None:
        if top_k_B is None:
            top_k_B = torch.zeros(logits_BV.shape[0], dtype=torch.long, device=logits_BV.device)
        scaled_BV = top_k_top_p_filter(scaled_BV, top_k_B, top_p_B)
    drawn_B = draw(scaled_BV.softmax(dim=-1), uniform_B)
    return torch.where(greedy_B, logits_BV.argmax(dim=-1), drawn_B)


def sample_next(logits_BV: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None, *, repetition_penalty: float = 1.0,
                prev_ids_BT: torch.Tensor | None = None) -> torch.Tensor:
    """One token id per row, LongTensor [B], from next-token logits [B, V], every row with the same settings.

    ``temperature == 0`` is greedy argmax; otherwise draw from softmax(filtered logits / temperature)
    with one uniform number per row from ``generator`` (None: torch's global RNG). ``prev_ids_BT`` (the
    tokens so far) is needed only when ``repetition_penalty != 1``.
    """
    check_sampling_args(temperature, top_k, top_p, repetition_penalty)
    if logits_BV.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits_BV.shape)}")
    logits_BV = logits_BV.float()
    if repetition_penalty != 1:
        if prev_ids_BT is None:
            raise ValueError(f"repetition_penalty={repetition_penalty} needs prev_ids_BT, the tokens so far")
        logits_BV = apply_repetition_penalty(logits_BV, prev_ids_BT, repetition_penalty)
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    B, device = logits_BV.shape[0], logits_BV.device
    uniform_B = torch.rand(B, generator=generator, device=device)
    return sample(logits_BV, torch.full((B,), float(temperature), device=device), uniform_B,
                  torch.full((B,), top_k, device=device) if top_k != 0 else None,
                  torch.full((B,), float(top_p), device=device) if top_p != 1 else None)
