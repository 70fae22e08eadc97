"""World-size-independent checkpoints: full tensors in, full tensors out.

A run's checkpoint holds every tensor whole (``model.safetensors`` and the optimizer state in
``trainer_state.pt``) exactly as a one-process run writes it, so it resumes on any number of processes
and any expert-parallel degree, and ``moekit.load`` reads it in one process. Saving gathers each expert
shard (and its AdamW moments) from the ranks of rank 0's expert-parallel group; loading slices the
full tensors back into this rank's shard.

Cost: rank 0 holds a full copy of the expert weights and their optimizer state while it writes. That
bounds the model to what one host's memory holds -- the size every moekit tool works at today;
sharded ``torch.distributed.checkpoint`` files would lift it (docs/distributed.md).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moekit.parallel.expert import ExpertParallelExperts, is_expert_param
from moekit.parallel.mesh import Parallel


def _gather_shards(t: torch.Tensor, par: Parallel) -> torch.Tensor | None:
    """The full [E, ...] tensor from the shards of rank 0's EP group (on rank 0; None elsewhere)."""
    import torch.distributed as dist

    if par.is_main:
        parts = [torch.empty_like(t) for _ in range(par.ep)]
        dist.gather(t.contiguous(), parts, dst=0, group=par.ep_group)
        return torch.cat(parts)
    dist.gather(t.contiguous(), None, dst=0, group=par.ep_group)
    return None


def full_model_state(model: nn.Module, par: Parallel) -> dict[str, torch.Tensor] | None:
    """The one-process state dict (full expert tensors) on rank 0; None on other ranks."""
    from moekit.checkpoint import model_state

    if not par.in_main_ep_group:
        return None
    state = model_state(model)
    if par.ep == 1:
        return state
    for name in list(state):
        if is_expert_param(name):
            state[name] = _gather_shards(state[name], par)
    return state if par.is_main else None


def _index_to_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, str]:
    """Optimizer state-dict index (params numbered in group order) -> parameter name."""
    names = {id(p): n for n, p in model.named_parameters()}
    out, i = {}, 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            out[i] = names[id(p)]
            i += 1
    return out


def full_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, par: Parallel) -> dict[str, Any] | None:
    """``optimizer.state_dict()`` with the expert shards' moments gathered whole (on rank 0)."""
    if not par.in_main_ep_group:
        return None
    sd = optimizer.state_dict()
    if par.ep == 1:
        return sd
    names = _index_to_name(model, optimizer)
    for idx, st in list(sd["state"].items()):
        if is_expert_param(names[idx]):
            # a new dict: state_dict() shares the optimizer's own per-parameter dicts
            sd["state"][idx] = {k: (_gather_shards(v, par) if torch.is_tensor(v) and v.dim() > 0 else v)
                                for k, v in st.items()}
    return sd if par.is_main else None


def shard_optimizer_state(sd: dict[str, Any], optimizer: torch.optim.Optimizer, model: nn.Module,
                          par: Parallel) -> dict[str, Any]:
    """A full optimizer state dict (any world size wrote it) cut down to this rank's expert shards."""
    if par.ep == 1:
        return sd
    names = _index_to_name(model, optimizer)
    modules = dict(model.named_modules())
    state = {}
    for idx, st in sd["state"].items():
        name = names[idx]
        if is_expert_param(name):
            shard: ExpertParallelExperts = modules[name.rsplit(".", 1)[0]]
            sl = slice(shard.lo, shard.lo + shard.local)
            st = {k: (v[sl].clone() if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in st.items()}
        state[idx] = st
    return {"state": state, "param_groups": sd["param_groups"]}
