"""Storage dtypes for saved weights: names users type (``bf16``) and the state dict in that dtype.

A model saved in bfloat16 or float16 takes half the disk space of float32. Some buffers stay float32
whatever the model's dtype (a module lists them in ``FLOAT32_BUFFERS``; today the DeepSeek-V3
selection bias of :class:`moekit.model.router.SigmoidBiasRouter`, whose ``_apply`` keeps it float32
through ``model.to(dtype)``), and a saved file keeps them float32 too.
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.config import ConfigError

# The names `moekit convert --dtype` and `save(..., dtype=)` take, as llama.cpp and safetensors spell them.
FLOAT_DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
_TORCH_NAMES = {"bfloat16": "bf16", "float16": "f16", "half": "f16", "float32": "f32", "float": "f32"}


def float_dtype(value: torch.dtype | str) -> torch.dtype:
    """``"bf16"``, ``"f16"``, ``"f32"`` (or the torch names, or a torch dtype) as a torch dtype; anything
    else is a ConfigError naming the choices."""
    if isinstance(value, torch.dtype) and value in FLOAT_DTYPES.values():
        return value
    name = _TORCH_NAMES.get(str(value).removeprefix("torch."), value)
    if name not in FLOAT_DTYPES:
        raise ConfigError(f"dtype={value!r} is not a storage dtype; choose one of {', '.join(FLOAT_DTYPES)}")
    return FLOAT_DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The short name of a torch dtype ("bf16"), or torch's own for others ("int8")."""
    return next((k for k, v in FLOAT_DTYPES.items() if v == dtype), str(dtype).removeprefix("torch."))


def float32_buffers(model: nn.Module) -> set[str]:
    """State-dict names of the buffers kept in float32 whatever the model's dtype (``FLOAT32_BUFFERS``)."""
    return {f"{prefix}.{name}" if prefix else name
            for prefix, module in model.named_modules() for name in getattr(module, "FLOAT32_BUFFERS", ())}


def state_dict_as(model: nn.Module, dtype: torch.dtype | str | None = None) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` detached, floating-point tensors in ``dtype`` (None: as they are), the
    :func:`float32_buffers` in float32: what ``model.to(dtype).state_dict()`` would hold, without casting
    the model. A tensor already in its dtype is not copied; the others exist twice while saving."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if dtype is None:
        return state
    dtype, keep = float_dtype(dtype), float32_buffers(model)
    return {k: v.to(torch.float32 if k in keep else dtype) if v.is_floating_point() else v for k, v in state.items()}
