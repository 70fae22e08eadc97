"""Inference: sampling (pure functions) and KV-cached text generation.

- :func:`generate`: text in, continuation text out, optionally streamed piece by piece;
- :func:`generate_tokens`: token ids in, one token per row yielded per step (batches, custom stops);
- :func:`sample_next` and the filters it chains (:func:`apply_repetition_penalty`,
  :func:`apply_temperature`, :func:`top_k_filter`, :func:`top_p_filter`): logits in, token ids out.
"""

from moekit.infer.generate import generate, generate_tokens
from moekit.infer.sampling import (
    apply_repetition_penalty,
    apply_temperature,
    check_sampling_args,
    sample_next,
    top_k_filter,
    top_p_filter,
)

__all__ = [
    "apply_repetition_penalty",
    "apply_temperature",
    "check_sampling_args",
    "generate",
    "generate_tokens",
    "sample_next",
    "top_k_filter",
    "top_p_filter",
]
