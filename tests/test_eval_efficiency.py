"""moekit.eval.efficiency: the FLOP formula against an independent count, and the measurement's keys and
weight kinds on tiny models run through the engine (no timing thresholds)."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from moekit.config import ModelConfig
from moekit.data import load_tokenizer
from moekit.eval import efficiency
from moekit.model import Transformer
from moekit.quant import quantize_model

TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, expert_ffn_dim=64, max_seq_len=128)


def tiny(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("tiny-moe", **{**TINY, **overrides})).eval()


@pytest.mark.parametrize("overrides", [
    {},  # top-k router, tied embeddings, grouped-query attention
    {"num_experts": 0},  # dense
    {"tie_embeddings": False, "attention_bias": True, "qk_norm": "full", "router": "noisy_topk",
     "num_shared_experts": 1, "shared_expert_gate": True},
    {"qk_norm": "head", "router": "sigmoid_bias", "first_dense_layers": 1, "n_layers": 3},
    {"attention": "mla", "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
     "v_head_dim": 12, "router": "switch", "top_k": 1},
], ids=["topk", "dense", "untied-bias-noisy-shared", "sigmoid-dense-first", "mla"])
def test_flops_per_token_matches_an_independent_count(overrides):
    """torch's FlopCounterMode counts the matmuls one forward of T tokens really runs: the experts through
    the plain per-expert loop (the fast path's grouped_mm has no FLOP formula) and attention through the
    math kernel (the full T x T scores: T tokens at context T)."""
    model = tiny(**overrides)
    model.set_dispatch("reference")
    T = 24
    ids = torch.randint(0, model.cfg.vocab_size, (1, T))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(ids)
    assert counter.get_total_flops() == T * efficiency.flops_per_token(model.cfg, T)


def test_flops_formula_by_hand():
    """The dense tiny model, counted by hand: 2 x (projections + MLPs + head) + 2 x 2 x layers x context x width."""
    cfg = ModelConfig.from_preset("tiny-moe", **TINY, num_experts=0)
    attn = 64 * 16 * (4 + 2 * 2) + 4 * 16 * 64  # q, k, v, o
    mlp = 3 * 64 * 512
    head = 4096 * 64  # tied: the embedding table is the head
    assert efficiency.flops_per_token(cfg, 100) == 2 * (2 * (attn + mlp) + head) + 2 * 2 * 2 * 100 * (4 * 16)
    with pytest.raises(ValueError, match=r"context=-1 must be an integer >= 0"):
        efficiency.flops_per_token(cfg, -1)


def test_measure_reports_every_key_through_the_engine():
    model = tiny()
    r = efficiency.measure(model, load_tokenizer(), prompt_tokens=16, decode_tokens=4)
    assert set(r) == {"params_total", "params_active", "flops_per_token", "flops_context", "prefill_tokens_per_s",
                      "decode_tokens_per_s", "peak_rss_bytes", "peak_rss_reset", "weights", "prompt_tokens",
                      "decode_tokens", "threads"}
    assert (r["params_total"], r["params_active"]) == model.cfg.param_counts()
    assert r["params_active"] < r["params_total"]
    assert r["flops_per_token"] == efficiency.flops_per_token(model.cfg, 16) and r["flops_context"] == 16
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        assert isinstance(r[key], float) and r[key] > 0
    assert isinstance(r["peak_rss_bytes"], int) and r["peak_rss_bytes"] > 0
    assert r["weights"] == "float32"
    assert (r["prompt_tokens"], r["decode_tokens"]) == (16, 4)


def test_measure_fits_the_shape_to_a_short_context():
    """128 + 32 tokens do not fit a 128-token context: both shrink, the prompt keeps its share."""
    r = efficiency.measure(tiny(), None, prompt_tokens=128, decode_tokens=32)
    assert r["prompt_tokens"] + r["decode_tokens"] + 1 <= 128
    assert (r["prompt_tokens"], r["decode_tokens"]) == (102, 25)


def test_measure_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"prompt_tokens=0 must be an integer >= 1"):
        efficiency.measure(tiny(), None, prompt_tokens=0)


def test_quantized_and_bfloat16_weights_say_so():
    tok = load_tokenizer()
    r = efficiency.measure(quantize_model(tiny(), 8), tok, prompt_tokens=16, decode_tokens=4)
    assert r["weights"] == "int8"
    assert r["decode_tokens_per_s"] > 0
    # Quantizing changes how weights are stored, not how many there are or what a token multiplies.
    assert (r["params_total"], r["params_active"]) == tiny().cfg.param_counts()
    assert efficiency.weights_kind(quantize_model(tiny(), 4, 32)) == "int4"
    assert efficiency.weights_kind(tiny().to(torch.bfloat16)) == "bfloat16"


def test_offloaded_experts_say_so(tmp_path):
    from serve_util import tiny_ckpt

    from moekit.infer.offload import load_offloaded

    tiny_ckpt(tmp_path / "ckpt")
    model, tok, _ = load_offloaded(tmp_path / "ckpt", max_resident_experts=2)
    r = efficiency.measure(model, tok, prompt_tokens=16, decode_tokens=4)
    assert r["weights"] == "float32+offloaded"
    model, tok, _ = load_offloaded(tmp_path / "ckpt", max_resident_experts=2, bits=8)
    assert efficiency.weights_kind(model) == "int8+offloaded"


def test_peak_rss_sees_memory_touched_after_a_reset():
    if not efficiency.reset_peak_rss():
        pytest.skip("this system cannot reset the resident-memory high-water mark (Linux /proc/self/clear_refs)")
    before = efficiency.peak_rss()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, every page written
    assert efficiency.peak_rss() >= before + 60 * 2**20
    del block
