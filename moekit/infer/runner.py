"""The inference forward pass: a model's weights run over a slot KV cache, built for decoding.

Legend: S cache slots, L cache length per slot, B rows this call, T tokens per row, N = B*T tokens,
D model dim, H query heads, G kv heads, Dh head dim, K experts per token, V vocabulary;
multi-head latent attention: R latent width (``kv_lora_rank``), r rotary key width, Dn the query/key
width without rotary embedding, Dv value width.

Why a second forward pass beside ``Transformer.forward`` (which stays the training path and the
reference the tests compare against): at batch 1 and width 512 a decode step is ~40 small operations
per layer, so per-operation overhead, not arithmetic, decides the speed. This path
- fuses q/k/v and the dense gate/up projections into one matmul each;
- reads rotary cos/sin from a table built once, writes keys/values in place into a preallocated
  ``[S, G, L, Dh]`` cache where every sequence has its own slot and its own position (ragged rows);
- routes with ``Router.select`` (the eval-mode choice, no losses or statistics) and, for a handful of
  tokens, runs only the chosen experts' weight slices, one small matmul pair each, with no sort,
  bincount or index bookkeeping; larger chunks (prefill) use the training path's grouped dispatch;
- caches multi-head latent attention's latent, not per-head keys and values (see :class:`_LatentPlan`).

One copy of the weights: the runner copies none. A fused q/k/v (or gate/up) weight is one tensor
whose row blocks *are* the model's q, k and v weights: the first runner on a model concatenates them
once and points the model's parameters at the blocks (``param.data``, so the Parameter objects,
optimizers and hooks stay; quantized weights get views of the fused rows), later runners find them
already adjacent and reuse the storage. The model trains and saves as before, and an in-place update
(an optimizer step) is seen by the runner. Where the blocks cannot be views (quantized rows whose
kernel layout does not split at the block boundaries), the runner calls the model's layers one by one.
Norms, routers and expert weights are read from the model's modules.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import torch
import torch.nn.functional as F
from torch import nn

from moekit import native as _native
from moekit.config import ModelConfig
from moekit.model.layers import MLP, Attention, LatentAttention, RMSNorm, apply_rope, rope_frequencies
from moekit.model.moe import MoE
from moekit.model.transformer import Transformer
from moekit.quant import QuantizedLinear, QuantizedWeight, head_logits, linear, quantized_weights
from moekit.utils import release_free_memory

#: Up to this many tokens in one call, the MoE groups tokens by expert in Python; above it, by a sort.
SMALL_BATCH_TOKENS = 16


def _rms_norm(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.float32:  # one fused kernel; same math as RMSNorm.forward in float32
        return F.rms_norm(x, norm.weight.shape, norm.weight, norm.eps)
    return norm(x)


def cache_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of :class:`SlotCache` per cached token, all layers: keys and values of each kv head, or for
    multi-head latent attention the latent and the rotary key (one of each, shared by all heads)."""
    if cfg.attention == "mla":
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    else:
        width = 2 * cfg.n_kv_heads * cfg.head_dim
    return cfg.n_layers * width * dtype.itemsize


class SlotCache:
    """Keys and values of every layer for ``slots`` independent sequences of up to ``max_len`` tokens.

    Grouped-query attention: ``k[i]``, ``v[i]`` [S, G, L, Dh]. Multi-head latent attention: ``k[i]``
    [S, 1, L, R + r] holds the latent and the rotary key, and ``v[i]`` is a view of its first R columns.

    NOTE: ``torch.empty``: pages of slots never written are never touched, so a large cache costs
    memory only as sequences grow.
    """

    def __init__(self, model: Transformer, slots: int, max_len: int):
        c, p = model.cfg, model.norm.weight  # (the embedding may be quantized: no dtype of its own)
        self.slots, self.max_len = slots, max_len
        # Positions 0..clean[s]-1 of slot s hold finite values (written or zeroed). A batched decode reads
        # keys past a short row's end (masked out), and masked-out garbage can still be NaN: 0 * NaN = NaN.
        self.clean = [0] * slots
        new = lambda heads, width: torch.empty(slots, heads, max_len, width, dtype=p.dtype, device=p.device)  # noqa: E731
        if c.attention == "mla":
            self.k = [new(1, c.kv_lora_rank + c.qk_rope_head_dim) for _ in model.layers]
            self.v = [k[..., :c.kv_lora_rank] for k in self.k]
            self._owned = self.k
        else:
            self.k = [new(c.n_kv_heads, c.head_dim) for _ in model.layers]
            self.v = [new(c.n_kv_heads, c.head_dim) for _ in model.layers]
            self._owned = self.k + self.v

    def ensure_clean(self, slot: int, length: int) -> None:
        """Zero positions ``clean[slot] .. length - 1`` of ``slot`` in every layer (each at most once)."""
        start = self.clean[slot]
        if start < length:
            for t in self._owned:
                t[slot, :, start:length].zero_()
            self.clean[slot] = length

    def written(self, slot: int, end: int) -> None:
        self.clean[slot] = max(self.clean[slot], end)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._owned)


# --------------------------------------------------------------------------- one copy of the weights
#: The dimension of the rows (N) in each tensor of a 2-D QuantizedWeight [N, K].
_QUANT_ROW_DIM = {"q": 0, "scale": 0, "scale_zero": 1, "nibbles": 0}


def _joined(parts: list[torch.Tensor], dim: int) -> torch.Tensor | None:
    """The contiguous tensor whose consecutive slices along ``dim`` are ``parts``, if they already are
    views of one (an earlier runner fused them), else None."""
    first = parts[0]
    shape = list(first.shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    stride = torch.empty(shape, device="meta").stride()
    offset = first.storage_offset()
    for p in parts:
        if (p.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() or p.dtype != first.dtype
                or p.stride() != stride or p.storage_offset() != offset
                or p.shape[:dim] != first.shape[:dim] or p.shape[dim + 1:] != first.shape[dim + 1:]):
            return None
        offset += p.shape[dim] * stride[dim]
    return first.detach().as_strided(shape, stride, first.storage_offset())


def _concatenated(parts: list[torch.Tensor], dim: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A new tensor joining ``parts`` along ``dim``, and its slices (views) in their places."""
    fused = torch.cat([p.detach() for p in parts], dim)
    return fused, list(fused.split([p.shape[dim] for p in parts], dim))


def _share_params(params: list[torch.Tensor]) -> torch.Tensor | None:
    """One tensor whose row blocks are ``params``, which become views of it (``p.data = block``: the same
    Parameter objects, so optimizers, hooks and in-place updates act on the one copy). None if they
    cannot be joined (different dtypes, devices or widths)."""
    if len({(p.dtype, p.device, tuple(p.shape[1:])) for p in params}) != 1:
        return None
    joined = _joined(params, 0)
    if joined is not None:
        return joined
    # NOTE: normal tensors even when the runner is built under inference_mode: the model trains on them.
    with torch.inference_mode(False), torch.no_grad():
        fused, blocks = _concatenated(params, 0)
        for p, block in zip(params, blocks):
            p.data = block
    return fused


@functools.cache
def _int4_row_blocks_of_64_pack_apart(K: int) -> bool:
    """Whether PyTorch's int4 CPU layout packs rows in independent blocks of 64, so that packing row
    blocks of a multiple of 64 one by one and concatenating gives the layout of the concatenation. The
    layout is PyTorch's private one (see moekit.quant), so it is checked on a probe, once per width."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, 16, (n, K), generator=gen, dtype=torch.int32) for n in (64, 16))
    pack = lambda w: torch.ops.aten._convert_weight_to_int4pack_for_cpu(w, 1)  # noqa: E731
    try:
        return torch.equal(pack(torch.cat([a, b])), torch.cat([pack(a), pack(b)]))
    except RuntimeError:
        return False


def _share_quantized(layers: list[QuantizedLinear]) -> QuantizedWeight | None:
    """A quantized weight whose row blocks are the layers' weights, which become views of it (each
    layer gets a new QuantizedWeight over the same rows). None where the kernels cannot run a block of
    the fused tensors: int8 rows of a block must start 64-byte aligned (see ``QuantizedWeight.from_int8``),
    int4 blocks must pack apart (every block but the last a multiple of 64 rows)."""
    ws = [m.qweight for m in layers]
    if not all(isinstance(w, QuantizedWeight) and len(w.shape) == 2 for w in ws):
        return None
    if len({(w.bits, w.group_size, w.shape[1], w.q.dtype, w.q.device) for w in ws}) != 1:
        return None
    first, rows = ws[0], [w.shape[0] for w in ws]
    shape = (sum(rows), first.shape[1])
    names = [f for f in _QUANT_ROW_DIM if all(getattr(w, f) is not None for w in ws)]  # nibbles: if all keep them
    unshared = {} if "nibbles" in names else {"nibbles": None}
    joined = {f: _joined([getattr(w, f) for w in ws], _QUANT_ROW_DIM[f]) for f in names}
    if all(j is not None for j in joined.values()):
        return dataclasses.replace(first, shape=shape, **joined, **unshared)
    packed = first.scale_zero is not None  # int4, and grouped int8 (two nibble planes in the int4 layout)
    if packed and not (all(n % 64 == 0 for n in rows[:-1]) and _int4_row_blocks_of_64_pack_apart(shape[1])):
        return None
    fused, blocks = {}, {}
    for f in names:
        fused[f], blocks[f] = _concatenated([getattr(w, f) for w in ws], _QUANT_ROW_DIM[f])
    if not packed and any(b.data_ptr() % 64 for b in blocks["q"]):
        return None
    for i, (layer, w) in enumerate(zip(layers, ws)):
        layer.qweight = dataclasses.replace(w, **{f: blocks[f][i] for f in names})
    return dataclasses.replace(first, shape=shape, **fused, **unshared)


def _fuse(layers: list[nn.Module]) -> tuple[torch.Tensor | QuantizedWeight, torch.Tensor | None] | None:
    """(weight, bias) of the layers stacked along their outputs, sharing the layers' storage (see the
    module doc); None where that cannot be done without a copy: the caller runs the layers one by one."""
    if all(isinstance(m, nn.Linear) for m in layers):
        weight = _share_params([m.weight for m in layers])
    elif all(isinstance(m, QuantizedLinear) for m in layers):
        weight = _share_quantized(layers)
    else:
        return None
    # NOTE: the originals a fusion replaced are free now; hand their pages back before the next layer's
    # fusion allocates, so that building an engine never holds two copies of the weights at once
    # (SmolLM2 Q4_1: load + 8 tokens peaked at 1.61x the file without this; benchmarks/gguf_load_memory.py)
    release_free_memory()
    biases = [m.bias for m in layers]
    if weight is None or (any(b is None for b in biases) and not all(b is None for b in biases)):
        return None
    if biases[0] is None:
        return weight, None
    bias = _share_params(biases)
    return None if bias is None else (weight, bias)


def _signature(model: nn.Module) -> list:
    """Every parameter, buffer and quantized weight of ``model``: identity, address, dtype, device.
    A runner built on the model stays valid while this is unchanged (see :meth:`Runner.is_current`)."""
    sig = [(name, id(t), t.data_ptr(), t.dtype, t.device)
           for name, t in itertools.chain(model.named_parameters(), model.named_buffers())]
    for name, w in quantized_weights(model).items():
        tensors = [getattr(w, f.name) for f in dataclasses.fields(w)] if dataclasses.is_dataclass(w) else []
        sig.append((name, id(w), *(t.data_ptr() for t in tensors if isinstance(t, torch.Tensor))))
    return sig


# --------------------------------------------------------------------------- projections
class _Lin:
    """One projection ``x @ w.T + b``: the PyTorch reference (:func:`moekit.quant.linear`), or, with the
    native kernels (:mod:`moekit.native`), those for the few rows of a decode step (up to
    ``native.MAX_ROWS``), and for a quantized weight's longer chunks (prefill) one dequantization to
    float32 and a float32 GEMM, which beats the per-row kernels there."""

    def __init__(self, weight, bias: torch.Tensor | None, native: bool):
        self.weight, self.bias = weight, bias
        self.nw = _native.native_weight(weight, bias) if native else None
        self.quantized = isinstance(weight, QuantizedWeight)

    @classmethod
    def of(cls, module: nn.Module, native: bool) -> _Lin:
        weight = module.qweight if isinstance(module, QuantizedLinear) else module.weight.detach()
        return cls(weight, module.bias, native)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if (self.nw is not None and self.nw.kind == _native.KINDS["bfloat16"] and x.dtype == torch.bfloat16
                and x.numel() <= _native.MAX_ROWS * x.shape[-1]):
            # a bfloat16 model: float32 activations into the kernel (each weight widened exactly), bfloat16 out
            y = _native.kernels().linear(x.reshape(-1, x.shape[-1]).float(), self.nw)
            return y.to(torch.bfloat16).view(*x.shape[:-1], self.nw.shape[0])
        if self.nw is not None and x.dtype == torch.float32:
            x2 = x.reshape(-1, x.shape[-1])
            kern = _native.kernels()
            if x2.shape[0] <= _native.MAX_ROWS:
                return kern.linear(x2, self.nw).view(*x.shape[:-1], self.nw.shape[0])
            if self.quantized:
                return F.linear(x, kern.dequantize(self.nw), self.bias)
        return linear(x, self.weight, self.bias)


# --------------------------------------------------------------------------- attention
class _AttnPlan:
    """One grouped-query attention layer: q/k/v as one matmul over the fused weight (the model's own
    q/k/v weights are its row blocks), the attention norm's weight applied by the fused ``rms_norm``.

    Rotary embedding for queries and keys together is one complex multiply on (i, i + Dh/2) pairs; its
    output puts each pair side by side (rows 0, Dh/2, 1, Dh/2 + 1, ... of each head), the same fixed
    permutation for queries and keys, so attention scores are unchanged (the cache holds keys in that
    order). Values are untouched.
    """

    mla = False

    def __init__(self, attn: Attention, norm: RMSNorm, native: bool = False):
        self.attn, self.norm = attn, norm
        self.H, self.G, self.Dh = attn.n_heads, attn.n_kv_heads, attn.head_dim
        fused = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
        self.w_qkv, self.b_qkv = (None, None) if fused is None else fused
        self.qkv = None if fused is None else _Lin(self.w_qkv, self.b_qkv, native)
        self.o_proj = _Lin.of(attn.o_proj, native)
        # the whole block of a decode step in one native call: plain grouped-query attention (no qk-norm)
        # over a float32 cache, both projections in a native form
        self.native_block = (native and attn.qk_norm is None and self.qkv is not None and self.qkv.nw is not None
                             and self.o_proj.nw is not None and norm.weight.dtype == torch.float32)
        self.norm_weight = norm.weight.detach()
        self.q_norm = self.k_norm = None
        if attn.qk_norm is not None:
            self.q_norm = (attn.q_norm.weight.detach(), attn.q_norm.eps)
            self.k_norm = (attn.k_norm.weight.detach(), attn.k_norm.eps)

    def project(self, x_BTD: torch.Tensor, freqs, cos, sin):
        """q [B, H, T, Dh], k [B, G, T, Dh], v [B, G, T, Dh], rotated; ``x`` is not yet normalised."""
        B, T, _ = x_BTD.shape
        H, G, Dh = self.H, self.G, self.Dh
        h = F.rms_norm(x_BTD, (x_BTD.shape[-1],), self.norm_weight, self.norm.eps)
        if self.w_qkv is not None:
            qkv = self.qkv(h)
            q, k, v = qkv.split([H * Dh, G * Dh, G * Dh], dim=-1)
        else:
            q, k, v = self.attn.q_proj(h), self.attn.k_proj(h), self.attn.v_proj(h)
        v = v.view(B, T, G, Dh)
        if self.q_norm is None and self.w_qkv is not None:
            qk = _rotate(qkv[..., :(H + G) * Dh].view(B, T, H + G, Dh), freqs)
            q, k = qk[:, :, :H], qk[:, :, H:]
        else:
            if self.attn.qk_norm == "full":
                q, k = F.rms_norm(q, q.shape[-1:], *self.q_norm), F.rms_norm(k, k.shape[-1:], *self.k_norm)
            q, k = q.reshape(B, T, H, Dh), k.reshape(B, T, G, Dh)
            if self.attn.qk_norm == "head":
                q, k = F.rms_norm(q, (Dh,), *self.q_norm), F.rms_norm(k, (Dh,), *self.k_norm)
            q, k = _rotate(q, freqs), _rotate(k, freqs)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def out(self, y_BTX: torch.Tensor) -> torch.Tensor:
        return self.o_proj(y_BTX)


def _rotate(x_BTHD: torch.Tensor, freqs_T1C: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of (i, i + Dh/2) pairs as one complex multiply (Llama's reference code does the
    same on adjacent pairs); the result holds each rotated pair side by side (see :class:`_AttnPlan`)."""
    B, T, Hn, Dh = x_BTHD.shape
    # One copy gathers the pairs (and casts to float32): [.., 2, Dh/2] -> [.., Dh/2, 2].
    pairs = torch.empty(B, T, Hn, Dh // 2, 2, dtype=torch.float32, device=x_BTHD.device)
    pairs.copy_(x_BTHD.unflatten(-1, (2, Dh // 2)).transpose(-1, -2))
    return torch.view_as_real(torch.view_as_complex(pairs) * freqs_T1C).reshape(B, T, Hn, Dh).to(x_BTHD.dtype)


class _LatentPlan:
    """Multi-head latent attention with the latent cached, in the "absorbed" form (DeepSeek-V2 sec.
    2.1.2; vLLM and SGLang run MLA this way).

    Per token and layer the cache holds the normalised latent c [R] and the rotated shared key k_r [r]:
    one key [c, k_r] for all H heads, and c as the value. With kv_b_proj split per head into W_UK [Dn, R]
    and W_UV [Dv, R] (views of its weight, nothing copied):
      score_h = q_h . (W_UK c) + q_r . k_r = (W_UK^T q_h) . c + q_r . k_r  -> queries [W_UK^T q_h, q_r]
      out_h = sum_t p_t W_UV c_t = W_UV (sum_t p_t c_t)                   -> W_UV applied after attention
    so a token costs R + r cached numbers per layer instead of H * (Dn + r + Dv) (DeepSeek-V3: 576
    against 40,960, 71x). The same scores and outputs as ``LatentAttention.forward``, summed in another
    order (tests/test_mla_cache.py: within float32 rounding). A quantized kv_b_proj is dequantized for
    each call (transient; the weight stays quantized).
    """

    mla = True
    native_block = False  # (its projections and attention run on the PyTorch path)

    def __init__(self, attn: LatentAttention, norm: RMSNorm, native: bool = False):
        self.attn, self.norm = attn, norm  # (its projections run on the PyTorch path)
        self._w_uv = None  # this call's W_UV [H, Dv, R], set by project

    def _absorbed(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.attn
        w = a.kv_b_proj.weight
        w = w.dequantize(dtype) if isinstance(w, QuantizedWeight) else w.detach()
        w_HXR = w.view(a.n_heads, a.nope + a.v_dim, a.kv_rank)
        return w_HXR[:, :a.nope], w_HXR[:, a.nope:]  # W_UK [H, Dn, R], W_UV [H, Dv, R]

    def project(self, x_BTD: torch.Tensor, freqs, cos, sin):
        """Absorbed queries [B, H, T, R + r], the new cache entries [B, 1, T, R + r], and None (the
        values are the cached latent)."""
        a, B, T = self.attn, x_BTD.shape[0], x_BTD.shape[1]
        h = _rms_norm(self.norm, x_BTD)
        q = a.q_proj(h) if hasattr(a, "q_proj") else a.q_b_proj(a.q_a_layernorm(a.q_a_proj(h)))
        q_nope, q_rot = q.view(B, T, a.n_heads, a.nope + a.rope).transpose(1, 2).split([a.nope, a.rope], dim=-1)
        c_BTR, k_rot_BTr = a.kv_a_proj_with_mqa(h).split([a.kv_rank, a.rope], dim=-1)
        c_BTR = a.kv_a_layernorm(c_BTR)
        q_rot = apply_rope(q_rot, cos, sin, a.interleave)
        k_rot_B1Tr = apply_rope(k_rot_BTr[:, None], cos, sin, a.interleave)
        w_uk, self._w_uv = self._absorbed(q_nope.dtype)
        q_lat_BHTR = torch.matmul(q_nope, w_uk)  # [B, H, T, Dn] @ [H, Dn, R]
        return torch.cat([q_lat_BHTR, q_rot], dim=-1), torch.cat([c_BTR[:, None], k_rot_B1Tr], dim=-1), None

    def out(self, y_BTX: torch.Tensor) -> torch.Tensor:
        """Attention outputs in the latent [B, T, H * R] -> W_UV per head -> o_proj."""
        a = self.attn
        B, T, _ = y_BTX.shape
        y_BHTR = y_BTX.view(B, T, a.n_heads, a.kv_rank).transpose(1, 2)
        o_BHTV = torch.matmul(y_BHTR, self._w_uv.transpose(1, 2))  # [B, H, T, R] @ [H, R, Dv]
        self._w_uv = None
        return a.o_proj(o_BHTV.transpose(1, 2).reshape(B, T, a.n_heads * a.v_dim))


# --------------------------------------------------------------------------- feed-forward
class _MLPPlan:
    """A dense SwiGLU MLP with gate and up fused into one [2F, D] matmul (the model's gate and up
    weights are its row blocks)."""

    def __init__(self, mlp: MLP, native: bool = False):
        self.mlp = mlp
        fused = _fuse([mlp.gate_proj, mlp.up_proj])
        self.w_gate_up = None if fused is None else fused[0]
        self.w_down = _detach(mlp.down_proj.weight)
        self.gate_up = None if fused is None else _Lin(self.w_gate_up, None, native)
        self.down = _Lin(self.w_down, None, native)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if (self.gate_up is not None and self.gate_up.nw is not None and self.down.nw is not None
                and x.dtype == torch.float32 and x.numel() <= _native.MAX_ROWS * x.shape[-1]):
            return _native.kernels().swiglu(x.reshape(-1, x.shape[-1]), self.gate_up.nw, self.down.nw).view(x.shape)
        if self.gate_up is None:
            g, u = self.mlp.gate_proj(x), self.mlp.up_proj(x)
        else:
            g, u = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(g).mul_(u))


def _swiglu(x: torch.Tensor, w1_2FD, w2_DF) -> torch.Tensor:
    g, u = linear(x, w1_2FD).chunk(2, dim=-1)
    return linear(F.silu(g).mul_(u), w2_DF)


class ResidentExperts:
    """Expert weights held in memory: ``get(e)`` returns views of the stacked tensors (float or
    :class:`moekit.quant.QuantizedWeight`). ``moekit.infer.offload`` provides the same interface over
    memory-mapped weights with a cache of resident experts."""

    def __init__(self, w1_E2FD, w2_EDF):
        self.w1, self.w2 = w1_E2FD, w2_EDF

    def get(self, e: int):
        return self.w1[e], self.w2[e]


class _MoEPlan:
    """Router + the chosen experts, one expert at a time (the same arithmetic for every batch size and
    wherever the weights live, so offloaded and resident experts give bit-identical outputs)."""

    def __init__(self, moe: MoE, native: bool = False):
        self.moe = moe
        self.router = moe.router
        self.num_experts = moe.experts.num_experts
        w1, w2 = moe.experts.gate_up_proj, moe.experts.down_proj
        self.experts = ResidentExperts(_detach(w1), _detach(w2))
        self.shared = None if moe.shared_expert is None else _MLPPlan(moe.shared_expert, native)
        self.shared_gate = None if moe.shared_expert_gate is None else _detach(moe.shared_expert_gate.weight)
        # Native: each resident expert's (w1, w2) in the kernels' form, built once (None: not every expert
        # has a form the kernels take; the layer then runs on the PyTorch path). Offloaded experts
        # (moekit.infer.offload swaps ``experts``) are converted as they are fetched (_native_pair).
        self.native = native
        self._resident: tuple | None = None  # (pairs, Experts or None), built at first use (offloading may
        #                                       replace the experts first)
        self._fetched: dict = {}  # id(tensor) -> (version, data pointer, NativeWeight): offloaded slots

    def __call__(self, x_BTD: torch.Tensor, routing: list | None, task_N: torch.Tensor | None = None) -> torch.Tensor:
        B, T, D = x_BTD.shape
        N = B * T
        x_ND = x_BTD.reshape(N, D)
        ids_NK, w_NK = self.router.select(x_ND, task_N)
        if routing is not None:
            routing.append((ids_NK, w_NK))
        y_ND = self._routed(x_ND, ids_NK, w_NK)
        if self.shared is not None:
            shared_ND = self.shared(x_ND)
            if self.shared_gate is not None:
                shared_ND = torch.sigmoid(linear(x_ND, self.shared_gate)) * shared_ND
            y_ND = y_ND + shared_ND
        return y_ND.view(B, T, D)

    def _routed(self, x_ND: torch.Tensor, ids_NK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
        """Only the chosen experts run: y_n = sum_k w_nk * expert_{e_nk}(x_n).

        Plan: 1. group the (token, expert) pairs by expert, experts in increasing order, tokens in
        increasing order within an expert (Python lists for a handful of tokens, sort + bincount
        above); 2. per expert: gather its rows, SwiGLU with that expert's weights, scale by the gates,
        add into the output. NOTE: host sync -- the grouping becomes Python numbers.
        """
        N, K = ids_NK.shape
        if self.native and N <= _native.MAX_ROWS and x_ND.dtype == torch.float32:
            y = self._routed_native(x_ND, ids_NK, w_NK)
            if y is not None:
                return y
        if N == 1:  # decode at batch 1: no gather or scatter
            both = torch.cat([ids_NK.to(w_NK.dtype), w_NK], dim=1)[0].tolist()  # one sync; ids < 2^24 exact
            y = None
            for e, w in sorted(zip(map(int, both[:K]), both[K:])):
                w1, w2 = self.experts.get(e)
                ye = _swiglu(x_ND, w1, w2)
                y = ye.mul_(w) if y is None else y.add_(ye, alpha=w)
            return y
        y_ND = torch.zeros_like(x_ND)
        if N <= SMALL_BATCH_TOKENS:
            both = torch.cat([ids_NK.to(w_NK.dtype), w_NK], dim=1).tolist()
            groups: dict[int, tuple[list[int], list[float]]] = {}
            for n, row in enumerate(both):
                for e, w in zip(row[:K], row[K:]):
                    rows, gates = groups.setdefault(int(e), ([], []))
                    rows.append(n)
                    gates.append(w)
            plan = [(e, torch.tensor(groups[e][0], device=x_ND.device),
                     torch.tensor(groups[e][1], dtype=x_ND.dtype, device=x_ND.device)) for e in sorted(groups)]
        else:
            order_A = torch.argsort(ids_NK.reshape(-1), stable=True)
            counts = torch.bincount(ids_NK.reshape(-1), minlength=self.num_experts).tolist()
            tok_A, gate_A = order_A // K, w_NK.reshape(-1)[order_A].to(x_ND.dtype)
            plan, start = [], 0
            for e, n in enumerate(counts):
                if n:
                    plan.append((e, tok_A[start:start + n], gate_A[start:start + n]))
                start += n
        dequantized = self._dequantized_experts(x_ND)
        for e, idx, gate in plan:
            w1, w2 = self.experts.get(e) if dequantized is None else dequantized(e)
            ye = _swiglu(x_ND.index_select(0, idx), w1, w2)
            y_ND.index_add_(0, idx, ye.mul_(gate[:, None]))
        return y_ND

    def _dequantized_experts(self, x_ND: torch.Tensor):
        """For a prefill chunk on the native path with quantized resident experts: e -> the expert's float32
        (w1, w2), dequantized for this call (a float32 GEMM then beats the quantized kernels' many rows)."""
        if not (self.native and x_ND.dtype == torch.float32 and isinstance(self.experts, ResidentExperts)
                and isinstance(self.experts.w1, QuantizedWeight)):
            return None
        pairs, _ = self._resident_native()
        if not pairs:
            return None
        kern = _native.kernels()
        return lambda e: tuple(kern.dequantize(w) for w in pairs[e])

    def _resident_native(self) -> tuple:
        """The resident experts' native forms, built once: ((w1, w2) per expert, one Experts object), or
        ([], None) where some expert has no native form."""
        if self._resident is None:
            pairs = [tuple(map(_native.native_weight, self.experts.get(e))) for e in range(self.num_experts)]
            if all(a is not None and b is not None for a, b in pairs):
                self._resident = pairs, _native.kernels().Experts([a for a, _ in pairs], [b for _, b in pairs])
            else:
                self._resident = [], None
        return self._resident

    def _routed_native(self, x_ND: torch.Tensor, ids_NK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor | None:
        """The chosen experts on the native kernels: resident experts in one call for the layer (no host
        sync: the kernel groups the rows); offloaded ones one call per expert, as each is fetched (a
        fetched expert is valid only until the next fetch), adding into the output in the same order, so
        that both give the same bits. None where an expert's weights have no native form."""
        kern = _native.kernels()
        x, gates = x_ND.contiguous(), w_NK.to(torch.float32)
        if isinstance(self.experts, ResidentExperts):
            experts = self._resident_native()[1]
            return None if experts is None else kern.moe(x, ids_NK, gates, experts)
        used = sorted({int(e) for e in ids_NK.reshape(-1).tolist()})  # one sync
        y = torch.zeros_like(x)
        for i, e in enumerate(used):
            pair = [self._native_pair(w) for w in self.experts.get(e)]
            if pair[0] is None or pair[1] is None:
                if i:
                    raise RuntimeError(f"expert {e} has no native form while earlier experts of the layer had one")
                return None
            ids_e = torch.where(ids_NK == e, 0, -1)
            kern.moe_add(x, ids_e, gates, kern.Experts([pair[0]], [pair[1]]), y)
        return y

    def _native_pair(self, w):
        """The native form of a fetched expert weight, converted again only when its slot was refilled."""
        t = w.q if isinstance(w, QuantizedWeight) else w
        key = (t._version, t.data_ptr())
        hit = self._fetched.get(id(t))
        if hit is not None and hit[0] == key:
            return hit[1]
        nw = _native.native_weight(w)
        self._fetched[id(t)] = (key, nw)
        return nw


def _detach(w):
    return w.detach() if isinstance(w, torch.Tensor) else w


class Runner:
    """Runs ``model`` over a :class:`SlotCache`: each row of a call is one sequence in its own slot,
    starting at its own position. Call it under ``torch.inference_mode()``.

    :meth:`forward` runs a mixed batch (decoding rows and prefill chunks together, one pass over the
    weights); ``__call__`` is its two plain shapes.
    """

    def __init__(self, model: Transformer, slots: int, max_len: int, native: bool | None = None):
        """``native``: run decode steps on the native kernels (:mod:`moekit.native`); None: where they
        are built (the PyTorch path, the reference, otherwise)."""
        cfg = model.cfg
        if cfg.router == "expert_choice" and cfg.num_experts:
            raise ValueError(
                "expert_choice routing cannot generate text: each expert picks its tokens across the whole "
                "sequence, so a token's output depends on tokens after it, and a cached decode (one token at a "
                "time) computes something else than the forward pass the model was trained with. Use a "
                "token-choice router (topk, switch, noisy_topk, sigmoid_bias) for models meant to generate.")
        if max_len > cfg.max_seq_len:
            raise ValueError(f"max_len={max_len} is beyond the model's max_seq_len={cfg.max_seq_len}")
        self.model, self.cfg = model, cfg
        self.cache = SlotCache(model, slots, max_len)
        p = model.norm.weight
        cos, sin = rope_frequencies(cfg.head_dim, torch.arange(max_len, device=p.device), cfg.rope_theta)
        self.cos, self.sin = cos.to(p.dtype), sin.to(p.dtype)  # [L, Dh]
        half = cfg.head_dim // 2
        self.freqs = torch.complex(cos[:, :half], sin[:, :half])  # [L, Dh/2] e^(i * angle), rotate-half pairs
        self.cos_half, self.sin_half = cos[:, :half].float().contiguous(), sin[:, :half].float().contiguous()
        self.embed = _detach(model.embed.weight)
        self.head = _detach(model.lm_head.weight if model.lm_head is not None else model.embed.weight)
        self.native = _native.available() if native is None else bool(native)
        if self.native and not _native.available():
            raise ValueError("native=True but the native kernels are not available (python -m moekit.native build)")
        self.head_lin = _Lin(self.head, None, self.native)
        self.blocks = []
        for block in model.layers:
            ffn = _MoEPlan(block.ffn, self.native) if block.is_moe else _MLPPlan(block.ffn, self.native)
            plan = _LatentPlan if isinstance(block.attn, LatentAttention) else _AttnPlan
            attn = plan(block.attn, block.attn_norm, self.native)
            self.blocks.append((attn, block.ffn_norm, ffn))
        self._signature = _signature(model)

    def is_current(self) -> bool:
        """Whether the model still holds the weights this runner reads: False once a parameter, buffer or
        quantized weight was replaced, cast or moved (``model.to``, ``load_state_dict(assign=True)``,
        ``quantize_model``). In-place updates (an optimizer step) keep it current: they are seen."""
        return _signature(self.model) == self._signature

    def __call__(self, tokens_BT: torch.Tensor, slots: list[int], starts: list[int], all_logits: bool = False,
                 routing: list | None = None, tasks: list[int | None] | None = None) -> torch.Tensor:
        """The two plain call shapes: B rows decoding one token each, or one row of T tokens.

        Logits [B, V] of each row's last token (``all_logits``: [B, T, V]). See :meth:`forward`.
        """
        B, T = tokens_BT.shape
        if B == 1:
            logits = self.forward(tokens_BT[0], [(slots[0], starts[0], T)], [all_logits], routing, tasks=tasks)
            return logits[None] if all_logits else logits
        if T != 1:
            raise ValueError("rows of a batched call decode one token each (or give one row of T tokens)")
        return self.forward(tokens_BT[:, 0], [(s, p, 1) for s, p in zip(slots, starts)], None, routing, tasks=tasks)

    def forward(self, tokens_N: torch.Tensor, segments: list[tuple[int, int, int]], all_logits: list[bool] | None = None,
                routing: list | None = None, skip: list[int] | None = None,
                tasks: list[int | None] | None = None) -> torch.Tensor:
        """One pass over a mixed batch: ``segments`` are (slot, start, length) in the order of ``tokens_N``.

        Each segment's keys/values go to positions ``start .. start + length - 1`` of its slot and it
        attends to that slot's positions ``0 .. start + length - 1``. The leading one-token segments
        (decoding sequences) share one batched attention; every other segment (a prefill chunk) gets
        its own. Everything else -- projections, routers, experts, the head -- runs once over all N
        tokens, so a step that decodes many sequences and prefills a prompt reads the weights once.

        Returns logits [R, V]: each segment's last token, or all its tokens where ``all_logits[i]`` (from its
        ``skip[i]``-th token on, when given: the head runs only on the rows someone reads).
        ``routing``, when a list, receives per MoE layer (expert ids [N, K], gate weights [N, K]).
        ``tasks``: each segment's task id (an index into ``cfg.tasks``; None: no task), for task-aware
        routing (``cfg.task_routing``); rows of one call may have different tasks.
        """
        device = tokens_N.device
        plan = self._attention_plan(segments, device)
        task_N = self._task_ids(segments, tasks, device)
        if plan.single is None and plan.n_decode:
            for s, _, _ in segments[:plan.n_decode]:
                self.cache.ensure_clean(s, plan.dec_len)
        if isinstance(self.embed, QuantizedWeight):
            x = self.embed.embedding(tokens_N, self.cos.dtype)[None]
        else:
            x = F.embedding(tokens_N, self.embed)[None]  # [1, N, D]
        decode = None  # a decode step (every segment one token) on the native blocks: (slots, positions)
        if self.native and x.dtype == torch.float32 and len(segments) == len(tokens_N) <= _native.MAX_ROWS:
            decode = (torch.tensor([s for s, _, _ in segments]), torch.tensor([p for _, p, _ in segments]))
        for i, (attn, ffn_norm, ffn) in enumerate(self.blocks):
            if decode is not None and attn.native_block:
                x2, h2 = _native.kernels().attn_decode(
                    x[0].contiguous(), attn.norm_weight, attn.norm.eps, attn.qkv.nw, attn.o_proj.nw, self.cache.k[i],
                    self.cache.v[i], *decode, self.cos_half, self.sin_half, attn.H, attn.G, attn.Dh,
                    ffn_norm.weight.detach(), ffn_norm.eps)
                x, h = x2[None], h2[None]
            else:
                q, k, v = attn.project(x, plan.freqs, plan.cos, plan.sin)  # [1, H|G, N, Dh]
                y = plan.attend(q, k, v, self.cache.k[i], self.cache.v[i], attn.attn.scale if attn.mla else None)
                x = x + attn.out(y)
                h = _rms_norm(ffn_norm, x)
            x = x + (ffn(h, routing, task_N) if isinstance(ffn, _MoEPlan) else ffn(h))
        for s, p, n in segments:
            self.cache.written(s, p + n)
        rows = plan.output_rows(all_logits, skip)
        if rows is not None and not len(rows):  # every row skipped: no head call (quantized kernels want rows)
            return x.new_empty(0, self.model.cfg.vocab_size)
        x = x[0] if rows is None else x[0].index_select(0, rows)
        h = _rms_norm(self.model.norm, x)
        if isinstance(self.head, QuantizedWeight) and not (self.head_lin.nw is not None and h.dtype == torch.float32
                                                           and h.shape[0] <= _native.MAX_ROWS):
            return head_logits(h, self.head)  # (PyTorch's kernels write bfloat16 logits: the top ones recomputed)
        return self.head_lin(h)  # (the native kernels' logits are the quantized head's float32 product already)

    def _task_ids(self, segments: list[tuple[int, int, int]], tasks: list[int | None] | None,
                  device: torch.device) -> torch.Tensor | None:
        """Each token's task id [N] for the routers, or None where the routing ignores tasks."""
        cfg = self.cfg
        routing = cfg.task_routing if cfg.num_experts else "none"
        if routing == "none":
            return None
        tasks = [None] * len(segments) if tasks is None else list(tasks)
        if len(tasks) != len(segments):
            raise ValueError(f"{len(tasks)} task ids for {len(segments)} segments")
        n = len(cfg.tasks)
        for t in tasks:
            if t is None:
                if routing == "task":
                    raise ValueError(f"this model routes each task to its own experts (task_routing='task'): every "
                                     f"row needs a task id, an index into tasks={cfg.tasks}")
            elif isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < n:
                raise ValueError(f"task id {t!r} is not in [0, {n}) (tasks={cfg.tasks})")
        if routing == "embedding" and all(t is None for t in tasks):
            return None  # the zero task vector for every row: the routers add nothing
        # (embedding: id n, one past the last task, is the zero vector of "no task"; see moekit.model.router)
        ids = [n if t is None else t for t, (_, _, length) in zip(tasks, segments) for _ in range(length)]
        return torch.tensor(ids, dtype=torch.long, device=device)

    def _attention_plan(self, segments: list[tuple[int, int, int]], device: torch.device) -> _AttentionPlan:
        if not segments:
            raise ValueError("nothing to run: no segments")
        for s, p, n in segments:
            if not (0 <= s < self.cache.slots and n >= 1 and p >= 0 and p + n <= self.cache.max_len):
                raise ValueError(f"segment (slot {s}, start {p}, length {n}) does not fit {self.cache.slots} slots "
                                 f"of {self.cache.max_len} tokens")
        return _AttentionPlan(self, segments, device)


class _AttentionPlan:
    """Positions, rotary tables, cache writes and attention groups of one :meth:`Runner.forward` call."""

    def __init__(self, runner: Runner, segments: list[tuple[int, int, int]], device: torch.device):
        self.segments = segments
        if len(segments) == 1:  # one sequence (decode at batch 1, or a prefill chunk): views, no gathers
            s, p, n = segments[0]
            self.single = (s, p, n)
            pos = slice(p, p + n)
            self.cos, self.sin, self.freqs = runner.cos[pos], runner.sin[pos], runner.freqs[pos][:, None]
            self.mask = None if p == 0 or n == 1 else torch.ones(n, p + n, dtype=torch.bool, device=device).tril(p)
            return
        self.single = None
        positions = [p + j for _, p, n in segments for j in range(n)]
        self.pos_t = torch.tensor(positions, device=device)
        self.slot_t = torch.tensor([s for s, _, n in segments for _ in range(n)], device=device)
        self.cos, self.sin = runner.cos[self.pos_t], runner.sin[self.pos_t]  # [N, Dh]
        self.freqs = runner.freqs[self.pos_t][:, None]  # [N, 1, Dh/2]
        self.n_decode = next((i for i, (_, _, n) in enumerate(segments) if n != 1), len(segments))
        if self.n_decode:
            dec = segments[:self.n_decode]
            slots = [s for s, _, _ in dec]
            self.dec_len = max(p for _, p, _ in dec) + 1
            self.dec_slots = slots[0] if slots == list(range(slots[0], slots[0] + len(slots))) else self.slot_t[:len(slots)]
            self.dec_mask = (torch.arange(self.dec_len, device=device)[None] <= self.pos_t[:len(slots), None])[:, None, None]
        self.chunks = []  # (slot, start, length, first row) of the other segments
        row = self.n_decode
        for s, p, n in segments[self.n_decode:]:
            mask = None if p == 0 or n == 1 else torch.ones(n, p + n, dtype=torch.bool, device=device).tril(p)
            self.chunks.append((s, p, n, row, mask))
            row += n

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
               scale: float | None) -> torch.Tensor:
        """Write k/v [1, G, N, Dh] into the cache (v None: the cache's values are a view of its keys),
        attend, return y [1, N, H * Dv]."""
        if self.single is not None:
            s, p, n = self.single
            kc[s, :, p:p + n] = k[0]
            if v is not None:  # (None: the values are a view of the keys, the latent)
                vc[s, :, p:p + n] = v[0]
            y = _attention(q, kc[s:s + 1, :, :p + n], vc[s:s + 1, :, :p + n], self.mask, scale)
            return y.transpose(1, 2).reshape(1, n, -1)
        kc[self.slot_t, :, self.pos_t] = k[0].transpose(0, 1)  # [N, G, Dh]
        if v is not None:
            vc[self.slot_t, :, self.pos_t] = v[0].transpose(0, 1)
        ys = []
        if self.n_decode:
            nd, L, slots = self.n_decode, self.dec_len, self.dec_slots
            if isinstance(slots, int):
                keys, values = kc[slots:slots + nd, :, :L], vc[slots:slots + nd, :, :L]
            else:
                keys, values = kc[:, :, :L].index_select(0, slots), vc[:, :, :L].index_select(0, slots)
            y = _attention(q[:, :, :nd].transpose(0, 2), keys, values, self.dec_mask, scale)  # [nd, H, 1, Dv]
            ys.append(y.reshape(nd, -1))
        for s, p, n, row, mask in self.chunks:
            y = _attention(q[:, :, row:row + n], kc[s:s + 1, :, :p + n], vc[s:s + 1, :, :p + n], mask, scale)
            ys.append(y[0].transpose(0, 1).reshape(n, -1))
        return torch.cat(ys)[None]

    def output_rows(self, all_logits: list[bool] | None, skip: list[int] | None = None) -> torch.Tensor | None:
        """Rows whose logits are wanted (None: all of them)."""
        rows, start = [], 0
        for i, (_, _, n) in enumerate(self.segments):
            first = start + (skip[i] if skip is not None else 0)
            rows += range(first, start + n) if all_logits is not None and all_logits[i] else [start + n - 1]
            start += n
        if len(rows) == start:
            return None
        device = self.freqs.device
        return torch.tensor(rows, dtype=torch.long, device=device)  # (no rows: a chunk that scores nothing)


def _attention(q_BHTD: torch.Tensor, k_BGSD: torch.Tensor, v_BGSD: torch.Tensor, mask: torch.Tensor | None,
               scale: float | None) -> torch.Tensor:
    """SDPA over cached keys; ``mask`` None means: the T queries are the last T keys, causal."""
    T, S = q_BHTD.shape[2], k_BGSD.shape[2]
    dtype = q_BHTD.dtype
    if q_BHTD.device.type == "cpu" and dtype == torch.bfloat16:  # see layers.Attention.forward
        q_BHTD, k_BGSD, v_BGSD = q_BHTD.float(), k_BGSD.float(), v_BGSD.float()
    y = F.scaled_dot_product_attention(q_BHTD, k_BGSD, v_BGSD, attn_mask=mask, is_causal=mask is None and T > 1 and T == S,
                                       enable_gqa=k_BGSD.shape[1] != q_BHTD.shape[1], scale=scale)
    return y.to(dtype)
