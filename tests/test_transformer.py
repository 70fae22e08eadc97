import pytest
import torch
from torch.testing import assert_close

from moekit import ModelConfig, Transformer, update_router_biases

ROUTERS = ["topk", "switch", "noisy_topk", "expert_choice", "sigmoid_bias"]


def tiny(router="topk", **kw):
    kw.setdefault("top_k", 1 if router == "switch" else 2)
    return ModelConfig.from_preset("tiny-moe", router=router, vocab_size=256, dim=64, n_layers=2, **kw)


def test_output_contract():
    cfg = tiny()
    out = Transformer(cfg)(torch.randint(0, 256, (2, 12)))
    assert out.logits.shape == (2, 12, 256)
    assert out.aux_loss.dim() == 0 and out.aux_loss > 0
    assert len(out.router_stats) == cfg.num_moe_layers == 2
    s = out.router_stats[0]
    assert s.tokens_per_expert.shape == (8,) and int(s.tokens_per_expert.sum()) == 2 * 12 * 2
    for name in ("dropped_fraction", "entropy", "max_violation", "balance_loss", "z_loss"):
        assert getattr(s, name).dim() == 0


def test_aux_loss_is_weighted_sum_over_layers():
    cfg = tiny(aux_loss_coef=0.01, z_loss_coef=0.001)
    out = Transformer(cfg)(torch.randint(0, 256, (2, 12)))
    expected = sum(0.01 * s.balance_loss + 0.001 * s.z_loss for s in out.router_stats)
    assert_close(out.aux_loss.detach(), expected)


def test_dense_model_has_zero_aux_and_no_stats():
    out = Transformer(ModelConfig.from_preset("tiny-dense", vocab_size=256))(torch.randint(0, 256, (1, 5)))
    assert out.aux_loss == 0 and out.router_stats == []


@pytest.mark.parametrize("router", ["topk", "sigmoid_bias", "noisy_topk"])
def test_right_padding_does_not_change_real_tokens(router):
    model = Transformer(tiny(router)).eval()
    ids = torch.randint(0, 256, (1, 9))
    ref = model(ids)
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 4)], 1)
    out = model(padded, mask)
    assert_close(out.logits[:, :9], ref.logits, atol=1e-5, rtol=1e-5)
    assert_close(out.aux_loss, ref.aux_loss)  # padding is excluded from the router losses
    assert torch.equal(out.router_stats[0].tokens_per_expert, ref.router_stats[0].tokens_per_expert)


def test_left_padding_gives_finite_outputs_and_masks_keys():
    model = Transformer(tiny()).eval()
    ids = torch.randint(0, 256, (2, 8))
    mask = torch.ones(2, 8)
    mask[0, :3] = 0
    out = model(ids, mask)
    assert torch.isfinite(out.logits).all()
    ids2 = ids.clone()
    ids2[0, :3] = 7  # changing padding tokens must not change real tokens' outputs
    assert_close(model(ids2, mask).logits[0, 3:], out.logits[0, 3:], atol=1e-5, rtol=1e-5)


def test_bad_shapes_raise_clear_errors():
    model = Transformer(tiny())
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, seq\]"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attention_mask must be \[batch, past \+ seq\] = \[1, 5\]"):
        model(torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 4))


@pytest.mark.parametrize("router", ["topk", "sigmoid_bias"])
def test_kv_cache_decoding_equals_full_forward(router):
    model = Transformer(tiny(router, n_kv_heads=2, qk_norm="head")).eval()
    ids = torch.randint(0, 256, (2, 10))
    full = model(ids).logits
    cache = model.new_cache(batch=2, max_len=16)
    steps = [model(ids[:, :6], cache=cache).logits]
    for t in range(6, 10):
        steps.append(model(ids[:, t:t + 1], cache=cache).logits)
    assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("router", ROUTERS)
def test_model_fast_equals_reference(router):
    model = Transformer(tiny(router, capacity_factor=1.0 if router == "switch" else None)).eval()
    ids = torch.randint(0, 256, (2, 16))
    fast = model(ids)
    model.set_dispatch("reference")
    ref = model(ids)
    assert_close(fast.logits, ref.logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="dispatch mode 'slow'"):
        model.set_dispatch("slow")


@pytest.mark.parametrize("router", ROUTERS)
def test_determinism_under_seed(router):
    def run():
        torch.manual_seed(123)
        model = Transformer(tiny(router)).train()
        ids = torch.randint(0, 256, (2, 12))
        out = model(ids)
        (out.logits.mean() + out.aux_loss).backward()
        return out.logits, [p.grad for p in model.parameters() if p.grad is not None]
    a, ga = run()
    b, gb = run()
    assert torch.equal(a, b)
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))


def test_update_router_biases_from_stats():
    model = Transformer(tiny("sigmoid_bias", bias_update_rate=0.05))
    out = model(torch.randint(0, 256, (2, 16)))
    update_router_biases(model, out.router_stats)
    for moe, s in zip(model.moe_layers(), out.router_stats):
        load = s.expert_load.float()
        assert_close(moe.router.bias, 0.05 * torch.sign(load.mean() - load))
    with pytest.raises(ValueError, match="1 router stats for 2 MoE layers"):
        update_router_biases(model, out.router_stats[:1])


def test_bias_stays_float32_when_model_is_cast():
    model = Transformer(tiny("sigmoid_bias"))
    bias = torch.linspace(-0.3, 0.3, model.cfg.num_experts) + 1e-3  # not representable in bf16
    model.moe_layers()[0].router.bias.copy_(bias)
    model = model.to(torch.bfloat16)
    assert model.moe_layers()[0].router.bias.dtype == torch.float32
    assert torch.equal(model.moe_layers()[0].router.bias, bias)  # not rounded through bf16 on the way
    out = model(torch.randint(0, 256, (1, 6)))
    assert torch.isfinite(out.logits.float()).all()


def test_training_step_lowers_loss():
    torch.manual_seed(0)
    model = Transformer(tiny())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 256, (4, 32))
    losses = []
    for _ in range(20):
        out = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        (loss + out.aux_loss).backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
