"""The OpenAI sampling fields of the engine (presence/frequency penalties, logit_bias, top_logprobs) and
the batch-wide sampler behind them: each pure function against hand-computed values and a plain per-row
loop over the scalar reference filters, then the engine against full-forward references."""

import math

import pytest
import torch
from torch.testing import assert_close

from moekit import ModelConfig, Transformer
from moekit.infer import Engine, EngineError, SamplingParams
from moekit.infer.sampling import (
    apply_logit_bias,
    apply_penalties,
    apply_temperature,
    draw,
    sample,
    top_k_filter,
    top_k_top_p_filter,
    top_p_filter,
)

VOCAB = 256
INF = float("-inf")


def tiny_model() -> Transformer:
    """Tiny, untied, with larger weights so that greedy continuations vary (as in test_engine.py)."""
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                                   max_seq_len=96, tie_embeddings=False, init_std=0.1, num_experts=4, top_k=2)).eval()


# ------------------------------------------------------------------------- pure functions, by hand
def test_logit_bias_adds_to_the_named_tokens_of_the_named_rows():
    logits = torch.zeros(2, 4)
    out = apply_logit_bias(logits, torch.tensor([0, 1, 1]), torch.tensor([2, 0, 3]), torch.tensor([5.0, -100.0, 1.5]))
    assert out.tolist() == [[0.0, 0.0, 5.0, 0.0], [-100.0, 0.0, 0.0, 1.5]]
    assert logits.abs().sum() == 0  # a new tensor: the raw logits stay for the reported logprobs


def test_penalties_by_hand():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5], [2.0, -2.0, 1.0, 0.5], [2.0, -2.0, 1.0, 0.5]])
    counts = torch.tensor([[0, 1, 2, 0], [0, 1, 2, 0], [3, 1, 0, 0]], dtype=torch.int32)
    prompt = torch.tensor([[True, False, False, False], [True, False, False, False], [True, True, True, True]])
    out = apply_penalties(logits, counts, presence_B=torch.tensor([0.5, 0.5, 0.0]),
                          frequency_B=torch.tensor([0.25, 0.25, 0.0]), repetition_B=torch.tensor([1.0, 2.0, 1.0]),
                          prompt_mask_BV=prompt)
    # row 0: presence and frequency on generated tokens only: -2 - 0.5 - 0.25, 1 - 0.5 - 2 * 0.25
    # row 1: and repetition 2 on the prompt's token 0 (2 / 2) and the generated ones (-2 * 2, 1 / 2) first
    # row 2: every penalty off: unchanged, whatever the counts
    assert out.tolist() == [[2.0, -2.75, 0.0, 0.5], [1.0, -4.75, -0.5, 0.5], [2.0, -2.0, 1.0, 0.5]]
    negative = apply_penalties(logits[:1], counts[:1], torch.tensor([-1.0]), torch.tensor([-0.5]), torch.tensor([1.0]))
    assert negative.tolist() == [[2.0, -0.5, 3.0, 0.5]]  # negative penalties encourage repeats


def penalties_reference(logits_V, generated, prompt, presence, frequency, repetition):
    """The plain loop: one token at a time, as the formulas read."""
    out = logits_V.clone()
    for t in set(generated) | set(prompt):
        x = out[t].item()
        out[t] = x / repetition if x > 0 else x * repetition
    for t in set(generated):
        out[t] -= presence + frequency * generated.count(t)
    return out


def test_penalties_match_the_per_row_loop():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 50, generator=gen)
    histories = [torch.randint(0, 50, (n,), generator=gen).tolist() for n in (0, 3, 9, 20, 40)]
    prompts = [torch.randint(0, 50, (4,), generator=gen).tolist() for _ in range(5)]
    settings = [(0.0, 0.0, 1.0), (0.7, 0.0, 1.0), (0.0, 1.3, 1.0), (-0.4, 0.6, 1.5), (2.0, -2.0, 0.8)]
    counts = torch.zeros(5, 50, dtype=torch.int32)
    mask = torch.zeros(5, 50, dtype=torch.bool)
    for b, (h, p) in enumerate(zip(histories, prompts)):
        for t in h:
            counts[b, t] += 1
        mask[b, p] = True
    presence, frequency, repetition = (torch.tensor(col) for col in zip(*settings))
    got = apply_penalties(logits, counts, presence, frequency, repetition, mask)
    for b, (pres, freq, rep) in enumerate(settings):
        assert_close(got[b], penalties_reference(logits[b], histories[b], prompts[b], pres, freq, rep))


def test_top_k_top_p_per_row_matches_the_scalar_filters():
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(2)) * 2  # no ties
    ks, ps = [0, 1, 5, 0, 12, 40], [1.0, 0.3, 1.0, 0.6, 0.9, 0.05]
    got = top_k_top_p_filter(logits, torch.tensor(ks), torch.tensor(ps))
    for b, (k, p) in enumerate(zip(ks, ps)):
        expected = top_p_filter(top_k_filter(logits[b:b + 1], k), p)[0]
        assert torch.equal(got[b], expected), (k, p)
    assert [(row > INF).sum().item() for row in got][:3] == [40, 1, 5]
    # top-k alone: by one topk when every row has a k, by the sort when some row has none
    for ks in ([3, 1, 5, 7, 12, 39], [3, 0, 5, 7, 12, 40]):
        got = top_k_top_p_filter(logits, torch.tensor(ks))
        for b, k in enumerate(ks):
            assert torch.equal(got[b], top_k_filter(logits[b:b + 1], k)[0]), ks
        assert [(row > INF).sum().item() for row in got] == [k or 40 for k in ks]


def test_draw_by_hand():
    probs = torch.tensor([[0.5, 0.0, 0.5]] * 4 + [[0.0, 1.0, 0.0], [1.0, 3.0, 0.0]])
    uniform = torch.tensor([0.0, 0.49, 0.5, 0.999, 0.9999999, 0.3])
    # row 5 is unnormalized: the target is 0.3 * 4 = 1.2, past token 0's cumulative 1
    assert draw(probs, uniform).tolist() == [0, 0, 2, 2, 1, 1]
    # evenly spread uniforms land in proportion to the probabilities, exactly
    quarters = torch.tensor([[0.25, 0.5, 0.25]]).expand(1000, 3)
    counts = draw(quarters, (torch.arange(1000) + 0.5) / 1000).bincount(minlength=3)
    assert counts.tolist() == [250, 500, 250]
    assert draw(torch.tensor([[0.2, 0.8, 0.0, 0.0]]), torch.tensor([1.0])).tolist() == [1]  # never a zero token


def sample_reference(logits, temps, ks, ps, uniform):
    """The plain loop: each row through the scalar filters, then the first token past its uniform in the CDF."""
    out = []
    for b, (t, k, p) in enumerate(zip(temps, ks, ps)):
        if t == 0:
            out.append(int(logits[b].argmax()))
            continue
        row = top_p_filter(top_k_filter(apply_temperature(logits[b:b + 1], t), k), p)[0].softmax(-1)
        cdf = row.double().cumsum(0)
        out.append(next(i for i in range(len(cdf)) if cdf[i] > uniform[b] * cdf[-1]))
    return out


def test_sample_matches_the_per_row_loop():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(7, 30, generator=gen) * 3
    temps, ks, ps = [0.0, 1.0, 0.5, 2.0, 1.0, 0.0, 0.8], [0, 0, 5, 3, 0, 2, 10], [1.0, 1.0, 1.0, 0.5, 0.7, 0.2, 0.9]
    uniform = torch.rand(7, generator=gen)
    got = sample(logits, torch.tensor(temps), uniform, torch.tensor(ks), torch.tensor(ps))
    assert got.tolist() == sample_reference(logits, temps, ks, ps, uniform)
    top_k_only = sample(logits, torch.tensor(temps), uniform, torch.tensor([4, 1, 5, 3, 9, 2, 10]))
    assert top_k_only.tolist() == sample_reference(logits, temps, [4, 1, 5, 3, 9, 2, 10], [1.0] * 7, uniform)
    unfiltered = sample(logits, torch.tensor(temps), uniform)  # None: no row filters
    assert unfiltered.tolist() == sample_reference(logits, temps, [0] * 7, [1.0] * 7, uniform)
    assert len(set(got.tolist())) > 3 and got.tolist() != unfiltered.tolist()  # not vacuous


# ------------------------------------------------------------------------- what a request may ask
@pytest.mark.parametrize("kwargs, message", [
    (dict(presence_penalty=2.5), r"presence_penalty=2.5 must be a number in \[-2, 2\]"),
    (dict(presence_penalty=math.nan), r"presence_penalty=nan must be a number in \[-2, 2\]"),
    (dict(frequency_penalty=-3), r"frequency_penalty=-3 must be a number in \[-2, 2\]"),
    (dict(frequency_penalty="1"), r"frequency_penalty='1' must be a number"),
    (dict(logit_bias=((VOCAB, 1.0),)), rf"logit_bias token id {VOCAB} is not a token id in \[0, {VOCAB}\)"),
    (dict(logit_bias=((-1, 1.0),)), r"logit_bias token id -1 is not a token id"),
    (dict(logit_bias=((3, 100.5),)), r"logit_bias for token 3: 100.5 must be a number in \[-100, 100\]"),
    (dict(logit_bias=((3, math.inf),)), r"logit_bias for token 3: inf must be a number in \[-100, 100\]"),
    (dict(logit_bias=((3, 1.0), (3, 2.0))), r"logit_bias names token id 3 twice"),
    (dict(logit_bias=((3,),)), r"logit_bias entry \(3,\) must be a \(token id, bias\) pair"),
    (dict(logit_bias={3: 1.0}), r"logit_bias=\{3: 1.0\} must be a tuple of \(token id, bias\) pairs"),
    (dict(top_logprobs=21, logprobs=True), r"top_logprobs=21 must be an integer in \[0, 20\]"),
    (dict(top_logprobs=-1, logprobs=True), r"top_logprobs=-1 must be an integer in \[0, 20\]"),
    (dict(top_logprobs=True, logprobs=True), r"top_logprobs=True must be an integer"),
    (dict(top_logprobs=3), r"top_logprobs=3 needs logprobs=True or prompt_logprobs=True"),
])
def test_bad_values_are_refused_by_name(kwargs, message):
    engine = Engine(tiny_model())
    with pytest.raises(EngineError, match=message):
        engine.add_request([1, 2], SamplingParams(**kwargs))
    assert not engine.has_work()


# ------------------------------------------------------------------------- the engine, against references
def assert_greedy_under(model, prompt, got, process, tol=1e-4):
    """Every token of ``got`` is the argmax (up to a rounding tie) of ``process(logits, generated so far)``
    over the full forward of the sequence so far: the reference follows ``got``, so nothing goes unchecked."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + got])).logits[0, len(prompt) - 1:-1].float()
    for i, t in enumerate(got):
        row = process(logits[i].clone(), got[:i])
        assert row[t] >= row.max() - tol, f"token {i}: {t} is {(row.max() - row[t]).item():.2e} below the argmax"


def plain(presence=0.0, frequency=0.0, repetition=1.0, bias=()):
    return SamplingParams(max_new_tokens=16, temperature=0, stop_ids=(), presence_penalty=presence,
                          frequency_penalty=frequency, repetition_penalty=repetition, logit_bias=bias)


@pytest.mark.parametrize("presence, frequency, repetition", [(1.5, 0.0, 1.0), (0.0, 0.8, 1.0), (0.4, 0.3, 1.3)])
def test_greedy_penalties_match_the_formula_on_the_full_forward(presence, frequency, repetition):
    model = tiny_model()
    prompt = [5, 6, 7, 5]
    free = Engine(model).generate([prompt], plain())[0].token_ids
    got = Engine(model, prefill_chunk=3).generate([prompt], plain(presence, frequency, repetition))[0].token_ids
    assert len(got) == 16 and got != free  # the penalties did something (the free run repeats tokens)

    def penalize(row, generated):
        return penalties_reference(row, generated, prompt, presence, frequency, repetition)
    assert_greedy_under(model, prompt, got, penalize)


def test_off_values_and_a_zero_bias_change_nothing():
    model = tiny_model()
    prompt = [9, 8, 7]
    sampled = dict(max_new_tokens=16, temperature=1.0, top_k=0, seed=11, stop_ids=())
    [free, zeros, zero_bias] = [Engine(model).generate([prompt], p)[0].token_ids for p in (
        SamplingParams(**sampled), SamplingParams(**sampled, presence_penalty=0.0, frequency_penalty=0.0),
        SamplingParams(**sampled, logit_bias=((3, 0.0),)))]
    assert zeros == free and zero_bias == free
    # the batch path with a zero bias on the greedy argmax equals the fast argmax path exactly
    assert Engine(model).generate([prompt], plain(bias=((free[0], 0.0),)))[0].token_ids == \
        Engine(model).generate([prompt], plain())[0].token_ids
    penalized = Engine(model).generate([prompt], SamplingParams(**sampled, frequency_penalty=2.0))[0].token_ids
    assert penalized != free


def test_logit_bias_forces_and_bans_under_greedy():
    model = tiny_model()
    prompt = [1, 2, 3]
    free = Engine(model).generate([prompt], plain())[0].token_ids
    forced = Engine(model).generate([prompt], plain(bias=((42, 100.0),)))[0].token_ids
    assert forced == [42] * 16
    bans = sorted(set(free))[:2]  # the free run's first token among them
    bans = bans if free[0] in bans else [free[0], bans[0]]
    banned = Engine(model).generate([prompt], plain(bias=tuple((t, -100.0) for t in bans)))[0].token_ids
    assert not set(bans) & set(banned)

    def bias(row, generated):
        row[bans] -= 100
        return row
    assert_greedy_under(model, prompt, banned, bias)


def test_top_logprobs_are_the_models_own_top_tokens():
    model = tiny_model()
    prompt = [4, 8, 15, 16, 23, 42, 7]
    params = SamplingParams(max_new_tokens=6, temperature=0, stop_ids=(), logprobs=True, prompt_logprobs=True,
                            top_logprobs=5, logit_bias=((99, 100.0),))  # forced: the chosen token is not the top one
    engine = Engine(model, prefill_chunk=3)  # the prompt is scored across three chunks
    rid = engine.add_request(prompt, params)
    events = []
    while engine.has_work():
        events += engine.step()
    done = engine.request(rid)
    full = prompt + done.output_ids
    with torch.no_grad():
        logp = model(torch.tensor([full])).logits[0].float().log_softmax(-1)
    ref_values, ref_ids = logp.topk(5, dim=-1)
    # generated positions: k entries, most likely first, the raw distribution (the bias is not in them)
    assert done.output_ids == [99] * 6 and len(done.top_logprobs) == 6
    for i, (ev, top) in enumerate(zip([e for e in events if e.token_id is not None], done.top_logprobs)):
        pos = len(prompt) - 1 + i
        assert ev.top_logprobs == top and len(top) == 5
        assert [t for t, _ in top] == ref_ids[pos].tolist()
        assert_close(torch.tensor([v for _, v in top]), ref_values[pos], atol=1e-4, rtol=1e-4)
        assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
        assert_close(ev.logprob, logp[pos, 99].item(), atol=1e-4, rtol=1e-4)
        assert ev.logprob < top[-1][1]  # token 99 is not among the model's top 5
    # prompt positions: aligned with prompt_logprobs, None for the first token, on the prefill's last event
    assert done.prompt_top_logprobs[0] is None and len(done.prompt_top_logprobs) == len(prompt)
    assert events[0].prompt_top_logprobs == done.prompt_top_logprobs
    for i in range(1, len(prompt)):
        top = done.prompt_top_logprobs[i]
        assert [t for t, _ in top] == ref_ids[i - 1].tolist()
        assert_close(torch.tensor([v for _, v in top]), ref_values[i - 1], atol=1e-4, rtol=1e-4)
        if prompt[i] in dict(top):
            assert dict(top)[prompt[i]] == done.prompt_logprobs[i]  # the same computation, the same float


def test_top_logprobs_hold_the_chosen_token_with_its_logprob():
    model = tiny_model()
    greedy = SamplingParams(max_new_tokens=8, temperature=0, stop_ids=(), logprobs=True, top_logprobs=3)
    sampled = SamplingParams(max_new_tokens=8, temperature=1.0, top_k=0, seed=2, stop_ids=(), logprobs=True,
                             top_logprobs=20)
    [g, s] = Engine(model).generate([[3, 1, 4], [3, 1, 4]], [greedy, sampled])
    assert all(len(top) == 3 for top in g.top_logprobs)
    assert [top[0] for top in g.top_logprobs] == list(zip(g.token_ids, g.logprobs))  # greedy: the chosen is first
    assert len(s.top_logprobs) == len(s.logprobs) == 8
    for t, lp, top in zip(s.token_ids, s.logprobs, s.top_logprobs):
        assert len(top) == 20 and (t not in dict(top) or dict(top)[t] == lp)
        assert t in dict(top) or lp <= top[-1][1]
    plain_logprobs = Engine(model).generate([[3, 1, 4]], SamplingParams(max_new_tokens=2, logprobs=True))[0]
    assert plain_logprobs.top_logprobs == [] and plain_logprobs.prompt_top_logprobs == []


def test_a_request_with_every_field_does_not_depend_on_the_batch():
    model = tiny_model()
    prompt = [2, 7, 1, 8, 2, 8]
    params = SamplingParams(max_new_tokens=14, temperature=0.9, top_k=30, top_p=0.9, presence_penalty=0.5,
                            frequency_penalty=0.3, repetition_penalty=1.2, logit_bias=((5, 3.0), (6, -100.0)),
                            seed=3, stop_ids=(), logprobs=True, top_logprobs=4)
    greedy_penalized = plain(presence=1.0, frequency=0.5, bias=((11, 2.0),))
    alone = Engine(model, max_batch=1).generate([prompt, prompt], [params, greedy_penalized])  # one after the other
    others = [SamplingParams(max_new_tokens=9, temperature=1.2, seed=1, stop_ids=(), frequency_penalty=-1.0),
              SamplingParams(max_new_tokens=20, temperature=0.7, top_p=0.5, seed=2, stop_ids=(), logit_bias=((5, -50.0),)),
              plain()]
    batch = Engine(model, max_batch=5, prefill_chunk=4).generate(
        [[9, 9], prompt, [4], prompt, [1, 2, 3, 4, 5]], [others[0], params, others[1], greedy_penalized, others[2]])
    assert batch[1].token_ids == alone[0].token_ids and batch[3].token_ids == alone[1].token_ids
    assert [t for t, _ in batch[1].top_logprobs[0]] == [t for t, _ in alone[0].top_logprobs[0]]
    assert 6 not in alone[0].token_ids and len(set(alone[0].token_ids)) > 5  # the settings were live


def test_a_reused_slot_starts_its_counts_afresh():
    model = tiny_model()
    params = plain(presence=2.0, frequency=2.0, repetition=1.5)
    fresh = Engine(model, max_batch=1).generate([[7, 7, 7]], params)[0].token_ids
    engine = Engine(model, max_batch=1)  # one slot: the second request inherits the first one's slot
    first, second = engine.generate([[1, 2, 3], [7, 7, 7]], params)
    assert second.token_ids == fresh and first.token_ids != fresh
