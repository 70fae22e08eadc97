"""Expert offloading: run a model whose expert weights do not fit in memory.

Legend: E experts per layer, N resident experts per layer (cache slots), D model dim, F expert FFN dim.

The expert weights stay memory-mapped in the checkpoint's ``model.safetensors``: each expert is a view
on the file, read only when the router picks it. Each MoE layer keeps at most N experts in
preallocated slots (one ``w1 [2F, D]``, ``w2 [D, F]`` pair each); a miss copies the expert's slices
from the file into the least recently used slot (bytes copied = bytes read). Quantized checkpoints (int8/int4)
work the same way, one expert converted to the kernels' layout on each miss; a float checkpoint loaded
with ``bits`` (``serve --bits``) has each expert quantized on its miss, so the slots hold int8/int4.

Why the outputs are bit-identical to the resident model: the runner's MoE plan reads expert weights
only through ``experts.get(e) -> (w1 [2F, D], w2 [D, F])`` (:class:`moekit.infer.runner.ResidentExperts`),
in one code path for every batch size. :class:`OffloadedExperts` has the same interface and returns
tensors of the same shape, strides and dtype holding the same values, so the arithmetic is the same.
The model's own forward (the training path) reads the mapped views directly; they sit wherever the
file packed them, and since MKL picks kernels by address alignment, that path copies each layer's
unaligned experts into fresh memory for the call (``moekit.model.experts._aligned``).

    model, tokenizer, offload = load_offloaded("ckpt", max_resident_experts=2)   # or expert_memory_gb=4
    engine = Engine(model, tokenizer)            # picks up model.expert_offload
    engine.generate(["ROMEO:"])
    engine.stats.offload.hit_rate, engine.stats.offload.bytes_read

Policy: least recently used, per layer. Decoding reuses a few hot experts per layer from token to
token, which LRU keeps; a prefill chunk touches most experts once, each fetched once per chunk.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moekit.config import ConfigError, ModelConfig
from moekit.errors import CheckpointError
from moekit.quant import QuantizedWeight

#: Expert weights offloading handles: the stacked tensors of ``moekit.model.experts.Experts``.
EXPERT_SUFFIXES = (".ffn.experts.gate_up_proj", ".ffn.experts.down_proj")
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class OffloadError(ConfigError):
    """An offload budget or setting that cannot work; the message names the value and the minimum."""


# --------------------------------------------------------------------------- the file
class SafetensorsFile:
    """A ``.safetensors`` file memory-mapped: :meth:`tensor` is a view on the file, nothing is read.

    Format: 8-byte little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets}}``
    (offsets relative to the end of the header), then the data. NOTE: the map is private
    (copy-on-write), so writing into a view never reaches the file; the pages read stay in the OS page
    cache, which the kernel reclaims under memory pressure (they are not the process's own memory).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                (n,) = struct.unpack("<Q", f.read(8))
                if not 2 <= n <= size - 8:
                    raise ValueError(f"header length {n} does not fit a file of {size} bytes")
                header = json.loads(f.read(n))
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else None
        except (OSError, ValueError, struct.error) as e:
            raise CheckpointError(f"{self.path} is corrupt or truncated ({e}); use an earlier checkpoint") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._start = 8 + n
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            dtype = _DTYPES.get(info.get("dtype"))
            begin, end = info["data_offsets"]
            shape = tuple(info["shape"])
            if dtype is None:
                raise CheckpointError(f"{self.path}: tensor {name!r} has dtype {info.get('dtype')!r}, which moekit "
                                      f"cannot map; expected one of {sorted(_DTYPES)}")
            if end - begin != math.prod(shape) * dtype.itemsize or self._start + end > size:
                raise CheckpointError(f"{self.path} is corrupt or truncated (tensor {name!r}); use an earlier checkpoint")
            self.entries[name] = (dtype, shape, begin, end)

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as a view on the mapped file (read from disk only when touched)."""
        dtype, shape, begin, end = self.entries[name]
        if begin == end:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self._map, dtype=dtype, count=math.prod(shape), offset=self._start + begin).view(shape)


# --------------------------------------------------------------------------- statistics
@dataclass
class LayerStats:
    """One MoE layer's expert cache: ``hits + misses`` = expert fetches."""

    hits: int = 0
    misses: int = 0
    bytes_read: int = 0  # copied from the checkpoint file into the resident buffers

    @property
    def fetches(self) -> int:
        return self.hits + self.misses


@dataclass
class OffloadStats:
    """Expert cache statistics of one engine (per MoE layer, keyed by block index, and totals)."""

    max_resident_experts: int  # per layer
    num_experts: int  # per layer
    bytes_per_expert: int  # resident (buffer) bytes of one expert
    resident_bytes: int = 0  # bytes of all resident buffers (every layer)
    layers: dict[int, LayerStats] = field(default_factory=dict)

    @property
    def hits(self) -> int:
        return sum(s.hits for s in self.layers.values())

    @property
    def misses(self) -> int:
        return sum(s.misses for s in self.layers.values())

    @property
    def fetches(self) -> int:
        return self.hits + self.misses

    @property
    def bytes_read(self) -> int:
        return sum(s.bytes_read for s in self.layers.values())

    @property
    def hit_rate(self) -> float:
        """hits / fetches (0.0 before the first fetch)."""
        return self.hits / self.fetches if self.fetches else 0.0

    def reset(self) -> None:
        """Zero the counters (e.g. after a warm-up); the cache contents stay."""
        for s in self.layers.values():
            s.hits = s.misses = s.bytes_read = 0

    def summary(self, tokens: int) -> str:
        """One line for a report: hit rate, misses, MB read, MB read per token (``tokens`` fed to the model)."""
        mb = self.bytes_read / 1e6
        return (f"experts offloaded ({self.max_resident_experts} of {self.num_experts} resident per layer): "
                f"hit rate {100 * self.hit_rate:.1f}%, {self.misses} misses of {self.fetches} fetches, "
                f"{mb:.1f} MB read, {mb / max(tokens, 1):.3f} MB/token over {tokens} tokens")


# --------------------------------------------------------------------------- the per-layer cache
def _fields(w) -> dict[str, torch.Tensor]:
    """The tensors of a float weight ({"": w}) or of a QuantizedWeight (those that are set)."""
    if isinstance(w, QuantizedWeight):
        return {f.name: getattr(w, f.name) for f in dataclasses.fields(w) if isinstance(getattr(w, f.name), torch.Tensor)}
    return {"": w}


def _nbytes(w, dtype: torch.dtype | None = None) -> int:
    """Bytes of one expert's weight (a float one counted in ``dtype`` when given)."""
    if isinstance(w, QuantizedWeight):
        return sum(t.numel() * t.element_size() for t in _fields(w).values())
    return w.numel() * (dtype or w.dtype).itemsize


def _empty_like(w, device, dtype: torch.dtype | None):
    """Fresh storage for one expert's weight: float in ``dtype``, quantized as it is. One allocation per
    slot, so each starts aligned (the int8 kernel needs 64-byte aligned rows, see moekit.quant)."""
    if isinstance(w, QuantizedWeight):
        return dataclasses.replace(w, **{f: torch.empty(t.shape, dtype=t.dtype, device=device)
                                         for f, t in _fields(w).items()})
    return torch.empty(w.shape, dtype=dtype or w.dtype, device=device)


def _copy_into(dst, w) -> None:
    if isinstance(w, QuantizedWeight):
        for f, t in _fields(w).items():
            getattr(dst, f).copy_(t)
    else:
        dst.copy_(w)


class MappedQuantizedWeight:
    """A stacked quantized weight [E, N, K] as a quantized checkpoint stores it (``name.qweight``,
    ``.scales``, ``.zeros``: views on the file). ``[e]`` converts one expert to the kernels' layout
    with :func:`moekit.quant.read_quantized`, the function loading applies to the whole stack, so
    the result is the same bits; a miss pays that conversion (int4: repacking) besides the read."""

    def __init__(self, parts: dict[str, torch.Tensor], bits: int, shape: tuple[int, ...]):
        self.parts, self.bits, self.shape = parts, bits, shape
        self.read_bytes = sum(t[0].numel() * t.element_size() for t in parts.values())

    def __getitem__(self, e: int) -> QuantizedWeight:
        from moekit.quant import read_quantized

        return read_quantized({f"w.{k}": t[e] for k, t in self.parts.items()}, "w", "an offloaded expert")


class QuantizedOnRead:
    """A stacked float weight [E, N, K] (a view on the checkpoint) that is quantized one expert at a time
    as it is read: ``[e]`` is ``QuantizedWeight.quantize(w[e], bits, group_size)``. Rows (int8) and
    groups (int4) are quantized independently, so these are the bits ``quantize_model`` gives the whole
    stack; a miss pays the quantization besides the read."""

    def __init__(self, w: torch.Tensor, bits: int, group_size: int | None):
        self.w, self.bits, self.group_size = w, bits, group_size
        self.shape = tuple(w.shape)
        self.read_bytes = w[0].numel() * w.element_size()

    def __getitem__(self, e: int) -> QuantizedWeight:
        return QuantizedWeight.quantize(self.w[e], self.bits, self.group_size)


class OffloadedExperts:
    """``get(e) -> (w1 [2F, D], w2 [D, F])`` like :class:`moekit.infer.runner.ResidentExperts`, with at
    most ``slots`` experts resident: a least-recently-used cache over stacked sources ``w1 [E, 2F, D]``,
    ``w2 [E, D, F]`` (float tensors, :class:`moekit.quant.QuantizedWeight` or
    :class:`MappedQuantizedWeight`; anything whose ``[e]`` gives one expert's weight).

    NOTE: a returned expert stays valid only until the next ``get`` (which may reuse its slot); the
    runner finishes each expert's matmuls before fetching the next (on a GPU the copy is queued after
    them on the same stream). Not thread-safe: one engine, one thread.
    """

    def __init__(self, w1_src, w2_src, slots: int, stats: LayerStats, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None):
        self.src = (w1_src, w2_src)
        self.num_experts = w1_src.shape[0]
        self.slots, self.stats = slots, stats
        first = (w1_src[0], w2_src[0])  # a template (a mapped quantized source converts expert 0 once)
        self._pairs = [tuple(_empty_like(w, device, dtype) for w in first) for _ in range(slots)]
        self._slot_of: OrderedDict[int, int] = OrderedDict()  # resident expert -> slot, least recent first
        self.read_bytes = sum(getattr(src, "read_bytes", None) or _nbytes(w) for src, w in zip(self.src, first))
        self.resident_bytes = sum(_nbytes(w) for pair in self._pairs for w in pair)

    def get(self, e: int):
        slot = self._slot_of.get(e)
        if slot is not None:
            self._slot_of.move_to_end(e)
            self.stats.hits += 1
            return self._pairs[slot]
        if not 0 <= e < self.num_experts:
            raise IndexError(f"expert {e} is not in [0, {self.num_experts})")
        if len(self._slot_of) < self.slots:
            slot = len(self._slot_of)
        else:
            _, slot = self._slot_of.popitem(last=False)
        for src, dst in zip(self.src, self._pairs[slot]):
            _copy_into(dst, src[e])
        self._slot_of[e] = slot
        self.stats.misses += 1
        self.stats.bytes_read += self.read_bytes
        return self._pairs[slot]

    def resident(self) -> list[int]:
        """Experts now resident, least recently used first."""
        return list(self._slot_of)


# --------------------------------------------------------------------------- the budget
def resident_experts_per_layer(cfg: ModelConfig, bytes_per_expert: int, max_resident_experts: int | None = None,
                               expert_memory_gb: float | None = None) -> int:
    """Experts each MoE layer keeps resident, from a count or a memory budget (GB = 10^9 bytes, all
    layers together). At least ``top_k`` (the experts one token uses in a layer); at most all of them."""
    k, E = cfg.top_k, cfg.num_experts
    layers = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
    if (max_resident_experts is None) == (expert_memory_gb is None):
        raise OffloadError("give either a number of resident experts per layer or an expert memory budget in GB "
                           "(exactly one of them)")
    if max_resident_experts is not None:
        n = max_resident_experts
        if isinstance(n, bool) or not isinstance(n, int) or n < k:
            raise OffloadError(f"resident experts per layer = {n!r} is below the minimum of top_k={k} (the experts "
                               f"one token uses in a layer); give an integer from {k} to {E}")
        return min(n, E)
    gb = expert_memory_gb
    per_expert_mb = bytes_per_expert / 1e6
    if isinstance(gb, bool) or not isinstance(gb, (int, float)) or not math.isfinite(gb) or gb <= 0:
        raise OffloadError(f"expert memory {gb!r} GB must be a number > 0; the minimum for this model is "
                           f"{k * layers * bytes_per_expert / 1e9:.4g} GB")
    n = round(gb * 1e9) // (layers * bytes_per_expert)  # whole bytes first: 5 experts' worth of GB gives 5
    if n < k:
        raise OffloadError(f"expert memory {gb:g} GB holds {n} expert{'s' if n != 1 else ''} per layer ({layers} MoE "
                           f"layers x {per_expert_mb:.3g} MB per expert); the minimum is top_k={k} experts per layer: "
                           f"{k * layers * bytes_per_expert / 1e9:.4g} GB")
    return min(n, E)


# --------------------------------------------------------------------------- the whole model
class ExpertOffload:
    """Where each MoE layer's experts live (``sources[block] = (w1 [E, 2F, D], w2 [E, D, F])``, float
    tensors or (mapped) quantized weights, typically views on the checkpoint file) and how many stay
    resident.

    :meth:`attach` gives a :class:`moekit.infer.runner.Runner` an :class:`OffloadedExperts` per MoE layer;
    :class:`moekit.infer.Engine` calls it for a model loaded by :func:`load_offloaded`.
    ``dtype``: the resident dtype of float experts (None: the source's); ``file``: the mapped checkpoint
    the sources are views of, if any.
    """

    def __init__(self, sources: dict[int, tuple], max_resident_experts: int, dtype: torch.dtype | None = None,
                 file: SafetensorsFile | None = None):
        if not sources:
            raise OffloadError("the model has no MoE layer: there are no experts to offload")
        w1, w2 = next(iter(sources.values()))
        self.num_experts = w1.shape[0]
        n = max_resident_experts
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise OffloadError(f"max_resident_experts={n!r} must be an integer from 1 to {self.num_experts}")
        self.sources, self.max_resident_experts, self.dtype, self.file = sources, min(n, self.num_experts), dtype, file
        self.bytes_per_expert = _nbytes(w1[0], dtype) + _nbytes(w2[0], dtype)  # resident

    def attach(self, runner) -> OffloadStats:
        """Replace the expert store of every MoE layer of ``runner``; returns the live statistics."""
        from moekit.infer.runner import _MoEPlan

        device = runner.model.norm.weight.device
        stats = OffloadStats(self.max_resident_experts, self.num_experts, self.bytes_per_expert)
        moe_blocks = [i for i, (_, _, ffn) in enumerate(runner.blocks) if isinstance(ffn, _MoEPlan)]
        if sorted(moe_blocks) != sorted(self.sources):
            raise OffloadError(f"the offloaded experts are for MoE blocks {sorted(self.sources)}, the model has MoE "
                               f"blocks {moe_blocks}: not the same model")
        for i in moe_blocks:
            plan = runner.blocks[i][2]
            w1, w2 = self.sources[i]
            if w1.shape[0] != plan.num_experts:
                raise OffloadError(f"block {i}: {w1.shape[0]} offloaded experts, the model has {plan.num_experts}")
            stats.layers[i] = LayerStats()
            plan.experts = OffloadedExperts(w1, w2, self.max_resident_experts, stats.layers[i], device, self.dtype)
            stats.resident_bytes += plan.experts.resident_bytes
        return stats


def load_offloaded(path: str | os.PathLike, *, max_resident_experts: int | None = None,
                   expert_memory_gb: float | None = None, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None, bits: int | None = None, group_size: int | None = None):
    """Load ``(model, tokenizer, offload)`` from a moekit checkpoint without reading the expert weights.

    Give ``max_resident_experts`` (per layer) or ``expert_memory_gb`` (all layers). Everything but the
    experts is loaded as :func:`moekit.checkpoint.load` does (``dtype``, ``device``). The experts stay
    views on the memory-mapped file: float ones as the ``Experts`` parameters (file dtype, CPU),
    quantized ones (int8/int4 checkpoints) as :class:`MappedQuantizedWeight` in a ``QuantizedExperts``;
    ``Transformer.forward`` still works, reading them through the page cache. ``model.expert_offload``
    is the returned :class:`ExpertOffload`, which :class:`moekit.infer.Engine` attaches (resident
    copies in ``dtype``). NOTE: ``model.to(...)`` would copy the full float expert weights into memory.

    ``bits`` (8 or 4, with ``group_size`` for 4) quantizes a float checkpoint on load, as
    ``quantize_model(model.float(), bits, group_size)`` does for a resident one (the rest of the model
    in float32 unless ``dtype`` says otherwise): the experts as they are read (:class:`QuantizedOnRead`),
    so the resident slots and the memory budget hold quantized experts. A checkpoint that is already
    quantized is loaded as it is.
    """
    from moekit.checkpoint import QUANTIZATION_FILE, detect_format, read_model_config
    from moekit.data.special import read_hf_special_tokens
    from moekit.model import Transformer
    from moekit.utils import read_json

    fmt, directory = detect_format(path)
    if fmt != "moekit":
        raise CheckpointError(f"expert offloading reads moekit checkpoints; {path} is a {fmt} checkpoint: convert it "
                              f"first (moekit convert {path} DIR) or load it without offloading")
    cfg = read_model_config(directory)
    if not cfg.num_experts:
        raise OffloadError(f"{directory} is a dense model (num_experts=0): there are no experts to offload")
    file = SafetensorsFile(directory / "model.safetensors")
    with torch.device("meta"):  # no memory: every tensor is replaced below
        model = Transformer(cfg)
    moe_blocks = [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]
    settings = read_json(directory / QUANTIZATION_FILE) if (directory / QUANTIZATION_FILE).exists() else None
    quantize = bits is not None and settings is None
    if quantize:
        from moekit.quant import check_settings

        check_settings(bits, group_size)
        dtype = torch.float32 if dtype is None else dtype
    if settings is None:
        sources = _float_experts(file, model)
        if quantize:
            sources = {i: tuple(QuantizedOnRead(w, bits, group_size) for w in pair) for i, pair in sources.items()}
        per_expert = sum(_nbytes(w[0], dtype) for w in sources[moe_blocks[0]])  # quantizes one expert if asked
    else:
        sources = _quantized_experts(file, model, moe_blocks, settings.get("bits"))
        per_expert = sum(_nbytes(w[0]) for w in sources[moe_blocks[0]])  # converts one expert
    n = resident_experts_per_layer(cfg, per_expert, max_resident_experts, expert_memory_gb)  # before reading more
    state = {}
    for name in file.entries:
        if name.endswith(EXPERT_SUFFIXES):
            if not quantize:  # (quantized on read: the sources hold the views)
                state[name] = file.tensor(name)  # a view on the file
        elif not name.startswith(tuple(f"layers.{i}{s}." for i in moe_blocks for s in EXPERT_SUFFIXES)):
            t = file.tensor(name)
            quant_part = name.endswith((".qweight", ".scales", ".zeros"))
            state[name] = t.to(device=device, dtype=dtype if t.is_floating_point() and not quant_part else None,
                               copy=True)
    if quantize:
        from moekit.quant import QuantizedExperts, quantize_model

        for i in moe_blocks:
            model.layers[i].ffn.experts = QuantizedExperts(*sources[i])
        model.load_state_dict(state, strict=True, assign=True)
        quantize_model(model, bits, group_size)  # the rest (experts are QuantizedExperts already: skipped)
    elif settings is None:
        model.load_state_dict(state, strict=True, assign=True)
    else:
        from moekit.quant import QuantizationError, load_quantized_model

        try:
            load_quantized_model(model, state, settings, str(file.path))
        except QuantizationError as e:
            raise CheckpointError(str(e)) from None
    tokenizer = None
    if (directory / "tokenizer.json").exists():
        from moekit.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(directory / "tokenizer.json")
    model.special_tokens = read_hf_special_tokens(directory, tokenizer)
    model.chat_template = model.special_tokens.chat_template
    offload = ExpertOffload(sources, n, dtype, file)
    model.expert_offload = offload
    return model.eval(), tokenizer, offload


def _float_experts(file: SafetensorsFile, model) -> dict[int, tuple]:
    """Check the file against the (meta) model; the experts' tensors as views on the file."""
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(file.entries)), sorted(set(file.entries) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{file.path} does not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, ref in expected.items():
        if file.entries[name][1] != tuple(ref.shape):
            raise CheckpointError(f"{file.path}: tensor {name!r} has shape {file.entries[name][1]}, "
                                  f"the config expects {tuple(ref.shape)}")
    return {i: tuple(file.tensor(f"layers.{i}{s}") for s in EXPERT_SUFFIXES)
            for i, block in enumerate(model.layers) if block.is_moe}


def _quantized_experts(file: SafetensorsFile, model, moe_blocks: list[int], bits) -> dict[int, tuple]:
    """Each MoE layer's quantized experts as :class:`MappedQuantizedWeight` s (views on the file), put
    into the (meta) model as a ``QuantizedExperts``, so that loading the rest skips them."""
    from moekit.quant import BITS, QuantizedExperts

    if bits not in BITS:
        raise CheckpointError(f"{file.path.parent}: quantization bits={bits!r} is not one of {list(BITS)}")
    parts = ("qweight", "scales") if bits == 8 else ("qweight", "scales", "zeros")
    sources = {}
    for i in moe_blocks:
        experts = model.layers[i].ffn.experts
        pair = []
        for s in EXPERT_SUFFIXES:
            name = f"layers.{i}{s}"
            missing = [f"{name}.{p}" for p in parts if f"{name}.{p}" not in file.entries]
            if missing:
                raise CheckpointError(f"{file.path}: quantized tensor {name} is missing {', '.join(missing)}")
            shape = tuple(getattr(experts, s.rsplit(".", 1)[1]).shape)
            pair.append(MappedQuantizedWeight({p: file.tensor(f"{name}.{p}") for p in parts}, bits, shape))
        model.layers[i].ffn.experts = QuantizedExperts(*pair)
        sources[i] = tuple(pair)
    return sources
