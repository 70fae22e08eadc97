"""Routers: one interface, five policies. Each maps token states to a list of (token, expert, weight)
assignments plus its losses and statistics.

Legend: T tokens, D model dim, E experts, K experts per token (token choice), C tokens per expert
(capacity), A kept assignments. Router math always runs in float32 ("selective precision", Switch).

Why assignments rather than [T, K] tensors: expert choice gives a token 0..E experts and capacity drops
remove pairs, so the one form every policy shares is a flat list of (token, expert, weight) triples.
The experts module consumes that list; it never needs to know which router produced it.

Tasks (issue 20, ``ModelConfig.task_routing``): every router method takes ``task_T`` [T] long, each
token's task id (None: no task). "embedding" adds the task's learned vector to the router's input
(the residual stream is untouched); the id ``len(cfg.tasks)`` stands for "no task", the zero vector,
which is also what a call without task ids computes. "task" sets the logits (sigmoid_bias: also the
biased selection scores) of the experts outside the token's task's set to -inf before the top-k, so a
token can only reach its task's experts; its softmax probability for the others is exactly 0, so the
balance loss and the z-loss get no gradient through them (the balance loss, still summed over all E
experts, spreads each task's tokens over that task's experts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config import ModelConfig
from moekit.model import losses


@dataclass
class RouterStats:
    """Per-layer routing statistics (detached). Loads count (token, expert) assignments."""

    tokens_per_expert: torch.Tensor  # [E] assignments each expert processed (after capacity)
    expert_load: torch.Tensor  # [E] assignments the router chose (before capacity)
    dropped_fraction: torch.Tensor  # () share of chosen pairs dropped (expert choice: of tokens with no expert)
    entropy: torch.Tensor  # () mean router entropy (nats)
    max_violation: torch.Tensor  # () (max_load - mean_load) / mean_load on expert_load
    balance_loss: torch.Tensor  # () unweighted balance term (0 where the router has none)
    z_loss: torch.Tensor  # () unweighted router z-loss


@dataclass
class Routing:
    token_ids_A: torch.Tensor  # [A] long
    expert_ids_A: torch.Tensor  # [A] long
    weights_A: torch.Tensor  # [A] float32 gate weights (differentiable)
    aux_loss: torch.Tensor  # () weighted auxiliary loss of this layer (differentiable)
    stats: RouterStats


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int) -> int:
    """Per-expert capacity ``ceil(tokens * k * cf / E)``, at least ``min_capacity`` (Megatron, GShard)."""
    return max(min_capacity, math.ceil(num_tokens * top_k * capacity_factor / num_experts))


def capacity_keep_mask(ids_TK: torch.Tensor, valid_TK: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """Which (token, slot) pairs fit in their expert's capacity.

    Priority is slot-major (GShard): every token's first choice is served before any second choice,
    and within a slot earlier tokens first. Returns a bool [T, K].
    """
    T, K = ids_TK.shape
    onehot_KTE = F.one_hot(ids_TK.t(), num_experts) * valid_TK.t()[..., None]  # [K, T, E]
    position_KTE = onehot_KTE.reshape(K * T, num_experts).cumsum(0).reshape(K, T, num_experts)
    position_TK = (position_KTE * onehot_KTE).sum(-1).t()  # 1-based position in the expert's queue
    return valid_TK & (position_TK <= capacity)


def topk_ids(scores_TE: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [T, k] of the k largest scores per row, best first (as ``scores.topk(k).indices``).

    For k <= 4 on a CPU: k max passes over the transposed [E, T] scores. A reduction across rows
    vectorises over the T tokens, while ``topk`` along a short last dimension (8-64 experts) works row
    by row: for [2048, 16], top-2 takes ~190 us this way against ~370 us (2 threads).
    """
    if k > 4 or scores_TE.device.type != "cpu" or scores_TE.shape[0] < 64:
        return scores_TE.topk(k, dim=-1).indices
    s_ET = scores_TE.detach().t().contiguous()
    ids = []
    for i in range(k):
        idx_T = s_ET.max(0).indices
        ids.append(idx_T)
        if i + 1 < k:
            s_ET.scatter_(0, idx_T[None], float("-inf"))
    return torch.stack(ids, 1)


def balance_bias_update(bias_E: torch.Tensor, load_E: torch.Tensor, rate: float) -> torch.Tensor:
    """Aux-loss-free balancing (DeepSeek-V3 sec. 2.1.2): ``b += rate * sign(mean_load - load)``.

    Overloaded experts get a lower selection bias, underloaded ones a higher one. Pure function.
    """
    load = load_E.float()
    return bias_E + rate * torch.sign(load.mean() - load)


class Router(nn.Module):
    """Base: a float32 linear gate ``weight [E, D]`` and the shared token-choice bookkeeping.

    ``global_sum``: None, or (data parallelism, set from outside by moekit.parallel) a differentiable
    sum over the ranks that share the global batch, so balance losses are the global batch's.
    """

    global_sum: losses.GlobalSumFn | None = None

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.weight = nn.Parameter(torch.randn(cfg.num_experts, cfg.dim) * cfg.init_std)
        self.task_routing = cfg.task_routing
        if cfg.task_routing == "embedding":  # one learned vector per task, added to this router's input only
            self.task_embed = nn.Parameter(torch.randn(len(cfg.tasks), cfg.dim) * cfg.init_std)  # [n_tasks, D]
        else:
            self.register_parameter("task_embed", None)
        # task routing: [n_tasks, E] bool, which experts each task may use, per device. NOTE: derived from the
        # config, so neither a parameter nor a buffer: checkpoints and state dicts stay as they were, and a
        # model built on the meta device (quantized loading) needs nothing filled in.
        self._task_masks: dict[torch.device, torch.Tensor] = {}

    def allowed_experts(self, task_T: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
        """[T, E] bool: the experts each token may be routed to (task routing), or None: all of them."""
        if self.task_routing != "task":
            return None
        if task_T is None:
            raise ValueError(f"this model routes each task to its own experts (task_routing='task'): every token "
                             f"needs a task id, an index into tasks={self.cfg.tasks}")
        mask_NE = self._task_masks.get(device)
        if mask_NE is None:
            mask_NE = torch.zeros(len(self.cfg.tasks), self.num_experts, dtype=torch.bool)
            for t, experts in enumerate(self.cfg.task_expert_sets().values()):
                mask_NE[t, experts] = True
            mask_NE = self._task_masks[device] = mask_NE.to(device)
        return mask_NE[task_T]

    def logits(self, x_TD: torch.Tensor, task_T: torch.Tensor | None = None) -> torch.Tensor:
        """Router logits [T, E] float32; with task routing, -inf outside each token's task's experts."""
        x = x_TD.float()
        if self.task_embed is not None and task_T is not None:
            # Row len(tasks) of the padded table is the zero vector: "no task" (see the module docstring).
            x = x + F.pad(self.task_embed.float(), (0, 0, 0, 1))[task_T]
        if self.training and self.cfg.router_jitter > 0:  # Switch: multiplicative jitter on the input
            eps = self.cfg.router_jitter
            x = x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
        # NOTE: autocast would run this matmul in bf16 and flip near-tie expert choices; keep it fp32.
        # (Checked first: entering the context costs ~10 us, a noticeable share of a decode step.)
        if not torch.is_autocast_enabled(x.device.type):
            logits_TE = F.linear(x, self.weight.float())  # [T, E] float32
        else:
            with torch.autocast(x.device.type, enabled=False):
                logits_TE = F.linear(x, self.weight.float())
        if self.task_routing == "task":
            logits_TE = logits_TE.masked_fill(~self.allowed_experts(task_T, logits_TE.device), float("-inf"))
        return logits_TE

    def select(self, x_TD: torch.Tensor, task_T: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference-time choice for token-choice routers: (expert ids [T, K] long, gate weights [T, K]
        float32), exactly what ``forward`` keeps in eval mode when dropless, without losses or
        statistics. The inference engine calls this at decode time (no sort, no bincount, no sync).
        ``task_T`` [T]: each token's task id (see the module docstring)."""
        raise NotImplementedError(f"{type(self).__name__} does not route tokens independently")

    def capacity_factor(self) -> float | None:
        return self.cfg.capacity_factor if self.training else self.cfg.eval_capacity_factor

    def _token_choice(self, ids_TK: torch.Tensor, weights_TK: torch.Tensor, probs_TE: torch.Tensor,
                      mask_T: torch.Tensor | None, aux_loss: torch.Tensor, balance: torch.Tensor,
                      zl: torch.Tensor) -> Routing:
        """Apply padding mask and capacity to a [T, K] choice, flatten to assignments, gather stats."""
        T, K = ids_TK.shape
        E = self.num_experts
        cf = self.capacity_factor()
        if mask_T is None and cf is None:  # fast path: every pair is kept, no host sync
            token_ids = torch.arange(T, device=ids_TK.device).repeat_interleave(K)
            expert_ids, weights = ids_TK.reshape(-1), weights_TK.reshape(-1)
            load_E = torch.bincount(expert_ids, minlength=E)
            processed_E, n_valid = load_E, T
        else:
            valid_T = torch.ones(T, dtype=torch.bool, device=ids_TK.device) if mask_T is None else mask_T.bool()
            valid_TK = valid_T[:, None].expand(T, K)
            n_valid = int(valid_T.sum())  # NOTE: host sync (capacity is a Python int)
            keep_TK = valid_TK
            if cf is not None:
                capacity = expert_capacity(n_valid, E, K, cf, self.cfg.min_capacity)
                keep_TK = capacity_keep_mask(ids_TK, valid_TK, E, capacity)
            token_ids = torch.arange(T, device=ids_TK.device)[:, None].expand(T, K)[keep_TK]
            expert_ids, weights = ids_TK[keep_TK], weights_TK[keep_TK]
            load_E = torch.bincount(ids_TK[valid_TK], minlength=E)
            processed_E = torch.bincount(expert_ids, minlength=E)
        chosen = max(n_valid * K, 1)
        stats = RouterStats(
            tokens_per_expert=processed_E.detach(),
            expert_load=load_E.detach(),
            dropped_fraction=torch.tensor(1.0 - expert_ids.numel() / chosen if n_valid else 0.0),
            entropy=losses.router_entropy(probs_TE.detach(), mask_T),
            max_violation=losses.max_violation(load_E.detach()),
            balance_loss=balance.detach(),
            z_loss=zl.detach(),
        )
        return Routing(token_ids, expert_ids, weights, aux_loss, stats)


class TopKRouter(Router):
    """Softmax over experts, top-k, optional renormalisation (Mixtral, Qwen-MoE, OLMoE), then
    ``routed_scaling_factor`` (1 in those models; k restores a dense FFN's output scale, see config).

    With a capacity factor, overflow pairs are dropped (the token skips that expert).
    """

    def _choose(self, logits_TE: torch.Tensor):
        probs_TE = logits_TE.softmax(-1)
        # NOTE: task routing picks from the logits, where the experts outside the task are -inf: a task's own
        # expert whose probability underflows to 0 would tie with them in the probabilities.
        ids_TK = topk_ids(logits_TE if self.task_routing == "task" else probs_TE, self.top_k)
        top_TK = probs_TE.gather(1, ids_TK)
        if self.cfg.norm_topk_prob:
            top_TK = top_TK / top_TK.sum(-1, keepdim=True)
        if self.cfg.routed_scaling_factor != 1.0:
            top_TK = top_TK * self.cfg.routed_scaling_factor
        return probs_TE, ids_TK, top_TK

    def select(self, x_TD: torch.Tensor, task_T: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        logits_TE = self.logits(x_TD, task_T)
        if self.cfg.norm_topk_prob:  # softmax renormalised over the top k == softmax of the top-k logits
            ids_TK = topk_ids(logits_TE, self.top_k)
            weights_TK = logits_TE.gather(1, ids_TK).softmax(-1)
            if self.cfg.routed_scaling_factor != 1.0:
                weights_TK = weights_TK * self.cfg.routed_scaling_factor
            return ids_TK, weights_TK
        _, ids_TK, top_TK = self._choose(logits_TE)
        return ids_TK, top_TK

    def forward(self, x_TD: torch.Tensor, mask_T: torch.Tensor | None = None,
                task_T: torch.Tensor | None = None) -> Routing:
        logits_TE = self.logits(x_TD, task_T)
        probs_TE, ids_TK, top_TK = self._choose(logits_TE)
        balance = losses.load_balance_loss(probs_TE, ids_TK, mask_T, self.global_sum)
        zl = losses.z_loss(logits_TE, mask_T)
        aux = self.cfg.aux_loss_coef * balance + self.cfg.z_loss_coef * zl
        return self._token_choice(ids_TK, top_TK, probs_TE, mask_T, aux, balance, zl)


class SwitchRouter(Router):
    """Switch Transformer (Fedus et al. 2021): top-1, gate = the router probability (not renormalised),
    capacity factor; tokens over capacity skip the layer and travel on the residual stream.

    NOTE: at init every probability is ~1/E, so the paper's gate scales the layer's output (and its
    experts' gradients) by ~1/E: a small top-1 model starts with its FFNs nearly switched off (issue 18).
    ``switch_gate="unit"`` uses p / stopgrad(p) instead: exactly 1 in the forward pass, while the router
    still gets d(log p) (renormalising top-1 would also give 1, but no router gradient at all).
    ``routed_scaling_factor`` multiplies the gate, as for the other routers."""

    def _gate(self, top_T1: torch.Tensor) -> torch.Tensor:
        if self.cfg.switch_gate == "unit":
            top_T1 = top_T1 / top_T1.detach()
        if self.cfg.routed_scaling_factor != 1.0:
            top_T1 = top_T1 * self.cfg.routed_scaling_factor
        return top_T1

    def select(self, x_TD: torch.Tensor, task_T: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        top_T1, ids_T1 = self.logits(x_TD, task_T).softmax(-1).max(dim=-1, keepdim=True)
        return ids_T1, self._gate(top_T1)

    def forward(self, x_TD: torch.Tensor, mask_T: torch.Tensor | None = None,
                task_T: torch.Tensor | None = None) -> Routing:
        logits_TE = self.logits(x_TD, task_T)
        probs_TE = logits_TE.softmax(-1)
        top_T1, ids_T1 = probs_TE.max(dim=-1, keepdim=True)
        balance = losses.load_balance_loss(probs_TE, ids_T1, mask_T, self.global_sum)
        zl = losses.z_loss(logits_TE, mask_T)
        aux = self.cfg.aux_loss_coef * balance + self.cfg.z_loss_coef * zl
        return self._token_choice(ids_T1, self._gate(top_T1), probs_TE, mask_T, aux, balance, zl)


class NoisyTopKRouter(Router):
    """Noisy top-k gating (Shazeer et al. 2017, sec. 2.1 and appendix A).

    H(x) = x W_g + N(0, 1) * softplus(x W_noise) while training; the k largest H are kept and
    softmaxed. Losses: importance (CV^2 of summed gates) and load (CV^2 of the smooth estimate of how
    many tokens each expert receives, through the normal CDF), both weighted by ``aux_loss_coef``.
    """

    noise_eps = 1e-2  # floor on the noise std, as in the paper's reference code

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.noise_weight = nn.Parameter(torch.zeros(cfg.num_experts, cfg.dim))  # starts at softplus(0) noise

    def select(self, x_TD: torch.Tensor, task_T: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        top_TK, ids_TK = self.logits(x_TD, task_T).topk(self.top_k, dim=-1)  # no noise at inference
        return ids_TK, top_TK.softmax(-1)

    def forward(self, x_TD: torch.Tensor, mask_T: torch.Tensor | None = None,
                task_T: torch.Tensor | None = None) -> Routing:
        K, E = self.top_k, self.num_experts
        clean_TE = self.logits(x_TD, task_T)
        noisy = self.training
        if noisy:
            with torch.autocast(x_TD.device.type, enabled=False):
                std_TE = F.softplus(F.linear(x_TD.float(), self.noise_weight.float())) + self.noise_eps
            logits_TE = clean_TE + torch.randn_like(clean_TE) * std_TE
        else:
            logits_TE = clean_TE
        m = min(K + 1, E)
        top_TM, ids_TM = logits_TE.topk(m, dim=-1)
        ids_TK = ids_TM[:, :K]
        gates_TK = top_TM[:, :K].softmax(-1)
        gates_TE = torch.zeros_like(logits_TE).scatter(1, ids_TK, gates_TK)
        if noisy and K < E:
            # P(expert i stays in the top k if only its own noise is redrawn), appendix A eq. 9.
            threshold_in_T1 = top_TM[:, K:K + 1]  # the (k+1)-th value: beat it to stay in
            threshold_out_T1 = top_TM[:, K - 1:K]  # the k-th value: beat it to get in
            allowed_TE = self.allowed_experts(task_T, clean_TE.device)
            cdf_clean_TE = clean_TE
            if allowed_TE is not None:
                # NOTE: the experts outside a token's task are at -inf, and so is the (k+1)-th value when the
                # task has exactly k experts: -inf - -inf would be NaN, in the forward or (through the branch
                # torch.where does not take) the backward. Those experts can never be chosen (probability 0,
                # set below), and a task's k experts always stay in (a finite stand-in threshold gives 1).
                cdf_clean_TE = clean_TE.masked_fill(~allowed_TE, 0.0)
                threshold_in_T1 = threshold_in_T1.clamp_min(-1e4)
            normal = torch.distributions.Normal(0.0, 1.0)
            prob_in = normal.cdf((cdf_clean_TE - threshold_in_T1) / std_TE)
            prob_out = normal.cdf((cdf_clean_TE - threshold_out_T1) / std_TE)
            prob_in_topk_TE = torch.where(logits_TE > threshold_in_T1, prob_in, prob_out)
            if allowed_TE is not None:
                prob_in_topk_TE = prob_in_topk_TE.masked_fill(~allowed_TE, 0.0)
        else:
            prob_in_topk_TE = (gates_TE > 0).float()
        balance = (losses.importance_loss(gates_TE, mask_T, self.global_sum)
                   + losses.noisy_load_loss(prob_in_topk_TE, mask_T, self.global_sum))
        zl = losses.z_loss(clean_TE, mask_T)
        aux = self.cfg.aux_loss_coef * balance + self.cfg.z_loss_coef * zl
        return self._token_choice(ids_TK, gates_TK, clean_TE.softmax(-1), mask_T, aux, balance, zl)


class ExpertChoiceRouter(Router):
    """Expert choice (Zhou et al. 2022): each expert takes its top-C tokens by router probability,
    C = ceil(tokens * k * cf / E) with cf = the capacity factor (1.0 when None). Balanced by
    construction (no balance loss); a token may get anywhere from 0 to E experts.

    NOTE: an expert picks among all tokens of the batch, so in a causal LM a token's routing depends
    on later tokens (the paper's own caveat). At decode time (one token) every expert picks it.
    """

    def forward(self, x_TD: torch.Tensor, mask_T: torch.Tensor | None = None,
                task_T: torch.Tensor | None = None) -> Routing:
        T, E = x_TD.shape[0], self.num_experts
        logits_TE = self.logits(x_TD, task_T)  # (a task embedding only: config refuses task routing here)
        probs_TE = logits_TE.softmax(-1)
        n_valid = T if mask_T is None else int(mask_T.sum())  # NOTE: host sync
        cf = self.capacity_factor() or 1.0
        C = min(expert_capacity(n_valid, E, self.top_k, cf, self.cfg.min_capacity), n_valid)
        scores_TE = probs_TE if mask_T is None else probs_TE.masked_fill(~mask_T.bool()[:, None], -1.0)
        weights_EC, token_ids_EC = scores_TE.t().topk(C, dim=-1)  # [E, C]
        token_ids = token_ids_EC.reshape(-1)
        expert_ids = torch.arange(E, device=x_TD.device).repeat_interleave(C)
        zl = losses.z_loss(logits_TE, mask_T)
        per_expert = torch.full((E,), C, dtype=torch.long, device=x_TD.device)
        covered = torch.zeros(T, dtype=torch.bool, device=x_TD.device)
        covered[token_ids] = True
        stats = RouterStats(
            tokens_per_expert=per_expert, expert_load=per_expert,
            dropped_fraction=torch.tensor(1.0 - covered.sum().item() / n_valid if n_valid else 0.0),
            entropy=losses.router_entropy(probs_TE.detach(), mask_T),
            max_violation=torch.zeros(()), balance_loss=torch.zeros(()), z_loss=zl.detach(),
        )
        return Routing(token_ids, expert_ids, weights_EC.reshape(-1), self.cfg.z_loss_coef * zl, stats)


class SigmoidBiasRouter(Router):
    """DeepSeek-V3 routing: sigmoid affinities; a per-expert bias (a buffer, not a parameter) is added
    only to choose experts, while gate weights come from the unbiased scores, renormalised over the k
    chosen and multiplied by ``routed_scaling_factor``. Optional group-limited selection.

    The bias is moved towards balance outside backprop by :func:`balance_bias_update`, which the
    trainer applies through :meth:`update_bias` after each optimizer step. No balance loss.
    """

    # Kept in float32 even when the model is cast (DeepSeek-V3 e_score_correction_bias), and when it is
    # saved in another dtype (moekit.model.dtypes.state_dict_as).
    FLOAT32_BUFFERS = ("bias",)

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.register_buffer("bias", torch.zeros(cfg.num_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):  # keep the bias float32 through .to(dtype) / .half()
        bias = self.bias
        super()._apply(fn, recurse)
        if self.bias.dtype != torch.float32:
            # NOTE: the float32 original moved, not the cast copy upcast (that would keep bf16 rounding).
            self.bias = bias.to(self.bias.device)
        return self

    def select(self, x_TD: torch.Tensor, task_T: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        _, ids_TK, weights_TK = self._choose(self.logits(x_TD, task_T))
        return ids_TK, weights_TK

    def forward(self, x_TD: torch.Tensor, mask_T: torch.Tensor | None = None,
                task_T: torch.Tensor | None = None) -> Routing:
        logits_TE = self.logits(x_TD, task_T)
        scores_TE, ids_TK, weights_TK = self._choose(logits_TE)
        zl = losses.z_loss(logits_TE, mask_T)
        probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
        return self._token_choice(ids_TK, weights_TK, probs_TE, mask_T, self.cfg.z_loss_coef * zl,
                                  torch.zeros(()), zl)

    def _choose(self, logits_TE: torch.Tensor):
        """Sigmoid scores, biased (and group-limited) selection, unbiased renormalised gate weights.
        Task routing: the logits outside a token's task are -inf, so their scores are 0, and their
        selection scores -inf (the balance bias could otherwise lift them over a task's own experts)."""
        scores_TE = logits_TE.sigmoid()
        choice_TE = scores_TE + self.bias
        if self.task_routing == "task":
            choice_TE = choice_TE.masked_fill(logits_TE == float("-inf"), float("-inf"))
        G = self.cfg.n_group
        if G > 1:
            T, E = choice_TE.shape
            grouped = choice_TE.view(T, G, E // G)
            group_scores_TG = grouped.topk(2, dim=-1).values.sum(-1)  # DeepSeek-V3: sum of each group's top-2
            group_ids = group_scores_TG.topk(self.cfg.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores_TG).scatter(1, group_ids, 1.0).bool()
            # Experts outside the chosen groups can never be picked (transformers' DeepseekV3TopkRouter).
            choice_TE = grouped.masked_fill(~group_mask[..., None], float("-inf")).view(T, E)
        ids_TK = topk_ids(choice_TE, self.top_k)
        weights_TK = scores_TE.gather(1, ids_TK)
        if self.cfg.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(-1, keepdim=True) + 1e-20)
        weights_TK = weights_TK * self.cfg.routed_scaling_factor
        return scores_TE, ids_TK, weights_TK

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor, rate: float | None = None) -> None:
        rate = self.cfg.bias_update_rate if rate is None else rate
        self.bias.copy_(balance_bias_update(self.bias, load_E.to(self.bias.device), rate))


ROUTER_CLASSES: dict[str, type[Router]] = {
    "topk": TopKRouter,
    "switch": SwitchRouter,
    "noisy_topk": NoisyTopKRouter,
    "expert_choice": ExpertChoiceRouter,
    "sigmoid_bias": SigmoidBiasRouter,
}


def build_router(cfg: ModelConfig) -> Router:
    return ROUTER_CLASSES[cfg.router](cfg)
