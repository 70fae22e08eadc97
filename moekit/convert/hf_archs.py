"""Hugging Face architectures moekit reads and writes: one :class:`ArchSpec` per ``model_type``.

A spec says two things about an architecture:

1. **config**: ``to_config`` turns the ``config.json`` dict into a :class:`ModelConfig` and raises a
   :class:`ConfigError` naming the field for anything moekit's model cannot compute exactly;
   ``from_config`` (export only) does the reverse and refuses what the architecture cannot hold.
2. **weights**: ``keys`` pairs Hugging Face tensor names with moekit names as templates. ``{i}`` is a
   layer number, ``{j}`` an expert number and the other ``{fields}`` are the alternatives listed in
   :data:`KEY_FIELDS`. The same table renames in both directions. Experts stored one module per expert
   (the on-disk format of every public checkpoint) are named by ``expert_keys`` (gate, up, down) and
   stacked into moekit's ``gate_up_proj [E, 2F, D]`` / ``down_proj [E, D, F]``; the fused 3-D layout
   of transformers 5 is an ordinary entry of ``keys``, since moekit stores experts the same way.

Adding an architecture is ``register_architecture("name", ArchSpec(to_config=..., ...))``; a new
``to_config`` reuses :func:`llama_body` for the fields every Llama-style model shares.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from moekit.config import ConfigError, ModelConfig

# --------------------------------------------------------------------------- tensor names
#: What each ``{field}`` of a key template may stand for.
KEY_FIELDS: dict[str, str] = {
    "i": r"\d+",  # layer
    "j": r"\d+",  # expert
    "proj": r"q_proj|k_proj|v_proj|o_proj",
    "qk_norm": r"q_norm|k_norm",
    "mlp": r"gate_proj|up_proj|down_proj",
    "param": r"weight|bias",
    "fused": r"gate_up_proj|down_proj",
}

#: (Hugging Face name, moekit name) for the Llama family: transformers models/llama/modeling_llama.py,
#: MoE blocks as in models/qwen2_moe/modeling_qwen2_moe.py (``mlp.gate``, ``mlp.experts``,
#: ``mlp.shared_expert``, ``mlp.shared_expert_gate``). More specific templates come first.
LLAMA_KEYS: tuple[tuple[str, str], ...] = (
    ("model.embed_tokens.weight", "embed.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.ffn_norm.weight"),
    ("model.layers.{i}.self_attn.{proj}.{param}", "layers.{i}.attn.{proj}.{param}"),
    ("model.layers.{i}.self_attn.{qk_norm}.weight", "layers.{i}.attn.{qk_norm}.weight"),
    ("model.layers.{i}.mlp.gate.weight", "layers.{i}.ffn.router.weight"),
    ("model.layers.{i}.mlp.experts.{fused}", "layers.{i}.ffn.experts.{fused}"),  # transformers >= 5
    ("model.layers.{i}.mlp.shared_expert.{mlp}.weight", "layers.{i}.ffn.shared_expert.{mlp}.weight"),
    ("model.layers.{i}.mlp.shared_expert_gate.weight", "layers.{i}.ffn.shared_expert_gate.weight"),
    ("model.layers.{i}.mlp.{mlp}.weight", "layers.{i}.ffn.{mlp}.weight"),  # dense layers
)

#: One module per expert, (gate, up, down): Qwen-MoE and OLMoE checkpoints.
EXPERT_KEYS = (
    "model.layers.{i}.mlp.experts.{j}.gate_proj.weight",
    "model.layers.{i}.mlp.experts.{j}.up_proj.weight",
    "model.layers.{i}.mlp.experts.{j}.down_proj.weight",
)
#: Mixtral names its expert projections w1 (gate), w3 (up), w2 (down).
MIXTRAL_EXPERT_KEYS = (
    "model.layers.{i}.mlp.experts.{j}.w1.weight",
    "model.layers.{i}.mlp.experts.{j}.w3.weight",
    "model.layers.{i}.mlp.experts.{j}.w2.weight",
)
#: Non-weights some older checkpoints carry (rotary inverse frequencies, recomputed by every model).
ROTARY_BUFFERS = ("model.layers.{i}.self_attn.rotary_emb.inv_freq",)


def template_regex(template: str) -> re.Pattern[str]:
    """Compile a key template: ``{field}`` becomes a named group of :data:`KEY_FIELDS` alternatives."""
    parts = re.split(r"\{(\w+)\}", template)
    pattern = "".join(re.escape(p) if k % 2 == 0 else f"(?P<{p}>{KEY_FIELDS[p]})" for k, p in enumerate(parts))
    return re.compile(pattern)


def _no_extra_ignores(hf: dict[str, Any]) -> tuple[str, ...]:
    return ROTARY_BUFFERS


@dataclass(frozen=True)
class ArchSpec:
    """How one Hugging Face ``model_type`` maps onto moekit (see the module docstring)."""

    to_config: Callable[[dict[str, Any]], ModelConfig]  # config.json dict -> ModelConfig; ConfigError if inexact
    from_config: Callable[[ModelConfig], dict[str, Any]] | None = None  # ModelConfig -> config.json; None: import only
    keys: tuple[tuple[str, str], ...] = LLAMA_KEYS  # (HF template, moekit template), first match wins
    expert_keys: tuple[str, str, str] = EXPERT_KEYS  # per-expert HF templates: gate, up, down
    aliases: tuple[tuple[str, str], ...] = ()  # (name on disk, name in ``keys``) substring renames
    ignore: Callable[[dict[str, Any]], tuple[str, ...]] = _no_extra_ignores  # HF templates to skip, per config
    # Export only: adjust the moekit state (named as in moekit) before renaming, for architectures whose
    # modules differ from moekit's in a way that has an exact equivalent (see qwen2_moe).
    adapt_state: Callable[[ModelConfig, dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    compiled: tuple[tuple[re.Pattern[str], str, re.Pattern[str], str], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        compiled = tuple((template_regex(h), h, template_regex(m), m) for h, m in self.keys)
        object.__setattr__(self, "compiled", compiled)


# --------------------------------------------------------------------------- config.json helpers
def value(hf: dict[str, Any], key: str, defaults: dict[str, Any]) -> Any:
    """``hf[key]``, else the transformers class default in ``defaults`` (as ``from_pretrained`` would)."""
    if key in hf:
        return hf[key]
    if key in defaults:
        return defaults[key]
    raise ConfigError(f"config.json has no {key!r}")


def rope_theta(hf: dict[str, Any], default: float) -> float:
    """The RoPE base; only plain RoPE is supported (moekit has no scaled RoPE variants).

    transformers 5 keeps RoPE settings in ``rope_parameters``; older files use ``rope_theta`` plus
    ``rope_scaling`` (models/.../modeling_rope_utils.py, ``convert_rope_params_to_dict``).
    """
    name = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise ConfigError(f"{name}={params!r}: per-layer RoPE settings are not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"{name} with rope_type={rope_type!r} is not supported: moekit implements "
                          "plain RoPE only (rope_type 'default', i.e. rope_scaling null)")
    factor = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if factor != 1.0:
        raise ConfigError(f"partial_rotary_factor={factor} is not supported: moekit rotates the whole head")
    return float(params.get("rope_theta", hf.get("rope_theta", default)))


def check_sliding_window(hf: dict[str, Any], defaults: dict[str, Any], switch: str | None = None) -> None:
    """Refuse a sliding attention window shorter than the context: moekit attends to all past tokens.

    ``switch`` names the flag that turns the window on (Qwen: ``use_sliding_window``); without one
    (Mistral, Mixtral) a non-null ``sliding_window`` is active.
    """
    if switch is not None and not hf.get(switch, defaults.get(switch, False)):
        return
    window = hf.get("sliding_window", defaults.get("sliding_window"))
    max_pos = value(hf, "max_position_embeddings", defaults)
    if window is not None and window < max_pos:
        flag = f"{switch}=true with " if switch else ""
        raise ConfigError(f"{flag}sliding_window={window} < max_position_embeddings={max_pos} is not supported: "
                          "moekit attention has no sliding window")


def llama_body(hf: dict[str, Any], defaults: dict[str, Any], theta: float = 10000.0) -> dict[str, Any]:
    """ModelConfig fields every Llama-style config shares (transformers models/llama/configuration_llama.py)."""
    if hf.get("quantization_config"):
        raise ConfigError("quantization_config is set: quantized Hugging Face checkpoints are not supported")
    act = value(hf, "hidden_act", defaults)
    if act != "silu":
        raise ConfigError(f"hidden_act={act!r} is not supported: moekit MLPs are SwiGLU (hidden_act 'silu')")
    if hf.get("mlp_bias"):
        raise ConfigError("mlp_bias=true is not supported: moekit MLPs have no biases")
    n_heads = value(hf, "num_attention_heads", defaults)
    return dict(
        vocab_size=value(hf, "vocab_size", defaults),
        dim=value(hf, "hidden_size", defaults),
        n_layers=value(hf, "num_hidden_layers", defaults),
        n_heads=n_heads,
        n_kv_heads=value(hf, "num_key_value_heads", defaults) or n_heads,
        head_dim=hf.get("head_dim") or None,
        ffn_dim=value(hf, "intermediate_size", defaults),
        max_seq_len=value(hf, "max_position_embeddings", defaults),
        rope_theta=rope_theta(hf, theta),
        norm_eps=float(value(hf, "rms_norm_eps", defaults)),
        tie_embeddings=bool(value(hf, "tie_word_embeddings", defaults)),
        init_std=float(value(hf, "initializer_range", defaults)),
    )


def build_config(model_type: str, fields: dict[str, Any]) -> ModelConfig:
    """``ModelConfig(**fields)``, with an error that says which checkpoint type it came from.
    ``aux_loss_coef`` in ``fields`` is transformers' ``router_aux_loss_coef``; it is translated."""
    try:
        cfg = ModelConfig(**fields)
    except ConfigError as e:
        raise ConfigError(f"{model_type} config.json does not translate to a valid moekit config: {e}") from None
    if cfg.num_experts:
        cfg = dataclasses.replace(cfg, aux_loss_coef=aux_coef_from_hf(cfg.aux_loss_coef, cfg))
    return cfg


def aux_coef_from_hf(hf_coef: float, cfg: ModelConfig) -> float:
    """transformers' ``router_aux_loss_coef`` as moekit's ``aux_loss_coef`` (same gradient).

    transformers (``load_balancing_loss_func``) pools the router outputs of all L MoE layers and returns
    ``E * sum_k sum_e f[k, e] * P[e]``: K at uniform routing. moekit sums ``E * sum_e f[e] * P[e]`` (1 at
    uniform, f over the T*K assignments) over the layers: L. For the same coefficient moekit's loss is
    L/K times larger (16x for Mixtral-8x7B), so moekit's coefficient is ``hf * K / L``.
    """
    return hf_coef * cfg.top_k / max(cfg.num_moe_layers, 1)


def aux_coef_to_hf(cfg: ModelConfig) -> float:
    """The inverse of :func:`aux_coef_from_hf`."""
    return cfg.aux_loss_coef * cfg.num_moe_layers / cfg.top_k


def moe_layer_pattern(hf: dict[str, Any], defaults: dict[str, Any], n_layers: int) -> dict[str, int]:
    """``first_dense_layers`` / ``moe_every`` reproducing Qwen-MoE's choice of MoE layers.

    transformers models/qwen2_moe/modeling_qwen2_moe.py (``Qwen2MoeDecoderLayer``): layer i is MoE iff
    ``i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0``.
    """
    step = value(hf, "decoder_sparse_step", defaults)
    dense_only = sorted(value(hf, "mlp_only_layers", defaults) or [])
    if not isinstance(step, int) or step < 1:
        raise ConfigError(f"decoder_sparse_step={step!r} must be an integer >= 1")
    moe = [i for i in range(n_layers) if i not in dense_only and (i + 1) % step == 0]
    if not moe:
        raise ConfigError(f"decoder_sparse_step={step}, mlp_only_layers={dense_only} leave no MoE layer")
    first = moe[0]
    every = moe[1] - moe[0] if len(moe) > 1 else n_layers
    if [i >= first and (i - first) % every == 0 for i in range(n_layers)] != [i in moe for i in range(n_layers)]:
        raise ConfigError(f"decoder_sparse_step={step}, mlp_only_layers={dense_only} put MoE blocks in layers {moe}, "
                          "which moekit cannot express (it has first_dense_layers + moe_every)")
    return dict(first_dense_layers=first, moe_every=every)


# --------------------------------------------------------------------------- export helpers
def need(ok: bool, message: str) -> None:
    """Raise a ConfigError with ``message`` unless ``ok`` (export refusals)."""
    if not ok:
        raise ConfigError(message)


EXPORT_ROUTERS = ("topk", "switch")


def check_export_routing(cfg: ModelConfig, model_type: str) -> None:
    """Routers whose inference an HF top-k softmax router reproduces exactly, without capacity drops."""
    need(cfg.num_experts > 0, f"{model_type} is a mixture of experts; this model is dense (num_experts=0)")
    need(cfg.router in EXPORT_ROUTERS,
         f"router={cfg.router!r} has no Hugging Face equivalent; export supports router in {list(EXPORT_ROUTERS)} "
         "(switch: top-1 without renormalisation)")
    need(cfg.eval_capacity_factor is None,
         f"eval_capacity_factor={cfg.eval_capacity_factor} drops tokens at inference; Hugging Face MoE layers are "
         "dropless: set it to None to export")
    need(cfg.routed_scaling_factor == 1.0,
         f"routed_scaling_factor={cfg.routed_scaling_factor} has no equivalent in {model_type}'s router (it would "
         "change the outputs)")


def renormalises(cfg: ModelConfig) -> bool:
    """Whether the k gate weights are renormalised to sum to 1 (a Switch router with the paper's gate
    never does; with ``switch_gate="unit"`` its one weight is exactly 1, as a renormalised top-1)."""
    return (cfg.router == "topk" and cfg.norm_topk_prob) or (cfg.router == "switch" and cfg.switch_gate == "unit")


def dense_layers(cfg: ModelConfig) -> list[int]:
    return [i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)]


def llama_body_to_hf(cfg: ModelConfig, model_type: str, class_name: str) -> dict[str, Any]:
    """config.json fields every Llama-style architecture shares (both rope spellings: transformers 5
    reads ``rope_parameters``, 4.x reads ``rope_theta``)."""
    need(cfg.attention == "gqa", f"attention={cfg.attention!r}: {model_type} has multi-head / grouped-query "
         "attention only (multi-head latent attention is DeepSeek's)")
    return {
        "architectures": [class_name],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta,
        "attention_dropout": 0.0,
        "use_cache": True,
    }


# --------------------------------------------------------------------------- dense: llama, mistral, qwen2
# Class defaults, as from_pretrained fills in absent keys: transformers models/<name>/configuration_<name>.py.
LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=None, hidden_act="silu",
                      max_position_embeddings=2048, initializer_range=0.02, rms_norm_eps=1e-6,
                      tie_word_embeddings=False, attention_bias=False)
MISTRAL_DEFAULTS = dict(LLAMA_DEFAULTS, intermediate_size=14336, num_key_value_heads=8,
                        max_position_embeddings=4096 * 32, sliding_window=4096)
QWEN2_DEFAULTS = dict(LLAMA_DEFAULTS, vocab_size=151936, intermediate_size=22016, num_key_value_heads=32,
                      max_position_embeddings=32768, use_sliding_window=False, sliding_window=4096)


def llama_to_config(hf: dict[str, Any]) -> ModelConfig:
    # models/llama/modeling_llama.py: attention_bias puts a bias on o_proj too, which moekit lacks.
    if value(hf, "attention_bias", LLAMA_DEFAULTS):
        raise ConfigError("attention_bias=true is not supported for llama: it biases o_proj, which moekit's "
                          "attention does not have")
    check_sliding_window(hf, LLAMA_DEFAULTS)
    return build_config("llama", llama_body(hf, LLAMA_DEFAULTS))


def mistral_to_config(hf: dict[str, Any]) -> ModelConfig:
    check_sliding_window(hf, MISTRAL_DEFAULTS)  # models/mistral/modeling_mistral.py: window on every layer
    return build_config("mistral", llama_body(hf, MISTRAL_DEFAULTS))


def qwen2_to_config(hf: dict[str, Any]) -> ModelConfig:
    # models/qwen2/modeling_qwen2.py: q/k/v always have biases, o_proj never.
    check_sliding_window(hf, QWEN2_DEFAULTS, switch="use_sliding_window")
    return build_config("qwen2", dict(llama_body(hf, QWEN2_DEFAULTS), attention_bias=True))


def llama_from_config(cfg: ModelConfig) -> dict[str, Any]:
    need(cfg.num_experts == 0, "llama is dense; this model has experts (export it as mixtral or qwen2_moe)")
    need(cfg.qk_norm is None, f"qk_norm={cfg.qk_norm!r}: llama has no QK-norm")
    need(not cfg.attention_bias, "attention_bias=True: llama's attention_bias also biases o_proj; export as qwen2")
    return {**llama_body_to_hf(cfg, "llama", "LlamaForCausalLM"), "attention_bias": False, "mlp_bias": False}


def qwen2_from_config(cfg: ModelConfig) -> dict[str, Any]:
    need(cfg.num_experts == 0, "qwen2 is dense; this model has experts (export it as qwen2_moe)")
    need(cfg.qk_norm is None, f"qk_norm={cfg.qk_norm!r}: qwen2 has no QK-norm")
    need(cfg.attention_bias, "qwen2 always has q/k/v biases; export a model without attention_bias as llama")
    return {**llama_body_to_hf(cfg, "qwen2", "Qwen2ForCausalLM"), "use_sliding_window": False}


# --------------------------------------------------------------------------- mixtral
MIXTRAL_DEFAULTS = dict(MISTRAL_DEFAULTS, num_experts_per_tok=2, num_local_experts=8, sliding_window=None,
                        rms_norm_eps=1e-5, router_aux_loss_coef=0.001, router_jitter_noise=0.0)


def mixtral_to_config(hf: dict[str, Any]) -> ModelConfig:
    """models/mixtral/modeling_mixtral.py: every layer is MoE, softmax top-k always renormalised,
    experts as wide as ``intermediate_size``."""
    d = MIXTRAL_DEFAULTS
    check_sliding_window(hf, d)
    body = llama_body(hf, d, theta=1e6)  # MixtralConfig.default_theta
    return build_config("mixtral", dict(
        body, num_experts=value(hf, "num_local_experts", d), top_k=value(hf, "num_experts_per_tok", d),
        router="topk", expert_ffn_dim=body["ffn_dim"], norm_topk_prob=True,
        aux_loss_coef=float(value(hf, "router_aux_loss_coef", d)), z_loss_coef=0.0,
        # NOTE: Mixtral jitters the input of the whole MoE block while training, moekit only the router's;
        # inference is unaffected.
        router_jitter=float(value(hf, "router_jitter_noise", d)),
    ))


def mixtral_from_config(cfg: ModelConfig) -> dict[str, Any]:
    check_export_routing(cfg, "mixtral")
    need(renormalises(cfg), "mixtral always renormalises the top-k gate weights; a model with "
         "norm_topk_prob=False (or a switch router) exports as qwen2_moe")
    need(cfg.num_shared_experts == 0, "mixtral has no shared experts; export as qwen2_moe")
    need(cfg.num_moe_layers == cfg.n_layers, f"first_dense_layers={cfg.first_dense_layers}, "
         f"moe_every={cfg.moe_every}: every mixtral layer is MoE; export as qwen2_moe")
    need(cfg.qk_norm is None, f"qk_norm={cfg.qk_norm!r}: mixtral has no QK-norm")
    need(not cfg.attention_bias, "attention_bias=True: mixtral has no attention biases; export as qwen2_moe")
    return {**llama_body_to_hf(cfg, "mixtral", "MixtralForCausalLM"), "intermediate_size": cfg.expert_ffn_dim,
            "num_local_experts": cfg.num_experts, "num_experts_per_tok": cfg.top_k, "sliding_window": None,
            "router_aux_loss_coef": aux_coef_to_hf(cfg), "router_jitter_noise": cfg.router_jitter}


# --------------------------------------------------------------------------- qwen2_moe, qwen3_moe
QWEN2_MOE_DEFAULTS = dict(QWEN2_DEFAULTS, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                          num_attention_heads=16, num_key_value_heads=16, decoder_sparse_step=1,
                          moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_experts_per_tok=4,
                          num_experts=60, norm_topk_prob=False, router_aux_loss_coef=0.001, mlp_only_layers=[],
                          qkv_bias=True)
QWEN3_MOE_DEFAULTS = dict(QWEN2_MOE_DEFAULTS, intermediate_size=6144, num_attention_heads=32,
                          num_key_value_heads=4, moe_intermediate_size=768, num_experts_per_tok=8, num_experts=128,
                          attention_bias=False)


def qwen_moe_fields(hf: dict[str, Any], d: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    """Routing fields shared by Qwen2-MoE and Qwen3-MoE (softmax top-k, optional renormalisation)."""
    # Qwen3MoeConfig.attribute_map saves num_experts as "num_local_experts" (transformers 5); hub files say num_experts.
    experts = hf["num_local_experts"] if "num_local_experts" in hf else value(hf, "num_experts", d)
    return dict(
        num_experts=experts, top_k=value(hf, "num_experts_per_tok", d), router="topk",
        expert_ffn_dim=value(hf, "moe_intermediate_size", d), norm_topk_prob=bool(value(hf, "norm_topk_prob", d)),
        aux_loss_coef=float(value(hf, "router_aux_loss_coef", d)), z_loss_coef=0.0,
        **moe_layer_pattern(hf, d, body["n_layers"]),
    )


def qwen2_moe_to_config(hf: dict[str, Any]) -> ModelConfig:
    """models/qwen2_moe/modeling_qwen2_moe.py: a shared expert behind a sigmoid gate in every MoE block,
    q/k/v biases (``qkv_bias``); a zero-width shared expert (what :func:`qwen2_moe_from_config` writes for
    a model without one) contributes exactly nothing and is left out."""
    d = QWEN2_MOE_DEFAULTS
    check_sliding_window(hf, d, switch="use_sliding_window")
    body = llama_body(hf, d)
    shared = value(hf, "shared_expert_intermediate_size", d)
    return build_config("qwen2_moe", dict(
        body, attention_bias=bool(value(hf, "qkv_bias", d)), **qwen_moe_fields(hf, d, body),
        num_shared_experts=1 if shared else 0, shared_expert_ffn_dim=shared, shared_expert_gate=bool(shared),
    ))


def qwen2_moe_ignore(hf: dict[str, Any]) -> tuple[str, ...]:
    if value(hf, "shared_expert_intermediate_size", QWEN2_MOE_DEFAULTS):
        return ROTARY_BUFFERS
    return (*ROTARY_BUFFERS, "model.layers.{i}.mlp.shared_expert.{mlp}.weight",
            "model.layers.{i}.mlp.shared_expert_gate.weight")


def qwen2_moe_from_config(cfg: ModelConfig) -> dict[str, Any]:
    check_export_routing(cfg, "qwen2_moe")
    need(cfg.qk_norm is None, f"qk_norm={cfg.qk_norm!r}: qwen2_moe has no QK-norm")
    return {**llama_body_to_hf(cfg, "qwen2_moe", "Qwen2MoeForCausalLM"), "qkv_bias": cfg.attention_bias,
            "num_experts": cfg.num_experts, "num_experts_per_tok": cfg.top_k, "norm_topk_prob": renormalises(cfg),
            "moe_intermediate_size": cfg.expert_ffn_dim, "shared_expert_intermediate_size": cfg.shared_expert_ffn_dim,
            "decoder_sparse_step": 1, "mlp_only_layers": dense_layers(cfg), "router_aux_loss_coef": aux_coef_to_hf(cfg),
            "use_sliding_window": False}


def qwen2_moe_adapt_state(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Give every MoE block the gated shared expert Qwen2-MoE always has, without changing its output.

    - no shared expert: one of width 0, whose output is exactly zero;
    - a shared expert without gate: gate weights 0 (sigmoid(0) = 1/2) and ``down_proj`` doubled. Scaling
      by powers of two is exact in floating point, so the output is bit-for-bit the ungated one.
    """
    if cfg.num_shared_experts and cfg.shared_expert_gate:
        return state
    state = dict(state)
    ref = state["embed.weight"]
    for i in range(cfg.n_layers):
        if not cfg.is_moe_layer(i):
            continue
        prefix = f"layers.{i}.ffn."
        state[prefix + "shared_expert_gate.weight"] = ref.new_zeros(1, cfg.dim)
        if cfg.num_shared_experts:
            state[prefix + "shared_expert.down_proj.weight"] = state[prefix + "shared_expert.down_proj.weight"] * 2
        else:
            for name, shape in (("gate_proj", (0, cfg.dim)), ("up_proj", (0, cfg.dim)), ("down_proj", (cfg.dim, 0))):
                state[f"{prefix}shared_expert.{name}.weight"] = ref.new_zeros(shape)
    return state


def qwen3_moe_to_config(hf: dict[str, Any]) -> ModelConfig:
    """models/qwen3_moe/modeling_qwen3_moe.py: RMSNorm on each head's q and k, no shared expert."""
    d = QWEN3_MOE_DEFAULTS
    # Qwen3-MoE's attention_bias also biases o_proj, which moekit's attention does not have.
    if value(hf, "attention_bias", d):
        raise ConfigError("attention_bias=true is not supported for qwen3_moe: it biases o_proj, which moekit's "
                          "attention does not have")
    check_sliding_window(hf, d, switch="use_sliding_window")
    body = llama_body(hf, d)
    return build_config("qwen3_moe", dict(body, qk_norm="head", **qwen_moe_fields(hf, d, body)))


def qwen3_moe_from_config(cfg: ModelConfig) -> dict[str, Any]:
    check_export_routing(cfg, "qwen3_moe")
    need(cfg.qk_norm == "head", f"qk_norm={cfg.qk_norm!r}: qwen3_moe always normalises each head's q and k "
         "(qk_norm='head')")
    need(cfg.num_shared_experts == 0, "qwen3_moe has no shared experts")
    need(not cfg.attention_bias, "attention_bias=True: qwen3_moe's attention_bias also biases o_proj")
    return {**llama_body_to_hf(cfg, "qwen3_moe", "Qwen3MoeForCausalLM"), "attention_bias": False,
            "num_experts": cfg.num_experts, "num_experts_per_tok": cfg.top_k, "norm_topk_prob": renormalises(cfg),
            "moe_intermediate_size": cfg.expert_ffn_dim, "decoder_sparse_step": 1, "mlp_only_layers": dense_layers(cfg),
            "router_aux_loss_coef": aux_coef_to_hf(cfg), "use_sliding_window": False}


# --------------------------------------------------------------------------- olmoe
OLMOE_DEFAULTS = dict(LLAMA_DEFAULTS, vocab_size=50304, hidden_size=2048, intermediate_size=2048,
                      num_hidden_layers=16, num_attention_heads=16, max_position_embeddings=4096, rms_norm_eps=1e-5,
                      num_experts_per_tok=8, num_experts=64, router_aux_loss_coef=0.01, norm_topk_prob=False)


def olmoe_to_config(hf: dict[str, Any]) -> ModelConfig:
    """models/olmoe/modeling_olmoe.py: RMSNorm over all of q and all of k, every layer MoE with experts
    as wide as ``intermediate_size``."""
    d = OLMOE_DEFAULTS
    if hf.get("clip_qkv") is not None:
        raise ConfigError(f"clip_qkv={hf['clip_qkv']} is not supported: moekit does not clamp q/k/v")
    if value(hf, "attention_bias", d):
        raise ConfigError("attention_bias=true is not supported for olmoe: it biases o_proj, which moekit's "
                          "attention does not have")
    check_sliding_window(hf, d)
    body = llama_body(hf, d)
    if body["head_dim"] not in (None, body["dim"] // body["n_heads"]):
        # OlmoeAttention sizes q_norm by hidden_size, which only fits when head_dim = hidden / heads.
        raise ConfigError(f"head_dim={body['head_dim']} != hidden_size / num_attention_heads is not supported for olmoe")
    return build_config("olmoe", dict(
        body, qk_norm="full", num_experts=value(hf, "num_experts", d), top_k=value(hf, "num_experts_per_tok", d),
        router="topk", expert_ffn_dim=body["ffn_dim"], norm_topk_prob=bool(value(hf, "norm_topk_prob", d)),
        aux_loss_coef=float(value(hf, "router_aux_loss_coef", d)), z_loss_coef=0.0,
    ))


def olmoe_from_config(cfg: ModelConfig) -> dict[str, Any]:
    check_export_routing(cfg, "olmoe")
    need(cfg.qk_norm == "full", f"qk_norm={cfg.qk_norm!r}: olmoe always normalises all of q and k (qk_norm='full')")
    need(cfg.head_dim * cfg.n_heads == cfg.dim, f"head_dim={cfg.head_dim}: olmoe needs head_dim = dim / n_heads")
    need(cfg.num_shared_experts == 0, "olmoe has no shared experts")
    need(cfg.num_moe_layers == cfg.n_layers, f"first_dense_layers={cfg.first_dense_layers}, "
         f"moe_every={cfg.moe_every}: every olmoe layer is MoE")
    need(not cfg.attention_bias, "attention_bias=True: olmoe's attention_bias also biases o_proj")
    return {**llama_body_to_hf(cfg, "olmoe", "OlmoeForCausalLM"), "intermediate_size": cfg.expert_ffn_dim,
            "attention_bias": False, "clip_qkv": None, "num_experts": cfg.num_experts,
            "num_experts_per_tok": cfg.top_k, "norm_topk_prob": renormalises(cfg),
            "router_aux_loss_coef": aux_coef_to_hf(cfg)}


# --------------------------------------------------------------------------- the registry
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec(llama_to_config, llama_from_config),
    "mistral": ArchSpec(mistral_to_config),
    "qwen2": ArchSpec(qwen2_to_config, qwen2_from_config),
    # transformers conversion_mapping.py ("mixtral"): on disk the block is ``block_sparse_moe`` and the
    # experts are w1/w3/w2; transformers 5 renames the block to ``mlp``. Both spellings load.
    "mixtral": ArchSpec(mixtral_to_config, mixtral_from_config, expert_keys=MIXTRAL_EXPERT_KEYS,
                        aliases=((".block_sparse_moe.", ".mlp."),)),
    "qwen2_moe": ArchSpec(qwen2_moe_to_config, qwen2_moe_from_config, ignore=qwen2_moe_ignore,
                          adapt_state=qwen2_moe_adapt_state),
    "qwen3_moe": ArchSpec(qwen3_moe_to_config, qwen3_moe_from_config),
    "olmoe": ArchSpec(olmoe_to_config, olmoe_from_config),
}


def register_architecture(model_type: str, spec: ArchSpec, *, replace: bool = False) -> None:
    """Teach :func:`moekit.convert.hf.load_hf` (and ``save_hf`` when ``spec.from_config`` is set) a new
    Hugging Face ``model_type``. Registering an existing one needs ``replace=True``.

    Example: a checkpoint whose shared experts are called ``shared_experts`` (plural) and whose router
    carries a selection bias only needs two more key templates in front of the Llama ones::

        register_architecture("my_moe", ArchSpec(
            to_config=my_to_config,  # config.json dict -> ModelConfig, ConfigError on what it cannot hold
            keys=(("model.layers.{i}.mlp.shared_experts.{mlp}.weight", "layers.{i}.ffn.shared_expert.{mlp}.weight"),
                  ("model.layers.{i}.mlp.gate.e_score_correction_bias", "layers.{i}.ffn.router.bias"),
                  *LLAMA_KEYS)))
    """
    if not isinstance(spec, ArchSpec):
        raise TypeError(f"spec must be an ArchSpec, got {type(spec).__name__}")
    if model_type in ARCHITECTURES and not replace:
        raise ValueError(f"model_type {model_type!r} is already registered; pass replace=True to override it")
    ARCHITECTURES[model_type] = spec


def export_model_type(cfg: ModelConfig) -> str:
    """The Hugging Face architecture that holds ``cfg`` most directly.

    Dense: llama, or qwen2 when q/k/v have biases. MoE: the QK-norm flavour decides (qwen3_moe per head,
    olmoe over all heads); otherwise mixtral when it fits, else qwen2_moe (shared experts, dense layers,
    attention biases, no renormalisation).
    """
    if cfg.num_experts == 0:
        return "qwen2" if cfg.attention_bias else "llama"
    if cfg.qk_norm == "head":
        return "qwen3_moe"
    if cfg.qk_norm == "full":
        return "olmoe"
    plain = (renormalises(cfg) and cfg.num_shared_experts == 0 and cfg.num_moe_layers == cfg.n_layers
             and not cfg.attention_bias)
    return "mixtral" if plain else "qwen2_moe"


# DeepSeek-V3 lives in its own module (multi-head latent attention); importing it registers it.
from moekit.convert import deepseek_v3 as _deepseek_v3  # noqa: E402, F401
