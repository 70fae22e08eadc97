"""The inference engine: continuous batching against the plain no-cache loop, the fast runner against
``Transformer.forward``, scheduling (slots, queue, chunked prefill, cancel), log-probabilities and
routing records, and the requests it must refuse."""

import pytest
import torch
from greedy_check import assert_same_greedy
from torch.testing import assert_close

from moekit import ModelConfig, Transformer
from moekit.infer import Engine, EngineError, EngineFull, SamplingParams
from moekit.infer.runner import Runner

VOCAB = 256


def model_for(kind: str = "topk", **kw) -> Transformer:
    """Tiny, untied, with larger weights so that greedy continuations vary (tied tiny ones repeat)."""
    base = dict(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=96,
                tie_embeddings=False, init_std=0.1)
    if kind == "dense":
        base["num_experts"] = 0
    else:
        base.update(num_experts=4, top_k=1 if kind == "switch" else 2, router=kind)
    if kw.get("attention") == "mla":
        base.pop("n_kv_heads")
    base.update(kw)
    torch.manual_seed(0)
    return Transformer(ModelConfig(**base)).eval()


def greedy_reference(model: Transformer, prompt: list[int], steps: int) -> list[int]:
    """The slow truth: recompute the whole sequence for every token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


GREEDY = SamplingParams(max_new_tokens=10, temperature=0, stop_ids=())


def test_assert_same_greedy_checks_every_token_past_a_tie():
    """The helper itself: a real tie may send the two sequences apart, and what follows is still checked."""
    model = model_for("topk")
    prompt = torch.randint(0, VOCAB, (9,)).tolist()
    before = greedy_reference(model, prompt, 10)
    x = before[2]
    y = next(t for t in range(VOCAB) if t not in before)
    with torch.no_grad():
        model.lm_head.weight[y] = model.lm_head.weight[x]  # y's logit is x's: a tie (to rounding) wherever x wins
    expected = greedy_reference(model, prompt, 10)
    assert expected[:2] == before[:2] and expected[2] in (x, y)
    other = y if expected[2] == x else x  # the other side of the tie
    got = expected[:2] + [other] + greedy_reference(model, prompt + expected[:2] + [other], 7)
    assert got[3:] != expected[3:]  # the paths part for good
    assert_same_greedy(model, prompt, got, expected)
    wrong = got[:6] + [(got[6] + 1) % VOCAB] + got[7:]  # a wrong token after the tie
    with pytest.raises(AssertionError, match="got token 6 .* not a rounding tie"):
        assert_same_greedy(model, prompt, wrong, expected)
    with pytest.raises(AssertionError, match="got token 1 "):  # and before it
        assert_same_greedy(model, prompt, expected[:1] + [(expected[1] + 1) % VOCAB] + expected[2:], expected)


# --------------------------------------------------------------------------- the fast forward pass
@pytest.mark.parametrize("kind, extra", [
    ("topk", {}), ("switch", {}), ("noisy_topk", {}), ("dense", {}),
    ("sigmoid_bias", {"num_shared_experts": 1, "n_group": 2, "topk_group": 1}),
    ("topk", {"qk_norm": "head", "attention_bias": True}), ("topk", {"qk_norm": "full"}),
    ("topk", {"num_shared_experts": 1, "shared_expert_gate": True, "first_dense_layers": 1}),
    ("topk", {"attention": "mla", "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16}),
])
def test_runner_matches_the_model_in_chunks_and_ragged_batches(kind, extra):
    model = model_for(kind, **extra)
    ids = torch.randint(0, VOCAB, (3, 24))
    with torch.no_grad():
        ref = model(ids).logits
    runner = Runner(model, slots=4, max_len=64)
    slots = [2, 0, 3]
    with torch.inference_mode():
        for b, s in enumerate(slots):  # prefill in two chunks (the second attends to the first)
            assert_close(runner(ids[b:b + 1, :7], [s], [0], all_logits=True), ref[b:b + 1, :7], atol=1e-4, rtol=1e-4)
            assert_close(runner(ids[b:b + 1, 7:12 + b], [s], [7], all_logits=True), ref[b:b + 1, 7:12 + b],
                         atol=1e-4, rtol=1e-4)
        for t in range(12, 20):  # ragged batched decode: row b is at position t + b
            rows = ids[torch.arange(3), torch.arange(3) + t][:, None]
            starts = [t + b for b in range(3)]
            expected = ref[torch.arange(3), torch.arange(3) + t]
            assert_close(runner(rows, slots, starts), expected, atol=1e-4, rtol=1e-4)


def test_the_few_token_and_grouped_expert_paths_agree():
    model = model_for("topk")
    ids = torch.randint(0, VOCAB, (1, 40))  # 40 tokens: the grouped (training) dispatch
    runner = Runner(model, slots=2, max_len=64)
    with torch.inference_mode():
        many = runner(ids, [0], [0], all_logits=True)
        few = torch.cat([runner(ids[:, i:i + 4], [1], [i], all_logits=True) for i in range(0, 40, 4)], dim=1)
    assert_close(many, few, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["topk", "switch", "noisy_topk", "sigmoid_bias"])
def test_router_select_is_what_forward_keeps_in_eval_mode(kind):
    router = model_for(kind).layers[0].ffn.router
    x = torch.randn(50, 64)
    routing = router(x)
    ids, weights = router.select(x)
    K = ids.shape[1]
    assert torch.equal(routing.expert_ids_A, ids.reshape(-1))
    assert torch.equal(routing.token_ids_A, torch.arange(50).repeat_interleave(K))
    assert_close(routing.weights_A, weights.reshape(-1))


def test_expert_choice_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="expert_choice routing cannot generate text: .* depends on tokens after it"):
        Engine(model_for("expert_choice"))


# --------------------------------------------------------------------------- continuous batching
@pytest.mark.parametrize("kind", ["topk", "dense", "sigmoid_bias"])
def test_greedy_engine_equals_the_no_cache_loop(kind):
    model = model_for(kind)
    prompt = torch.randint(0, VOCAB, (9,)).tolist()
    expected = greedy_reference(model, prompt, 10)
    [done] = Engine(model, max_batch=1).generate([prompt], GREEDY)
    assert_same_greedy(model, prompt, done.token_ids, expected)
    assert done.finish_reason == "length"
    assert len(set(expected)) > 4  # not a degenerate repeat


def test_ragged_prompts_in_one_batch_equal_each_prompt_alone():
    model = model_for("topk")
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (3, 17, 1, 30, 8)]
    alone = [Engine(model, max_batch=1).generate([p], GREEDY)[0].token_ids for p in prompts]
    # 3 slots for 5 prompts (two wait), prefill chunks of 8 tokens (long prompts take several steps)
    together = Engine(model, max_batch=3, prefill_chunk=8).generate(prompts, GREEDY)
    for p, c, a in zip(prompts, together, alone):
        assert_same_greedy(model, p, c.token_ids, a)
        assert_same_greedy(model, p, a, greedy_reference(model, p, 10))


def test_a_request_joining_mid_way_gets_what_it_gets_alone():
    model = model_for("topk")
    first, late = torch.randint(0, VOCAB, (12,)).tolist(), torch.randint(0, VOCAB, (20,)).tolist()
    engine = Engine(model, max_batch=4, prefill_chunk=6)
    a = engine.add_request(first, SamplingParams(max_new_tokens=30, temperature=0, stop_ids=()))
    for _ in range(8):
        engine.step()
    b = engine.add_request(late, GREEDY)
    steps_before = len(engine.request(a).output_ids)
    tokens_per_step = []
    while engine.has_work():
        before = len(engine.request(a).output_ids)
        engine.step()
        tokens_per_step.append(len(engine.request(a).output_ids) - before)
    assert_same_greedy(model, first, engine.request(a).output_ids, greedy_reference(model, first, 30))
    assert_same_greedy(model, late, engine.request(b).output_ids, greedy_reference(model, late, 10))
    # The late prompt (20 tokens) was prefilled in chunks of 6 while request a kept decoding every step.
    assert steps_before == 7 and all(n == 1 for n in tokens_per_step[:20 - steps_before])


def test_seeded_sampling_does_not_depend_on_the_batch():
    model = model_for("topk")
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=0, seed=5, stop_ids=())
    prompt = [1, 2, 3]
    alone = Engine(model, max_batch=1).generate([prompt], params)[0].token_ids
    others = [SamplingParams(max_new_tokens=12, temperature=1.0, seed=s, stop_ids=()) for s in (1, 2)]
    batch = Engine(model, max_batch=3).generate([[9, 9], prompt, [4]], [others[0], params, others[1]])
    assert batch[1].token_ids == alone
    assert Engine(model, max_batch=1).generate([prompt], SamplingParams(max_new_tokens=12, temperature=1.0, top_k=0,
                                                                        seed=6, stop_ids=()))[0].token_ids != alone


def test_stop_ids_end_a_request_and_are_not_in_its_tokens():
    model = model_for("topk")
    prompt = torch.randint(0, VOCAB, (6,)).tolist()
    free = greedy_reference(model, prompt, 10)
    stop = free[4]
    [done] = Engine(model).generate([prompt], SamplingParams(max_new_tokens=10, temperature=0, stop_ids=(stop,)))
    assert done.finish_reason == "stop" and stop not in done.token_ids
    # the engine's tokens and the stop id are the no-cache loop's (up to rounding ties, as everywhere);
    # where they agree, the engine stopped at the stop id's first place
    n = len(done.token_ids)
    assert_same_greedy(model, prompt, done.token_ids + [stop], free[:n + 1])
    assert done.token_ids != free[:n] or n == free.index(stop)


# --------------------------------------------------------------------------- scheduling
def test_more_requests_than_slots_wait_or_are_refused_as_the_caller_chooses():
    model = model_for("topk")
    waiting = Engine(model, max_batch=2)
    ids = [waiting.add_request([i + 1], GREEDY) for i in range(5)]
    waiting.step()
    assert waiting.stats.running == 2 and waiting.stats.waiting == 3
    while waiting.has_work():
        waiting.step()
    assert all(waiting.request(i).finish_reason == "length" for i in ids)
    bounded = Engine(model, max_batch=2, max_queue=1)
    for i in range(3):
        bounded.add_request([i + 1], GREEDY)
    with pytest.raises(EngineFull, match="2 requests running and 1 waiting"):
        bounded.add_request([9], GREEDY)


def test_cancel_frees_the_slot_for_the_next_request():
    model = model_for("topk")
    engine = Engine(model, max_batch=1)
    a = engine.add_request([1, 2], SamplingParams(max_new_tokens=50, temperature=0, stop_ids=()))
    b = engine.add_request([3, 4], GREEDY)
    engine.step()
    engine.step()
    assert engine.cancel(a) and not engine.cancel(a)
    events = engine.step()
    assert any(e.request_id == a and e.finished and e.finish_reason == "cancelled" for e in events)
    while engine.has_work():
        engine.step()
    assert_same_greedy(model, [3, 4], engine.request(b).output_ids, greedy_reference(model, [3, 4], 10))


# --------------------------------------------------------------------------- what evaluation and the playground read
def test_logprobs_of_prompt_and_answer_match_the_full_forward():
    model = model_for("topk")
    prompt = torch.randint(0, VOCAB, (11,)).tolist()
    params = SamplingParams(max_new_tokens=6, temperature=0, stop_ids=(), logprobs=True, prompt_logprobs=True)
    [done] = Engine(model, prefill_chunk=4).generate([prompt], params)  # prompt scored across 3 chunks
    full = prompt + done.token_ids
    with torch.no_grad():
        logp = model(torch.tensor([full])).logits[0].log_softmax(-1)
    expected = [logp[i - 1, full[i]].item() for i in range(1, len(full))]
    assert done.prompt_logprobs[0] is None and len(done.prompt_logprobs) == len(prompt)
    assert_close(torch.tensor(done.prompt_logprobs[1:] + done.logprobs), torch.tensor(expected), atol=1e-4, rtol=1e-4)


def test_prompt_only_requests_for_scoring():
    model = model_for("topk")
    params = SamplingParams(max_new_tokens=0, prompt_logprobs=True)
    engine = Engine(model)
    engine.add_request([5, 6, 7, 8], params)
    events = engine.step()
    assert events[0].finished and events[0].token_id is None and len(events[0].prompt_logprobs) == 4


def test_routing_events_carry_every_prefill_chunk():
    """A caller reading events (the server) gets the routing of every fed token, in order, not only the
    last chunk's: a prompt of 7 in chunks of 3 is three events, their routing the whole record."""
    model = model_for("topk")
    prompt = torch.randint(0, VOCAB, (7,)).tolist()
    engine = Engine(model, prefill_chunk=3)
    rid = engine.add_request(prompt, SamplingParams(max_new_tokens=0, routing=True))
    events = []
    while engine.has_work():
        events += [e for e in engine.step() if e.request_id == rid]
    assert [len(e.routing) for e in events] == [3, 3, 1] and [e.finished for e in events] == [False, False, True]
    assert [r for e in events for r in e.routing] == engine.request(rid).routing


def test_routing_record_is_what_the_router_chose():
    model = model_for("topk")
    prompt = torch.randint(0, VOCAB, (7,)).tolist()
    [done] = Engine(model, prefill_chunk=3).generate([prompt], SamplingParams(max_new_tokens=5, temperature=0,
                                                                              stop_ids=(), routing=True))
    fed = prompt + done.token_ids[:-1]  # the last token is sampled, never fed
    assert len(done.routing) == len(fed)
    captured = []
    hooks = [m.ffn.router.register_forward_hook(lambda mod, args, out: captured.append(out))
             for m in model.layers if m.is_moe]
    try:
        with torch.no_grad():
            model(torch.tensor([fed]))
    finally:
        for h in hooks:
            h.remove()
    for layer, routing in enumerate(captured):
        ids = routing.expert_ids_A.view(len(fed), -1).tolist()
        gates = routing.weights_A.view(len(fed), -1)
        assert [sorted(done.routing[t][layer][0]) for t in range(len(fed))] == [sorted(r) for r in ids]
        assert_close(torch.tensor([sorted(done.routing[t][layer][1]) for t in range(len(fed))]),
                     gates.sort(-1).values, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- bad requests
@pytest.mark.parametrize("params, prompt, message", [
    (SamplingParams(top_p=0), [1], r"top_p=0 must be in \(0, 1\]"),
    (SamplingParams(temperature=-1), [1], r"temperature=-1 must be a finite number >= 0"),
    (SamplingParams(top_k=-5), [1], r"top_k=-5 must be an integer >= 0"),
    (SamplingParams(max_new_tokens=-3), [1], r"max_new_tokens=-3 must be an integer >= 0"),
    (SamplingParams(max_new_tokens=96), [1], r"max_new_tokens=96 leaves no room .* context of 96 tokens: ask for at most 95"),
    (SamplingParams(stop=("",)), [1], r"stop string '' must be a non-empty string"),
    (SamplingParams(stop_ids=(300,)), [1], r"stop id 300 is not a token id in \[0, 256\)"),
    (SamplingParams(), [1, 256], r"prompt holds 256, not a token id in \[0, 256\)"),
    (SamplingParams(), "text", r"no tokenizer: give prompts as token ids"),
])
def test_bad_requests_are_named(params, prompt, message):
    engine = Engine(model_for("topk"))
    with pytest.raises(EngineError, match=message):
        engine.add_request(prompt, params)
    assert not engine.has_work()


def test_garbage_in_unwritten_cache_memory_never_leaks_into_a_batch():
    # A batched decode reads keys past a short row's end (masked out); the masked values must be finite.
    model = model_for("topk")
    engine = Engine(model, max_batch=2)
    for t in engine.runner.cache.k + engine.runner.cache.v:
        t.fill_(float("nan"))  # what recycled heap memory may hold
    short, long = [1, 2], torch.randint(0, VOCAB, (20,)).tolist()
    together = engine.generate([short, long], GREEDY)
    for p, c in zip((short, long), together):
        assert_same_greedy(model, p, c.token_ids, greedy_reference(model, p, 10))


def test_prompt_logprobs_last_scores_only_the_tail_and_equals_the_full_scores():
    """prompt_logprobs_last=n: the last n prompt tokens get the same log-probabilities (and top tokens) as with
    every position scored, the others None, in one chunk or across chunks; the head runs on fewer rows."""
    model = model_for("topk")
    prompt = torch.randint(0, VOCAB, (40,)).tolist()
    full = Engine(model, max_batch=2).generate([prompt], SamplingParams(max_new_tokens=0, prompt_logprobs=True,
                                                                        top_logprobs=2))[0]
    for chunk in (512, 7):  # one prefill step; several, the cut inside a chunk
        for last in (1, 5, 39, 40, 60):
            engine = Engine(model, max_batch=2, prefill_chunk=chunk)
            rows = []

            def counted(*a, real=engine.runner.forward, rows=rows, **k):
                out = real(*a, **k)
                rows.append(len(out))
                return out

            engine.runner.forward = counted
            tail = engine.generate([prompt], SamplingParams(max_new_tokens=0, prompt_logprobs=True, top_logprobs=2,
                                                            prompt_logprobs_last=last))[0]
            n = min(last, 39)
            assert len(tail.prompt_logprobs) == 40 and tail.prompt_logprobs[:40 - n] == [None] * (40 - n)
            assert_close(torch.tensor(tail.prompt_logprobs[-n:]), torch.tensor(full.prompt_logprobs[-n:]))
            assert [[t for t, _ in top] for top in tail.prompt_top_logprobs[-n:]] == \
                   [[t for t, _ in top] for top in full.prompt_top_logprobs[-n:]]
            if chunk == 512:
                assert rows == [n + 1]  # the head ran on the scored rows and the last (it samples) only
    with pytest.raises(EngineError, match="prompt_logprobs_last=3 needs prompt_logprobs=True"):
        Engine(model).add_request([1, 2], SamplingParams(prompt_logprobs_last=3))
    with pytest.raises(EngineError, match="prompt_logprobs_last=-1 must be an integer >= 0"):
        Engine(model).add_request([1, 2], SamplingParams(prompt_logprobs=True, prompt_logprobs_last=-1))
