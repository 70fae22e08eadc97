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
from serve_util import Server, endless_ckpt, metric, scripted_model, tiny_ckpt

import moekit
from moekit.cli import main
from moekit.config import ModelConfig
from moekit.data import load_tokenizer
from moekit.model import Transformer

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_ckpt(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def server(ckpt):
    s = Server(ckpt, "--max-batch", "8", "--max-queue", "64")
    yield s
    assert s.stop()  # SIGTERM: a clean, graceful exit


def _generate_cli(ckpt, prompt, n, capsys):
    torch.set_num_threads(1)  # as the server runs (--threads 1): the same computation, so equal text (conftest restores)
    assert main(["generate", str(ckpt), "--prompt", prompt, "--max-new-tokens", str(n), "--temperature", "0"]) == 0
    return capsys.readouterr().out[len(prompt):].rstrip("\n")


def assert_same_greedy(a, b, tie=1e-3):
    """Greedy answers from two batch layouts: the same tokens, except that from a position where the
    first run's two best tokens are within ``tie`` (float sums in another order may pick either) on,
    nothing can be compared; every token before it must agree, and such a tie must be real."""
    for i, (ta, tb) in enumerate(zip(a.tokens, b.tokens)):
        if ta != tb:
            top = sorted(a.top_logprobs[i].values(), reverse=True)
            assert top[0] - top[1] < tie, f"token {i}: {ta!r} alone vs {tb!r} in a batch, not a tie: {top}"
            return
        assert abs(a.token_logprobs[i] - b.token_logprobs[i]) < 1e-3
    assert len(a.tokens) == len(b.tokens)


def test_completion_and_chat_with_the_openai_client_equal_moekit_generate(server, ckpt, capsys):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=12, temperature=0)
    assert r.choices[0].text == _generate_cli(ckpt, "ROMEO:", 12, capsys)
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens > 0
    assert r.choices[0].finish_reason == "length"
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}],
                                          max_tokens=8, temperature=0, logprobs=True)
    assert chat.choices[0].message.role == "assistant"
    tokens = chat.choices[0].logprobs.content
    assert chat.usage.completion_tokens == len(tokens) and "".join(t.token for t in tokens).startswith(
        chat.choices[0].message.content)
    if chat.choices[0].finish_reason == "length":
        assert chat.usage.completion_tokens == 8
    else:  # the model's end token, or the plain template's next "User:" turn
        assert chat.choices[0].finish_reason == "stop" and chat.usage.completion_tokens <= 8
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
    no_end = {"0": -100}  # <|endoftext|> banned: the answer is 20 tokens of text, long enough to cut
    text = client.completions.create(model="tiny", prompt="To be", max_tokens=20, temperature=0,
                                     logit_bias=no_end).choices[0].text
    assert len(text) >= 6
    stop = text[3:6]
    cut = client.completions.create(model="tiny", prompt="To be", max_tokens=20, temperature=0, stop=[stop],
                                    logit_bias=no_end)
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_32_clients_at_once_are_batched_and_all_answered(server):
    client = server.client()
    prompts = [f"Line {i}:" for i in range(32)]
    ask = dict(model="tiny", max_tokens=24, temperature=0, logprobs=2, logit_bias={"0": -100})
    alone = {p: client.completions.create(prompt=p, **ask).choices[0] for p in prompts[:4]}
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda p: client.completions.create(prompt=p, **ask), prompts))
    assert all(r.usage.completion_tokens == 24 for r in results)
    for p, r in zip(prompts[:4], results[:4]):
        assert_same_greedy(alone[p].logprobs, r.choices[0].logprobs)
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
    assert main(["serve", str(ckpt), "--threads", "0"]) == 2
    assert "--threads 0 must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "default 127.0.0.1" in " ".join(capsys.readouterr().out.split())


def test_schemathesis_all_checks_pass(tmp_path):
    """Requests generated from the server's own OpenAPI document, valid and invalid, with every check:
    no 5xx, every answer as declared (status, content type, schema, headers), valid requests taken,
    invalid ones refused. A 1024-token context, so that generated prompts fit."""
    pytest.importorskip("schemathesis")
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny-moe", dim=32, n_layers=1, n_heads=2, n_kv_heads=1, expert_ffn_dim=32,
                                  max_seq_len=1024)
    s = Server(moekit.save(Transformer(cfg), load_tokenizer(), tmp_path / "ctx"))
    try:
        st = os.path.join(os.path.dirname(sys.executable), "st")
        r = subprocess.run([st, "run", s.base + "/openapi.json", "--checks", "all", "--max-examples", "15",
                            "--request-timeout", "60", "--seed", "1"],
                           capture_output=True, text=True, timeout=400, cwd=tmp_path)  # its cache goes there
        assert r.returncode == 0, r.stdout[-4000:]
        assert "No issues found" in r.stdout
    finally:
        assert s.stop()


# --------------------------------------------------------------------------- limits and fault-free edges
def test_a_request_too_large_for_the_server_is_a_400_not_a_retry(server):
    code, text, headers = server.raw("POST", "/v1/completions", {"model": "tiny", "prompt": ["a"] * 10, "n": 8,
                                                                 "max_tokens": 1})
    err = json.loads(text)["error"]
    assert code == 400 and "retry-after" not in headers and err["code"] == "too_many_choices" and "72" in err["message"]


def test_max_tokens_beyond_the_context_is_a_400_and_prompt_tokens_count_once(server):
    code, text, _ = server.raw("POST", "/v1/completions", {"model": "tiny", "prompt": "word " * 60, "max_tokens": 100})
    err = json.loads(text)["error"]
    assert code == 400 and err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
    code, text, _ = server.raw("POST", "/v1/chat/completions", {"model": "tiny", "max_completion_tokens": 127,
                                                                "messages": [{"role": "user", "content": "hi"}]})
    assert code == 400 and json.loads(text)["error"]["param"] == "max_completion_tokens"
    client = server.client()
    one = client.completions.create(model="tiny", prompt="To be", max_tokens=3)
    two = client.completions.create(model="tiny", prompt="To be", max_tokens=3, n=2, logit_bias={"0": -100})
    assert two.usage.prompt_tokens == one.usage.prompt_tokens > 0
    assert two.usage.completion_tokens == 6 and two.usage.total_tokens == two.usage.prompt_tokens + 6
    chat1 = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    chat2 = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                           n=2)
    assert chat2.usage.prompt_tokens == chat1.usage.prompt_tokens


def test_stop_strings_and_logit_bias_are_bounded(server):
    for body, param in [({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": "x" * 257}, "stop"),
                        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
                        ({"logit_bias": {"99999": 1}}, "logit_bias"), ({"logit_bias": {"5": 101}}, "logit_bias")]:
        code, text, _ = server.raw("POST", "/v1/completions", {"model": "tiny", "prompt": "x", **body})
        assert code == 400 and json.loads(text)["error"]["param"].startswith(param), text


def test_a_wrong_method_is_a_405_with_allow(server):
    code, text, headers = server.raw("GET", "/v1/completions")
    assert code == 405 and headers["allow"] == "POST" and json.loads(text)["error"]["message"]


def test_models_created_is_stable(server):
    a = server.client().models.list().data[0].created
    time.sleep(1.1)
    assert server.client().models.list().data[0].created == a


def test_plain_template_chat_stops_at_the_next_user_turn(tmp_path):
    """A model without a chat template answers in plain ``User:``/``Assistant:`` turns: the server stops
    where the model starts the user's next line, as ``moekit chat`` does (one function builds both).
    The model is scripted to answer " Hello" and then write the user's next turn itself."""
    tokenizer = load_tokenizer()
    loop = tokenizer.encode(" Hello\nUser:", add_special_tokens=False).ids  # ends with ":", as the prompt does
    model = scripted_model({t: loop[(i + 1) % len(loop)] for i, t in enumerate(loop)})
    s = Server(moekit.save(model, tokenizer, tmp_path / "plain"))
    try:
        chat = s.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                  max_tokens=30, temperature=0)
        assert chat.choices[0].message.content == " Hello" and chat.choices[0].finish_reason == "stop"
        streamed = s.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                      max_tokens=30, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == " Hello"
        text = s.client().completions.create(model="tiny", prompt="User: Hi\nAssistant:", max_tokens=12,
                                             temperature=0).choices[0].text
        assert text.startswith(" Hello\nUser:")  # a plain completion has no chat stops
    finally:
        assert s.stop()


def test_cors_preflight_passes_with_an_api_key(ckpt):
    s = Server(ckpt, "--cors-origin", "http://page.example", env={"MOEKIT_API_KEY": "k"})
    try:
        code, _, headers = s.raw("OPTIONS", "/v1/chat/completions", headers={
            "Origin": "http://page.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert code == 200 and headers["access-control-allow-origin"] == "http://page.example"
        code, _, headers = s.raw("GET", "/v1/models", headers={"Origin": "http://page.example"})
        assert code == 401 and headers["access-control-allow-origin"] == "http://page.example"  # the page can read why
        code, _, _ = s.raw("GET", "/v1/models", headers={"Origin": "http://page.example", "Authorization": "Bearer k"})
        assert code == 200
    finally:
        assert s.stop()


def test_a_non_streaming_client_that_leaves_frees_its_slot_at_once(tmp_path):
    import http.client

    s = Server(endless_ckpt(tmp_path / "long"))
    try:
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 4000}),
                     {"Content-Type": "application/json"})
        deadline = time.time() + 30
        while time.time() < deadline and metric(s, "moekit_generated_tokens_total") < 20:
            time.sleep(0.05)
        conn.sock.close()  # hang up without reading anything
        deadline = time.time() + 10
        while time.time() < deadline and metric(s, "moekit_running_requests") != 0:
            time.sleep(0.02)
        assert metric(s, "moekit_running_requests") == 0
        left_at = metric(s, "moekit_generated_tokens_total")
        assert left_at < 4000  # not generated to the end (the old server polled, then finished the answer)
        time.sleep(0.5)
        assert metric(s, "moekit_generated_tokens_total") == left_at
    finally:
        assert s.stop()


def test_sigterm_with_requests_in_flight_answers_503_and_exits_cleanly(tmp_path):
    s = Server(endless_ckpt(tmp_path / "long"))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(s.raw, "POST", "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 4000})
        deadline = time.time() + 30
        while time.time() < deadline and metric(s, "moekit_generated_tokens_total") < 10:
            time.sleep(0.05)
        clean = s.stop()
        code, text, _ = answer.result(timeout=30)
    assert clean
    assert code == 503 and json.loads(text)["error"]["message"] == "the server is shutting down"
