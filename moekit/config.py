"""ModelConfig: one dataclass for dense and sparse (MoE) transformers, presets by name, JSON round-trip.

Derived fields are resolved in ``__post_init__`` and every value is validated there, so a bad config
fails at construction with a message that names the field and the valid choices, never deep inside
``forward``. The config holds no devices or process groups: CPU and GPU runs share it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any

ROUTERS = ("topk", "switch", "noisy_topk", "expert_choice", "sigmoid_bias")
TASK_ROUTINGS = ("none", "embedding", "task")
# Routers whose choice can be limited to a task's experts (expert choice picks tokens, not experts).
TASK_ROUTERS = ("topk", "switch", "noisy_topk", "sigmoid_bias")
QK_NORMS = (None, "head", "full")
ATTENTIONS = ("gqa", "mla")


class ConfigError(ValueError):
    """A config value or key is wrong; the message names it and what would be valid."""


@dataclass
class ModelConfig:
    """Shape and routing of a decoder-only transformer. ``num_experts=0`` gives a dense model."""

    # --- transformer body
    vocab_size: int = 4096  # token vocabulary (follows the tokenizer when training)
    dim: int = 128  # model width D (residual stream)
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # query heads
    n_kv_heads: int | None = None  # None -> n_heads (multi-head); fewer -> grouped-query attention
    head_dim: int | None = None  # None -> dim // n_heads
    ffn_dim: int = 512  # hidden width of dense SwiGLU MLPs (dense model, dense-first layers)
    max_seq_len: int = 256  # longest sequence (context) the model is built for
    rope_theta: float = 10000.0  # rotary embedding base
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = True  # share the input embedding with the output head
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    qk_norm: str | None = None  # None | "head" (Qwen3: per head) | "full" (OLMoE: over all heads)
    init_std: float = 0.02  # std of the normal weight init (output projections scaled by 1/sqrt(2L))
    attention: str = "gqa"  # "gqa" (multi-head / grouped-query) | "mla" (DeepSeek multi-head latent attention)
    q_lora_rank: int | None = None  # mla: low-rank query projection width (None = full-rank query)
    kv_lora_rank: int = 512  # mla: width of the compressed key/value latent
    qk_nope_head_dim: int = 128  # mla: per-head query/key width without rotary embedding
    qk_rope_head_dim: int = 64  # mla: per-head query/key width with rotary embedding (one key head, shared)
    v_head_dim: int = 128  # mla: per-head value width
    rope_interleave: bool = True  # mla: rotary pairs are (0,1), (2,3), ... (DeepSeek) instead of rotate-half

    # --- mixture of experts (ignored when num_experts == 0)
    num_experts: int = 0  # routed experts per MoE layer; 0 = dense model
    top_k: int = 2  # experts per token (expert_choice: average experts per token, sets capacity)
    router: str = "topk"  # topk | switch | noisy_topk | expert_choice | sigmoid_bias
    expert_ffn_dim: int | None = None  # None -> ffn_dim; smaller values give fine-grained experts
    norm_topk_prob: bool = True  # renormalise the k selected gate weights to sum to 1
    capacity_factor: float | None = None  # training; None = dropless
    eval_capacity_factor: float | None = None  # eval/inference; None = dropless
    min_capacity: int = 4  # lower bound on per-expert capacity when a capacity factor is set
    num_shared_experts: int = 0  # always-on experts (DeepSeekMoE, Qwen-MoE)
    shared_expert_ffn_dim: int | None = None  # None -> num_shared_experts * expert_ffn_dim
    shared_expert_gate: bool = False  # sigmoid gate on the shared expert output (Qwen2-MoE)
    first_dense_layers: int = 0  # the first N layers use a dense MLP (DeepSeek first_k_dense_replace)
    moe_every: int = 1  # MoE in every N-th layer after the dense-first ones (1 = all)
    router_jitter: float = 0.0  # multiplicative U(1-eps, 1+eps) on router input while training (Switch)
    aux_loss_coef: float = 0.01  # balance loss (topk, switch) / importance + load losses (noisy_topk); moekit sums
    # E * sum_e f_e * P_e (1 when balanced) over MoE layers: transformers' router_aux_loss_coef times K / L
    z_loss_coef: float = 0.001  # router z-loss, every router
    routed_scaling_factor: float = 1.0  # multiplies routed gate weights (topk, switch, sigmoid_bias); DeepSeek-V3 uses 2.5, and
    # top_k restores a dense FFN's output scale (k renormalised weights each ~1/k at init halve a top-2 layer's output)
    switch_gate: str | None = None  # switch: how the expert output is gated. "prob": times its router probability p
    # (the paper; p ~1/E at init, so a top-1 layer starts nearly switched off); "matched" (the switch router's default,
    # None): the same gate, with the experts' output projections initialised num_experts times larger, so that
    # p * expert(x) starts at a dense FFN's scale (issue 18); "unit": p / stopgrad(p), 1 in the forward pass while the
    # router still learns through grad log p. Other routers: "prob" (unused).
    n_group: int = 1  # sigmoid_bias: experts are split into groups ...
    topk_group: int = 1  # ... and only the best topk_group groups may be chosen (DeepSeek-V3)
    bias_update_rate: float = 1e-3  # sigmoid_bias: step of the balance bias update (DeepSeek-V3)

    # --- tasks (issue 20): a task's id is its index in ``tasks``; the forward pass takes task_ids [B]
    tasks: list[str] = field(default_factory=list)  # task names, in id order; empty = no tasks
    task_routing: str = "none"  # none | embedding (a learned task vector added to the router input) | task (own experts)
    # "task" is Task-MoE (Kudugunta et al. 2021): a task's tokens may only go to that task's experts
    task_experts: dict[str, list[int]] | None = None  # task routing: {task: [expert ids]}; None = even blocks
    # Each task's routed experts, the same in every MoE layer (sets may overlap; shared experts stay on). None: the
    # experts split evenly into len(tasks) disjoint contiguous blocks (task_expert_sets()). A task routing whose
    # tasks are still empty is valid: training fills them in from the data (as vocab_size follows the tokenizer).

    def __post_init__(self) -> None:
        self._check_types()
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.attention == "mla":  # rotary embeddings apply to the qk_rope part only
            self.head_dim = self.qk_rope_head_dim
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ConfigError(
                    f"dim={self.dim} is not divisible by n_heads={self.n_heads}; set head_dim explicitly"
                )
            self.head_dim = self.dim // self.n_heads
        if self.expert_ffn_dim is None:
            self.expert_ffn_dim = self.ffn_dim
        if self.switch_gate is None:
            self.switch_gate = "matched" if self.router == "switch" else "prob"
        if self.shared_expert_ffn_dim is None:
            self.shared_expert_ffn_dim = self.num_shared_experts * self.expert_ffn_dim
        self._validate()

    # ------------------------------------------------------------------ validation
    def _check_types(self) -> None:
        check_field_types(self)

    def _validate(self) -> None:
        def positive(name: str) -> None:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be > 0")

        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim",
                     "max_seq_len", "rope_theta", "norm_eps", "init_std", "expert_ffn_dim", "moe_every",
                     "n_group", "topk_group"):
            positive(name)
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.qk_norm not in QK_NORMS:
            raise ConfigError(f"qk_norm={self.qk_norm!r} is not one of {list(QK_NORMS)}")
        if self.attention not in ATTENTIONS:
            raise ConfigError(f"attention={self.attention!r} is not one of {list(ATTENTIONS)}")
        if self.attention == "mla":
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                positive(name)
            if self.q_lora_rank is not None and self.q_lora_rank <= 0:
                raise ConfigError(f"q_lora_rank={self.q_lora_rank} must be > 0, or None for a full-rank query")
            if self.qk_norm is not None:
                raise ConfigError("qk_norm is not used with attention='mla' (it has its own latent norms); set it to None")
            if self.attention_bias:
                raise ConfigError("attention_bias=True is not supported with attention='mla'")
        if self.router not in ROUTERS:
            hint = _did_you_mean(self.router, ROUTERS)
            raise ConfigError(f"router={self.router!r} is not one of {list(ROUTERS)}{hint}")
        if self.num_experts < 0:
            raise ConfigError(f"num_experts={self.num_experts} must be >= 0 (0 = dense model)")
        for name in ("num_shared_experts", "first_dense_layers", "min_capacity", "router_jitter",
                     "aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be >= 0")
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name}={value!r} must be > 0, or None for dropless routing")
        if not 0 <= self.router_jitter < 1:
            raise ConfigError(f"router_jitter={self.router_jitter} must be in [0, 1)")
        if self.num_experts == 0:
            self._validate_tasks()
            return
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"top_k={self.top_k} must be between 1 and num_experts={self.num_experts}")
        if self.router == "switch" and self.top_k != 1:
            raise ConfigError(f"router='switch' routes each token to one expert; got top_k={self.top_k}: set "
                              "top_k=1 (flag --top-k 1), or for top-k routing with a capacity limit use "
                              "router='topk' with a capacity_factor")
        if self.switch_gate not in ("prob", "unit", "matched"):
            raise ConfigError(f"switch_gate={self.switch_gate!r} is not one of ['prob', 'unit', 'matched']")
        if self.switch_gate != "prob" and self.router != "switch":
            raise ConfigError(f"switch_gate={self.switch_gate!r} is a setting of router='switch' (router is "
                              f"{self.router!r}); leave it 'prob'")
        if self.routed_scaling_factor != 1.0 and self.router in ("noisy_topk", "expert_choice"):
            raise ConfigError(f"routed_scaling_factor={self.routed_scaling_factor} is not used by router="
                              f"{self.router!r}; it scales the gates of topk, switch and sigmoid_bias (leave it 1.0)")
        if self.num_experts % self.n_group:
            raise ConfigError(f"num_experts={self.num_experts} must be divisible by n_group={self.n_group}")
        if self.n_group > 1:
            if self.router != "sigmoid_bias":
                raise ConfigError(f"n_group={self.n_group} (group-limited routing) needs router='sigmoid_bias'")
            if not 1 <= self.topk_group <= self.n_group:
                raise ConfigError(f"topk_group={self.topk_group} must be between 1 and n_group={self.n_group}")
            if self.top_k > self.topk_group * (self.num_experts // self.n_group):
                raise ConfigError(f"top_k={self.top_k} exceeds the experts in topk_group={self.topk_group} groups")
        if self.shared_expert_gate and self.num_shared_experts == 0:
            raise ConfigError("shared_expert_gate=True needs num_shared_experts >= 1")
        self._validate_tasks()

    def _validate_tasks(self) -> None:
        """Task names, the routing mode, and (task routing) the router and each task's expert set.

        ``tasks`` may still be empty with a task routing: training fills it with the data's task names
        (as ``vocab_size`` follows the tokenizer); building a model from such a config is refused
        (:meth:`check_tasks`). Like the other MoE fields, the routing is not checked for a dense model.
        """
        seen = set()
        for name in self.tasks:
            if not isinstance(name, str) or not name or name != name.strip():
                raise ConfigError(f"task name {name!r} must be a non-empty string without surrounding spaces")
            if name in seen:
                raise ConfigError(f"task {name!r} is named twice in tasks={self.tasks}")
            seen.add(name)
        if self.task_routing not in TASK_ROUTINGS:
            hint = _did_you_mean(self.task_routing, TASK_ROUTINGS)
            raise ConfigError(f"task_routing={self.task_routing!r} is not one of {list(TASK_ROUTINGS)}{hint}")
        if self.task_experts is not None and self.task_routing != "task":
            raise ConfigError(f"task_experts is a setting of task_routing='task' (task_routing is "
                              f"{self.task_routing!r}); leave it None")
        if self.task_routing != "task" or self.num_experts == 0:
            return
        if self.router not in TASK_ROUTERS:
            raise ConfigError(f"task_routing='task' limits the experts a token may choose; router={self.router!r} "
                              f"lets experts choose tokens instead: use one of {list(TASK_ROUTERS)}")
        if self.n_group > 1:
            raise ConfigError(f"task_routing='task' and group-limited routing (n_group={self.n_group}) both limit "
                              "the experts a token may choose: set n_group=1")
        for name in ("capacity_factor", "eval_capacity_factor"):
            if getattr(self, name) is not None:
                # Capacity is sized for tokens spread over all E experts; a task's tokens share its few.
                raise ConfigError(f"{name}={getattr(self, name)} with task_routing='task': a task's tokens crowd "
                                  "its own experts, so a capacity sized for all of them would drop most tokens; set "
                                  f"{name}=None (dropless)")
        E, K = self.num_experts, self.top_k
        if self.task_experts is None:
            if self.tasks and E // len(self.tasks) < K:
                raise ConfigError(f"num_experts={E} split among {len(self.tasks)} tasks gives blocks of "
                                  f"{E // len(self.tasks)} experts, fewer than top_k={K}: give task_experts, more "
                                  "experts or a smaller top_k")
            return
        if not self.tasks:  # checked once training has filled in the data's task names
            return
        for name in self.task_experts:
            if name not in self.tasks:
                raise ConfigError(f"task_experts names task {name!r}{_did_you_mean(name, self.tasks)}, which is not "
                                  f"one of tasks={self.tasks}")
        for name in self.tasks:
            experts = self.task_experts.get(name)
            if experts is None:
                raise ConfigError(f"task_experts has no expert set for task {name!r}: give one for each of "
                                  f"tasks={self.tasks}")
            if not isinstance(experts, list) or any(isinstance(e, bool) or not isinstance(e, int) for e in experts):
                raise ConfigError(f"task_experts[{name!r}]={experts!r} must be a list of expert indices")
            bad = [e for e in experts if not 0 <= e < E]
            if bad:
                raise ConfigError(f"task_experts[{name!r}] holds {bad[0]}, not an expert index in [0, {E})")
            if len(set(experts)) != len(experts):
                raise ConfigError(f"task_experts[{name!r}]={experts} names an expert twice")
            if len(experts) < K:
                raise ConfigError(f"task_experts[{name!r}] has {len(experts)} expert(s), fewer than top_k={K}: each "
                                  "token of the task chooses top_k of them")

    def check_tasks(self) -> None:
        """Raise a ConfigError if a model of this config cannot be built for lack of task names (a task
        routing whose ``tasks`` training had not filled in)."""
        if self.num_experts and self.task_routing != "none" and not self.tasks:
            raise ConfigError(f"task_routing={self.task_routing!r} needs tasks: train on data with task labels "
                              "(--data NAME=PATH, or a \"task\" field in JSONL records), or set task_routing='none'")

    def task_expert_sets(self) -> dict[str, list[int]]:
        """Each task's routed experts under ``task_routing='task'``: ``task_experts``, or by default the
        experts split into len(tasks) contiguous blocks whose sizes differ by at most one."""
        if self.task_experts is not None:
            return {name: list(self.task_experts[name]) for name in self.tasks}
        n, E = len(self.tasks), self.num_experts
        bounds = [t * E // n for t in range(n + 1)]
        return {name: list(range(bounds[t], bounds[t + 1])) for t, name in enumerate(self.tasks)}

    # ------------------------------------------------------------------ structure
    def is_moe_layer(self, layer: int) -> bool:
        """Whether block ``layer`` (0-based) uses a mixture of experts instead of a dense MLP."""
        if self.num_experts == 0 or layer < self.first_dense_layers:
            return False
        return (layer - self.first_dense_layers) % self.moe_every == 0

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.n_layers))

    def param_counts(self) -> tuple[int, int]:
        """(total, active per token) parameter counts, computed from the shapes alone.

        Active counts the k routed experts a token uses plus everything always on; the embedding is
        counted once when tied. Matches ``sum(p.numel())`` of the built model (tested).
        """
        d, hd = self.dim, self.head_dim
        attn = d * hd * (self.n_heads + 2 * self.n_kv_heads) + self.n_heads * hd * d
        if self.attention_bias:
            attn += hd * (self.n_heads + 2 * self.n_kv_heads)
        if self.attention == "mla":
            H, qk = self.n_heads, self.qk_nope_head_dim + self.qk_rope_head_dim
            q = d * H * qk if self.q_lora_rank is None else d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * H * qk
            kv = d * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
            kv += self.kv_lora_rank * H * (self.qk_nope_head_dim + self.v_head_dim)
            attn = q + kv + H * self.v_head_dim * d
        if self.qk_norm == "head":
            attn += 2 * hd
        elif self.qk_norm == "full":
            attn += self.n_heads * hd + self.n_kv_heads * hd
        dense_mlp = 3 * d * self.ffn_dim
        expert = 3 * d * self.expert_ffn_dim
        shared = 3 * d * self.shared_expert_ffn_dim + (d if self.shared_expert_gate else 0)
        router = d * self.num_experts * (2 if self.router == "noisy_topk" else 1)
        if self.task_routing == "embedding":
            router += len(self.tasks) * d  # each router's task embedding
        total = active = 0
        for i in range(self.n_layers):
            block = attn + 2 * d  # two RMSNorm weights
            if self.is_moe_layer(i):
                total += block + router + shared + self.num_experts * expert
                active += block + router + shared + self.top_k * expert
            else:
                total += block + dense_mlp
                active += block + dense_mlp
        emb = self.vocab_size * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        total += emb + head + d
        active += emb + head + d
        return total, active

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a dict; an unknown key raises an error naming it and the valid keys."""
        valid = [f.name for f in fields(cls)]
        for key in data:
            if key not in valid:
                raise ConfigError(f"unknown config key {key!r}{_did_you_mean(key, valid)}; "
                                  f"valid keys: {', '.join(valid)}")
        return cls(**data)

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            from moekit.utils import atomic_write_text

            atomic_write_text(path, text)
        return text

    @classmethod
    def from_json(cls, path_or_text: str | os.PathLike) -> ModelConfig:
        """Load from a JSON file path or a JSON string."""
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            try:
                with open(path_or_text, encoding="utf-8") as f:
                    text = f.read()
            except OSError as e:
                raise ConfigError(f"cannot read config file {path_or_text}: {e.strerror}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config {path_or_text} is not valid JSON: {e}") from None
        return cls.from_dict(data)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset (see ``PRESETS``), optionally with fields overridden."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}{_did_you_mean(name, PRESETS)}; "
                              f"available: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


def check_field_types(obj: Any) -> None:
    """Raise a ConfigError naming the first dataclass field whose value has the wrong type
    (an int is accepted for a float field; a bool is never accepted for an int field)."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        allowed = _allowed_types(f.type)
        if value is None and type(None) in allowed:
            continue
        if isinstance(value, bool) and bool not in allowed:
            raise ConfigError(f"{f.name}={value!r}: expected {f.type}, got a bool")
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            continue
        if not isinstance(value, tuple(t for t in allowed if t is not type(None))):
            raise ConfigError(f"{f.name}={value!r}: expected {f.type}, got {type(value).__name__}")


def _allowed_types(annotation: Any) -> tuple[type, ...]:
    # A container ("dict[str, float]") is checked as its container; its owner's validation checks the items.
    names = {"int": int, "float": float, "str": str, "bool": bool, "None": type(None), "list": list, "dict": dict}
    return tuple(names[part.split("[")[0].strip()] for part in str(annotation).split("|"))


def _did_you_mean(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# Presets: tiny ones train in seconds on a CPU (tests, docs); architecture presets mirror published
# models' shapes (they are far too large to build in tests; param_counts() checks them analytically).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny-dense": dict(vocab_size=4096, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=512,
                       max_seq_len=256),
    # Same depth, width and active FFN width per token as tiny-dense: 8 experts of 256, top-2.
    "tiny-moe": dict(vocab_size=4096, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=512,
                     max_seq_len=256, num_experts=8, top_k=2, expert_ffn_dim=256),
    # The main job's model (`make run`, BENCHMARKS.md "What sparsity buys"): at width 64 the dense FFN is
    # the bottleneck, so routed FFN capacity pays. DeepSeek-V3 routing (sigmoid scores, bias balancing,
    # no balance loss); gate weights scaled by k so the two experts add up to a dense FFN's output scale.
    "micro-moe": dict(vocab_size=4096, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=256, max_seq_len=256,
                      num_experts=16, top_k=2, expert_ffn_dim=128, router="sigmoid_bias", routed_scaling_factor=2.0),
    "small-moe": dict(vocab_size=8192, dim=384, n_layers=6, n_heads=6, n_kv_heads=2, ffn_dim=1536,
                      max_seq_len=512, num_experts=16, top_k=2, expert_ffn_dim=768),
    "mixtral-8x7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                         max_seq_len=32768, rope_theta=1e6, tie_embeddings=False, num_experts=8, top_k=2,
                         aux_loss_coef=0.02 * 2 / 32),  # Mixtral's 0.02 in transformers' definition (see aux_loss_coef)
    # Qwen1.5-MoE-A2.7B: 60 fine-grained experts, top-4, one always-on shared expert with a sigmoid gate.
    "qwen2-moe": dict(vocab_size=151936, dim=2048, n_layers=24, n_heads=16, n_kv_heads=16, ffn_dim=5632,
                      max_seq_len=8192, rope_theta=1e6, norm_eps=1e-6, tie_embeddings=False,
                      attention_bias=True, num_experts=60, top_k=4, expert_ffn_dim=1408,
                      norm_topk_prob=False, num_shared_experts=1, shared_expert_ffn_dim=5632,
                      shared_expert_gate=True, aux_loss_coef=0.001 * 4 / 24),  # transformers' 0.001
    # DeepSeek-V3 (671B total, 37B active): multi-head latent attention, 256 fine-grained experts top-8
    # with sigmoid scores, a selection-only bias and group-limited routing, one shared expert, 3 dense layers.
    # (Its YaRN rope scaling for long context is not modelled.)
    "deepseek-v3": dict(vocab_size=129280, dim=7168, n_layers=61, n_heads=128, n_kv_heads=128, ffn_dim=18432,
                        max_seq_len=4096, rope_theta=10000.0, norm_eps=1e-6, tie_embeddings=False, attention="mla",
                        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                        num_experts=256, top_k=8, expert_ffn_dim=2048, router="sigmoid_bias", n_group=8, topk_group=4,
                        routed_scaling_factor=2.5, num_shared_experts=1, first_dense_layers=3, aux_loss_coef=0.0,
                        z_loss_coef=0.0),
    # OLMoE-1B-7B: 64 experts, top-8, QK-norm over all heads, no renormalisation of the top-k.
    "olmoe-1b-7b": dict(vocab_size=50304, dim=2048, n_layers=16, n_heads=16, n_kv_heads=16, ffn_dim=1024,
                        max_seq_len=4096, tie_embeddings=False, qk_norm="full", num_experts=64, top_k=8,
                        expert_ffn_dim=1024, norm_topk_prob=False, aux_loss_coef=0.01 * 8 / 16,  # transformers' 0.01
                        z_loss_coef=0.001),
}
