"""Inference: the engine (continuous batching over KV-cache slots), generation, sampling.

- :class:`Engine`: requests in (:class:`SamplingParams`), :class:`Event` s out, one :meth:`Engine.step`
  at a time; drives ``generate``, ``chat``, the server and the evaluator;
- :func:`generate`: text in, continuation text out, optionally streamed piece by piece;
- :func:`generate_tokens`: token ids in, one token per row yielded per step (batches, custom stops);
- :func:`sample_next` and the filters it chains (:func:`apply_repetition_penalty`,
  :func:`apply_temperature`, :func:`top_k_filter`, :func:`top_p_filter`): logits in, token ids out.
"""

from moekit.infer.engine import (
    Completion,
    Engine,
    EngineError,
    EngineFull,
    EngineStats,
    Event,
    SamplingParams,
    fit_prompt,
)
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
    "Completion",
    "Engine",
    "EngineError",
    "EngineFull",
    "EngineStats",
    "Event",
    "SamplingParams",
    "apply_repetition_penalty",
    "apply_temperature",
    "check_sampling_args",
    "fit_prompt",
    "generate",
    "generate_tokens",
    "sample_next",
    "top_k_filter",
    "top_p_filter",
]
