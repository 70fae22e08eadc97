"""Tasks in the data (issue 20): a "task" field in .jsonl records or --data NAME=PATH per task, each task
with its own held-out part, batches whose rows each come from one task by weight, per-task validation in
metrics.jsonl and in compare's report, exact resume, and one clear line for every bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from moekit.checkpoint import find_checkpoints, load
from moekit.cli import main
from moekit.config import ConfigError, ModelConfig
from moekit.data import EOS_TOKEN, TokenDataset, decode, load_tokenizer, prepare_data
from moekit.data.tasks import TaskMixture, mixture_weights, parse_data_flags, parse_task_weights, prepare_tasks
from moekit.train import TrainConfig, train
from moekit.train.compare import compare, sample_candidates

SMALL_MODEL = dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, expert_ffn_dim=32, ffn_dim=64, max_seq_len=32,
                   num_experts=4)
SMALL_FLAGS = ["--dim", "32", "--n-layers", "1", "--n-heads", "2", "--n-kv-heads", "1", "--expert-ffn-dim", "32",
               "--num-experts", "4", "--max-seq-len", "32", "--batch-size", "4", "--seq-len", "16", "--eval-batches", "2",
               "--warmup-steps", "1", "--threads", "1", "--quiet"]


def small_cfg(**kw):
    return ModelConfig.from_preset("tiny-moe", **{**SMALL_MODEL, **kw})


def small_train(**kw):
    base = dict(max_steps=6, batch_size=4, seq_len=16, eval_every=3, save_every=3, log_every=1, eval_batches=2,
                warmup_steps=1, threads=1)
    return TrainConfig(**{**base, **kw})


def metrics(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


# Three tasks of different text and size; every record is a numbered document, so a held-out record can
# be told from a training one by its text.
TEXTS = {
    "code": [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(300)],
    "prose": [f"Chapter {i}. The quick brown fox jumps over the lazy dog, and the dog sleeps on." for i in range(300)],
    "verse": [f"Verse {i}: shall I compare thee to a summer's day? Thou art more lovely." for i in range(200)],
}


@pytest.fixture(autouse=True)
def data_cache(tmp_path, monkeypatch):
    """Tokenized corpora go to a folder of the test's own, not the user's cache."""
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def labelled_corpus(path: Path, tasks=("code", "prose", "verse")) -> Path:
    """One .jsonl file whose records carry a "task", the tasks interleaved."""
    records = [{"text": text, "task": name} for i in range(300) for name in tasks if i < len(TEXTS[name])
               for text in [TEXTS[name][i]]]
    return write_jsonl(path, records)


def named_sources(root: Path, tasks=("code", "prose", "verse")) -> dict[str, str]:
    """One .jsonl file per task, without "task" fields: for --data NAME=PATH."""
    return {name: str(write_jsonl(root / f"{name}.jsonl", [{"text": t} for t in TEXTS[name]])) for name in tasks}


# --------------------------------------------------------------------------- the two ways give the same tasks
def test_jsonl_task_field_and_named_paths_give_the_same_tasks(tmp_path, tok):
    by_field = prepare_tasks(str(labelled_corpus(tmp_path / "all.jsonl")), tok, tmp_path / "c1")
    by_flag = prepare_tasks(named_sources(tmp_path / "sep"), tok, tmp_path / "c2")
    assert [t.name for t in by_field] == [t.name for t in by_flag] == ["code", "prose", "verse"]  # sorted: ids
    for a, b in zip(by_field, by_flag):
        assert np.array_equal(a.train.tokens, b.train.tokens) and np.array_equal(a.val.tokens, b.val.tokens), a.name
    # flags in another order: the same task ids
    flags = [f"{n}={p}" for n, p in reversed(named_sources(tmp_path / "sep").items())]
    assert list(parse_data_flags(flags)) == ["verse", "prose", "code"]
    again = prepare_tasks(parse_data_flags(flags), tok, tmp_path / "c2")
    assert [t.name for t in again] == ["code", "prose", "verse"]
    # the model's own order (a resumed run, --init) wins over sorting
    ordered = prepare_tasks(str(tmp_path / "all.jsonl"), tok, tmp_path / "c1", order=["verse", "code", "prose"])
    assert [t.name for t in ordered] == ["verse", "code", "prose"]


def test_a_plain_corpus_has_no_tasks_and_batches_as_before(tmp_path, tok):
    path = write_jsonl(tmp_path / "plain.jsonl", [{"text": t} for t in TEXTS["prose"]])
    assert prepare_tasks(str(path), tok, tmp_path / "cache") == []
    assert prepare_tasks(None, tok, tmp_path / "cache") == []
    train_ds, _ = prepare_data(path, tok, tmp_path / "cache")
    mix = TaskMixture([train_ds])
    for step in range(3):
        x, y, t = mix.get_batch(step, 4, 16, seed=5)
        x0, y0 = train_ds.get_batch(step, 4, 16, seed=5)
        assert torch.equal(x, x0) and torch.equal(y, y0) and torch.equal(t, torch.zeros(4, dtype=torch.long))


# --------------------------------------------------------------------------- splits and batches
def test_each_task_holds_out_its_own_tail_disjoint_from_training(tmp_path, tok):
    tasks = prepare_tasks(named_sources(tmp_path / "sep"), tok, tmp_path / "cache")
    for t in tasks:
        full = TokenDataset(t.train.path)
        assert t.val.path == t.train.path and t.train.start == 0
        assert t.val.start == t.train.num_tokens and t.train.num_tokens + t.val.num_tokens == full.num_tokens
        assert int(t.train.tokens[-1]) == 0  # the cut follows an end-of-text token: whole documents held out
        train_docs = set(decode(tok, t.train.tokens.tolist()).split(EOS_TOKEN)) - {""}
        val_docs = set(decode(tok, t.val.tokens.tolist()).split(EOS_TOKEN)) - {""}
        assert val_docs and not train_docs & val_docs, t.name
        assert val_docs <= set(TEXTS[t.name]) and train_docs <= set(TEXTS[t.name])  # nothing of another task


def test_windows_never_cross_tasks(tmp_path, tok):
    tasks = prepare_tasks(named_sources(tmp_path / "sep"), tok, tmp_path / "cache")
    mix = TaskMixture([t.train for t in tasks], mixture_weights(tasks, None), [t.name for t in tasks])
    seq_len = 24
    seen = set()
    for step in range(20):
        x, y, task_ids = mix.get_batch(step, 8, seq_len, seed=1)
        assert x.shape == y.shape == (8, seq_len) and task_ids.shape == (8,) and task_ids.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y, t in zip(x, y, task_ids.tolist()):
            window = np.append(row_x.numpy(), row_y[-1].item())
            own = np.lib.stride_tricks.sliding_window_view(np.asarray(tasks[t].train.tokens, dtype=np.int64),
                                                           seq_len + 1)
            assert (own == window).all(axis=1).any(), (step, tasks[t].name)  # a window of its own task's text
            seen.add(t)
    assert seen == {0, 1, 2}


def test_mixing_weights_are_respected_and_the_draws_are_seeded(tmp_path, tok):
    tasks = prepare_tasks(named_sources(tmp_path / "sep"), tok, tmp_path / "cache")
    sizes = np.array([t.train.num_tokens for t in tasks], dtype=float)
    assert mixture_weights(tasks, None) == pytest.approx(list(sizes / sizes.sum()))  # default: by size
    probs = mixture_weights(tasks, {"code": 6, "prose": 3, "verse": 1})
    assert probs == pytest.approx([0.6, 0.3, 0.1])
    mix = TaskMixture([t.train for t in tasks], probs, [t.name for t in tasks])
    ids = torch.cat([mix.get_batch(step, 16, 8, seed=0)[2] for step in range(250)])  # 4,000 rows
    share = torch.bincount(ids, minlength=3).double() / len(ids)
    # the standard error of a share is at most sqrt(0.25 / 4000) = 0.008: 0.035 is over 4 of them
    torch.testing.assert_close(share, torch.tensor([0.6, 0.3, 0.1], dtype=torch.double), atol=0.035, rtol=0)
    a, b = mix.get_batch(7, 16, 8, seed=3), mix.get_batch(7, 16, 8, seed=3)
    assert all(torch.equal(u, v) for u, v in zip(a, b))  # a pure function of (seed, step)
    assert not torch.equal(a[2], mix.get_batch(8, 16, 8, seed=3)[2])


# --------------------------------------------------------------------------- training and compare
def test_training_logs_each_tasks_validation(tmp_path, capsys):
    sources = named_sources(tmp_path / "sep", ("code", "prose"))
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--max-steps", "4", "--eval-every", "2", "--data", f"prose={sources['prose']}",
                 "--data", f"code={sources['code']}", "--task-weights", "code=1,prose=3", *SMALL_FLAGS]) == 0
    assert "per task: code " in capsys.readouterr().out
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["data"] == sources and saved["train"]["task_weights"] == {"code": 1.0, "prose": 3.0}
    assert saved["model"]["tasks"] == ["code", "prose"]  # the model is told the data's tasks, sorted
    evals = [r for r in metrics(run) if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert set(r["val_loss_task"]) == set(r["val_bpb_task"]) == {"code", "prose"}
        # both tasks score eval_batches full batches: the token-weighted mean is the plain mean here
        assert r["val_loss"] == pytest.approx(sum(r["val_loss_task"].values()) / 2, rel=1e-12)
        assert min(r["val_bpb_task"].values()) <= r["val_bpb"] <= max(r["val_bpb_task"].values())
        assert r["val_loss_se"] > 0 and all(math.isfinite(v) for v in r["val_loss_task"].values())
    # code and prose are different texts: their losses differ
    assert evals[-1]["val_loss_task"]["code"] != evals[-1]["val_loss_task"]["prose"]


def test_the_overall_figure_weights_each_task_by_its_scored_tokens(tmp_path):
    """A task whose held-out part holds fewer windows than eval_batches asks counts for fewer tokens."""
    sources = named_sources(tmp_path / "sep", ("code", "verse"))
    tcfg = small_train(max_steps=2, eval_every=0, eval_batches=50, data=sources)
    result = train(tmp_path / "run", small_cfg(), tcfg, progress=False)
    tok = load_tokenizer(tmp_path / "run" / "tokenizer.json")
    tasks = prepare_tasks(sources, tok, tmp_path / "cache")
    n = {t.name: min(t.val.num_eval_windows(16), 50 * 4) * 16 for t in tasks}
    assert n["code"] != n["verse"]
    weighted = sum(result.val_loss_task[k] * n[k] for k in n) / sum(n.values())
    assert result.val_loss == pytest.approx(weighted, rel=1e-12)


def test_resume_with_tasks_reproduces_the_uninterrupted_run(tmp_path, monkeypatch):
    data = str(labelled_corpus(tmp_path / "all.jsonl"))
    tcfg = small_train(data=data, task_weights={"code": 1, "prose": 1, "verse": 2})
    cfg = small_cfg(task_routing="embedding")  # the batches' task ids reach the routers
    train(tmp_path / "ref", cfg, tcfg, progress=False)

    real = TaskMixture.get_batch

    def interrupted(self, step, *args, **kwargs):
        if step >= 4:  # after checkpoint step-3
            raise KeyboardInterrupt
        return real(self, step, *args, **kwargs)

    monkeypatch.setattr(TaskMixture, "get_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "run", cfg, tcfg, progress=False)
    assert [s for s, _ in find_checkpoints(tmp_path / "run")] == [3]
    monkeypatch.setattr(TaskMixture, "get_batch", real)
    train(tmp_path / "run", resume=True, progress=False)
    a, b = metrics(tmp_path / "ref"), metrics(tmp_path / "run")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("train_loss", "aux_loss", "val_loss", "tokens", "lr"):
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-7), (ra["step"], key)
        if "val_loss_task" in ra:
            assert ra["val_loss_task"] == pytest.approx(rb["val_loss_task"], rel=1e-6, abs=1e-7)
    wa, _ = load(tmp_path / "ref")
    wb, _ = load(tmp_path / "run")
    assert wa.cfg.tasks == wb.cfg.tasks == ["code", "prose", "verse"]
    for (n, x), (_, y) in zip(wa.state_dict().items(), wb.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=n)


def test_compare_reports_each_tasks_final_loss(tmp_path):
    sources = named_sources(tmp_path / "sep", ("code", "prose"))
    tcfg = TrainConfig(max_steps=2, batch_size=2, seq_len=16, eval_every=2, save_every=2, log_every=1, eval_batches=1,
                       warmup_steps=1, threads=1, data=sources)
    cfg = small_cfg(task_routing="task")  # the dense twin has no routing; the MoE's tasks come from the data
    summary = compare(tmp_path / "cmp", cfg, tcfg, progress=False, eval_limit=2)
    assert summary["settings"]["tasks"] == ["code", "prose"]
    for m in summary["models"]:
        assert set(m["final_val_loss_task"]) == {"code", "prose"} and set(m["final_val_bpb_task"]) == {"code", "prose"}
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "| model | code | prose |" in report and "held-out tail of each task (code " in report
    assert f"{summary['models'][1]['final_val_loss_task']['prose']['mean']:.4f} / " in report
    # moekit eval scores text without a task: the task-routed MoE is left out of it (and of samples), not an error
    assert [m["name"] for m in json.loads((tmp_path / "cmp" / "eval" / "report.json").read_text())["models"]] == ["dense-s0"]
    assert "such models are left out of its evaluation" in report
    assert [r["name"] for r in sample_candidates(summary)] == ["dense"]
    # a rerun recognises its runs (the models were given the data's tasks)
    assert compare(tmp_path / "cmp", cfg, tcfg, progress=False, evaluate=False)["settings"]["tasks"] == ["code", "prose"]
    assert load(tmp_path / "cmp" / "moe-topk-s0")[0].cfg.tasks == ["code", "prose"]


def test_task_routing_trains_on_the_datas_tasks_in_the_models_order(tmp_path, capsys):
    sources = named_sources(tmp_path / "sep", ("code", "prose"))
    # task routing refuses a forward pass without task ids: training and every evaluation give them
    run = tmp_path / "task"
    assert main(["train", "--out", str(run), "--max-steps", "2", "--task-routing", "task", "--data", f"code={sources['code']}",
                 "--data", f"prose={sources['prose']}", *SMALL_FLAGS]) == 0
    model, _ = load(run)
    assert model.cfg.tasks == ["code", "prose"] and model.cfg.task_routing == "task"
    assert set(metrics(run)[-1]["val_loss_task"]) == {"code", "prose"}
    # a model that lists its tasks keeps its order: task 0 is prose
    run = tmp_path / "ordered"
    result = train(run, small_cfg(tasks=["prose", "code"], task_routing="embedding"),
                   small_train(max_steps=2, eval_every=0, data=sources), progress=False)
    assert list(result.val_loss_task) == ["prose", "code"] and load(run)[0].cfg.tasks == ["prose", "code"]
    # ... and must name the data's tasks
    with pytest.raises(ValueError, match=r"the model's tasks \(code, verse\) are not the data's \(code, prose\)"):
        train(tmp_path / "other", small_cfg(tasks=["code", "verse"]), small_train(data=sources), progress=False)
    assert not (tmp_path / "other").exists()
    # --init from a model with tasks: the data must have the same ones
    verse = named_sources(tmp_path / "sep", ("verse",))["verse"]
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "init"), "--init", str(tmp_path / "task"), "--data",
                 f"code={sources['code']}", "--data", f"verse={verse}", "--max-steps", "1", "--seq-len", "16",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "the model's tasks (code, prose) are not the data's (code, verse)" in err and err.count("\n") == 1
    assert not (tmp_path / "init").exists()
    assert main(["train", "--out", str(tmp_path / "init"), "--init", str(tmp_path / "task"), "--data",
                 f"prose={sources['prose']}", "--data", f"code={sources['code']}", "--max-steps", "1", "--seq-len", "16",
                 "--batch-size", "4", "--quiet"]) == 0


# --------------------------------------------------------------------------- bad input
def test_flag_parsing():
    assert parse_data_flags(["corpus/"]) == "corpus/"
    assert parse_data_flags(["./a=b.txt"]) == "./a=b.txt"  # '/' before '=': a plain path
    assert parse_data_flags(["b=x.txt", "a=dir/"]) == {"b": "x.txt", "a": "dir/"}
    assert parse_task_weights("a=2, b=0.5,") == {"a": 2.0, "b": 0.5}
    for bad in ("a", "a=x", "a=1,a=2", ""):
        with pytest.raises(ConfigError):
            parse_task_weights(bad)
    with pytest.raises(ConfigError, match="task_weights\\['a'\\]=inf: a weight must be > 0"):
        TrainConfig(task_weights={"a": math.inf})
    with pytest.raises(ConfigError, match="data\\['a'\\]='': give the path"):
        TrainConfig(data={"a": ""})


def _setup_bad(tmp: Path, kind: str) -> list[str]:
    code = named_sources(tmp / "sep", ("code",))["code"]
    if kind == "tiny":  # a few hundred tokens: nothing to hold out
        return ["--data", f"code={code}", "--data", f"tiny={write_jsonl(tmp / 'tiny.jsonl', [{'text': 'a b c'}] * 30)}"]
    if kind == "short":  # ~1,500 tokens: a held-out tail of ~150, shorter than a window of 200 + 1
        short = write_jsonl(tmp / "short.jsonl", [{"text": t} for t in TEXTS["verse"][:80]])
        return ["--data", f"code={code}", "--data", f"short={short}", "--max-seq-len", "256", "--seq-len", "200"]
    if kind == "mixed":  # one record without a task among labelled ones
        records = [{"text": t, "task": "code"} for t in TEXTS["code"]] + [{"text": "no task here"}]
        return ["--data", str(write_jsonl(tmp / "mixed.jsonl", records))]
    if kind == "txt-beside-labels":
        labelled_corpus(tmp / "dir" / "a.jsonl")
        (tmp / "dir" / "b.txt").write_text("a plain document\n")
        return ["--data", str(tmp / "dir")]
    if kind == "other-task":  # --data code=PATH whose records say another task
        path = write_jsonl(tmp / "c.jsonl", [{"text": t, "task": "code"} for t in TEXTS["code"]] + [
            {"text": "x", "task": "prose"}])
        return ["--data", f"code={path}", "--data", f"verse={code}"]
    if kind == "bad-label":
        return ["--data", str(write_jsonl(tmp / "l.jsonl", [{"text": t, "task": "two words"} for t in TEXTS["code"]]))]
    if kind == "plain":
        return ["--data", code]
    return ["--data", f"code={code}", "--data", f"prose={named_sources(tmp / 'sep', ('prose',))['prose']}"]


@pytest.mark.parametrize("kind, args, message", [
    (None, ["--data", "code="], "--data code=: no path after 'code='"),
    (None, ["--data", "code={tmp}/missing.jsonl", "--data", "b={tmp}/missing.jsonl"],
     "--data b={tmp}/missing.jsonl: data path not found"),
    (None, ["--data", "=x.txt"], "--data =x.txt: an empty task name is not valid"),
    (None, ["--data", "a=x.txt", "--data", "a=y.txt"], "--data names task 'a' twice (x.txt and y.txt)"),
    (None, ["--data", "a=x.txt", "--data", "y.txt"], "--data y.txt is a plain path but --data a=x.txt names a task"),
    (None, ["--data", "x.txt", "--data", "y.txt"], "--data is given 2 plain paths"),
    (None, ["--data", "a b=x.txt"], "task name 'a b' is not valid"),
    ("two", ["--task-weights", "code=1,prose=1,poetry=2"], "--task-weights names task 'poetry', which the data does"),
    ("two", ["--task-weights", "code=1"], "--task-weights gives no weight for task 'prose'"),
    ("two", ["--task-weights", "code=0,prose=1"], "task_weights['code']=0.0: a weight must be > 0"),
    ("two", ["--task-weights", "code=-1,prose=1"], "task_weights['code']=-1.0: a weight must be > 0"),
    ("two", ["--task-weights", "code=x,prose=1"], "the weight of task 'code', 'x', is not a number"),
    ("plain", ["--task-weights", "code=1"], "--task-weights needs tasks in the data"),
    ("plain", ["--task-routing", "task"], "task_routing='task' needs tasks: train on data with task labels"),
    ("tiny", [], "task 'tiny' ({tmp}/tiny.jsonl) holds"),
    ("short", [], "task 'short' ({tmp}/short.jsonl): its held-out part of"),
    ("mixed", [], "{tmp}/mixed.jsonl, line 301 has no task while {tmp}/mixed.jsonl, line 1 has task 'code'"),
    ("txt-beside-labels", [], "{tmp}/dir/b.txt has no task while {tmp}/dir/a.jsonl, line 1 has task 'code'"),
    ("other-task", [], "{tmp}/c.jsonl, line 301: \"task\" is 'prose' in a source given as --data code="),
    ("bad-label", [], "{tmp}/l.jsonl, line 1: \"task\": task name 'two words' is not valid"),
])
def test_bad_input_gives_one_clear_line_and_writes_nothing(tmp_path, capsys, kind, args, message):
    extra = _setup_bad(tmp_path, kind) if kind else []
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    run = tmp_path / "run"
    code = main(["train", "--out", str(run), "--max-steps", "2", *SMALL_FLAGS, *extra, *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message.replace("{tmp}", str(tmp_path)) in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not run.exists()
    if kind in (None,):  # refused while parsing the flags: not even the data cache is touched
        assert not (tmp_path / "cache").exists()
    if kind in ("two", "tiny", "short", "mixed", "plain"):  # the same refusal before compare trains anything
        out = tmp_path / "cmp"
        assert main(["compare", "--out", str(out), "--no-eval", "--max-steps", "2", *SMALL_FLAGS, *extra, *args]) == 2
        err = capsys.readouterr().err
        assert message.replace("{tmp}", str(tmp_path)) in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
