"""Expert parallelism: each MoE layer's experts split over the ranks of an expert-parallel group, tokens
sent to their experts' rank and back with ``all_to_all_single`` (variable split sizes).

Legend: T tokens on this rank, D model dim, E experts (global), L = E / EP experts on this rank,
A assignments made on this rank, R rows received from the group, EP group size.

One MoE layer's forward on rank p (backward mirrors it: each all-to-all's gradient is the all-to-all
with the split sizes swapped):

1. sort this rank's assignments by expert: rows for rank j's experts are one contiguous block;
2. exchange the per-expert counts (an all-to-all of E int64): now every rank knows how many rows it
   sends to and receives from each other rank, per expert;
3. dispatch: all-to-all of the gathered token rows [A, D] -> [R, D], grouped by source rank, then by
   local expert; reorder them by local expert and run the grouped SwiGLU (moekit.model.experts);
4. combine: the outputs go back by the reverse all-to-all; scale by the gate weights and add into
   the tokens (as the one-process fast path does).

A rank whose experts receive no rows still takes part in every collective, forward and backward, and
still gives its expert weights a (zero) gradient, so nothing waits forever and no gradient is missing.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moekit.model.experts import Experts, combine, gather_by_expert, grouped_swiglu, swiglu_dtype
from moekit.parallel.mesh import Parallel, Traffic


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` of rows with variable splits; the backward sends the gradients back."""

    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, out_splits: list[int], in_splits: list[int], group, me: int,
                traffic: Traffic | None):
        import torch.distributed as dist

        ctx.splits, ctx.group, ctx.me, ctx.traffic = (out_splits, in_splits), group, me, traffic
        out = x_ND.new_empty(sum(out_splits), *x_ND.shape[1:])
        dist.all_to_all_single(out, x_ND.contiguous(), out_splits, in_splits, group=group)
        _count(traffic, x_ND, in_splits, me)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        import torch.distributed as dist

        out_splits, in_splits = ctx.splits
        grad_in = grad_out.new_empty(sum(in_splits), *grad_out.shape[1:])
        dist.all_to_all_single(grad_in, grad_out.contiguous(), in_splits, out_splits, group=ctx.group)
        _count(ctx.traffic, grad_out, out_splits, ctx.me)
        return grad_in, None, None, None, None, None


def _count(traffic: Traffic | None, x: torch.Tensor, send_splits: list[int], me: int) -> None:
    if traffic is not None:
        row = math.prod(x.shape[1:]) * x.element_size()
        traffic.payload_bytes += (sum(send_splits) - send_splits[me]) * row
        traffic.calls += 1


def all_to_all(x_ND: torch.Tensor, out_splits: list[int], in_splits: list[int], group, me: int,
               traffic: Traffic | None = None) -> torch.Tensor:
    """Send ``in_splits[j]`` leading rows of ``x`` to group rank j, receive ``out_splits[j]`` from it
    (differentiable)."""
    return _AllToAll.apply(x_ND, out_splits, in_splits, group, me, traffic)


class ExpertParallelExperts(nn.Module):
    """The experts ``[lo, lo + L)`` of one MoE layer, with the call signature of :class:`Experts`.

    Its parameters keep the names and layout of :class:`Experts` (``gate_up_proj [L, 2F, D]``,
    ``down_proj [L, D, F]``), so optimizer groups, checkpoints and gradients line up by name with the
    one-process model; :func:`moekit.parallel.state` reassembles the full ``[E, ...]`` tensors.
    """

    def __init__(self, full: Experts, par: Parallel):
        super().__init__()
        E = full.num_experts
        self.num_experts, self.ffn_dim = E, full.ffn_dim
        self.ep, self.ep_rank, self.group, self.traffic = par.ep, par.ep_rank, par.ep_group, par.traffic
        self.local = E // par.ep
        self.lo = self.ep_rank * self.local
        sl = slice(self.lo, self.lo + self.local)
        # clone: the full [E, ...] tensors are freed once every layer is sharded
        self.gate_up_proj = nn.Parameter(full.gate_up_proj.detach()[sl].clone(), full.gate_up_proj.requires_grad)
        self.down_proj = nn.Parameter(full.down_proj.detach()[sl].clone(), full.down_proj.requires_grad)

    def extra_repr(self) -> str:
        return f"experts {self.lo}..{self.lo + self.local - 1} of {self.num_experts} (rank {self.ep_rank} of {self.ep})"

    def forward(self, x_TD: torch.Tensor, token_ids_A: torch.Tensor, expert_ids_A: torch.Tensor,
                weights_A: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        EP, L = self.ep, self.local
        # 1. this rank's assignments, sorted by (global) expert: rank j's experts form one block
        order_A, counts_E, tok_A, x_AD = gather_by_expert(x_TD, token_ids_A, expert_ids_A, self.num_experts)
        # 2. counts: recv_counts[j, l] = rows rank j sends to my local expert l
        recv_counts = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_counts, counts_E, group=self.group)
        if self.traffic is not None:
            self.traffic.count_bytes += (EP - 1) * L * counts_E.element_size()
        send_splits = counts_E.view(EP, L).sum(1).tolist()  # NOTE: host sync, as in the one-process path
        recv_counts_PL = recv_counts.view(EP, L)
        recv_splits = recv_counts_PL.sum(1).tolist()
        # 3. dispatch, then regroup the received rows (source-major) by local expert
        x_RD = all_to_all(x_AD, recv_splits, send_splits, self.group, self.ep_rank, self.traffic)
        local_of_row = torch.arange(L, device=x_TD.device).repeat(EP).repeat_interleave(recv_counts_PL.reshape(-1))
        by_expert = torch.sort(local_of_row, stable=True).indices
        x_RD = x_RD.index_select(0, by_expert)
        if x_RD.shape[0]:
            y_RD = grouped_swiglu(x_RD, self.gate_up_proj, self.down_proj, recv_counts_PL.sum(0))
        else:  # no rows for my experts: stay in the graph (the backward all-to-all must run) with zero grads,
            # in the dtype the experts would have produced (the combine's dtype must agree across ranks)
            dtype = swiglu_dtype(x_RD, self.gate_up_proj)
            anchor = 0.0 * (self.gate_up_proj.sum() + self.down_proj.sum())
            y_RD = (x_RD * 0.0).to(dtype) + anchor.to(dtype)
        y_RD = torch.empty_like(y_RD).index_copy(0, by_expert, y_RD)  # back to source-major order
        # 4. combine
        y_AD = all_to_all(y_RD, send_splits, recv_splits, self.group, self.ep_rank, self.traffic)
        return combine(y_AD, weights_A, order_A, tok_A, x_TD)

    # The MoE layer's "reference" dispatch mode runs the same exchange: there is one path under EP.
    reference = forward


def shard_experts(model: nn.Module, par: Parallel) -> nn.Module:
    """Replace every MoE layer's :class:`Experts` by this rank's :class:`ExpertParallelExperts` shard
    (in place; returns ``model``). A no-op without expert parallelism."""
    if par.ep == 1:
        return model
    for moe in model.moe_layers():
        if isinstance(moe.experts, Experts):
            moe.experts = ExpertParallelExperts(moe.experts, par)
    return model


def is_expert_param(name: str) -> bool:
    return name.endswith(("experts.gate_up_proj", "experts.down_proj"))
