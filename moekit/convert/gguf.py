"""GGUF in and out: llama.cpp's single-file format, for the Llama family (dense and Mixtral-style MoE).

    model, tokenizer = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")    # Q4/Q8 blocks stay quantized
    save_gguf(model, tokenizer, "tiny-moe.gguf", dtype="q8_0")          # llama.cpp runs it (or q4_0, f16, f32)
    inspect_gguf("model.gguf")                                          # metadata only, no weights read

Legend: E experts, F FFN dim, D model dim, V vocabulary, H query heads, G kv heads, Dh head dim.

Layout facts (llama.cpp, ``convert_hf_to_gguf.py`` and ``src/models/llama.cpp``):

- Tensor names: ``token_embd``, ``output_norm``, ``output`` (absent when tied to the embedding),
  ``blk.{i}.attn_norm|attn_q|attn_k|attn_v|attn_output|ffn_norm`` and either the dense
  ``blk.{i}.ffn_gate|ffn_up|ffn_down`` or the MoE ``blk.{i}.ffn_gate_inp`` (router [E, D]) with
  stacked ``ffn_gate_exps|ffn_up_exps`` [E, F, D] and ``ffn_down_exps`` [E, D, F]. Older Mixtral
  files store one tensor per expert (``blk.{i}.ffn_gate.{e}``); both are read.
- GGUF lists dimensions fastest-first (``ne[0]`` is the row length), so a torch [out, in] weight is
  stored as ne = [in, out]; ``GGUFFile`` (``gguf_file.py``) hands shapes back in torch order.
- llama.cpp's ``llama`` graph rotates *adjacent* pairs (rope type NORM), while Hugging Face Llama and
  moekit rotate halves (pairs (i, i + Dh/2)). The converter therefore permutes the rows of q and k
  (``LlamaModel.permute``); :func:`unpermute_qk` undoes it on import, :func:`permute_qk` redoes it.
- MoE in the ``llama`` graph is softmax over all experts, top-k, then renormalised over the k
  (``build_moe_ffn(..., LLM_FFN_SILU, true /* norm_w */, ..., GATING_FUNC_TYPE_SOFTMAX)``): exactly
  moekit's ``router="topk"`` with ``norm_topk_prob=True``, dropless. Every layer is MoE when
  ``expert_count > 0``, and there is no shared expert, QK-norm or q/k/v bias in that graph.

Tokenizers: ``tokenizer.ggml.model == "gpt2"`` files describe a byte-level BPE (tokens already in
GPT-2's byte alphabet, merges as "a b" strings); ``tokenizer.ggml.pre`` names the split regex, mapped
here to the Hugging Face pre-tokenizer that produces the same pieces (``llm_tokenizer_bpe`` in
llama.cpp's ``src/llama-vocab.cpp``).

Special tokens (``moekit.data.special``): ``tokenizer.ggml.bos_token_id``, ``eos_token_id`` (then
``eot_token_id``, which llama.cpp also stops on), ``padding_token_id``, ``add_bos_token`` and
``tokenizer.chat_template`` become ``model.special_tokens`` on import and are written back on export.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, LlamaFileType, TokenType
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from moekit.config import ConfigError, ModelConfig
from moekit.convert import gguf_quant
from moekit.convert.gguf_file import GGUFFile, TensorInfo
from moekit.data.special import SpecialTokens, fill_missing, special_tokens_of
from moekit.errors import CheckpointError
from moekit.model.transformer import Transformer
from moekit.quant import CHUNK_VALUES, QuantizedWeight, assign_weights, quantized_weights, select_rows
from moekit.utils import atomic_write, release_free_memory

__all__ = ["EXPORT_DTYPES", "PRE_TOKENIZERS", "SUPPORTED_ARCHITECTURES", "check_export_dtype", "check_exportable",
           "gguf_pre_tokenizer_name",
           "inspect_gguf", "load_gguf", "permute_qk", "save_gguf", "unpermute_qk"]

SUPPORTED_ARCHITECTURES = ("llama",)
EXPORT_DTYPES = ("f32", "f16", "q8_0", "q4_0")

_QTYPE = {"f32": GGMLQuantizationType.F32, "f16": GGMLQuantizationType.F16, "q8_0": GGMLQuantizationType.Q8_0,
          "q4_0": GGMLQuantizationType.Q4_0}
_FILE_TYPE = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0,
              "q4_0": LlamaFileType.MOSTLY_Q4_0}
# The output projection (``output``, or ``token_embd`` when tied) is the tensor most sensitive to rounding:
# llama-quantize keeps it at Q6_K in Q4_0 files (``llama_tensor_get_type``); gguf-py cannot write K-quants,
# so a q4_0 export keeps it at Q8_0.
_HEAD_QTYPE = {"q4_0": GGMLQuantizationType.Q8_0}
# Derived data that some old files carry and llama.cpp ignores (precomputed rotary tables).
_IGNORED_TENSOR = re.compile(r"^blk\.\d+\.attn_rot_embd(\.weight)?$")


# --------------------------------------------------------------------------- q/k row permutation
def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q or k projection [n_heads * Dh, D] from rotate-half to llama.cpp's adjacent pairs.

    Within each head, rows (x_0..x_{h-1}, y_0..y_{h-1}) with h = Dh/2 become (x_0, y_0, x_1, y_1, ...),
    so llama.cpp's rotation of (2i, 2i+1) rotates what Llama rotates as (i, i+h).
    Same as ``LlamaModel.permute`` in llama.cpp's ``convert_hf_to_gguf.py`` (n_heads = G for k).
    """
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`permute_qk`: llama.cpp's adjacent-pair rows back to rotate-half."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------- tokenizer pre-splitting
# llama.cpp's split regexes per ``tokenizer.ggml.pre`` (src/llama-vocab.cpp, llm_tokenizer_bpe) and the
# Hugging Face pre-tokenizer that cuts text into the same pieces before the byte-level BPE.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _gpt2_split() -> pre_tokenizers.PreTokenizer:
    """GPT-2's regex ('s|'t|...| ?\\p{L}+| ?\\p{N}+|...), built into the ByteLevel pre-tokenizer."""
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
    """Every digit on its own ("\\p{N}"), then GPT-2's regex: SmolLM, StarCoder (as their tokenizer.json)."""
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_split()])


def _regex_split(pattern: str) -> Callable[[], pre_tokenizers.PreTokenizer]:
    """A factory for: split on ``pattern`` (matches kept as pieces), then map bytes without GPT-2's regex."""
    return lambda: pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


#: ``tokenizer.ggml.pre`` value -> pre-tokenizer factory. The first name of each kind is what export writes.
PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "gpt-2": _gpt2_split, "mpt": _gpt2_split, "olmo": _gpt2_split, "jais": _gpt2_split,
    "smollm": _digits_then_gpt2, "starcoder": _digits_then_gpt2, "refact": _digits_then_gpt2,
    "command-r": _digits_then_gpt2, "codeshell": _digits_then_gpt2, "exaone": _digits_then_gpt2,
    "minerva": _digits_then_gpt2,
    "llama-bpe": _regex_split(_LLAMA3_SPLIT), "llama3": _regex_split(_LLAMA3_SPLIT),
    "llama-v3": _regex_split(_LLAMA3_SPLIT), "dbrx": _regex_split(_LLAMA3_SPLIT),
    "smaug-bpe": _regex_split(_LLAMA3_SPLIT),
    "qwen2": _regex_split(_QWEN2_SPLIT), "stablelm2": _regex_split(_QWEN2_SPLIT),
    "deepseek-r1-qwen": _regex_split(_QWEN2_SPLIT),
}
# The Llama 3 pre-types: llama.cpp looks a whole pre-token up in the vocabulary before merging
# (``ignore_merges = true``, as ``"ignore_merges": true`` in Llama 3's tokenizer.json) and adds BOS
# unless the file says otherwise (``add_bos = true``), both in llama-vocab.cpp.
_LLAMA3_FAMILY = frozenset({"llama-bpe", "llama3", "llama-v3"})


# --------------------------------------------------------------------------- reading
def _from_f32(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def _uniform_int(meta: GGUFFile, key: str, path: Path, default: int | None = None) -> int:
    """An integer hyperparameter; llama.cpp allows per-layer arrays, accepted here when all equal."""
    value = meta.get(key, default)
    if value is None:
        raise CheckpointError(f"{path}: metadata key {key!r} is missing")
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise CheckpointError(f"{path}: {key} varies per layer ({sorted(set(value))}); moekit needs one value")
        value = value[0]
    return int(value)


def _config_from_gguf(meta: GGUFFile, tensor_shapes: dict[str, tuple[int, ...]], path: Path) -> ModelConfig:
    """Translate llama.cpp hyperparameters to a :class:`ModelConfig`, refusing what moekit cannot run."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported; "
                              f"supported: {list(SUPPORTED_ARCHITECTURES)}")
    a = arch
    if "token_embd.weight" not in tensor_shapes:
        raise CheckpointError(f"{path}: tensor 'token_embd.weight' is missing")
    _refuse_unsupported_features(meta, tensor_shapes, a, path)
    dim = _uniform_int(meta, f"{a}.embedding_length", path)
    n_heads = _uniform_int(meta, f"{a}.attention.head_count", path)
    head_dim = _uniform_int(meta, f"{a}.attention.key_length", path, dim // n_heads)
    value_dim = _uniform_int(meta, f"{a}.attention.value_length", path, head_dim)
    rot_dim = _uniform_int(meta, f"{a}.rope.dimension_count", path, head_dim)
    if not value_dim == rot_dim == head_dim:
        raise CheckpointError(f"{path}: key_length={head_dim}, value_length={value_dim}, rope.dimension_count="
                              f"{rot_dim} differ; moekit needs them equal (full rotary, same head size)")
    ffn_dim = _uniform_int(meta, f"{a}.feed_forward_length", path)
    num_experts = _uniform_int(meta, f"{a}.expert_count", path, 0)
    fields = dict(
        vocab_size=tensor_shapes["token_embd.weight"][0],
        dim=dim,
        n_layers=_uniform_int(meta, f"{a}.block_count", path),
        n_heads=n_heads,
        n_kv_heads=_uniform_int(meta, f"{a}.attention.head_count_kv", path, n_heads),
        head_dim=head_dim,
        ffn_dim=ffn_dim,
        max_seq_len=_uniform_int(meta, f"{a}.context_length", path),
        rope_theta=_from_f32(meta.get(f"{a}.rope.freq_base", 10000.0)),
        norm_eps=_from_f32(meta.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in tensor_shapes,
        num_experts=num_experts,
        top_k=_uniform_int(meta, f"{a}.expert_used_count", path, 2) if num_experts else 2,
        expert_ffn_dim=_uniform_int(meta, f"{a}.expert_feed_forward_length", path, ffn_dim),
        router="topk",
        norm_topk_prob=True,  # the llama graph renormalises the top-k softmax weights (see module doc)
    )
    try:
        return ModelConfig(**fields)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _refuse_unsupported_features(meta: GGUFFile, tensor_shapes: dict[str, tuple[int, ...]], a: str, path: Path) -> None:
    """Settings the llama graph can carry but moekit's model does not compute: refuse, never ignore."""
    scaling = meta.get(f"{a}.rope.scaling.type", "none")
    factor = meta.get(f"{a}.rope.scaling.factor", 1.0)
    if (scaling not in ("none", "") and factor not in (0.0, 1.0)) or "rope_freqs.weight" in tensor_shapes:
        raise CheckpointError(f"{path}: RoPE scaling ({scaling!r}, factor {factor}, or a rope_freqs tensor as in "
                              "Llama 3.1) is not supported by moekit yet")
    scale = meta.get(f"{a}.expert_weights_scale", 0.0)
    if scale not in (0.0, 1.0):
        raise CheckpointError(f"{path}: {a}.expert_weights_scale={scale} is not supported (moekit's topk router "
                              "does not scale expert weights)")
    attn_scale = meta.get(f"{a}.attention.scale", 0.0)
    if attn_scale != 0.0:
        raise CheckpointError(f"{path}: a custom attention scale ({attn_scale}) is not supported")


def _expected_gguf_names(cfg: ModelConfig) -> dict[str, str]:
    """moekit parameter name -> GGUF tensor name, for everything that is not a stacked expert weight."""
    names = {"embed.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = "output.weight"
    for i in range(cfg.n_layers):
        p, b = f"layers.{i}.", f"blk.{i}."
        names |= {p + "attn_norm.weight": b + "attn_norm.weight", p + "ffn_norm.weight": b + "ffn_norm.weight",
                  p + "attn.q_proj.weight": b + "attn_q.weight", p + "attn.k_proj.weight": b + "attn_k.weight",
                  p + "attn.v_proj.weight": b + "attn_v.weight", p + "attn.o_proj.weight": b + "attn_output.weight"}
        if cfg.is_moe_layer(i):
            names[p + "ffn.router.weight"] = b + "ffn_gate_inp.weight"
        else:
            names |= {p + f"ffn.{k}_proj.weight": b + f"ffn_{k}.weight" for k in ("gate", "up", "down")}
    return names


#: Rows of one file tensor inside a weight: (tensor, which matrix of a stacked tensor, row order or None).
_Segment = tuple[TensorInfo, int, "torch.Tensor | None"]


class _TensorSource:
    """Builds moekit weights from GGUF tensors a few rows at a time and records which tensors were used.

    A weight is a list of matrices (one per expert, or one), each a list of segments: ``(tensor, which
    matrix of a stacked tensor, row order or None)`` whose rows follow one another (gate then up for
    the fused experts; q and k in llama.cpp's row order, undone by the order). Rows go from the file
    into the weight's final layout (``QuantizedWeight.build``, or a float tensor) chunk by chunk, so a
    load holds the model plus one chunk, never a float copy of a quantized tensor.
    """

    def __init__(self, file: GGUFFile, dtype: torch.dtype, keep_quantized: bool = False):
        self.file, self.path, self.dtype, self.keep_quantized = file, file.path, dtype, keep_quantized
        self.used: set[str] = set()

    def tensor(self, name: str, shape: tuple[int, ...]) -> TensorInfo:
        """Tensor ``name``, after checking it has the ``shape`` the config implies."""
        t = self.file.tensors.get(name)
        if t is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing")
        if t.shape != tuple(shape):
            raise CheckpointError(f"{self.path}: tensor {name!r} has shape {t.shape}, the file's hyperparameters "
                                  f"imply {tuple(shape)}")
        self.used.add(name)
        return t

    def experts(self, block: str, kind: str, shape_EXY: tuple[int, ...]) -> list[list[_Segment]]:
        """Expert weight ``ffn_{kind}_exps`` [E, X, Y] as one matrix per expert, or the legacy
        per-expert tensors ``ffn_{kind}.{e}`` of older Mixtral files."""
        stacked = f"{block}ffn_{kind}_exps.weight"
        if stacked in self.file.tensors or f"{block}ffn_{kind}.0.weight" not in self.file.tensors:
            t = self.tensor(stacked, shape_EXY)
            return [[(t, e, None)] for e in range(shape_EXY[0])]
        return [[(self.tensor(f"{block}ffn_{kind}.{e}.weight", shape_EXY[1:]), 0, None)] for e in range(shape_EXY[0])]

    def kind(self, matrices: list[list[_Segment]]) -> str | None:
        """"int4" (every segment Q4_0/Q4_1) or "int8" (every segment Q8_0) when kept quantized; None: float."""
        types = {t.qtype for segments in matrices for t, _, _ in segments}
        if not self.keep_quantized or matrices[0][0][0].shape[-1] % 32:
            return None
        if types <= set(gguf_quant.INT4_TYPES):
            return "int4"
        return "int8" if types == {GGMLQuantizationType.Q8_0} else None

    def weight(self, matrices: list[list[_Segment]], shape: tuple[int, ...], kind: str | None,
               keep_nibbles: bool = False) -> torch.Tensor | QuantizedWeight:
        """The weight of ``shape`` [.., R, K] from ``matrices``: quantized as ``kind`` says, else float."""
        try:
            return self._weight(matrices, shape, kind, keep_nibbles)
        finally:
            # NOTE: the chunks' temporaries (a few MB) and the weights kept are allocated in turn, so the
            # freed temporaries end up as holes between weights that glibc keeps (measured: +35% of the
            # model at the peak); handing them back after each weight keeps the peak near the model.
            release_free_memory()

    def _weight(self, matrices: list[list[_Segment]], shape: tuple[int, ...], kind: str | None,
                keep_nibbles: bool) -> torch.Tensor | QuantizedWeight:
        read = self._read
        if kind == "int4":
            return QuantizedWeight.build(4, shape, lambda m, a, b: read(matrices[m], a, b, gguf_quant.int4_rows),
                                         group_size=32, keep_nibbles=keep_nibbles)
        if kind == "int8":
            per_row = self._row_scales(matrices, shape[-2])
            if per_row is not None:
                return QuantizedWeight.build(8, shape, lambda m, a, b: (
                    read(matrices[m], a, b, lambda raw, _: gguf_quant.int8_rows(raw)[:1])[0], per_row[m, a:b]))
            return QuantizedWeight.build(8, shape, lambda m, a, b: read(matrices[m], a, b,
                                                                        lambda raw, _: gguf_quant.int8_rows(raw)),
                                         group_size=32)
        R, K = (shape[-2], shape[-1]) if len(shape) > 1 else (1, shape[0])
        out = torch.empty(len(matrices), R, K, dtype=self.dtype)
        step = max(1, CHUNK_VALUES // K)
        for m, segments in enumerate(matrices):
            for a in range(0, R, step):
                b = min(R, a + step)
                out[m, a:b] = read(segments, a, b, lambda raw, qtype: (self._float_rows(raw, qtype, K),))[0]
        return out.reshape(shape)

    def _float_rows(self, raw: np.ndarray, qtype: GGMLQuantizationType, K: int) -> torch.Tensor:
        try:
            return gguf_quant.float_rows(raw, qtype, K)
        except NotImplementedError:
            raise CheckpointError(f"{self.path}: a tensor is stored as {qtype.name}, which the gguf package cannot "
                                  "dequantise") from None

    def _read(self, segments: list[_Segment], start: int, stop: int, decode: Callable) -> tuple[torch.Tensor, ...]:
        """Rows [start, stop) of one matrix, each segment's raw rows passed through ``decode(raw, qtype)``
        (which returns a tuple of per-row tensors), joined along the rows."""
        pieces, first = [], 0
        for t, j, order in segments:
            n = t.shape[-2] if len(t.shape) > 1 else 1
            lo, hi = max(start, first) - first, min(stop, first + n) - first
            if lo < hi:
                if order is None:
                    raw = self.file.read_rows(t, j * n + lo, j * n + hi)
                else:  # the rows are a local permutation (within heads): read their span, then reorder
                    idx = order[lo:hi]
                    low, high = int(idx.min()), int(idx.max()) + 1
                    raw = self.file.read_rows(t, j * n + low, j * n + high)[(idx - low).numpy()]
                pieces.append(decode(raw, t.qtype))
            first += n
        return pieces[0] if len(pieces) == 1 else tuple(torch.cat(p) for p in zip(*pieces))

    def _row_scales(self, matrices: list[list[_Segment]], R: int) -> torch.Tensor | None:
        """Q8_0 matrices whose rows each have one scale (see ``gguf_quant.row_scale``): those scales
        [matrices, R] (bfloat16); None as soon as one row does not."""
        out = torch.empty(len(matrices), R, dtype=torch.bfloat16)
        step = max(1, CHUNK_VALUES // matrices[0][0][0].row_bytes)
        for m, segments in enumerate(matrices):
            for a in range(0, R, step):
                b = min(R, a + step)
                scale = gguf_quant.row_scale(self._read(segments, a, b, lambda raw, _: gguf_quant.int8_rows(raw)[1:])[0])
                if scale is None:
                    return None
                out[m, a:b] = scale
        return out


def _state_from_gguf(source: _TensorSource, cfg: ModelConfig, shapes: dict[str, torch.Size]
                     ) -> dict[str, torch.Tensor | QuantizedWeight]:
    """moekit state dict (``shapes``: the parameter shapes ``cfg`` gives) from GGUF tensors: renamed,
    q/k un-permuted, gate and up experts fused, each weight built in its final layout."""
    state = {}
    for name, gguf_name in _expected_gguf_names(cfg).items():
        shape = tuple(shapes[name])
        order = None
        for suffix, heads in (("q_proj.weight", cfg.n_heads), ("k_proj.weight", cfg.n_kv_heads)):
            if name.endswith(suffix):  # row i of the weight is row order[i] of the file's
                order = unpermute_qk(torch.arange(shape[0])[:, None], heads)[:, 0]
        matrices = [[(source.tensor(gguf_name, shape), 0, order)]]
        # routers select in float32 and norms are vectors: both stay float
        quantizable = len(shape) == 2 and "norm" not in name and "router" not in name
        state[name] = source.weight(matrices, shape, source.kind(matrices) if quantizable else None,
                                    keep_nibbles=name in ("embed.weight", "lm_head.weight"))  # row access
    for i in range(cfg.n_layers):
        if cfg.is_moe_layer(i):
            b, p = f"blk.{i}.", f"layers.{i}.ffn.experts."
            E, F, D = cfg.num_experts, cfg.expert_ffn_dim, cfg.dim
            gate_up = [g + u for g, u in zip(source.experts(b, "gate", (E, F, D)), source.experts(b, "up", (E, F, D)))]
            down = source.experts(b, "down", (E, D, F))
            kind = source.kind(gate_up)
            kind = kind if kind == source.kind(down) else None  # both quantized alike, or both float
            state[p + "gate_up_proj"] = source.weight(gate_up, (E, 2 * F, D), kind)  # [E, 2F, D]: gate rows, then up
            state[p + "down_proj"] = source.weight(down, (E, D, F), kind)
    unused = sorted(n for n in set(source.file.tensors) - source.used if not _IGNORED_TENSOR.match(n))
    if unused:
        raise CheckpointError(f"{source.path}: tensors moekit does not know how to use: {unused[:6]}"
                              f"{' ...' if len(unused) > 6 else ''}")
    return state


def load_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
              keep_quantized: bool = True) -> tuple[Transformer, Tokenizer | None]:
    """Load a Llama-family GGUF file as ``(model, tokenizer)``.

    With ``keep_quantized`` (the default), Q4_0 / Q4_1 weights stay 4-bit and Q8_0 weights stay int8
    with their per-block scales (``moekit.convert.gguf_quant``; ``moekit.quant`` kernels, no float
    copy), so the model needs about the file's size in memory; other tensor types are dequantised to
    ``dtype``. Tensors are read from the file straight into their final layout a chunk of rows at a
    time, and the metadata without gguf-py's reader (``moekit.convert.gguf_file``), so the load's peak
    memory stays near the model's own.

    Dense Llama files and Mixtral-style MoE files (``ffn_*_exps``) load; other architectures raise
    :class:`CheckpointError` naming the supported ones. The tokenizer is rebuilt from the file's
    metadata (None, with a warning, for tokenizer kinds moekit cannot rebuild yet). The model carries
    ``model.special_tokens`` and ``model.chat_template`` from the file's ``tokenizer.*`` metadata.
    """
    with GGUFFile(path) as file:
        path = file.path
        cfg = _config_from_gguf(file, {name: t.shape for name, t in file.tensors.items()}, path)
        # The tokenizer first: building it takes ~3x the vocabulary's final size in Python lists, freed
        # (and handed back) before the weights arrive, so that its peak and theirs do not add up.
        stated = _special_tokens_from_gguf(file)
        tokenizer = _tokenizer_from_gguf(file, path, stated)
        release_free_memory()
        with torch.device("meta"):  # shapes only: no memory, no random init for weights about to be replaced
            model = Transformer(cfg)
        expected = {name: p.shape for name, p in model.state_dict().items()}
        state = _state_from_gguf(_TensorSource(file, dtype, keep_quantized), cfg, expected)
        if any(not isinstance(v, torch.Tensor) for v in state.values()):
            assign_weights(model, state)
            weights = quantized_weights(model).values()
            model.quantization = {"bits": min(w.bits for w in weights), "source": "gguf",
                                  "group_size": 32 if any(w.group_size for w in weights) else None}
        else:
            model.load_state_dict(state, strict=True, assign=True)
    model.special_tokens = fill_missing(stated, tokenizer)
    model.chat_template = model.special_tokens.chat_template
    return model.eval(), tokenizer


def load_gguf_compact(path: str | os.PathLike, **kwargs) -> tuple[Transformer, Tokenizer | None]:
    """:func:`load_gguf`, then the heap's free pages (the last weights' chunk temporaries, the tokenizer's
    Python lists: a few MB) go back to the OS, so the process holds what the model uses."""
    model, tokenizer = load_gguf(path, **kwargs)
    release_free_memory()
    return model, tokenizer


def _special_tokens_from_gguf(meta: GGUFFile) -> SpecialTokens:
    """What the file says about its special tokens; ids outside the vocabulary are dropped (None)."""
    n_tokens = meta.length("tokenizer.ggml.tokens")

    def token_id(key: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is None or int(value) < 0 or (n_tokens and int(value) >= n_tokens):
            return None
        return int(value)

    template = meta.get("tokenizer.chat_template")
    return SpecialTokens(
        bos_id=token_id("bos_token_id"),
        eos_ids=[i for i in (token_id("eos_token_id"), token_id("eot_token_id")) if i is not None],
        pad_id=token_id("padding_token_id"),
        # llama.cpp adds BOS for the Llama 3 pre-types unless the file says otherwise (llama-vocab.cpp)
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.pre") in _LLAMA3_FAMILY)),
        chat_template=template if isinstance(template, str) else None,
    )


# --------------------------------------------------------------------------- tokenizer import
def _tokenizer_from_gguf(meta: GGUFFile, path: Path, special: SpecialTokens) -> Tokenizer | None:
    """Rebuild a byte-level BPE ``tokenizers.Tokenizer`` from ``tokenizer.ggml.*`` metadata.

    Control tokens (type 3) become special added tokens and user-defined ones (type 4) plain added
    tokens, as llama.cpp matches both whole. BOS is prepended by the post-processor only when the
    file says ``add_bos_token`` (``special.add_bos``).
    """
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        warnings.warn(f"{path}: tokenizer model {kind!r} cannot be rebuilt yet (supported: ['gpt2']); "
                      "returning no tokenizer", stacklevel=3)
        return None
    if pre not in PRE_TOKENIZERS:
        warnings.warn(f"{path}: tokenizer pre-type {pre!r} is not known to moekit (known: {sorted(PRE_TOKENIZERS)}); "
                      "returning no tokenizer", stacklevel=3)
        return None
    tokens: list[str] | None = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        warnings.warn(f"{path}: no tokenizer.ggml.tokens in the file; returning no tokenizer", stacklevel=3)
        return None
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens)
    vocab = {token: i for i, token in enumerate(tokens)}  # a repeated token keeps its last id, as in llama.cpp
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _LLAMA3_FAMILY))
    tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ttype in zip(tokens, types) if ttype == TokenType.CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ttype in zip(tokens, types) if ttype == TokenType.USER_DEFINED])
    bos = special.bos_id
    if special.add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]}:0 $A:0", pair=f"{tokens[bos]}:0 $A:0 $B:1", special_tokens=[(tokens[bos], bos)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


# --------------------------------------------------------------------------- inspection
def inspect_gguf(path: str | os.PathLike) -> dict[str, Any]:
    """What a GGUF file holds, from its metadata and tensor table alone (no tensor data is read).

    Keys: path, architecture, name, supported (and ``error`` when not), tensors, tensor_types
    ({"Q4_1": n, ...}), file_type, params_in_file, params_total / params_active (from the translated
    config's ``param_counts()``; None when unsupported), num_experts, experts_per_token, vocab_size,
    context_length, tokenizer ("gpt2/smollm"), config (dict or None).
    """
    with GGUFFile(path) as meta:
        arch = meta.get("general.architecture")
        tensors = meta.tensors.values()
        shapes = {t.name: t.shape for t in tensors}
        info: dict[str, Any] = {
            "path": str(meta.path),
            "architecture": arch,
            "name": meta.get("general.name"),
            "tensors": len(tensors),
            "tensor_types": dict(Counter(t.qtype.name for t in tensors).most_common()),
            "file_type": _file_type_name(meta.get("general.file_type")),
            "params_in_file": sum(t.n_elements for t in tensors),
            "num_experts": int(meta.get(f"{arch}.expert_count", 0) or 0),
            "experts_per_token": int(meta.get(f"{arch}.expert_used_count", 0) or 0),
            "vocab_size": meta.length("tokenizer.ggml.tokens") or None,
            "context_length": meta.get(f"{arch}.context_length"),
            "tokenizer": f"{meta.get('tokenizer.ggml.model')}/{meta.get('tokenizer.ggml.pre', 'default')}",
            "supported": True, "params_total": None, "params_active": None, "config": None,
        }
        try:
            cfg = _config_from_gguf(meta, shapes, meta.path)
        except (CheckpointError, ConfigError) as e:
            info["supported"], info["error"] = False, str(e)
            return info
    total, active = cfg.param_counts()
    info |= {"params_total": total, "params_active": active, "config": cfg.to_dict()}
    return info


def _file_type_name(file_type: int | None) -> str | int | None:
    """``general.file_type`` as llama.cpp names it ("MOSTLY_Q4_1"), or the raw number if unknown."""
    try:
        return None if file_type is None else LlamaFileType(file_type).name
    except ValueError:
        return file_type


# --------------------------------------------------------------------------- export
def check_exportable(cfg: ModelConfig) -> None:
    """Raise :class:`ConfigError` naming every setting llama.cpp's ``llama`` architecture cannot express."""
    problems = []
    if cfg.num_experts:
        if cfg.router != "topk":
            problems.append(f"router={cfg.router!r} has no llama.cpp equivalent")
        if not cfg.norm_topk_prob:
            problems.append("norm_topk_prob=False (llama.cpp renormalises the top-k weights)")
        if cfg.eval_capacity_factor is not None:
            problems.append(f"eval_capacity_factor={cfg.eval_capacity_factor} (llama.cpp never drops tokens)")
        if cfg.routed_scaling_factor != 1.0:
            problems.append(f"routed_scaling_factor={cfg.routed_scaling_factor} (the llama architecture has no expert "
                            "weight scale)")
        if cfg.num_shared_experts:
            problems.append(f"num_shared_experts={cfg.num_shared_experts}")
        if cfg.task_routing != "none":
            problems.append(f"task_routing={cfg.task_routing!r} (llama.cpp routers see only the token, not its task; "
                            "export a task's path taken out with moekit extract)")
        if cfg.first_dense_layers or cfg.moe_every != 1:
            problems.append(f"first_dense_layers={cfg.first_dense_layers}, moe_every={cfg.moe_every} "
                            "(llama.cpp makes every layer MoE)")
    if cfg.qk_norm is not None:
        problems.append(f"qk_norm={cfg.qk_norm!r}")
    if cfg.attention_bias:
        problems.append("attention_bias=True")
    if problems:
        raise ConfigError("cannot export to GGUF (llama.cpp 'llama' architecture): " + "; ".join(problems)
                          + ". Supported: dense models, or MoE with router='topk', norm_topk_prob=True, every layer "
                          "MoE, no shared experts, eval_capacity_factor=None, task_routing='none'; no qk_norm, no "
                          "attention_bias")


def _export_tensors(model: Transformer) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor in torch order) for every weight, q/k permuted, experts split into gate and up."""
    cfg = model.cfg
    params = {k: v.detach() for k, v in model.named_parameters()}
    params.update(quantized_weights(model))  # quantized weights are written as they are (see _raw_quantized)
    out = []
    for name, gguf_name in _expected_gguf_names(cfg).items():
        w = params[name]
        for suffix, heads in (("q_proj.weight", cfg.n_heads), ("k_proj.weight", cfg.n_kv_heads)):
            if name.endswith(suffix):
                if isinstance(w, torch.Tensor):
                    w = permute_qk(w, heads)
                else:
                    w = select_rows(w, permute_qk(torch.arange(w.shape[0])[:, None], heads)[:, 0])
        out.append((gguf_name, w))
    for i in range(cfg.n_layers):
        if cfg.is_moe_layer(i):
            gate_up_E2FD = params[f"layers.{i}.ffn.experts.gate_up_proj"]
            F = cfg.expert_ffn_dim
            if isinstance(gate_up_E2FD, torch.Tensor):
                gate, up = gate_up_E2FD[:, :F], gate_up_E2FD[:, F:]
            else:
                gate, up = select_rows(gate_up_E2FD, torch.arange(F)), select_rows(gate_up_E2FD, torch.arange(F, 2 * F))
            out += [(f"blk.{i}.ffn_gate_exps.weight", gate), (f"blk.{i}.ffn_up_exps.weight", up),
                    (f"blk.{i}.ffn_down_exps.weight", params[f"layers.{i}.ffn.experts.down_proj"])]
    return out


def _quantized_qtype(w: QuantizedWeight) -> GGMLQuantizationType | None:
    """The GGUF type that holds a quantized weight's integers exactly: int8 rows -> Q8_0 (the row's scale
    in every block), int8 in groups of 32 -> Q8_0 (the float16 scales are ``d``), int4 groups of 32 ->
    Q4_1 (``d`` = scale, ``m`` = zero - 8 scale); None otherwise."""
    if w.bits == 8:
        return GGMLQuantizationType.Q8_0 if w.shape[-1] % 32 == 0 and w.group_size in (None, 32) else None
    return GGMLQuantizationType.Q4_1 if w.group_size == 32 else None


def _raw_quantized(w: QuantizedWeight, qtype: GGMLQuantizationType) -> np.ndarray:
    """llama.cpp blocks (``ggml-common.h``) from a quantized weight's integers: uint8 [..., R, B * bytes]."""
    K = w.shape[-1]
    lead, B = w.shape[:-1], K // 32
    f16 = lambda t: t.to(torch.float16).numpy().view(np.uint8)  # noqa: E731 -- [..., 2] bytes after a reshape
    if qtype == GGMLQuantizationType.Q8_0:
        scale = w.scale if w.grouped_int8 else w.scale.float()[..., None].expand(*lead, B)
        d = f16(scale.reshape(-1, B, 1)).reshape(-1, B, 2)
        qs = w.int8_values().reshape(-1, B, 32).numpy().view(np.uint8)
        blocks = np.concatenate([d, qs], axis=-1)
    else:
        scale, zero = w.scales_zeros()
        d = f16(scale.reshape(-1, B, 1)).reshape(-1, B, 2)
        m = f16((zero - 8 * scale).reshape(-1, B, 1)).reshape(-1, B, 2)
        q = w.int4_values().reshape(-1, B, 32)
        qs = (q[..., :16] | (q[..., 16:] << 4)).numpy()  # weights 0-15 in the low nibbles, 16-31 high
        blocks = np.concatenate([d, m, qs], axis=-1)
    return np.ascontiguousarray(blocks.reshape(*lead, -1))


def _tensor_type(name: str, shape: tuple[int, ...], dtype: str, head: str) -> GGMLQuantizationType:
    """Storage type per tensor, as llama.cpp's converter picks it: norms (1-D) and the router stay F32;
    the output projection ``head`` is Q8_0 in a q4_0 file (``_HEAD_QTYPE``); a row length that is not a
    whole number of quantisation blocks (32 for Q8_0 and Q4_0) falls back to F16."""
    if len(shape) == 1 or name.endswith("ffn_gate_inp.weight"):
        return GGMLQuantizationType.F32
    qtype = _HEAD_QTYPE.get(dtype, _QTYPE[dtype]) if name == head else _QTYPE[dtype]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if shape[-1] % block == 0 else GGMLQuantizationType.F16


def _nbytes(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * type_size


def _write_model_metadata(writer: gguf.GGUFWriter, cfg: ModelConfig, dtype: str) -> None:
    """Hyperparameters under llama.cpp's ``llama.*`` keys (gguf-py ``Keys``)."""
    writer.add_name("moekit")
    writer.add_file_type(_FILE_TYPE[dtype])
    if dtype.startswith("q"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.expert_ffn_dim if cfg.num_experts else cfg.ffn_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    if cfg.num_experts:
        writer.add_expert_count(cfg.num_experts)
        writer.add_expert_used_count(cfg.top_k)


def _pre_tokenizer_json(pre: pre_tokenizers.PreTokenizer | None) -> Any:
    """A pre-tokenizer's JSON with ``trim_offsets`` dropped (it moves offsets, never token ids)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre
    return _drop_key(json.loads(tok.to_str())["pre_tokenizer"], "trim_offsets")


def _drop_key(obj: Any, key: str) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_key(v, key) for k, v in obj.items() if k != key}
    if isinstance(obj, list):
        return [_drop_key(v, key) for v in obj]
    return obj


def gguf_pre_tokenizer_name(tokenizer: Tokenizer) -> str:
    """The ``tokenizer.ggml.pre`` name whose split regex matches ``tokenizer``'s pre-tokenizer."""
    ours = _drop_key(json.loads(tokenizer.to_str())["pre_tokenizer"], "trim_offsets")
    for name, make in PRE_TOKENIZERS.items():
        if _pre_tokenizer_json(make()) == ours:
            return name
    raise ConfigError(f"cannot export to GGUF: the tokenizer's pre-tokenizer {json.dumps(ours)} has no llama.cpp "
                      "equivalent; supported: byte-level BPE with GPT-2's split (moekit's own), digits + GPT-2 "
                      "(SmolLM), or the Llama 3 / Qwen2 split regexes")


def _tokenizer_metadata(tokenizer: Tokenizer, vocab_size: int, special: SpecialTokens) -> dict[str, Any]:
    """``tokenizer.ggml.*`` values: tokens in id order (padded with unused ``[PAD{i}]`` up to the
    model's vocabulary, as llama.cpp's converter does), token types, merges, pre-type, and from
    ``special``: BOS/EOS/EOT/PAD ids, whether BOS is added, the chat template. Raises
    :class:`ConfigError` for a tokenizer llama.cpp cannot reproduce."""
    data = json.loads(tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise ConfigError(f"cannot export to GGUF: tokenizer model {data['model']['type']!r} is not supported; "
                          "supported: byte-level BPE")
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= vocab_size:
        raise ConfigError(f"cannot export to GGUF: the tokenizer has token id {max(vocab.values())}, beyond the "
                          f"model's vocab_size={vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [TokenType.UNUSED] * vocab_size
    for token, i in vocab.items():
        tokens[i], types[i] = token, TokenType.NORMAL
    for added in data.get("added_tokens", []):
        types[added["id"]] = TokenType.CONTROL if added["special"] else TokenType.USER_DEFINED
    ids = {"bos": special.bos_id, "eos": special.eos_id, "pad": special.pad_id,
           # llama.cpp has one more end-of-generation slot (and finds others by name): the second stop id
           "eot": special.eos_ids[1] if len(special.eos_ids) > 1 else None}
    if ids["bos"] is None:
        ids["bos"] = ids["eos"]  # GPT-2 convention: <|endoftext|> doubles as BOS (else llama.cpp guesses id 11)
    outside = {k: v for k, v in ids.items() if v is not None and not 0 <= v < vocab_size}
    if outside:
        raise ConfigError(f"cannot export to GGUF: special token ids {outside} are outside the model's "
                          f"vocab_size={vocab_size}")
    return {
        "pre": gguf_pre_tokenizer_name(tokenizer), "tokens": tokens, "types": types,
        "merges": [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]],
        **ids, "add_bos": special.add_bos, "chat_template": special.chat_template,
    }


def _write_tokenizer_metadata(writer: gguf.GGUFWriter, tok: dict[str, Any]) -> None:
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(tok["pre"])
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["types"])
    writer.add_token_merges(tok["merges"])
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("eot", writer.add_eot_token_id), ("pad", writer.add_pad_token_id)):
        if tok[key] is not None:
            add(tok[key])
    writer.add_add_bos_token(tok["add_bos"])  # always say it, or llama.cpp guesses from the pre-type
    writer.add_add_eos_token(False)
    if tok["chat_template"] is not None:
        writer.add_chat_template(tok["chat_template"])


def check_export_dtype(dtype: str) -> None:
    """Refuse a GGUF tensor type moekit cannot write, naming the ones it can (a ConfigError, a ValueError)."""
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"GGUF type {dtype!r} is not supported; supported: {', '.join(EXPORT_DTYPES)} (for "
                          "llama.cpp's other types, e.g. Q4_K_M, run llama-quantize on an f16 export)")


def save_gguf(model: Transformer, tokenizer: Tokenizer, path: str | os.PathLike, dtype: str = "f32") -> Path:
    """Write ``model`` and ``tokenizer`` as a llama.cpp ``llama`` GGUF file (atomically).

    ``dtype``: "f32", "f16", "q8_0" or "q4_0" for the matrices (norms and routers stay float32; in q4_0 the
    output projection is Q8_0; rows not a multiple of 32 long are F16). Dense models
    and Mixtral-style MoE models export; anything llama.cpp would compute differently raises
    :class:`ConfigError` first (see :func:`check_exportable`). Tensors are converted and written one
    at a time, so the file never needs a second copy of the model in memory. Special tokens and the
    chat template are the model's own (:func:`moekit.data.special.special_tokens_of`).
    """
    check_export_dtype(dtype)
    if tokenizer is None:
        raise ValueError("save_gguf needs the tokenizer: llama.cpp cannot run a GGUF file without its vocabulary")
    cfg: ModelConfig = model.cfg
    check_exportable(cfg)
    tok_meta = _tokenizer_metadata(tokenizer, cfg.vocab_size, special_tokens_of(model, tokenizer))  # refuse first
    tensors = _export_tensors(model)
    head = "output.weight" if any(name == "output.weight" for name, _ in tensors) else "token_embd.weight"
    plan = [(name, w, _tensor_type(name, tuple(w.shape), dtype, head) if isinstance(w, torch.Tensor)
             else _quantized_qtype(w) or _tensor_type(name, tuple(w.shape), dtype, head)) for name, w in tensors]

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, SUPPORTED_ARCHITECTURES[0])
        try:
            _write_model_metadata(writer, cfg, dtype)
            _write_tokenizer_metadata(writer, tok_meta)
            for name, w, qtype in plan:  # shapes in torch order; the writer reverses them to ne order
                writer.add_tensor_info(name, tuple(w.shape), np.dtype(np.float32), _nbytes(tuple(w.shape), qtype), qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for _, w, qtype in plan:  # one tensor converted at a time
                if not isinstance(w, torch.Tensor) and qtype == _quantized_qtype(w):
                    writer.write_tensor_data(_raw_quantized(w, qtype))  # the integers as they are
                    continue
                w = w if isinstance(w, torch.Tensor) else w.dequantize()
                writer.write_tensor_data(gguf.quants.quantize(w.float().cpu().contiguous().numpy(), qtype))
        finally:
            writer.close()

    path = Path(path)
    atomic_write(path, write)
    return path
