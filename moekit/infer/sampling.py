"""Sampling: next-token logits -> token ids, as pure functions (unit-testable without a model).

Legend: B batch, T sequence, V vocabulary, K kept tokens.

The order follows Hugging Face's logits processors and gpt-fast's ``logits_to_probs``: repetition
penalty -> temperature -> top-k -> top-p -> softmax -> draw. ``temperature == 0`` means greedy
argmax (the filters cannot change the argmax, so they are skipped).
"""

from __future__ import annotations

import math

import torch


def check_sampling_args(temperature: float, top_k: int, top_p: float, repetition_penalty: float = 1.0) -> None:
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


def sample_next(logits_BV: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None, *, repetition_penalty: float = 1.0,
                prev_ids_BT: torch.Tensor | None = None) -> torch.Tensor:
    """One token id per row, LongTensor [B], from next-token logits [B, V].

    ``temperature == 0`` is greedy argmax; otherwise draw from softmax(filtered logits / temperature)
    with ``generator`` (None: torch's global RNG). ``prev_ids_BT`` (the tokens so far) is needed only
    when ``repetition_penalty != 1``.
    """
    check_sampling_args(temperature, top_k, top_p, repetition_penalty)
    if logits_BV.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits_BV.shape)}")
    logits_BV = logits_BV.float()  # filters and softmax in float32, whatever the model dtype
    if repetition_penalty != 1:
        if prev_ids_BT is None:
            raise ValueError(f"repetition_penalty={repetition_penalty} needs prev_ids_BT, the tokens so far")
        logits_BV = apply_repetition_penalty(logits_BV, prev_ids_BT, repetition_penalty)
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    logits_BV = top_p_filter(top_k_filter(apply_temperature(logits_BV, temperature), top_k), top_p)
    probs_BV = logits_BV.softmax(dim=-1)
    return torch.multinomial(probs_BV, num_samples=1, generator=generator).squeeze(-1)
