"""Sparse upcycling: at initialisation the MoE model computes exactly what the dense model did (for
routers with renormalised gates), noise moves it only slightly, it trains, and bad input is refused."""

import json
import math
import warnings

import pytest
import torch
from torch.testing import assert_close

from moekit import ConfigError, ModelConfig, Transformer
from moekit.checkpoint import CheckpointError, load, save
from moekit.convert.upcycle import UpcycleWarning, upcycle, upcycle_checkpoint
from moekit.data.tokenizer import load_tokenizer


def dense_model(seed=0, vocab_size=256, **kw):
    """A tiny dense model with every weight perturbed (norms away from one), so nothing is trivially 1 or 0."""
    cfg = ModelConfig.from_preset("tiny-dense", **{"vocab_size": vocab_size, "dim": 64, "n_layers": 2, **kw})
    model = Transformer(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def tokens(n=2, t=16, vocab=256):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("router", ["topk", "sigmoid_bias", "noisy_topk"])
def test_upcycled_equals_dense_at_init(router, top_k):
    dense = dense_model()
    moe = upcycle(dense, num_experts=4, top_k=top_k, router=router).eval()
    ids = tokens()
    out = moe(ids)
    assert_close(out.logits, dense(ids).logits, atol=1e-5, rtol=1e-5)
    assert len(out.router_stats) == 2  # it really routes
    assert out.router_stats[0].tokens_per_expert.sum() == ids.numel() * top_k
    assert (out.router_stats[0].tokens_per_expert > 0).sum() >= 2  # tokens spread over experts


def test_upcycled_equals_dense_in_training_mode_and_reference_dispatch():
    """Noisy top-k's training noise changes which experts are picked, never the (renormalised) sum."""
    dense = dense_model()
    moe = upcycle(dense, 8, 2, router="noisy_topk").train()
    moe.set_dispatch("reference")
    ids = tokens()
    assert_close(moe(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-5)


def test_config_weights_and_layout():
    dense = dense_model()
    moe = upcycle(dense, 4, 2)
    cfg = moe.cfg
    assert (cfg.num_experts, cfg.top_k, cfg.router, cfg.norm_topk_prob) == (4, 2, "topk", True)
    assert cfg.expert_ffn_dim == dense.cfg.ffn_dim
    assert cfg.capacity_factor is None and cfg.num_shared_experts == 0
    assert cfg.param_counts()[0] == sum(p.numel() for p in moe.parameters())
    mlp, experts = dense.layers[1].ffn, moe.layers[1].ffn.experts
    F = cfg.ffn_dim
    for e in range(4):  # gate rows, then up rows; down as is
        assert torch.equal(experts.gate_up_proj[e, :F], mlp.gate_proj.weight)
        assert torch.equal(experts.gate_up_proj[e, F:], mlp.up_proj.weight)
        assert torch.equal(experts.down_proj[e], mlp.down_proj.weight)
    assert torch.equal(moe.layers[0].attn.q_proj.weight, dense.layers[0].attn.q_proj.weight)
    router_std = moe.layers[0].ffn.router.weight.std().item()
    assert 0.5 * 0.1 * cfg.init_std < router_std < 2 * 0.1 * cfg.init_std  # Switch's 0.1x init scale
    # The dense model is untouched and shares no storage with the new one.
    before = dense.embed.weight.clone()
    with torch.no_grad():
        moe.embed.weight.add_(1.0)
    assert torch.equal(dense.embed.weight, before)


def test_dtype_device_and_mode_preserved():
    dense = dense_model().to(torch.bfloat16).train()
    moe = upcycle(dense, 4, 2, router="sigmoid_bias")
    assert moe.training
    assert {p.dtype for p in moe.parameters()} == {torch.bfloat16}
    assert moe.layers[0].ffn.router.bias.dtype == torch.float32  # DeepSeek-V3 bias stays float32
    assert all(p.device.type == "cpu" for p in moe.parameters())
    ids = tokens()
    moe.eval()
    dense.eval()
    # bf16 rounds the gate weights, so the identity holds to bf16 precision only.
    assert_close(moe(ids).logits.float(), dense(ids).logits.float(), atol=0.05, rtol=0.02)


def test_moe_every_and_first_dense_layers():
    dense = dense_model(n_layers=4)
    moe = upcycle(dense, 4, 2, moe_every=2, first_dense_layers=1).eval()
    assert [b.is_moe for b in moe.layers] == [False, True, False, True]
    assert torch.equal(moe.layers[2].ffn.up_proj.weight, dense.layers[2].ffn.up_proj.weight)
    ids = tokens()
    assert_close(moe(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-5)


def test_noise_makes_experts_differ_but_stay_close():
    dense = dense_model()
    ids = tokens()
    ref = dense(ids).logits
    moe = upcycle(dense, 4, 2, noise=0.01, seed=3).eval()
    experts = moe.layers[0].ffn.experts.gate_up_proj
    assert not torch.equal(experts[0], experts[1])
    gate = dense.layers[0].ffn.gate_proj.weight
    relative = ((experts[0, :dense.cfg.ffn_dim] - gate) / gate).std()
    assert 0.005 < relative < 0.02  # the relative std is the noise level
    out = moe(ids).logits
    assert not torch.allclose(out, ref, atol=1e-6)
    assert ((out - ref).norm() / ref.norm()).item() < 0.02
    again = upcycle(dense, 4, 2, noise=0.01, seed=3)
    assert torch.equal(again.layers[0].ffn.experts.gate_up_proj, experts)  # deterministic in the seed
    other = upcycle(dense, 4, 2, noise=0.01, seed=4)
    assert not torch.equal(other.layers[0].ffn.experts.gate_up_proj, experts)


@pytest.mark.parametrize("router", ["switch", "expert_choice"])
def test_unnormalised_routers_warn(router):
    dense = dense_model()
    with pytest.warns(UpcycleWarning, match="differ from the dense model's at initialisation"):
        moe = upcycle(dense, 4, 1, router=router).eval()
    assert torch.isfinite(moe(tokens()).logits).all()


def test_normalised_routers_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        upcycle(dense_model(), 4, 2, router="topk")


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_experts=1, top_k=1), "num_experts=1 must be an integer >= 2"),
    (dict(num_experts=4, top_k=0), "top_k=0 must be an integer between 1 and num_experts=4"),
    (dict(num_experts=4, top_k=5), "top_k=5 must be an integer between 1 and num_experts=4"),
    (dict(num_experts=4, top_k=2, router="top2"), "router='top2' is not one of"),
    (dict(num_experts=4, top_k=2, router="switch"), "router='switch' routes each token to one expert"),
    (dict(num_experts=4, top_k=2, noise=-0.1), "noise=-0.1 must be a number >= 0"),
    (dict(num_experts=4, top_k=2, first_dense_layers=2), "leaves no MoE layer"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        upcycle(dense_model(), **kwargs)


def test_refuses_moe_source():
    moe = upcycle(dense_model(), 4, 2)
    with pytest.raises(ConfigError, match="already a mixture of experts"):
        upcycle(moe, 8, 2)


def test_training_after_upcycling_lowers_loss():
    torch.manual_seed(0)
    moe = upcycle(dense_model(), 4, 2, noise=0.01).train()
    ids = tokens(4, 32)
    opt = torch.optim.AdamW(moe.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        out = moe(ids[:, :-1], labels=ids[:, 1:])
        loss = out.loss + out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.1
    grads = moe.layers[0].ffn.router.weight.grad
    assert grads is not None and torch.isfinite(grads).all()


# --------------------------------------------------------------------------- checkpoints
def test_upcycle_checkpoint_round_trip(tmp_path):
    tokenizer = load_tokenizer()
    dense = dense_model(vocab_size=tokenizer.get_vocab_size())
    save(dense, tokenizer, tmp_path / "dense")
    dst = upcycle_checkpoint(tmp_path / "dense", tmp_path / "moe", num_experts=4, top_k=2, seed=1)
    moe, moe_tok = load(dst)
    assert moe.cfg.num_experts == 4 and moe_tok.get_vocab_size() == tokenizer.get_vocab_size()
    ids = tokens(vocab=moe.cfg.vocab_size)
    assert_close(moe(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-5)
    card = (dst / "README.md").read_text()
    assert "Upcycled" in card and str(tmp_path / "dense") in card and "4 experts" in card
    assert json.loads((dst / "config.json").read_text())["num_experts"] == 4


def test_upcycle_checkpoint_refusals(tmp_path):
    save(dense_model(), None, tmp_path / "dense")
    upcycle_checkpoint(tmp_path / "dense", tmp_path / "moe", 4, 2)
    with pytest.raises(CheckpointError, match="already exists"):
        upcycle_checkpoint(tmp_path / "dense", tmp_path / "moe", 4, 2)
    with pytest.raises(ConfigError, match="already a mixture of experts"):
        upcycle_checkpoint(tmp_path / "moe", tmp_path / "moe2", 8, 2)
    assert not (tmp_path / "moe2").exists()


def test_train_continues_from_upcycled_checkpoint(tmp_path):
    """``moekit train --init DST``: the trainer takes the checkpoint's own config and weights."""
    from moekit.train import TrainConfig, train

    tokenizer = load_tokenizer()
    dense = dense_model(vocab_size=tokenizer.get_vocab_size(), max_seq_len=64)
    save(dense, tokenizer, tmp_path / "dense")
    dst = upcycle_checkpoint(tmp_path / "dense", tmp_path / "moe", 4, 2, router="sigmoid_bias", noise=0.01)
    upcycled, _ = load(dst)
    tcfg = TrainConfig(max_steps=6, batch_size=4, seq_len=32, warmup_steps=1, eval_every=0, save_every=6,
                       log_every=1, eval_batches=2, lr=3e-3, tokenizer=str(dst))
    result = train(tmp_path / "run", upcycled.cfg, tcfg, init=dst, progress=False)
    assert result.step == 6 and math.isfinite(result.train_loss)
    logged = [json.loads(line)["train_loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "train_loss" in line]
    assert logged[-1] < logged[0]
    trained, _ = load(tmp_path / "run")
    assert trained.cfg == upcycled.cfg


# --------------------------------------------------------------------------- a real model
def test_upcycle_smollm2_matches_dense(smollm2_gguf):
    """SmolLM2-135M (a real Llama) from GGUF, upcycled to 4 experts top-2, predicts what it did."""
    from moekit.convert.gguf import load_gguf

    dense, _ = load_gguf(smollm2_gguf, keep_quantized=False)
    dense = dense.float().eval()
    moe = upcycle(dense, num_experts=4, top_k=2).eval()
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 2102, 30, 378, 3190, 314]]) % dense.cfg.vocab_size
    with torch.no_grad():
        ref, out = dense(ids).logits, moe(ids).logits
    assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert out[0, -1].argmax() == ref[0, -1].argmax()
