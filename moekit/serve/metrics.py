"""Prometheus metrics of the server (``GET /metrics``), on a registry of its own."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from moekit.infer import Engine


class Metrics:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.registry = r = CollectorRegistry()
        self.requests = Counter("moekit_requests", "HTTP requests by path and status", ["path", "status"], registry=r)
        self.tokens_in = Counter("moekit_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.tokens_out = Counter("moekit_generated_tokens", "tokens generated", registry=r)
        self.tokens_per_s = Gauge("moekit_generated_tokens_per_second", "tokens generated per second, last step",
                                  registry=r)
        self.queue = Gauge("moekit_queue_depth", "requests waiting for a cache slot", registry=r)
        self.running = Gauge("moekit_running_requests", "requests holding a cache slot", registry=r)
        self.batch = Histogram("moekit_batch_size", "rows decoded per engine step", registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.ttft = Histogram("moekit_time_to_first_token_seconds", "time from request to its first token",
                              registry=r, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32))
        self.cache_hit = Gauge("moekit_expert_cache_hit_rate", "expert cache hit rate (offloading)", registry=r)
        self._seen = (0, 0)

    def on_step(self, events, seconds: float) -> None:
        """Engine thread, after each step."""
        s = self.engine.stats
        prompt, generated = s.prompt_tokens, s.generated_tokens
        self.tokens_in.inc(prompt - self._seen[0])
        self.tokens_out.inc(generated - self._seen[1])
        if seconds > 0:
            self.tokens_per_s.set((generated - self._seen[1]) / seconds)
        self._seen = (prompt, generated)
        self.queue.set(s.waiting)
        self.running.set(s.running)
        if s.batch_size:
            self.batch.observe(s.batch_size)
        if s.offload is not None:
            lookups = s.offload.hits + s.offload.misses
            self.cache_hit.set(s.offload.hits / lookups if lookups else 0.0)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def count_request(self, path: str, status: int) -> None:
        known = path if path in ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions") \
            else "other"
        self.requests.labels(known, str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
