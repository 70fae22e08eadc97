"""moekit: sparse Mixture-of-Experts language models you can define, train, convert and serve on a CPU."""

from moekit.checkpoint import load, save
from moekit.config import PRESETS, ConfigError, ModelConfig
from moekit.infer import generate
from moekit.model import ModelOutput, Transformer, update_router_biases

__version__ = "0.1.0"

__all__ = ["PRESETS", "ConfigError", "ModelConfig", "ModelOutput", "Transformer", "generate", "load", "save",
           "update_router_biases"]
