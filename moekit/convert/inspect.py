"""What is inside a checkpoint, read from its headers: ``moekit info PATH``.

:func:`inspect_checkpoint` answers format, architecture, dtypes, parameters (total and active per
token), experts / top-k / router, tensor count and size on disk for a moekit checkpoint directory, a
training run directory (its newest checkpoint), a Hugging Face directory or a GGUF file, without
loading a single weight: a safetensors file starts with an 8-byte little-endian header length and a
JSON header naming every tensor's dtype, shape and byte range
(https://github.com/huggingface/safetensors#format), so a 100 GB checkpoint is described from a few
kilobytes. Hugging Face and GGUF files are described by their converters (``moekit.convert.hf``,
``moekit.convert.gguf``).
"""

from __future__ import annotations

import json
import os
import struct
from collections import Counter
from pathlib import Path
from typing import Any

from moekit.config import ModelConfig
from moekit.errors import CheckpointError
from moekit.summary import human, human_bytes
from moekit.utils import read_json

# safetensors dtype codes -> torch names (the ones users see elsewhere in moekit).
SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}
# safetensors refuses headers above 100 MB; a larger length field means a corrupt file, not a big model.
MAX_HEADER_BYTES = 100_000_000
EXPERT_STACKS = ("experts.gate_up_proj", "experts.down_proj")  # [E, ...]: a token uses top_k of E


def inspect_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Describe the checkpoint at ``path`` from its metadata alone (no weight is read).

    Dispatch: a directory with ``checkpoints/`` is a training run (its newest complete checkpoint);
    a directory whose ``config.json`` has ``model_type`` is a Hugging Face checkpoint; one whose
    ``config.json`` holds moekit settings is a moekit checkpoint; a ``.gguf`` file is GGUF.
    Raises CheckpointError for a missing path or an unknown format.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.is_file() and p.suffix.lower() == ".gguf":
        from moekit.convert.gguf import inspect_gguf

        return _with_defaults(inspect_gguf(p), p, "gguf")
    if p.is_dir() and (p / "checkpoints").is_dir():
        return _inspect_run(p)
    config = read_json_object(p / "config.json") if p.is_dir() else None
    if config is not None and "model_type" in config:
        from moekit.convert.hf import inspect_hf

        return _with_defaults(inspect_hf(p), p, "hf")
    if config and set(config) <= set(ModelConfig.__dataclass_fields__):
        return inspect_moekit(p)
    raise CheckpointError(
        f"{p}: unknown checkpoint format; expected a moekit checkpoint directory (config.json + model.safetensors), "
        "a training run directory (checkpoints/step-N), a Hugging Face directory (config.json with model_type) "
        "or a .gguf file")


def inspect_moekit(directory: str | os.PathLike) -> dict[str, Any]:
    """Describe a moekit checkpoint directory from ``config.json`` and the safetensors headers."""
    # NOTE: imported here, not at the top: moekit.checkpoint dispatches to the converters, which import
    # this module, so convert/ depends on checkpoint.py only where it reads moekit's own layout.
    from moekit.checkpoint import read_model_config

    directory = Path(directory)
    cfg = read_model_config(directory)
    files = weight_files(directory)
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    metadata: dict[str, str] = {}
    for file in files:
        file_tensors, file_metadata = read_safetensors_header(file)
        tensors.update(file_tensors)
        metadata.update(file_metadata)
    quantization = read_json(directory / "quantization.json") if (directory / "quantization.json").is_file() else None
    if quantization:
        tensors = _logical_tensors(tensors)
    expected, buffers = _model_layout(cfg)
    total, active, dtype_params = _count_parameters(tensors, cfg, buffers)
    info: dict[str, Any] = {
        "path": str(directory),
        "format": "moekit" + (" (quantized)" if quantization else ""),
        "architecture": f"moekit Transformer ({'MoE' if cfg.num_experts else 'dense'})",
        "dtype": max(dtype_params, key=dtype_params.get) if dtype_params else None,
        "dtypes": dtype_params,
        **config_info(cfg),
        # counted from the stored tensors (equal to the config's counts for a consistent checkpoint)
        "parameters": total,
        "active_parameters": active,
        **files_info(directory, files, tensors),
        "metadata": metadata,
        "warnings": _consistency_warnings(tensors, expected, total, cfg.param_counts()[0]),
    }
    return info


def _logical_tensors(tensors: dict[str, tuple[str, tuple[int, ...]]]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """A quantized checkpoint's tensors as the weights they stand for (``moekit.quant``'s layout):
    ``X.qweight`` int8 [.., N, K] -> X as "int8"; uint8 [.., N, K/2] -> X [.., N, K] as "int4"; the
    ``.scales`` / ``.zeros`` beside them are part of X."""
    out = {}
    for name, (dtype, shape) in tensors.items():
        if name.endswith((".scales", ".zeros")):
            continue
        if name.endswith(".qweight"):
            if dtype.upper() in ("I8", "INT8"):
                out[name[:-len(".qweight")]] = ("int8", shape)
            else:
                out[name[:-len(".qweight")]] = ("int4", (*shape[:-1], shape[-1] * 2))
        else:
            out[name] = (dtype, shape)
    return out


def _inspect_run(run: Path) -> dict[str, Any]:
    from moekit.checkpoint import find_checkpoints  # NOTE: function level, see inspect_moekit

    found = find_checkpoints(run)
    if not found:
        raise CheckpointError(f"run directory {run} has no complete checkpoint yet")
    step, newest = found[-1]
    info = inspect_moekit(newest)
    info.update(run=str(run), step=step, checkpoints=[s for s, _ in found])
    return info


# --------------------------------------------------------------------------- safetensors headers
def config_info(cfg: ModelConfig) -> dict[str, Any]:
    """The shape and routing facts every format reports, from the config alone."""
    total, active = cfg.param_counts()
    info: dict[str, Any] = {"parameters": total, "active_parameters": active, "n_layers": cfg.n_layers,
                            "dim": cfg.dim, "vocab_size": cfg.vocab_size, "num_experts": cfg.num_experts}
    if cfg.num_experts:
        info.update(top_k=cfg.top_k, router=cfg.router, moe_layers=cfg.num_moe_layers,
                    expert_ffn_dim=cfg.expert_ffn_dim, num_shared_experts=cfg.num_shared_experts)
    return info


def files_info(directory: Path, files: list[Path], tensors: dict[str, Any]) -> dict[str, Any]:
    """Tensor count, sizes on disk and whether a tokenizer ships with a checkpoint directory."""
    return {"tensors": len(tensors), "weights_bytes": sum(f.stat().st_size for f in files),
            "size_bytes": sum(f.stat().st_size for f in directory.iterdir() if f.is_file()),
            "files": [f.name for f in files], "tokenizer": (directory / "tokenizer.json").is_file()}


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """``({name: (dtype, shape)}, metadata)`` from a safetensors file's header; the data is not read.

    Also checks that the file is long enough for every tensor's byte range, so a truncated download
    is reported here rather than when loading.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{path} is not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path} has a corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    tensors, end = {}, 0
    try:
        for name, entry in header.items():
            tensors[name] = (entry["dtype"], tuple(int(d) for d in entry["shape"]))
            end = max(end, int(entry["data_offsets"][1]))
    except (KeyError, TypeError, ValueError, IndexError):
        raise CheckpointError(f"{path} has a malformed safetensors header entry for {name!r}") from None
    if 8 + n + end > size:
        raise CheckpointError(f"{path} is truncated: its header describes {8 + n + end:,} bytes, the file has {size:,}")
    return tensors, metadata


def weight_files(directory: Path) -> list[Path]:
    """``model.safetensors``, or the shards named by ``model.safetensors.index.json``."""
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map", {})
        return [directory / name for name in sorted(set(weight_map.values()))]
    raise CheckpointError(f"{directory} has config.json but no model.safetensors (nor a sharded index)")


# --------------------------------------------------------------------------- counting
def _model_layout(cfg: ModelConfig) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """Shapes of every tensor ``save`` writes for this config, and which of them are buffers.

    The model is built on the meta device: shapes only, no memory and no random initialisation.
    """
    import torch

    from moekit.model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    return shapes, {name for name, _ in model.named_buffers()}


def _count_parameters(tensors: dict[str, tuple[str, tuple[int, ...]]], cfg: ModelConfig, buffers: set[str]
                      ) -> tuple[int, int, dict[str, int]]:
    """(total, active per token, parameters per dtype) over the tensors that are parameters.

    Buffers (the DeepSeek-V3 selection bias) are excluded, as in ``ModelConfig.param_counts``. Each
    stacked expert tensor counts ``top_k / E`` of its size as active; everything else is always on.
    """
    total = active = 0
    by_dtype: Counter[str] = Counter()
    for name, (dtype, shape) in tensors.items():
        if name in buffers:
            continue
        n = _numel(shape)
        total += n
        is_expert_stack = name.endswith(EXPERT_STACKS) and shape and shape[0] == cfg.num_experts
        active += n // cfg.num_experts * cfg.top_k if is_expert_stack else n
        by_dtype[SAFETENSORS_DTYPES.get(dtype, dtype)] += n
    return total, active, dict(by_dtype.most_common())


def _consistency_warnings(tensors: dict[str, tuple[str, tuple[int, ...]]], expected: dict[str, tuple[int, ...]],
                          total: int, config_total: int) -> list[str]:
    """Disagreements between config.json and the weights' headers (what ``load`` would reject)."""
    problems = []
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        problems.append(f"{len(missing)} tensors the config needs are missing, e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors the config does not use, e.g. {unexpected[:3]}")
    wrong = sorted(n for n in set(expected) & set(tensors) if expected[n] != tensors[n][1])
    if wrong:
        problems.append(f"{len(wrong)} tensors have shapes the config does not expect, e.g. {wrong[:3]}")
    if not problems and total != config_total:
        problems.append(f"the weights hold {total:,} parameters, the config implies {config_total:,}")
    return problems


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# --------------------------------------------------------------------------- helpers
def read_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None if the file does not exist."""
    return read_json(path) if path.is_file() else None


# Other spellings converters use for the keys moekit reports (e.g. ``inspect_gguf``'s).
_ALIASES = {"parameters": "params_total", "active_parameters": "params_active", "top_k": "experts_per_token"}


def _with_defaults(info: dict[str, Any], path: Path, fmt: str) -> dict[str, Any]:
    """A converter's description with moekit's common keys filled in, so every format reads alike."""
    info = dict(info)
    info.setdefault("path", str(path))
    info.setdefault("format", fmt)
    for key, alias in _ALIASES.items():
        if info.get(key) is None and info.get(alias) is not None:
            info[key] = info[alias]
    config = info.get("config")
    if isinstance(config, dict):  # the translated ModelConfig, when the converter gives it
        for key in ("n_layers", "dim", "vocab_size", "num_experts"):
            info.setdefault(key, config.get(key))
        if config.get("num_experts"):
            for key in ("top_k", "router", "expert_ffn_dim", "num_shared_experts"):
                info.setdefault(key, config.get(key))
            info.setdefault("moe_layers", ModelConfig.from_dict(config).num_moe_layers)
    return info


# --------------------------------------------------------------------------- printing
_SHOWN = {"path", "format", "run", "step", "checkpoints", "architecture", "dtype", "dtypes", "parameters",
          "active_parameters", "num_experts", "top_k", "router", "moe_layers", "expert_ffn_dim",
          "num_shared_experts", "n_layers", "dim", "vocab_size", "tensors", "size_bytes", "weights_bytes",
          "files", "tokenizer", "warnings", "metadata", "config", *_ALIASES.values()}


def format_info(info: dict[str, Any]) -> str:
    """Aligned human-readable lines for an :func:`inspect_checkpoint` result (any format's keys)."""
    rows: list[tuple[str, str]] = [("path", str(info.get("path", "?"))), ("format", str(info.get("format", "?")))]
    if "run" in info:
        steps = info.get("checkpoints", [])
        rows.append(("checkpoint", f"step {info.get('step')} (newest of {len(steps)}: {steps})"))
    if info.get("architecture"):
        rows.append(("architecture", str(info["architecture"])))
    shape = [f"{label} {info[k]}" for k, label in (("n_layers", "layers"), ("dim", "dim"), ("vocab_size", "vocab"))
             if info.get(k) is not None]
    if shape:
        rows.append(("shape", ", ".join(shape)))
    rows += _dtype_rows(info) + _parameter_rows(info) + _expert_rows(info)
    if info.get("tensors") is not None:
        rows.append(("tensors", f"{info['tensors']:,}"))
    if info.get("size_bytes") is not None:
        weights = f" (weights {human_bytes(info['weights_bytes'])})" if info.get("weights_bytes") is not None else ""
        rows.append(("size on disk", human_bytes(info["size_bytes"]) + weights))
    if info.get("tokenizer") is not None:
        tok = info["tokenizer"]
        rows.append(("tokenizer", ("yes" if tok else "no") if isinstance(tok, bool) else str(tok)))
    for key, value in info.items():  # whatever a converter adds that we do not know about
        if key not in _SHOWN and value not in (None, "", [], {}):
            rows.append((key.replace("_", " "), _short(value)))
    rows += [("warning", w) for w in info.get("warnings") or []]
    width = max(len(label) for label, _ in rows)
    indent = "\n" + " " * (width + 2)  # a value of several lines continues under its first line
    return "\n".join(f"{label:<{width}}  {indent.join(value.splitlines()) or value}" for label, value in rows)


def _dtype_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    dtypes = info.get("dtypes")
    if isinstance(dtypes, dict) and len(dtypes) > 1:
        return [("dtypes", ", ".join(f"{d} ({human(n)} params)" for d, n in dtypes.items()))]
    return [("dtype", str(info["dtype"]))] if info.get("dtype") else []


def _parameter_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    total, active = info.get("parameters"), info.get("active_parameters")
    if total is None:
        return []
    text = f"{human(total)} total ({total:,})"
    if active is not None and total:
        text += f", {human(active)} active per token ({active / total:.1%})"
    return [("parameters", text)]


def _expert_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    if not info.get("num_experts"):
        return [("experts", "none (dense)")] if "num_experts" in info else []
    text = f"{info['num_experts']} per MoE layer"
    if info.get("moe_layers") is not None and info.get("n_layers") is not None:
        text += f" in {info['moe_layers']}/{info['n_layers']} layers"
    if info.get("top_k") is not None:
        text += f", top-{info['top_k']}"
    if info.get("router"):
        text += f", router {info['router']}"
    if info.get("expert_ffn_dim"):
        text += f", width {info['expert_ffn_dim']}"
    if info.get("num_shared_experts"):
        text += f", {info['num_shared_experts']} shared"
    return [("experts", text)]


def _short(value: Any, limit: int = 100) -> str:
    """``value`` as text, each line cut at ``limit`` characters (a cut line ends in "...")."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return "\n".join(line if len(line) <= limit else line[: limit - 3] + "..." for line in text.splitlines())
