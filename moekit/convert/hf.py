"""Hugging Face checkpoint directories in and out: :func:`load_hf`, :func:`save_hf`, :func:`inspect_hf`.

A Hugging Face directory holds ``config.json``, ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``) and usually ``tokenizer.json`` / ``tokenizer_config.json``. What
each ``model_type`` means is in :mod:`moekit.convert.hf_archs`; this module moves the tensors.

Loading is lazy so that peak memory stays near the size of the weights: the model is built on the
meta device (no storage), every tensor is read once from its shard with ``safetensors.safe_open`` and
handed to the model with ``load_state_dict(assign=True)``. Per-expert checkpoints are stacked one
layer at a time into moekit's ``[E, 2F, D]`` / ``[E, D, F]`` layout.

Legend: E experts, F expert FFN dim, D model dim.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from moekit.config import ConfigError, ModelConfig
from moekit.convert.hf_archs import ARCHITECTURES, ArchSpec, export_model_type, template_regex
from moekit.convert.inspect import (
    SAFETENSORS_DTYPES,
    config_info,
    files_info,
    read_safetensors_header,
)
from moekit.data.special import (
    hf_config_ids,
    read_chat_template,
    read_hf_special_tokens,
    special_tokens_of,
    write_hf_special_tokens,
)
from moekit.errors import CheckpointError
from moekit.model import Transformer
from moekit.model.dtypes import float32_buffers, state_dict_as
from moekit.utils import atomic_write, atomic_write_text, read_json

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
EXPERT_LAYOUTS = ("per_expert", "fused")
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
_FUSED = template_regex("layers.{i}.ffn.experts.{fused}")
_SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


# =========================================================================== reading a directory
def read_hf_config(directory: Path) -> dict[str, Any]:
    """``config.json`` as a dict; a missing or unreadable file is a CheckpointError naming it."""
    path = directory / "config.json"
    if not directory.is_dir():
        raise CheckpointError(f"Hugging Face checkpoint not found: {directory} is not a directory")
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: not a Hugging Face checkpoint directory")
    return read_json(path)


def architecture(hf: dict[str, Any]) -> tuple[str, ArchSpec]:
    """The ``model_type`` of a config.json and its spec; an unknown one lists the supported ones."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ConfigError(f"model_type={model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}")
    return model_type, ARCHITECTURES[model_type]


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards named by the index, or the single file."""
    if (directory / SINGLE_FILE).is_file():  # transformers' order: the single file wins
        return [directory / SINGLE_FILE]
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is unreadable or has no weight_map ({e})") from None
        for shard in shards:
            if not (directory / shard).is_file():
                raise CheckpointError(f"{index} names shard {shard!r}, which is missing from {directory}")
        return [directory / shard for shard in shards]
    raise CheckpointError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE} "
                          "(PyTorch .bin checkpoints are not supported: convert them to safetensors)")


class Shards:
    """Lazy access to every tensor of a checkpoint's safetensors files, by name."""

    def __init__(self, files: list[Path], stack: contextlib.ExitStack):
        self.where: dict[str, tuple[Path, Any]] = {}
        for path in files:
            try:
                handle = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
                names = list(handle.keys())
            except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                raise CheckpointError(f"{path} is corrupt or truncated ({e})") from None
            for name in names:
                self.where[name] = (path, handle)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.where[name][1].get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        stored = self.where[name][1].get_slice(name).get_dtype()
        return getattr(torch, SAFETENSORS_DTYPES.get(stored, stored.lower()))

    def read(self, name: str) -> torch.Tensor:
        path, handle = self.where[name]
        try:
            return handle.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: cannot read tensor {name!r} ({e})") from None

    def file(self, name: str) -> str:
        return self.where[name][0].name


def check_index(directory: Path, files: list[Path], shards: Shards) -> None:
    """Every tensor the index promises must be in the shard it names."""
    index = directory / INDEX_FILE
    if files == [directory / SINGLE_FILE] or not index.is_file():
        return
    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    for name, shard in weight_map.items():
        if name not in shards.where or shards.file(name) != shard:
            raise CheckpointError(f"{index} says tensor {name!r} is in {shard}, but that shard does not hold it")


# =========================================================================== tensor names
@dataclass
class KeyPlan:
    """Where each Hugging Face tensor goes in moekit."""

    plain: dict[str, str] = field(default_factory=dict)  # moekit name -> HF name
    experts: dict[tuple[int, int], dict[int, str]] = field(default_factory=dict)  # (layer, 0 gate|1 up|2 down) -> {j: HF name}
    unexpected: list[str] = field(default_factory=list)  # HF names with no place in moekit


def canonical_name(name: str, spec: ArchSpec) -> str:
    """An on-disk name in the spelling of ``spec.keys`` (e.g. Mixtral's ``block_sparse_moe`` -> ``mlp``)."""
    for disk, canonical in spec.aliases:
        name = name.replace(disk, canonical)
    return name


def plan_keys(names: list[str], spec: ArchSpec, hf: dict[str, Any]) -> KeyPlan:
    """Sort checkpoint tensor names into renames, per-expert pieces to stack, and unexpected ones."""
    plan = KeyPlan()
    ignored = [template_regex(t) for t in spec.ignore(hf)]
    experts = [template_regex(t) for t in spec.expert_keys]
    for name in names:
        key = canonical_name(name, spec)
        if any(r.fullmatch(key) for r in ignored):
            continue
        for hf_re, _, _, mk_template in spec.compiled:
            m = hf_re.fullmatch(key)
            if m:
                plan.plain[mk_template.format(**m.groupdict())] = name
                break
        else:
            for part, expert_re in enumerate(experts):
                m = expert_re.fullmatch(key)
                if m:
                    plan.experts.setdefault((int(m["i"]), part), {})[int(m["j"])] = name
                    break
            else:
                plan.unexpected.append(name)
    return plan


def hf_name(moekit_name: str, spec: ArchSpec) -> str:
    """The Hugging Face name of a moekit tensor (fused expert layout), through ``spec.keys``."""
    for _, hf_template, mk_re, _ in spec.compiled:
        m = mk_re.fullmatch(moekit_name)
        if m:
            return hf_template.format(**m.groupdict())
    raise ConfigError(f"tensor {moekit_name!r} has no place in this Hugging Face architecture")


def expert_name(spec: ArchSpec, part: int, layer: int, expert: int) -> str:
    return spec.expert_keys[part].format(i=layer, j=expert)


# =========================================================================== load
def load_hf(path: str | os.PathLike, dtype: torch.dtype | str | None = None,
            device: str | torch.device = "cpu") -> tuple[Transformer, Tokenizer | None]:
    """Load a Hugging Face checkpoint directory as ``(model, tokenizer)`` (tokenizer None without
    ``tokenizer.json``). The model is in eval mode, in the checkpoint's dtype unless ``dtype`` is given,
    and carries ``model.special_tokens`` (ids from ``generation_config.json`` / ``config.json``, names and
    the chat template from ``tokenizer_config.json``; :mod:`moekit.data.special`) and
    ``model.chat_template`` (the same template, or None).
    """
    directory = Path(path)
    hf = read_hf_config(directory)
    model_type, spec = architecture(hf)
    cfg = spec.to_config(hf)
    files = weight_files(directory)
    target_dtype = _as_dtype(dtype)
    with contextlib.ExitStack() as stack:
        shards = Shards(files, stack)
        check_index(directory, files, shards)
        plan = plan_keys(list(shards.where), spec, hf)
        with torch.device("meta"):
            model = Transformer(cfg)  # shapes only: no memory, no initialisation cost
        expected = model.state_dict()
        if cfg.tie_embeddings:
            plan.plain.pop("lm_head.weight", None)  # transformers ignores it too when embeddings are tied
        check_names(directory, model_type, spec, plan, expected, cfg)
        check_shapes(plan, shards, expected)
        state = read_state(plan, shards, expected, target_dtype, torch.device(device), float32_buffers(model))
    model.load_state_dict(state, strict=True, assign=True)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a tensor the model has outside its state_dict (none today); never hand out meta tensors
        raise RuntimeError(f"load_hf left tensors without data: {left}")
    model.eval()
    tokenizer = read_tokenizer(directory)
    model.special_tokens = read_hf_special_tokens(directory, tokenizer, hf)
    model.chat_template = model.special_tokens.chat_template
    return model, tokenizer


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is not a floating-point torch dtype (e.g. 'float32', 'bfloat16')")
    return resolved


def check_names(directory: Path, model_type: str, spec: ArchSpec, plan: KeyPlan,
                expected: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Every tensor the config implies is present, and nothing else: one line naming what is wrong."""
    missing, unexpected = [], list(plan.unexpected)
    unexpected += [hf for mk, hf in plan.plain.items() if mk not in expected]
    for (layer, part), by_expert in sorted(plan.experts.items()):
        fused = f"layers.{layer}.ffn.experts.{'down_proj' if part == 2 else 'gate_up_proj'}"
        if fused not in expected or fused in plan.plain:  # not an MoE layer, or stored fused as well
            unexpected += list(by_expert.values())
        else:
            unexpected += [name for j, name in by_expert.items() if j >= cfg.num_experts]
    for mk in expected:
        if mk in plan.plain:
            continue
        m = _FUSED.fullmatch(mk)
        parts = (2,) if m and m["fused"] == "down_proj" else (0, 1)
        if m and any((int(m["i"]), p) in plan.experts for p in parts):  # stored per expert: name the gaps
            layer = int(m["i"])
            missing += [expert_name(spec, p, layer, j) for p in parts for j in range(cfg.num_experts)
                        if j not in plan.experts.get((layer, p), {})]
        else:
            missing.append(hf_name(mk, spec))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensors {_some(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors {_some(unexpected)}")
        raise CheckpointError(f"{directory} does not match its config.json ({model_type}): {'; '.join(parts)}")


def _some(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}]"


def check_shapes(plan: KeyPlan, shards: Shards, expected: dict[str, torch.Tensor]) -> None:
    """Compare every stored shape with the one config.json implies, before reading any data."""
    def check(name: str, want: tuple[int, ...]) -> None:
        got = shards.shape(name)
        if got != want:
            raise CheckpointError(f"{shards.file(name)}: tensor {name!r} has shape {got}, "
                                  f"config.json implies {want}")

    for mk, want in expected.items():  # in model order, so the first error is the earliest tensor
        if mk in plan.plain:
            check(plan.plain[mk], tuple(want.shape))
    for (layer, part), by_expert in sorted(plan.experts.items()):
        if part == 2:
            want = tuple(expected[f"layers.{layer}.ffn.experts.down_proj"].shape[1:])  # [D, F]
        else:
            E, F2, D = expected[f"layers.{layer}.ffn.experts.gate_up_proj"].shape
            want = (F2 // 2, D)
        for j in sorted(by_expert):
            check(by_expert[j], want)


def read_state(plan: KeyPlan, shards: Shards, expected: dict[str, torch.Tensor], dtype: torch.dtype | None,
               device: torch.device, keep_float32: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Read each tensor once, in the checkpoint's dtype (that of the embedding) unless ``dtype`` is given;
    ``keep_float32`` (the DeepSeek-V3 selection bias) stays float32 whatever the dtype.

    Per-expert tensors are copied straight into a preallocated stack per layer, so at most one layer's
    experts exist twice at any moment.
    """
    if dtype is None:
        dtype = shards.dtype(plan.plain["embed.weight"])

    def convert(mk: str, t: torch.Tensor) -> torch.Tensor:
        to = (torch.float32 if mk in keep_float32 else dtype) if t.is_floating_point() else t.dtype
        return t.to(device=device, dtype=to)

    state = {mk: convert(mk, shards.read(name)) for mk, name in plan.plain.items()}
    for layer in sorted({layer for layer, _ in plan.experts}):
        if (layer, 0) in plan.experts:  # gate rows then up rows: [E, 2F, D]
            name = f"layers.{layer}.ffn.experts.gate_up_proj"
            gate_up = torch.empty(expected[name].shape, dtype=dtype, device=device)
            F = gate_up.shape[1] // 2
            for j in range(gate_up.shape[0]):
                gate_up[j, :F] = shards.read(plan.experts[(layer, 0)][j])
                gate_up[j, F:] = shards.read(plan.experts[(layer, 1)][j])
            state[name] = gate_up
        if (layer, 2) in plan.experts:  # [E, D, F]
            name = f"layers.{layer}.ffn.experts.down_proj"
            down = torch.empty(expected[name].shape, dtype=dtype, device=device)
            for j in range(down.shape[0]):
                down[j] = shards.read(plan.experts[(layer, 2)][j])
            state[name] = down
    return state


def read_tokenizer(directory: Path) -> Tokenizer | None:
    path = directory / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise CheckpointError(f"{path} is not a valid tokenizer.json ({str(e).splitlines()[0] if str(e) else e!r})") from None


# =========================================================================== save
def save_hf(model: Transformer, tokenizer: Tokenizer | None, path: str | os.PathLike, *,
            model_type: str | None = None, expert_layout: str = "per_expert",
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype: torch.dtype | str | None = None) -> Path:
    """Write ``model`` as a Hugging Face directory that ``AutoModelForCausalLM.from_pretrained`` loads
    with the same logits.

    ``model_type`` defaults to the closest architecture (:func:`export_model_type`: llama / qwen2 for
    dense models, mixtral, qwen2_moe, qwen3_moe or olmoe for MoE); settings it cannot hold exactly raise a
    ConfigError. ``expert_layout="per_expert"`` writes one tensor per expert, the format transformers'
    own ``save_pretrained`` writes and every version reads; ``"fused"`` writes the 3-D stacks that only
    transformers >= 5 reads. ``dtype`` ("bf16", "f16", "f32"; :mod:`moekit.model.dtypes`) is the storage
    dtype, None the model's own; tensors already in it are written as they are (no copy). Special
    tokens and the chat template are the model's own (:func:`moekit.data.special.special_tokens_of`):
    ids in ``config.json`` and ``generation_config.json``, names and template in ``tokenizer_config.json``.
    """
    cfg: ModelConfig = model.cfg
    if cfg.num_experts and cfg.task_routing != "none":
        raise ConfigError(f"task_routing={cfg.task_routing!r} has no Hugging Face equivalent (their routers see only "
                          "the token, not its task): export a model trained with task_routing='none', or a task's "
                          "path taken out with moekit extract")
    model_type = model_type or export_model_type(cfg)
    spec = ARCHITECTURES.get(model_type)
    exportable = sorted(k for k, s in ARCHITECTURES.items() if s.from_config is not None)
    if spec is None or spec.from_config is None:
        raise ConfigError(f"cannot export as model_type={model_type!r}; export supports {', '.join(exportable)}")
    if expert_layout not in EXPERT_LAYOUTS:
        raise ValueError(f"expert_layout={expert_layout!r} is not one of {list(EXPERT_LAYOUTS)}")
    hf = spec.from_config(cfg)
    state = state_dict_as(model, dtype)
    if spec.adapt_state is not None:
        state = spec.adapt_state(cfg, state)
    tensors = hf_tensors(state, spec, expert_layout)
    special = special_tokens_of(model, tokenizer)
    hf.update(hf_config_ids(special))
    # transformers 5 reads "dtype", 4.x "torch_dtype" (5 accepts it silently: configuration_utils.py)
    hf["dtype"] = hf["torch_dtype"] = str(state["embed.weight"].dtype).removeprefix("torch.")

    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory, tensors, max_shard_bytes)
    atomic_write_text(directory / "config.json", json.dumps(hf, indent=2) + "\n")
    if tokenizer is not None:
        atomic_write(directory / "tokenizer.json", lambda tmp: tokenizer.save(tmp))
    write_hf_special_tokens(directory, special, tokenizer, cfg.max_seq_len)
    return directory


def hf_tensors(state: dict[str, torch.Tensor], spec: ArchSpec, expert_layout: str) -> dict[str, torch.Tensor]:
    """Rename moekit tensors to Hugging Face ones; in the per-expert layout, each stacked expert weight
    becomes E views (gate rows, up rows, down) and names take their on-disk spelling (``spec.aliases``)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        m = _FUSED.fullmatch(name)
        if m is None or expert_layout == "fused":
            out[hf_name(name, spec)] = t.contiguous()
            continue
        layer = int(m["i"])
        for j in range(t.shape[0]):
            if m["fused"] == "down_proj":
                out[expert_name(spec, 2, layer, j)] = t[j].contiguous()
            else:
                F = t.shape[1] // 2
                out[expert_name(spec, 0, layer, j)] = t[j, :F].contiguous()
                out[expert_name(spec, 1, layer, j)] = t[j, F:].contiguous()
    if expert_layout == "per_expert":
        out = {_disk_name(k, spec): v for k, v in out.items()}
    return out


def _disk_name(name: str, spec: ArchSpec) -> str:
    for disk, canonical in spec.aliases:
        name = name.replace(canonical, disk)
    return name


def write_safetensors(directory: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    """``model.safetensors``, or shards of at most ``max_shard_bytes`` plus the index transformers reads.
    Weight files of an earlier export in the directory are removed so they cannot be mixed in."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    keep = {*names, INDEX_FILE} if len(shards) > 1 else set(names)
    stale = [p for p in directory.iterdir()
             if (p.name in (SINGLE_FILE, INDEX_FILE) or _SHARD_NAME.match(p.name)) and p.name not in keep]
    for shard, name in zip(shards, names):
        atomic_write(directory / name, lambda tmp, s=shard: save_file(s, tmp, metadata={"format": "pt"}))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {t: name for shard, name in zip(shards, names) for t in shard}}
        atomic_write_text(directory / INDEX_FILE, json.dumps(index, indent=2) + "\n")
    for path in stale:
        path.unlink()


# =========================================================================== inspect
def inspect_hf(path: str | os.PathLike) -> dict[str, Any]:
    """What a Hugging Face checkpoint holds, from ``config.json`` and the safetensors headers only
    (the keys of :func:`moekit.convert.inspect.inspect_moekit`, plus ``model_type`` and ``summary``).

    Parameter counts come from the translated config (``ModelConfig.param_counts``): ``parameters``
    in total and ``active_parameters`` per token; ``stored_parameters`` counts what the files hold.
    """
    from moekit.summary import describe_config

    directory = Path(path)
    hf = read_hf_config(directory)
    model_type, spec = architecture(hf)
    cfg = spec.to_config(hf)
    files = weight_files(directory)
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in files:
        tensors.update(read_safetensors_header(file)[0])
    dtypes: Counter[str] = Counter()
    for dtype, shape in tensors.values():
        dtypes[SAFETENSORS_DTYPES.get(dtype, dtype.lower())] += math.prod(shape)
    total, active = cfg.param_counts()
    class_name = (hf.get("architectures") or [model_type])[0]
    info: dict[str, Any] = {
        "path": str(directory),
        "format": "hf",
        "model_type": model_type,
        "architecture": class_name,
        "summary": describe_config(cfg),
        "dtype": dtypes.most_common(1)[0][0] if dtypes else None,
        "dtypes": dict(dtypes),
        "stored_parameters": sum(dtypes.values()),
        **config_info(cfg),
        **files_info(directory, files, tensors),
        "chat_template": read_chat_template(directory) is not None,
        "config": cfg.to_dict(),
    }
    return info
