"""Data parallelism: PyTorch's DDP for the replicated parameters, the expert shards' gradients reduced
over the ranks holding the same shard, global router losses, and a gradient-norm clip over all of it.

Why each piece gives the one-process gradient of the global batch (W ranks, each with 1/W of it):

- every rank's loss is the mean over its own rows, so the global loss is the mean of the ranks' losses
  and DDP's gradient average is exact for replicated parameters;
- an expert shard receives, through the all-to-all's backward, the gradients of every rank of its EP
  group; summing those over the shard's data-parallel replicas and dividing by W gives the average;
- the balance losses are nonlinear in batch statistics (fraction of tokens per expert, mean router
  probability), so a mean of per-rank losses would not be the global loss. The routers' sums go
  through :class:`GlobalSum` (an all-reduce whose backward all-reduces the gradient), which makes every
  rank compute the global batch's loss; with DDP's average its gradients are the global ones.
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.parallel.expert import is_expert_param
from moekit.parallel.mesh import Parallel


class _GlobalSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group):
        import torch.distributed as dist

        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class GlobalSum:
    """``global_sum(t)``: the sum of ``t`` over all ranks, differentiable. Set as ``router.global_sum``."""

    def __init__(self, group):
        self.group = group

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return _GlobalSum.apply(t, self.group)


def attach_global_router_losses(model: nn.Module, par: Parallel) -> None:
    """Make every router compute its balance loss over the global batch (see the module docstring)."""
    if not par.distributed:
        return
    hook = GlobalSum(par.stats_group)
    for moe in model.moe_layers():
        moe.router.global_sum = hook


def wrap_data_parallel(model: nn.Module, par: Parallel) -> nn.Module:
    """DDP over every parameter except expert shards (those are reduced by :func:`reduce_expert_grads`).

    ``broadcast_buffers=False``: the only buffers that change (DeepSeek-V3 balance biases) are updated
    on every rank from the same all-reduced loads, so they never diverge.
    """
    if not par.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    if par.ep > 1:
        # A private but long-standing DDP hook (torch 1.x to 2.13; tests/dist_checks.py fails without it).
        ignore = [n for n, _ in model.named_parameters() if is_expert_param(n)]
        DDP._set_params_and_buffers_to_ignore_for_model(model, ignore)
    import inspect

    # torch >= 2.12 renames broadcast_buffers to forward_sync_buffers (the old name warns)
    sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters
            else "broadcast_buffers")
    return DDP(model, gradient_as_bucket_view=True, **{sync: False})


def reduce_expert_grads(model: nn.Module, par: Parallel) -> None:
    """Expert-shard gradients: sum over the shard's data-parallel replicas, divide by the world size."""
    if par.ep == 1:
        return  # replicated experts: DDP already averaged them
    import torch.distributed as dist

    params = [p for n, p in model.named_parameters() if is_expert_param(n)]
    if not params:  # a dense model (compare's twin): nothing sharded
        return
    for p in params:
        if p.grad is None:  # cannot happen with the zero-token anchor; never leave one missing
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    if par.world // par.ep > 1:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=par.expert_dp_group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
    torch._foreach_div_(grads, float(par.world))


def clip_grad_norm_(model: nn.Module, max_norm: float, par: Parallel) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the whole model, expert shards included: the squared
    norms of the shards are summed over the EP group; replicated gradients are already identical."""
    if par.ep == 1:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    import torch.distributed as dist

    shared, expert = [], []
    for n, p in model.named_parameters():
        if p.grad is not None:
            (expert if is_expert_param(n) else shared).append(p.grad)
    # as torch's clip_grad_norm_: per-tensor float32 norms (foreach), then the norm of the norms
    sq = torch.zeros(2, device=(shared or expert)[0].device)
    for i, grads in enumerate((shared, expert)):
        if grads:
            sq[i] = torch.stack(torch._foreach_norm(grads)).square().sum()
    expert_sq = sq[1:].clone()
    dist.all_reduce(expert_sq, group=par.ep_group)
    total = (sq[0] + expert_sq[0]).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(shared + expert, coef)
    return total


def no_sync(train_model: nn.Module, skip: bool):
    """DDP's ``no_sync`` for the micro-batches before the last of a step (gradient accumulation)."""
    import contextlib

    if skip and hasattr(train_model, "no_sync"):
        return train_model.no_sync()
    return contextlib.nullcontext()
