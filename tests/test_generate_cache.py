"""generate() / generate_tokens() keep one engine per model between calls: no rebuilt runner (no
re-fusing), the same results as a fresh engine, weights trained in place between calls are seen, and
a replaced, cast or quantized model, or a call needing more slots, gets a new engine."""

import copy
import pickle

import pytest
import torch

import moekit.infer.engine
from moekit import ModelConfig, Transformer
from moekit.data import load_tokenizer
from moekit.infer import Engine, SamplingParams, generate, generate_tokens
from moekit.quant import quantize_model

SAMPLED = dict(max_new_tokens=12, temperature=0.8, top_k=50, seed=3)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def model_for(tok, **kw) -> Transformer:
    cfg = ModelConfig.from_preset("tiny-moe", vocab_size=tok.get_vocab_size(), dim=64, n_layers=2, n_heads=4,
                                  n_kv_heads=2, expert_ffn_dim=64, num_experts=4, max_seq_len=64, tie_embeddings=False,
                                  init_std=0.1, **kw)
    torch.manual_seed(0)
    return Transformer(cfg).eval()


@pytest.fixture
def runners_built(monkeypatch):
    """The models Runners were built on (each build would fuse, or at least look at, every weight)."""
    built = []
    real = moekit.infer.engine.Runner

    def counting(*args, **kw):
        built.append(args[0])
        return real(*args, **kw)

    monkeypatch.setattr(moekit.infer.engine, "Runner", counting)
    return built


def fresh(model, tok, prompt="ROMEO:", **kw) -> str:
    """What a new engine on a copy of the model generates (the reference for the cached one)."""
    params = SamplingParams(**{**SAMPLED, **kw})
    return Engine(copy.deepcopy(model), tok, max_batch=1).generate([prompt], params)[0].text


def fresh_tokens(model, ids, steps=6) -> list[list[int]]:
    engine = Engine(copy.deepcopy(model), max_batch=len(ids))
    params = [SamplingParams(max_new_tokens=steps, temperature=0.8, seed=5 + b, stop_ids=()) for b in range(len(ids))]
    return [c.token_ids for c in engine.generate(ids, params)]


def test_two_calls_share_one_runner_and_equal_a_fresh_engine(tok, runners_built):
    model = model_for(tok)
    first = generate(model, tok, "ROMEO:", **SAMPLED)
    second = generate(model, tok, "JULIET:", **SAMPLED)
    assert runners_built.count(model) == 1
    assert first == fresh(model, tok) and second == fresh(model, tok, "JULIET:")
    assert first != second


def test_training_between_calls_is_seen_without_a_new_runner(tok, runners_built):
    model = model_for(tok)
    before = generate(model, tok, "ROMEO:", **SAMPLED)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-2)
    ids = torch.randint(0, model.cfg.vocab_size, (4, 32))
    for _ in range(3):  # in place: the optimizer updates the very tensors the runner reads
        out = model(ids[:, :-1], labels=ids[:, 1:])
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
    after = generate(model, tok, "ROMEO:", **SAMPLED)
    assert runners_built.count(model) == 1
    assert model.training  # generate restores the mode it found
    assert after != before and after == fresh(model.eval(), tok)


@pytest.mark.parametrize("change", ["bfloat16", "quantize", "load_state_dict(assign=True)"])
def test_replaced_or_cast_weights_get_a_new_runner(tok, runners_built, change):
    model = model_for(tok)
    generate(model, tok, "ROMEO:", **SAMPLED)
    if change == "bfloat16":
        model.to(torch.bfloat16)
    elif change == "quantize":
        quantize_model(model, 8)
    else:
        other = model_for(tok)
        other.reset_parameters(seed=1)
        model.load_state_dict(other.state_dict(), assign=True)
    got = generate(model, tok, "ROMEO:", **SAMPLED)
    assert runners_built.count(model) == 2
    assert got == fresh(model, tok)


def test_a_call_needing_more_slots_grows_the_engine_and_later_calls_reuse_it(tok, runners_built):
    model = model_for(tok)
    generate(model, tok, "ROMEO:", **SAMPLED)
    ids = torch.randint(0, model.cfg.vocab_size, (3, 5))
    rows = torch.stack(list(generate_tokens(model, ids, 6, temperature=0.8, seed=5)), dim=1)
    assert runners_built.count(model) == 2 and model._moekit_idle_engine.engine.max_batch == 3
    assert rows.tolist() == fresh_tokens(model, ids.tolist())
    assert generate(model, tok, "ROMEO:", **SAMPLED) == fresh(model, tok)  # on the 3-slot engine
    list(generate_tokens(model, ids[:2], 6, temperature=0.8, seed=5))
    assert runners_built.count(model) == 2


def test_a_generator_stopped_early_or_never_started_leaves_no_request_behind(tok, runners_built):
    model = model_for(tok)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 5))
    gen = generate_tokens(model, ids, 6, temperature=0.8, seed=5)
    next(gen)
    gen.close()  # cancelled between steps: the engine is idle again and kept
    engine = model._moekit_idle_engine.engine
    assert engine is not None and not engine.has_work() and not engine.requests
    unstarted = generate_tokens(model, ids, 6, temperature=0.8, seed=5)  # holds the engine, never runs
    rows = torch.stack(list(generate_tokens(model, ids, 6, temperature=0.8, seed=5)), dim=1)  # builds its own
    assert rows.tolist() == fresh_tokens(model, ids.tolist())
    del unstarted
    assert runners_built.count(model) == 2


def test_two_live_generators_on_one_model_do_not_mix(tok):
    model = model_for(tok)
    a, b = torch.randint(0, model.cfg.vocab_size, (2, 1, 5))
    ga = generate_tokens(model, a, 6, temperature=0.8, seed=5)
    gb = generate_tokens(model, b, 6, temperature=0.8, seed=5)
    rows = [(int(x), int(y)) for x, y in zip(ga, gb)]
    assert [x for x, _ in rows] == fresh_tokens(model, a.tolist())[0]
    assert [y for _, y in rows] == fresh_tokens(model, b.tolist())[0]


def test_a_refused_request_leaves_the_engine_usable(tok, runners_built):
    model = model_for(tok)
    with pytest.raises(ValueError, match="max_new_tokens=64 leaves no room"):
        generate(model, tok, "ROMEO:", max_new_tokens=64)
    assert generate(model, tok, "ROMEO:", **SAMPLED) == fresh(model, tok)
    assert runners_built.count(model) == 1


def test_copies_of_the_model_do_not_carry_the_engine(tok):
    model = model_for(tok)
    generate(model, tok, "ROMEO:", **SAMPLED)
    assert model._moekit_idle_engine.engine is not None
    assert copy.deepcopy(model)._moekit_idle_engine.engine is None
    assert pickle.loads(pickle.dumps(model))._moekit_idle_engine.engine is None
    assert "_moekit_idle_engine" not in "".join(model.state_dict())
