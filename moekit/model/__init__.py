"""The model: config-driven dense and MoE transformers."""

from moekit.model.transformer import ModelOutput, Transformer, update_router_biases

__all__ = ["ModelOutput", "Transformer", "update_router_biases"]
