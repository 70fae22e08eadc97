"""The process layout of a distributed run and the small collectives the trainer needs.

Legend: W world size (processes), EP expert-parallel degree, DP = W / EP data-parallel replicas of
each expert shard.

Layout (``torchrun --nproc-per-node N ... --expert-parallel EP``): ranks form W / EP expert-parallel
groups of EP *consecutive* ranks, ``[0..EP-1], [EP..2EP-1], ...``; rank r holds expert shard
``r % EP`` of every MoE layer. Consecutive ranks share a node under torchrun, so the all-to-all of an
MoE layer stays inside a node while only gradient all-reduces cross nodes. The ranks holding the
same shard (``{s, s+EP, s+2EP, ...}``) form that shard's data-parallel group: its expert gradients
are reduced there and nowhere else. Every rank reads its own rows of the same global batch.

With one process (``Parallel.single()``) every method is a no-op, so the training loop has one body.
"""

from __future__ import annotations

import datetime
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from moekit.config import ConfigError, ModelConfig


class ParallelError(ConfigError):
    """A launch or layout that cannot work (raised identically on every rank, before any collective)."""


@dataclass
class Traffic:
    """Bytes this rank sent to *other* ranks through the expert all-to-alls (payload and counts)."""

    payload_bytes: int = 0  # token rows (forward dispatch and combine, and their gradients)
    count_bytes: int = 0  # the per-expert token counts exchanged before each dispatch
    calls: int = 0

    def reset(self) -> None:
        self.payload_bytes = self.count_bytes = self.calls = 0


@dataclass
class Parallel:
    """Who this process is in the run, and the process groups it talks on (None with one process)."""

    rank: int = 0
    world: int = 1
    ep: int = 1  # expert-parallel degree
    local_rank: int = 0
    ep_group: Any = None  # the EP consecutive ranks sharing one copy of all experts
    expert_dp_group: Any = None  # the ranks holding the same expert shard
    stats_group: Any = None  # all ranks: router-loss sums (kept apart from DDP's gradient all-reduces)
    traffic: Traffic = field(default_factory=Traffic)

    # ----------------------------------------------------------------- construction
    @classmethod
    def single(cls) -> Parallel:
        return cls()

    @classmethod
    def from_env(cls, expert_parallel: int = 1, timeout_s: float | None = None) -> Parallel:
        """The layout ``torchrun`` describes in the environment (``RANK``, ``WORLD_SIZE``, ...), with
        ``expert_parallel`` ranks per expert-parallel group. Without torchrun: one process.

        The layout is checked before the process group is created, from values every rank sees
        alike, so a bad launch fails with the same message on every rank instead of hanging.
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if expert_parallel < 1:
            raise ParallelError(f"--expert-parallel {expert_parallel} must be >= 1")
        if world == 1:
            if expert_parallel > 1:
                raise ParallelError(f"--expert-parallel {expert_parallel} needs a multiple of {expert_parallel} processes: "
                                    f"launch with torchrun --nproc-per-node {expert_parallel} -m moekit ...")
            return cls.single()
        if world % expert_parallel:
            raise ParallelError(f"--expert-parallel {expert_parallel} does not divide the {world} processes; "
                                f"use a divisor of {world}")
        import torch.distributed as dist

        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            # Collectives go to gloo for CPU tensors and to NCCL for CUDA tensors when both exist.
            cuda = torch.cuda.is_available() and dist.is_nccl_available()
            backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
            kwargs = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
            dist.init_process_group(backend, **kwargs)
        par = cls(rank=rank, world=world, ep=expert_parallel, local_rank=local_rank)
        # new_group is collective: every rank creates every group, in the same order. With EP=1 there
        # are no expert shards, so no EP or shard groups.
        for g in range(world // expert_parallel if expert_parallel > 1 else 0):
            ranks = list(range(g * expert_parallel, (g + 1) * expert_parallel))
            group = dist.new_group(ranks)
            if rank in ranks:
                par.ep_group = group
        for s in range(expert_parallel if expert_parallel > 1 else 0):
            ranks = list(range(s, world, expert_parallel))
            group = dist.new_group(ranks)
            if rank in ranks:
                par.expert_dp_group = group
        par.stats_group = dist.new_group(list(range(world)))
        return par

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    # ----------------------------------------------------------------- facts
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def in_main_ep_group(self) -> bool:
        """Whether this rank is in rank 0's EP group (the ranks that gather a checkpoint's shards)."""
        return self.rank < self.ep

    @property
    def ep_rank(self) -> int:
        """Which expert shard this rank holds."""
        return self.rank % self.ep

    def __repr__(self) -> str:
        return f"Parallel(rank={self.rank}, world={self.world}, ep={self.ep})"

    def check(self, cfg: ModelConfig, batch_size: int) -> None:
        """Refuse, with one line on every rank, what this layout cannot run with its global meaning."""
        if not self.distributed:
            return
        if batch_size % self.world:
            raise ParallelError(f"batch_size {batch_size} is the global batch and must divide evenly over the "
                                f"{self.world} processes; use a multiple of {self.world}")
        if cfg.num_experts == 0:
            return  # a dense model: plain data parallelism whatever --expert-parallel says
        if cfg.num_experts % self.ep:
            raise ParallelError(f"--expert-parallel {self.ep} does not divide num_experts={cfg.num_experts}; "
                                f"each rank must hold the same number of experts")
        if cfg.router == "expert_choice":
            raise ParallelError("the expert_choice router cannot train on several processes: each expert picks its "
                                "top tokens from the whole batch, which no rank sees; use a token-choice router "
                                "(topk, switch, noisy_topk, sigmoid_bias) or one process")
        for name in ("capacity_factor", "eval_capacity_factor"):
            if getattr(cfg, name) is not None:
                raise ParallelError(f"{name}={getattr(cfg, name)} cannot run on several processes with its one-process "
                                    "meaning (which tokens overflow depends on the whole batch's order); train dropless "
                                    f"(unset {name}) or on one process")

    # ----------------------------------------------------------------- data
    def local_rows(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This rank's contiguous share of the rows of each global-batch tensor."""
        if not self.distributed:
            return tensors
        n = tensors[0].shape[0]
        per = n // self.world
        return tuple(t[self.rank * per:(self.rank + 1) * per] for t in tensors)

    # ----------------------------------------------------------------- collectives
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(t, group=self.stats_group)
        return t

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier(group=self.stats_group)

    def main_first(self, fn: Callable[[], Any], then: Callable[[], Any] | None = None) -> Any:
        """Run ``fn`` on rank 0 (which may write files), then tell every rank how it went.

        An exception on rank 0 is raised on every rank with the same type and message, so a refusal
        ("the run directory exists") is one line on each rank, never a hang. The other ranks then run
        ``then`` (which should only read what rank 0 wrote, e.g. a filled cache) and return its
        result; without ``then`` they return rank 0's result (which must pickle).
        """
        if not self.distributed:
            return fn()
        import torch.distributed as dist

        outcome: list[Any] = [None]
        if self.is_main:
            try:
                result = fn()
            except BaseException as e:  # noqa: BLE001 - re-raised below, after the others are told
                outcome = [("error", _portable_error(e))]
                dist.broadcast_object_list(outcome, src=0, group=self.stats_group)
                raise
            outcome = [("ok", None if then is not None else result)]
            dist.broadcast_object_list(outcome, src=0, group=self.stats_group)
            return result
        dist.broadcast_object_list(outcome, src=0, group=self.stats_group)
        kind, value = outcome[0]
        if kind == "error":
            raise value
        return then() if then is not None else value


def _portable_error(e: BaseException) -> BaseException:
    """``e`` if it pickles (the other ranks raise the same error), else a RuntimeError with its text."""
    try:
        clone = pickle.loads(pickle.dumps(e))
        if str(clone) == str(e):
            return clone
    except Exception:  # noqa: BLE001
        pass
    return RuntimeError(f"rank 0 failed: {type(e).__name__}: {e}")
