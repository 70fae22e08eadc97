"""Servers for the serve tests: ``moekit serve`` as a real process, or the app in this process on a
real socket (uvicorn in a thread) when a test must reach into the engine to inject a fault."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, ckpt, *flags, env=None):
        for _ in range(3):  # the free port may be taken by another process before the server binds it: retry
            self.port = _free_port()
            self.base = f"http://127.0.0.1:{self.port}"
            self.proc = subprocess.Popen([sys.executable, "-m", "moekit", "serve", str(ckpt), "--port", str(self.port),
                                          "--model-name", "tiny", "--threads", "1", *flags],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                         env={**os.environ, **(env or {})})
            if self._wait_up():
                return
        raise RuntimeError("server did not come up: its port was taken three times")

    def _wait_up(self) -> bool:
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read()
                if "address already in use" in err.lower():
                    return False
                raise RuntimeError(f"server exited: {err}")
            try:
                urllib.request.urlopen(self.base + "/health", timeout=1)
                return True
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("server did not come up")

    def raw(self, method, path, body=None, headers=None, raw_body=None):
        data = raw_body if raw_body is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.read().decode(), {k.lower(): v for k, v in r.headers.items()}
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(), {k.lower(): v for k, v in e.headers.items()}

    def client(self, key="none"):
        return openai.OpenAI(base_url=self.base + "/v1", api_key=key, max_retries=0, timeout=60)

    def stop(self) -> bool:
        """SIGTERM; True if the server shut down cleanly (uvicorn re-raises the signal after its graceful
        shutdown, so the exit status is -SIGTERM) and printed no traceback."""
        self.proc.terminate()
        try:
            rc = self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        return rc in (0, -signal.SIGTERM) and "Traceback" not in self.proc.stderr.read()




class InProcessServer(Server):
    """``create_app(engine, ...)`` served by uvicorn on a thread of this process."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("in-process server did not come up")
            time.sleep(0.05)

    def stop(self) -> bool:
        self.server.should_exit = True
        self.thread.join(30)
        return not self.thread.is_alive()


def metric(server, name: str, labels: str = "") -> float:
    """One sample of ``/metrics`` (0 when absent)."""
    _, text, _ = server.raw("GET", "/metrics", headers=getattr(server, "auth", None))
    for line in text.splitlines():
        if line.startswith(name + labels + " ") or (not labels and line.startswith(name + " ")):
            return float(line.split()[-1])
    return 0.0


def scripted_model(successor: dict[int, int], max_seq_len: int = 128):
    """A real model whose greedy answer is scripted: after token ``t`` it predicts ``successor[t]``.

    Attention and expert outputs are zeroed, so the last hidden state is the token's embedding; each
    scripted token gets its own embedding axis, and the (untied) output head maps that axis to the
    successor's logit. Everything else is an ordinary tiny-moe model, served by the ordinary code."""
    import torch

    from moekit.config import ModelConfig
    from moekit.data.special import SpecialTokens
    from moekit.model import Transformer

    cfg = ModelConfig.from_preset("tiny-moe", dim=64, n_layers=1, n_heads=4, n_kv_heads=2, expert_ffn_dim=64,
                                  max_seq_len=max_seq_len, tie_embeddings=False)
    model = Transformer(cfg)
    tokens = sorted(set(successor) | set(successor.values()))
    assert len(tokens) <= cfg.dim
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj")):
                p.zero_()
        head = dict(model.named_parameters())["lm_head.weight"]
        head.zero_()
        for axis, t in enumerate(tokens):
            model.embed.weight[t].zero_()
            model.embed.weight[t, axis] = 1.0
        for t, nxt in successor.items():
            head[nxt, tokens.index(t)] = 10.0
    model.special_tokens = SpecialTokens()  # no end token: only the script and the stops end an answer
    return model


def tiny_ckpt(path):
    """The serve tests' model: tiny-moe, width 64, 2 layers, a 128-token context, seeded."""
    import torch

    import moekit
    from moekit.config import ModelConfig
    from moekit.data import load_tokenizer
    from moekit.model import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny-moe", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, expert_ffn_dim=64,
                                  max_seq_len=128, init_std=0.05)
    return moekit.save(Transformer(cfg), load_tokenizer(), path)


def endless_ckpt(path, max_seq_len: int = 4096):
    """A small model with a long context and no end token: its answers run to ``max_tokens``, so a
    request holds its slot for seconds (disconnect, shutdown and full-queue tests)."""
    import torch

    import moekit
    from moekit.config import ModelConfig
    from moekit.data import load_tokenizer
    from moekit.data.special import SpecialTokens
    from moekit.model import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny-moe", dim=32, n_layers=1, n_heads=2, n_kv_heads=1, expert_ffn_dim=32,
                                  max_seq_len=max_seq_len)
    model = Transformer(cfg)
    model.special_tokens = SpecialTokens()
    return moekit.save(model, load_tokenizer(), path)
