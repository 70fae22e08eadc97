"""MoE layer: fast dispatch against the reference loop, and MoE against the dense MLP it generalises."""

import pytest
import torch
from torch.testing import assert_close

from moekit import ModelConfig
from moekit.model.experts import Experts
from moekit.model.layers import MLP
from moekit.model.moe import MoE
from moekit.model.router import build_router

ROUTERS = ["topk", "switch", "noisy_topk", "expert_choice", "sigmoid_bias"]


def cfg_for(router, **kw):
    base = dict(router=router, top_k=1 if router == "switch" else 2, dim=32, n_heads=4, n_kv_heads=2,
                expert_ffn_dim=24, num_experts=8)
    base.update(kw)
    return ModelConfig.from_preset("tiny-moe", **base)


def init_(module, std=0.2):
    for p in module.parameters():
        torch.nn.init.normal_(p, std=std)
    return module


@pytest.fixture(params=["grouped_mm", "loop"])
def gemm_path(request, monkeypatch):
    """Both ways the fast path runs its per-expert GEMMs: torch's grouped_mm, and the loop of mm it
    falls back to (other dtypes and devices, older torch)."""
    if request.param == "loop":
        import moekit.model.experts as experts_module

        monkeypatch.setattr(experts_module, "_offsets", lambda counts, like: None)
    return request.param


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("cf", [None, 0.75])
def test_fast_dispatch_equals_reference_forward_and_grad(router, cf, gemm_path):
    if router == "switch" and cf is None:
        cf = 2.0
    cfg = cfg_for(router, capacity_factor=cf, min_capacity=1)
    router_mod = init_(build_router(cfg), std=0.5)
    with torch.no_grad():  # skew: most tokens want expert 0, some experts get none
        router_mod.weight[0] += 3.0
        router_mod.weight[5] -= 3.0
    experts = init_(Experts(cfg))
    x = torch.rand(50, 32)
    routing = router_mod(x)
    counts = torch.bincount(routing.expert_ids_A, minlength=8)
    if router != "expert_choice":
        assert (counts == 0).any(), "the test must include experts that get zero tokens"

    outs, grads = [], []
    for path in (experts, experts.reference):
        xi = x.clone().requires_grad_(True)
        w = routing.weights_A.detach().clone().requires_grad_(True)
        experts.zero_grad()
        y = path(xi, routing.token_ids_A, routing.expert_ids_A, w)
        y.backward(torch.randn_like(y, generator=torch.Generator().manual_seed(0)))
        outs.append(y)
        grads.append((xi.grad, w.grad, experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()))
    assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(*grads):
        assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("router", ROUTERS)
def test_moe_layer_fast_equals_reference_with_padding(router):
    cfg = cfg_for(router, capacity_factor=1.0 if router == "switch" else None)
    moe = init_(MoE(cfg)).eval()
    x = torch.randn(3, 10, 32, requires_grad=True)
    mask = torch.ones(3, 10)
    mask[1, 7:] = 0
    mask[2, :3] = 0
    results = []
    for mode in ("fast", "reference"):
        moe.dispatch = mode
        moe.zero_grad()
        x.grad = None
        y, aux, stats = moe(x, mask)
        (y.pow(2).sum() + aux).backward()
        results.append((y, x.grad.clone(), [p.grad for p in moe.parameters()]))
    assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    assert_close(results[0][1], results[1][1], atol=1e-5, rtol=1e-5)
    for a, b in zip(results[0][2], results[1][2]):
        if a is None or b is None:  # noisy top-k's noise weight is unused in eval
            assert a is None and b is None
            continue
        assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_dropped_tokens_leave_the_layer_unchanged():
    cfg = cfg_for("switch", capacity_factor=0.5, min_capacity=1)
    moe = init_(MoE(cfg)).train()
    with torch.no_grad():
        moe.router.weight[2] += 4.0
    x = torch.rand(1, 40, 32)
    y, _, stats = moe(x)
    routed = set(moe.router(x.view(40, 32)).token_ids_A.tolist())
    dropped = [t for t in range(40) if t not in routed]
    assert dropped and stats.dropped_fraction > 0
    assert torch.equal(y[0, dropped], torch.zeros(len(dropped), 32))
    assert (y[0, sorted(routed)].abs().sum(-1) > 0).all()


def test_one_expert_top1_equals_dense_mlp():
    cfg = cfg_for("topk", num_experts=1, top_k=1)
    moe = init_(MoE(cfg))
    mlp = MLP(32, 24)
    F_ = 24
    with torch.no_grad():
        mlp.gate_proj.weight.copy_(moe.experts.gate_up_proj[0, :F_])
        mlp.up_proj.weight.copy_(moe.experts.gate_up_proj[0, F_:])
        mlp.down_proj.weight.copy_(moe.experts.down_proj[0])
    x = torch.randn(2, 7, 32)
    y, _, _ = moe(x)
    assert_close(y, mlp(x))


@pytest.mark.parametrize("router, kw", [
    ("topk", {}), ("topk", dict(capacity_factor=4.0)), ("noisy_topk", {}),
    ("sigmoid_bias", {}), ("sigmoid_bias", dict(n_group=4, topk_group=2)), ("topk", dict(top_k=8)),
])
@pytest.mark.parametrize("training", [False, True])
def test_copies_of_one_mlp_equal_that_mlp(router, kw, training):
    cfg = cfg_for(router, **kw)
    moe = init_(MoE(cfg), std=0.5).train(training)
    mlp = init_(MLP(32, 24))
    with torch.no_grad():
        moe.experts.gate_up_proj.copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])[None].expand(8, -1, -1))
        moe.experts.down_proj.copy_(mlp.down_proj.weight[None].expand(8, -1, -1))
    x = torch.randn(2, 9, 32)
    y, _, _ = moe(x)
    assert_close(y, mlp(x), atol=1e-5, rtol=1e-5)


def test_shared_expert_with_sigmoid_gate():
    cfg = cfg_for("topk", num_shared_experts=1, shared_expert_ffn_dim=40, shared_expert_gate=True)
    moe = init_(MoE(cfg))
    x = torch.randn(1, 5, 32)
    y, _, _ = moe(x)
    moe_no_shared = MoE(cfg_for("topk"))
    moe_no_shared.load_state_dict({k: v for k, v in moe.state_dict().items() if "shared" not in k})
    routed, _, _ = moe_no_shared(x)
    x2 = x.view(5, 32)
    shared = torch.sigmoid(moe.shared_expert_gate(x2)) * moe.shared_expert(x2)
    assert_close(y.view(5, 32), routed.view(5, 32) + shared)


@pytest.mark.parametrize("router", ROUTERS)
def test_zero_tokens_still_give_gradients_to_every_expert_weight(router, gemm_path):
    """The gradient anchor: no token routed (all padding) -> grads are zeros, not None (no DDP/EP hang)."""
    moe = init_(MoE(cfg_for(router)))
    x = torch.randn(2, 4, 32, requires_grad=True)
    y, aux, _ = moe(x, torch.zeros(2, 4))
    (y.sum() + aux).backward()
    assert moe.experts.gate_up_proj.grad is not None and moe.experts.down_proj.grad is not None
    assert moe.experts.gate_up_proj.grad.abs().sum() == 0


def test_fast_path_under_bf16_autocast_is_close(gemm_path):
    cfg = cfg_for("topk")
    moe = init_(MoE(cfg))
    x = torch.randn(2, 16, 32)
    ref, _, _ = moe(x)
    routing = moe.router(x.view(-1, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _, _ = moe(x)
        routing_bf16 = moe.router(x.view(-1, 32))
    assert routing_bf16.weights_A.dtype == torch.float32  # the router stays float32 under autocast
    assert torch.equal(routing.expert_ids_A, routing_bf16.expert_ids_A)
    assert_close(y.float(), ref, atol=3e-2, rtol=3e-2)


def _at_offset(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A copy of ``t`` whose data starts ``offset`` elements past a 64-byte boundary (as a tensor packed
    into a memory-mapped safetensors file can)."""
    buf = torch.empty(t.numel() + 16, dtype=t.dtype)
    assert buf.data_ptr() % 64 == 0  # torch's CPU allocator aligns to 64 bytes
    view = buf[offset:offset + t.numel()].view(t.shape)
    view.copy_(t)
    return view


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_give_the_same_bits_wherever_their_weights_sit_in_memory(gemm_path, dtype):
    """MKL picks its GEMM kernel by address alignment (seen: a one-row group with weights off a 16-byte
    boundary rounds differently); the fast path must not let that change the result: offloaded
    experts are views on a mapped file, at any 4-byte offset (tests/test_offload.py)."""
    experts = init_(Experts(cfg_for("topk", dim=64, expert_ffn_dim=32))).to(dtype)
    # 6 tokens x 2 experts; rows per expert 2, 2, 1, 1, 3, 1, 1, 1 (one-row groups are the sensitive ones)
    tok = torch.arange(6).repeat_interleave(2)
    ids = torch.tensor([0, 1, 1, 2, 3, 4, 4, 5, 4, 6, 7, 0])
    gates = torch.rand(12)
    x, dy = torch.randn(6, 64, dtype=dtype), torch.randn(6, 64, dtype=dtype)

    def run(w1, w2):
        experts.gate_up_proj, experts.down_proj = torch.nn.Parameter(w1), torch.nn.Parameter(w2)
        xi = x.clone().requires_grad_(True)
        y = experts(xi, tok, ids, gates)
        y.backward(dy)
        return y, xi.grad, experts.gate_up_proj.grad, experts.down_proj.grad

    w1, w2 = experts.gate_up_proj.detach().clone(), experts.down_proj.detach().clone()
    expected = run(w1, w2)
    for offset in (1, 2, 3, 6, 9, 15):  # 4 to 60 bytes past the boundary
        got = run(_at_offset(w1, offset), _at_offset(w2, offset))
        assert experts.gate_up_proj.data_ptr() % 64 and experts.down_proj.data_ptr() % 64  # really misaligned
        for name, a, b in zip(("y", "dx", "dw1", "dw2"), got, expected):
            assert torch.equal(a, b), (offset, name, (a - b).abs().max())
