"""Task-aware routing (issue 20): the config, the training forward (every token of a task reaches only
its task's experts; a learned task embedding changes the routing and trains), the runner and engine
(per-row tasks in one batch), the CLI and server (an unknown task is one clear line or a 400),
checkpoints, and the exports that cannot express it."""

import dataclasses
import io
import json

import pytest
import torch
from greedy_check import assert_same_greedy
from torch.testing import assert_close

import moekit
from moekit.cli import main
from moekit.config import ConfigError, ModelConfig
from moekit.data import load_tokenizer
from moekit.infer import Engine, EngineError, SamplingParams
from moekit.infer.runner import Runner
from moekit.model import Transformer

VOCAB = 256
TASKS = ["prose", "code", "verse"]
# Overlapping sets of different sizes (verse has exactly top_k = 2 experts: the edge of the noisy router's estimate).
SETS = {"prose": [0, 1, 2], "code": [2, 3, 4, 5], "verse": [6, 7]}
TOKEN_ROUTERS = ["topk", "switch", "noisy_topk", "sigmoid_bias"]


def make_cfg(router: str = "topk", routing: str = "task", **kw) -> ModelConfig:
    base = dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=64,
                tie_embeddings=False, init_std=0.1, num_experts=8, top_k=1 if router == "switch" else 2,
                expert_ffn_dim=32, router=router, tasks=list(TASKS), task_routing=routing)
    if routing == "task":
        base["task_experts"] = {k: list(v) for k, v in SETS.items()}
    base.update(kw)
    return ModelConfig(**base)


def make_model(router: str = "topk", routing: str = "task", **kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(make_cfg(router, routing, **kw)).eval()


def routed(model: Transformer, *args, **kwargs) -> list:
    """Run the training forward; return each MoE layer's Routing (the router's flat assignments)."""
    out = []
    hooks = [m.router.register_forward_hook(lambda mod, inp, r: out.append(r)) for m in model.moe_layers()]
    try:
        model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return out


# --------------------------------------------------------------------------- config
def test_task_sets_default_to_even_contiguous_blocks_and_round_trip_through_json():
    cfg = ModelConfig(num_experts=8, top_k=2, tasks=["a", "b", "c"], task_routing="task")
    assert cfg.task_experts is None  # derived, not stored: dataclasses.replace(num_experts=...) re-derives them
    assert cfg.task_expert_sets() == {"a": [0, 1], "b": [2, 3, 4], "c": [5, 6, 7]}
    assert dataclasses.replace(cfg, num_experts=12).task_expert_sets() == {"a": [0, 1, 2, 3], "b": [4, 5, 6, 7],
                                                                           "c": [8, 9, 10, 11]}
    explicit = make_cfg()
    back = ModelConfig.from_json(explicit.to_json())
    assert back == explicit and back.tasks == TASKS and back.task_expert_sets() == SETS
    assert ModelConfig().tasks == [] and ModelConfig().task_routing == "none"


@pytest.mark.parametrize("overrides, message", [
    (dict(task_routing="tasks"), r"task_routing='tasks' is not one of \['none', 'embedding', 'task'\] \(did you mean 'task'\?\)"),
    (dict(router="expert_choice", top_k=2), r"router='expert_choice' lets experts choose tokens instead: use one of "
                                            r"\['topk', 'switch', 'noisy_topk', 'sigmoid_bias'\]"),
    (dict(task_routing="embedding"), r"task_experts is a setting of task_routing='task' \(task_routing is 'embedding'\)"),
    (dict(task_experts={**SETS, "verse": [7]}), r"task_experts\['verse'\] has 1 expert\(s\), fewer than top_k=2"),
    (dict(task_experts={**SETS, "code": [2, 8]}), r"task_experts\['code'\] holds 8, not an expert index in \[0, 8\)"),
    (dict(task_experts={**SETS, "code": [3, 3]}), r"task_experts\['code'\]=\[3, 3\] names an expert twice"),
    (dict(task_experts={**SETS, "cod": [0, 1]}), r"task_experts names task 'cod' \(did you mean 'code'\?\), which is not one of"),
    (dict(task_experts={"prose": [0, 1], "code": [2, 3]}), r"task_experts has no expert set for task 'verse'"),
    (dict(capacity_factor=1.25), r"capacity_factor=1.25 with task_routing='task': .* set capacity_factor=None"),
    (dict(router="sigmoid_bias", n_group=2, topk_group=1), r"group-limited routing \(n_group=2\) .* set n_group=1"),
    (dict(task_experts=None, num_experts=5), r"num_experts=5 split among 3 tasks gives blocks of 1 experts, fewer than top_k=2"),
    (dict(tasks=["a", "a"], task_experts=None), r"task 'a' is named twice"),
    (dict(tasks=[" a"], task_experts=None), r"task name ' a' must be a non-empty string without surrounding spaces"),
])
def test_bad_task_settings_are_refused_naming_the_value_and_the_choices(overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_cfg(**overrides)


def test_a_task_routing_without_task_names_waits_for_the_data_and_cannot_build_a_model():
    cfg = ModelConfig(num_experts=8, top_k=2, task_routing="task")  # training fills tasks from the data
    with pytest.raises(ConfigError, match=r"task_routing='task' needs tasks: train on data with task labels"):
        Transformer(cfg)
    Transformer(ModelConfig(num_experts=0, tasks=["a"], task_routing="task"))  # dense: routing fields are unused


def test_the_matched_switch_init_scales_each_expert_by_its_task_set_size():
    """The gate p starts at ~1/m over a task's m experts (not 1/E): the outputs scale by m, not E."""
    task = make_model("switch")
    plain = make_model("switch", "none", tasks=[])  # the same random draws (task routing adds no parameter)
    ratio = (task.layers[0].ffn.experts.down_proj / plain.layers[0].ffn.experts.down_proj).flatten(1)
    sizes = {0: 3, 1: 3, 2: 3.5, 3: 4, 4: 4, 5: 4, 6: 2, 7: 2}  # expert 2 is in prose (3) and code (4)
    assert_close(ratio, torch.tensor([sizes[e] / 8 for e in range(8)])[:, None].expand_as(ratio))


@pytest.mark.parametrize("routing", ["embedding", "task"])
def test_param_counts_match_the_built_model(routing):
    model = make_model("noisy_topk", routing)
    assert model.cfg.param_counts()[0] == sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- training forward
@pytest.mark.parametrize("router", TOKEN_ROUTERS)
def test_every_token_of_a_task_goes_only_to_its_experts(router):
    model = make_model(router).train()  # training mode: noise (noisy_topk) and the full loss computation
    B, T = 6, 10
    ids = torch.randint(0, VOCAB, (B, T))
    tasks = torch.tensor([0, 1, 2, 2, 1, 0])
    layers = routed(model, ids, task_ids=tasks)
    assert len(layers) == 2
    allowed = [set(SETS[name]) for name in TASKS]
    for r in layers:
        assert r.token_ids_A.numel() == B * T * model.cfg.top_k  # dropless: every pair kept
        for tok, e in zip(r.token_ids_A.tolist(), r.expert_ids_A.tolist()):
            assert e in allowed[int(tasks[tok // T])], (router, tok, e)
    # The losses and their gradients stay finite (-inf logits outside each task), and the router learns.
    out = model(ids, labels=ids, task_ids=tasks)
    (out.loss + out.aux_loss).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)
    assert model.layers[0].ffn.router.weight.grad.abs().sum() > 0


def test_a_balance_bias_cannot_lift_another_tasks_expert_into_the_choice():
    """sigmoid_bias: masked experts score sigmoid(-inf) = 0, but bias is added to choose: it is masked too."""
    model = make_model("sigmoid_bias")
    for m in model.moe_layers():
        m.router.bias[6:] = 10.0  # verse's experts, far ahead of everything
    ids = torch.randint(0, VOCAB, (2, 8))
    for r in routed(model, ids, task_ids=torch.tensor([0, 1])):
        assert not set(r.expert_ids_A.tolist()) & {6, 7}
    ids_NK, _ = model.layers[0].ffn.router.select(torch.randn(5, 32), torch.zeros(5, dtype=torch.long))
    assert set(ids_NK.flatten().tolist()) <= set(SETS["prose"])


def test_one_task_batch_loads_only_its_experts_and_plain_routing_would_not():
    model = make_model("topk")
    ids = torch.randint(0, VOCAB, (4, 16))
    stats = model(ids, task_ids=torch.full((4,), 1)).router_stats
    for s in stats:
        assert set(torch.nonzero(s.tokens_per_expert).flatten().tolist()) <= set(SETS["code"])
    plain = make_model("topk", "none", tasks=[])  # the same weights without the restriction
    used = set().union(*(torch.nonzero(s.tokens_per_expert).flatten().tolist() for s in plain(ids).router_stats))
    assert not used <= set(SETS["code"])  # so the check above can fail


def test_reference_dispatch_agrees_with_the_fast_one_under_task_routing():
    model = make_model("topk")
    ids = torch.randint(0, VOCAB, (3, 12))
    tasks = torch.tensor([2, 0, 1])
    fast = model(ids, task_ids=tasks).logits
    model.set_dispatch("reference")
    assert_close(model(ids, task_ids=tasks).logits, fast)


def test_task_ids_are_checked():
    model = make_model("topk")
    ids = torch.randint(0, VOCAB, (2, 5))
    with pytest.raises(ValueError, match=r"routes each task to its own experts \(task_routing='task'\): give task_ids"):
        model(ids)
    with pytest.raises(ValueError, match=r"task_ids holds 3, not a task id in \[0, 3\)"):
        model(ids, task_ids=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"task_ids must be an integer tensor \[batch\] = \[2\]"):
        model(ids, task_ids=torch.tensor([0]))
    with pytest.raises(ValueError, match="this model has no tasks"):
        make_model("topk", "none", tasks=[])(ids, task_ids=torch.tensor([0, 0]))
    # tasks named but plain routing (e.g. trained for per-task validation only): the ids change nothing
    plain = make_model("topk", "none")
    assert torch.equal(plain(ids, task_ids=torch.tensor([0, 2])).logits, plain(ids).logits)


# --------------------------------------------------------------------------- task embedding
def test_embedding_routing_changes_with_the_task_and_no_task_is_the_zero_vector():
    model = make_model("topk", "embedding")
    router = model.layers[0].ffn.router
    assert router.task_embed.shape == (len(TASKS), 32)
    with torch.no_grad():
        router.task_embed.normal_(0, 1.0)  # trained-sized vectors, so that choices visibly move
    x = torch.randn(40, 32)
    choices = [router.select(x, torch.full((40,), t))[0] for t in range(len(TASKS))]
    assert not torch.equal(choices[0], choices[1]) and not torch.equal(choices[1], choices[2])
    # The residual stream is untouched: only the router's input moves (a dense model sees no difference).
    ids = torch.randint(0, VOCAB, (2, 8))
    no_task = model(ids).logits
    with torch.no_grad():
        saved = [m.router.task_embed.clone() for m in model.moe_layers()]
        for m in model.moe_layers():
            m.router.task_embed.zero_()
    assert_close(model(ids, task_ids=torch.tensor([0, 2])).logits, no_task)  # zero vectors == no task
    with torch.no_grad():
        for m, s in zip(model.moe_layers(), saved):
            m.router.task_embed.copy_(s)
    assert not torch.allclose(model(ids, task_ids=torch.tensor([0, 2])).logits, no_task)


def test_embedding_routing_trains():
    model = make_model("topk", "embedding").train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    # Two "tasks" with different token statistics: task 0 counts up, task 1 counts down.
    starts = torch.randint(0, VOCAB, (8,), generator=gen)
    ids = torch.stack([(s + torch.arange(17) * (1 if i < 4 else -1)) % VOCAB for i, s in enumerate(starts)])
    tasks = torch.tensor([0] * 4 + [1] * 4)
    x, y = ids[:, :-1], ids[:, 1:]
    losses = []
    for _ in range(8):
        out = model(x, labels=y, task_ids=tasks)
        opt.zero_grad()
        (out.loss + out.aux_loss).backward()
        if not losses:
            emb = model.layers[0].ffn.router.task_embed.grad
            assert emb is not None and emb[:2].abs().sum() > 0 and emb[2].abs().sum() == 0  # task 2 unused
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


# --------------------------------------------------------------------------- runner and engine
@pytest.mark.parametrize("routing", ["task", "embedding"])
def test_runner_with_a_mixed_task_batch_equals_each_request_alone_and_the_model(routing):
    model = make_model("topk", routing)
    if routing == "embedding":
        with torch.no_grad():
            for m in model.moe_layers():
                m.router.task_embed.normal_(0, 1.0)
    prompts = [torch.randint(0, VOCAB, (n,)) for n in (7, 5, 9)]
    tasks = [1, 0, 2]
    with torch.inference_mode():
        alone = []
        for p, t in zip(prompts, tasks):
            logits = Runner(model, slots=1, max_len=32)(p[None], [0], [0], all_logits=True, tasks=[t])[0]
            assert_close(logits, model(p[None], task_ids=torch.tensor([t])).logits[0], atol=1e-4, rtol=1e-4)
            alone.append(logits[-1])
        runner = Runner(model, slots=3, max_len=32)
        together = runner.forward(torch.cat(prompts), [(s, 0, len(p)) for s, p in enumerate(prompts)], tasks=tasks)
    assert_close(together, torch.stack(alone), atol=1e-4, rtol=1e-4)


def test_runner_rows_without_a_task_under_embedding_routing_see_the_zero_vector():
    model = make_model("topk", "embedding")
    p = torch.randint(0, VOCAB, (6,))
    with torch.inference_mode():
        runner = Runner(model, slots=2, max_len=16)
        mixed = runner.forward(torch.cat([p, p]), [(0, 0, 6), (1, 0, 6)], tasks=[None, 1])
        assert_close(mixed[0], model(p[None]).logits[0, -1], atol=1e-4, rtol=1e-4)
        assert_close(mixed[1], model(p[None], task_ids=torch.tensor([1])).logits[0, -1], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"every row needs a task id"):
        Runner(make_model("topk"), slots=1, max_len=16).forward(p, [(0, 0, 6)], tasks=[None])


@pytest.mark.parametrize("router", TOKEN_ROUTERS)
def test_engine_routing_record_uses_only_the_requested_tasks_experts(router):
    model = make_model(router)
    engine = Engine(model, max_batch=3, prefill_chunk=8)
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (12, 4, 9)]
    params = [SamplingParams(max_new_tokens=6, temperature=0, stop_ids=(), routing=True, task=t) for t in TASKS]
    done = engine.generate(prompts, params)  # one continuous batch: rows of three tasks in every step
    for name, c, p in zip(TASKS, done, prompts):
        assert len(c.routing) == len(p) + len(c.token_ids) - 1  # every fed token (the last is sampled, not fed)
        for per_layer in c.routing:
            for ids, _ in per_layer:
                assert set(ids) <= set(SETS[name]), (router, name, ids)


def test_engine_mixed_tasks_equal_each_task_alone_and_the_model():
    model = make_model("topk")
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (6, 11, 3)]
    greedy = [SamplingParams(max_new_tokens=8, temperature=0, stop_ids=(), task=t) for t in ("code", "verse", "code")]
    together = Engine(model, max_batch=3, prefill_chunk=8).generate(prompts, greedy)
    for p, sp, c in zip(prompts, greedy, together):
        [alone] = Engine(model, max_batch=1).generate([p], sp)
        task_ids = torch.tensor([TASKS.index(sp.task)])
        assert_same_greedy(lambda ids: model(ids, task_ids=task_ids), p, c.token_ids, alone.token_ids)  # noqa: B023
    # the task matters: the same prompt under another task's experts continues differently
    other = Engine(model, max_batch=1).generate([prompts[0]], dataclasses.replace(greedy[0], task="prose"))[0]
    assert other.token_ids != together[0].token_ids


def test_engine_refuses_unknown_and_missing_tasks_naming_the_valid_ones():
    engine = Engine(make_model("topk"), max_batch=1)
    with pytest.raises(EngineError, match=r"task 'cod' is not one of this model's tasks \['prose', 'code', 'verse'\] "
                                          r"\(did you mean 'code'\?\)"):
        engine.add_request([1, 2], SamplingParams(max_new_tokens=4, task="cod"))
    with pytest.raises(EngineError, match=r"routes each task to its own experts .* give a task, one of \['prose'"):
        engine.add_request([1, 2], SamplingParams(max_new_tokens=4))
    with pytest.raises(EngineError, match=r"task 'code': this model has no tasks"):
        Engine(make_model("topk", "none", tasks=[]), max_batch=1).add_request([1, 2],
                                                                              SamplingParams(max_new_tokens=4, task="code"))
    assert not engine.requests and not engine.waiting  # nothing was queued
    # plain routing with task names: a task is accepted and changes nothing
    plain = make_model("topk", "none")
    a = Engine(plain, max_batch=1).generate([[3, 4, 5]], SamplingParams(max_new_tokens=5, temperature=0, task="code"))
    b = Engine(plain, max_batch=1).generate([[3, 4, 5]], SamplingParams(max_new_tokens=5, temperature=0))
    assert a[0].token_ids == b[0].token_ids


# --------------------------------------------------------------------------- checkpoints, exports, CLI, server
@pytest.fixture(scope="module")
def task_ckpt(tmp_path_factory):
    """A task-routed model with the embedded tokenizer, saved as a moekit checkpoint."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny-moe", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, expert_ffn_dim=64,
                                  max_seq_len=128, tasks=["plays", "code"], task_routing="task")
    return moekit.save(Transformer(cfg), load_tokenizer(), tmp_path_factory.mktemp("tasks") / "ckpt")


@pytest.mark.parametrize("routing", ["task", "embedding"])
def test_checkpoints_keep_the_tasks_and_reload_the_same_model(tmp_path, routing):
    model = make_model("sigmoid_bias", routing)
    path = moekit.save(model, None, tmp_path / "m")
    assert json.loads((path / "config.json").read_text())["tasks"] == TASKS
    loaded, _ = moekit.load(path)
    assert loaded.cfg == model.cfg and loaded.cfg.tasks == TASKS and loaded.cfg.task_routing == routing
    ids, tasks = torch.randint(0, VOCAB, (3, 9)), torch.tensor([2, 0, 1])
    assert torch.equal(loaded.eval()(ids, task_ids=tasks).logits, model(ids, task_ids=tasks).logits)
    assert "tasks: prose, code, verse; task routing " + routing in (path / "README.md").read_text()


@pytest.mark.parametrize("fmt, message", [
    ("hf", r"task_routing='task' has no Hugging Face equivalent"),
    ("gguf", r"cannot export to GGUF .*task_routing='task' \(llama.cpp routers see only the token"),
])
def test_export_of_a_task_routed_model_is_refused_and_writes_nothing(task_ckpt, tmp_path, fmt, message):
    model, tok = moekit.load(task_ckpt)
    out = tmp_path / ("m.gguf" if fmt == "gguf" else "m")
    with pytest.raises(ConfigError, match=message):
        moekit.save(model, tok, out, format=fmt)
    assert not out.exists()


def test_cli_generate_and_chat_take_a_task_and_refuse_an_unknown_one(task_ckpt, capsys, monkeypatch):
    assert main(["generate", str(task_ckpt), "--prompt", "ROMEO:", "--max-new-tokens", "4", "--temperature", "0",
                 "--task", "code"]) == 0
    capsys.readouterr()
    for verb in ("generate", "chat"):
        monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
        assert main([verb, str(task_ckpt), "--task", "plyas", "--max-new-tokens", "4"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"moekit {verb}: error: task 'plyas' is not one of this model's tasks ['plays', 'code'] "
                       "(did you mean 'plays'?)"]
    assert main(["generate", str(task_ckpt), "--prompt", "x", "--max-new-tokens", "2"]) == 2
    assert "give a task, one of ['plays', 'code']" in capsys.readouterr().err


def test_server_takes_a_task_in_completion_and_chat_requests(task_ckpt):
    from serve_util import InProcessServer

    from moekit.serve.app import create_app

    model, tok = moekit.load(task_ckpt)
    server = InProcessServer(create_app(Engine(model, tok, max_batch=2), "tiny"))
    try:
        ok = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 3, "temperature": 0, "task": "code"}
        status, body, _ = server.raw("POST", "/v1/completions", ok)
        assert status == 200, body
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "task": "plays"}
        status, body, _ = server.raw("POST", "/v1/chat/completions", chat)
        assert status == 200, body
        for path, req in (("/v1/completions", ok), ("/v1/chat/completions", chat)):
            status, body, _ = server.raw("POST", path, {**req, "task": "poems"})
            err = json.loads(body)["error"]
            assert status == 400 and err["param"] == "task" and err["type"] == "invalid_request_error"
            assert err["message"] == "task 'poems' is not one of this model's tasks ['plays', 'code']"
            status, body, _ = server.raw("POST", path, {k: v for k, v in req.items() if k != "task"})
            assert status == 400 and "give a task, one of ['plays', 'code']" in json.loads(body)["error"]["message"]
        info = json.loads(server.raw("GET", "/v1/moekit/info")[1])  # what the page shows per task
        assert info["tasks"] == ["plays", "code"] and info["task_required"] is True
        assert info["task_routing"] == "task" and info["task_experts"] == model.cfg.task_expert_sets()
        assert sorted(info["task_experts"]["plays"] + info["task_experts"]["code"]) == list(range(model.cfg.num_experts))
        # /openapi.json says so (schemathesis and client generators read it)
        schemas = json.loads(server.raw("GET", "/openapi.json")[1])["components"]["schemas"]
        for name in ("CompletionRequest", "ChatRequest"):
            assert schemas[name]["properties"]["task"]["anyOf"] == [{"type": "string", "enum": ["plays", "code"]}]
            assert "task" in schemas[name]["required"]
    finally:
        assert server.stop()
