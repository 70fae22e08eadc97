"""Sparse upcycling: turn a trained dense model into a Mixture-of-Experts model that starts where it is.

Sparse upcycling (Komatsuzaki et al. 2022, "Sparse Upcycling: Training Mixture-of-Experts from Dense
Checkpoints", arXiv:2212.05055) copies each dense MLP into every expert of a new MoE layer, adds a new
randomly initialised router, and keeps every other weight. Megatron-LM does the same at load time
under ``--moe-use-upcycling`` (``megatron/core/transformer/moe/upcycling_utils.py``: MLP weights
copied into each expert, the router kept from the freshly initialised MoE model).

Why the outputs are unchanged at initialisation: with identical experts ``f_e = f`` and gate weights
that sum to one over the experts a token uses, ``sum_k w_k f(x) = f(x)``. Routers whose gates are
renormalised over the chosen experts (``topk``, ``noisy_topk``, ``sigmoid_bias`` with
``norm_topk_prob=True``, dropless) keep that identity; ``switch`` (gate = the router probability,
about 1/E at first) and ``expert_choice`` (each expert picks tokens, so a token gets 0..E experts
with unnormalised weights) do not, and :func:`upcycle` warns about them. The identity is exact up to
rounding: in float32 to ~1e-5 of the logits; in bfloat16 the gate weights are rounded, so expect
bfloat16-sized differences.

NOTE: for the same reason the language-model loss gives the router no gradient while the experts are
identical (the output does not depend on the gates); the experts drift apart because different
tokens reach different experts, and only then does the router learn. ``noise`` > 0 starts that
drift at step 0 (cf. Drop-Upcycling, Nakamura et al. 2025, which re-initialises part of each copy).

Legend: E experts, F FFN width of the dense MLP (= expert width), D model dim.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import torch

from moekit.config import ROUTERS, ConfigError, ModelConfig
from moekit.errors import CheckpointError
from moekit.model import Transformer

# Routers whose gate weights over a token's experts do not sum to one (see the module docstring).
UNNORMALISED_ROUTERS = {
    "switch": "the switch gate is the router probability itself (about 1/E at initialisation), "
              "not renormalised, so each MLP output is scaled by it",
    "expert_choice": "each expert picks its own top tokens, so a token gets anywhere from 0 to E experts "
                     "with weights that are per-expert probabilities, not renormalised per token",
}

# The router starts at 0.1x the model's init scale: Switch Transformer's smaller initialisation for
# stability (Fedus et al. 2021, sec. 2.4). Which experts a token picks does not depend on this scale
# (argmax is scale-invariant), so tokens are still spread over the experts; the gates start near
# uniform.
ROUTER_INIT_SCALE = 0.1


class UpcycleWarning(UserWarning):
    """The upcycled model's outputs will differ from the dense model's at initialisation."""


def check_arguments(num_experts: int, top_k: int, router: str = "topk", noise: float = 0.0) -> None:
    """Raise ConfigError naming the bad value, before anything is loaded or built."""
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 2:
        raise ConfigError(f"num_experts={num_experts!r} must be an integer >= 2 (one expert is the dense model)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ConfigError(f"top_k={top_k!r} must be an integer between 1 and num_experts={num_experts}")
    if router not in ROUTERS:
        raise ConfigError(f"router={router!r} is not one of {list(ROUTERS)}")
    if router == "switch" and top_k != 1:
        raise ConfigError(f"router='switch' routes each token to one expert; got top_k={top_k}")
    if not isinstance(noise, (int, float)) or noise < 0:
        raise ConfigError(f"noise={noise!r} must be a number >= 0 (a relative standard deviation)")


def _refuse_moe(num_experts: int, router: str | None) -> None:
    if num_experts:
        raise ConfigError(f"the source model is already a mixture of experts (num_experts={num_experts}, "
                          f"router {router!r}); upcycling starts from a dense model (num_experts=0)")


def upcycled_config(cfg: ModelConfig, num_experts: int, top_k: int, router: str = "topk",
                    moe_every: int = 1, first_dense_layers: int = 0) -> ModelConfig:
    """The MoE twin of dense ``cfg``: experts as wide as the dense MLP, renormalised top-k gates,
    dropless routing, no shared experts, every other field kept. Raises ConfigError on bad input."""
    _refuse_moe(cfg.num_experts, cfg.router)
    check_arguments(num_experts, top_k, router)
    new = dataclasses.replace(
        cfg, num_experts=num_experts, top_k=top_k, router=router, expert_ffn_dim=cfg.ffn_dim,
        norm_topk_prob=True, routed_scaling_factor=1.0, capacity_factor=None, eval_capacity_factor=None,
        num_shared_experts=0, shared_expert_ffn_dim=None, shared_expert_gate=False, n_group=1, topk_group=1,
        moe_every=moe_every, first_dense_layers=first_dense_layers,
    )
    if new.num_moe_layers == 0:
        raise ConfigError(f"first_dense_layers={first_dense_layers} leaves no MoE layer in a "
                          f"{cfg.n_layers}-layer model")
    return new


def upcycle(model: Transformer, num_experts: int, top_k: int, router: str = "topk", noise: float = 0.0,
            seed: int = 0, *, moe_every: int = 1, first_dense_layers: int = 0,
            router_std: float | None = None) -> Transformer:
    """A new MoE :class:`Transformer` whose MoE layers hold ``num_experts`` copies of the dense MLP.

    ``noise`` > 0 multiplies every copied weight by ``1 + noise * N(0, 1)`` (independently per expert
    and element; a relative std) so that experts start different; 0 keeps exact copies. The router
    is ``N(0, router_std)`` (default ``0.1 * init_std``), seeded by ``seed``. ``moe_every`` and
    ``first_dense_layers`` choose the layers to upcycle as in :class:`ModelConfig`; the others keep
    their dense MLP. Dtypes, device and special tokens are kept, and ``model`` is left untouched.
    """
    check_arguments(num_experts, top_k, router, noise)
    if getattr(model, "quantization", None):
        raise ConfigError("upcycle needs float weights; load the model with moekit.load(path, quantized=False)")
    cfg = upcycled_config(model.cfg, num_experts, top_k, router, moe_every, first_dense_layers)
    if router in UNNORMALISED_ROUTERS:
        warnings.warn(f"router={router!r}: the upcycled model's outputs differ from the dense model's at "
                      f"initialisation: {UNNORMALISED_ROUTERS[router]}. Use 'topk', 'noisy_topk' or "
                      "'sigmoid_bias' to start exactly at the dense model.", UpcycleWarning, stacklevel=2)
    std = ROUTER_INIT_SCALE * cfg.init_std if router_std is None else router_std
    gen = torch.Generator().manual_seed(seed)
    dense = {k: v.detach() for k, v in model.state_dict().items()}

    with torch.device("meta"):  # shapes only: no memory, no random init of weights we overwrite
        moe = Transformer(cfg)
    state = {}
    for name, target in moe.state_dict().items():
        value = _upcycled_tensor(name, dense, num_experts, noise, std, gen)
        if value.shape != target.shape:  # NOTE: a bug here, not a user error
            raise RuntimeError(f"upcycled {name} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
        state[name] = value
    moe.load_state_dict(state, strict=True, assign=True)
    for attr in ("special_tokens", "chat_template"):  # the tokenizer is unchanged, and so are its special tokens
        if hasattr(model, attr):
            setattr(moe, attr, getattr(model, attr))
    return moe.train(model.training)


def _upcycled_tensor(name: str, dense: dict[str, torch.Tensor], num_experts: int, noise: float,
                     router_std: float, gen: torch.Generator) -> torch.Tensor:
    """The value of MoE state entry ``name``, built from the dense state dict."""
    if name in dense:  # attention, norms, embeddings, and layers that stay dense
        return dense[name].clone()
    prefix, _, leaf = name.rpartition(".ffn.")  # e.g. "layers.3", "experts.gate_up_proj"
    gate_FD = dense.get(f"{prefix}.ffn.gate_proj.weight")
    if gate_FD is None:
        raise RuntimeError(f"upcycle does not know how to initialise {name!r}")
    if leaf == "experts.gate_up_proj":  # [E, 2F, D]: gate rows, then up rows
        gate_up_2FD = torch.cat([gate_FD, dense[f"{prefix}.ffn.up_proj.weight"]], dim=0)
        return _copies(gate_up_2FD, num_experts, noise, gen)
    if leaf == "experts.down_proj":  # [E, D, F]
        return _copies(dense[f"{prefix}.ffn.down_proj.weight"], num_experts, noise, gen)
    D, dtype, device = gate_FD.shape[1], gate_FD.dtype, gate_FD.device
    if leaf == "router.weight":  # [E, D]
        return (torch.randn(num_experts, D, generator=gen) * router_std).to(dtype=dtype, device=device)
    if leaf == "router.noise_weight":  # noisy top-k: zero, i.e. softplus(0) noise, as in reset_parameters
        return torch.zeros(num_experts, D, dtype=dtype, device=device)
    if leaf == "router.bias":  # DeepSeek-V3 selection bias: a float32 buffer, zero
        return torch.zeros(num_experts, dtype=torch.float32, device=device)
    raise RuntimeError(f"upcycle does not know how to initialise {name!r}")


def _copies(w: torch.Tensor, num_experts: int, noise: float, gen: torch.Generator) -> torch.Tensor:
    """``num_experts`` stacked copies of ``w``, each times ``1 + noise * N(0, 1)`` when noise > 0."""
    stacked = w.unsqueeze(0).repeat(num_experts, *([1] * w.dim()))
    if noise > 0:
        eps = torch.randn(stacked.shape, generator=gen)  # float32 on the CPU: the same for any dtype/device
        stacked = (stacked.float() * (1.0 + noise * eps.to(w.device))).to(w.dtype)
    return stacked


def upcycle_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, num_experts: int, top_k: int,
                       router: str = "topk", noise: float = 0.0, seed: int = 0, *, moe_every: int = 1,
                       first_dense_layers: int = 0) -> Path:
    """Load a dense checkpoint, upcycle it, and save a moekit checkpoint at ``dst``.

    ``src`` is anything :func:`moekit.checkpoint.load` reads. ``dst`` gets the upcycled weights, the
    source tokenizer and a model card saying where it came from; it can be trained further with
    ``moekit train --init DST``. A ``dst`` that exists and is not empty is refused.
    """
    from moekit.checkpoint import load, model_card, save  # NOTE: function level: checkpoint.py sits above convert/
    from moekit.convert.inspect import inspect_checkpoint

    check_arguments(num_experts, top_k, router, noise)
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CheckpointError(f"{dst} already exists and is not an empty directory; choose another destination")
    source = inspect_checkpoint(src)  # headers only: refuse an MoE source before loading all its weights
    _refuse_moe(source.get("num_experts") or 0, source.get("router"))
    dense, tokenizer = load(src, quantized=False)
    moe = upcycle(dense, num_experts, top_k, router, noise, seed, moe_every=moe_every,
                  first_dense_layers=first_dense_layers)
    card = model_card(moe.cfg) + _provenance(src, dense.cfg, moe.cfg, noise, seed)
    return save(moe, tokenizer, dst, card=card)


def _provenance(src: str | os.PathLike, dense: ModelConfig, moe: ModelConfig, noise: float, seed: int) -> str:
    """Model-card section recording how the checkpoint was made."""
    total, _ = dense.param_counts()
    return "\n".join([
        "", "## Upcycled", "",
        f"Sparse-upcycled (Komatsuzaki et al. 2022) from the dense checkpoint `{src}` ({total:,} parameters): "
        f"each dense MLP in {moe.num_moe_layers} of {moe.n_layers} layers copied into {moe.num_experts} experts, "
        f"router `{moe.router}` top-{moe.top_k} initialised N(0, {ROUTER_INIT_SCALE} * init_std), "
        f"copy noise {noise} (relative std), seed {seed}. Not trained since upcycling.", "",
    ])
