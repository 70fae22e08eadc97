"""Multi-head latent attention (DeepSeek-V2/V3) inside the moekit transformer."""

import pytest
import torch
from torch.testing import assert_close

from moekit import ConfigError, ModelConfig, Transformer
from moekit.model.layers import apply_rope, rope_frequencies

MLA = dict(attention="mla", kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
           router="sigmoid_bias", n_group=4, topk_group=2, num_shared_experts=1, first_dense_layers=1,
           routed_scaling_factor=2.5)


def mla_cfg(**kw):
    return ModelConfig.from_preset("tiny-moe", vocab_size=256, dim=64, n_layers=3, **{**MLA, **kw})


@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_mla_kv_cache_decoding_equals_full_forward(q_lora_rank):
    torch.manual_seed(0)
    model = Transformer(mla_cfg(q_lora_rank=q_lora_rank, init_std=0.1)).eval()
    ids = torch.randint(0, 256, (2, 10))
    full = model(ids).logits
    cache = model.new_cache(batch=2, max_len=16)
    steps = [model(ids[:, :5], cache=cache).logits] + [model(ids[:, t:t + 1], cache=cache).logits for t in range(5, 10)]
    assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_mla_is_causal_and_trains():
    model = Transformer(mla_cfg())
    ids = torch.randint(0, 256, (1, 12))
    out = model(ids)
    ids2 = ids.clone()
    ids2[0, 8:] = 3
    assert_close(model(ids2).logits[0, :8], out.logits[0, :8], atol=1e-5, rtol=1e-5)
    loss = model(ids[:, :-1], labels=ids[:, 1:]).loss
    loss.backward()
    assert model.layers[0].attn.kv_b_proj.weight.grad.abs().sum() > 0


def test_interleaved_rope_is_a_fixed_permutation_of_rotate_half():
    """Interleaved pairs (0,1),(2,3).. rotated == rotate-half applied to the de-interleaved vector."""
    x = torch.randn(1, 2, 5, 8)
    cos, sin = rope_frequencies(8, torch.arange(5), 10000.0)
    perm = torch.cat([torch.arange(0, 8, 2), torch.arange(1, 8, 2)])
    assert_close(apply_rope(x, cos, sin, interleave=True), apply_rope(x[..., perm], cos, sin))


def test_mla_config_errors():
    with pytest.raises(ConfigError, match="attention='xla' is not one of"):
        mla_cfg(attention="xla")
    with pytest.raises(ConfigError, match="qk_norm is not used with attention='mla'"):
        mla_cfg(qk_norm="head")
    with pytest.raises(ConfigError, match="kv_lora_rank=0 must be > 0"):
        mla_cfg(kv_lora_rank=0)
