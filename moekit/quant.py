"""Weight-only quantization: int8 per output channel, int4 group-wise (pure functions + one container).

Legend: N output features (rows), K input features, G group size, E experts (stacked weights).

Kernels: PyTorch's own CPU kernels, ``aten._weight_int8pack_mm`` (int8 rows x per-row scale) and
``aten._weight_int4pack_mm_for_cpu`` (int4 in PyTorch's packed layout, a scale and a zero point per
group of G input features: ``w = (q - 8) * scale + zero``). Measured on this 2-core x86 CPU (torch
2.13, [1, 512] x [512, 8192]): both run at ~145 us with bfloat16 activations against 307 us for the
float32 ``F.linear``, but take 1.7 ms / 4.3 ms with float32 activations (a slow fallback), so
quantized matmuls run their activations in bfloat16 and return the caller's dtype. Above ~8 rows
they lose to a bfloat16 GEMM; that regime (prefill) is bounded by compute anyway.

Grouped int8 (one scale per 32 inputs: a GGUF file's Q8_0 blocks, kept as they are) has no CPU
kernel of its own; it runs on the int4 kernel over two nibble planes (see :class:`QuantizedWeight`).

On disk (safetensors), a quantized weight ``name`` [..., N, K] is stored as ``name.qweight`` (int8
[..., N, K], or uint8 [..., N, K/2] for int4: two values per byte, low nibble first) and
``name.scales`` (float [..., N] per row, or [..., N, K/G] per group) plus ``name.zeros`` for int4.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BITS = (8, 4)
GROUP_SIZES = (32, 64, 128)


class QuantizationError(ValueError):
    """A quantization setting or a quantized tensor is wrong; the message names it."""


def check_settings(bits: int, group_size: int | None) -> None:
    if bits not in BITS:
        raise QuantizationError(f"bits={bits!r} is not supported; choose one of {list(BITS)}")
    if bits == 4 and group_size not in GROUP_SIZES:
        raise QuantizationError(f"group_size={group_size!r} is not supported for int4; choose one of {list(GROUP_SIZES)}")


# --------------------------------------------------------------------------- pure functions
def quantize_int8(w_NK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``w ~ q * scale``, q in [-127, 127]. Returns (q int8 [..., N, K], scale [..., N])."""
    w = w_NK.float()
    scale = (w.abs().amax(-1) / 127).clamp(min=1e-12)
    q = torch.round(w / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[..., None]


def quantize_int4(w_NK: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise int4 (min/max per group of ``group_size`` inputs, as gpt-fast does):
    ``w ~ (q - 8) * scale + zero``, q in [0, 15]. Returns (q uint8 [..., N, K], scale, zero [..., N, K/G])."""
    *lead, N, K = w_NK.shape
    if K % group_size:
        raise QuantizationError(f"group_size={group_size} does not divide the input width {K}")
    w = w_NK.float().reshape(*lead, N, K // group_size, group_size)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    zero = lo + 8 * scale
    q = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    return q.reshape(*lead, N, K), scale, zero


def dequantize_int4(q_NK: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    *lead, N, K = q_NK.shape
    G = K // scale.shape[-1]
    w = (q_NK.float().reshape(*lead, N, K // G, G) - 8) * scale.float()[..., None] + zero.float()[..., None]
    return w.reshape(*lead, N, K)


def pack_nibbles(q_NK: torch.Tensor) -> torch.Tensor:
    """uint8 values in [0, 15] -> two per byte, the even column in the low nibble. [..., N, K/2]."""
    return (q_NK[..., 0::2] | (q_NK[..., 1::2] << 4)).to(torch.uint8)


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    lo, hi = p & 0x0F, p >> 4
    return torch.stack([lo, hi], dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)


# --------------------------------------------------------------------------- the container
#: A function giving rows [start, stop) of matrix ``m`` (the flattened leading index of a stacked
#: weight) as the pieces :meth:`QuantizedWeight.build` asks for (see there). Builders call it a few
#: hundred rows at a time, so a caller can stream a weight from a file without holding it twice.
RowSource = Callable[[int, int, int], tuple[torch.Tensor, ...]]


@dataclass
class QuantizedWeight:
    """A quantized [N, K] weight, or a stack [E, N, K] of them (indexing gives one expert's).

    Three kinds, each in the layouts the kernels read:

    - int8 per row (``group_size`` None): ``q`` int8 [.., N, K], ``scale`` bfloat16 [.., N]
      (``aten._weight_int8pack_mm``).
    - int8 in groups of G (a GGUF file's Q8_0: G = 32): ``scale`` float16 [.., N, K/G], the exact
      scales; the kernel is the int4 one over two nibble planes of each value, ``q = 16 h + l`` with
      ``l = q & 15`` and ``h = q >> 4`` in [-8, 7]: ``q`` holds [l | h + 8] as an int4 weight of
      width 2K in PyTorch's packed layout (uint8 [.., Np, K]) and ``scale_zero`` bfloat16
      [.., 2K/G, Np, 2] gives the l groups (scale s, zero 8 s) and the h groups (16 s, zero 0), so
      the kernel's ``(l - 8) s + 8 s + (h + 8 - 8) 16 s`` is ``s q`` (with s rounded to bfloat16).
      No per-group int8 kernel exists on the CPU, and dequantizing per call measured over 10x slower.
    - int4 in groups of G: ``q`` in the packed layout (uint8 [.., Np, K/2], from
      ``aten._convert_weight_to_int4pack_for_cpu``) and ``scale_zero`` bfloat16 [.., K/G, Np, 2];
      ``nibbles`` (the portable form) is kept only when asked (embeddings, exports), see :meth:`build`.

    Np is N rounded up to 16 (the packing needs it); the padding rows are zero and never read back.
    """

    bits: int
    shape: tuple[int, ...]
    q: torch.Tensor
    scale: torch.Tensor | None = None  # int8: [.., N] bfloat16 per row, or [.., N, K/G] float16 per group
    scale_zero: torch.Tensor | None = None  # int4 and grouped int8: [.., K'/G, Np, 2] bfloat16
    group_size: int | None = None
    nibbles: torch.Tensor | None = None  # int4 portable form [.., N, K/2] (low nibble first), if kept

    # ---- construction
    @classmethod
    def from_int8(cls, q: torch.Tensor, scale: torch.Tensor) -> QuantizedWeight:
        """From int8 values q [.., N, K] and per-row scales [.., N], or per-group scales [.., N, K/G]."""
        if scale.dim() == q.dim():
            G = q.shape[-1] // scale.shape[-1]
            flat_q, flat_s = q.reshape(-1, *q.shape[-2:]), scale.reshape(-1, *scale.shape[-2:])
            return cls.build(8, tuple(q.shape), lambda m, a, b: (flat_q[m, a:b], flat_s[m, a:b]), group_size=G)
        # NOTE: the int8 kernel segfaults on rows that are not 64-byte aligned (seen with tensors read
        # from a safetensors file, which packs them back to back): copy those into a fresh allocation.
        q = q.contiguous()
        if q.data_ptr() % 64:
            q = _aligned_copy(q)
        return cls(8, tuple(q.shape), q, scale=scale.to(torch.bfloat16).contiguous())

    @classmethod
    def from_int4(cls, q_NK: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, keep_nibbles: bool = False
                  ) -> QuantizedWeight:
        """From unpacked int4 values q [.., N, K] in [0, 15] and per-group scale/zero [.., N, K/G]."""
        N, K = q_NK.shape[-2:]
        G = K // scale.shape[-1]
        flat = [t.reshape(-1, *t.shape[-2:]) for t in (q_NK, scale, zero)]
        return cls.build(4, tuple(q_NK.shape), lambda m, a, b: tuple(t[m, a:b] for t in flat), group_size=G,
                         keep_nibbles=keep_nibbles)

    @classmethod
    def build(cls, bits: int, shape: tuple[int, ...], rows: RowSource, group_size: int | None = None,
              keep_nibbles: bool = False) -> QuantizedWeight:
        """A weight of ``shape`` [.., N, K] filled a few rows at a time from ``rows(m, start, stop)``, which
        returns for rows [start, stop) of matrix m: int8 per row ``(q int8, scale [r])``; int8 in groups
        ``(q int8, scale [r, K/G])``; int4 ``(q [r, K] in [0, 15], scale, zero [r, K/G])``. Only the
        result and one chunk's temporaries are ever held (the packing op wants int32: 4 bytes a value)."""
        *lead, N, K = shape
        L = math.prod(lead)
        if bits == 8 and group_size is None:
            q, scale = torch.empty(L, N, K, dtype=torch.int8), torch.empty(L, N, dtype=torch.bfloat16)
            for m, a, b in _chunks(L, N, K, 1):
                q[m, a:b], scale[m, a:b] = rows(m, a, b)
            return cls(8, tuple(shape), q.reshape(shape), scale=scale.reshape(*lead, N))
        if K % group_size:
            raise QuantizationError(f"group_size={group_size} does not divide the input width {K}")
        Np = -(-N // 16) * 16
        width = 2 * K if bits == 8 else K  # nibbles per row in the kernel layout
        packed = torch.empty(L, Np, width // 2, dtype=torch.uint8)
        sz = torch.zeros(L, width // group_size, Np, 2, dtype=torch.bfloat16)
        exact = torch.empty(L, N, K // group_size, dtype=torch.float16) if bits == 8 else None
        nibbles = torch.empty(L, N, K // 2, dtype=torch.uint8) if bits == 4 and keep_nibbles else None
        layout = _tile_layout(Np, width)
        for m, a, b in _chunks(L, N, width, layout.rows if layout else N):
            if bits == 8:
                q, s = rows(m, a, b)
                exact[m, a:b] = s
                s = s.float()
                q16 = q.to(torch.int16)
                values = torch.cat([q16 & 15, (q16 >> 4) + 8], dim=-1)  # [r, 2K]: planes l | h + 8
                scale, zero = torch.cat([s, 16 * s], dim=-1), torch.cat([8 * s, torch.zeros_like(s)], dim=-1)
            else:
                values, scale, zero = rows(m, a, b)
                if nibbles is not None:
                    nibbles[m, a:b] = pack_nibbles(values.to(torch.uint8))
            stop = Np if b == N else b  # the last chunk also packs the zero padding rows
            packed[m, a:stop] = _pack_int4(values, stop - a)
            sz[m, :, a:b, 0], sz[m, :, a:b, 1] = scale.t(), zero.t()
        return cls(bits, tuple(shape), packed.reshape(*lead, Np, width // 2),
                   scale=None if exact is None else exact.reshape(*lead, N, K // group_size),
                   scale_zero=sz.reshape(*lead, width // group_size, Np, 2), group_size=group_size,
                   nibbles=None if nibbles is None else nibbles.reshape(*lead, N, K // 2))

    @classmethod
    def quantize(cls, w: torch.Tensor, bits: int, group_size: int | None = None, keep_nibbles: bool = False
                 ) -> QuantizedWeight:
        check_settings(bits, group_size)
        if bits == 8:
            return cls.from_int8(*quantize_int8(w))
        return cls.from_int4(*quantize_int4(w, group_size), keep_nibbles=keep_nibbles)

    # ---- use
    @property
    def grouped_int8(self) -> bool:
        return self.bits == 8 and self.group_size is not None

    def __getitem__(self, e: int) -> QuantizedWeight:
        """One expert of a stacked weight (views, nothing copied)."""
        if len(self.shape) != 3:
            raise IndexError("only a stacked [E, N, K] weight can be indexed")
        pick = lambda t: None if t is None else t[e]  # noqa: E731
        return QuantizedWeight(self.bits, self.shape[1:], self.q[e], pick(self.scale), pick(self.scale_zero),
                               self.group_size, pick(self.nibbles))

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ w.T`` for x [..., K]; activations in bfloat16 (see the module note), result in x's dtype."""
        lead, K = x.shape[:-1], x.shape[-1]
        N = self.shape[-2]
        x2 = x.reshape(-1, K).to(torch.bfloat16)
        if self.bits == 8 and self.group_size is None:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.q, self.scale)
        else:
            if self.bits == 8:
                x2 = torch.cat([x2, x2], dim=-1)  # one copy of the input per nibble plane
            # NOTE: the kernel reads scale_zero as contiguous (a strided view, e.g. a block of rows of a
            # fused weight, gives wrong results silently); .contiguous() copies only such a view.
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.q, self.group_size, self.scale_zero.contiguous())
            y = y[:, :N]  # drop the padding rows' outputs
        return y.to(x.dtype).reshape(*lead, N)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.bits == 8 and self.group_size is None:
            return dequantize_int8(self.q, self.scale).to(dtype)
        if self.bits == 8:
            return _dequantize_int8_groups(self.int8_values(), self.scale).to(dtype)
        return dequantize_int4(self.int4_values(), *self.scales_zeros()).to(dtype)

    def scales_zeros(self) -> tuple[torch.Tensor, torch.Tensor]:
        """int4: scale and zero [.., N, K/G] in float32, exactly the (bfloat16) values the kernel uses."""
        sz = self.scale_zero.float().transpose(-3, -2)[..., :self.shape[-2], :, :]  # [.., N, K/G, 2]
        return sz[..., 0], sz[..., 1]

    def int4_values(self) -> torch.Tensor:
        """The int4 values q [.., N, K] in [0, 15] (from the kept nibbles, or unpacked from the kernel layout)."""
        if self.nibbles is not None:
            return unpack_nibbles(self.nibbles)
        return _unpack_kernel_layout(self.q, self.shape[-1])[..., :self.shape[-2], :]

    def int8_values(self) -> torch.Tensor:
        """The int8 values q [.., N, K] (per row: ``q`` itself; in groups: joined from the two nibble planes)."""
        if self.group_size is None:
            return self.q
        return _join_planes(_unpack_kernel_layout(self.q, 2 * self.shape[-1])[..., :self.shape[-2], :])

    def embedding(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows ``ids`` of the weight, dequantized: a quantized embedding table."""
        if self.bits == 8 and self.group_size is None:
            return (self.q[ids].float() * self.scale[ids].float()[..., None]).to(dtype)
        if self.bits == 8:  # gathered from the kernel layout: no second copy of the table
            rows = _join_planes(_kernel_rows(self.q, 2 * self.shape[-1], ids.reshape(-1)))
            return _dequantize_int8_groups(rows, self.scale[ids.reshape(-1)]).reshape(*ids.shape, -1).to(dtype)
        if self.nibbles is None:
            raise QuantizationError("an int4 embedding needs its nibbles kept (QuantizedWeight.from_int4(keep_nibbles=True))")
        scale, zero = self.scales_zeros()
        return dequantize_int4(unpack_nibbles(self.nibbles[ids]), scale[ids], zero[ids]).to(dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.scale, self.scale_zero, self.nibbles)
                   if t is not None)


#: Logits recomputed exactly (float32 activations) after a quantized output head: its kernels write
#: bfloat16, whose spacing at logit 25 is 0.125 -- coarser than many real gaps between the top choices.
REFINED_LOGITS = 64


def head_logits(h: torch.Tensor, w: QuantizedWeight, k: int = REFINED_LOGITS) -> torch.Tensor:
    """``h @ w.T`` for an output head: the kernel for every token, then the ``k`` largest logits per row
    recomputed in float32 from the dequantized rows, so greedy choices and top-k/top-p sampling see
    float resolution where it matters. Needs row access (int8, or int4 with nibbles kept)."""
    logits = w.linear(h)
    if w.bits == 4 and w.nibbles is None:  # no row access (grouped int8 gathers rows from its packed layout)
        return logits
    top = logits.float().topk(min(k, logits.shape[-1]), dim=-1).indices  # [..., k]
    rows = w.embedding(top, torch.float32)  # [..., k, D]
    exact = (rows @ h.float()[..., None])[..., 0]
    return logits.float().scatter_(-1, top, exact).to(h.dtype)


def _aligned_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` whose storage starts on a 64-byte boundary."""
    nbytes = t.numel() * t.element_size()
    raw = torch.empty(nbytes + 64, dtype=torch.uint8, device=t.device)
    start = (-raw.data_ptr()) % 64
    out = raw[start:start + nbytes].view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


def linear(x: torch.Tensor, w: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for a float or a quantized weight."""
    if isinstance(w, QuantizedWeight):
        y = w.linear(x)
        return y if bias is None else y + bias
    return F.linear(x, w, bias)


# --------------------------------------------------------------------------- PyTorch's int4 packed layout
# The packed layout is internal to PyTorch and differs by CPU (aten/src/ATen/native/cpu/int4mm_kernel.cpp,
# weight_to_int4pack_kernel: 64-row tiles with AVX-512, 32 with AVX2, pairs elsewhere), so it is
# discovered rather than assumed. What is assumed is its form, which every variant there has and
# _tile_layout checks: rows are cut into tiles of BN rows (the last one shorter); tiles are stored one
# after another; inside a tile the nibbles run column by column, each column holding the tile's rows
# in one fixed order. That order (BN numbers per tile size) is all that is kept, so unpacking needs
# O(BN) memory, not a table per weight element.

#: Values converted at a time by :meth:`QuantizedWeight.build` (and GGUF loading): the temporaries of a chunk
#: (int32 for the packing op, the nibble planes) stay ~2 MB whatever the weight's size.
CHUNK_VALUES = 1 << 18

#: Tile orders kept, by (rows, width): a few hundred bytes each (bounded by the LRU below).
_LAYOUT_CACHE = 64


@dataclass(frozen=True)
class _Tiles:
    rows: int  # BN: rows per full tile
    order: torch.Tensor  # [BN] int16: the row (within the tile) of each nibble of a full tile's column
    tail_order: torch.Tensor  # [N mod BN] int16: the same for the shorter last tile


def _probe(rows: int, width: int) -> torch.Tensor:
    """Pack the base-16 digits of every element's flat index and read where each lands: the flat
    (n, k) index held by each nibble slot of a [rows, width] packing, int64 [rows * width]."""
    index = torch.arange(rows * width, dtype=torch.int64).reshape(rows, width)
    source = torch.zeros(rows * width, dtype=torch.int64)
    for d in range(max(1, math.ceil(math.log(rows * width, 16)))):
        part = ((index >> (4 * d)) & 0xF).to(torch.int32)
        slots = unpack_nibbles(torch.ops.aten._convert_weight_to_int4pack_for_cpu(part, 1)).reshape(-1)
        source += slots.to(torch.int64) << (4 * d)
    return source


def _tiled_source(rows: int, width: int, t: _Tiles) -> torch.Tensor:
    """What :func:`_probe` returns if the layout has the tiled form ``t``."""
    full, tail = divmod(rows, t.rows)
    k = torch.arange(width)
    parts = []
    if full:  # [tile, column, slot]
        n = torch.arange(full)[:, None, None] * t.rows + t.order.long()[None, None, :]
        parts.append((n * width + k[None, :, None]).reshape(-1))
    if tail:  # [column, slot]
        parts.append(((full * t.rows + t.tail_order.long()[None, :]) * width + k[:, None]).reshape(-1))
    return torch.cat(parts)


@functools.lru_cache(maxsize=_LAYOUT_CACHE)
def _tile_layout(rows: int, width: int) -> _Tiles | None:
    """The tiled form of the packing of a [rows, width] int4 matrix, or None if it does not have one.

    Discovered from a probe two columns wide (a tile's first column starts the probe; its length is
    BN) and checked against a probe of the real width holding one full tile and the last one, so the
    cost is O(rows + BN * width) whatever the weight's size."""
    source = _probe(rows, 2)
    n, k = source // 2, source % 2
    second = (k == 1).nonzero()
    bn = int(second[0]) if len(second) else rows
    full, tail = divmod(rows, bn)
    tiles = _Tiles(bn, n[:bn].to(torch.int16), (n[full * bn * 2:full * bn * 2 + tail] - full * bn).to(torch.int16))
    if not torch.equal(_tiled_source(rows, 2, tiles), source):
        return None
    check_rows = min(rows, bn) + (tail if rows > bn else 0)  # one full tile and the last one
    if not torch.equal(_tiled_source(check_rows, width, tiles), _probe(check_rows, width)):
        return None
    return tiles


def _chunks(matrices: int, rows: int, width: int, tile: int):
    """(matrix, start, stop) row ranges of about ``CHUNK_VALUES`` values each, starting on whole tiles."""
    step = max(tile, CHUNK_VALUES // max(width, 1) // tile * tile)
    for m in range(matrices):
        for a in range(0, rows, step):
            yield m, a, min(rows, a + step)


def _pack_int4(values: torch.Tensor, rows: int) -> torch.Tensor:
    """Values [r, W] in [0, 15] -> PyTorch's packed layout [rows, W/2], zero rows appended up to ``rows``."""
    v = values.to(torch.int32)
    if v.shape[0] < rows:
        v = torch.cat([v, v.new_zeros(rows - v.shape[0], v.shape[1])])
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(v.contiguous(), 1)


def _unpack_kernel_layout(packed: torch.Tensor, width: int) -> torch.Tensor:
    """Invert ``_convert_weight_to_int4pack_for_cpu``: packed [.., Np, W/2] -> values uint8 [.., Np, W]."""
    *lead, rows, _ = packed.shape
    nib = unpack_nibbles(packed.reshape(-1, rows * width // 2))  # [L, rows * W] in slot order
    L = nib.shape[0]
    tiles = _tile_layout(rows, width)
    if tiles is None:  # not the tiled form: a full slot table, for this call only
        out = torch.empty_like(nib)
        out[:, _probe(rows, width)] = nib
        return out.reshape(*lead, rows, width)
    out = torch.empty(L, rows, width, dtype=torch.uint8)
    full, tail = divmod(rows, tiles.rows)
    if full:  # slots [tile, column, j] hold (tile row order[j], column)
        blocks = nib[:, :full * tiles.rows * width].view(L, full, width, tiles.rows)
        out[:, :full * tiles.rows].view(L, full, tiles.rows, width)[:, :, tiles.order.long()] = blocks.transpose(2, 3)
    if tail:
        out[:, full * tiles.rows:][:, tiles.tail_order.long()] = nib[:, full * tiles.rows * width:].view(L, width, tail
                                                                                                        ).transpose(1, 2)
    return out.reshape(*lead, rows, width)


def _kernel_rows(packed: torch.Tensor, width: int, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` [n] of a packed [Np, W/2] matrix as values uint8 [n, W], read in place (a gather of
    n * W nibbles), so that a packed table serves row lookups without a second copy."""
    rows = packed.shape[-2]
    tiles = _tile_layout(rows, width)
    if tiles is None:
        return _unpack_kernel_layout(packed, width)[ids]
    full, tail = divmod(rows, tiles.rows)
    # the slot of each row of a tile within its column: the inverse of the tile's row order
    in_full = torch.empty(tiles.rows, dtype=torch.int64).index_put_((tiles.order.long(),), torch.arange(tiles.rows))
    in_tail = torch.empty(tail, dtype=torch.int64).index_put_((tiles.tail_order.long(),), torch.arange(tail))
    first = ids - ids % tiles.rows  # the tile's first row
    in_last = first >= full * tiles.rows
    slot = torch.where(in_last, in_tail[(ids - first).clamp(max=max(tail - 1, 0))] if tail else 0,
                       in_full[ids - first])
    stride = torch.where(in_last, tail, tiles.rows)  # slots per column in the row's tile
    slots = (first * width + slot)[:, None] + torch.arange(width)[None, :] * stride[:, None]  # [n, W]
    return (packed.reshape(-1)[slots >> 1] >> ((slots & 1) << 2).to(torch.uint8)) & 0x0F


def _join_planes(values: torch.Tensor) -> torch.Tensor:
    """Nibble planes [.., 2K] (l | h + 8) -> int8 values ``16 h + l`` [.., K]."""
    K = values.shape[-1] // 2
    return ((values[..., K:].to(torch.int16) - 8) * 16 + values[..., :K]).to(torch.int8)


def _dequantize_int8_groups(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 values [.., N, K] times one scale per group [.., N, K/G], in float32 (exact for float16 scales)."""
    *lead, N, K = q.shape
    G = K // scale.shape[-1]
    return (q.float().reshape(*lead, N, K // G, G) * scale.float()[..., None]).reshape(*lead, N, K)


# --------------------------------------------------------------------------- rows (fusing, permuting)
def select_rows(w: QuantizedWeight, index: torch.Tensor) -> QuantizedWeight:
    """Rows ``index`` of a quantized weight, 2-D or stacked [E, N, K] (exact: rows are quantized
    independently)."""
    if w.bits == 8:
        return QuantizedWeight.from_int8(w.int8_values()[..., index, :], w.scale[..., index, :] if w.grouped_int8
                                         else w.scale[..., index])
    scale, zero = w.scales_zeros()
    return QuantizedWeight.from_int4(w.int4_values()[..., index, :], scale[..., index, :], zero[..., index, :],
                                     keep_nibbles=w.nibbles is not None)


def cat_rows(ws: list[QuantizedWeight]) -> QuantizedWeight:
    """Stack 2-D quantized weights along their rows (exact), e.g. q/k/v into one projection."""
    if len({(w.bits, w.group_size, w.shape[-1]) for w in ws}) != 1:
        raise QuantizationError("weights to concatenate must share bits, group size and input width")
    if ws[0].bits == 8:
        return QuantizedWeight.from_int8(torch.cat([w.int8_values() for w in ws]), torch.cat([w.scale for w in ws]))
    scales, zeros = zip(*(w.scales_zeros() for w in ws))
    return QuantizedWeight.from_int4(torch.cat([w.int4_values() for w in ws]), torch.cat(scales), torch.cat(zeros))


# --------------------------------------------------------------------------- modules
class QuantizedLinear(torch.nn.Module):
    """``nn.Linear`` with a :class:`QuantizedWeight` (no gradient: inference only)."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.qweight = weight
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)
        self.out_features, self.in_features = weight.shape

    @property
    def weight(self) -> QuantizedWeight:
        return self.qweight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.qweight, self.bias)

    def extra_repr(self) -> str:
        g = f", group {self.qweight.group_size}" if self.qweight.group_size else ""
        return f"in={self.in_features}, out={self.out_features}, int{self.qweight.bits}{g}"


class QuantizedExperts(torch.nn.Module):
    """Stacked experts with quantized ``gate_up_proj`` [E, 2F, D] and ``down_proj`` [E, D, F]; the same
    call signature as :class:`moekit.model.experts.Experts` (one expert at a time)."""

    def __init__(self, gate_up: QuantizedWeight, down: QuantizedWeight):
        super().__init__()
        self.gate_up_proj, self.down_proj = gate_up, down
        self.num_experts, self.ffn_dim = gate_up.shape[0], down.shape[-1]

    def forward(self, x_TD: torch.Tensor, token_ids_A: torch.Tensor, expert_ids_A: torch.Tensor,
                weights_A: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x_TD)
        # NOTE: host sync -- which experts have tokens.
        for e in torch.unique(expert_ids_A).tolist():
            sel = expert_ids_A == e
            tok = token_ids_A[sel]
            g, u = self.gate_up_proj[e].linear(x_TD[tok]).chunk(2, dim=-1)
            y = self.down_proj[e].linear(F.silu(g) * u)
            out.index_add_(0, tok, (y * weights_A[sel, None]).to(out.dtype))
        return out

    reference = forward


#: Which weights ``quantize_model`` converts: every linear layer of attention, dense MLPs, shared experts
#: and the routed experts. Routers (float32 selection), embeddings and norms stay float; an untied output
#: head becomes int8 whatever ``bits`` is (as llama.cpp keeps its output tensor at higher precision).
def quantize_model(model: torch.nn.Module, bits: int, group_size: int | None = None) -> torch.nn.Module:
    """Replace the model's linear and expert weights by quantized ones, in place; returns the model."""
    from moekit.model.experts import Experts
    from moekit.model.router import Router

    check_settings(bits, group_size)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, Experts):
                _check_width(full, child.gate_up_proj.shape[-1], child.down_proj.shape[-1], bits, group_size)
                new = QuantizedExperts(QuantizedWeight.quantize(child.gate_up_proj.detach(), bits, group_size),
                                       QuantizedWeight.quantize(child.down_proj.detach(), bits, group_size))
                setattr(module, child_name, new)
            elif isinstance(child, torch.nn.Linear) and not isinstance(module, Router) and "shared_expert_gate" not in full:
                head = full == "lm_head"
                b, g = (8, None) if head else (bits, group_size)
                _check_width(full, child.in_features, child.in_features, b, g)
                setattr(module, child_name, QuantizedLinear(QuantizedWeight.quantize(child.weight.detach(), b, g),
                                                            child.bias))
    model.quantization = {"bits": bits, "group_size": group_size if bits == 4 else None}
    return model


def _check_width(name: str, k1: int, k2: int, bits: int, group_size: int | None) -> None:
    if bits == 4:
        for k in (k1, k2):
            if k % group_size:
                raise QuantizationError(f"group_size={group_size} does not divide the input width {k} of {name}; "
                                        f"choose a group size that divides it (one of {list(GROUP_SIZES)})")


# --------------------------------------------------------------------------- state dicts (safetensors)
def quantized_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor to save: float parameters/buffers as usual, each quantized weight ``name`` as
    ``name.qweight`` / ``name.scales`` (/ ``name.zeros``) in the portable layout (see the module doc)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    for name, w in quantized_weights(model).items():
        if w.grouped_int8:  # float16 scales, as the GGUF file had them
            state[f"{name}.qweight"], state[f"{name}.scales"] = w.int8_values().contiguous(), w.scale.contiguous()
        elif w.bits == 8:
            state[f"{name}.qweight"], state[f"{name}.scales"] = w.q.contiguous(), w.scale.float().contiguous()
        else:
            state[f"{name}.qweight"] = (w.nibbles if w.nibbles is not None else pack_nibbles(w.int4_values())).contiguous()
            scale, zero = w.scales_zeros()
            state[f"{name}.scales"], state[f"{name}.zeros"] = scale.contiguous(), zero.contiguous()
    return state


def quantized_weights(model: torch.nn.Module) -> dict[str, QuantizedWeight]:
    """Parameter-style names (``layers.0.attn.q_proj.weight``) of every quantized weight."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            out[f"{name}.weight"] = module.qweight
        elif isinstance(module, QuantizedExperts):
            out[f"{name}.gate_up_proj"], out[f"{name}.down_proj"] = module.gate_up_proj, module.down_proj
        elif isinstance(module, QuantizedEmbedding):
            out[f"{name}.weight"] = module.qweight
    return out


def read_quantized(state: dict[str, torch.Tensor], name: str, where: str, keep_nibbles: bool = False
                   ) -> QuantizedWeight:
    """The quantized weight ``name`` from saved tensors (int8 if ``qweight`` is int8, int4 if uint8; int8
    scales [.., N] are per row, [.., N, K/G] per group); a QuantizationError naming the file and tensor
    when a piece is missing."""
    q = state.get(f"{name}.qweight")
    bits = 8 if q is not None and q.dtype == torch.int8 else 4
    needed = ("qweight", "scales") if bits == 8 else ("qweight", "scales", "zeros")
    missing = [f"{name}.{p}" for p in needed if f"{name}.{p}" not in state]
    if missing:
        raise QuantizationError(f"{where}: quantized tensor {name} is missing {', '.join(missing)}")
    if bits == 8:
        return QuantizedWeight.from_int8(q, state[f"{name}.scales"])
    return QuantizedWeight.from_int4(unpack_nibbles(q), state[f"{name}.scales"], state[f"{name}.zeros"],
                                     keep_nibbles=keep_nibbles)


def load_quantized_model(model: torch.nn.Module, state: dict[str, torch.Tensor], settings: dict, where: str
                         ) -> torch.nn.Module:
    """Fill ``model`` (built on the meta device) from a quantized checkpoint's tensors, in place: a weight
    saved as ``.qweight`` + scales becomes quantized (its kind read from the tensors), the rest is float."""
    from moekit.model.experts import Experts

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, Experts) and f"{full}.gate_up_proj.qweight" in state:
                new = QuantizedExperts(read_quantized(state, f"{full}.gate_up_proj", where),
                                       read_quantized(state, f"{full}.down_proj", where))
                setattr(module, child_name, new)
            elif isinstance(child, torch.nn.Linear) and f"{full}.weight.qweight" in state:
                setattr(module, child_name, QuantizedLinear(read_quantized(state, f"{full}.weight", where),
                                                            state.get(f"{full}.bias")))
            elif isinstance(child, torch.nn.Embedding) and f"{full}.weight.qweight" in state:
                setattr(module, child_name, QuantizedEmbedding(read_quantized(state, f"{full}.weight", where, True)))
    float_state = {k: v for k, v in state.items() if not k.endswith((".qweight", ".scales", ".zeros"))}
    expected = set(model.state_dict())
    missing = sorted(expected - set(float_state))
    if missing:
        raise QuantizationError(f"{where}: missing tensors {missing[:5]}")
    model.load_state_dict({k: float_state[k] for k in expected}, strict=True, assign=True)
    model.quantization = dict(settings)
    return model


def dequantize_model(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Replace every quantized module by its float counterpart, in place (for training, conversion)."""
    from moekit.model.experts import Experts

    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, QuantizedLinear):
                new = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                new.weight = torch.nn.Parameter(child.qweight.dequantize(dtype))
                if child.bias is not None:
                    new.bias = torch.nn.Parameter(child.bias.detach().to(dtype))
            elif isinstance(child, QuantizedExperts):
                new = Experts.__new__(Experts)
                torch.nn.Module.__init__(new)
                new.num_experts, new.ffn_dim = child.num_experts, child.ffn_dim
                new.gate_up_proj = torch.nn.Parameter(child.gate_up_proj.dequantize(dtype))
                new.down_proj = torch.nn.Parameter(child.down_proj.dequantize(dtype))
            elif isinstance(child, QuantizedEmbedding):
                new = torch.nn.Embedding(*child.qweight.shape, device="meta")
                new.weight = torch.nn.Parameter(child.qweight.dequantize(dtype))
            else:
                continue
            setattr(module, child_name, new)
    if hasattr(model, "quantization"):
        del model.quantization
    return model


class QuantizedEmbedding(torch.nn.Module):
    """An embedding table kept quantized (a GGUF file's Q8_0 / Q4 ``token_embd``); rows are
    dequantized as they are looked up. ``weight`` is the table, usable as a tied output head."""

    def __init__(self, weight: QuantizedWeight):
        super().__init__()
        self.qweight = weight

    @property
    def weight(self) -> QuantizedWeight:
        return self.qweight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight.embedding(ids)


def assign_weights(model: torch.nn.Module, state: dict[str, torch.Tensor | QuantizedWeight]) -> torch.nn.Module:
    """Fill ``model`` (built on the meta device) from ``state`` whose values are float tensors or
    :class:`QuantizedWeight` s: a quantized weight turns its module into the quantized counterpart."""
    from moekit.model.experts import Experts

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, Experts) and isinstance(state.get(f"{full}.gate_up_proj"), QuantizedWeight):
                setattr(module, child_name, QuantizedExperts(state.pop(f"{full}.gate_up_proj"),
                                                             state.pop(f"{full}.down_proj")))
            elif isinstance(child, torch.nn.Linear) and isinstance(state.get(f"{full}.weight"), QuantizedWeight):
                setattr(module, child_name, QuantizedLinear(state.pop(f"{full}.weight"), state.pop(f"{full}.bias", None)))
            elif isinstance(child, torch.nn.Embedding) and isinstance(state.get(f"{full}.weight"), QuantizedWeight):
                setattr(module, child_name, QuantizedEmbedding(state.pop(f"{full}.weight")))
    model.load_state_dict(state, strict=True, assign=True)
    return model
