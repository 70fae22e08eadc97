"""Training: the loop, its configuration, the optimizer and schedule, checkpoints, plots."""

from moekit.train.config import TrainConfig
from moekit.train.loop import RunError, TrainResult, evaluate, train
from moekit.train.optim import build_optimizer, lr_at, param_groups

__all__ = ["RunError", "TrainConfig", "TrainResult", "build_optimizer", "evaluate", "lr_at", "param_groups", "train"]
