"""The inference forward pass: a model's weights run over a slot KV cache, built for decoding.

Legend: S cache slots, L cache length per slot, B rows this call, T tokens per row, N = B*T tokens,
D model dim, H query heads, G kv heads, Dh head dim, K experts per token, V vocabulary.

Why a second forward pass beside ``Transformer.forward`` (which stays the training path and the
reference the tests compare against): at batch 1 and width 512 a decode step is ~40 small operations
per layer, so per-operation overhead, not arithmetic, decides the speed. This path
- fuses q/k/v and the dense gate/up projections into one matmul each (weights concatenated once);
- reads rotary cos/sin from a table built once, writes keys/values in place into a preallocated
  ``[S, G, L, Dh]`` cache where every sequence has its own slot and its own position (ragged rows);
- routes with ``Router.select`` (the eval-mode choice, no losses or statistics) and, for a handful of
  tokens, runs only the chosen experts' weight slices, one small matmul pair each, with no sort,
  bincount or index bookkeeping; larger chunks (prefill) use the training path's grouped dispatch.
The model's own modules are never patched: norms, routers and expert weights are read from them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moekit.model.layers import MLP, Attention, LatentAttention, RMSNorm, rope_frequencies
from moekit.model.moe import MoE
from moekit.model.transformer import Transformer
from moekit.quant import QuantizedWeight, cat_rows, head_logits, linear, select_rows

#: Up to this many tokens in one call, the MoE groups tokens by expert in Python; above it, by a sort.
SMALL_BATCH_TOKENS = 16


def _rms_norm(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.float32:  # one fused kernel; same math as RMSNorm.forward in float32
        return F.rms_norm(x, norm.weight.shape, norm.weight, norm.eps)
    return norm(x)


class SlotCache:
    """Keys and values of every layer for ``slots`` independent sequences of up to ``max_len`` tokens.

    NOTE: ``torch.empty``: pages of slots never written are never touched, so a large cache costs
    memory only as sequences grow.
    """

    def __init__(self, model: Transformer, slots: int, max_len: int):
        c, p = model.cfg, model.norm.weight  # (the embedding may be quantized: no dtype of its own)
        if c.attention == "mla":
            heads, k_dim, v_dim = c.n_heads, c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim
        else:
            heads, k_dim, v_dim = c.n_kv_heads, c.head_dim, c.head_dim
        self.slots, self.max_len = slots, max_len
        # Positions 0..clean[s]-1 of slot s hold finite values (written or zeroed). A batched decode reads
        # keys past a short row's end (masked out), and masked-out garbage can still be NaN: 0 * NaN = NaN.
        self.clean = [0] * slots
        self.k = [torch.empty(slots, heads, max_len, k_dim, dtype=p.dtype, device=p.device) for _ in model.layers]
        self.v = [torch.empty(slots, heads, max_len, v_dim, dtype=p.dtype, device=p.device) for _ in model.layers]

    def ensure_clean(self, slot: int, length: int) -> None:
        """Zero positions ``clean[slot] .. length - 1`` of ``slot`` in every layer (each at most once)."""
        start = self.clean[slot]
        if start < length:
            for t in self.k + self.v:
                t[slot, :, start:length].zero_()
            self.clean[slot] = length

    def written(self, slot: int, end: int) -> None:
        self.clean[slot] = max(self.clean[slot], end)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def _interleave_perm(head_dim: int) -> torch.Tensor:
    """Row order that makes rotate-half pairs (i, i + Dh/2) adjacent: 0, Dh/2, 1, Dh/2 + 1, ..."""
    half = head_dim // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)


def _permute_heads(t: torch.Tensor | None, heads: int, head_dim: int) -> torch.Tensor | None:
    """Apply :func:`_interleave_perm` within each head of a [heads * Dh, ...] weight (or bias, or norm)."""
    if t is None:
        return None
    return t.reshape(heads, head_dim, *t.shape[1:])[:, _interleave_perm(head_dim)].reshape(t.shape)


class _AttnPlan:
    """One attention layer's weights arranged for inference.

    Grouped-query attention: q/k/v fused into one matmul, with the attention RMSNorm's weight folded
    into its columns (``norm(x) @ W^T == rms(x) @ (W * g)^T``). Query and key rows are permuted within
    each head so that rotary pairs (i, i + Dh/2) sit side by side: rotation is then one complex
    multiply for queries and keys together. Attention scores are unchanged (q and k share the
    permutation; the cache holds permuted keys), values are untouched.
    """

    def __init__(self, attn: Attention | LatentAttention, norm: RMSNorm):
        self.attn, self.norm = attn, norm
        self.mla = isinstance(attn, LatentAttention)
        if self.mla:
            return
        H, G, Dh = attn.n_heads, attn.n_kv_heads, attn.head_dim
        self.H, self.G, self.Dh = H, G, Dh
        # NOTE: a copy of the attention weights (a few % of an MoE model); one matmul instead of three.
        qw, kw, vw = attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight
        if isinstance(qw, QuantizedWeight):  # rows move exactly; the norm weight cannot be folded in
            rows = lambda heads: _permute_heads(torch.arange(heads * Dh), heads, Dh)  # noqa: E731
            self.w_qkv = cat_rows([select_rows(qw, rows(H)), select_rows(kw, rows(G)), vw])
            self.norm_weight = norm.weight.detach()
        else:
            w = torch.cat([_permute_heads(qw, H, Dh), _permute_heads(kw, G, Dh), vw]).detach()
            self.w_qkv = (w * norm.weight.detach().to(w.dtype)).contiguous()
            self.norm_weight = None
        if attn.q_proj.bias is None:
            self.b_qkv = None
        else:
            self.b_qkv = torch.cat([_permute_heads(attn.q_proj.bias, H, Dh), _permute_heads(attn.k_proj.bias, G, Dh),
                                    attn.v_proj.bias]).detach()
        self.q_norm = self.k_norm = None
        if attn.qk_norm == "head":
            self.q_norm = (_permute_heads(attn.q_norm.weight, 1, Dh), attn.q_norm.eps)
            self.k_norm = (_permute_heads(attn.k_norm.weight, 1, Dh), attn.k_norm.eps)
        elif attn.qk_norm == "full":
            self.q_norm = (_permute_heads(attn.q_norm.weight, H, Dh), attn.q_norm.eps)
            self.k_norm = (_permute_heads(attn.k_norm.weight, G, Dh), attn.k_norm.eps)
        self.w_o = _detach(attn.o_proj.weight)

    def project(self, x_BTD: torch.Tensor, freqs, cos, sin):
        """q [B, H, T, Dk], k [B, G, T, Dk], v [B, G, T, Dv], rotated; ``x`` is not yet normalised."""
        if self.mla:
            return self.attn.project(_rms_norm(self.norm, x_BTD), cos, sin)
        B, T, _ = x_BTD.shape
        H, G, Dh = self.H, self.G, self.Dh
        h = F.rms_norm(x_BTD, (x_BTD.shape[-1],), self.norm_weight, self.norm.eps)
        qkv = linear(h, self.w_qkv, self.b_qkv)
        v = qkv[..., (H + G) * Dh:].view(B, T, G, Dh)
        if self.q_norm is None:
            qk = _rotate(qkv[..., :(H + G) * Dh].view(B, T, H + G, Dh), freqs)
            q, k = qk[:, :, :H], qk[:, :, H:]
        else:
            q, k = qkv[..., :H * Dh], qkv[..., H * Dh:(H + G) * Dh]
            if self.attn.qk_norm == "full":
                q, k = F.rms_norm(q, q.shape[-1:], *self.q_norm), F.rms_norm(k, k.shape[-1:], *self.k_norm)
            q, k = q.reshape(B, T, H, Dh), k.reshape(B, T, G, Dh)
            if self.attn.qk_norm == "head":
                q, k = F.rms_norm(q, (Dh,), *self.q_norm), F.rms_norm(k, (Dh,), *self.k_norm)
            q, k = _rotate(q, freqs), _rotate(k, freqs)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def out(self, y_BTX: torch.Tensor) -> torch.Tensor:
        return self.attn.o_proj(y_BTX)


def _rotate(x_BTHD: torch.Tensor, freqs_T1C: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on adjacent pairs as one complex multiply (Llama's reference code does the same)."""
    B, T, Hn, Dh = x_BTHD.shape
    z = torch.view_as_complex(x_BTHD.float().reshape(B, T, Hn, Dh // 2, 2))
    return torch.view_as_real(z * freqs_T1C).reshape(B, T, Hn, Dh).to(x_BTHD.dtype)


class _MLPPlan:
    """A dense SwiGLU MLP with gate and up fused into one [2F, D] matmul."""

    def __init__(self, mlp: MLP):
        gate, up = mlp.gate_proj.weight, mlp.up_proj.weight
        self.w_gate_up = cat_rows([gate, up]) if isinstance(gate, QuantizedWeight) else torch.cat([gate, up]).detach()
        self.w_down = _detach(mlp.down_proj.weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        g, u = linear(x, self.w_gate_up).chunk(2, dim=-1)
        return linear(F.silu(g).mul_(u), self.w_down)


def _swiglu(x: torch.Tensor, w1_2FD, w2_DF) -> torch.Tensor:
    g, u = linear(x, w1_2FD).chunk(2, dim=-1)
    return linear(F.silu(g).mul_(u), w2_DF)


class ResidentExperts:
    """Expert weights held in memory: ``get(e)`` returns views of the stacked tensors (float or
    :class:`moekit.quant.QuantizedWeight`). ``moekit.infer.offload`` provides the same interface over
    memory-mapped weights with a cache of resident experts."""

    def __init__(self, w1_E2FD, w2_EDF):
        self.w1, self.w2 = w1_E2FD, w2_EDF

    def get(self, e: int):
        return self.w1[e], self.w2[e]


class _MoEPlan:
    """Router + the chosen experts, one expert at a time (the same arithmetic for every batch size and
    wherever the weights live, so offloaded and resident experts give bit-identical outputs)."""

    def __init__(self, moe: MoE):
        self.moe = moe
        self.router = moe.router
        self.num_experts = moe.experts.num_experts
        w1, w2 = moe.experts.gate_up_proj, moe.experts.down_proj
        self.experts = ResidentExperts(_detach(w1), _detach(w2))
        self.shared = None if moe.shared_expert is None else _MLPPlan(moe.shared_expert)
        self.shared_gate = None if moe.shared_expert_gate is None else _detach(moe.shared_expert_gate.weight)

    def __call__(self, x_BTD: torch.Tensor, routing: list | None) -> torch.Tensor:
        B, T, D = x_BTD.shape
        N = B * T
        x_ND = x_BTD.reshape(N, D)
        ids_NK, w_NK = self.router.select(x_ND)
        if routing is not None:
            routing.append((ids_NK, w_NK))
        y_ND = self._routed(x_ND, ids_NK, w_NK)
        if self.shared is not None:
            shared_ND = self.shared(x_ND)
            if self.shared_gate is not None:
                shared_ND = torch.sigmoid(linear(x_ND, self.shared_gate)) * shared_ND
            y_ND = y_ND + shared_ND
        return y_ND.view(B, T, D)

    def _routed(self, x_ND: torch.Tensor, ids_NK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
        """Only the chosen experts run: y_n = sum_k w_nk * expert_{e_nk}(x_n).

        Plan: 1. group the (token, expert) pairs by expert, experts in increasing order, tokens in
        increasing order within an expert (Python lists for a handful of tokens, sort + bincount
        above); 2. per expert: gather its rows, SwiGLU with that expert's weights, scale by the gates,
        add into the output. NOTE: host sync -- the grouping becomes Python numbers.
        """
        N, K = ids_NK.shape
        if N == 1:  # decode at batch 1: no gather or scatter
            both = torch.cat([ids_NK.to(w_NK.dtype), w_NK], dim=1)[0].tolist()  # one sync; ids < 2^24 exact
            y = None
            for e, w in sorted(zip(map(int, both[:K]), both[K:])):
                w1, w2 = self.experts.get(e)
                ye = _swiglu(x_ND, w1, w2)
                y = ye.mul_(w) if y is None else y.add_(ye, alpha=w)
            return y
        y_ND = torch.zeros_like(x_ND)
        if N <= SMALL_BATCH_TOKENS:
            both = torch.cat([ids_NK.to(w_NK.dtype), w_NK], dim=1).tolist()
            groups: dict[int, tuple[list[int], list[float]]] = {}
            for n, row in enumerate(both):
                for e, w in zip(row[:K], row[K:]):
                    rows, gates = groups.setdefault(int(e), ([], []))
                    rows.append(n)
                    gates.append(w)
            plan = [(e, torch.tensor(groups[e][0], device=x_ND.device),
                     torch.tensor(groups[e][1], dtype=x_ND.dtype, device=x_ND.device)) for e in sorted(groups)]
        else:
            order_A = torch.argsort(ids_NK.reshape(-1), stable=True)
            counts = torch.bincount(ids_NK.reshape(-1), minlength=self.num_experts).tolist()
            tok_A, gate_A = order_A // K, w_NK.reshape(-1)[order_A].to(x_ND.dtype)
            plan, start = [], 0
            for e, n in enumerate(counts):
                if n:
                    plan.append((e, tok_A[start:start + n], gate_A[start:start + n]))
                start += n
        for e, idx, gate in plan:
            w1, w2 = self.experts.get(e)
            ye = _swiglu(x_ND.index_select(0, idx), w1, w2)
            y_ND.index_add_(0, idx, ye.mul_(gate[:, None]))
        return y_ND


def _detach(w):
    return w.detach() if isinstance(w, torch.Tensor) else w


class Runner:
    """Runs ``model`` over a :class:`SlotCache`: each row of a call is one sequence in its own slot,
    starting at its own position. Call it under ``torch.inference_mode()``.

    :meth:`forward` runs a mixed batch (decoding rows and prefill chunks together, one pass over the
    weights); ``__call__`` is its two plain shapes.
    """

    def __init__(self, model: Transformer, slots: int, max_len: int):
        cfg = model.cfg
        if cfg.router == "expert_choice" and cfg.num_experts:
            raise ValueError(
                "expert_choice routing cannot generate text: each expert picks its tokens across the whole "
                "sequence, so a token's output depends on tokens after it, and a cached decode (one token at a "
                "time) computes something else than the forward pass the model was trained with. Use a "
                "token-choice router (topk, switch, noisy_topk, sigmoid_bias) for models meant to generate.")
        if max_len > cfg.max_seq_len:
            raise ValueError(f"max_len={max_len} is beyond the model's max_seq_len={cfg.max_seq_len}")
        self.model, self.cfg = model, cfg
        self.cache = SlotCache(model, slots, max_len)
        p = model.norm.weight
        cos, sin = rope_frequencies(cfg.head_dim, torch.arange(max_len, device=p.device), cfg.rope_theta)
        self.cos, self.sin = cos.to(p.dtype), sin.to(p.dtype)  # [L, Dh]
        half = cfg.head_dim // 2
        self.freqs = torch.complex(cos[:, :half], sin[:, :half])  # [L, Dh/2] e^(i * angle), rotate-half pairs
        self.embed = _detach(model.embed.weight)
        self.head = _detach(model.lm_head.weight if model.lm_head is not None else model.embed.weight)
        self.blocks = []
        for block in model.layers:
            ffn = _MoEPlan(block.ffn) if block.is_moe else _MLPPlan(block.ffn)
            self.blocks.append((_AttnPlan(block.attn, block.attn_norm), block.ffn_norm, ffn))

    def __call__(self, tokens_BT: torch.Tensor, slots: list[int], starts: list[int], all_logits: bool = False,
                 routing: list | None = None) -> torch.Tensor:
        """The two plain call shapes: B rows decoding one token each, or one row of T tokens.

        Logits [B, V] of each row's last token (``all_logits``: [B, T, V]). See :meth:`forward`.
        """
        B, T = tokens_BT.shape
        if B == 1:
            logits = self.forward(tokens_BT[0], [(slots[0], starts[0], T)], [all_logits], routing)
            return logits[None] if all_logits else logits
        if T != 1:
            raise ValueError("rows of a batched call decode one token each (or give one row of T tokens)")
        return self.forward(tokens_BT[:, 0], [(s, p, 1) for s, p in zip(slots, starts)], None, routing)

    def forward(self, tokens_N: torch.Tensor, segments: list[tuple[int, int, int]], all_logits: list[bool] | None = None,
                routing: list | None = None) -> torch.Tensor:
        """One pass over a mixed batch: ``segments`` are (slot, start, length) in the order of ``tokens_N``.

        Each segment's keys/values go to positions ``start .. start + length - 1`` of its slot and it
        attends to that slot's positions ``0 .. start + length - 1``. The leading one-token segments
        (decoding sequences) share one batched attention; every other segment (a prefill chunk) gets
        its own. Everything else -- projections, routers, experts, the head -- runs once over all N
        tokens, so a step that decodes many sequences and prefills a prompt reads the weights once.

        Returns logits [R, V]: each segment's last token, or all its tokens where ``all_logits[i]``.
        ``routing``, when a list, receives per MoE layer (expert ids [N, K], gate weights [N, K]).
        """
        device = tokens_N.device
        plan = self._attention_plan(segments, device)
        if plan.single is None and plan.n_decode:
            for s, _, _ in segments[:plan.n_decode]:
                self.cache.ensure_clean(s, plan.dec_len)
        if isinstance(self.embed, QuantizedWeight):
            x = self.embed.embedding(tokens_N, self.cos.dtype)[None]
        else:
            x = F.embedding(tokens_N, self.embed)[None]  # [1, N, D]
        for i, (attn, ffn_norm, ffn) in enumerate(self.blocks):
            q, k, v = attn.project(x, plan.freqs, plan.cos, plan.sin)  # [1, H|G, N, Dh]
            y = plan.attend(q, k, v, self.cache.k[i], self.cache.v[i], attn.attn.scale if attn.mla else None)
            x = x + attn.out(y)
            h = _rms_norm(ffn_norm, x)
            x = x + (ffn(h, routing) if isinstance(ffn, _MoEPlan) else ffn(h))
        for s, p, n in segments:
            self.cache.written(s, p + n)
        rows = plan.output_rows(all_logits)
        x = x[0] if rows is None else x[0].index_select(0, rows)
        h = _rms_norm(self.model.norm, x)
        return head_logits(h, self.head) if isinstance(self.head, QuantizedWeight) else F.linear(h, self.head)

    def _attention_plan(self, segments: list[tuple[int, int, int]], device: torch.device) -> _AttentionPlan:
        if not segments:
            raise ValueError("nothing to run: no segments")
        for s, p, n in segments:
            if not (0 <= s < self.cache.slots and n >= 1 and p >= 0 and p + n <= self.cache.max_len):
                raise ValueError(f"segment (slot {s}, start {p}, length {n}) does not fit {self.cache.slots} slots "
                                 f"of {self.cache.max_len} tokens")
        return _AttentionPlan(self, segments, device)


class _AttentionPlan:
    """Positions, rotary tables, cache writes and attention groups of one :meth:`Runner.forward` call."""

    def __init__(self, runner: Runner, segments: list[tuple[int, int, int]], device: torch.device):
        self.segments = segments
        if len(segments) == 1:  # one sequence (decode at batch 1, or a prefill chunk): views, no gathers
            s, p, n = segments[0]
            self.single = (s, p, n)
            pos = slice(p, p + n)
            self.cos, self.sin, self.freqs = runner.cos[pos], runner.sin[pos], runner.freqs[pos][:, None]
            self.mask = None if p == 0 or n == 1 else torch.ones(n, p + n, dtype=torch.bool, device=device).tril(p)
            return
        self.single = None
        positions = [p + j for _, p, n in segments for j in range(n)]
        self.pos_t = torch.tensor(positions, device=device)
        self.slot_t = torch.tensor([s for s, _, n in segments for _ in range(n)], device=device)
        self.cos, self.sin = runner.cos[self.pos_t], runner.sin[self.pos_t]  # [N, Dh]
        self.freqs = runner.freqs[self.pos_t][:, None]  # [N, 1, Dh/2]
        self.n_decode = next((i for i, (_, _, n) in enumerate(segments) if n != 1), len(segments))
        if self.n_decode:
            dec = segments[:self.n_decode]
            slots = [s for s, _, _ in dec]
            self.dec_len = max(p for _, p, _ in dec) + 1
            self.dec_slots = slots[0] if slots == list(range(slots[0], slots[0] + len(slots))) else self.slot_t[:len(slots)]
            self.dec_mask = (torch.arange(self.dec_len, device=device)[None] <= self.pos_t[:len(slots), None])[:, None, None]
        self.chunks = []  # (slot, start, length, first row) of the other segments
        row = self.n_decode
        for s, p, n in segments[self.n_decode:]:
            mask = None if p == 0 or n == 1 else torch.ones(n, p + n, dtype=torch.bool, device=device).tril(p)
            self.chunks.append((s, p, n, row, mask))
            row += n

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
               scale: float | None) -> torch.Tensor:
        """Write k/v [1, G, N, Dh] into the cache, attend, return y [1, N, H * Dv]."""
        if self.single is not None:
            s, p, n = self.single
            kc[s, :, p:p + n] = k[0]
            vc[s, :, p:p + n] = v[0]
            y = _attention(q, kc[s:s + 1, :, :p + n], vc[s:s + 1, :, :p + n], self.mask, scale)
            return y.transpose(1, 2).reshape(1, n, -1)
        kc[self.slot_t, :, self.pos_t] = k[0].transpose(0, 1)  # [N, G, Dh]
        vc[self.slot_t, :, self.pos_t] = v[0].transpose(0, 1)
        ys = []
        if self.n_decode:
            nd, L, slots = self.n_decode, self.dec_len, self.dec_slots
            if isinstance(slots, int):
                keys, values = kc[slots:slots + nd, :, :L], vc[slots:slots + nd, :, :L]
            else:
                keys, values = kc[:, :, :L].index_select(0, slots), vc[:, :, :L].index_select(0, slots)
            y = _attention(q[:, :, :nd].transpose(0, 2), keys, values, self.dec_mask, scale)  # [nd, H, 1, Dv]
            ys.append(y.reshape(nd, -1))
        for s, p, n, row, mask in self.chunks:
            y = _attention(q[:, :, row:row + n], kc[s:s + 1, :, :p + n], vc[s:s + 1, :, :p + n], mask, scale)
            ys.append(y[0].transpose(0, 1).reshape(n, -1))
        return torch.cat(ys)[None]

    def output_rows(self, all_logits: list[bool] | None) -> torch.Tensor | None:
        """Rows whose logits are wanted (None: all of them)."""
        rows, start = [], 0
        for i, (_, _, n) in enumerate(self.segments):
            rows += range(start, start + n) if all_logits is not None and all_logits[i] else [start + n - 1]
            start += n
        if len(rows) == start:
            return None
        device = self.freqs.device
        return torch.tensor(rows, device=device)


def _attention(q_BHTD: torch.Tensor, k_BGSD: torch.Tensor, v_BGSD: torch.Tensor, mask: torch.Tensor | None,
               scale: float | None) -> torch.Tensor:
    """SDPA over cached keys; ``mask`` None means: the T queries are the last T keys, causal."""
    T, S = q_BHTD.shape[2], k_BGSD.shape[2]
    dtype = q_BHTD.dtype
    if q_BHTD.device.type == "cpu" and dtype == torch.bfloat16:  # see layers.Attention.forward
        q_BHTD, k_BGSD, v_BGSD = q_BHTD.float(), k_BGSD.float(), v_BGSD.float()
    y = F.scaled_dot_product_attention(q_BHTD, k_BGSD, v_BGSD, attn_mask=mask, is_causal=mask is None and T > 1 and T == S,
                                       enable_gqa=k_BGSD.shape[1] != q_BHTD.shape[1], scale=scale)
    return y.to(dtype)
