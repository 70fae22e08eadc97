"""Experts stored stacked: one [E, ...] tensor per projection, so one layout serves grouped matmul,
quantization (quant.py) and offloading (infer/offload.py).

Legend: T tokens, D model dim, F expert FFN dim, E experts, A (token, expert) assignments.
Weights follow the ``nn.Linear`` convention (out, in), matching Hugging Face's fused 3-D layout:
``gate_up_proj [E, 2F, D]`` (gate rows first, then up) and ``down_proj [E, D, F]``.

Two dispatch paths with the same result (tested forward and backward):
- :meth:`Experts.reference` -- the plain loop: for each expert, pick its tokens with a mask.
- :meth:`Experts.forward`   -- the fast dropless path: sort assignments by expert so that each expert's
  tokens are one contiguous slice, run the SwiGLU as grouped matmuls, scatter-add back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config import ModelConfig


class GroupedSwiGLU(torch.autograd.Function):
    """SwiGLU over contiguous per-expert row groups, with a hand-written backward.

    Plan (forward): for each expert e with rows x_e: h_e = x_e @ W1_e^T (gate and up fused in one
    matmul), a_e = silu(g_e) * u_e, y_e = a_e @ W2_e^T. The backward reuses the same row groups and
    writes each expert's weight gradient in place, so no per-expert autograd nodes, splits or
    concatenations are created, and the SwiGLU derivative is three fused elementwise ops. On a CPU
    those elementwise passes, not the matmuls, are what separates an MoE layer from a dense MLP.
    Saved for backward (as autograd would): x, the weights, h = [g, u], silu(g) and a.
    """

    @staticmethod
    def forward(ctx, x_AD: torch.Tensor, w1_E2FD: torch.Tensor, w2_EDF: torch.Tensor, counts: list[int]):
        offs = _offsets(counts, x_AD)
        h_A2F = _group_mm(x_AD, w1_E2FD, counts, offs, transpose=True)
        g_AF, u_AF = h_A2F.chunk(2, dim=-1)
        silu_AF = F.silu(g_AF)
        a_AF = silu_AF * u_AF
        y_AD = _group_mm(a_AF, w2_EDF, counts, offs, transpose=True)
        ctx.save_for_backward(x_AD, w1_E2FD, w2_EDF, h_A2F, silu_AF, a_AF)
        ctx.counts, ctx.offs = counts, offs
        return y_AD

    @staticmethod
    def backward(ctx, dy_AD: torch.Tensor):
        x_AD, w1, w2, h_A2F, silu_AF, a_AF = ctx.saved_tensors
        counts, offs = ctx.counts, ctx.offs
        dy_AD = dy_AD.contiguous()
        dw2 = _group_outer(dy_AD, a_AF, counts, offs)  # [E, D, F]
        da_AF = _group_mm(dy_AD, w2, counts, offs)  # [A, F]
        g_AF, u_AF = h_A2F.chunk(2, dim=-1)
        Fe = a_AF.shape[1]
        dh_A2F = torch.empty_like(h_A2F)
        torch.ops.aten.silu_backward(da_AF * u_AF, g_AF, grad_input=dh_A2F[:, :Fe])
        torch.mul(da_AF, silu_AF, out=dh_A2F[:, Fe:])
        dw1 = _group_outer(dh_A2F, x_AD, counts, offs)  # [E, 2F, D]
        dx_AD = _group_mm(dh_A2F, w1, counts, offs) if ctx.needs_input_grad[0] else None  # [A, D]
        return dx_AD, dw1, dw2, None


# torch's grouped GEMM (one call for all experts: the loop over groups runs in C++, not Python) covers
# float32 and bfloat16 on the CPU since torch 2.9; elsewhere, and for other dtypes, a Python loop of mm.
_GROUPED_MM_DTYPES = (torch.float32,)


def _offsets(counts: list[int], like: torch.Tensor) -> torch.Tensor | None:
    if not hasattr(F, "grouped_mm") or like.device.type != "cpu" or like.dtype not in _GROUPED_MM_DTYPES:
        return None
    return torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32)


def _group_mm(x_AK: torch.Tensor, w_EXY: torch.Tensor, counts: list[int], offs: torch.Tensor | None,
              transpose: bool = False) -> torch.Tensor:
    """Rows of group e times ``w[e]`` (``w[e]^T`` with ``transpose``): [A, K] -> [A, N]."""
    if offs is not None:
        # NOTE: the transposed view, not a contiguous copy: BLAS takes it as is (the copy cost 1.5x).
        return F.grouped_mm(x_AK, w_EXY.transpose(-2, -1) if transpose else w_EXY, offs=offs)
    out = x_AK.new_empty(x_AK.shape[0], w_EXY.shape[1] if transpose else w_EXY.shape[2])
    for e, rows in _groups(counts):
        torch.mm(x_AK[rows], w_EXY[e].t() if transpose else w_EXY[e], out=out[rows])
    return out


def _group_outer(dy_AN: torch.Tensor, x_AK: torch.Tensor, counts: list[int], offs: torch.Tensor | None) -> torch.Tensor:
    """Per group e: ``dy[rows]^T @ x[rows]`` -> [E, N, K] (a weight gradient; zero for an empty group)."""
    if offs is not None:
        return F.grouped_mm(dy_AN.t(), x_AK, offs=offs)
    out = dy_AN.new_zeros(len(counts), dy_AN.shape[1], x_AK.shape[1])
    for e, rows in _groups(counts):
        torch.mm(dy_AN[rows].t(), x_AK[rows], out=out[e])
    return out


def _groups(counts: list[int]):
    """(expert, row slice) for each expert with at least one row."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, slice(start, start + n)
        start += n


def swiglu_dtype(x_AD: torch.Tensor, w_EXY: torch.Tensor) -> torch.dtype:
    """The dtype :func:`grouped_swiglu` computes and returns in on a CPU (autocast's, when it is on)."""
    if torch.is_autocast_enabled(x_AD.device.type):
        return torch.get_autocast_dtype(x_AD.device.type)
    return torch.promote_types(x_AD.dtype, w_EXY.dtype)


def grouped_swiglu(x_AD: torch.Tensor, w1_E2FD: torch.Tensor, w2_EDF: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """SwiGLU of rows already sorted by expert; ``counts_E[e]`` rows belong to expert e."""
    if x_AD.is_cuda and hasattr(F, "grouped_mm") and x_AD.dtype == torch.bfloat16:
        # On GPUs torch's grouped GEMM kernel is the fast path (one launch for all experts).
        offs = counts_E.cumsum(0).to(torch.int32)
        h = F.grouped_mm(x_AD, w1_E2FD.transpose(-2, -1), offs=offs)
        g, u = h.chunk(2, dim=-1)
        return F.grouped_mm(F.silu(g) * u, w2_EDF.transpose(-2, -1), offs=offs)
    # NOTE: host sync -- the group sizes become Python ints for slicing.
    counts = counts_E.tolist()
    dtype = swiglu_dtype(x_AD, w1_E2FD)
    with torch.autocast(x_AD.device.type, enabled=False):
        return GroupedSwiGLU.apply(x_AD.to(dtype), _aligned(w1_E2FD, dtype), _aligned(w2_EDF, dtype), counts)


def _aligned(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``w`` in ``dtype`` at a 64-byte aligned address (a copy only when it is not already).

    NOTE: MKL's GEMM chooses its kernel by the operands' address alignment, so the same values at a 4-
    and at a 64-byte boundary round differently (measured: ~1e-6 in float32 logits). Weights that are
    views on a memory-mapped checkpoint (``infer/offload.py``) sit wherever the file packed them; in
    fresh memory (torch allocates at 64 bytes) their arithmetic is bit for bit that of a resident
    model. The copy lives for one call: one layer's experts, read from the file once either way.
    """
    w = w.to(dtype)
    return w.clone() if w.data_ptr() % 64 else w


def gather_by_expert(x_TD: torch.Tensor, token_ids_A: torch.Tensor, expert_ids_A: torch.Tensor, num_experts: int):
    """Assignments sorted by expert: (order [A], rows per expert [E], their tokens [A], their rows [A, D])."""
    # Unstable sort (half the time of a stable one): rows within an expert group may come in any
    # order, the GEMMs are per row, and the permutation is still a pure function of the input.
    order_A = torch.sort(expert_ids_A).indices
    counts_E = torch.bincount(expert_ids_A, minlength=num_experts)
    tok_A = token_ids_A[order_A]
    # Gather: each expert's tokens become one contiguous slice. NOTE: index_select, not x[tok]:
    # the backward of advanced indexing is index_put_(accumulate=True), several times slower on CPU.
    return order_A, counts_E, tok_A, x_TD.index_select(0, tok_A)


def combine(y_AD: torch.Tensor, weights_A: torch.Tensor, order_A: torch.Tensor, tok_A: torch.Tensor,
            x_TD: torch.Tensor) -> torch.Tensor:
    """Expert outputs (in :func:`gather_by_expert` order) times their gate weights, added into [T, D]."""
    y_AD = y_AD * weights_A[order_A, None].to(y_AD.dtype)
    out = torch.zeros(x_TD.shape, dtype=y_AD.dtype, device=x_TD.device)
    return out.index_add_(0, tok_A, y_AD).to(x_TD.dtype)


class Experts(nn.Module):
    """E SwiGLU experts with stacked weights."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, Fe = cfg.num_experts, cfg.dim, cfg.expert_ffn_dim
        self.num_experts, self.ffn_dim = E, Fe
        # Initialised here so a standalone layer is usable; Transformer.reset_parameters re-initialises.
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * Fe, D) * cfg.init_std)
        self.down_proj = nn.Parameter(torch.randn(E, D, Fe) * cfg.init_std)

    def forward(self, x_TD: torch.Tensor, token_ids_A: torch.Tensor, expert_ids_A: torch.Tensor,
                weights_A: torch.Tensor) -> torch.Tensor:
        """Fast dropless dispatch. Returns [T, D]; tokens with no assignment get zeros."""
        T, D = x_TD.shape
        if token_ids_A.numel() == 0:
            # Gradient anchor: keep every expert weight in the graph so that data/expert-parallel
            # gradient hooks still fire when no token was routed here (NeMo-Automodel PR #935).
            return x_TD.new_zeros(T, D) + 0.0 * (self.gate_up_proj.sum() + self.down_proj.sum()).to(x_TD.dtype)
        order_A, counts_E, tok_A, x_AD = gather_by_expert(x_TD, token_ids_A, expert_ids_A, self.num_experts)
        y_AD = grouped_swiglu(x_AD, self.gate_up_proj, self.down_proj, counts_E)
        return combine(y_AD, weights_A, order_A, tok_A, x_TD)

    def reference(self, x_TD: torch.Tensor, token_ids_A: torch.Tensor, expert_ids_A: torch.Tensor,
                  weights_A: torch.Tensor) -> torch.Tensor:
        """The plain loop: for each expert, the tokens assigned to it. Slow; the ground truth."""
        out = torch.zeros_like(x_TD)
        for e in range(self.num_experts):
            sel = expert_ids_A == e
            if not sel.any():
                continue
            tok = token_ids_A[sel]
            gate, up = F.linear(x_TD[tok], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_proj[e])
            out = out.index_add(0, tok, (y * weights_A[sel, None]).to(out.dtype))
        if token_ids_A.numel() == 0:
            out = out + 0.0 * (self.gate_up_proj.sum() + self.down_proj.sum()).to(out.dtype)
        return out
