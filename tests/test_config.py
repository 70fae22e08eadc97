import dataclasses
import json

import pytest
import torch

from moekit import PRESETS, ConfigError, ModelConfig, Transformer


def test_presets_exist_and_validate():
    for name in ("tiny-dense", "tiny-moe", "small-moe", "mixtral-8x7b", "qwen2-moe", "olmoe-1b-7b", "deepseek-v3"):
        cfg = ModelConfig.from_preset(name)
        assert cfg.param_counts()[0] >= cfg.param_counts()[1] > 0
    assert set(PRESETS) >= {"tiny-dense", "tiny-moe", "small-moe"}


def test_tiny_twins_have_equal_active_ffn_width():
    dense, moe = ModelConfig.from_preset("tiny-dense"), ModelConfig.from_preset("tiny-moe")
    assert dense.ffn_dim == moe.top_k * moe.expert_ffn_dim
    d_total, d_active = dense.param_counts()
    m_total, m_active = moe.param_counts()
    assert m_total > 2 * d_total
    # active differs only by the router weights
    assert m_active - d_active == moe.n_layers * moe.dim * moe.num_experts


def test_architecture_presets_match_published_sizes():
    # Mixtral-8x7B: 46.7B total, 12.9B active (Mistral AI's announcement).
    total, active = ModelConfig.from_preset("mixtral-8x7b").param_counts()
    assert abs(total / 1e9 - 46.7) < 0.1 and abs(active / 1e9 - 12.9) < 0.1
    # OLMoE-1B-7B: 6.9B total, 1.3B active (Muennighoff et al. 2024).
    total, active = ModelConfig.from_preset("olmoe-1b-7b").param_counts()
    assert abs(total / 1e9 - 6.9) < 0.1 and abs(active / 1e9 - 1.3) < 0.1
    # DeepSeek-V3: 671B total, 37B active (DeepSeek-V3 technical report, without the MTP module).
    total, active = ModelConfig.from_preset("deepseek-v3").param_counts()
    assert abs(total / 1e9 - 671) < 1 and abs(active / 1e9 - 37) < 1
    # Qwen1.5-MoE-A2.7B: 14.3B total, 2.7B active (Qwen blog).
    total, active = ModelConfig.from_preset("qwen2-moe").param_counts()
    assert abs(total / 1e9 - 14.3) < 0.1 and abs(active / 1e9 - 2.7) < 0.1


@pytest.mark.parametrize("overrides", [
    {},
    dict(num_experts=0),
    dict(tie_embeddings=False, attention_bias=True, qk_norm="head"),
    dict(qk_norm="full", n_kv_heads=4),
    dict(num_shared_experts=2, shared_expert_gate=True),
    dict(router="noisy_topk", first_dense_layers=1, moe_every=2),
    dict(router="sigmoid_bias", n_group=4, topk_group=2),
    dict(attention="mla", kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16),
    dict(attention="mla", q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24,
         num_shared_experts=1, first_dense_layers=1),
])
def test_param_counts_match_built_model(overrides):
    cfg = ModelConfig.from_preset("tiny-moe", **overrides)
    model = Transformer(cfg)
    total, _ = cfg.param_counts()
    assert total == sum(p.numel() for p in model.parameters())


def test_json_round_trip(tmp_path):
    cfg = ModelConfig.from_preset("tiny-moe", router="switch", top_k=1, capacity_factor=1.25)
    path = tmp_path / "config.json"
    cfg.to_json(path)
    assert ModelConfig.from_json(path) == cfg
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    assert dataclasses.replace(cfg, dim=64).dim == 64


def test_unknown_key_names_it_and_the_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'num_expert'.*did you mean 'num_experts'.*valid keys:"):
        ModelConfig.from_dict({"num_expert": 8})


@pytest.mark.parametrize("overrides, message", [
    (dict(router="top2"), r"router='top2' is not one of \['topk', 'switch', 'noisy_topk', 'expert_choice', 'sigmoid_bias'\]"),
    (dict(top_k=9), r"top_k=9 must be between 1 and num_experts=8"),
    (dict(router="switch", top_k=2), r"router=.switch. routes each token to one expert; got top_k=2: set top_k=1 \(flag --top-k"),
    (dict(n_heads=3), r"dim=128 is not divisible by n_heads=3"),
    (dict(n_kv_heads=3), r"n_heads=4 must be a multiple of n_kv_heads=3"),
    (dict(capacity_factor=0.0), r"capacity_factor=0.0 must be > 0, or None for dropless"),
    (dict(qk_norm="layer"), r"qk_norm='layer' is not one of"),
    (dict(dim="128"), r"dim='128': expected int"),
    (dict(num_experts=-1), r"num_experts=-1 must be >= 0"),
    (dict(n_group=2), r"n_group=2 \(group-limited routing\) needs router='sigmoid_bias'"),
    (dict(router_jitter=1.5), r"router_jitter=1.5 must be in \[0, 1\)"),
])
def test_bad_values_raise_clear_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_preset("tiny-moe", **overrides)


def test_unknown_preset_lists_available():
    with pytest.raises(ConfigError, match=r"unknown preset 'tiny-moee' \(did you mean 'tiny-moe'\?\); available: tiny-dense"):
        ModelConfig.from_preset("tiny-moee")


def test_bad_json_names_the_file(tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="c.json is not valid JSON"):
        ModelConfig.from_json(bad)
    with pytest.raises(ConfigError, match="cannot read config file"):
        ModelConfig.from_json(tmp_path / "missing.json")
    bad.write_text(json.dumps({"dim": 64, "flux": 1}))
    with pytest.raises(ConfigError, match="unknown config key 'flux'"):
        ModelConfig.from_json(bad)


def test_moe_layer_placement():
    cfg = ModelConfig.from_preset("tiny-moe", n_layers=6, first_dense_layers=1, moe_every=2)
    assert [cfg.is_moe_layer(i) for i in range(6)] == [False, True, False, True, False, True]
    model = Transformer(cfg)
    assert [b.is_moe for b in model.layers] == [False, True, False, True, False, True]
    assert torch.isfinite(model(torch.randint(0, cfg.vocab_size, (1, 8))).logits).all()
