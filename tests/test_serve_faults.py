"""Faults in the server must never look like success: a failing engine step, a dead engine thread,
a shutdown with requests in flight, an unexpected exception in a handler. The app runs in this
process on a real socket (uvicorn on a thread) so that a test can break the engine under it."""

import http.client
import json
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")

from serve_util import InProcessServer, metric  # noqa: E402

from moekit.config import ModelConfig  # noqa: E402
from moekit.data import load_tokenizer  # noqa: E402
from moekit.data.special import SpecialTokens  # noqa: E402
from moekit.infer import Engine  # noqa: E402
from moekit.model import Transformer  # noqa: E402
from moekit.serve import begin_shutdown, create_app  # noqa: E402


class FaultyEngine(Engine):
    """An engine whose step raises, while requests run, once ``fail_after`` steps have run (None: never)."""

    fail_after: int | None = None

    def step(self):
        if self.fail_after is not None and self.stats.steps >= self.fail_after and self.running:
            raise RuntimeError("secret detail /home/user/model.safetensors")
        return super().step()


@pytest.fixture(scope="module")
def model_and_tokenizer():
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny-moe", dim=32, n_layers=1, n_heads=2, n_kv_heads=1, expert_ffn_dim=32,
                                  max_seq_len=1024)
    model = Transformer(cfg)
    model.special_tokens = SpecialTokens()  # no end token: answers run to max_tokens
    return model, load_tokenizer()


@pytest.fixture
def served(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = FaultyEngine(model, tokenizer, max_batch=4, max_queue=4)
    s = InProcessServer(create_app(engine, "tiny"))
    s.engine = engine
    yield s
    s.stop()


def _post(server, body, path="/v1/completions"):
    return server.raw("POST", path, body)


def _stream_events(server, body, path="/v1/completions"):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", path, json.dumps({**body, "stream": True}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    return [line[6:] for line in resp.read().decode().splitlines() if line.startswith("data: ")]


def _wait(cond, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_a_failing_engine_step_is_a_500_not_a_finish_and_the_server_goes_on(served):
    served.engine.fail_after = served.engine.stats.steps + 3
    code, text, _ = _post(served, {"model": "tiny", "prompt": "x", "max_tokens": 50})
    assert code == 500, text
    err = json.loads(text)["error"]
    assert err["type"] == "server_error" and "secret" not in text and "RuntimeError" not in text
    served.engine.fail_after = served.engine.stats.steps + 3
    events = _stream_events(served, {"model": "tiny", "prompt": "x", "max_tokens": 50})
    assert "[DONE]" not in events and json.loads(events[-1])["error"]["type"] == "server_error"
    assert all(json.loads(e)["choices"][0]["finish_reason"] is None for e in events[:-1])
    served.engine.fail_after = None  # a step failure fails its requests, not the server
    code, text, _ = _post(served, {"model": "tiny", "prompt": "x", "max_tokens": 3})
    assert code == 200 and json.loads(text)["choices"][0]["finish_reason"] == "length"
    assert served.raw("GET", "/health")[0] == 200
    assert metric(served, "moekit_requests_total", '{path="/v1/completions",status="500"}') == 1


def test_a_dead_engine_thread_fails_every_request_and_health_says_so(served):
    holder = {}

    def run():
        holder["answer"] = _post(served, {"model": "tiny", "prompt": "x", "max_tokens": 900})

    t = threading.Thread(target=run)
    t.start()
    assert _wait(lambda: served.engine.stats.generated_tokens > 2)

    def broken():
        raise MemoryError("the loop itself breaks (outside engine.step)")

    served.engine.has_work = broken
    t.join(30)
    code, text, _ = holder["answer"]
    assert code == 503 and json.loads(text)["error"]["code"] == "unavailable"
    code, text, _ = served.raw("GET", "/health")
    assert code == 503 and "restart" in json.loads(text)["error"]["message"]
    code, _, _ = _post(served, {"model": "tiny", "prompt": "y", "max_tokens": 2})
    assert code == 503  # refused at once, not hanging


def test_a_failing_step_callback_or_delivery_is_contained(served):
    client = served.app.state.client

    def bad_metrics(events, seconds):
        raise ValueError("metrics broke")

    client.on_step = bad_metrics
    code, text, _ = _post(served, {"model": "tiny", "prompt": "x", "max_tokens": 4})
    assert code == 200 and json.loads(text)["usage"]["completion_tokens"] == 4
    assert client.healthy


def test_shutdown_with_requests_in_flight_fails_them_with_503(served):
    holder = {}

    def run():
        holder["plain"] = _post(served, {"model": "tiny", "prompt": "x", "max_tokens": 900})

    def run_stream():
        holder["stream"] = _stream_events(served, {"model": "tiny", "prompt": "x", "max_tokens": 900})

    threads = [threading.Thread(target=run), threading.Thread(target=run_stream)]
    for t in threads:
        t.start()
    assert _wait(lambda: served.engine.stats.running == 2 and served.engine.stats.generated_tokens > 4)
    begin_shutdown(served.app)
    for t in threads:
        t.join(30)
    code, text, _ = holder["plain"]
    assert code == 503 and "shutting down" in json.loads(text)["error"]["message"]
    assert "[DONE]" not in holder["stream"]
    assert json.loads(holder["stream"][-1])["error"]["message"] == "the server is shutting down"
    assert _post(served, {"model": "tiny", "prompt": "y", "max_tokens": 2})[0] == 503


def test_an_unexpected_exception_is_a_generic_counted_500(served, monkeypatch):
    from moekit.serve.serving import OpenAIServing

    async def boom(self, texts):
        raise KeyError("/home/user/secret")

    monkeypatch.setattr(OpenAIServing, "tokenize", boom)
    code, text, _ = _post(served, {"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert code == 500 and "secret" not in text and "KeyError" not in text
    assert json.loads(text)["error"]["type"] == "server_error"
    assert metric(served, "moekit_requests_total", '{path="/v1/completions",status="500"}') == 1


def test_prompts_are_tokenized_off_the_event_loop(served):
    threads = []
    serving = served.app.state.serving["completions"]
    tokenizer = serving.tokenizer

    class Spy:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def encode_batch(self, *a, **kw):
            threads.append(threading.current_thread())
            return tokenizer.encode_batch(*a, **kw)

    serving.tokenizer = Spy()
    try:
        code, text, _ = _post(served, {"model": "tiny", "prompt": "x " * 10, "max_tokens": 1})
    finally:
        serving.tokenizer = tokenizer
    assert code == 200, text
    assert threads and all(t is not served.thread for t in threads)  # served.thread runs the event loop
