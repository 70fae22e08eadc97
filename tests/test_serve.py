"""``moekit serve``: a real server process on loopback, real clients (the official ``openai`` package,
raw HTTP for what an SDK would never send)."""

import concurrent.futures
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from serve_util import Server

import moekit
from moekit.cli import main
from moekit.config import ModelConfig
from moekit.data import load_tokenizer
from moekit.model import Transformer

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny-moe", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, expert_ffn_dim=64,
                                  max_seq_len=128, init_std=0.05)
    return moekit.save(Transformer(cfg), load_tokenizer(), tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def server(ckpt):
    s = Server(ckpt, "--max-batch", "8", "--max-queue", "64")
    yield s
    assert s.stop()  # SIGTERM: a clean, graceful exit


def _generate_cli(ckpt, prompt, n, capsys):
    assert main(["generate", str(ckpt), "--prompt", prompt, "--max-new-tokens", str(n), "--temperature", "0"]) == 0
    return capsys.readouterr().out[len(prompt):].rstrip("\n")


def test_completion_and_chat_with_the_openai_client_equal_moekit_generate(server, ckpt, capsys):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=12, temperature=0)
    assert r.choices[0].text == _generate_cli(ckpt, "ROMEO:", 12, capsys)
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens > 0
    assert r.choices[0].finish_reason == "length"
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}],
                                          max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 8
    again = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}],
                                           max_tokens=8, temperature=0)
    assert again.choices[0].message.content == chat.choices[0].message.content
    parts = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
        {"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]}], max_tokens=8, temperature=0)
    assert parts.choices[0].message.content == chat.choices[0].message.content  # text parts are joined


def test_streaming_gives_the_same_text_and_ends_with_done(server):
    client = server.client()
    whole = client.completions.create(model="tiny", prompt="JULIET:", max_tokens=10, temperature=0).choices[0].text
    pieces = [c.choices[0].text for c in client.completions.create(model="tiny", prompt="JULIET:", max_tokens=10,
                                                                     temperature=0, stream=True)]
    assert "".join(pieces) == whole
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=6, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    last = list(client.completions.create(model="tiny", prompt="JULIET:", max_tokens=10, temperature=0, stream=True,
                                          stream_options={"include_usage": True}))[-1]
    assert last.choices == [] and last.usage.completion_tokens == 10
    status, body, _ = server.raw("POST", "/v1/completions", {"model": "tiny", "prompt": "A", "max_tokens": 3,
                                                             "stream": True})
    assert status == 200 and body.rstrip().endswith("data: [DONE]")


def test_sampling_options_n_seed_stop_and_logprobs(server):
    client = server.client()
    a = client.completions.create(model="tiny", prompt="To be", max_tokens=8, temperature=1.0, seed=5, n=2)
    b = client.completions.create(model="tiny", prompt="To be", max_tokens=8, temperature=1.0, seed=5, n=2)
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and [c.index for c in a.choices] == [0, 1]
    lp = client.completions.create(model="tiny", prompt="To be", max_tokens=5, temperature=0, logprobs=0)
    assert len(lp.choices[0].logprobs.token_logprobs) == 5
    assert all(x <= 0 for x in lp.choices[0].logprobs.token_logprobs)
    text = client.completions.create(model="tiny", prompt="To be", max_tokens=20, temperature=0).choices[0].text
    if len(text.strip()) > 2:
        stop = text.strip()[1:3]
        cut = client.completions.create(model="tiny", prompt="To be", max_tokens=20, temperature=0, stop=[stop])
        assert stop not in cut.choices[0].text and cut.choices[0].finish_reason == "stop"


def test_32_clients_at_once_are_batched_and_all_answered(server):
    client = server.client()
    prompts = [f"Line {i}:" for i in range(32)]
    alone = {p: client.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0).choices[0].text
             for p in prompts[:4]}
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda p: client.completions.create(model="tiny", prompt=p, max_tokens=24,
                                                                    temperature=0), prompts))
    assert all(r.usage.completion_tokens >= 1 for r in results)
    for p, r in zip(prompts[:4], results[:4]):
        assert r.choices[0].text.startswith(alone[p][:3])  # the same greedy start inside a batch
    _, metrics, _ = server.raw("GET", "/metrics")
    batch = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines()
             if line.startswith("moekit_batch_size_bucket")}
    assert batch['moekit_batch_size_bucket{le="1.0"}'] < batch['moekit_batch_size_bucket{le="+Inf"}']  # some > 1
    assert "moekit_time_to_first_token_seconds_count" in metrics and "moekit_requests_total" in metrics


@pytest.mark.parametrize("body, status, param", [
    ({"model": "tiny"}, 400, "prompt"),
    ({"model": "tiny", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "temperature": 5}, 400, "temperature"),
    ({"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": "tiny", "prompt": 12}, 400, "prompt"),
    ({"model": "other", "prompt": "x"}, 404, "model"),
    ({"model": "tiny", "prompt": "word " * 400}, 400, "prompt"),
    ({"model": "tiny", "prompt": "x", "n": 0}, 400, "n"),
])
def test_bad_completion_requests_get_openai_shaped_4xx(server, body, status, param):
    code, text, _ = server.raw("POST", "/v1/completions", body)
    assert code == status, text
    err = json.loads(text)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] is not None and err["param"].startswith(param)


@pytest.mark.parametrize("body", [
    {"model": "tiny", "messages": []},
    {"model": "tiny", "messages": [{"role": "user"}]},
    {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]},
    {"model": "tiny", "messages": "hello"},
    {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
])
def test_bad_chat_requests_get_400(server, body):
    code, text, _ = server.raw("POST", "/v1/chat/completions", body)
    assert code == 400 and json.loads(text)["error"]["param"].startswith("messages")


def test_malformed_json_and_huge_bodies_are_4xx_and_the_server_keeps_answering(server):
    code, text, _ = server.raw("POST", "/v1/completions", raw_body=b'{"model": "tiny", "prompt": ')
    assert code == 400 and json.loads(text)["error"]["code"] == "invalid_json"
    import http.client

    # a declared size over the limit is refused before the body is read (none is sent here: a client
    # still uploading when the server answers and closes would see a reset instead of the 413)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(2 << 20))
    conn.endheaders()
    assert conn.getresponse().status == 413
    conn.close()

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)  # chunked: no Content-Length
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    # 4 x 256 KiB is exactly the 1 MiB limit; a last small chunk crosses it. Nothing more is sent, so the
    # server has read everything when it answers (unread bytes at close would reset the connection).
    for piece in [b'{"model": "tiny", "prompt": "' + b"x" * ((256 << 10) - 29)] + [b"x" * (256 << 10)] * 3 + [b"x" * 10]:
        conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
    assert conn.getresponse().status == 413
    conn.close()
    code, _, _ = server.raw("GET", "/v1/nothing")
    assert code == 404
    assert server.client().completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens == 2


def test_a_client_leaving_mid_stream_frees_its_slot(server):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"model": "tiny", "prompt": "Once", "max_tokens": 100,
                                                        "stream": True}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.readline()  # the first event arrived: the request is running
    conn.sock.close()  # hang up
    deadline = time.time() + 20
    while time.time() < deadline:
        _, metrics, _ = server.raw("GET", "/metrics")
        running = [float(line.split()[1]) for line in metrics.splitlines() if line.startswith("moekit_running_requests")]
        if running and running[0] == 0:
            break
        time.sleep(0.2)
    assert running[0] == 0
    generated = [float(line.split()[1]) for line in metrics.splitlines()
                 if line.startswith("moekit_generated_tokens_total")][0]
    time.sleep(1.0)
    _, metrics, _ = server.raw("GET", "/metrics")
    assert [float(line.split()[1]) for line in metrics.splitlines()
            if line.startswith("moekit_generated_tokens_total")][0] == generated  # nothing more was generated


def test_api_key_and_a_full_queue(tmp_path):
    torch.manual_seed(0)  # a long context, so that one request can hold the only slot for seconds
    cfg = ModelConfig.from_preset("tiny-moe", dim=32, n_layers=1, n_heads=2, n_kv_heads=1, expert_ffn_dim=32,
                                  max_seq_len=2048)
    model = Transformer(cfg)
    from moekit.data.special import SpecialTokens

    model.special_tokens = SpecialTokens()  # no end token: a random model would otherwise stop at random
    long_ckpt = moekit.save(model, load_tokenizer(), tmp_path / "long")
    s = Server(long_ckpt, "--max-batch", "1", "--max-queue", "0", env={"MOEKIT_API_KEY": "sekrit"})
    try:
        assert s.raw("GET", "/health")[0] == 200  # no key needed
        code, text, _ = s.raw("GET", "/v1/models")
        assert code == 401 and json.loads(text)["error"]["type"] == "authentication_error"
        assert s.raw("GET", "/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
        client = s.client("sekrit")
        assert client.models.list().data[0].id == "tiny"
        with pytest.raises(openai.AuthenticationError):
            s.client("nope").models.list()
        # one slot, no queue: while one long request runs, the next gets 429 with Retry-After
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            long = pool.submit(client.completions.create, model="tiny", prompt="x", max_tokens=2000, temperature=0,
                               stop=[])
            deadline = time.time() + 20
            code = None
            while time.time() < deadline:  # until the long request holds the slot
                _, metrics, _ = s.raw("GET", "/metrics", headers={"Authorization": "Bearer sekrit"})
                if "moekit_running_requests 1.0" in metrics:
                    break
                time.sleep(0.05)
            while time.time() < deadline and not long.done():
                code, text, headers = s.raw("POST", "/v1/completions", {"model": "tiny", "prompt": "y", "max_tokens": 1},
                                            headers={"Authorization": "Bearer sekrit"})
                if code == 429:
                    break
            assert code == 429, text
            assert headers.get("retry-after") == "1" and json.loads(text)["error"]["type"] == "rate_limit_error"
            assert long.result().usage.completion_tokens == 2000
    finally:
        assert s.stop()


def test_serve_binds_loopback_by_default_and_checks_flags(ckpt, capsys):
    assert main(["serve", str(ckpt), "--max-batch", "0"]) == 2
    assert "--max-batch 0 must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "default 127.0.0.1" in " ".join(capsys.readouterr().out.split())


def test_schemathesis_finds_no_server_error(server, tmp_path):
    """Property-based requests generated from the server's own OpenAPI schema (bounded): no 5xx."""
    pytest.importorskip("schemathesis")
    st = os.path.join(os.path.dirname(sys.executable), "st")
    r = subprocess.run([st, "run", server.base + "/openapi.json", "--checks", "not_a_server_error",
                        "--max-examples", "15", "--request-timeout", "30", "--seed", "1"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)  # its .schemathesis/ cache goes there
    assert r.returncode == 0, r.stdout[-3000:]
    assert "passed" in r.stdout
