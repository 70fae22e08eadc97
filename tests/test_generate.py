"""Tests for moekit.infer: sampling filters, KV-cached generation vs full recompute, text streaming."""

import math

import pytest
import torch
from greedy_check import assert_same_greedy
from torch.testing import assert_close

from moekit import ModelConfig, Transformer
from moekit.data import decode, encode, find_eos_id, load_tokenizer
from moekit.data.special import SpecialTokens
from moekit.infer import (
    apply_repetition_penalty,
    apply_temperature,
    generate,
    generate_tokens,
    sample_next,
    top_k_filter,
    top_p_filter,
)
from moekit.infer.text import Detokenizer

INF = float("-inf")


def tiny(kind: str, **kw) -> ModelConfig:
    """A tiny random model config: "dense" or an MoE router name."""
    kw.setdefault("vocab_size", 256)
    if kind == "dense":
        return ModelConfig.from_preset("tiny-dense", dim=64, n_layers=2, **kw)
    return ModelConfig.from_preset("tiny-moe", router=kind, dim=64, n_layers=2, **kw)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def text_model(tok):
    torch.manual_seed(0)
    return Transformer(tiny("topk", vocab_size=tok.get_vocab_size())).eval()


# ---------------------------------------------------------------------------------------- sampling
def test_top_k_keeps_exactly_k_even_with_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.5], [5.0, 4.0, 3.0, 2.0, 1.0]])
    out = top_k_filter(logits, 2)
    assert (out > INF).sum(-1).tolist() == [2, 2]
    assert out[1].tolist() == [5.0, 4.0, INF, INF, INF]
    assert set(out[0][out[0] > INF].tolist()) == {3.0}
    assert torch.equal(top_k_filter(logits, 0), logits)  # 0 = off
    assert torch.equal(top_k_filter(logits, 99), logits)  # k >= V keeps all


def test_top_p_on_a_known_distribution():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])  # sorted: 0.5, 0.3, 0.15, 0.05
    logits = probs.log()

    def kept(p):
        return (top_p_filter(logits, p) > INF)[0].tolist()

    assert kept(0.4) == [False, True, False, False]  # the top token alone reaches 0.4
    assert kept(0.75) == [False, True, False, True]  # 0.5 + 0.3 >= 0.75
    assert kept(0.9) == [True, True, False, True]  # 0.95 needed the third token
    assert kept(0.99) == [True, True, True, True]
    assert kept(1.0) == [True, True, True, True]  # 1 = off
    assert kept(1e-9) == [False, True, False, False]  # the top token is always kept
    assert_close(top_p_filter(logits, 0.75)[0, [1, 3]], logits[0, [1, 3]])  # kept logits unchanged


def test_temperature_and_greedy():
    logits = torch.tensor([[0.0, 2.0, -1.0], [4.0, 1.0, 3.9]])
    assert_close(apply_temperature(logits, 2.0), logits / 2)
    assert sample_next(logits, temperature=0).tolist() == [1, 0]
    assert sample_next(logits, temperature=0.7, top_k=1).tolist() == [1, 0]  # top-1 sampling is argmax
    with pytest.raises(ValueError, match=r"temperature=0 must be a finite number > 0 here"):
        apply_temperature(logits, 0)


def test_repetition_penalty_ctrl_style():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]  # positive / 2, negative * 2, unseen unchanged
    assert sample_next(logits, temperature=0, repetition_penalty=3.0, prev_ids_BT=torch.tensor([[0]])).item() == 2
    with pytest.raises(ValueError, match="needs prev_ids_BT"):
        sample_next(logits, repetition_penalty=3.0)


def test_sampling_stays_inside_the_filters_and_follows_the_generator():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).expand(2000, 5)
    draws = sample_next(logits, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    assert draws.shape == (2000,) and draws.dtype == torch.long
    assert set(draws.tolist()) == {0, 1, 2}
    expected = torch.tensor([3.0, 2.0, 1.0]).softmax(0)[0].item()
    assert abs((draws == 0).float().mean().item() - expected) < 0.05
    nucleus = sample_next(logits, top_p=0.5, generator=torch.Generator().manual_seed(0))
    assert set(nucleus.tolist()) == {0}  # p(token 0) = 0.64 >= 0.5
    again = sample_next(logits, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.1), r"temperature=-0.1 must be a finite number >= 0"),
    (dict(temperature=math.nan), r"temperature=nan must be a finite number >= 0"),
    (dict(top_k=-1), r"top_k=-1 must be an integer >= 0 \(0 = off\)"),
    (dict(top_k=2.5), r"top_k=2.5 must be an integer >= 0"),
    (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
    (dict(repetition_penalty=0.0), r"repetition_penalty=0.0 must be a finite number > 0"),
])
def test_bad_sampling_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample_next(torch.zeros(1, 4), **kwargs)
    model = Transformer(tiny("dense"))
    with pytest.raises(ValueError, match=message):
        generate_tokens(model, [1, 2, 3], 4, **kwargs)  # raised at the call, not at the first next()


# ------------------------------------------------------------------------------- token generation
def greedy_without_cache(model: Transformer, ids_BT: torch.Tensor, steps: int) -> torch.Tensor:
    """The reference: recompute the whole sequence every step."""
    with torch.no_grad():
        for _ in range(steps):
            next_B = model(ids_BT).logits[:, -1].argmax(-1)
            ids_BT = torch.cat([ids_BT, next_B[:, None]], 1)
    return ids_BT


@pytest.mark.parametrize("kind", ["topk", "sigmoid_bias", "dense"])
def test_greedy_with_kv_cache_equals_full_recompute(kind):
    # Untied, larger weights: with tied tiny ones greedy just repeats one token, whatever the context.
    model = Transformer(tiny(kind, tie_embeddings=False, init_std=0.1)).eval()
    prompt = torch.randint(0, 256, (2, 7))
    expected = greedy_without_cache(model, prompt, 12)[:, 7:]
    got = torch.stack(list(generate_tokens(model, prompt, 12, temperature=0)), 1)
    assert got.shape == (2, 12)
    assert min(len(set(row)) for row in got.tolist()) > 6  # the test is not vacuous
    for b in range(2):  # cached vs recomputed: equal, up to rounding ties (each token checked past one)
        assert_same_greedy(model, prompt[b].tolist(), got[b].tolist(), expected[b].tolist())


def test_seeded_sampling_is_deterministic():
    model = Transformer(tiny("topk"))
    prompt = torch.randint(0, 256, (3, 5))

    def run(seed):
        return torch.stack(list(generate_tokens(model, prompt, 10, temperature=1.0, top_k=0, seed=seed)), 1)

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_eos_stops_rows_and_then_generation():
    model = Transformer(tiny("topk", tie_embeddings=False, init_std=0.1)).eval()
    prompt = torch.randint(0, 256, (2, 5))
    free = torch.stack(list(generate_tokens(model, prompt, 10, temperature=0)), 1).tolist()
    eos = free[0][2]  # row 0 ends at its third token; row 1 wherever that token first appears (if at all)
    steps = torch.stack(list(generate_tokens(model, prompt, 10, temperature=0, eos_id=eos)), 1).tolist()
    assert steps[0][:3] == free[0][:3]  # the same batch of two until row 0 ends: the same computation
    ends = [row.index(eos) + 1 if eos in row else len(row) for row in steps]
    assert len(steps[0]) == max(ends)  # generation ends once every row has ended
    for b, (row, ref, end) in enumerate(zip(steps, free, ends)):
        assert all(t == eos for t in row[end:])  # done rows pad with eos
        # after row 0 ends, row 1 decodes alone (batch 1 against 2): equal up to rounding ties
        assert_same_greedy(model, prompt[b].tolist(), row[:end], ref[:end])
    unstopped = torch.stack(list(generate_tokens(model, prompt, 10, temperature=0, eos_id=eos, stop_at_eos=False)), 1)
    assert unstopped.tolist() == free


def test_eos_on_a_real_model():
    model = Transformer(tiny("topk")).eval()
    prompt = torch.randint(0, 256, (1, 6))
    first = next(generate_tokens(model, prompt, 5, temperature=0)).item()
    assert len(list(generate_tokens(model, prompt, 5, temperature=0, eos_id=first))) == 1
    assert len(list(generate_tokens(model, prompt, 5, temperature=0, eos_id=first, stop_at_eos=False))) == 5


def test_repetition_penalty_is_applied_over_prompt_and_output():
    model = Transformer(tiny("topk")).eval()  # tied tiny weights: plain greedy repeats one token
    prompt = torch.randint(0, 256, (1, 5))
    plain = torch.stack(list(generate_tokens(model, prompt, 12, temperature=0)), 1)[0].tolist()
    penalised = torch.stack(list(generate_tokens(model, prompt, 12, temperature=0, repetition_penalty=1e3)), 1)
    assert len(set(plain)) < 12 and len(set(penalised[0].tolist())) == 12


def test_long_prompt_is_truncated_from_the_left_with_a_warning():
    model = Transformer(tiny("topk", max_seq_len=32)).eval()
    prompt = torch.randint(0, 256, (1, 40))
    with pytest.warns(UserWarning, match=r"the prompt \(40 tokens\) does not fit the context of 32 tokens with "
                                         r"max_new_tokens=8: keeping its last 24 tokens$"):
        got = torch.stack(list(generate_tokens(model, prompt, 8, temperature=0)), 1)
    assert_same_greedy(model, prompt[0, -24:].tolist(), got[0].tolist(),
                       greedy_without_cache(model, prompt[:, -24:], 8)[0, 24:].tolist())
    # A long answer does not squeeze the prompt below half the context: the answer stops early instead.
    with pytest.warns(UserWarning, match=r"keeping its last 16 tokens; the answer stops after 16 tokens"):
        got = torch.stack(list(generate_tokens(model, prompt, 31, temperature=0)), 1)
    assert_same_greedy(model, prompt[0, -16:].tolist(), got[0].tolist(),
                       greedy_without_cache(model, prompt[:, -16:], 16)[0, 16:].tolist())
    with pytest.raises(ValueError, match=r"max_new_tokens=32 leaves no room for the prompt in the context of 32 tokens: "
                                         r"ask for at most 31"):
        generate_tokens(model, prompt, 32)


def test_bad_prompts_and_lengths_are_named():
    model = Transformer(tiny("dense"))
    with pytest.raises(ValueError, match="the prompt is empty"):
        generate_tokens(model, [], 4)
    with pytest.raises(ValueError, match=r"prompt holds 256, not a token id in \[0, 256\)"):
        generate_tokens(model, [3, 256], 4)
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, seq\] or \[seq\]"):
        generate_tokens(model, torch.zeros(1, 2, 3, dtype=torch.long), 4)
    with pytest.raises(ValueError, match=r"max_new_tokens=-1 must be an integer >= 0"):
        generate_tokens(model, [1], -1)
    with pytest.raises(ValueError, match=r"eos_id=999 must be a token id in \[0, 256\)"):
        generate_tokens(model, [1], 4, eos_id=999)
    assert list(generate_tokens(model, [1], 0)) == []


def test_training_mode_is_restored_and_no_graph_is_built():
    model = Transformer(tiny("topk")).train()
    tokens = generate_tokens(model, [1, 2, 3], 6, seed=0)
    first = next(tokens)
    assert not model.training and not first.requires_grad
    assert torch.is_grad_enabled()  # inference mode is not held across a yield
    tokens.close()  # abandoned early
    assert model.training
    list(generate_tokens(model, [1, 2, 3], 3, seed=0))
    assert model.training


# --------------------------------------------------------------------------------------- text API
def test_same_seed_same_text_different_seed_different_text(tok, text_model):
    a = generate(text_model, tok, "ROMEO:", max_new_tokens=16, seed=1)
    assert a == generate(text_model, tok, "ROMEO:", max_new_tokens=16, seed=1)
    assert a != generate(text_model, tok, "ROMEO:", max_new_tokens=16, seed=2)
    greedy = generate(text_model, tok, "ROMEO:", max_new_tokens=8, temperature=0)
    ids = greedy_without_cache(text_model, torch.tensor([encode(tok, "ROMEO:")]), 8)[0, len(encode(tok, "ROMEO:")):]
    assert greedy == decode(tok, ids.tolist())


def test_streamed_pieces_join_to_the_returned_text(tok, text_model):
    pieces = []
    text = generate(text_model, tok, "To be", max_new_tokens=24, seed=3, stream=pieces.append)
    assert pieces and "".join(pieces) == text


def test_streaming_non_ascii_never_splits_a_character(tok):
    target = "Ünïcödé → 日本語 ☃!"
    ids = encode(tok, target)
    assert len(ids) > len(target)  # multi-byte characters span several byte-level tokens
    detok = Detokenizer(tok)
    pieces = [detok.push(t) for t in ids] + [detok.flush()]
    assert "".join(pieces) == target
    assert sum(bool(p) for p in pieces) > 5 and all("\ufffd" not in p for p in pieces)


def test_special_tokens_are_not_printed(tok):
    detok = Detokenizer(tok)
    ids = encode(tok, "fair") + [find_eos_id(tok)] + encode(tok, " Verona")
    assert "".join(detok.push(t) for t in ids) + detok.flush() == "fair Verona"


@pytest.mark.parametrize("stops, expected", [(("Ver",), "fair "), (("ir V", "fa"), ""), (("xyz",), "fair Verona"),
                                             (("r V",), "fai")])
def test_stop_strings_end_the_text_even_across_pieces(tok, stops, expected):
    detok = Detokenizer(tok, stops)
    shown = ""
    for t in encode(tok, "fair Verona"):
        shown += detok.push(t)
        assert not any(s in shown for s in stops)  # a stop string is never shown, even in part then whole
    shown += detok.flush()
    assert shown == expected and detok.stopped == (expected != "fair Verona")


def test_generate_stops_at_the_models_end_token_and_excludes_it(tok, text_model):
    prompt = "In"
    free = generate_tokens(text_model, encode(tok, prompt), 12, temperature=0)
    ids = [int(t[0]) for t in free]
    # Make the 6th greedy token the model's end token: generation must stop there and not print it.
    text_model.special_tokens = SpecialTokens(eos_ids=(ids[5],))
    try:
        pieces = []
        text = generate(text_model, tok, prompt, max_new_tokens=12, temperature=0, stream=pieces.append)
    finally:
        del text_model.special_tokens
    assert text == decode(tok, ids[:ids.index(ids[5])]) == "".join(pieces)
