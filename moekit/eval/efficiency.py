"""What a model costs to run: parameters, FLOPs per token, tokens/s through the inference engine, memory.

Every speed figure comes from :class:`moekit.infer.engine.Engine`, the code path that serves, on this
machine, at batch 1: one prefill of ``prompt_tokens`` seeded random token ids, then ``decode_tokens``
greedy decode steps. A warm-up run of the same shape goes first (kernel selection, allocator, the
runner's fused weights), then the median of :data:`REPEATS` timed runs is reported.

FLOPs per token (forward, multiply-add = 2 FLOPs; Kaplan et al. 2020, "Scaling laws", table 1):

    flops_per_token(context) = 2 * matmul_params_active + 2 * n_layers * context * (width_qk + width_v)

- ``matmul_params_active``: the active parameters (``ModelConfig.param_counts``: the k routed experts a
  token uses plus everything always on) that take part in a matrix multiply: every projection, the
  routers, the chosen and shared experts, the output head. Left out: the input embedding when it is not
  tied (a table lookup), norm weights, biases (an add each), and the noisy router's noise projection
  (used only while training).
- attention: each token's query scores ``context`` keys (2 * context * width_qk) and mixes as many values
  (2 * context * width_v), in every layer. ``width = n_heads * head_dim`` for both in grouped-query
  attention, so the term is the familiar 2 x 2 x n_layers x context x width; multi-head latent attention
  counts its per-head query/key width (``qk_nope + qk_rope``) and value width (``v_head_dim``), in the
  non-absorbed form. Grouped-query sharing saves memory, not FLOPs, so ``n_kv_heads`` does not enter.
- ``context`` is the number of positions a token attends to; :func:`measure` states it at
  ``prompt_tokens`` (the first decoded token's context). A forward over T tokens costs T times the figure
  at context T when the attention is computed in full (as the test's independent count does), about
  half that for the attention term with a causal kernel that skips masked blocks.
"""

from __future__ import annotations

import resource
import statistics
import time

import torch

from moekit.config import ModelConfig
from moekit.utils import proc_status_bytes

#: Timed runs after the warm-up; the median of each rate is reported.
REPEATS = 3


# --------------------------------------------------------------------------- FLOPs (pure functions)
def matmul_params_per_token(cfg: ModelConfig) -> int:
    """Active parameters per token that take part in a matrix multiply (see the module doc)."""
    _, active = cfg.param_counts()
    d = cfg.dim
    skipped = d + 2 * d * cfg.n_layers  # final norm, two norms per block
    if not cfg.tie_embeddings:
        skipped += cfg.vocab_size * d  # the input embedding is a lookup; the separate head multiplies
    if cfg.attention == "mla":
        skipped += cfg.n_layers * (cfg.kv_lora_rank + (cfg.q_lora_rank or 0))  # the latent norms
    else:
        if cfg.attention_bias:
            skipped += cfg.n_layers * cfg.head_dim * (cfg.n_heads + 2 * cfg.n_kv_heads)
        if cfg.qk_norm == "head":
            skipped += cfg.n_layers * 2 * cfg.head_dim
        elif cfg.qk_norm == "full":
            skipped += cfg.n_layers * cfg.head_dim * (cfg.n_heads + cfg.n_kv_heads)
    if cfg.num_experts and cfg.router == "noisy_topk":
        moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
        skipped += moe_layers * d * cfg.num_experts  # noise_weight: training only
    return active - skipped


def attention_widths(cfg: ModelConfig) -> tuple[int, int]:
    """(query/key width, value width) summed over heads: what one attention score and one mixed value cost."""
    if cfg.attention == "mla":
        return cfg.n_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim), cfg.n_heads * cfg.v_head_dim
    return cfg.n_heads * cfg.head_dim, cfg.n_heads * cfg.head_dim


def flops_per_token(cfg: ModelConfig, context: int) -> int:
    """Forward FLOPs of one token that attends to ``context`` positions (formula in the module doc)."""
    if isinstance(context, bool) or not isinstance(context, int) or context < 0:
        raise ValueError(f"context={context!r} must be an integer >= 0")
    qk, v = attention_widths(cfg)
    return 2 * matmul_params_per_token(cfg) + 2 * cfg.n_layers * context * (qk + v)


# --------------------------------------------------------------------------- what the weights are
def weights_kind(model) -> str:
    """How the loaded weights are held: "float32" / "bfloat16" / "float16" (the float weights' dtype),
    "int8" / "int4" (``model.quantization``, set by :func:`moekit.quant.quantize_model`, quantized
    checkpoints and GGUF files; a GGUF mixing kinds reports its narrowest), with "+offloaded" appended
    when the experts stay on disk (``model.expert_offload``, :func:`moekit.infer.offload.load_offloaded`)."""
    quantization = getattr(model, "quantization", None)
    if quantization:
        kind = f"int{quantization['bits']}"
    else:
        kind = str(model.norm.weight.dtype).removeprefix("torch.")
    if getattr(model, "expert_offload", None) is not None:
        kind += "+offloaded"
    return kind


# --------------------------------------------------------------------------- memory (Linux /proc)


def reset_peak_rss() -> bool:
    """Reset this process's resident-memory high-water mark (Linux >= 4.0: ``5`` to ``/proc/self/clear_refs``)
    to the current RSS. False where that is not possible: the peak then counts from the process's start."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak resident set size of this process, bytes: ``VmHWM`` on Linux, else ``ru_maxrss``."""
    # NOTE: ru_maxrss is KiB on Linux but bytes on macOS; it is only the fallback off Linux.
    return proc_status_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --------------------------------------------------------------------------- the measurement
def measure(model, tokenizer, *, seed: int = 0, prompt_tokens: int = 128, decode_tokens: int = 32,
            task: str | None = None) -> dict:
    """Cost of running ``model`` on this machine: parameters, FLOPs/token, prefill and decode tokens/s
    through the engine, peak resident memory during the measurement, and how the weights are held.

    Keys: ``params_total``, ``params_active`` (per token), ``flops_per_token`` (at context
    ``flops_context``), ``prefill_tokens_per_s``, ``decode_tokens_per_s``, ``peak_rss_bytes``
    (``peak_rss_reset``: whether the high-water mark could be reset first; if not, it counts from the
    process's start), ``weights``, and the shape actually run: ``prompt_tokens``, ``decode_tokens``
    (both shrunk in proportion when the model's context is shorter than their sum + 1), ``threads``.

    The end token does not stop decoding (``stop_ids=()``), so every run decodes exactly
    ``decode_tokens`` tokens; greedy, so the runs are identical.
    """
    from moekit.infer.engine import Engine, SamplingParams

    for name, value in (("prompt_tokens", prompt_tokens), ("decode_tokens", decode_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1")
    cfg = model.cfg
    room = cfg.max_seq_len - 1  # the prefill step samples one token before the timed decode steps
    if prompt_tokens + decode_tokens > room:
        decode_tokens = max(1, decode_tokens * room // (prompt_tokens + decode_tokens))
        prompt_tokens = room - decode_tokens
    # NOTE: the high-water mark is the process's own: resetting it also resets it for anyone else reading it.
    reset = reset_peak_rss()
    engine = Engine(model, tokenizer, max_batch=1, max_len=prompt_tokens + decode_tokens + 1,
                    prefill_chunk=prompt_tokens)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, cfg.vocab_size, (prompt_tokens,), generator=g).tolist()
    # ``task``: a task-aware model (issue 20) is measured on one of its tasks' paths
    params = SamplingParams(max_new_tokens=decode_tokens + 1, temperature=0.0, seed=seed, stop_ids=(), task=task)
    _timed_run(engine, prompt, params)  # warm-up
    runs = [_timed_run(engine, prompt, params) for _ in range(REPEATS)]
    total, active = cfg.param_counts()
    return {
        "params_total": total,
        "params_active": active,
        "flops_per_token": flops_per_token(cfg, prompt_tokens),
        "flops_context": prompt_tokens,
        "prefill_tokens_per_s": statistics.median(prompt_tokens / p for p, _ in runs),
        "decode_tokens_per_s": statistics.median(decode_tokens / d for _, d in runs),
        "peak_rss_bytes": peak_rss(),
        "peak_rss_reset": reset,
        "weights": weights_kind(model),
        "prompt_tokens": prompt_tokens,
        "decode_tokens": decode_tokens,
        "threads": torch.get_num_threads(),
    }


def _timed_run(engine, prompt: list[int], params) -> tuple[float, float]:
    """(seconds of the prefill step, seconds of the decode steps) of one request run to its length.

    The prefill step (the whole prompt in one chunk) also samples the first token; each later step
    decodes one token, so the decode time covers ``max_new_tokens - 1`` tokens."""
    rid = engine.add_request(prompt, params)
    t0 = time.perf_counter()
    engine.step()
    t1 = time.perf_counter()
    steps = 0
    while not engine.request(rid).finished:
        engine.step()
        steps += 1
    t2 = time.perf_counter()
    req = engine.request(rid)
    engine.release(rid)
    # NOTE: a silent short run would inflate the decode rate; the engine's own contract says it cannot happen.
    if req.finish_reason != "length" or len(req.output_ids) != params.max_new_tokens or steps != params.max_new_tokens - 1:
        raise RuntimeError(f"the timing run ended after {len(req.output_ids)} of {params.max_new_tokens} tokens "
                           f"({req.finish_reason})")
    return t1 - t0, t2 - t1
