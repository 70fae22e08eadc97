"""Scoring through the engine (moekit.eval.score): batched equals one at a time, both equal the training
forward pass, lm-eval's tokenisation and rolling windows, a uniform model's exact figures, bad input."""

import math

import pytest
import torch

from moekit import ModelConfig, Transformer
from moekit.data import load_tokenizer
from moekit.eval.score import (
    Scored,
    encode_pair,
    max_length,
    rolling_windows,
    score_continuations,
    score_texts,
    scoring_engine,
    start_id,
)
from moekit.infer import Engine, EngineError, SamplingParams

TEXT = ("MACBETH.\nIf it were done when 'tis done, then 'twere well\nIt were done quickly. If the assassination\n"
        "Could trammel up the consequence, and catch,\nWith his surcease, success; that but this blow\n")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: a second thread only contends on a shared machine (conftest restores the count)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def tiny(seed: int = 0, moe: bool = True, max_seq_len: int = 48) -> Transformer:
    torch.manual_seed(seed)
    extra = dict(num_experts=4, top_k=2, expert_ffn_dim=32) if moe else dict(num_experts=0)
    cfg = ModelConfig(vocab_size=4096, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64,
                      max_seq_len=max_seq_len, init_std=0.1, tie_embeddings=False, **extra)
    return Transformer(cfg).eval()


def reference_logprob(model, ids: list[int], n: int) -> float:
    """Sum of log p over the last n of ids, from the training forward pass on the whole sequence."""
    return reference(model, ids, n)[0]


def reference(model, ids: list[int], n: int) -> tuple[float, bool]:
    """(sum of log p over the last n of ids, whether each was the argmax), from the training forward pass."""
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    positions = range(len(ids) - n, len(ids))
    return (sum(float(logp[t - 1, ids[t]]) for t in positions),
            all(int(logp[t - 1].argmax()) == ids[t] for t in positions))


PAIRS = [("MACBETH.\nIf it were done", " when 'tis done"), ("", "Fair is foul"), ("LADY MACBETH.\n", "We fail!"),
         ("Is this a dagger which I see before me, ", "the handle toward my hand?"), ("To be, or ", "not to be")]


def test_batched_scores_equal_one_at_a_time_and_the_training_forward(tok):
    model = tiny()
    batched = score_continuations(scoring_engine(model, tok, max_batch=8), PAIRS * 3)
    single = score_continuations(Engine(model, tok, max_batch=1), PAIRS)
    for b, s in zip(batched, single * 3):
        assert b.tokens == s.tokens and b.greedy == s.greedy
        assert b.logprob == pytest.approx(s.logprob, abs=1e-5)
    engine = Engine(model, tok, max_batch=1)
    for (ctx, cont), s in zip(PAIRS, single):
        c, k = encode_pair(engine, ctx, cont)
        logprob, greedy = reference(model, c + k, len(k))
        assert s.tokens == len(k) and s.greedy == greedy
        assert s.logprob == pytest.approx(logprob, abs=1e-4)
    # greedy=False: the same log-likelihoods, no argmax check
    quick = score_continuations(scoring_engine(model, tok, max_batch=8), PAIRS * 3, greedy=False)
    assert [q.logprob for q in quick] == [b.logprob for b in batched] and {q.greedy for q in quick} == {None}


def test_greedy_is_true_exactly_when_the_model_would_write_the_continuation(tok):
    model = tiny()
    engine = Engine(model, tok, max_batch=1)
    ctx = tok.encode("MACBETH.\n").ids
    written = engine.generate([ctx], SamplingParams(max_new_tokens=4, temperature=0, stop_ids=()))[0].token_ids
    right, wrong = score_continuations(engine, [(ctx, written), (ctx, written[:-1] + [(written[-1] + 1) % 4096])])
    assert right.greedy is True and wrong.greedy is False


def test_rolling_scores_equal_one_at_a_time_and_every_token_once(tok):
    model = tiny(max_seq_len=16)  # TEXT is ~60 tokens: several windows
    texts = [TEXT, TEXT[:40], "Fair is foul, and foul is fair"]
    batched = score_texts(scoring_engine(model, tok, max_batch=4), texts)
    single = score_texts(Engine(model, tok, max_batch=1), texts)
    for b, s, t in zip(batched, single, texts):
        assert (b.tokens, b.bytes) == (s.tokens, s.bytes) == (len(tok.encode(t).ids), len(t.encode()))
        assert b.logprob == pytest.approx(s.logprob, abs=1e-5)
    # The first window is the training forward pass from the end-of-text token over 15 tokens.
    ids = tok.encode(texts[2]).ids
    assert len(ids) <= 15
    assert single[2].logprob == pytest.approx(reference_logprob(model, [0] + ids, len(ids)), abs=1e-4)


def test_rolling_windows_follow_lm_eval():
    """get_rolling_token_windows(context_len=1) + make_disjoint_window, worked by hand for 7 tokens and window 3:
    the last window predicts one token from the full 3 before it."""
    ids = [10, 11, 12, 13, 14, 15, 16]
    assert rolling_windows(ids, 0, 3) == [([0, 10, 11, 12], 3), ([12, 13, 14, 15], 3), ([13, 14, 15, 16], 1)]
    assert rolling_windows([5], 0, 3) == [([0, 5], 1)]
    assert rolling_windows([], 0, 3) == []


def test_encode_pair_moves_trailing_space_and_starts_empty_context(tok):
    engine = Engine(tiny(), tok, max_batch=1)
    ctx, cont = encode_pair(engine, "To be, or ", "not")
    assert ctx == tok.encode("To be, or").ids and cont == tok.encode(" not").ids  # " not" is one BPE word
    ctx, cont = encode_pair(engine, "", "Hail")
    assert ctx == [start_id(engine)] == [0] and cont == tok.encode("Hail").ids
    # token ids pass through; an empty id context is the start token too
    assert score_continuations(engine, [([], cont)])[0] == score_continuations(engine, [("", "Hail")])[0]


def test_uniform_model_scores_log_vocab_per_token(tok):
    """Zero output layer: every token has log p = -ln V, and every token is (tied for) the argmax."""
    model = tiny()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    engine = scoring_engine(model, tok)
    (s,) = score_continuations(engine, [("MACBETH.\n", "If it were done")])
    assert s == Scored(pytest.approx(-s.tokens * math.log(4096), rel=1e-6), s.tokens, True)
    (t,) = score_texts(engine, [TEXT])
    assert t.logprob == pytest.approx(-t.tokens * math.log(4096), rel=1e-6)


def test_bad_pairs_name_the_problem(tok):
    engine = Engine(tiny(max_seq_len=8), tok, max_batch=2)
    assert max_length(engine) == 7
    with pytest.raises(EngineError, match="empty continuation"):
        score_continuations(engine, [("a", "")])
    with pytest.raises(EngineError, match="pair 1: the continuation has 9 tokens, more than the 7"):
        score_continuations(engine, [("a", " b"), ([0], list(range(9)))])
    with pytest.raises(EngineError, match="pair 0: the continuation has no tokens"):
        score_continuations(engine, [("a", "b")])  # "ab" is one token
    with pytest.raises(EngineError, match="text 0 is empty"):
        score_texts(engine, [""])


def test_long_context_keeps_its_last_tokens(tok):
    """As lm-eval: the context is cut from the left so the whole fits the context window."""
    model = tiny(max_seq_len=16)
    engine = Engine(model, tok, max_batch=1)
    ctx, cont = encode_pair(engine, TEXT, " Macbeth")
    (s,) = score_continuations(engine, [(TEXT, " Macbeth")])
    kept = (ctx + cont)[-16:]
    assert s.logprob == pytest.approx(reference_logprob(model, kept, len(cont)), abs=1e-4)


def test_scoring_stays_within_the_context_a_run_trained_at(tmp_path, tok):
    """A run trained on 16-token windows of a model that declares 48 positions is scored in windows of 16:
    positions it never saw would measure rotary extrapolation, not the model."""
    import json

    from moekit.eval.score import trained_context

    run = tmp_path / "run"
    (run / "checkpoints" / "step-2").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": {}, "train": {"seq_len": 16}}))
    assert trained_context(run) == 16 and trained_context(run / "checkpoints" / "step-2") == 16
    assert trained_context(tmp_path / "elsewhere") is None  # not a moekit run: the model's own context
    model = tiny()
    assert scoring_engine(model, tok, context=16).max_len == 16
    assert scoring_engine(model, tok, context=1000).max_len == 48 and scoring_engine(model, tok).max_len == 48
    text = "Now is the winter of our discontent made glorious summer by this sun of York. " * 3
    short = score_texts(scoring_engine(model, tok, context=16), [text])[0]
    long = score_texts(scoring_engine(model, tok), [text])[0]
    assert short.tokens == long.tokens and short.logprob != long.logprob  # every token once, shorter windows
