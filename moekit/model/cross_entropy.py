"""Fused linear + cross-entropy: the LM loss without ever materialising the [N, V] logits.

Legend: N tokens, D model dim, V vocabulary.

The plain path -- ``logits = h @ W^T``, ``F.cross_entropy(logits, y)`` -- allocates the logits, their
log-softmax and, in backward, a zero-filled gradient of the same size: three [N, V] float32 buffers
(32 MB each for 2048 tokens x 4096 vocab) whose allocation, page faults and memory traffic cost a CPU
step more than the matmul itself. Here the tokens go through in chunks small enough to stay in cache;
for each chunk the gradient with respect to its logits, ``(softmax - onehot) / n``, is formed right
away and pushed through the two matmuls of the backward, so the backward pass is two multiplies by
the incoming scalar. Same idea as Liger-Kernel's fused linear cross-entropy (Hsu et al. 2024).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND: torch.Tensor, w_VD: torch.Tensor, y_N: torch.Tensor, chunk: int,
                compute_dtype: torch.dtype, reduction: str):
        N, _ = h_ND.shape
        valid_N = y_N != IGNORE_INDEX
        n_valid = int(valid_N.sum())  # NOTE: host sync
        scale = 1.0 / max(n_valid, 1) if reduction == "mean" else 1.0
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w_c = w_VD.to(compute_dtype)
        grad_h = torch.empty(h_ND.shape, dtype=h_ND.dtype, device=h_ND.device) if need_h else None
        grad_w = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=h_ND.device)
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            h_c = h_ND[s:e].to(compute_dtype)
            logits_cV = torch.mm(h_c, w_c.t()).float()
            y_c = y_N[s:e]
            valid_c = valid_N[s:e]
            safe_y = torch.where(valid_c, y_c, 0)
            target_c = logits_cV.gather(1, safe_y[:, None]).squeeze(1)
            # One exp pass serves both the loss and the gradient: p = exp(z - max) / sum, in place.
            max_c = logits_cV.amax(dim=-1, keepdim=True)
            exp_cV = logits_cV.sub_(max_c).exp_()
            sum_c = exp_cV.sum(dim=-1)
            lse_c = max_c.squeeze(1) + sum_c.log()
            total += ((lse_c - target_c) * valid_c).sum()
            if need_h or need_w:
                # d(loss)/d(logits) = (softmax - onehot) * scale, zero on ignored positions; in place.
                grad_cV = exp_cV.div_(sum_c[:, None])
                grad_cV.scatter_add_(1, safe_y[:, None], -torch.ones_like(target_c)[:, None])
                grad_cV.mul_((valid_c.to(grad_cV.dtype) * scale)[:, None])
                g = grad_cV.to(compute_dtype)
                if need_h:
                    grad_h[s:e] = torch.mm(g, w_c).to(h_ND.dtype)
                if need_w:
                    if g.dtype == torch.float32:
                        grad_w.addmm_(g.t(), h_c)  # accumulate in place: no temporary [V, D]
                    else:
                        grad_w += torch.mm(g.t(), h_c).float()
        ctx.save_for_backward(grad_h if need_h else None, grad_w if need_w else None)
        ctx.w_dtype = w_VD.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * grad_out).to(ctx.w_dtype) if grad_w is not None else None
        return dh, dw, None, None, None, None


def linear_cross_entropy(h_ND: torch.Tensor, w_VD: torch.Tensor, y_N: torch.Tensor, chunk: int = 256,
                         reduction: str = "mean") -> torch.Tensor:
    """``F.cross_entropy(h @ W^T, y)`` (``ignore_index=-100``) computed in chunks of ``chunk`` tokens.

    Under CPU/GPU autocast the matmuls run in the autocast dtype and the softmax in float32, as the
    plain path would. Gradients flow to ``h`` and ``W`` (double backward is not supported).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r} is not one of ['mean', 'sum']")
    device = h_ND.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.promote_types(
        h_ND.dtype, w_VD.dtype)
    if not torch.is_grad_enabled():
        # Under no_grad / inference_mode the Function still sees requires_grad inputs as needing a
        # gradient (ctx.needs_input_grad), and would form it: two extra matmuls per chunk and two
        # gradient buffers that nobody reads. Detached inputs say what is true.
        h_ND, w_VD = h_ND.detach(), w_VD.detach()
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(h_ND, w_VD, y_N, chunk, dtype, reduction)


def reference_linear_cross_entropy(h_ND: torch.Tensor, w_VD: torch.Tensor, y_N: torch.Tensor,
                                   reduction: str = "mean") -> torch.Tensor:
    """The plain path, for tests and comparison."""
    return F.cross_entropy(F.linear(h_ND, w_VD).float(), y_N, ignore_index=IGNORE_INDEX, reduction=reduction)
