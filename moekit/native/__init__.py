"""Native decode kernels: a C++ extension (``kernels.cpp``) built once at install, used by the inference
runner for the few rows of a decode step; the PyTorch path stays the reference and the fallback.

What it provides (see kernels.cpp for the arithmetic):
- ``linear``: x [M, K] @ w.T for M of 1-32 rows (float32 activations) and a float32, bfloat16, int8 (per
  row) or int4 (groups of 32k) weight, with activations quantized to int8 per block for the integer weights (llama.cpp's q8_0 way;
  AVX512-VNNI, AVX2 or plain C, chosen at run time). Each output row depends on its own input row only.
- ``moe``: the chosen experts' SwiGLU for a batch of rows, gate-weighted and summed, in one call.
- ``dequantize``: a weight as float32, for prefill chunks (one dequantization, then a float32 GEMM).

Building: ``python -m moekit.native build`` (``make run`` / ``make test`` do it) compiles with the
machine's C++ compiler through ``torch.utils.cpp_extension`` into ``$MOEKIT_NATIVE_DIR`` (default
``~/.cache/moekit/native/<torch version>-<source hash>``); at run time the built module is imported
from there, never compiled. Where it is missing or does not load, moekit says so in one line (once)
and runs the PyTorch path. ``MOEKIT_NATIVE=0`` turns the native path off.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.cpp")
NAME = "moekit_native"
#: Rows up to which a product runs on the native kernels (decode); above, the PyTorch path (prefill).
MAX_ROWS = 32
KINDS = {"float32": 0, "int8": 1, "int4": 2, "bfloat16": 3}
ISAS = ("plain C", "AVX2", "AVX512-VNNI")

_state: dict = {}


def build_dir() -> Path:
    env = os.environ.get("MOEKIT_NATIVE_DIR")
    if env:
        return Path(env)
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    return Path.home() / ".cache" / "moekit" / "native" / f"torch{torch.__version__}-{digest}"


def build(verbose: bool = False):
    """Compile the extension (about 40 s on 2 cores) and return the module; raises where it cannot."""
    from torch.utils.cpp_extension import load

    d = build_dir()
    d.mkdir(parents=True, exist_ok=True)
    module = load(NAME, [str(SOURCE)], build_directory=str(d), extra_cflags=["-O3", "-std=c++17"],
                  verbose=verbose)
    _state.clear()
    return module


def _built_library() -> Path | None:
    d = build_dir()
    for path in sorted(d.glob(f"{NAME}*.so")) if d.is_dir() else []:
        return path
    return None


def kernels():
    """The extension module, or None (then one line on stderr, once, says why)."""
    if "module" in _state:
        return _state["module"]
    module, why = None, None
    if os.environ.get("MOEKIT_NATIVE", "1") == "0":
        why = None  # turned off on purpose: no notice
    elif (path := _built_library()) is None:
        why = f"not built (run `python -m moekit.native build`; looked in {build_dir()})"
    else:
        try:
            loader = importlib.machinery.ExtensionFileLoader(NAME, str(path))
            spec = importlib.util.spec_from_file_location(NAME, path, loader=loader)
            module = importlib.util.module_from_spec(spec)
            loader.exec_module(module)
        except (ImportError, OSError) as e:
            module, why = None, f"{path} does not load ({e}); rebuild with `python -m moekit.native build`"
    if why:
        print(f"moekit: native decode kernels {why}; using the PyTorch path", file=sys.stderr)
    _state["module"] = module
    return module


def available() -> bool:
    return kernels() is not None


def disable_for_tests(off: bool = True) -> None:
    """Simulate a machine without the extension (True) or load it again (False)."""
    _state.clear()
    if off:
        _state["module"] = None


def native_weight(w, bias: torch.Tensor | None = None):
    """``w`` (a float32 or bfloat16 tensor [N, K], or a 2-D :class:`moekit.quant.QuantizedWeight`) with its
    bias (float32), as the
    kernels' ``Weight`` (which keeps the tensors alive), or None where the kernels do not take it (other
    dtypes, grouped int8, widths not a multiple of 32 (int4: 64), tensors off the CPU, no kernels). Float
    and int8 weights (values and bfloat16 scales) are used in place; an int4 weight gives its nibbles
    (kept, or unpacked from PyTorch's packed layout: a copy) and bfloat16 scales and zeros row by row
    (a copy: PyTorch's are groups first)."""
    from moekit.quant import QuantizedWeight, pack_nibbles

    k = kernels()
    if k is None or (bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu")):
        return None
    bias = None if bias is None else bias.detach().contiguous()
    if isinstance(w, torch.Tensor):
        if w.dtype not in (torch.float32, torch.bfloat16) or w.dim() != 2 or w.device.type != "cpu" or w.shape[1] % 32:
            return None
        kind = KINDS["float32" if w.dtype == torch.float32 else "bfloat16"]
        return k.Weight(kind, [w.detach().contiguous()], 0, bias)
    if not isinstance(w, QuantizedWeight) or len(w.shape) != 2 or w.q.device.type != "cpu":
        return None
    N, K = w.shape
    if w.bits == 8 and w.group_size is None and K % 32 == 0:
        return k.Weight(KINDS["int8"], [w.q.contiguous(), w.scale.contiguous()], 0, bias)
    G = w.group_size or 0
    if w.bits == 4 and K % 64 == 0 and G >= 32 and G & (G - 1) == 0 and K % G == 0:
        nib = w.nibbles if w.nibbles is not None else pack_nibbles(w.int4_values())
        scale, zero = w.scales_zeros()  # (float32 of the weight's bfloat16 values: exact back in bfloat16)
        return k.Weight(KINDS["int4"], [nib.contiguous(), scale.to(torch.bfloat16).contiguous(),
                                        zero.to(torch.bfloat16).contiguous()], G, bias)
    return None


def isa() -> str:
    k = kernels()
    return "none" if k is None else ISAS[k.isa()]
