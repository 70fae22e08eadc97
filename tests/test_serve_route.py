"""``POST /v1/moekit/route`` and ``GET /v1/moekit/info`` over real HTTP: each token's routing equals the
engine's own record (the same weights in this process, an engine of the same shape), the key, bad input."""

import json

import pytest
import torch
from serve_util import InProcessServer, tiny_ckpt

import moekit
from moekit.config import ModelConfig
from moekit.infer import Engine, SamplingParams
from moekit.model import Transformer

pytest.importorskip("fastapi")
from moekit.serve import create_app  # noqa: E402

KEY = "sekrit"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return moekit.load(tiny_ckpt(tmp_path_factory.mktemp("route") / "tiny"))


@pytest.fixture(scope="module")
def server(loaded):
    model, tokenizer = loaded
    # prefill_chunk=8: a prompt of more than 8 tokens is fed over several steps, each with its own routing
    s = InProcessServer(create_app(Engine(model, tokenizer, max_batch=2, prefill_chunk=8), "tiny", api_key=KEY))
    yield s
    assert s.stop()


def _route(server, body, headers=AUTH):
    status, text, _ = server.raw("POST", "/v1/moekit/route", body, headers=headers)
    return status, json.loads(text)


def _reference(loaded, ids, **kw):
    model, tokenizer = loaded
    engine = Engine(model, tokenizer, max_batch=2, prefill_chunk=8)
    return engine.generate([ids], SamplingParams(max_new_tokens=0, routing=True, **kw))[0].routing


@pytest.mark.parametrize("prompt", ["Hello, experts of the world!", "To be, or not to be, that is the question: "
                                    "whether 'tis nobler in the mind to suffer"])
def test_each_token_routes_as_the_engine_records(server, loaded, prompt):
    status, body = _route(server, {"prompt": prompt})
    assert status == 200, body
    model, tokenizer = loaded
    ids = Engine(model, tokenizer).encode(prompt)
    assert len(ids) > 8 or prompt.startswith("Hello")
    assert [t["id"] for t in body["tokens"]] == ids
    ref = _reference(loaded, ids)
    assert len(ref) == len(ids)
    for t, per_layer in zip(body["tokens"], ref):
        assert t["experts"] == [list(e) for e, _ in per_layer]
        assert t["gates"] == [list(g) for _, g in per_layer]
    cfg = model.cfg
    assert body["layers"] == [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]
    assert body["num_experts"] == cfg.num_experts and body["top_k"] == cfg.top_k
    # the load is the count of every (token, expert) assignment per layer
    for li in range(len(body["layers"])):
        want = [0] * cfg.num_experts
        for per_layer in ref:
            for e in per_layer[li][0]:
                want[e] += 1
        assert body["load"][li] == want
    assert sum(body["load"][0]) == len(ids) * cfg.top_k
    # the pieces join to the text (the BOS shows by name)
    assert "".join(t["text"] for t in body["tokens"]).endswith(prompt)


def test_token_id_prompts_route_like_text(server, loaded):
    ids = [5, 17, 300, 9, 9, 1000, 42, 7, 8, 11, 12]
    status, body = _route(server, {"prompt": ids})
    assert status == 200, body
    assert [t["id"] for t in body["tokens"]] == ids
    assert [t["experts"] for t in body["tokens"]] == [[list(e) for e, _ in pl] for pl in _reference(loaded, ids)]


def test_the_key_is_needed(server):
    status, body = _route(server, {"prompt": "hi"}, headers={})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, body = _route(server, {"prompt": "hi"}, headers={"Authorization": "Bearer wrong"})
    assert status == 401
    status, text, _ = server.raw("GET", "/v1/moekit/info")
    assert status == 401


def test_info(server, loaded):
    status, text, _ = server.raw("GET", "/v1/moekit/info", headers=AUTH)
    info = json.loads(text)
    cfg = loaded[0].cfg
    assert status == 200
    assert info["num_experts"] == cfg.num_experts and info["tasks"] == [] and info["task_required"] is False
    assert info["task_routing"] == "none" and info["task_experts"] is None
    assert info["max_len"] == 128


@pytest.mark.parametrize("body, param, needle", [
    ({"prompt": "hello " * 200}, "prompt", "maximum context length is 128"),
    ({"prompt": [5, 99999999]}, "prompt", "99999999"),
    ({"prompt": [-1]}, "prompt", "prompt: "),
    ({"prompt": []}, "prompt", "prompt: "),
    ({"prompt": ""}, "prompt", "at least 1 character"),
    ({"prompt": [True]}, "prompt", "prompt: "),
    ({"prompt": "hi", "task": "code"}, "task", "has no tasks"),
    ({"prompt": "hi", "temperature": 1}, "temperature", "Unrecognized request argument"),
    ({"prompt": "hi", "model": "other"}, "model", "does not exist"),
    ({}, "prompt", "Field required"),
])
def test_bad_input_is_a_clear_4xx(server, body, param, needle):
    status, answer = _route(server, body)
    assert 400 <= status < 500, answer
    assert answer["error"]["param"] == param and needle in answer["error"]["message"], answer


def test_bad_json_is_a_400(server):
    status, text, _ = server.raw("POST", "/v1/moekit/route", raw_body=b"{not json", headers=AUTH)
    assert status == 400 and json.loads(text)["error"]["code"] == "invalid_json"


def test_a_dense_model_is_a_clear_400(loaded):
    _, tokenizer = loaded
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny-dense", dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=64)
    s = InProcessServer(create_app(Engine(Transformer(cfg), tokenizer), "dense"))
    try:
        status, text, _ = s.raw("POST", "/v1/moekit/route", {"prompt": "hi"})
        body = json.loads(text)
        assert status == 400 and body["error"]["code"] == "dense_model" and "dense" in body["error"]["message"]
    finally:
        assert s.stop()
