"""`moekit eval` end to end: the report on two tiny models (dense and MoE), quantized and GGUF models,
--data, determinism for a seed, and bad input that gives one clear line and writes nothing."""

import json
import math

import pytest
import torch

import moekit
from moekit.cli import main
from moekit.config import ModelConfig
from moekit.data import load_tokenizer
from moekit.eval.run import evaluate
from moekit.model import Transformer


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: a second thread only contends on a shared machine (conftest restores the count)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny seeded models with the embedded tokenizer: dense and MoE (4 experts, top-2)."""
    root = tmp_path_factory.mktemp("eval-models")
    out = {}
    for name, extra in (("dense", dict(num_experts=0)), ("moe", dict(num_experts=4, top_k=2, expert_ffn_dim=32))):
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=4096, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=64,
                          init_std=0.05, **extra)
        out[name] = str(moekit.save(Transformer(cfg), load_tokenizer(), root / name))
    return out


def run(argv, capsys):
    rc = main(["eval", *argv, "--quiet"])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_report_on_two_models(models, tmp_path, capsys):
    out = tmp_path / "report"
    rc, stdout, err = run([models["dense"], models["moe"], "--out", str(out), "--limit", "3"], capsys)
    assert rc == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["version"] == 1 and report["seed"] == 0
    assert report["tasks"] == ["shakespeare", "austen", "next-line", "speaker", "blank", "robustness", "efficiency",
                               "routing"]
    assert report["limits"] == {t: 3 for t in ("shakespeare", "austen", "next-line", "speaker", "blank")}
    dense, moe = report["models"]
    assert (dense["name"], moe["name"]) == ("dense", "moe")
    for fig in (dense, moe):
        assert set(fig["lm"]) == {"shakespeare", "austen"} and set(fig["mc"]) == {"next-line", "speaker", "blank"}
        for m in fig["lm"].values():
            assert m["documents"] == 3 and m["bits_per_byte"] > 0 and m["bits_per_byte_se"] > 0
            assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))
        for m in fig["mc"].values():
            assert m["items"] == 3 and m["chance"] == 0.25 and 0 <= m["acc"] <= 1
        assert fig["calibration"]["items"] == 9 and 0 <= fig["calibration"]["ece"] <= 1
        assert set(fig["robustness"]) == {"typos", "case", "whitespace", "punctuation"}
        assert fig["robustness"]["typos"]["lm"]["shakespeare"]["documents"] == 1  # a quarter of 3, rounded up
        assert {"params_total", "params_active", "flops_per_token", "prefill_tokens_per_s", "decode_tokens_per_s",
                "peak_rss_bytes", "weights"} <= set(fig["efficiency"])
    assert dense["routing"] is None and moe["routing"]["num_experts"] == 4
    assert moe["params_total"] > moe["params_active"] and dense["params_total"] == dense["params_active"]
    cmp = report["comparison"]
    assert cmp["best"] in ("dense", "moe") and len(cmp["differences"]) == 1
    assert set(cmp["differences"][0]["bits_per_byte"]) == {"shakespeare", "austen"}
    # The first paragraph: which is better, by how much, at what cost, what the experts do
    md = (out / "report.md").read_text()
    first = md.split("\n\n")[1]
    assert first == report["headline"] and " ".join(first.split()) in " ".join(stdout.split())
    for words in ("dense", "moe", "bits per byte", "multiple-choice", "active parameters", "decode speed", "experts"):
        assert words in first
    for png in ("summary.png", "reliability.png", "robustness.png", "moe_experts.png", "moe_specialisation.png"):
        assert (out / png).stat().st_size > 1000 and png in report["plots"]


def test_same_seed_same_report(models):
    tasks = ["shakespeare", "next-line", "speaker", "blank", "robustness"]  # (routing reads no seed: its own tests)
    a = evaluate([models["moe"]], tasks=tasks, limit=2, seed=3, progress=False)
    b = evaluate([models["moe"]], tasks=tasks, limit=2, seed=3, progress=False)
    c = evaluate([models["moe"]], tasks=tasks, limit=2, seed=4, progress=False)
    for r in (a, b, c):
        for fig in r["models"]:
            fig.pop("seconds"), fig.pop("seconds_by_part")
    assert a == b and a["models"][0]["lm"] != c["models"][0]["lm"]


def test_quantized_gguf_and_hugging_face_models_are_evaluated(models, tmp_path, capsys):
    q8, q4, gguf, hf = tmp_path / "moe-int8", tmp_path / "moe-int4", tmp_path / "moe.gguf", tmp_path / "moe-hf"
    assert main(["quantize", models["moe"], str(q8), "--bits", "8"]) == 0
    assert main(["quantize", models["moe"], str(q4), "--bits", "4"]) == 0
    assert main(["convert", models["moe"], str(gguf)]) == 0
    assert main(["convert", models["moe"], str(hf), "--format", "hf"]) == 0
    capsys.readouterr()
    out = tmp_path / "report"
    rc, _, err = run([models["moe"], str(q8), str(q4), str(gguf), str(hf), "--tasks", "shakespeare", "next-line",
                      "efficiency", "--limit", "4", "--out", str(out)], capsys)
    assert rc == 0, err
    figs = json.loads((out / "report.json").read_text())["models"]
    assert [f["name"] for f in figs] == ["moe", "moe-int8", "moe-int4", "moe.gguf", "moe-hf"]
    assert [f["format"] for f in figs] == ["moekit", "moekit", "moekit", "gguf", "hf"]
    assert [f["efficiency"]["weights"] for f in figs][:3] == ["float32", "int8", "int4"]
    base = figs[0]["lm"]["shakespeare"]
    for f, tol in zip(figs[1:], (0.01, 0.1, 0.01, 1e-5)):  # the same model: int8, int4, f16 GGUF, float32 HF
        assert f["lm"]["shakespeare"]["bits_per_byte"] == pytest.approx(base["bits_per_byte"], abs=tol), f["name"]
        assert f["lm"]["shakespeare"]["tokens"] == base["tokens"]


def test_user_data(models, tmp_path, capsys):
    data = tmp_path / "mine.txt"
    data.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog." * 5 for i in range(40)))
    report = evaluate([models["dense"]], tasks=["shakespeare"], data=str(data), limit=5, progress=False)
    assert report["tasks"] == ["shakespeare", "data"]
    m = report["models"][0]["lm"]["data"]
    assert m["documents"] == 5 and m["bytes"] > 0 and m["source"] == "your text (--data)"


@pytest.mark.parametrize("case", ["missing model", "unknown task", "empty data", "not utf-8", "limit 0", "data task"])
def test_bad_input_one_line_nothing_written(models, tmp_path, capsys, case):
    empty, latin = tmp_path / "empty.txt", tmp_path / "latin.txt"
    empty.write_text("")
    latin.write_bytes("Ophélie".encode("latin-1"))
    out = tmp_path / "out"
    argv, expected = {
        "missing model": ([str(tmp_path / "nope")], "checkpoint not found: "),
        "unknown task": ([models["dense"], "--tasks", "shakespeare", "trivia"], "unknown task 'trivia': valid tasks are "),
        "empty data": ([models["dense"], "--data", str(empty)], "is empty"),
        "not utf-8": ([models["dense"], "--data", str(latin)], "not UTF-8 at byte offset 3"),
        "limit 0": ([models["dense"], "--limit", "0"], "--limit 0 must be an integer >= 1"),
        "data task": ([models["dense"], "--tasks", "data"], "task 'data' needs --data"),
    }[case]
    rc, stdout, err = run([*argv, "--out", str(out)], capsys)
    assert rc == 2 and stdout == ""
    assert err.startswith("moekit eval: error: ") and expected in err and err.count("\n") == 1, err
    assert not out.exists()
