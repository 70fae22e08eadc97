"""DeepSeek-V3 Hugging Face checkpoints (transformers models/deepseek_v3/modeling_deepseek_v3.py).

What maps onto moekit: multi-head latent attention (``attention="mla"``, optional low-rank query,
interleaved RoPE), sigmoid routing with a selection-only bias and group-limited top-k
(``router="sigmoid_bias"``, ``n_group``/``topk_group``), ``routed_scaling_factor``, shared experts
(``n_shared_experts`` x ``moe_intermediate_size``) and dense first layers (``first_k_dense_replace``).
Import only: exporting a moekit model as deepseek_v3 is not implemented.
"""

from __future__ import annotations

from typing import Any

from moekit.config import ConfigError, ModelConfig
from moekit.convert.hf_archs import LLAMA_KEYS, ArchSpec, build_config, llama_body, register_architecture, value

#: transformers DeepseekV3Config defaults (configuration_deepseek_v3.py), used when config.json omits a key.
DEEPSEEK_V3_DEFAULTS: dict[str, Any] = dict(
    vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
    num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256,
    routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128,
    qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3,
    norm_topk_prob=True, hidden_act="silu", max_position_embeddings=4096, initializer_range=0.02, rms_norm_eps=1e-6,
    tie_word_embeddings=False, rope_interleave=True, attention_bias=False,
)

#: MLA projections and the DeepSeek MoE names that differ from the Llama/Qwen ones, ahead of LLAMA_KEYS.
DEEPSEEK_V3_KEYS: tuple[tuple[str, str], ...] = tuple(
    (f"model.layers.{{i}}.self_attn.{name}.weight", f"layers.{{i}}.attn.{name}.weight")
    for name in ("q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj")
) + (
    ("model.layers.{i}.mlp.shared_experts.{mlp}.weight", "layers.{i}.ffn.shared_expert.{mlp}.weight"),
    ("model.layers.{i}.mlp.gate.e_score_correction_bias", "layers.{i}.ffn.router.bias"),
    *LLAMA_KEYS,
)


def deepseek_v3_to_config(hf: dict[str, Any]) -> ModelConfig:
    d = DEEPSEEK_V3_DEFAULTS
    body = llama_body(hf, d)
    if value(hf, "attention_bias", d):
        raise ConfigError("attention_bias=true is not supported for deepseek_v3 (moekit's MLA has no biases)")
    if float(value(hf, "rms_norm_eps", d)) != 1e-6:
        # DeepseekV3Attention builds q_a_layernorm / kv_a_layernorm with the default eps 1e-6 whatever
        # rms_norm_eps says; moekit uses one eps for every norm.
        raise ConfigError(f"rms_norm_eps={hf['rms_norm_eps']}: moekit's MLA norms need 1e-6 (DeepSeek's latent norms "
                          "always use 1e-6)")
    if hf.get("moe_layer_freq", 1) != 1:
        raise ConfigError(f"moe_layer_freq={hf['moe_layer_freq']} is not supported (every layer after "
                          "first_k_dense_replace must be MoE)")
    for key, want in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
        if key in hf and hf[key] != want:
            raise ConfigError(f"{key}={hf[key]!r} is not supported; deepseek_v3 routing is {key}={want!r}")
    shared = value(hf, "n_shared_experts", d) or 0
    body.pop("head_dim", None)  # MLA: RoPE runs over qk_rope_head_dim
    return build_config("deepseek_v3", dict(
        body, attention="mla", q_lora_rank=value(hf, "q_lora_rank", d), kv_lora_rank=value(hf, "kv_lora_rank", d),
        qk_nope_head_dim=value(hf, "qk_nope_head_dim", d), qk_rope_head_dim=value(hf, "qk_rope_head_dim", d),
        v_head_dim=value(hf, "v_head_dim", d), rope_interleave=bool(value(hf, "rope_interleave", d)),
        n_kv_heads=body["n_heads"],
        num_experts=value(hf, "n_routed_experts", d), top_k=value(hf, "num_experts_per_tok", d),
        router="sigmoid_bias", expert_ffn_dim=value(hf, "moe_intermediate_size", d),
        norm_topk_prob=bool(value(hf, "norm_topk_prob", d)),
        routed_scaling_factor=float(value(hf, "routed_scaling_factor", d)),
        n_group=value(hf, "n_group", d), topk_group=value(hf, "topk_group", d),
        num_shared_experts=shared, shared_expert_ffn_dim=shared * value(hf, "moe_intermediate_size", d),
        first_dense_layers=value(hf, "first_k_dense_replace", d), aux_loss_coef=0.0, z_loss_coef=0.0,
    ))


register_architecture("deepseek_v3", ArchSpec(to_config=deepseek_v3_to_config, keys=DEEPSEEK_V3_KEYS))
