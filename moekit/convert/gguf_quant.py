"""GGUF blocks -> the pieces of moekit's quantized weights, a few rows at a time, without going through float.

Legend: r rows in a chunk, K inputs, B = K / 32 blocks per row.

llama.cpp's blocks (``ggml-common.h``), 32 weights each:
- Q4_0: f16 ``d``, 16 bytes of nibbles (weights 0-15 low, 16-31 high); ``w = d * (q - 8)``
  -> int4, group 32, scale ``d``, zero ``0``.
- Q4_1: f16 ``d``, f16 ``m``, 16 bytes of nibbles; ``w = d * q + m`` -> scale ``d``, zero ``m + 8 d``.
  The integers are kept exactly; the kernel reads scale and zero in bfloat16, so a weight differs from
  llama.cpp's own dequantization by at most the rounding of ``d`` and ``m + 8 d`` to 8 bits.
- Q8_0: f16 ``d``, 32 int8; ``w = d * q`` -> int8 in groups of 32 with the float16 ``d`` kept
  (``moekit.quant.QuantizedWeight``, grouped int8): ``dequantize()`` equals llama.cpp's exactly. A
  tensor whose every row has one scale throughout (moekit's own int8 export) becomes per-row int8,
  the same numbers with the faster kernel.
Every other type is dequantized by gguf-py (``gguf.quants``), a chunk at a time, to float.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

INT4_TYPES = (Q.Q4_0, Q.Q4_1)
_BLOCK_BYTES = {Q.Q4_0: 18, Q.Q4_1: 20, Q.Q8_0: 34}


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 at byte ``at`` of every block [r, B, bytes] -> float16 [r, B]."""
    return np.ascontiguousarray(blocks[..., at:at + 2]).view(np.float16)[..., 0]


def _blocks(raw: np.ndarray, qtype: Q) -> np.ndarray:
    return raw.reshape(raw.shape[0], -1, _BLOCK_BYTES[qtype])  # [r, B, bytes]


def int4_rows(raw: np.ndarray, qtype: Q) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0 / Q4_1 rows (raw uint8 [r, row_bytes]) -> (q uint8 [r, K] in [0, 15], scale, zero float32 [r, B])."""
    blocks = _blocks(raw, qtype)
    d = torch.from_numpy(_f16(blocks, 0).astype(np.float32))
    if qtype == Q.Q4_0:
        zero, qs = torch.zeros_like(d), blocks[..., 2:18]
    else:
        zero, qs = torch.from_numpy(_f16(blocks, 2).astype(np.float32)) + 8 * d, blocks[..., 4:20]
    qs = torch.from_numpy(np.ascontiguousarray(qs))  # [r, B, 16]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(raw.shape[0], -1)  # weights 0-15 low nibbles, 16-31 high
    return q, d, zero


def int8_rows(raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 rows -> (q int8 [r, K], d float16 [r, B])."""
    blocks = _blocks(raw, Q.Q8_0)
    qs = np.ascontiguousarray(blocks[..., 2:34]).view(np.int8).reshape(raw.shape[0], -1)
    return torch.from_numpy(qs), torch.from_numpy(_f16(blocks, 0).copy())


def row_scale(d: torch.Tensor) -> torch.Tensor | None:
    """Q8_0 block scales ``d`` [r, B] as one per row [r] (bfloat16, the per-row kernel's), when every
    block of each row has the same ``d`` and bfloat16 holds it exactly; else None."""
    first = d[:, :1]
    if not (torch.equal(d, first.expand_as(d)) and torch.equal(first.to(torch.bfloat16).to(torch.float16), first)):
        return None
    return first[:, 0].to(torch.bfloat16)


def float_rows(raw: np.ndarray, qtype: Q, K: int) -> torch.Tensor:
    """Rows of any type gguf-py reads -> float32 [r, K] (F32: a view of ``raw``)."""
    if qtype == Q.F32:
        return torch.from_numpy(raw.view(np.float32).reshape(raw.shape[0], K))
    return torch.from_numpy(np.ascontiguousarray(quants.dequantize(raw, qtype), dtype=np.float32).reshape(-1, K))
