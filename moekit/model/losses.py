"""Router losses and statistics as pure functions of router outputs.

Legend: T tokens, E experts, K experts per token. ``mask_T`` is 1/True for real tokens and 0/False
for padding; padding never counts towards a loss or a statistic (transformers #28505, Megatron #1617).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# ``global_sum`` (data parallelism, set by moekit.parallel): a differentiable sum of a tensor over all
# ranks sharing the global batch. The balance losses are nonlinear in batch totals, so each rank
# computes them from the global totals: the loss of the global batch on every rank, never a mean of
# per-rank losses. None: one process, the batch is all there is.
GlobalSumFn = Callable[[torch.Tensor], torch.Tensor]


def _mask_and_count(mask_T: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if mask_T is None:
        m = torch.ones(like.shape[0], dtype=torch.float32, device=like.device)
    else:
        m = mask_T.to(torch.float32)
    return m, m.sum().clamp_min(1.0)


def load_balance_loss(probs_TE: torch.Tensor, ids_TK: torch.Tensor, mask_T: torch.Tensor | None = None,
                      global_sum: GlobalSumFn | None = None) -> torch.Tensor:
    """Switch Transformer balance loss ``E * sum_i f_i * P_i`` (Fedus et al. 2021, eqs. 4-6).

    f_i: fraction of the T*K hard assignments that went to expert i (chosen before any capacity drop);
    P_i: mean router probability of expert i over the **full** softmax (not the top-k only: aprender
    PR #2162). Equals 1.0 under perfectly uniform routing. Gradient flows through P only.
    """
    T, E = probs_TE.shape
    K = ids_TK.shape[1]
    m, n = _mask_and_count(mask_T, probs_TE)
    counts_E = torch.zeros(E, dtype=torch.float32, device=probs_TE.device)
    counts_E.scatter_add_(0, ids_TK.reshape(-1), m.repeat_interleave(K))
    prob_sum_E = (probs_TE.float() * m[:, None]).sum(0)
    if global_sum is not None:
        totals = global_sum(torch.cat([prob_sum_E, counts_E, m.sum()[None]]))
        prob_sum_E, counts_E, n = totals[:E], totals[E:2 * E].detach(), totals[2 * E].detach().clamp_min(1.0)
    f_E = counts_E / (n * K)
    P_E = prob_sum_E / n
    return E * (f_E * P_E).sum()


def z_loss(logits_TE: torch.Tensor, mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss ``mean(logsumexp(logits)^2)`` over real tokens (ST-MoE, Zoph et al. 2022, eq. 5)."""
    m, n = _mask_and_count(mask_T, logits_TE)
    return (torch.logsumexp(logits_TE.float(), dim=-1).pow(2) * m).sum() / n


def cv_squared(x_E: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation, var/mean^2 (population variance), 0 for a single value."""
    x = x_E.float()
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.var(correction=0) / (x.mean().pow(2) + eps)


def importance_loss(gates_TE: torch.Tensor, mask_T: torch.Tensor | None = None,
                    global_sum: GlobalSumFn | None = None) -> torch.Tensor:
    """Shazeer et al. 2017, eq. 6-7: CV^2 of each expert's summed gate value over the batch."""
    m, _ = _mask_and_count(mask_T, gates_TE)
    sums_E = (gates_TE.float() * m[:, None]).sum(0)
    return cv_squared(sums_E if global_sum is None else global_sum(sums_E))


def noisy_load_loss(prob_in_topk_TE: torch.Tensor, mask_T: torch.Tensor | None = None,
                    global_sum: GlobalSumFn | None = None) -> torch.Tensor:
    """Shazeer et al. 2017, appendix A: CV^2 of the smooth load estimate sum_x P(x, i)."""
    m, _ = _mask_and_count(mask_T, prob_in_topk_TE)
    sums_E = (prob_in_topk_TE.float() * m[:, None]).sum(0)
    return cv_squared(sums_E if global_sum is None else global_sum(sums_E))


def router_entropy(probs_TE: torch.Tensor, mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """Mean per-token entropy (nats) of the router distribution; log(E) is uniform, 0 is one-hot."""
    m, n = _mask_and_count(mask_T, probs_TE)
    p = probs_TE.float()
    ent_T = -(p * torch.log(p.clamp_min(1e-20))).sum(-1)
    return (ent_T * m).sum() / n


def max_violation(load_E: torch.Tensor) -> torch.Tensor:
    """MaxVio = (max_i load_i - mean load) / mean load (Wang et al. 2024, arXiv 2408.15664)."""
    load = load_E.float()
    mean = load.mean()
    if mean <= 0:
        return load.new_zeros(())
    return (load.max() - mean) / mean
