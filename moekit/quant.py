"""Weight-only quantization: int8 per output channel, int4 group-wise (pure functions + one container).

Legend: N output features (rows), K input features, G group size, E experts (stacked weights).

Kernels: PyTorch's own CPU kernels, ``aten._weight_int8pack_mm`` (int8 rows x per-row scale) and
``aten._weight_int4pack_mm_for_cpu`` (int4 in PyTorch's packed layout, a scale and a zero point per
group of G input features: ``w = (q - 8) * scale + zero``). Measured on this 2-core x86 CPU (torch
2.13, [1, 512] x [512, 8192]): both run at ~145 us with bfloat16 activations against 307 us for the
float32 ``F.linear``, but take 1.7 ms / 4.3 ms with float32 activations (a slow fallback), so
quantized matmuls run their activations in bfloat16 and return the caller's dtype. Above ~8 rows
they lose to a bfloat16 GEMM; that regime (prefill) is bounded by compute anyway.

On disk (safetensors), a quantized weight ``name`` [..., N, K] is stored as ``name.qweight`` (int8
[..., N, K], or uint8 [..., N, K/2] for int4: two values per byte, low nibble first) and
``name.scales`` (float [..., N], or [..., N, K/G] for int4) plus ``name.zeros`` for int4.
"""

from __future__ import annotations

import math
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
@dataclass
class QuantizedWeight:
    """A quantized [N, K] weight, or a stack [E, N, K] of them (indexing gives one expert's).

    int8: ``q`` int8 [.., N, K], ``scale`` [.., N]. int4: ``q`` in PyTorch's CPU packed layout
    (uint8 [.., N, K/2], from ``aten._convert_weight_to_int4pack_for_cpu``) and ``scale_zero``
    bfloat16 [.., K/G, N, 2], the layouts the kernels read; ``nibbles`` (the portable form) is kept
    only when asked (embeddings, exports), see :meth:`from_int4`.
    """

    bits: int
    shape: tuple[int, ...]
    q: torch.Tensor
    scale: torch.Tensor | None = None  # int8: [.., N] bfloat16
    scale_zero: torch.Tensor | None = None  # int4: [.., K/G, N, 2] bfloat16
    group_size: int | None = None
    nibbles: torch.Tensor | None = None  # int4 portable form [.., N, K/2] (low nibble first), if kept

    # ---- construction
    @classmethod
    def from_int8(cls, q: torch.Tensor, scale: torch.Tensor) -> QuantizedWeight:
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
        *lead, N, K = q_NK.shape
        G = K // scale.shape[-1]
        flat = q_NK.reshape(-1, N, K).to(torch.int32)
        packed = torch.stack([torch.ops.aten._convert_weight_to_int4pack_for_cpu(m.contiguous(), 1) for m in flat])
        sz = torch.stack([scale.float(), zero.float()], dim=-1).reshape(-1, N, K // G, 2).transpose(1, 2)
        return cls(4, (*lead, N, K), packed.reshape(*lead, *packed.shape[1:]),
                   scale_zero=sz.reshape(*lead, K // G, N, 2).to(torch.bfloat16).contiguous(), group_size=G,
                   nibbles=pack_nibbles(q_NK.to(torch.uint8)) if keep_nibbles else None)

    @classmethod
    def quantize(cls, w: torch.Tensor, bits: int, group_size: int | None = None, keep_nibbles: bool = False
                 ) -> QuantizedWeight:
        check_settings(bits, group_size)
        if bits == 8:
            return cls.from_int8(*quantize_int8(w))
        return cls.from_int4(*quantize_int4(w, group_size), keep_nibbles=keep_nibbles)

    # ---- use
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
        x2 = x.reshape(-1, K).to(torch.bfloat16)
        if self.bits == 8:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.q, self.scale)
        else:
            # NOTE: the kernel reads scale_zero as contiguous (a strided view, e.g. a block of rows of a
            # fused weight, gives wrong results silently); .contiguous() copies only such a view.
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.q, self.group_size, self.scale_zero.contiguous())
        return y.to(x.dtype).reshape(*lead, self.shape[-2])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.bits == 8:
            return dequantize_int8(self.q, self.scale).to(dtype)
        return dequantize_int4(self.int4_values(), *self.scales_zeros()).to(dtype)

    def scales_zeros(self) -> tuple[torch.Tensor, torch.Tensor]:
        """int4: scale and zero [.., N, K/G] in float32, exactly the (bfloat16) values the kernel uses."""
        sz = self.scale_zero.float().transpose(-3, -2)  # [.., N, K/G, 2]
        return sz[..., 0], sz[..., 1]

    def int4_values(self) -> torch.Tensor:
        """The int4 values q [.., N, K] in [0, 15] (from the kept nibbles, or unpacked from the kernel layout)."""
        if self.nibbles is not None:
            return unpack_nibbles(self.nibbles)
        return _unpack_kernel_layout(self.q, self.shape[-2], self.shape[-1])

    def embedding(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows ``ids`` of the weight, dequantized: a quantized embedding table."""
        if self.bits == 8:
            return (self.q[ids].float() * self.scale[ids].float()[..., None]).to(dtype)
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
    if w.bits == 4 and w.nibbles is None:
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


_LAYOUTS: dict[tuple[int, int], torch.Tensor] = {}


def _unpack_kernel_layout(packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """Invert ``_convert_weight_to_int4pack_for_cpu`` for an [N, K] shape.

    The kernel layout is internal to PyTorch, so it is discovered rather than assumed: pack the
    base-16 digits of every element's flat index, read where each digit lands, and build the
    permutation from nibble slot to (n, k). Cached per shape.
    """
    key = (N, K)
    if key not in _LAYOUTS:
        index = torch.arange(N * K, dtype=torch.int64).reshape(N, K)
        digits = max(1, math.ceil(math.log(N * K, 16)))
        source = torch.zeros(N * K, dtype=torch.int64)  # nibble slot -> flat (n, k) index
        for d in range(digits):
            part = ((index >> (4 * d)) & 0xF).to(torch.int32)
            slots = unpack_nibbles(torch.ops.aten._convert_weight_to_int4pack_for_cpu(part, 1)).reshape(-1)
            source += slots.to(torch.int64) << (4 * d)
        _LAYOUTS[key] = source
    source = _LAYOUTS[key]
    lead = packed.shape[:-2]
    slots = unpack_nibbles(packed.reshape(-1, *packed.shape[-2:])).reshape(-1, N * K)
    out = torch.empty_like(slots)
    out[:, source] = slots
    return out.reshape(*lead, N, K)


# --------------------------------------------------------------------------- rows (fusing, permuting)
def select_rows(w: QuantizedWeight, index: torch.Tensor) -> QuantizedWeight:
    """Rows ``index`` of a quantized weight, 2-D or stacked [E, N, K] (exact: rows are quantized
    independently)."""
    if w.bits == 8:
        return QuantizedWeight.from_int8(w.q[..., index, :], w.scale[..., index])
    scale, zero = w.scales_zeros()
    return QuantizedWeight.from_int4(w.int4_values()[..., index, :], scale[..., index, :], zero[..., index, :],
                                     keep_nibbles=w.nibbles is not None)


def cat_rows(ws: list[QuantizedWeight]) -> QuantizedWeight:
    """Stack 2-D quantized weights along their rows (exact), e.g. q/k/v into one projection."""
    if len({(w.bits, w.group_size, w.shape[-1]) for w in ws}) != 1:
        raise QuantizationError("weights to concatenate must share bits, group size and input width")
    if ws[0].bits == 8:
        return QuantizedWeight.from_int8(torch.cat([w.q for w in ws]), torch.cat([w.scale for w in ws]))
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
        g = f", group {self.qweight.group_size}" if self.qweight.bits == 4 else ""
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
        if w.bits == 8:
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
    """The quantized weight ``name`` from saved tensors (int8 if ``qweight`` is int8, int4 if uint8); a
    QuantizationError naming the file and tensor when a piece is missing."""
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
