"""The OpenAI request fields clients send, through the official ``openai`` client against a real
``moekit serve`` process; each checked against the engine run in this process on the same weights."""

import json

import pytest
from serve_util import Server, tiny_ckpt

import moekit
from moekit.data import load_tokenizer
from moekit.infer import Engine, SamplingParams

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_ckpt(tmp_path_factory.mktemp("openai") / "tiny")


@pytest.fixture(scope="module")
def server(ckpt):
    s = Server(ckpt, "--max-batch", "4")
    yield s
    assert s.stop()


@pytest.fixture(scope="module")
def engine(ckpt):
    model, tokenizer = moekit.load(ckpt)
    return Engine(model, tokenizer, max_batch=2)


def _ref(engine, prompt, **kw):
    params = SamplingParams(**{"temperature": 0, "top_k": 0, **kw})
    return engine.generate([prompt], params)[0]


def test_max_completion_tokens_and_explicit_nulls(server):
    client = server.client()
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                       max_completion_tokens=3, temperature=0, logit_bias={"0": -100})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    body = {"model": "tiny", "prompt": "x", "max_tokens": 2, "temperature": None, "top_p": None, "n": None,
            "stop": None, "seed": None, "logprobs": None, "echo": None, "stream": None, "user": None,
            "presence_penalty": None, "frequency_penalty": None, "logit_bias": None, "stream_options": None}
    code, text, _ = server.raw("POST", "/v1/completions", body)
    assert code == 200, text


def test_assistant_content_null_and_system_roles(server):
    code, text, _ = server.raw("POST", "/v1/chat/completions", {"model": "tiny", "max_tokens": 2, "messages": [
        {"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": None}, {"role": "user", "content": "Again"}]})
    assert code == 200, text


def test_chat_logprobs_and_top_logprobs_match_the_engine(server, engine):
    from moekit.infer.chat import chat_prompt

    client = server.client()
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=3, logit_bias={"0": -100})
    content = r.choices[0].logprobs.content
    prompt, stops = chat_prompt([{"role": "user", "content": "Hi"}], engine.special, engine.tokenizer)
    ref = _ref(engine, prompt, max_new_tokens=5, logprobs=True, top_logprobs=3, stop=stops, logit_bias=((0, -100.0),))
    assert [c.logprob for c in content] == pytest.approx(ref.logprobs, abs=1e-4)
    assert "".join(c.token for c in content) == r.choices[0].message.content == ref.text
    for c, top in zip(content, ref.top_logprobs):
        assert len(c.top_logprobs) == 3 and [t.logprob for t in c.top_logprobs] == pytest.approx([v for _, v in top],
                                                                                                  abs=1e-4)
        assert c.bytes == list(c.token.encode())
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=5, temperature=0, logprobs=True, top_logprobs=3,
                                                 logit_bias={"0": -100}, stream=True))
    streamed = [c for ch in chunks if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert [c.logprob for c in streamed] == pytest.approx([c.logprob for c in content], abs=1e-4)


def test_completion_logprobs_k_top_logprobs_streamed_and_offsets(server, engine):
    client = server.client()
    r = client.completions.create(model="tiny", prompt="To be", max_tokens=6, temperature=0, logprobs=3,
                                  logit_bias={"0": -100})
    lp = r.choices[0].logprobs
    ref = _ref(engine, "To be", max_new_tokens=6, logprobs=True, top_logprobs=3, logit_bias=((0, -100.0),))
    assert lp.token_logprobs == pytest.approx(ref.logprobs, abs=1e-4)
    assert all(len(t) == 3 and max(t.values()) >= lp.token_logprobs[i] - 1e-6 for i, t in enumerate(lp.top_logprobs))
    text = r.choices[0].text
    assert "".join(lp.tokens) == text
    for tok, off in zip(lp.tokens, lp.text_offset):
        assert text[off:off + len(tok)] == tok
    chunks = list(client.completions.create(model="tiny", prompt="To be", max_tokens=6, temperature=0, logprobs=3,
                                            logit_bias={"0": -100}, stream=True))
    streamed = [x for ch in chunks if ch.choices and ch.choices[0].logprobs for x in ch.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(lp.token_logprobs, abs=1e-4)
    offsets = [x for ch in chunks if ch.choices and ch.choices[0].logprobs for x in ch.choices[0].logprobs.text_offset]
    assert offsets == lp.text_offset


def test_special_tokens_in_logprobs_do_not_shift_the_offsets(server):
    """A special token (``<|pad|>``, id 1) is not part of the text: its piece is empty, so every
    ``text_offset`` still indexes ``text`` (the old server showed its name and shifted the rest)."""
    tokenizer = load_tokenizer()
    words = tokenizer.encode(" to be", add_special_tokens=False).ids
    r = server.client().completions.create(model="tiny", prompt=[words[0], 1, *words[1:]], max_tokens=3,
                                           temperature=0, logprobs=1, echo=True, logit_bias={"1": 100})
    lp, text = r.choices[0].logprobs, r.choices[0].text
    assert lp.tokens[1] == "" and lp.tokens[-3:] == ["", "", ""]  # the pad in the prompt and the 3 forced ones
    assert "".join(lp.tokens) == text == " to be"
    for tok, off in zip(lp.tokens, lp.text_offset):
        assert text[off:off + len(tok)] == tok


def test_echo_scores_the_prompt_like_the_engine(server, engine):
    """``echo`` with ``max_tokens=0`` and ``logprobs``: lm-evaluation-harness's loglikelihood call."""
    r = server.client().completions.create(model="tiny", prompt="To be or not", max_tokens=0, echo=True, logprobs=1)
    c = r.choices[0]
    ref = _ref(engine, "To be or not", max_new_tokens=0, prompt_logprobs=True, top_logprobs=1)
    assert c.text == "To be or not" and c.logprobs.token_logprobs[0] is None
    assert c.logprobs.token_logprobs[1:] == pytest.approx(ref.prompt_logprobs[1:], abs=1e-4)
    assert "".join(c.logprobs.tokens) == c.text and r.usage.completion_tokens == 0
    more = server.client().completions.create(model="tiny", prompt="To be", max_tokens=3, echo=True, temperature=0)
    plain = server.client().completions.create(model="tiny", prompt="To be", max_tokens=3, temperature=0)
    assert more.choices[0].text == "To be" + plain.choices[0].text
    chunks = list(server.client().completions.create(model="tiny", prompt="To be", max_tokens=3, echo=True,
                                                     temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == more.choices[0].text


def test_penalties_and_logit_bias_match_the_engine(server, engine):
    client = server.client()
    for kw, ref_kw in [({"presence_penalty": 1.5}, {"presence_penalty": 1.5}),
                       ({"frequency_penalty": 2.0}, {"frequency_penalty": 2.0}),
                       ({"logit_bias": {"42": 100}}, {"logit_bias": ((42, 100.0),)})]:
        r = client.completions.create(model="tiny", prompt="To be", max_tokens=12, temperature=0, **kw)
        ref = _ref(engine, "To be", max_new_tokens=12, **ref_kw)
        assert r.choices[0].text == ref.text, kw
    plain = client.completions.create(model="tiny", prompt="To be", max_tokens=12, temperature=0,
                                      logit_bias={"0": -100}).choices[0].text
    penalized = client.completions.create(model="tiny", prompt="To be", max_tokens=12, temperature=0,
                                          frequency_penalty=2.0, logit_bias={"0": -100}).choices[0].text
    assert plain != penalized  # a random tiny model repeats itself; the penalty changes that
    forced = client.completions.create(model="tiny", prompt="To be", max_tokens=4, temperature=0, logprobs=0,
                                       logit_bias={"42": 100})
    assert forced.choices[0].text == load_tokenizer().decode([42] * 4)


def test_token_id_prompts_equal_text_prompts(server):
    client = server.client()
    ids = load_tokenizer().encode("To be", add_special_tokens=False).ids
    by_text = client.completions.create(model="tiny", prompt="To be", max_tokens=5, temperature=0)
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0)
    batch = client.completions.create(model="tiny", prompt=[ids, ids], max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text == batch.choices[1].text
    assert batch.usage.prompt_tokens == 2 * by_ids.usage.prompt_tokens  # two prompts (not n=2)
    code, text, _ = server.raw("POST", "/v1/completions", {"model": "tiny", "prompt": [10**6], "max_tokens": 1})
    assert code == 400 and json.loads(text)["error"]["param"].startswith("prompt")


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]},
     "messages.0.content"),
    ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "a"}]}, "messages.0"),
    ({"frobnicate": 1}, "frobnicate"),
])
def test_unsupported_features_are_refused_clearly(server, extra, param):
    body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}], **extra}
    code, text, _ = server.raw("POST", "/v1/chat/completions", body)
    err = json.loads(text)["error"]
    assert code == 400 and err["param"].startswith(param), text
    assert err["code"] in ("unsupported", "unrecognized_argument")


def test_the_openai_client_sees_unsupported_as_bad_request(server):
    with pytest.raises(openai.BadRequestError, match="no structured output"):
        server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                response_format={"type": "json_object"})
