"""moekit paths / moekit extract: the coverage math by hand; paths on a plain MoE with two kinds of text
(held-out Shakespeare, Austen); extraction at full coverage against the full model; a smaller path
through load, generate, quantize and export; every refusal in one line with nothing written."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import moekit  # noqa: E402
from moekit.cli import main  # noqa: E402
from moekit.config import ConfigError, ModelConfig  # noqa: E402
from moekit.data import load_tokenizer  # noqa: E402
from moekit.data.special import SpecialTokens  # noqa: E402
from moekit.eval.data import austen_text, held_out_text, pieces  # noqa: E402
from moekit.infer import Engine, SamplingParams  # noqa: E402
from moekit.model import Transformer  # noqa: E402
from moekit.paths import coverage as cov  # noqa: E402
from moekit.paths.extract import exactness, extract  # noqa: E402
from moekit.paths.report import headline  # noqa: E402
from moekit.paths.trace import parse_data_specs, spread_evenly, trace_paths  # noqa: E402

QUESTION = "To be, or not to be, that is the question."


# --------------------------------------------------------------------------- pure math
def test_coverage_sets_by_hand():
    counts = [5, 0, 3, 2]  # 10 assignments; ranked 0 (5), 2 (3), 3 (2), 1 (0)
    assert cov.ranking(counts) == [0, 2, 3, 1]
    assert cov.ranking([1, 2, 2]) == [1, 2, 0]  # ties: the lower id first
    assert cov.coverage_set(counts, 0.5) == [0]  # 5 of 10
    assert cov.coverage_set(counts, 0.51) == [0, 2]
    assert cov.coverage_set(counts, 0.8) == [0, 2]  # 8 of 10
    assert cov.coverage_set(counts, 0.81) == [0, 2, 3]
    assert cov.coverage_set(counts, 1.0) == [0, 2, 3]  # every expert reached, never one with no assignment
    assert cov.coverage_set([0, 0, 0], 0.9) == []
    # 7 of 100 cover 0.07 as written; the float product 0.07 * 100 is 7.000000000000001.
    assert 0.07 * 100 > 7
    assert cov.coverage_set([7] + [1] * 93, 0.07) == [0]
    assert cov.held_share(counts, [2, 3]) == 0.5
    for bad in (0, -0.1, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match=r"must be a number in \(0, 1\]"):
            cov.coverage_set(counts, bad)


def test_coverage_summary_by_hand():
    counts = [[5, 0, 3, 2], [1, 1, 1, 1]]
    s = cov.coverage_summary(counts, 0.75, params_per_expert=10)
    # layer 0 needs 7.5 of 10: experts 0 and 2 (8); layer 1 needs 3 of 4: experts 0, 1, 2.
    assert s == {"experts": [[0, 2], [0, 1, 2]], "count": [2, 3], "mean_count": 2.5, "expert_params": 50,
                 "fraction": 5 / 8}


def test_kept_experts_fill_to_one_count_and_keep_the_bos_experts():
    counts = [[5, 0, 3, 2], [1, 1, 1, 1]]
    # Coverage 0.75: layer 1 needs 3, so layer 0 keeps 3 too (its next most used, expert 3).
    assert cov.kept_experts(counts, coverage=0.75) == [[0, 2, 3], [0, 1, 2]]
    assert cov.kept_experts(counts, per_layer=1) == [[0], [0]]
    # A BOS routed to experts 1 (layer 0) and 3 (layer 1) keeps them ahead of the ranking.
    assert cov.kept_experts(counts, per_layer=2, always=[[1], [3]]) == [[0, 1], [0, 3]]
    assert cov.kept_experts(counts, coverage=0.5, always=[[1], []]) == [[0, 1], [0, 1]]
    with pytest.raises(ValueError, match=r"per_layer=5 must be an integer in \[1, 4\]"):
        cov.kept_experts(counts, per_layer=5)
    with pytest.raises(ValueError, match="exactly one"):
        cov.kept_experts(counts, coverage=0.5, per_layer=2)


def test_exactness_names_the_reason():
    cfg = ModelConfig.from_preset("tiny-moe", num_experts=4)
    cut = ModelConfig.from_preset("tiny-moe", num_experts=3)
    counts, kept = [[5, 0, 3, 2]], [[0, 2, 3]]
    assert exactness(cfg, cut, counts, kept)[0] is True
    assert exactness(cfg, cut, counts, [[0, 1, 2]]) == (False, "some experts the task's tokens reach were left out")
    unnormalised = ModelConfig.from_preset("tiny-moe", num_experts=4, norm_topk_prob=False)
    ok, why = exactness(unnormalised, cut, counts, kept)
    assert not ok and "softmax over all experts" in why
    assert exactness(cfg, ModelConfig.from_preset("tiny-moe", num_experts=1, top_k=1), [[5, 0, 0, 0]], [[0]]) == (
        False, "top_k fell from 2 to 1")


def test_data_specs():
    assert parse_data_specs(["plays=a.txt", "novel=b/"]) == [("plays", "a.txt"), ("novel", "b/")]
    assert parse_data_specs(["corpus/persuasion.txt"]) == [("persuasion", "corpus/persuasion.txt")]
    assert parse_data_specs(["./a=b.txt"]) == [("a_b", "./a=b.txt")]  # no NAME= before a '/': a plain path
    for specs, message in ((["a=x", "a=y"], "task 'a' is given twice"), (["a="], "no path after '='"),
                           (["=x"], "task name '' is not valid"), ([], "give each task's text")):
        with pytest.raises(ConfigError, match=message):
            parse_data_specs(specs)
    assert spread_evenly(list(range(10)), 3) == [0, 3, 6]
    assert spread_evenly([1, 2], 3) == [1, 2]


# --------------------------------------------------------------------------- models and text
def save_model(path, *, experts=32, bos=False, **overrides):
    """A seeded tiny MoE. With ``bos``, the model puts BOS (token 2) before every prompt, and in layer 0 the
    BOS alone goes to the last expert: only its embedding has a component on axis 0, attention writes
    nothing there, and only that expert's router row reads it (so an extraction must keep it on purpose)."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny-moe", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, expert_ffn_dim=32,
                                  max_seq_len=128, init_std=0.05, num_experts=experts, **overrides)
    model = Transformer(cfg)
    if bos:
        model.special_tokens = SpecialTokens(bos_id=2, eos_ids=(0,), add_bos=True)
        with torch.no_grad():
            model.embed.weight[:, 0] = 0.0
            model.embed.weight[2, 0] = 1.0
            model.layers[0].attn.o_proj.weight[0] = 0.0
            router = model.layers[0].ffn.router.weight
            router[:, 0] = 0.0
            router[-1] = 0.0
            router[-1, 0] = 100.0
    return moekit.save(model, load_tokenizer(), path)


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    root = tmp_path_factory.mktemp("texts")
    plays = pieces("\n\n".join(held_out_text().values()))
    (root / "plays.txt").write_text("\n\n".join(spread_evenly(plays, 2)), encoding="utf-8")
    (root / "austen.jsonl").write_text("\n".join(json.dumps({"text": p}) for p in pieces(austen_text())[40:42]),
                                       encoding="utf-8")
    (root / "question.txt").write_text(QUESTION, encoding="utf-8")
    (root / "empty.txt").write_text("", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def moe8(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("moe8") / "moe8", experts=8)


@pytest.fixture(scope="module")
def traced(moe8, texts, tmp_path_factory):
    out = tmp_path_factory.mktemp("paths") / "out"
    code = main(["paths", str(moe8), "--data", f"plays={texts / 'plays.txt'}", "--data",
                 f"austen={texts / 'austen.jsonl'}", "--out", str(out), "--quiet"])
    assert code == 0
    return out


def logits_of(model, ids):
    with torch.no_grad():
        return model.eval()(torch.tensor([ids])).logits[0]


# --------------------------------------------------------------------------- moekit paths
def test_paths_on_a_plain_moe(traced, moe8):
    r = json.loads((traced / "paths.json").read_text())
    assert set(r) == {"version", "checkpoint", "task_routing", "router", "layers", "num_experts", "top_k",
                      "expert_params", "expert_params_total", "params_total", "coverages", "tasks", "specialisation"}
    assert r["task_routing"] == "none" and r["layers"] == [0, 1] and r["num_experts"] == 8 and r["top_k"] == 2
    assert r["expert_params"] == 3 * 64 * 32 and r["expert_params_total"] == 2 * 8 * 3 * 64 * 32
    assert list(r["tasks"]) == ["plays", "austen"] and r["tasks"]["austen"]["documents"] == 2
    model, tok = moekit.load(moe8)
    for t in r["tasks"].values():
        assert set(t) == {"source", "documents", "tokens", "assignments", "share", "reached", "bos_experts", "coverage"}
        # Every text token goes to top_k experts in every layer (dropless top-k, no BOS in this tokenizer).
        assert t["tokens"] > 500 and all(sum(row) == 2 * t["tokens"] for row in t["assignments"])
        assert t["share"] == [[n / sum(row) for n in row] for row in t["assignments"]]
        assert t["bos_experts"] == [[], []]
        counts = [c["count"] for c in t["coverage"].values()]
        assert list(t["coverage"]) == ["0.9", "0.95", "0.99"]
        assert counts[0] <= counts[1] <= counts[2] <= [sum(1 for n in row if n) for row in t["assignments"]]
        for c, summary in t["coverage"].items():
            assert summary == cov.coverage_summary(t["assignments"], float(c), r["expert_params"])
    # The counts are the model's own routing: the training forward's router statistics over the same
    # documents, in windows of the 128-token context.
    from moekit.eval.data import user_documents

    engine = Engine(model, tok)
    expected = [[0] * 8, [0] * 8]
    for doc in user_documents(r["tasks"]["austen"]["source"]):
        ids = engine.encode(doc)
        for start in range(0, len(ids), 128):
            with torch.no_grad():
                stats = model(torch.tensor([ids[start:start + 128]])).router_stats
            expected = [[a + b for a, b in zip(row, s.expert_load.tolist())] for row, s in zip(expected, stats)]
    assert r["tasks"]["austen"]["assignments"] == expected
    pair = r["specialisation"]
    assert pair["pairs"] == [["plays", "austen"]] and all(0 <= v <= 1 for v in pair["js_divergence"][0])


def test_paths_writes_a_report_and_one_heatmap_per_layer(traced):
    md = (traced / "paths.md").read_text()
    first = md.split("\n\n")[1]
    assert "2 MoE layers of 8 experts (top-2), plain token routing" in first
    assert "plays (" in first and "austen (" in first and "bits apart" in first
    for layer in (0, 1):
        png = traced / f"heatmap_layer{layer}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"![heatmap_layer{layer}.png]" in md


# --------------------------------------------------------------------------- moekit extract
@pytest.mark.parametrize("router, bos", [("topk", True), ("sigmoid_bias", False), ("noisy_topk", False)])
def test_full_coverage_gives_the_full_models_logits(tmp_path, texts, router, bos):
    src = save_model(tmp_path / "full", router=router, bos=bos)
    x = extract(src, tmp_path / "path", "question", coverage=1.0, data=texts / "question.txt")
    assert x.exact, x.why
    # ~11 tokens route to at most 22 of the 32 experts per layer (plus a BOS's 2): a real cut.
    assert x.num_experts == (32, max(len(k) for k in x.kept)) and x.num_experts[1] < 32
    full, tok = moekit.load(src)
    cut, _ = moekit.load(tmp_path / "path")
    assert cut.cfg.num_experts == x.num_experts[1] and cut.cfg.router == router
    ids = Engine(full, tok).encode(QUESTION)
    assert (ids[0] == 2) == bos
    if bos:  # the BOS's own expert (layer 0, expert 31: save_model) is kept though no text token reaches it
        assert 31 in x.bos_experts[0] and 31 in x.kept[0]
    else:
        assert x.bos_experts == [[], []]
    torch.testing.assert_close(logits_of(cut, ids), logits_of(full, ids), atol=1e-5, rtol=1e-5)
    if router == "topk":  # Cutting further (top_k experts per layer) changes them: the comparison can fail.
        y = extract(src, tmp_path / "small", "question", per_layer=2, data=texts / "question.txt")
        assert not y.exact and "left out" in y.why
        small, _ = moekit.load(tmp_path / "small")
        assert not torch.allclose(logits_of(small, ids), logits_of(full, ids), atol=1e-3)


def test_a_smaller_path_loads_generates_quantizes_and_exports(traced, moe8, tmp_path, capsys):
    dst = tmp_path / "plays-path"
    code = main(["extract", str(moe8), str(dst), "--task", "plays", "--paths", str(traced / "paths.json"),
                 "--coverage", "0.5"])
    out = capsys.readouterr()
    assert code == 0, out.err
    x = json.loads((dst / "extraction.json").read_text())
    r = json.loads((traced / "paths.json").read_text())["tasks"]["plays"]
    need = max(len(cov.coverage_set(row, 0.5)) for row in r["assignments"])
    assert x["num_experts"] == [8, need] and need < 8 and x["top_k"] == [2, 2]
    assert x["kept"] == cov.kept_experts(r["assignments"], coverage=0.5)
    assert all(h >= 0.5 for h in x["held"]) and x["params"][1] < x["params"][0]
    card = (dst / "README.md").read_text()
    assert "## Extracted path" in card and "plays" in card and f"{need} of 8" in card
    assert f"wrote {dst}: task 'plays', {need} of 8 experts per layer" in out.out
    # An ordinary checkpoint: load, generate, quantize, export to Hugging Face and GGUF.
    model, tok = moekit.load(dst)
    assert model.cfg.num_experts == need
    text = moekit.generate(model, tok, "ROMEO:", max_new_tokens=5, temperature=0.0)
    assert isinstance(text, str)
    assert main(["quantize", str(dst), str(tmp_path / "q8"), "--bits", "8"]) == 0
    q, _ = moekit.load(tmp_path / "q8")
    assert q.cfg.num_experts == need
    moekit.generate(q, tok, "ROMEO:", max_new_tokens=3, temperature=0.0)
    ids = Engine(model, tok).encode("ROMEO: What light")
    for fmt, name, extra in (("hf", "hf", []), ("gguf", "m.gguf", ["--gguf-type", "f32"])):
        assert main(["convert", str(dst), str(tmp_path / name), "--format", fmt, *extra]) == 0
        back, _ = moekit.load(tmp_path / name)
        assert back.cfg.num_experts == need
        torch.testing.assert_close(logits_of(back, ids), logits_of(model, ids), atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- refusals
def run(capsys, *args):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("case", ["missing", "empty", "dense", "limit", "bad name"])
def test_paths_refusals_write_nothing(case, moe8, texts, tmp_path, capsys):
    dense = save_model(tmp_path / "dense", experts=0) if case == "dense" else None
    args = {
        "missing": (moe8, "--data", f"a={tmp_path / 'nope.txt'}"),
        "empty": (moe8, "--data", f"a={texts / 'empty.txt'}"),
        "dense": (dense, "--data", f"a={texts / 'question.txt'}"),
        "limit": (moe8, "--data", f"a={texts / 'question.txt'}", "--limit", "0"),
        "bad name": (moe8, "--data", f"a b={texts / 'question.txt'}"),
    }[case]
    message = {"missing": "data path not found", "empty": "is empty (no text)",
               "dense": "nothing to trace: the model has no experts", "limit": "--limit 0 must be an integer >= 1",
               "bad name": "task name 'a b' is not valid"}[case]
    code, err = run(capsys, "paths", *args, "--out", tmp_path / "out", "--quiet")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, message", [
    (["--coverage", "0", "--data", "{q}"], "--coverage: coverage 0.0 must be a number in (0, 1]"),
    (["--coverage", "1.5", "--data", "{q}"], "coverage 1.5 must be a number in (0, 1]"),
    (["--experts-per-layer", "1", "--data", "{q}"], "--experts-per-layer 1 must be between top_k=2 and num_experts=8"),
    (["--experts-per-layer", "9", "--data", "{q}"], "--experts-per-layer 9 must be between top_k=2 and num_experts=8"),
    (["--coverage", "0.5", "--experts-per-layer", "3", "--data", "{q}"], "not both"),
    ([], "task 'plays' has no statistics: give its text with --data PATH"),
    (["--paths", "{paths}"], None),  # filled below: a task paths.json does not hold
    (["--data", "{empty}"], "is empty (no text)"),
    (["--data", "{missing}"], "data path not found"),
])
def test_extract_refusals_write_nothing(flags, message, moe8, texts, traced, tmp_path, capsys):
    task = "plays"
    if message is None:
        task, message = "code", "task 'code' has no statistics in"
    fill = {"q": texts / "question.txt", "paths": traced / "paths.json", "empty": texts / "empty.txt",
            "missing": tmp_path / "nope"}
    flags = [f.format(**fill) for f in flags]
    code, err = run(capsys, "extract", moe8, tmp_path / "dst", "--task", task, *flags)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "dst").exists() and not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())


def test_extract_refuses_a_dense_model_and_an_existing_destination(texts, moe8, tmp_path, capsys):
    dense = save_model(tmp_path / "dense", experts=0)
    code, err = run(capsys, "extract", dense, tmp_path / "dst", "--task", "a", "--data", texts / "question.txt")
    assert code == 2 and "nothing to trace: the model has no experts" in err and not (tmp_path / "dst").exists()
    (tmp_path / "taken").mkdir()
    code, err = run(capsys, "extract", moe8, tmp_path / "taken", "--task", "a", "--data", texts / "question.txt")
    assert code == 2 and "already exists; pass --overwrite" in err and not any((tmp_path / "taken").iterdir())


# --------------------------------------------------------------------------- task-aware checkpoints
def save_task_model(path, routing, experts=8, **overrides):
    """tiny MoE of 8 experts trained (here: built) with the tasks plays and austen; under task routing
    plays owns experts 0-3 and austen 4-7 (the default even blocks)."""
    return save_model(path, experts=experts, tasks=["plays", "austen"], task_routing=routing, **overrides)


def test_paths_on_a_task_routed_model_stays_in_each_tasks_experts(texts, tmp_path, capsys):
    src = save_task_model(tmp_path / "task", "task")
    r = trace_paths(src, [f"plays={texts / 'plays.txt'}", f"austen={texts / 'austen.jsonl'}"])
    assert r["task_routing"] == "task" and "task-level routing" in headline(r)
    for name, own in (("plays", range(0, 4)), ("austen", range(4, 8))):
        for row in r["tasks"][name]["assignments"]:
            assert sum(row[e] for e in own) == sum(row) > 0  # every assignment in the task's own experts
    assert all(js == 1.0 for js in r["specialisation"]["js_divergence"][0])  # disjoint experts: 1 bit
    code, err = run(capsys, "paths", src, "--data", f"code={texts / 'question.txt'}", "--out", tmp_path / "x")
    assert code == 2 and "unknown task 'code': this model (task_routing='task') knows the tasks plays, austen" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_a_task_routed_models_own_experts_give_its_logits_on_any_text(tmp_path, capsys):
    # Without renormalisation the gates are a softmax over the task's experts: exact only with all of them.
    src = save_task_model(tmp_path / "task", "task", norm_topk_prob=False)
    assert main(["extract", str(src), str(tmp_path / "austen"), "--task", "austen"]) == 0
    assert "4 of 8 experts per layer (top-2), holding its own experts" in capsys.readouterr().out
    x = json.loads((tmp_path / "austen" / "extraction.json").read_text())
    assert x["selection"] == "task_experts" and x["kept"] == [[4, 5, 6, 7]] * 2 and x["exact"]
    assert x["task_routing"] == ["task", "none"] and x["held"] is None
    full, tok = moekit.load(src)
    cut, _ = moekit.load(tmp_path / "austen")
    assert cut.cfg.task_routing == "none" and cut.cfg.tasks == ["austen"] and cut.cfg.num_experts == 4
    ids = tok.encode("It is a truth universally acknowledged, ROMEO.").ids
    with torch.no_grad():
        want = full(torch.tensor([ids]), task_ids=torch.tensor([1])).logits
        torch.testing.assert_close(cut(torch.tensor([ids])).logits, want, atol=1e-5, rtol=1e-5)
    # The engine takes the task name (or none) and the path exports like any plain MoE.
    engine = Engine(cut, tok)
    assert engine.generate(["Anne"], SamplingParams(max_new_tokens=2, temperature=0.0, task="austen"))[0].text == (
        engine.generate(["Anne"], SamplingParams(max_new_tokens=2, temperature=0.0))[0].text)
    assert main(["convert", str(tmp_path / "austen"), str(tmp_path / "hf"), "--format", "hf"]) == 0
    for flags, message in ((["--task", "code"], "unknown task 'code': this model (task_routing='task') knows"),
                           (["--task", "plays", "--coverage", "0.9"], "choose by the task's statistics")):
        code, err = run(capsys, "extract", src, tmp_path / "bad", *flags)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


def test_an_embedding_routed_path_keeps_its_task_vector(texts, tmp_path):
    src = save_task_model(tmp_path / "emb", "embedding", experts=32)
    x = extract(src, tmp_path / "path", "austen", coverage=1.0, data=texts / "question.txt")
    assert x.exact and x.num_experts[1] < 32 and x.task_routing == ("embedding", "embedding")
    full, tok = moekit.load(src)
    cut, _ = moekit.load(tmp_path / "path")
    assert cut.cfg.tasks == ["austen"] and cut.layers[0].ffn.router.task_embed.shape == (1, 64)
    ids = tok.encode(QUESTION).ids
    with torch.no_grad():
        # austen: task id 1 in the full model, 0 in the path (its only task)
        want = full(torch.tensor([ids]), task_ids=torch.tensor([1])).logits
        torch.testing.assert_close(cut(torch.tensor([ids]), task_ids=torch.tensor([0])).logits, want,
                                   atol=1e-5, rtol=1e-5)


def test_paths_with_its_progress_bar_gives_the_quiet_figures(moe8, texts, capsys):
    """The progress bar (on unless --quiet) is shown on stderr and changes nothing (a bar with no total
    has no truth value: asking for one crashed the command)."""
    specs = [f"plays={texts / 'plays.txt'}", f"austen={texts / 'austen.jsonl'}"]
    loud, quiet = trace_paths(moe8, specs, progress=True), trace_paths(moe8, specs, progress=False)
    assert loud["tasks"]["plays"]["assignments"] == quiet["tasks"]["plays"]["assignments"]
    assert "paths:" in capsys.readouterr().err
