"""Checks of moekit.parallel against the one-process model, run by tests/test_parallel.py under
``torchrun --nproc-per-node 2`` and ``4`` (real processes, gloo; with 4, EP=2 groups are replicated
twice, so expert gradients are also reduced over the replicas of each shard). Each rank computes the one-process reference
itself (the whole model on the whole batch, no collective), then the distributed version, and compares.
Exits non-zero with a message on the first mismatch; prints "rank R: ok" at the end.

    torchrun --nproc-per-node 2 tests/dist_checks.py   # or 4
"""

from __future__ import annotations

import dataclasses
import sys

import torch
import torch.distributed as dist

from moekit import ModelConfig, Transformer
from moekit.model.router import SigmoidBiasRouter
from moekit.parallel import (
    Parallel,
    clip_grad_norm_,
    full_model_state,
    is_expert_param,
    parallelize,
    reduce_expert_grads,
    wrap_data_parallel,
)

BASE = ModelConfig.from_preset("tiny-moe", vocab_size=512, dim=64, n_layers=2, n_heads=2, n_kv_heads=1,
                               num_experts=8, expert_ffn_dim=96, max_seq_len=64, z_loss_coef=1e-3)
B, T = 4, 32
TOL = 1e-4  # relative: float32 sums in another order


def fail(msg: str) -> None:
    print(f"rank {dist.get_rank()}: FAIL {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def close(name: str, a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> None:
    """Max error within ``tol`` of the reference's largest magnitude (relative, per tensor)."""
    err = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
    scale = b.float().abs().max().item() if b.numel() else 0.0
    if a.shape != b.shape or err > tol * scale + 1e-9:
        fail(f"{name}: shapes {tuple(a.shape)} vs {tuple(b.shape)}, max error {err:.3g} (scale {scale:.3g})")


def skew(model: Transformer, lo: int, hi: int) -> None:
    """sigmoid_bias routers: a selection bias that sends every token to experts lo..hi-1 only."""
    for moe in model.moe_layers():
        assert isinstance(moe.router, SigmoidBiasRouter)
        moe.router.bias.fill_(-100.0)
        moe.router.bias[lo:hi] = 100.0


def check(par: Parallel, name: str, cfg: ModelConfig, skewed: bool = False, bf16: bool = False) -> None:
    """``bf16``: under CPU autocast (the experts compute and the combine travels in bfloat16), with a
    looser tolerance: bf16 GEMMs over other row groupings round differently."""
    tol = 3e-2 if bf16 else TOL
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (B, T), generator=gen)
    y = torch.randint(0, cfg.vocab_size, (B, T), generator=gen)
    E = cfg.num_experts
    # the reference: one process, the whole batch
    torch.manual_seed(0)
    ref = Transformer(cfg)
    if skewed:
        skew(ref, E // 2, E)  # every token to the experts of rank 1
    with autocast:
        ref_out = ref(x, labels=y)
    (ref_out.loss + ref_out.aux_loss).backward()
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    # the same model, sharded and data-parallel
    torch.manual_seed(0)
    model = Transformer(cfg)
    if skewed:
        skew(model, E // 2, E)
    parallelize(model, par)
    ddp = wrap_data_parallel(model, par)
    par.traffic.reset()
    xl, yl = par.local_rows(x, y)
    with autocast:
        out = ddp(xl, labels=yl)
    (out.loss + out.aux_loss).backward()
    reduce_expert_grads(model, par)

    loss = par.all_reduce_sum(out.loss.detach().clone()) / par.world
    close(f"{name} loss", loss, ref_out.loss.detach(), tol)
    aux = par.all_reduce_sum(out.aux_loss.detach().clone()) / par.world
    close(f"{name} aux loss", aux, ref_out.aux_loss.detach(), tol)
    for n, p in model.named_parameters():
        if p.grad is None:
            fail(f"{name}: no gradient for {n}")
        want = ref_grads[n]
        if is_expert_param(n) and par.ep > 1:
            lo = par.ep_rank * (E // par.ep)
            want = want[lo:lo + E // par.ep]
        close(f"{name} grad {n}", p.grad, want, tol)
    if skewed and par.ep_rank == 0:  # my experts got no token: their gradient is exactly zero
        for n, p in model.named_parameters():
            if is_expert_param(n) and p.grad.abs().max() != 0:
                fail(f"{name}: expert grad {n} should be zero")
    norm = clip_grad_norm_(model, 0.5, par)
    close(f"{name} grad norm", norm, ref_norm, tol)

    # all-to-all bytes: exactly what the routing asked for (from each rank's own choices)
    D, L = cfg.dim, E // par.ep
    mine = slice(par.ep_rank * L, (par.ep_rank + 1) * L)
    expected = 0
    for stats in out.router_stats if par.ep > 1 else []:  # EP=1: every expert is local, nothing is exchanged
        local = stats.tokens_per_expert.clone()
        total = local.clone()
        dist.all_reduce(total, group=par.ep_group)  # rows only travel inside an EP group
        sent_off = int(local.sum() - local[mine].sum())  # my rows for other ranks' experts
        recv_off = int((total[mine] - local[mine]).sum())  # other ranks' rows for my experts
        # dispatch rows (float32) go out and their gradients come back, and the combine's rows (the experts'
        # dtype) come back and their gradients go out: each off-rank row crosses once in each form
        expected += (sent_off + recv_off) * D * (4 + (2 if bf16 else 4))
    if par.traffic.payload_bytes != expected:
        fail(f"{name}: all-to-all sent {par.traffic.payload_bytes} bytes, routing implies {expected}")

    state = full_model_state(model, par)
    if par.is_main:
        for n, v in ref.state_dict().items():
            close(f"{name} gathered {n}", state[n], v, 0.0)


def check_runs(par: Parallel, name: str, cfg: ModelConfig) -> None:
    """A router whose noise is drawn per rank (noisy_topk): no one-process equal, but a finite loss and
    a gradient for every parameter, through the sharded experts."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    parallelize(model, par)
    ddp = wrap_data_parallel(model, par)
    x = torch.randint(0, cfg.vocab_size, (B // par.world, T), generator=torch.Generator().manual_seed(par.rank))
    out = ddp(x, labels=x)
    (out.loss + out.aux_loss).backward()
    reduce_expert_grads(model, par)
    if not torch.isfinite(out.loss + out.aux_loss):
        fail(f"{name}: loss {out.loss.item()}, aux {out.aux_loss.item()}")
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    if missing:
        fail(f"{name}: no finite gradient for {missing}")


def main() -> None:
    par = Parallel.from_env(expert_parallel=2)
    torch.set_num_threads(1)
    check(par, "topk", BASE)
    check(par, "switch", dataclasses.replace(BASE, router="switch", top_k=1))
    check(par, "sigmoid_bias", dataclasses.replace(BASE, router="sigmoid_bias", aux_loss_coef=0.0))
    check(par, "skewed", dataclasses.replace(BASE, router="sigmoid_bias", aux_loss_coef=0.0), skewed=True)
    # bf16: the rank whose experts get nothing must send its (empty) combine in the experts' dtype
    check(par, "skewed bf16", dataclasses.replace(BASE, router="sigmoid_bias", aux_loss_coef=0.0), skewed=True,
          bf16=True)
    check_runs(par, "noisy_topk", dataclasses.replace(BASE, router="noisy_topk"))
    # plain data parallelism (EP=1): experts replicated, all gradients through DDP
    check(Parallel.from_env(expert_parallel=1), "topk data-parallel", BASE)
    print(f"rank {par.rank}: ok", flush=True)
    par.close()


if __name__ == "__main__":
    main()
