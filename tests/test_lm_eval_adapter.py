"""The lm-evaluation-harness adapter: the harness's requests are `moekit eval`'s items and get its log-likelihoods
(to 1e-5), generate_until honours stop strings and batches, `moekit lm-eval` runs the harness's command line, and
`--model hf` on the same model exported to Hugging Face format gives the same accuracy on the same local task."""

import json
import logging
import sys
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install 'moekit[eval]' (make test does)")

import moekit  # noqa: E402
from moekit.cli import main  # noqa: E402
from moekit.config import ConfigError, ModelConfig  # noqa: E402
from moekit.data import load_tokenizer  # noqa: E402
from moekit.eval import metrics  # noqa: E402
from moekit.eval.lm_eval_adapter import MoekitLM  # noqa: E402
from moekit.eval.lm_eval_tasks import HARNESS_TASKS, write_tasks  # noqa: E402
from moekit.eval.run import build_suite, evaluate  # noqa: E402
from moekit.eval.score import score_continuations, score_texts, scoring_engine  # noqa: E402
from moekit.infer import Engine, SamplingParams  # noqa: E402
from moekit.model import Transformer  # noqa: E402

MC = ("moekit_next_line", "moekit_speaker", "moekit_blank")


@pytest.fixture(autouse=True)
def _one_thread_offline(monkeypatch, tmp_path_factory):
    """Tiny models: a second thread only contends on a shared machine (conftest restores the count). The
    tasks read local files; offline, `datasets` does not look for them on the hub first, and caches them in
    the session's temporary folder, not the user's."""
    torch.set_num_threads(1)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    # read at each load (the HF_DATASETS_CACHE variable only when datasets is first imported)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf-datasets")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A tiny seeded MoE (4 experts, top-2) with the embedded tokenizer; a context long enough that no item
    is cut (a cut falls one token apart in moekit and in lm-eval's HF model)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=4096, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=256,
                      init_std=0.2, tie_embeddings=False, num_experts=4, top_k=2, expert_ffn_dim=32)
    return str(moekit.save(Transformer(cfg), load_tokenizer(), tmp_path_factory.mktemp("lm-eval") / "moe"))


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def task_manager(task_dir):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(task_dir), include_defaults=False)  # indexing the built-in tasks takes seconds


@pytest.fixture(scope="module")
def lm(checkpoint) -> MoekitLM:
    return MoekitLM(pretrained=checkpoint, max_batch=8)


def harness(lm, task_manager, tasks, limit):
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=task_manager, limit=limit,
                                   log_samples=True, bootstrap_iters=0)


def by_doc(samples):
    return sorted(samples, key=lambda s: s["doc_id"])


def test_written_tasks_hold_moekit_evals_items(task_dir):
    suite = build_suite(list(HARNESS_TASKS), None, None, 0)  # moekit eval's defaults: every task, seed 0
    assert sorted(p.name for p in task_dir.iterdir()) == sorted(f"{n}.{x}" for n in HARNESS_TASKS.values()
                                                                for x in ("jsonl", "yaml"))
    for task, name in HARNESS_TASKS.items():
        rows = [json.loads(line) for line in (task_dir / f"{name}.jsonl").read_text().splitlines()]
        if task in suite.items:
            assert rows == [{"context": it.context, "choices": list(it.choices), "answer": it.answer, "play": it.play}
                            for it in suite.items[task]]
        else:
            assert [r["text"] for r in rows] == suite.documents[task]
        assert json.dumps(str(task_dir / f"{name}.jsonl")) in (task_dir / f"{name}.yaml").read_text()


def test_multiple_choice_requests_and_scores_are_moekit_evals(lm, task_manager, checkpoint):
    limit = 6
    out = harness(lm, task_manager, MC, limit)
    report = evaluate([checkpoint], tasks=["next-line", "speaker", "blank"], limit=limit, progress=False)
    model, tok = moekit.load(checkpoint)
    engine = scoring_engine(model, tok)  # a fresh engine: moekit eval's own scoring, not the adapter's
    suite = build_suite(["next-line", "speaker", "blank"], None, limit, 0)
    for task, name in zip(("next-line", "speaker", "blank"), MC):
        samples = by_doc(out["samples"][name])
        items = suite.items[task]
        assert len(samples) == len(items) == limit
        pairs = [(it.context, c) for it in items for c in it.choices]
        # the harness asks exactly moekit eval's (context, choice) pairs: no delimiter, no stripping
        assert [tuple(a) for s in samples for a in s["arguments"]] == pairs
        expected = score_continuations(engine, pairs)
        got = [r[0] for s in samples for r in s["resps"]]
        for (logprob, greedy), e in zip(got, expected):
            assert logprob == pytest.approx(e.logprob, abs=1e-5) and greedy == e.greedy
        assert out["results"][name]["acc,none"] == pytest.approx(report["models"][0]["mc"][task]["acc"])
        assert out["results"][name]["acc_norm,none"] == pytest.approx(report["models"][0]["mc"][task]["acc_norm"])


def test_rolling_loglikelihood_and_bits_per_byte_are_moekit_evals(lm, task_manager, checkpoint):
    out = harness(lm, task_manager, ["moekit_shakespeare"], 2)
    docs = build_suite(["shakespeare", "austen"], None, None, 0).documents["shakespeare"][:2]
    samples = by_doc(out["samples"]["moekit_shakespeare"])
    assert [s["arguments"][0][0] for s in samples] == docs
    model, tok = moekit.load(checkpoint)
    expected = score_texts(scoring_engine(model, tok), docs)
    assert max(e.tokens for e in expected) > lm.max_length  # the documents take more than one window
    for s, e in zip(samples, expected):
        assert s["resps"][0][0] == pytest.approx(e.logprob, abs=1e-5)
    bpb = out["results"]["moekit_shakespeare"]["bits_per_byte,none"]
    assert bpb == pytest.approx(metrics.lm_metrics(expected)["bits_per_byte"], rel=1e-9)


def greedy_text(model, tok, prompt: str, n: int) -> str:
    return Engine(model, tok, max_batch=1).generate([prompt], SamplingParams(max_new_tokens=n, temperature=0))[0].text


def test_generate_until_end_to_end_honours_stop_strings(lm, checkpoint, tmp_path):
    """A local generate_until task whose targets are the greedy answers cut before each prompt's own stop
    string: exact_match 1.0 only if every stop string ends its answer, and nothing after it is kept."""
    from lm_eval.tasks import TaskManager

    model, tok = moekit.load(checkpoint)
    rows = []
    for prompt in ("MACBETH.\nIs this a dagger", "ROMEO.\nBut soft", "VIOLA.\nWhat country, friends", "PROSPERO.\n"):
        full = greedy_text(model, tok, prompt, 24)
        stop = full[len(full) // 2:len(full) // 2 + 2]  # two characters from the middle of the answer
        assert stop and full.find(stop) > 0, full
        rows.append({"prompt": prompt, "stop": stop, "target": full[:full.find(stop)]})
    # one task per stop string (the harness takes until from a task's generation_kwargs), run together
    for i, r in enumerate(rows):
        (tmp_path / f"gen{i}.jsonl").write_text(json.dumps(r) + "\n")
        (tmp_path / f"gen{i}.yaml").write_text("\n".join([
            f"task: moekit_gen{i}", "dataset_path: json", "dataset_kwargs:", "  data_files:",
            f"    test: {json.dumps(str(tmp_path / f'gen{i}.jsonl'))}", "test_split: test", "output_type: generate_until",
            "doc_to_text: prompt", "doc_to_target: target",
            "generation_kwargs:", f"  until: [{json.dumps(r['stop'])}]", "  max_gen_toks: 24", "  do_sample: false",
            "metric_list:", "  - metric: exact_match", "    aggregation: mean", "    higher_is_better: true", ""]))
    tasks = [f"moekit_gen{i}" for i in range(len(rows))]
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, log_samples=True, bootstrap_iters=0)
    for t, r in zip(tasks, rows):
        assert out["samples"][t][0]["resps"][0][0] == r["target"]
        assert out["results"][t]["exact_match,none"] == 1.0


def test_generate_until_batched_equals_one_at_a_time(lm, checkpoint):
    from lm_eval.api.instance import Instance

    model, tok = moekit.load(checkpoint)
    prompts = ["MACBETH.\n", "Fair is foul", "ROMEO.\nBut soft, what light", "", "To be, or not", "VIOLA.\nWhat"]
    kwargs = [{"until": [], "max_gen_toks": 5 + i, "do_sample": False} for i in range(len(prompts))]
    requests = [Instance("generate_until", {}, (p, k), i) for i, (p, k) in enumerate(zip(prompts, kwargs))]
    got = lm.generate_until(requests, disable_tqdm=True)
    assert got == [greedy_text(model, tok, p, 5 + i) for i, p in enumerate(prompts)]
    calls = []  # the progress bar's updates: one per finished request, more requests than slots
    Engine(model, tok, max_batch=2).generate(prompts, SamplingParams(max_new_tokens=3, temperature=0),
                                             progress=calls.append)
    assert calls == [1] * len(prompts)
    # sampling: seeded by the harness's torch seed, the same answers for the same seed
    hot = [Instance("generate_until", {}, (p, {"until": "\n", "temperature": 1.0, "max_gen_toks": 8}), i)
           for i, p in enumerate(prompts)]
    torch.manual_seed(1234)
    first = lm.generate_until(hot, disable_tqdm=True)
    torch.manual_seed(1234)
    assert lm.generate_until(hot, disable_tqdm=True) == first and not any("\n" in t for t in first)


def test_gen_kwargs_as_lm_eval_reads_them(lm):
    p = lm.sampling_params({"until": "\n\n", "do_sample": True})
    assert (p.temperature, p.stop, p.max_new_tokens, p.top_k, p.top_p) == (1.0, ("\n\n",), 255, 0, 1.0)
    assert lm.sampling_params({"temperature": 0.5, "top_p": 0.9, "max_new_tokens": 7}).temperature == 0.5
    p = lm.sampling_params({"do_sample": False, "temperature": 0.7, "until": ["", "x"], "max_gen_toks": 3})
    assert (p.temperature, p.stop, p.max_new_tokens) == (0.0, ("x",), 3)
    with pytest.raises(ConfigError, match=r"'num_beams' not supported.*until, max_gen_toks"):
        lm.sampling_params({"num_beams": 4})


def test_bad_model_args_name_the_value_and_the_choices(checkpoint, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown model_args foo: moekit takes pretrained, max_batch"):
        MoekitLM(pretrained=checkpoint, foo=1)
    with pytest.raises(ConfigError, match=r"max_batch=0 must be an integer >= 1"):
        MoekitLM(pretrained=checkpoint, max_batch=0)
    with pytest.raises(ConfigError, match="needs pretrained=PATH"):
        MoekitLM()


def cli(argv, capsys):
    from lm_eval.utils import setup_logging

    # The harness logs through one handler made on its first run in the process, bound to the stderr of the
    # time: point it at this test's captured stderr (an earlier test's is closed).
    setup_logging()
    for handler in logging.getLogger("lm_eval").handlers:
        if type(handler) is logging.StreamHandler:  # not pytest's own capture handlers
            handler.stream = sys.stderr  # not setStream: it flushes the old, closed one
    rc = main(["lm-eval", *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_help_and_write_tasks(tmp_path, capsys):
    rc, out, _ = cli(["--help"], capsys)
    assert rc == 0 and "moekit lm-eval" in out and "--model_args" in out and "--include_path" in out
    rc, out, _ = cli(["--write-tasks", str(tmp_path / "t")], capsys)
    assert rc == 0 and len(list((tmp_path / "t").glob("*.yaml"))) == len(HARNESS_TASKS)
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "lm-eval" in capsys.readouterr().out


def test_cli_bad_path_ends_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))  # no --include_path: the tasks go to the cache
    rc, out, err = cli(["--model", "moekit", "--model_args", f"pretrained={tmp_path / 'missing'}",
                        "--tasks", "moekit_blank", "--limit", "1"], capsys)
    last = err.strip().splitlines()[-1]  # after the harness's own log lines
    assert rc == 2 and last.startswith("moekit lm-eval: error: checkpoint not found") and "missing" in last
    assert "Traceback" not in err
    assert (tmp_path / "cache" / "lm_eval_tasks" / "moekit_blank.yaml").is_file()


def cli_accuracy(capsys, tmp_path, name, model, model_args, task_dir, limit):
    out = tmp_path / name
    rc, stdout, err = cli(["--model", model, "--model_args", model_args, "--tasks", "moekit_next_line",
                           "--limit", str(limit), "--include_path", str(task_dir), "--output_path", str(out),
                           "--log_samples"], capsys)  # no --device: the harness's default (cuda:0) falls back to the CPU
    assert rc == 0, err
    assert "moekit_next_line" in stdout  # the harness's own table
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["moekit_next_line"]
    samples = [json.loads(line) for line in next(out.rglob("samples_moekit_next_line_*.jsonl")).read_text().splitlines()]
    # the samples file holds each response as text
    return results, [float(r[0][0]) for s in sorted(samples, key=lambda s: s["doc_id"]) for r in s["resps"]]


def test_cli_moekit_and_hf_export_agree(checkpoint, task_dir, tmp_path, capsys):
    """`moekit lm-eval --model moekit` and `--model hf` on the same model exported to Hugging Face format: the
    same accuracy on the same local task (and log-likelihoods within float rounding of two implementations)."""
    hf_dir = tmp_path / "hf"
    assert main(["convert", checkpoint, str(hf_dir), "--format", "hf"]) == 0
    capsys.readouterr()
    limit = 12
    ours, ours_lp = cli_accuracy(capsys, tmp_path, "moekit", "moekit", f"pretrained={checkpoint},max_batch=8", task_dir,
                                 limit)
    theirs, theirs_lp = cli_accuracy(capsys, tmp_path, "hf", "hf", f"pretrained={hf_dir},dtype=float32", task_dir, limit)
    assert len(ours_lp) == len(theirs_lp) == 4 * limit
    assert ours_lp == pytest.approx(theirs_lp, abs=1e-4)
    assert ours["acc,none"] == theirs["acc,none"] and ours["acc_norm,none"] == theirs["acc_norm,none"]


def test_every_format_moekit_load_reads(checkpoint, tmp_path, capsys):
    """int8, int4, GGUF and Hugging Face exports load by path and score as moekit eval scores them."""
    from lm_eval.api.instance import Instance

    q8, q4, gguf, hf = tmp_path / "int8", tmp_path / "int4", tmp_path / "moe.gguf", tmp_path / "hf"
    assert main(["quantize", checkpoint, str(q8), "--bits", "8"]) == 0
    assert main(["quantize", checkpoint, str(q4), "--bits", "4"]) == 0
    assert main(["convert", checkpoint, str(gguf)]) == 0
    assert main(["convert", checkpoint, str(hf), "--format", "hf"]) == 0
    capsys.readouterr()
    pairs = [("MACBETH.\nIs this a dagger", " which I see"), ("", "Fair is foul")]
    requests = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    for path in (q8, q4, gguf, hf):
        got = MoekitLM(pretrained=str(path), max_batch=4).loglikelihood(requests, disable_tqdm=True)
        expected = score_continuations(scoring_engine(*moekit.load(path)), pairs)
        assert [g[0] for g in got] == pytest.approx([e.logprob for e in expected], abs=1e-5), path
        assert [g[1] for g in got] == [e.greedy for e in expected]


def test_chat_template_for_apply_chat_template(lm):
    """A model without a template of its own gets moekit chat's plain User:/Assistant: alternation."""
    text = lm.apply_chat_template([{"role": "user", "content": "Who is there?"}])
    assert "Who is there?" in text and text.rstrip().endswith("Assistant:")
    assert lm.chat_template(True) == "" and "moe" in lm.tokenizer_name and "/" not in lm.tokenizer_name
