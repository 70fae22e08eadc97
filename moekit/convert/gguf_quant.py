"""GGUF quantized blocks -> moekit's quantized weights, without going through float for 4-bit types.

Legend: R rows (output features), K inputs, B = K / 32 blocks per row.

llama.cpp's blocks (``ggml-common.h``), 32 weights each:
- Q4_0: f16 ``d``, 16 bytes of nibbles (weights 0-15 low, 16-31 high); ``w = d * (q - 8)``
  -> int4, group 32, scale ``d``, zero ``0``.
- Q4_1: f16 ``d``, f16 ``m``, 16 bytes of nibbles; ``w = d * q + m`` -> scale ``d``, zero ``m + 8 d``.
- Q8_0: f16 ``d``, 32 int8; ``w = d * q`` -> no per-block int8 kernel exists on the CPU, so the rows are
  requantized per output channel (int8, one scale per row), a few rows at a time; the extra error is at
  most half a step of the row's scale (measured in the tests).
Other types return None: the caller dequantizes them to float.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from moekit.quant import quantize_int8

KEPT_QUANTIZED = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0)
_BLOCK_BYTES = {GGMLQuantizationType.Q4_0: 18, GGMLQuantizationType.Q4_1: 20, GGMLQuantizationType.Q8_0: 34}
_REQUANT_ROWS = 256  # Q8_0 rows requantized at once (bounds the float temporary)


def quantized_parts(data: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]):
    """("int4", q uint8 [..., R, K], scale, zero [..., R, B]) or ("int8", q int8 [..., R, K], scale [..., R]),
    in torch shape order; None for a type kept as float."""
    if qtype not in KEPT_QUANTIZED or shape[-1] % 32:
        return None
    K = shape[-1]
    blocks = np.ascontiguousarray(data).reshape(-1, K // 32, _BLOCK_BYTES[qtype])  # [R*, B, bytes]
    if qtype == GGMLQuantizationType.Q8_0:
        d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)  # [R, B, 1]
        qs = blocks[..., 2:34].view(np.int8)  # [R, B, 32]
        q_out = torch.empty(blocks.shape[0], K, dtype=torch.int8)
        s_out = torch.empty(blocks.shape[0], dtype=torch.float32)
        for start in range(0, blocks.shape[0], _REQUANT_ROWS):
            rows = slice(start, start + _REQUANT_ROWS)
            w = torch.from_numpy(qs[rows].astype(np.float32) * d[rows]).reshape(-1, K)
            q_out[rows], s_out[rows] = quantize_int8(w)
        return "int8", q_out.reshape(*shape), s_out.reshape(*shape[:-1])
    d = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16).astype(np.float32))[..., 0]  # [R, B]
    if qtype == GGMLQuantizationType.Q4_0:
        zero, qs = torch.zeros_like(d), blocks[..., 2:18]
    else:
        m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16).astype(np.float32))[..., 0]
        zero, qs = m + 8 * d, blocks[..., 4:20]
    qs = torch.from_numpy(np.ascontiguousarray(qs))  # [R, B, 16]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(-1, K)  # weights 0-15 low nibbles, 16-31 high
    lead = shape[:-1]
    return "int4", q.reshape(*shape), d.reshape(*lead, K // 32), zero.reshape(*lead, K // 32)


def build(parts, keep_nibbles: bool = False):
    """A :class:`moekit.quant.QuantizedWeight` from :func:`quantized_parts`."""
    from moekit.quant import QuantizedWeight

    if parts[0] == "int8":
        return QuantizedWeight.from_int8(parts[1], parts[2])
    return QuantizedWeight.from_int4(parts[1], parts[2], parts[3], keep_nibbles=keep_nibbles)


def rows(parts, index: torch.Tensor):
    """The same rows (output features) of every piece, e.g. to undo llama.cpp's q/k permutation."""
    if parts[0] == "int8":
        return "int8", parts[1][..., index, :], parts[2][..., index]
    return "int4", *(t[..., index, :] for t in parts[1:])


def cat_rows(a, b):
    """Stack two weights' rows (gate and up experts into [E, 2F, D]); None when their kinds differ."""
    if a is None or b is None or a[0] != b[0]:
        return None
    if a[0] == "int8":
        return "int8", torch.cat([a[1], b[1]], dim=-2), torch.cat([a[2], b[2]], dim=-1)
    return "int4", *(torch.cat([x, y], dim=-2) for x, y in zip(a[1:], b[1:]))
