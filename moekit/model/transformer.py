"""The decoder-only transformer: pre-norm blocks of attention + (dense MLP | MoE).

Legend: B batch, T sequence, D model dim, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config import ModelConfig
from moekit.model.cross_entropy import linear_cross_entropy
from moekit.model.layers import MLP, Attention, KVCache, LatentAttention, RMSNorm, rope_frequencies
from moekit.model.moe import MoE
from moekit.model.router import RouterStats, SigmoidBiasRouter


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, T, V]; None when ``labels`` were given (the loss is fused)
    aux_loss: torch.Tensor  # () sum over MoE layers of each layer's weighted balance + z losses
    router_stats: list[RouterStats] = field(default_factory=list)  # one per MoE layer, in depth order
    loss: torch.Tensor | None = None  # () mean next-token cross-entropy over labels != -100, if labels given


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = LatentAttention(cfg) if cfg.attention == "mla" else Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(layer)
        self.ffn = MoE(cfg) if self.is_moe else MLP(cfg.dim, cfg.ffn_dim)

    def forward(self, x, cos, sin, attn_mask, token_mask, cache=None, task_B=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, attn_mask, cache)
        h = self.ffn_norm(x)
        if self.is_moe:
            y, aux, stats = self.ffn(h, token_mask, task_B)
            return x + y, aux, stats
        return x + self.ffn(h), None, None


class Transformer(nn.Module):
    """``Transformer(cfg)(input_ids, attention_mask)`` -> :class:`ModelOutput`.

    ``attention_mask`` [B, T]: 1 = real token, 0 = padding. Padding keys are never attended to, and
    padding tokens are excluded from routing, capacity and the router losses.

    ``task_ids`` [B] long: each sequence's task, an index into ``cfg.tasks`` (issue 20). What it changes
    is ``cfg.task_routing``: "none" nothing; "embedding" each router's input (None: no task, the zero
    task vector); "task" which experts each token may use (required: refused when None).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.check_tasks()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Normal(0, init_std) weights; residual output projections scaled by 1/sqrt(2 * n_layers)
        (GPT-2); norms to one; biases and router biases to zero."""
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith((".bias", "noise_weight")):  # noisy top-k starts at softplus(0) noise
                p.zero_()
            elif name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
                p.copy_(torch.randn(p.shape, generator=gen) * out_std)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        for m in self.modules():
            if isinstance(m, SigmoidBiasRouter):
                m.bias.zero_()
        if self.cfg.num_experts and self.cfg.router == "switch" and self.cfg.switch_gate == "matched":
            # The gate p is ~1/E at init: E times larger outputs make p * expert(x) start at the dense scale.
            for moe in self.moe_layers():
                moe.experts.down_proj.mul_(self._switch_scale())

    def _switch_scale(self) -> float | torch.Tensor:
        """The "matched" switch init's output scale: E, or under task routing per expert the size m of its
        task's set (a token's probability is spread over those m experts only, p ~ 1/m; the mean size
        for an expert in several sets)."""
        cfg = self.cfg
        if cfg.task_routing != "task":
            return float(cfg.num_experts)
        sizes: dict[int, list[int]] = {}
        for experts in cfg.task_expert_sets().values():
            for e in experts:
                sizes.setdefault(e, []).append(len(experts))
        scale_E = torch.full((cfg.num_experts,), float(cfg.num_experts))  # (experts no task uses: as before)
        for e, ms in sizes.items():
            scale_E[e] = sum(ms) / len(ms)
        return scale_E[:, None, None]

    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.layers if b.is_moe]

    def set_dispatch(self, mode: str) -> None:
        """Use the fast expert dispatch ("fast") or the plain reference loop ("reference")."""
        if mode not in ("fast", "reference"):
            raise ValueError(f"dispatch mode {mode!r} is not one of ['fast', 'reference']")
        for moe in self.moe_layers():
            moe.dispatch = mode

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                labels: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                cache: list[KVCache] | None = None, task_ids: torch.Tensor | None = None) -> ModelOutput:
        """``positions`` [T] or [B, T] default to 0..T-1 (offset by the cache length when decoding).

        ``labels`` [B, T] (targets already aligned with the inputs; -100 = ignore) makes the model
        return ``loss`` computed by the fused linear cross-entropy, without materialising the logits.
        ``task_ids`` [B]: each sequence's task (see the class docstring).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        task_B = self._task_ids(task_ids, B, input_ids.device)
        past = cache[0].length if cache is not None else 0
        if positions is None:
            positions = torch.arange(past, past + T, device=input_ids.device)
        cos, sin = rope_frequencies(self.cfg.head_dim, positions, self.cfg.rope_theta)
        x = self.embed(input_ids)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        attn_mask, token_mask = self._masks(attention_mask, B, T, past, input_ids.device)
        aux = torch.zeros((), device=input_ids.device)
        stats: list[RouterStats] = []
        for i, block in enumerate(self.layers):
            x, layer_aux, layer_stats = block(x, cos, sin, attn_mask, token_mask, None if cache is None else cache[i], task_B)
            if layer_aux is not None:
                aux = aux + layer_aux
                stats.append(layer_stats)
        x = self.norm(x)
        head_weight = self.lm_head.weight if self.lm_head is not None else self.embed.weight
        if not isinstance(head_weight, torch.Tensor):  # a quantized head (moekit.quant): its own matmul
            logits = head_weight.linear(x)
            loss = None
            if labels is not None:
                loss = F.cross_entropy(logits.float().reshape(B * T, -1), labels.reshape(B * T), ignore_index=-100)
            return ModelOutput(logits=None if labels is not None else logits, aux_loss=aux, router_stats=stats, loss=loss)
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, "
                                 f"got {tuple(labels.shape)}")
            loss = linear_cross_entropy(x.reshape(B * T, -1), head_weight, labels.reshape(B * T))
            return ModelOutput(logits=None, aux_loss=aux, router_stats=stats, loss=loss)
        return ModelOutput(logits=F.linear(x, head_weight), aux_loss=aux, router_stats=stats)

    def _task_ids(self, task_ids: torch.Tensor | None, B: int, device: torch.device) -> torch.Tensor | None:
        """``task_ids`` checked, on ``device``; None where the routing does not use them."""
        cfg = self.cfg
        routing = cfg.task_routing if cfg.num_experts else "none"
        if task_ids is None:
            if routing == "task":
                raise ValueError(f"this model routes each task to its own experts (task_routing='task'): give "
                                 f"task_ids [batch], each sequence's index into tasks={cfg.tasks}")
            return None
        if not cfg.tasks:
            raise ValueError("task_ids were given, but this model has no tasks (ModelConfig.tasks is empty)")
        if (not isinstance(task_ids, torch.Tensor) or tuple(task_ids.shape) != (B,) or task_ids.dtype.is_floating_point
                or task_ids.dtype.is_complex or task_ids.dtype == torch.bool):
            got = f"{task_ids.dtype} {tuple(task_ids.shape)}" if isinstance(task_ids, torch.Tensor) else repr(task_ids)
            raise ValueError(f"task_ids must be an integer tensor [batch] = [{B}], one task per sequence; got {got}")
        if routing == "none":
            return None
        lo, hi = torch.stack([task_ids.min(), task_ids.max()]).tolist()  # NOTE: host sync (only with a task routing)
        if lo < 0 or hi >= len(cfg.tasks):
            raise ValueError(f"task_ids holds {lo if lo < 0 else hi}, not a task id in [0, {len(cfg.tasks)}) "
                             f"(tasks={cfg.tasks})")
        return task_ids.to(device=device, dtype=torch.long)

    @staticmethod
    def _masks(attention_mask, B, T, past, device):
        """Boolean SDPA mask [B, 1, T, past+T] (None for the plain causal case) and token mask [B, T]."""
        if attention_mask is None:
            if past == 0:
                return None, None
            causal = torch.ones(T, past + T, dtype=torch.bool, device=device).tril(past)
            return causal[None, None], None
        if attention_mask.shape[-1] != past + T or attention_mask.shape[0] != B:
            raise ValueError(f"attention_mask must be [batch, past + seq] = [{B}, {past + T}], "
                             f"got {tuple(attention_mask.shape)}")
        keys_BS = attention_mask.bool()
        causal_TS = torch.ones(T, past + T, dtype=torch.bool, device=device).tril(past)
        mask = causal_TS[None] & keys_BS[:, None, :]
        # A padding query with no visible key would give NaN in SDPA; let it see itself (its output
        # is ignored anyway).
        diag = torch.zeros(T, past + T, dtype=torch.bool, device=device)
        diag[torch.arange(T), past + torch.arange(T)] = True
        mask = mask | diag[None]
        return mask[:, None], keys_BS[:, past:]

    def new_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> list[KVCache]:
        """One empty KV cache per layer for incremental decoding."""
        p, c = self.norm.weight, self.cfg
        if c.attention == "mla":
            heads, k_dim, v_dim = c.n_heads, c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim
        else:
            heads, k_dim, v_dim = c.n_kv_heads, c.head_dim, c.head_dim
        return [KVCache(batch, heads, max_len or c.max_seq_len, k_dim, dtype or p.dtype, p.device, v_dim)
                for _ in self.layers]


@torch.no_grad()
def update_router_biases(model: Transformer, router_stats: list[RouterStats], rate: float | None = None) -> None:
    """Apply the DeepSeek-V3 balance-bias update to every ``sigmoid_bias`` router from the loads in
    ``router_stats`` (as returned by the forward pass). The trainer calls this after each step."""
    moes = model.moe_layers()
    if len(moes) != len(router_stats):
        raise ValueError(f"{len(router_stats)} router stats for {len(moes)} MoE layers")
    for moe, stats in zip(moes, router_stats):
        if isinstance(moe.router, SigmoidBiasRouter):
            moe.router.update_bias(stats.expert_load, rate)
