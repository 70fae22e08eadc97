"""TrainConfig and the run specification read from files and flags.

A config file (TOML or JSON) may hold model fields and training fields side by side, at top level or
under ``[model]`` / ``[train]`` tables, plus ``preset``. Flags override the file; the file overrides
the preset. Any unknown key is an error that names it and the valid keys.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from moekit.config import ConfigError, ModelConfig, _did_you_mean, check_field_types
from moekit.data.tasks import check_data_setting, check_weights_setting
from moekit.train.optim import SCHEDULES


@dataclass
class TrainConfig:
    """Everything about a training run that is not the model's shape."""

    max_steps: int = 200  # optimizer steps
    batch_size: int = 16  # sequences per micro-batch
    seq_len: int = 128  # tokens per sequence
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20  # steps of linear learning-rate warmup (at most a tenth of max_steps)
    schedule: str = "cosine"  # after warmup: cosine (to lr * min_lr_ratio) | constant | inv_sqrt (Switch, T5)
    weight_decay: float = 0.1  # AdamW decay on matrices (never on norms, biases, embeddings)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    bf16: bool = False  # bfloat16 autocast for matmuls (weights and optimizer stay float32)
    seed: int = 0  # seeds the init, the data order and every random draw
    eval_every: int = 50  # steps between validation passes (and at the end); 0 = only at the end
    eval_batches: int = 20  # validation batches per pass (sequential windows of the held-out text)
    save_every: int = 100  # steps between checkpoints (and at the end)
    keep_last: int = 2  # checkpoints kept; older ones are pruned
    log_every: int = 10  # steps between lines in metrics.jsonl
    data: str | dict[str, str] | None = None  # .txt/.jsonl/folder, or {task: path} (--data NAME=PATH each); None = Shakespeare
    task_weights: dict[str, float] | None = None  # each task's relative share of batch rows (a=2,b=1); None = by its tokens
    tokenizer: str | None = None  # tokenizer.json (or a folder with one); None = embedded or trained
    vocab_size: int | None = None  # train a new BPE tokenizer of this size on the training data (the model's vocab follows)
    threads: int | None = None  # torch CPU threads; None = torch's default

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in ("max_steps", "batch_size", "seq_len", "grad_accum", "log_every", "keep_last", "eval_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("warmup_steps", "weight_decay", "grad_clip", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads={self.threads} must be >= 1 (or unset: torch's default)")
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr} must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule={self.schedule!r} is not one of {list(SCHEDULES)}")
        if self.vocab_size is not None and self.tokenizer is not None:
            raise ConfigError("give either tokenizer (load one) or vocab_size (train one), not both")
        if self.vocab_size is not None and self.vocab_size < 260:
            raise ConfigError(f"vocab_size={self.vocab_size} must be >= 260 (256 bytes + special tokens)")
        check_data_setting(self.data)
        check_weights_setting(self.task_weights)

    @property
    def effective_warmup(self) -> int:
        """Warm-up steps actually used: ``warmup_steps``, at most a tenth of the run, so that a short run
        (``--max-steps 20`` with the default 20) still reaches its schedule instead of only warming up."""
        return min(self.warmup_steps, self.max_steps // 10)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


MODEL_KEYS = [f.name for f in fields(ModelConfig)]
TRAIN_KEYS = [f.name for f in fields(TrainConfig)]


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A flat {key: value} dict from a TOML or JSON file (``[model]``/``[train]`` tables are merged)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror}") from None
    try:
        if p.suffix.lower() == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            data = tomllib.loads(raw.decode("utf-8"))
        else:
            data = json.loads(raw)
    except Exception as e:  # noqa: BLE001 - any parse error becomes one clear line
        raise ConfigError(f"config file {p} could not be parsed: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a table/object of settings")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("model", "train") and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def split_settings(settings: dict[str, Any], source: str) -> tuple[str | None, dict[str, Any], dict[str, Any]]:
    """Route keys to (preset, model overrides, train overrides); unknown keys raise a ConfigError."""
    preset = settings.get("preset")
    model, train = {}, {}
    for key, value in settings.items():
        if key == "preset":
            continue
        if key in TRAIN_KEYS:  # vocab_size lands here: a run's vocabulary comes from its tokenizer
            train[key] = value
        elif key in MODEL_KEYS:
            model[key] = value
        else:
            valid = ["preset"] + MODEL_KEYS + TRAIN_KEYS
            raise ConfigError(f"unknown setting {key!r} in {source}{_did_you_mean(key, valid)}; "
                              f"valid: {', '.join(valid)}")
    return preset, model, train


def build_configs(preset: str | None, model_overrides: dict[str, Any], train_overrides: dict[str, Any],
                  default_preset: str = "tiny-moe") -> tuple[ModelConfig, TrainConfig]:
    cfg = ModelConfig.from_preset(preset or default_preset, **model_overrides)
    return cfg, TrainConfig(**train_overrides)
