"""Checkpoints on disk: ``save`` / ``load`` for models, and the trainer's atomic checkpoint directories.

A checkpoint is a directory holding ``config.json``, ``model.safetensors``, ``tokenizer.json``,
``README.md`` (a model card), the special tokens and chat template in the Hugging Face files
``tokenizer_config.json`` and ``generation_config.json`` (:mod:`moekit.data.special`) and, for training
runs, ``trainer_state.pt``. Training checkpoints are written into a temporary sibling directory, every
file fsynced, then renamed into place in one step, so a directory named ``step-N`` is always complete:
a crash (or SIGKILL, or a full disk) mid-write leaves only a ``.tmp-*`` directory that the next resume
removes, and the last good checkpoint intact.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moekit.config import ConfigError, ModelConfig
from moekit.data.special import read_hf_special_tokens, special_tokens_of, write_hf_special_tokens
from moekit.errors import CheckpointError  # also imported from here by older code
from moekit.model.dtypes import FLOAT_DTYPES, dtype_name, float_dtype, state_dict_as
from moekit.utils import atomic_write, atomic_write_text, disk_size, fsync_dir, plain_permissions, read_json

CHECKPOINT_FILES = ("config.json", "model.safetensors")
QUANTIZATION_FILE = "quantization.json"  # {"bits": 8 | 4, "group_size": ...} for a quantized checkpoint
_STEP_DIR = re.compile(r"^step-(\d+)$")


# --------------------------------------------------------------------------- model weights
def model_state(model: torch.nn.Module, dtype: torch.dtype | str | None = None) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers, contiguous and untied (safetensors refuses shared memory), in
    ``dtype`` when given ("bf16", "f16", "f32"; :func:`moekit.model.dtypes.state_dict_as`)."""
    return {k: v.contiguous() for k, v in state_dict_as(model, dtype).items()}


def _write_model_files(model, tokenizer, directory: Path, card: str | None,
                       dtype: torch.dtype | str | None = None, state: dict[str, torch.Tensor] | None = None) -> None:
    """``state``: the weights to write instead of the model's own (a distributed run's gathered full tensors)."""
    cfg: ModelConfig = model.cfg
    atomic_write_text(directory / "config.json", cfg.to_json())
    settings = getattr(model, "quantization", None)
    if settings and state is None:  # weight-only int8/int4 (moekit.quant): the scales travel beside each quantized weight
        from moekit.quant import quantized_state

        state = quantized_state(model)
        atomic_write_text(directory / QUANTIZATION_FILE, json.dumps(settings, indent=2) + "\n")
    else:
        state = model_state(model, dtype) if state is None else state
        if (directory / QUANTIZATION_FILE).exists():
            (directory / QUANTIZATION_FILE).unlink()
    atomic_write(directory / "model.safetensors",
                 lambda tmp: save_file(state, tmp, metadata={"format": "pt", "moekit": "1"}))
    if tokenizer is not None:
        atomic_write(directory / "tokenizer.json", lambda tmp: tokenizer.save(tmp))
    write_hf_special_tokens(directory, special_tokens_of(model, tokenizer), tokenizer, cfg.max_seq_len)
    atomic_write_text(directory / "README.md", card if card is not None else model_card(cfg))


SAVE_FORMATS = ("moekit", "hf", "gguf")


def output_format(path: str | os.PathLike, format: str | None = None) -> str:
    """The format written at ``path``: ``format``, or "gguf" for a name ending in ``.gguf`` and "moekit"
    otherwise. :func:`load`, ``moekit info`` and llama.cpp know a GGUF file by that extension, so a GGUF
    file without it, or a directory with it, is a ConfigError that says what to write instead."""
    is_gguf = Path(path).suffix.lower() == ".gguf"
    if format is None:
        return "gguf" if is_gguf else "moekit"
    if format not in SAVE_FORMATS:
        raise ConfigError(f"format {format!r} is not supported; choose one of {', '.join(SAVE_FORMATS)}")
    if format == "gguf" and not is_gguf:
        raise ConfigError(f"a GGUF file's name must end in .gguf (that is how moekit and llama.cpp recognise it): "
                          f"write {Path(path)}.gguf instead of {path}")
    if format != "gguf" and is_gguf:
        raise ConfigError(f"format {format!r} writes a directory, but {path} ends in .gguf, the extension of GGUF "
                          "files: name the directory without it, or write GGUF")
    return format


def save(model, tokenizer, path: str | os.PathLike, format: str | None = None, card: str | None = None,
         **options: Any) -> Path:
    """Write ``model`` (and ``tokenizer``, may be None) at ``path``.

    ``format``: "moekit" (checkpoint directory), "hf" (a directory ``transformers`` loads; options go to
    :func:`moekit.convert.hf.save_hf`) or "gguf" (a file llama.cpp runs; options go to
    :func:`moekit.convert.gguf.save_gguf`); None: from the extension (:func:`output_format`).
    ``dtype``: the storage dtype of moekit and hf outputs, "bf16" | "f16" | "f32" (default: the model's
    own); the tensor type of gguf ones, "f32" | "f16" | "q8_0" | "q4_0" (default f32).
    """
    format = output_format(path, format)
    if format == "hf":
        from moekit.convert.hf import save_hf

        return save_hf(model, tokenizer, path, **options)
    if format == "gguf":
        from moekit.convert.gguf import save_gguf

        return save_gguf(model, tokenizer, path, **options)
    dtype = options.pop("dtype", None)
    if options:
        raise TypeError(f"save(format='moekit') takes no options {sorted(options)}; it takes card and dtype")
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    _write_model_files(model, tokenizer, directory, card, dtype)
    return directory


# --------------------------------------------------------------------------- conversion
@dataclass
class Conversion:
    """What :func:`convert_checkpoint` wrote."""

    path: Path
    format: str  # "moekit" | "hf" | "gguf"
    dtype: str  # storage dtype ("bf16") or GGUF tensor type ("q4_0")
    size_bytes: int  # on disk: the file, or every file in the directory
    cfg: ModelConfig


def source_dtype(path: str | os.PathLike) -> str:
    """The storage dtype a conversion of ``path`` keeps by default, read from headers only.

    A moekit or Hugging Face checkpoint: the dtype most of its parameters are stored in. A GGUF file:
    f32, f16 or bf16 when its matrices are stored so; "bf16" when they are quantized (Q4_1, Q8_0, ...):
    only f32 holds the dequantized values exactly, at twice the size; bf16 is the dtype such models are
    trained and published in, and its rounding (logits within 0.5% for SmolLM2-135M Q4_1) is far below
    the quantization's. f16 rounds 5x less but can overflow when the model runs in it.
    """
    from moekit.convert.inspect import inspect_checkpoint

    info = inspect_checkpoint(path)
    if info["format"] == "gguf":
        types = set(info.get("tensor_types") or {})
        if types - {"F32", "F16", "BF16", "F64"}:
            return "bf16"
        return next((name for t, name in (("BF16", "bf16"), ("F16", "f16")) if t in types), "f32")
    try:
        return dtype_name(float_dtype(info.get("dtype") or "f32"))
    except ConfigError:  # integer weights (a quantized moekit checkpoint): as for quantized GGUF
        return "bf16"


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, format: str | None = None, *,
                       dtype: str | None = None, gguf_type: str | None = None, overwrite: bool = False) -> Conversion:
    """``moekit convert``: read ``src`` (anything :func:`load` reads) and write it at ``dst``.

    The format is ``format``, or follows ``dst``'s extension (:func:`output_format`). ``dtype`` ("bf16",
    "f16", "f32") is the storage dtype of moekit and hf outputs, default the source's (:func:`source_dtype`);
    ``gguf_type`` ("f32", "f16", "q8_0", "q4_0"; default f16) that of a GGUF file. Giving one for the
    other kind of output, or a ``dst`` that exists without ``overwrite``, is a ConfigError (in the CLI's
    flag names) before anything is read.
    """
    from moekit.convert.gguf import EXPORT_DTYPES, check_export_dtype

    fmt = output_format(dst, format)
    if fmt == "gguf" and dtype is not None:
        raise ConfigError(f"--dtype sets the dtype of moekit and hf outputs; a GGUF file's tensor type is "
                          f"--gguf-type ({', '.join(EXPORT_DTYPES)})")
    if fmt != "gguf" and gguf_type is not None:
        raise ConfigError(f"--gguf-type applies to GGUF output (DST ending in .gguf); {fmt} output takes "
                          f"--dtype ({', '.join(FLOAT_DTYPES)})")
    if Path(dst).exists() and not overwrite:
        raise ConfigError(f"{dst} already exists; pass --overwrite to replace it")
    if fmt == "gguf":
        stored = gguf_type or "f16"
        check_export_dtype(stored)
        # A quantized source keeps its integers in a quantized file: int4 groups of 32 -> Q4_1 (the
        # zero point rounded to float16 m) and int8 -> Q8_0 (moekit.convert.gguf); float files are
        # written from float.
        model, tokenizer = load(src, quantized=stored in ("q8_0", "q4_0"))
        if tokenizer is None:
            raise ConfigError(f"{src} has no tokenizer; GGUF files must carry one")
    else:
        target = float_dtype(dtype if dtype is not None else source_dtype(src))
        stored = dtype_name(target)
        model, tokenizer = load(src, dtype=target, quantized=False)  # read straight into it: no float32 copy
    out = save(model, tokenizer, dst, format=fmt, dtype=stored)
    return Conversion(out, fmt, stored, disk_size(out), model.cfg)


def detect_format(path: str | os.PathLike) -> tuple[str, Path]:
    """("moekit" | "hf" | "gguf", resolved path). A run directory resolves to its newest checkpoint."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            return "gguf", p
        raise CheckpointError(f"{p} is a file but not a .gguf; give a checkpoint directory or a .gguf file")
    if not (p / "model.safetensors").exists() and (p / "checkpoints").is_dir():
        found = find_checkpoints(p)
        if not found:
            raise CheckpointError(f"run directory {p} has no complete checkpoint yet")
        p = found[-1][1]
    config = p / "config.json"
    if not config.exists():
        raise CheckpointError(f"{config} is missing: not a moekit, Hugging Face or run directory")
    return ("hf" if "model_type" in read_json(config) else "moekit"), p


def load(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         quantized: bool = True):
    """Load ``(model, tokenizer)`` from a moekit checkpoint or run directory, a Hugging Face directory
    or a ``.gguf`` file (tokenizer None if the checkpoint has none). Quantized weights (a ``moekit quantize``
    checkpoint; Q4_0/Q4_1/Q8_0 GGUF tensors) stay quantized unless ``quantized=False`` (float, e.g. to
    train or convert). The model is in eval mode and carries
    ``model.special_tokens`` (:class:`moekit.data.special.SpecialTokens`, from the checkpoint's metadata)
    and ``model.chat_template`` (the same template, or None)."""
    fmt, directory = detect_format(path)
    if fmt == "hf":
        from moekit.convert.hf import load_hf

        return load_hf(directory, dtype=dtype, device=device)
    if fmt == "gguf":
        from moekit.convert.gguf import load_gguf_compact

        model, tokenizer = load_gguf_compact(directory, dtype=dtype or torch.float32, keep_quantized=quantized)
        return model.to(device), tokenizer
    from moekit.model import Transformer

    cfg = read_model_config(directory)
    if (directory / QUANTIZATION_FILE).exists():
        model = _load_quantized(directory, cfg)
    else:
        model = Transformer(cfg)
        load_weights(model, directory / "model.safetensors")
    tokenizer = None
    if (directory / "tokenizer.json").exists():
        from moekit.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(directory / "tokenizer.json")
    model.special_tokens = read_hf_special_tokens(directory, tokenizer)
    model.chat_template = model.special_tokens.chat_template
    if getattr(model, "quantization", None) and not quantized:
        from moekit.quant import dequantize_model

        dequantize_model(model)
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device).eval(), tokenizer


def _load_quantized(directory: Path, cfg: ModelConfig):
    """A quantized checkpoint: the model is built on the meta device, then filled from the file
    (never materialised in float)."""
    from moekit.model import Transformer
    from moekit.quant import QuantizationError, load_quantized_model

    settings = read_json(directory / QUANTIZATION_FILE)
    path = directory / "model.safetensors"
    state = read_weights_file(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    try:
        return load_quantized_model(model, state, settings, str(path))
    except QuantizationError as e:
        raise CheckpointError(str(e)) from None


def read_model_config(directory: Path) -> ModelConfig:
    path = directory / "config.json"
    if not path.exists():
        raise CheckpointError(f"{path} is missing: not a moekit checkpoint directory")
    try:
        return ModelConfig.from_json(path)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; a CheckpointError naming the file if it is missing or corrupt."""
    if not path.exists():
        raise CheckpointError(f"{path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is corrupt or truncated ({e}); use an earlier checkpoint") from None


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load safetensors weights strictly; errors name the file and the offending tensor."""
    state = read_weights_file(path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                  f"the config expects {tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=True)


def model_card(cfg: ModelConfig, info: dict[str, Any] | None = None) -> str:
    """A short README.md: what the model is, what it was trained on, how far, how well."""
    from moekit.summary import describe_config, human

    info = info or {}
    total, active = cfg.param_counts()
    lines = [
        "# moekit checkpoint", "",
        describe_config(cfg).replace("\n", "  \n"), "",
        "| | |", "|---|---|",
        f"| parameters (total) | {total:,} ({human(total)}) |",
        f"| parameters (active per token) | {active:,} ({human(active)}) |",
    ]
    for key, label in (("data", "training data"), ("step", "optimizer steps"), ("tokens", "tokens seen"),
                       ("train_loss", "train loss"), ("val_loss", "validation loss (nats/token)"),
                       ("val_bpb", "validation bits per byte"), ("elapsed_s", "training time (s)")):
        if info.get(key) is not None:
            value = info[key]
            value = f"{value:,}" if isinstance(value, int) else (f"{value:.4f}" if isinstance(value, float) else value)
            lines.append(f"| {label} | {value} |")
    lines += ["", "Load it with `moekit.load(path)`; generate with `moekit generate PATH --prompt ...`.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- training checkpoints
def find_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first: ``[(step, path), ...]``."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir() and all((child / f).exists() for f in (*CHECKPOINT_FILES, "trainer_state.pt")):
            found.append((int(m.group(1)), child))
    return sorted(found)


def remove_partial_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Delete ``.tmp-*`` leftovers of interrupted checkpoint writes; returns what was removed."""
    root = Path(run_dir) / "checkpoints"
    removed = []
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(".tmp-"):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    return removed


def save_checkpoint(run_dir: str | os.PathLike, step: int, model, tokenizer, trainer_state: dict[str, Any],
                    card_info: dict[str, Any] | None = None, keep_last: int = 2,
                    state: dict[str, torch.Tensor] | None = None) -> Path:
    """Atomically write ``checkpoints/step-N`` and prune all but the newest ``keep_last``.

    ``state``: the weights to write in place of ``model``'s (a distributed run's full tensors).

    Plan: 1. write every file into ``checkpoints/.tmp-step-N-*``; 2. fsync them; 3. rename the
    directory to ``step-N`` (atomic on POSIX) and fsync the parent; 4. only then prune old ones.
    A disk-full error removes the temporary directory and says which checkpoint is still good.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step}-", dir=root))
    plain_permissions(tmp, directory=True)
    try:
        _write_model_files(model, tokenizer, tmp, model_card(model.cfg, card_info), state=state)
        atomic_write(tmp / "trainer_state.pt", lambda p: torch.save(trainer_state, p))
        fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. an extended run's final save)
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        good = find_checkpoints(run_dir)
        last = f"{good[-1][1]} is intact" if good else "no earlier checkpoint exists"
        if e.errno == errno.ENOSPC:
            raise CheckpointError(f"disk full while saving checkpoint step-{step} in {root}; {last}. "
                                  "Free some space and continue with --resume.") from None
        raise CheckpointError(f"could not save checkpoint step-{step} in {root}: {e}; {last}") from None
    for _, old in find_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(directory: Path) -> dict[str, Any]:
    path = directory / "trainer_state.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        raise CheckpointError(f"{path} is corrupt or unreadable ({type(e).__name__}: {e})") from None

