"""Each router against its definition: shapes, distinct experts, gate weights, capacity, balance."""

import math

import pytest
import torch
from torch.testing import assert_close

from moekit import ModelConfig
from moekit.model.router import (
    ExpertChoiceRouter,
    balance_bias_update,
    build_router,
    capacity_keep_mask,
    expert_capacity,
    topk_ids,
)

TOKEN_CHOICE = ["topk", "switch", "noisy_topk", "sigmoid_bias"]
ALL = TOKEN_CHOICE + ["expert_choice"]


def make_router(name, **overrides):
    k = 1 if name == "switch" else 2
    cfg = ModelConfig.from_preset("tiny-moe", router=name, top_k=k, dim=32, n_heads=4, n_kv_heads=2, **overrides)
    router = build_router(cfg)
    torch.nn.init.normal_(router.weight, std=0.5)
    return router


def skew(router, expert=0, strength=5.0):
    """Make every token prefer ``expert`` strongly (inputs will be positive)."""
    with torch.no_grad():
        router.weight[expert] += strength
    return router


@pytest.mark.parametrize("name", TOKEN_CHOICE)
def test_token_choice_gives_k_distinct_experts_per_token(name):
    router = make_router(name)
    T = 40
    r = router(torch.randn(T, 32))
    K = router.top_k
    assert r.token_ids_A.shape == r.expert_ids_A.shape == r.weights_A.shape == (T * K,)
    assert torch.equal(r.token_ids_A, torch.arange(T).repeat_interleave(K))
    ids_TK = r.expert_ids_A.view(T, K)
    assert all(len(set(row.tolist())) == K for row in ids_TK)
    assert (r.weights_A >= 0).all()
    assert r.stats.tokens_per_expert.sum() == T * K
    assert r.aux_loss.dim() == 0 and torch.isfinite(r.aux_loss)


@pytest.mark.parametrize("name", ["topk", "noisy_topk", "sigmoid_bias"])
@pytest.mark.parametrize("training", [True, False])
def test_renormalised_gate_weights_sum_to_one(name, training):
    router = make_router(name).train(training)
    r = router(torch.randn(30, 32))
    assert_close(r.weights_A.view(30, 2).sum(-1), torch.ones(30))


@pytest.mark.parametrize("name", ["topk", "sigmoid_bias"])
@pytest.mark.parametrize("norm", [True, False])
def test_routed_scaling_factor_scales_weights_in_training_and_select(name, norm):
    x = torch.randn(30, 32)
    plain = make_router(name, norm_topk_prob=norm)
    scaled = make_router(name, norm_topk_prob=norm, routed_scaling_factor=2.0)
    scaled.load_state_dict(plain.state_dict())
    a, b = plain(x), scaled(x)
    assert torch.equal(a.expert_ids_A, b.expert_ids_A)
    assert_close(b.weights_A, 2.0 * a.weights_A)
    ids, w = scaled.eval().select(x)
    assert torch.equal(ids.reshape(-1), b.expert_ids_A)
    assert_close(w.reshape(-1), b.weights_A)


@pytest.mark.parametrize("T,E,k", [(100, 16, 1), (100, 16, 2), (300, 64, 4), (70, 8, 3), (10, 16, 2), (100, 64, 8)])
def test_topk_ids_is_topk(T, E, k):
    scores = torch.randn(T, E, generator=torch.Generator().manual_seed(T + E + k))
    assert torch.equal(topk_ids(scores, k), scores.topk(k, dim=-1).indices)
    scores[:, 3] = float("inf")  # an expert every token wants is first
    assert (topk_ids(scores, k)[:, 0] == 3).all()


def test_topk_matches_plain_softmax_topk():
    router = make_router("topk", norm_topk_prob=False)
    x = torch.randn(10, 32)
    r = router(x)
    probs = (x @ router.weight.t()).softmax(-1)
    top, ids = probs.topk(2, dim=-1)
    assert torch.equal(r.expert_ids_A.view(10, 2), ids)
    assert_close(r.weights_A.view(10, 2), top)


def test_switch_gate_is_router_probability():
    router = make_router("switch")
    x = torch.randn(10, 32)
    r = router.eval()(x)
    probs = (x @ router.weight.t()).softmax(-1)
    assert torch.equal(r.expert_ids_A, probs.argmax(-1))
    assert_close(r.weights_A, probs.max(-1).values)


def test_switch_gate_scale_at_init_and_the_unit_gate():
    """Issue 18: the paper's gate multiplies a top-1 expert's output by its probability, ~1/E at init
    (with a small init, as Switch's 0.1x): the layer starts nearly switched off. ``switch_gate="unit"``
    gives exactly 1 in the forward pass and still a router gradient; ``routed_scaling_factor`` is used."""
    torch.manual_seed(0)
    E = 8
    cfg = ModelConfig.from_preset("tiny-moe", router="switch", top_k=1, num_experts=E, dim=32, n_heads=4, n_kv_heads=2)
    x = torch.randn(256, 32)
    prob = build_router(cfg)
    torch.nn.init.normal_(prob.weight, std=0.002)  # a small init: near-uniform probabilities
    w_prob = prob(x).weights_A
    assert w_prob.mean().item() == pytest.approx(1 / E, rel=0.05)  # the quantity the fix corrects
    unit = build_router(ModelConfig.from_preset("tiny-moe", router="switch", top_k=1, num_experts=E, dim=32, n_heads=4,
                                                n_kv_heads=2, switch_gate="unit"))
    with torch.no_grad():
        unit.weight.copy_(prob.weight)
    r = unit(x)
    assert torch.equal(r.weights_A, torch.ones_like(r.weights_A))  # exactly 1 forward
    assert torch.equal(r.expert_ids_A, prob(x).expert_ids_A)  # same choices
    upstream = torch.randn_like(r.weights_A)
    (r.weights_A * upstream).sum().backward()
    probs = (x @ unit.weight.detach().t()).softmax(-1)
    p_top = probs.gather(1, r.expert_ids_A[:, None])[:, 0]
    # d/dlogits of p/sg(p) = d log p: softmax-jacobian row of the chosen expert, over p
    onehot = torch.nn.functional.one_hot(r.expert_ids_A, E).float()
    want = ((upstream[:, None] * (onehot - probs)).t() @ x) * 1.0  # sum_t g_t (e_i - p) x_t^T
    assert_close(unit.weight.grad, want, rtol=1e-4, atol=1e-5)
    assert p_top.min() > 0
    scaled = build_router(ModelConfig.from_preset("tiny-moe", router="switch", top_k=1, num_experts=E, dim=32,
                                                  n_heads=4, n_kv_heads=2, routed_scaling_factor=float(E)))
    with torch.no_grad():
        scaled.weight.copy_(prob.weight)
    assert_close(scaled(x).weights_A, w_prob * E)  # used, not ignored
    assert_close(scaled.eval().select(x)[1][:, 0], w_prob * E)


def test_switch_matched_gate_starts_at_the_dense_ffns_output_scale():
    """``switch_gate="matched"`` (the switch router's default) keeps the paper's gate p (~1/E at init)
    and initialises the experts' output projections E times larger: the MoE layer's output at init has the dense FFN's scale (the
    paper's gate: ~1/E of it), and the gate itself is untouched."""
    from moekit.model import Transformer

    E, D, F = 8, 32, 64
    kw = dict(dim=D, n_heads=4, n_kv_heads=2, n_layers=1, vocab_size=64, max_seq_len=32)

    def layer_rms(cfg):
        torch.manual_seed(0)
        model = Transformer(cfg)
        with torch.no_grad():
            if cfg.num_experts:
                model.layers[0].ffn.router.weight.normal_(std=0.002)  # near-uniform probabilities, as at init
            out = model.layers[0].ffn(torch.randn(4, 64, D))
        return (out[0] if isinstance(out, tuple) else out).pow(2).mean().sqrt().item()

    dense = layer_rms(ModelConfig.from_preset("tiny-moe", num_experts=0, ffn_dim=F, **kw))
    switch = dict(router="switch", top_k=1, num_experts=E, expert_ffn_dim=F, **kw)
    paper = layer_rms(ModelConfig.from_preset("tiny-moe", switch_gate="prob", **switch))
    matched = layer_rms(ModelConfig.from_preset("tiny-moe", **switch))  # the switch router's default
    assert paper / dense == pytest.approx(1 / E, rel=0.25)  # the quantity the fix corrects
    assert matched / dense == pytest.approx(1.0, rel=0.25)
    assert matched / paper == pytest.approx(E, rel=1e-4)  # exactly E: same choices, same gate, E x the weights


@pytest.mark.parametrize("overrides, match", [
    ({"router": "topk", "switch_gate": "unit"}, "switch_gate"),
    ({"router": "switch", "top_k": 1, "switch_gate": "half"}, "switch_gate"),
    ({"router": "noisy_topk", "routed_scaling_factor": 2.0}, "not used by"),
    ({"router": "expert_choice", "routed_scaling_factor": 2.0}, "not used by"),
])
def test_router_settings_are_used_or_refused(overrides, match):
    from moekit.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_preset("tiny-moe", **overrides)


def test_capacity_formula_and_priority():
    assert expert_capacity(100, 8, 2, 1.25, 4) == math.ceil(100 * 2 * 1.25 / 8)
    assert expert_capacity(4, 8, 1, 1.0, 4) == 4
    # 3 tokens, all first choices on expert 0, capacity 2: the third token's first choice drops,
    # second choices (slot-major priority) come after every first choice.
    ids = torch.tensor([[0, 1], [0, 1], [0, 1]])
    keep = capacity_keep_mask(ids, torch.ones(3, 2, dtype=torch.bool), 2, capacity=2)
    assert keep.tolist() == [[True, True], [True, True], [False, False]]


@pytest.mark.parametrize("name, cf", [("topk", 0.5), ("switch", 1.0), ("sigmoid_bias", 1.0), ("noisy_topk", 1.0)])
def test_capacity_never_exceeded(name, cf):
    router = skew(make_router(name, capacity_factor=cf, min_capacity=1))
    T = 64
    r = router.train()(torch.rand(T, 32))
    capacity = expert_capacity(T, router.num_experts, router.top_k, cf, 1)
    assert int(r.stats.tokens_per_expert.max()) <= capacity
    assert torch.equal(r.stats.tokens_per_expert, torch.bincount(r.expert_ids_A, minlength=router.num_experts))
    assert r.stats.dropped_fraction > 0  # the skew forces overflow
    assert_close(r.stats.dropped_fraction, torch.tensor(1 - r.expert_ids_A.numel() / (T * router.top_k)))


def test_eval_capacity_factor_is_used_in_eval():
    router = skew(make_router("switch", capacity_factor=0.5, eval_capacity_factor=None, min_capacity=1))
    x = torch.rand(32, 32)
    assert router.train()(x).stats.dropped_fraction > 0
    assert router.eval()(x).stats.dropped_fraction == 0


def test_padding_is_not_routed():
    router = make_router("topk", capacity_factor=1.0)
    x = torch.randn(10, 32)
    mask = torch.tensor([1] * 6 + [0] * 4)
    r = router(x, mask)
    assert r.token_ids_A.max() < 6
    ref = router(x[:6])
    assert_close(r.aux_loss, ref.aux_loss)
    assert torch.equal(r.stats.expert_load, ref.stats.expert_load)


def test_expert_choice_fills_every_expert_exactly():
    router = skew(make_router("expert_choice", capacity_factor=1.0, min_capacity=1))
    T, E = 48, router.num_experts
    r = router(torch.rand(T, 32))
    C = expert_capacity(T, E, 2, 1.0, 1)
    assert torch.equal(torch.bincount(r.expert_ids_A, minlength=E), torch.full((E,), C))
    for e in range(E):
        toks = r.token_ids_A[r.expert_ids_A == e]
        assert len(set(toks.tolist())) == C
    per_token = torch.bincount(r.token_ids_A, minlength=T)
    assert per_token.min() >= 0 and per_token.max() <= E  # 0..E experts per token
    assert_close(r.stats.dropped_fraction, (per_token == 0).float().mean())


def test_expert_choice_weights_are_router_probabilities():
    router = make_router("expert_choice", min_capacity=1)
    x = torch.randn(24, 32)
    r = router(x)
    probs = (x @ router.weight.t()).softmax(-1)
    assert_close(r.weights_A, probs[r.token_ids_A, r.expert_ids_A])
    top = probs.t().topk(r.token_ids_A.numel() // router.num_experts, dim=-1).indices
    assert torch.equal(r.token_ids_A.view(router.num_experts, -1), top)


def test_expert_choice_never_picks_padding():
    router = make_router("expert_choice", min_capacity=1)
    mask = torch.tensor([1] * 20 + [0] * 12)
    r = router(torch.randn(32, 32), mask)
    assert r.token_ids_A.max() < 20
    assert isinstance(router, ExpertChoiceRouter)


def test_sigmoid_bias_changes_selection_not_weights():
    router = make_router("sigmoid_bias", routed_scaling_factor=2.5, norm_topk_prob=True)
    x = torch.randn(20, 32)
    scores = torch.sigmoid(x @ router.weight.t())
    with torch.no_grad():
        router.bias.copy_(torch.linspace(-1, 1, router.num_experts))
    r = router(x)
    ids = (scores + router.bias).topk(2, dim=-1).indices
    assert torch.equal(r.expert_ids_A.view(20, 2), ids)
    w = scores.gather(1, ids)
    assert_close(r.weights_A.view(20, 2), 2.5 * w / w.sum(-1, keepdim=True))
    assert not router.bias.requires_grad


def test_bias_update_rule():
    bias = torch.zeros(4)
    new = balance_bias_update(bias, torch.tensor([10.0, 2.0, 2.0, 2.0]), rate=0.1)
    assert_close(new, torch.tensor([-0.1, 0.1, 0.1, 0.1]))


def test_sigmoid_bias_update_moves_load_towards_balance():
    router = skew(make_router("sigmoid_bias"), expert=3, strength=1.0)
    x = torch.rand(256, 32)
    first = router(x).stats.max_violation
    for _ in range(200):
        router.update_bias(router(x).stats.expert_load, rate=0.01)
    last = router(x).stats.max_violation
    assert first > 1.0
    assert last < 0.5 * first
    assert router.bias[3] < 0  # the overloaded expert was pushed down


def test_group_limited_selection():
    router = make_router("sigmoid_bias", n_group=4, topk_group=2)
    x = torch.randn(16, 32)
    r = router(x)
    groups = r.expert_ids_A.view(16, 2) // 2  # 8 experts in 4 groups of 2
    scores = torch.sigmoid(x @ router.weight.t()).view(16, 4, 2)
    best_groups = scores.topk(2, dim=-1).values.sum(-1).topk(2, dim=-1).indices
    for t in range(16):
        assert set(groups[t].tolist()) <= set(best_groups[t].tolist())


def test_noisy_topk_noise_only_in_training_and_losses_defined():
    router = make_router("noisy_topk")
    x = torch.randn(64, 32)
    a, b = router.eval()(x), router.eval()(x)
    assert torch.equal(a.expert_ids_A, b.expert_ids_A)
    torch.manual_seed(1)
    c = router.train()(x)
    torch.manual_seed(2)
    d = router.train()(x)
    assert not torch.equal(c.weights_A, d.weights_A)
    assert c.stats.balance_loss > 0  # importance + load
    c.aux_loss.backward()
    assert router.noise_weight.grad.abs().sum() > 0  # the load loss trains the noise


@pytest.mark.parametrize("name", ALL)
def test_gradient_reaches_router_through_gate_values(name):
    from moekit.model.moe import MoE

    k = 1 if name == "switch" else 2
    cfg = ModelConfig.from_preset("tiny-moe", router=name, top_k=k, dim=32, n_heads=4, n_kv_heads=2, expert_ffn_dim=16)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    y, aux, _ = moe(torch.randn(2, 12, 32))
    y.pow(2).sum().backward()  # no aux loss: only the gate path
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ALL)
def test_all_padding_does_not_crash(name):
    router = make_router(name)
    r = router(torch.randn(8, 32), torch.zeros(8))
    assert r.token_ids_A.numel() == 0
    assert torch.isfinite(r.aux_loss) and r.stats.dropped_fraction == 0
