"""Scale-out on PyTorch's own distributed engine (``torchrun``; gloo on CPUs, NCCL on GPUs).

Applied to a model from outside; nothing in ``moekit/model`` imports ``torch.distributed``:

- :mod:`moekit.parallel.mesh`      -- the process layout (:class:`Parallel`), launch checks, small collectives
- :mod:`moekit.parallel.expert`    -- expert parallelism: expert shards, the all-to-all dispatch and combine
- :mod:`moekit.parallel.replicate` -- data parallelism: DDP, expert-gradient reduction, global router
  losses, gradient clipping over sharded parameters
- :mod:`moekit.parallel.state`     -- world-size-independent checkpoints (full tensors in and out)

See docs/distributed.md for launching and the communication cost model.
"""

from moekit.parallel.expert import ExpertParallelExperts, all_to_all, is_expert_param, shard_experts
from moekit.parallel.mesh import Parallel, ParallelError, Traffic
from moekit.parallel.replicate import (
    attach_global_router_losses,
    clip_grad_norm_,
    no_sync,
    reduce_expert_grads,
    wrap_data_parallel,
)
from moekit.parallel.state import full_model_state, full_optimizer_state, shard_optimizer_state


def parallelize(model, par: Parallel):
    """Shard the experts over the EP group and make the router losses global (in place): the model a
    rank trains. Wrap it with :func:`wrap_data_parallel` after building the optimizer."""
    shard_experts(model, par)
    attach_global_router_losses(model, par)
    return model


__all__ = [
    "Parallel", "ParallelError", "Traffic", "ExpertParallelExperts", "all_to_all", "is_expert_param", "shard_experts",
    "attach_global_router_losses", "clip_grad_norm_", "no_sync", "reduce_expert_grads",
    "wrap_data_parallel", "full_model_state", "full_optimizer_state", "shard_optimizer_state", "parallelize",
]
