"""The MoE feed-forward: router + stacked experts + optional always-on shared experts.

Legend: B batch, T sequence, N = B*T tokens, D model dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config import ModelConfig
from moekit.model.experts import Experts
from moekit.model.layers import MLP
from moekit.model.router import RouterStats, build_router


class MoE(nn.Module):
    """y = sum over a token's assignments of weight * expert(x)  [+ shared expert(x)].

    A token whose assignments were all dropped (capacity) gets zeros here, so the block leaves it
    unchanged: it travels on the residual stream (Switch Transformer, sec. 2.2).
    ``dispatch`` selects the fast path ("fast") or the plain reference loop ("reference").
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.router = build_router(cfg)
        self.experts = Experts(cfg)
        self.shared_expert = MLP(cfg.dim, cfg.shared_expert_ffn_dim) if cfg.num_shared_experts else None
        self.shared_expert_gate = nn.Linear(cfg.dim, 1, bias=False) if cfg.shared_expert_gate else None
        self.dispatch = "fast"

    def forward(self, x_BTD: torch.Tensor, mask_BT: torch.Tensor | None = None,
                task_B: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, RouterStats]:
        """``task_B`` [B] long: each sequence's task id (task-aware routing; see moekit.model.router)."""
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        mask_N = None if mask_BT is None else mask_BT.reshape(B * T)
        task_N = None if task_B is None else task_B.repeat_interleave(T)  # one task per sequence, every token
        routing = self.router(x_ND, mask_N, task_N)
        run = self.experts.reference if self.dispatch == "reference" else self.experts
        y_ND = run(x_ND, routing.token_ids_A, routing.expert_ids_A, routing.weights_A)
        if self.shared_expert is not None:
            shared_ND = self.shared_expert(x_ND)
            if self.shared_expert_gate is not None:  # Qwen2-MoE: sigmoid gate per token
                shared_ND = F.sigmoid(self.shared_expert_gate(x_ND)) * shared_ND
            y_ND = y_ND + shared_ND
        return y_ND.view(B, T, D), routing.aux_loss, routing.stats
