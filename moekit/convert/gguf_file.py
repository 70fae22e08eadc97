"""A GGUF file's key/values and tensor table, parsed with ``struct``; tensor data read row ranges at a time.

Layout (ggml's ``docs/gguf.md``, version 2 and 3, little-endian): magic ``GGUF``, uint32 version,
uint64 tensor and key/value counts; each key/value is a string key, a uint32 value type and the
value (strings are a uint64 length and UTF-8 bytes; arrays a uint32 item type, a uint64 count and
the items); each tensor info is a name, uint32 n_dims, uint64 dims (``ne[0]``, the row length,
first), a uint32 ggml type and a uint64 offset into the data section, which starts at the next
multiple of ``general.alignment`` (default 32) after the table.

Why not gguf-py's ``GGUFReader``: it builds numpy views and Python lists for every part of every
field (for SmolLM2's 49,152 token strings and 48,900 merges, ~160 MB of objects for a 98 MB file)
and maps the whole file, whose pages count in the process's resident set once read. Here an array is
only located when the file is opened and decoded when asked for, and tensor data is read with
``readinto`` into buffers the caller owns, so reading a tensor leaves no file pages mapped.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from moekit.errors import CheckpointError

__all__ = ["GGUFFile", "TensorInfo"]

_SCALAR = {GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
           GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?",
           GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d"}
_VERSIONS = (2, 3)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the table: ``shape`` in torch order (rows, then the row length), absolute data ``offset``."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    offset: int
    row_bytes: int  # bytes of one row (shape[-1] values: a whole number of blocks)

    @property
    def rows(self) -> int:
        """Rows over all leading dimensions (1 for a vector)."""
        return int(np.prod(self.shape[:-1], dtype=np.int64)) if len(self.shape) > 1 else 1

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass(frozen=True)
class _Array:
    """An array value left in the file: item type, count and where its items start."""

    item: GGUFValueType
    count: int
    offset: int


class GGUFFile:
    """An open GGUF file (a context manager): ``get(key)`` decodes a value, ``tensors`` maps names to
    :class:`TensorInfo`, :meth:`read_rows` reads tensor data. Every structural problem (bad magic,
    unknown version or type, a table or tensor running past the end) is a :class:`CheckpointError`
    naming the file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"GGUF file not found: {self.path}")
        self._file = open(self.path, "rb")  # noqa: SIM115 -- closed by close() / __exit__
        try:
            self.size = os.fstat(self._file.fileno()).st_size
            # NOTE: only the metadata region of this map is ever touched (tensor data is read with
            # readinto), so its resident pages stay the size of the header.
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            self._parse()
        except (ValueError, KeyError, IndexError, OSError, UnicodeDecodeError, struct.error, OverflowError) as e:
            self.close()
            raise CheckpointError(f"{self.path} is not a valid GGUF file or is truncated ({type(e).__name__}: {e})"
                                  ) from None
        except CheckpointError:
            self.close()
            raise

    # ---- parsing
    def _unpack(self, fmt: str, pos: int) -> tuple[Any, int]:
        return struct.unpack_from("<" + fmt, self._map, pos)[0], pos + struct.calcsize("<" + fmt)

    def _string(self, pos: int) -> tuple[str, int]:
        n, pos = self._unpack("Q", pos)
        if pos + n > self.size:
            raise ValueError(f"a string of {n} bytes at offset {pos} runs past the end of the file")
        return self._map[pos:pos + n].decode("utf-8"), pos + n

    def _skip(self, vtype: GGUFValueType, pos: int) -> int:
        """The offset after a value of ``vtype`` at ``pos``, without decoding it."""
        if vtype in _SCALAR:
            return pos + struct.calcsize("<" + _SCALAR[vtype])
        if vtype == GGUFValueType.STRING:
            n, pos = self._unpack("Q", pos)
            return pos + n
        item, pos = self._unpack("I", pos)
        count, pos = self._unpack("Q", pos)
        item = GGUFValueType(item)
        if item in _SCALAR:
            return pos + count * struct.calcsize("<" + _SCALAR[item])
        for _ in range(count):  # strings (token lists) or nested arrays: walk the lengths
            pos = self._skip(item, pos)
        return pos

    def _value(self, vtype: GGUFValueType, pos: int) -> tuple[Any, int]:
        """A scalar or string decoded, an array located (:class:`_Array`); and the offset after it."""
        if vtype in _SCALAR:
            return self._unpack(_SCALAR[vtype], pos)
        if vtype == GGUFValueType.STRING:
            return self._string(pos)
        if vtype != GGUFValueType.ARRAY:
            raise ValueError(f"unknown value type {vtype}")
        item, start = self._unpack("I", pos)
        count, start = self._unpack("Q", start)
        return _Array(GGUFValueType(item), count, start), self._skip(vtype, pos)

    def _parse(self) -> None:
        if self.size < 24 or self._map[:4] != b"GGUF":
            raise ValueError("GGUF magic invalid")
        version, pos = self._unpack("I", 4)
        if version not in _VERSIONS:
            hint = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
            raise CheckpointError(f"{self.path}: GGUF version {version}{hint} is not supported; supported: "
                                  f"little-endian versions {list(_VERSIONS)}")
        n_tensors, pos = self._unpack("Q", pos)
        n_kv, pos = self._unpack("Q", pos)
        self.fields: dict[str, tuple[GGUFValueType, Any]] = {}
        for _ in range(n_kv):
            key, pos = self._string(pos)
            vtype, pos = self._unpack("I", pos)
            vtype = GGUFValueType(vtype)
            value, pos = self._value(vtype, pos)
            self.fields[key] = (vtype, value)
        infos = []
        for _ in range(n_tensors):
            name, pos = self._string(pos)
            n_dims, pos = self._unpack("I", pos)
            dims = struct.unpack_from(f"<{n_dims}Q", self._map, pos)
            pos += 8 * n_dims
            qtype, pos = self._unpack("I", pos)
            offset, pos = self._unpack("Q", pos)
            infos.append((name, tuple(int(d) for d in reversed(dims)), GGMLQuantizationType(qtype), offset))
        alignment = self.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"general.alignment={alignment!r} is not a power of two")
        data = -(-pos // alignment) * alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, qtype, offset in infos:
            block, type_size = GGML_QUANT_SIZES[qtype]
            if shape and shape[-1] % block:
                raise ValueError(f"tensor {name!r}: row length {shape[-1]} is not a multiple of {qtype.name}'s "
                                 f"block of {block}")
            t = TensorInfo(name, shape, qtype, data + offset, (shape[-1] if shape else 1) // block * type_size)
            if t.offset + t.nbytes > self.size:
                raise ValueError(f"tensor {name!r} ({t.nbytes} bytes at offset {t.offset}) runs past the end of the "
                                 f"file ({self.size} bytes)")
            self.tensors[name] = t

    # ---- metadata
    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` (an array as a list), or ``default`` when absent."""
        field = self.fields.get(key)
        if field is None:
            return default
        value = field[1]
        return self._decode_array(value) if isinstance(value, _Array) else value

    def length(self, key: str) -> int:
        """Number of items of an array value, without decoding it (0 when absent or not an array)."""
        field = self.fields.get(key)
        return field[1].count if field is not None and isinstance(field[1], _Array) else 0

    def _decode_array(self, a: _Array) -> list:
        if a.item in _SCALAR:
            dtype = np.dtype("<" + _SCALAR[a.item])
            return np.frombuffer(self._map, dtype=dtype, count=a.count, offset=a.offset).tolist()
        out, pos = [], a.offset
        for _ in range(a.count):
            value, pos = self._value(a.item, pos)
            out.append(self._decode_array(value) if isinstance(value, _Array) else value)
        return out

    # ---- tensor data
    def read_rows(self, t: TensorInfo, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of ``t`` (over its flattened leading dimensions) as raw bytes, uint8
        [stop - start, row_bytes], in a fresh buffer."""
        out = np.empty((stop - start, t.row_bytes), dtype=np.uint8)
        self.read_into(t, start, out)
        return out

    def read_into(self, t: TensorInfo, start: int, out: np.ndarray) -> None:
        """Fill ``out`` (C-contiguous, any dtype) with the bytes of ``t`` from row ``start`` on."""
        view = memoryview(out).cast("B")
        self._file.seek(t.offset + start * t.row_bytes)
        if self._file.readinto(view) != len(view):
            raise CheckpointError(f"{self.path}: tensor {t.name!r} is truncated")

    # ---- lifetime
    def close(self) -> None:
        if getattr(self, "_map", None) is not None:
            self._map.close()
            self._map = None
        self._file.close()

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
