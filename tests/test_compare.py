"""``moekit compare``: the time-fraction arithmetic on synthetic curves, the seed loop, the expert sweep
and the reuse check, end to end on real (tiny) runs; the refusals that come before any training (a
corpus too small to validate on, runs timed with other threads or processes); what the report says
the validation data is."""

import json
import re
import shutil
from pathlib import Path

import pytest

from moekit.checkpoint import find_checkpoints
from moekit.cli import main
from moekit.config import ConfigError, ModelConfig
from moekit.train import TrainConfig
from moekit.train.compare import (
    CEILING,
    Curve,
    compare,
    dense_ceiling,
    dense_twin,
    model_variants,
    reading,
    recovery,
    render_report,
    router_variant,
    sample_candidates,
    summarize,
    time_to_reach,
)
from moekit.train.loop import RunError

SMALL_MODEL = dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, expert_ffn_dim=32, ffn_dim=64, max_seq_len=32,
                   num_experts=4)


def small_cfg(**kw):
    return ModelConfig.from_preset("tiny-moe", **{**SMALL_MODEL, **kw})


def small_train(**kw):
    base = dict(max_steps=4, batch_size=2, seq_len=16, eval_every=2, save_every=4, log_every=2, eval_batches=1,
                warmup_steps=1)
    return TrainConfig(**{**base, **kw})


# --------------------------------------------------------------------------- pure pieces
def _evals(losses, step_tokens=100, step_s=1.0):
    return [{"step": i + 1, "tokens": (i + 1) * step_tokens, "elapsed_s": (i + 1) * step_s, "val_loss": v,
             "val_bpb": v / 2} for i, v in enumerate(losses)]


def test_time_to_reach_interpolates_between_evaluations():
    evals = [{"tokens": 100, "elapsed_s": 1.0, "val_loss": 5.0}, {"tokens": 200, "elapsed_s": 2.0, "val_loss": 3.0}]
    assert time_to_reach(evals, 4.0, "tokens") == pytest.approx(150)  # between evaluations: interpolated
    assert time_to_reach(evals, 3.5, "elapsed_s") == pytest.approx(1.75)
    assert time_to_reach(evals, 6.0, "elapsed_s") == pytest.approx(1.0)  # the first evaluation already reached it
    assert time_to_reach(evals, 3.0, "tokens") == pytest.approx(200)  # exactly at an evaluation
    assert time_to_reach(evals, 2.0, "tokens") is None  # never reached


def test_summarize_pairs_each_seed_with_its_dense_run():
    cfg = small_cfg()
    dense_cfg = dense_twin(cfg)
    curves = [
        # seed 0: dense ends at 4.0 after 4 s; the MoE (twice as slow per step) is at 4.0 at step 1 (2 s)
        Curve("dense", 0, Path("d0"), dense_cfg, _evals([6.0, 5.0, 4.5, 4.0]), 100.0),
        Curve("moe-topk", 0, Path("m0"), cfg, _evals([4.0, 3.5, 3.0, 2.9], step_s=2.0), 50.0),
        # seed 1: dense ends at 3.0; the MoE gets there between its steps 2 and 3 (loss 3.5 -> 2.5)
        Curve("dense", 1, Path("d1"), dense_cfg, _evals([6.0, 5.0, 4.0, 3.0]), 100.0),
        Curve("moe-topk", 1, Path("m1"), cfg, _evals([5.0, 3.5, 2.5, 2.0]), 100.0),
    ]
    s = summarize(curves)
    runs = {(r["name"], r["seed"]): r for r in s["runs"]}
    assert runs["moe-topk", 0]["target_val_loss"] == 4.0 and runs["moe-topk", 1]["target_val_loss"] == 3.0
    assert runs["moe-topk", 0]["time_fraction"] == pytest.approx(2.0 / 4.0)
    assert runs["moe-topk", 0]["token_fraction"] == pytest.approx(100 / 400)
    assert runs["moe-topk", 0]["step_cost_vs_dense"] == pytest.approx(2.0)
    assert runs["moe-topk", 1]["time_fraction"] == pytest.approx(2.5 / 4.0)
    moe = s["models"][1]
    assert moe["time_fraction"]["mean"] == pytest.approx((0.5 + 0.625) / 2)
    assert moe["time_fraction"]["min"] == pytest.approx(0.5) and moe["time_fraction"]["max"] == pytest.approx(0.625)
    assert moe["reached"] == 2 and moe["seeds"] == [0, 1]
    assert s["dense_final_val_loss"]["mean"] == pytest.approx(3.5)
    report = render_report(s, small_train())
    assert "0.56 ± 0.09" in report and "seeds: 0.50, 0.62" in report

    # one seed never reaches the target: no mean is claimed, the report says so
    curves[3] = Curve("moe-topk", 1, Path("m1"), cfg, _evals([5.0, 4.5, 4.0, 3.5]), 100.0)
    s = summarize(curves)
    assert s["models"][1]["time_fraction"] is None and s["models"][1]["reached"] == 1
    assert s["models"][1]["time_fraction_per_seed"] == [pytest.approx(0.5), None]
    assert "did not reach the dense model's final loss in 1 of 2 seeds" in render_report(s, small_train())


def test_report_flags_a_time_fraction_above_0_8_as_a_defect():
    cfg = small_cfg()
    curves = [Curve("dense", 0, Path("d"), dense_twin(cfg), _evals([5.0, 4.0]), 100.0),
              Curve("moe-topk", 0, Path("m"), cfg, _evals([5.0, 4.05, 3.9]), 100.0)]
    s = summarize(curves)
    assert s["models"][1]["time_fraction"]["mean"] > 0.8
    assert "above 0.8, a defect" in render_report(s, small_train())


def test_dense_twin_has_equal_active_ffn_width():
    moe = small_cfg(num_shared_experts=1)
    dense = dense_twin(moe)
    assert dense.num_experts == 0 and dense.ffn_dim == 2 * 32 + 32
    switch = router_variant(moe, "switch")
    assert switch.top_k == 1 and switch.expert_ffn_dim == 64 and switch.capacity_factor is None
    assert switch.num_experts == 2 and switch.param_counts()[0] - moe.param_counts()[0] == -32 * 2  # routers' rows
    with pytest.raises(ConfigError, match="divide by top_k"):
        router_variant(small_cfg(num_experts=5), "switch")
    assert moe.param_counts()[1] - dense.param_counts()[1] == 32 * 4  # only the router differs
    assert router_variant(small_cfg(top_k=1, router="switch"), "switch").expert_ffn_dim == 32  # already top-1


def test_expert_sweep_keeps_active_parameters():
    variants = model_variants(small_cfg(), experts=[4, 8, 16])
    assert [n for n, _ in variants] == ["dense", "moe-topk-e4", "moe-topk-e8", "moe-topk-e16"]
    actives = [c.param_counts()[1] for _, c in variants[1:]]
    routers = [c.dim * c.num_experts for _, c in variants[1:]]
    assert len({a - r for a, r in zip(actives, routers)}) == 1  # equal but for the router's own weights
    with pytest.raises(ConfigError, match="fewer experts than top_k"):
        model_variants(small_cfg(), experts=[1])
    with pytest.raises(ConfigError, match="unknown router"):
        model_variants(small_cfg(), routers=["nope"])


def test_compare_never_samples_from_a_router_that_sees_later_tokens():
    runs = [{"name": "dense", "router": None, "final_val_loss": 4.0},
            {"name": "moe-expert_choice", "router": "expert_choice", "final_val_loss": 3.0},
            {"name": "moe-topk", "router": "topk", "final_val_loss": 3.5}]
    assert [r["name"] for r in sample_candidates({"runs": runs})] == ["moe-topk"]
    assert sample_candidates({"runs": runs[:2]})[0]["name"] == "dense"
    cfg = small_cfg()
    curves = [Curve("dense", 0, Path("d"), dense_twin(cfg), _evals([5.0, 4.0]), 1.0),
              Curve("moe-expert_choice", 0, Path("e"), small_cfg(router="expert_choice"), _evals([5.0, 3.0]), 1.0)]
    assert "depends on later tokens" in render_report(summarize(curves), small_train())


# --------------------------------------------------------------------------- end to end
def test_seed_loop_and_expert_sweep_on_real_runs(tmp_path):
    out = tmp_path / "cmp"
    summary = compare(out, small_cfg(), small_train(seed=3), experts=[2, 4], seeds=2, progress=False,
                      evaluate=False)
    names = sorted(p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert names == ["dense-s3", "dense-s4", "moe-topk-e2-s3", "moe-topk-e2-s4", "moe-topk-e4-s3", "moe-topk-e4-s4"]
    for name in names:  # one run per seed, with that seed
        saved = json.loads((out / name / "config.json").read_text())
        assert saved["train"]["seed"] == int(name[-1])
    assert [m["name"] for m in summary["models"]] == ["dense", "moe-topk-e2", "moe-topk-e4"]
    assert [m["num_experts"] for m in summary["models"]] == [0, 2, 4]
    assert all(m["seeds"] == [3, 4] for m in summary["models"])
    report = (out / "report.md").read_text()
    assert "| moe-topk-e2 |" in report and "| moe-topk-e4 |" in report and "scaling.png" in report
    assert "Validation: the held-out plays of the embedded Shakespeare corpus (julius_caesar, macbeth, " in report
    assert summary["settings"]["world_size"] == 1 and summary["settings"]["threads"] >= 1
    for plot in ("val_loss.png", "scaling.png"):
        assert (out / plot).stat().st_size > 1000
    # the seeds differ, so their runs differ
    d3, d4 = (json.loads((out / f"dense-s{s}" / "metrics.jsonl").read_text().splitlines()[0]) for s in (3, 4))
    assert d3["train_loss"] != d4["train_loss"]


TINY_FLAGS = ["--quiet", "--no-eval", "--dim", "32", "--n-layers", "1", "--n-heads", "2", "--n-kv-heads", "1", "--expert-ffn-dim",
              "32", "--num-experts", "4", "--max-seq-len", "32", "--batch-size", "2", "--seq-len", "16", "--eval-batches",
              "1", "--warmup-steps", "1"]


def test_compare_reuses_only_runs_with_the_same_settings(tmp_path, capsys):
    out = tmp_path / "cmp"
    flags = ["compare", "--out", str(out), *TINY_FLAGS]
    assert main(flags + ["--max-steps", "3", "--dense-lr", "0.002"]) == 0
    printed = capsys.readouterr().out
    assert "dense" in printed and "time frac" in printed
    assert json.loads((out / "dense-s0" / "config.json").read_text())["train"]["lr"] == 0.002
    assert main(flags + ["--max-steps", "3", "--dense-lr", "0.002"]) == 0  # same settings: reused, not retrained
    assert "already trained (3 steps), reusing" in capsys.readouterr().out
    assert main(flags + ["--max-steps", "2", "--lr", "0.01"]) == 2  # other settings: refused, nothing written
    err = capsys.readouterr().err
    assert "trained with other settings" in err and "max_steps 3 (wanted 2)" in err and err.count("\n") == 1
    assert "Budget: 3 steps" in (out / "report.md").read_text()
    with pytest.raises(RunError):
        compare(out, small_cfg(), small_train(max_steps=3, lr=0.01), progress=False, evaluate=False)


def test_compare_with_its_own_tokenizer_reuses_its_runs(tmp_path, capsys):
    """With --vocab-size the model's vocabulary follows the trained tokenizer, not the preset's: a rerun
    must still recognise its runs (the main job is such a run)."""
    flags = ["compare", "--out", str(tmp_path / "cmp"), *TINY_FLAGS, "--max-steps", "2", "--vocab-size", "300"]
    assert main(flags) == 0
    saved = json.loads((tmp_path / "cmp" / "dense-s0" / "config.json").read_text())
    assert saved["model"]["vocab_size"] == 300
    capsys.readouterr()
    assert main(flags) == 0
    assert "already trained (2 steps), reusing" in capsys.readouterr().out
    assert main(flags[:-1] + ["320"]) == 2  # another vocabulary is another run
    assert "vocab_size 300 (wanted 320)" in capsys.readouterr().err


def test_compare_flags_are_checked(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["compare", "--experts", "8,x"])
    assert e.value.code == 2
    assert "comma-separated integers" in capsys.readouterr().err
    assert main(["compare", "--seeds", "0", "--max-steps", "1", "--no-eval", "--out", str(tmp_path)]) == 2
    assert "--seeds 0 must be >= 1" in capsys.readouterr().err


# --------------------------------------------------------------------------- refusals before training
def _corpus(path: Path, repeats: int) -> Path:
    path.write_text("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.\n" * repeats)
    return path


@pytest.fixture
def data_cache(tmp_path, monkeypatch):
    """Tokenized corpora go to a folder of the test's own, not the user's cache."""
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("repeats, flags, message", [
    (3, [], r"--data \S*small.txt holds \d+ tokens, too few to hold out validation: compare needs at least 1,000 tokens"),
    # ~2,000 tokens: a tail of ~200 held out, shorter than one window of 256 + 1
    (90, ["--seq-len", "256", "--max-seq-len", "256"],
     r"--data \S*small.txt holds [\d,]+ tokens; its held-out tail of \d+ is shorter than one validation window "
     r"\(--seq-len 256 \+ 1\): give more text or a --seq-len under \d+"),
])
def test_a_corpus_too_small_to_validate_on_is_refused_before_training(tmp_path, capsys, data_cache, repeats, flags,
                                                                       message):
    data = _corpus(tmp_path / "small.txt", repeats)
    out = tmp_path / "cmp"
    assert main(["compare", "--out", str(out), *TINY_FLAGS, "--max-steps", "2", "--data", str(data), *flags]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1 and "Traceback" not in err, err
    assert not out.exists()  # nothing trained, nothing written


def test_the_report_names_the_held_out_part_of_the_users_data(tmp_path, data_cache):
    data = _corpus(tmp_path / "plays.txt", 120)  # ~2,600 tokens: ~260 held out
    summary = compare(tmp_path / "cmp", small_cfg(), small_train(max_steps=2, data=str(data)), progress=False,
                      evaluate=False)
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert re.search(rf"Validation: the last [\d,]+ tokens of {re.escape(str(data))}, held out from training, 1 batches",
                     report), report[:800]
    assert "plays" not in report.replace("plays.txt", "") and summary["settings"]["validation"] in report


def test_runs_timed_with_other_threads_or_processes_are_not_mixed(tmp_path, capsys):
    out = tmp_path / "cmp"
    flags = ["compare", "--out", str(out), *TINY_FLAGS]
    assert main(flags + ["--max-steps", "4", "--save-every", "2", "--threads", "1"]) == 0
    assert json.loads((out / "timing.json").read_text()) == {name: {"threads": 1, "world_size": 1}
                                                             for name in ("dense-s0", "moe-topk-s0")}
    shutil.rmtree(out / "moe-topk-s0" / "checkpoints" / "step-4")  # as if interrupted after step 2: it would continue
    before = (out / "moe-topk-s0" / "metrics.jsonl").read_text()
    capsys.readouterr()
    # dense-s0 is finished (reused), moe-topk-s0 half done (continued): both refused before anything trains
    assert main(flags + ["--max-steps", "4", "--save-every", "2", "--threads", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("dense-s0 was timed with 1 thread x 1 process, this compare runs 2 threads x "
                                      "1 process: the time fraction compares seconds, so the runs cannot be mixed; "
                                      "use a fresh --out or the same settings (--threads 1 in one process)") in err
    (out / "timing.json").write_text(json.dumps({"dense-s0": {"threads": 2, "world_size": 1},
                                                 "moe-topk-s0": {"threads": 1, "world_size": 1}}))
    assert main(flags + ["--max-steps", "4", "--save-every", "2", "--threads", "2"]) == 2
    assert "moe-topk-s0 was timed with 1 thread x 1 process, this compare runs 2 threads" in capsys.readouterr().err
    assert (out / "moe-topk-s0" / "metrics.jsonl").read_text() == before
    (out / "timing.json").write_text(json.dumps({n: {"threads": 1, "world_size": 1} for n in ("dense-s0", "moe-topk-s0")}))
    assert main(flags + ["--max-steps", "4", "--save-every", "2", "--threads", "1"]) == 0  # the same threads: goes on
    printed = capsys.readouterr().out
    assert "dense-s0: already trained (4 steps), reusing" in printed and "moe-topk-s0: already" not in printed
    assert max(s for s, _ in find_checkpoints(out / "moe-topk-s0")) == 4
    # another world size (a torchrun launch's record)
    (out / "timing.json").write_text(json.dumps({"dense-s0": {"threads": 1, "world_size": 2},
                                                 "moe-topk-s0": {"threads": 1, "world_size": 1}}))
    assert main(flags + ["--max-steps", "4", "--save-every", "2", "--threads", "1"]) == 2
    assert ("dense-s0 was timed with 1 thread x 2 processes, this compare runs 1 thread x 1 process"
            in capsys.readouterr().err)
    (out / "timing.json").unlink()  # runs with no record (an older moekit's) cannot be vouched for either
    assert main(flags + ["--max-steps", "4", "--save-every", "2", "--threads", "1"]) == 2
    assert re.search(r"dense-s0 has no record of the CPU threads and processes .* fresh --out", capsys.readouterr().err)


# --------------------------------------------------------------------------- the ceiling (issue 18)
def test_recovery_on_hand_values():
    assert recovery(4.0, 3.9, 3.8) == pytest.approx(0.5)  # half the ceiling's gain
    assert recovery(4.0, 4.0, 3.8) == pytest.approx(0.0)  # no better than the dense twin
    assert recovery(4.0, 3.7, 3.8) == pytest.approx(1.5)  # below the ceiling
    assert recovery(4.0, 4.1, 3.8) == pytest.approx(-0.5)  # worse than the dense twin
    assert recovery(4.0, 3.9, 4.0) is None and recovery(4.0, 3.9, 4.2) is None  # the ceiling gains nothing


def test_summarize_reports_recovery_and_fractions_against_the_ceiling():
    cfg = small_cfg()
    curves = [
        Curve("dense", 0, Path("d0"), dense_twin(cfg), _evals([6.0, 5.0, 4.5, 4.0]), 100.0),
        Curve(CEILING, 0, Path("c0"), dense_ceiling(cfg), _evals([5.0, 4.0, 3.5, 3.0], step_s=4.0), 25.0),
        Curve("moe-topk", 0, Path("m0"), cfg, _evals([5.5, 4.5, 3.5, 3.2], step_s=1.25), 80.0),
        Curve("dense", 1, Path("d1"), dense_twin(cfg), _evals([6.0, 5.0, 4.5, 4.0]), 100.0),
        Curve(CEILING, 1, Path("c1"), dense_ceiling(cfg), _evals([5.0, 4.0, 3.5, 3.0], step_s=4.0), 25.0),
        Curve("moe-topk", 1, Path("m1"), cfg, _evals([5.5, 4.8, 4.2, 3.9], step_s=1.25), 80.0),
    ]
    s = summarize(curves)
    m0, m1 = [r for r in s["runs"] if r["name"] == "moe-topk"]
    assert m0["recovery"] == pytest.approx((4.0 - 3.2) / (4.0 - 3.0))
    assert m1["recovery"] == pytest.approx((4.0 - 3.9) / (4.0 - 3.0))
    # seed 0 reaches the ceiling's final 3.0? no (3.2): never; the ceiling took 16 s for its 400 tokens
    assert m0["token_fraction_vs_ceiling"] is None and m0["time_fraction_vs_ceiling"] is None
    assert m0["step_cost_vs_ceiling"] == pytest.approx(25.0 / 80.0)
    row = next(m for m in s["models"] if m["name"] == "moe-topk")
    assert row["recovery"]["mean"] == pytest.approx((0.8 + 0.1) / 2)
    assert row["time_fraction_vs_ceiling"] is None  # not every seed reached it
    ceiling_row = next(m for m in s["models"] if m["name"] == CEILING)
    assert "recovery" not in ceiling_row and ceiling_row["token_fraction"]["mean"] == pytest.approx(0.5)
    assert s["ceiling_final_val_loss"]["mean"] == pytest.approx(3.0)
    # a MoE below the ceiling: its fractions against it are defined
    curves[2] = Curve("moe-topk", 0, Path("m0"), cfg, _evals([5.0, 4.0, 3.0, 2.5], step_s=1.25), 80.0)
    r = next(r for r in summarize(curves)["runs"] if r["name"] == "moe-topk" and r["seed"] == 0)
    assert r["recovery"] == pytest.approx(1.5)
    assert r["token_fraction_vs_ceiling"] == pytest.approx(300 / 400)
    assert r["time_fraction_vs_ceiling"] == pytest.approx(3 * 1.25 / 16.0)
    report = render_report(summarize(curves), small_train())
    assert "recovery" in report and CEILING in report


@pytest.mark.parametrize("kw", [{}, {"num_experts": 8, "top_k": 2},
                                {"num_shared_experts": 1, "shared_expert_ffn_dim": 48}])
def test_the_ceiling_holds_the_moes_total_parameters(kw):
    moe = small_cfg(**kw)
    ceiling = dense_ceiling(moe)
    router_params = moe.n_layers * moe.num_experts * moe.dim  # the only weights a dense FFN has no use for
    from moekit.model import Transformer

    counted = lambda cfg: sum(p.numel() for p in Transformer(cfg).parameters())  # noqa: E731
    assert counted(ceiling) == counted(moe) - router_params - (moe.n_layers * moe.dim if moe.shared_expert_gate else 0)
    assert ceiling.param_counts()[1] == ceiling.param_counts()[0]  # dense: every parameter is active
    assert ceiling.num_experts == 0 and ceiling.ffn_dim == moe.num_experts * moe.expert_ffn_dim + moe.shared_expert_ffn_dim


def test_the_ceiling_is_refused_where_it_cannot_mirror_the_moe():
    with pytest.raises(ConfigError, match="--experts"):
        model_variants(small_cfg(), experts=[4, 8], ceiling=True)
    with pytest.raises(ConfigError, match="every layer"):
        dense_ceiling(small_cfg(n_layers=2, first_dense_layers=1))
    names = [n for n, _ in model_variants(small_cfg(), ceiling=True)]
    assert names == ["dense", CEILING, "moe-topk"]


def test_compare_with_the_ceiling_end_to_end(tmp_path, capsys):
    assert main(["compare", "--preset", "tiny-moe", "--dim", "32", "--n-layers", "1", "--max-steps", "4",
                 "--eval-every", "2", "--eval-batches", "3", "--batch-size", "2", "--seq-len", "64", "--ceiling",
                 "--eval-limit", "4", "--out", str(tmp_path / "cmp"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert CEILING in out and "recovery of the dense-total gain" in out
    summary = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    assert [m["name"] for m in summary["models"]] == ["dense", CEILING, "moe-topk"]
    assert "recovery_per_seed" in summary["models"][2]
    assert summary["eval_noise"] > 0 and "evaluation noise" in out
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "Evaluation noise" in report
    # moekit eval of the first seed's final models, every model on the same items, next to the report
    evaluation = json.loads((tmp_path / "cmp" / "eval" / "report.json").read_text())
    assert [m["name"] for m in evaluation["models"]] == ["dense-s0", f"{CEILING}-s0", "moe-topk-s0"]
    assert summary["eval_headline"] == evaluation["headline"] and evaluation["headline"] in report
    assert "moekit eval of the first seed's final models" in out


def test_standard_error_of_the_validation_batches():
    from moekit.train.loop import standard_error

    assert standard_error([1.0, 2.0, 3.0]) == pytest.approx(1.0 / 3 ** 0.5)
    assert standard_error([2.0, 2.0]) == 0.0 and standard_error([2.0]) is None


def _curves_of(summary):
    return summary["_curves"]


def _three_way(moe_losses_per_seed, ceiling_final=3.0):
    """Two seeds of dense (ends 4.0), the ceiling (ends ``ceiling_final``, reaching 4.0 at half its
    tokens when it ends at 3.0) and a MoE; time per step: dense 1, ceiling 4, MoE 1.25."""
    cfg = small_cfg()
    curves = []
    for seed, moe in enumerate(moe_losses_per_seed):
        c = [5.0, 4.0, ceiling_final + 0.2, ceiling_final] if ceiling_final < 4.0 else [6.0, 5.0, 4.6, ceiling_final]
        curves += [Curve("dense", seed, Path(f"d{seed}"), dense_twin(cfg), _evals([6.0, 5.0, 4.5, 4.0]), 100.0),
                   Curve(CEILING, seed, Path(f"c{seed}"), dense_ceiling(cfg), _evals(c, step_s=4.0), 25.0),
                   Curve("moe-topk", seed, Path(f"m{seed}"), cfg, _evals(moe, step_s=1.25), 80.0)]
    return {**summarize(curves), "_curves": curves}


def test_the_reading_follows_the_figures():
    # capacity-bound, MoE at half the time in every seed, recovery >= 0.8
    text = reading(_three_way([[5.0, 4.0, 3.5, 3.1], [5.0, 4.0, 3.6, 3.2]]))
    assert "FFN capacity is the bottleneck here" in text and "0.50 of its tokens" in text
    assert "recovering 0.85 ± 0.07" in text and "at least the ~0.8" in text
    assert "per seed: 0.62, 0.62" in text and "sooner in every seed, though not in half the time" in text
    # a MoE that never reaches the dense loss in one seed
    text = reading(_three_way([[5.5, 4.5, 3.9, 3.8], [6.0, 5.5, 4.9, 4.5]]))
    assert "1 of 2 seeds" in text and "not reached" in text and "does not pay" in text and "short of the ~0.8" in text
    # a ceiling that never reaches the dense loss: there is no gain to recover
    text = reading(_three_way([[5.5, 4.5, 3.9, 3.8]] * 2, ceiling_final=4.2))
    assert "did not reach the small dense model's final loss in every seed (0 of 2)" in text
    assert "no recovery" in text and "recovering" not in text
    # at most half the time in every seed
    fast = _three_way([[4.0, 3.5, 3.2, 3.0], [4.0, 3.6, 3.3, 3.1]])
    assert "in every seed, at most half the time, so sparsity pays here" in reading(fast)
    assert "**Reading.**" in render_report(fast, small_train())


def test_a_ceiling_on_the_first_seeds_only():
    s = _three_way([[5.0, 4.0, 3.5, 3.1], [5.0, 4.0, 3.6, 3.2]])
    curves_summary = summarize([c for c in _curves_of(s) if not (c.name == CEILING and c.seed == 1)])
    moe = next(m for m in curves_summary["models"] if m["name"] == "moe-topk")
    assert moe["ceiling_seeds"] == [0] and moe["recovery_per_seed"] == [pytest.approx(0.9)]
    assert moe["time_fraction_per_seed"] == [pytest.approx(0.625)] * 2  # the dense comparison keeps every seed
    ceiling_row = next(m for m in curves_summary["models"] if m["name"] == CEILING)
    assert ceiling_row["seeds"] == [0]
    assert "0.90" in reading(curves_summary)


def test_ceiling_seeds_are_checked_and_trained_only_where_asked(tmp_path, capsys):
    base = ["compare", "--no-eval", "--preset", "tiny-moe", "--dim", "32", "--n-layers", "1", "--max-steps", "2",
            "--eval-every", "2", "--eval-batches", "2", "--batch-size", "2", "--seq-len", "16", "--quiet"]
    assert main(base + ["--seeds", "2", "--ceiling-seeds", "3", "--out", str(tmp_path / "bad")]) == 2
    assert "--ceiling-seeds 3 must be between 1 and --seeds 2" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main(base + ["--seeds", "2", "--ceiling-seeds", "1", "--out", str(tmp_path / "cmp")]) == 0
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir() if p.is_dir()) == [
        "dense-s0", "dense-s1", f"{CEILING}-s0", "moe-topk-s0", "moe-topk-s1"]
    assert "recovery of the dense-total gain" in capsys.readouterr().out


def test_an_evaluation_that_cannot_run_leaves_the_comparison_standing(tmp_path, capsys):
    """Runs trained on 16-token windows cannot be scored on multiple-choice answers longer than that:
    compare says so in one line and keeps its report (the evaluation is an extra)."""
    assert main(["compare", "--preset", "tiny-moe", "--dim", "32", "--n-layers", "1", "--max-steps", "2",
                 "--eval-every", "2", "--eval-batches", "1", "--batch-size", "2", "--seq-len", "16",
                 "--eval-limit", "4", "--out", str(tmp_path / "cmp"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "note: moekit eval of the final models skipped:" in err and "context of 16 tokens" in err
    summary = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    assert "eval_headline" not in summary and "context of 16 tokens" in summary["eval_skipped"]
    assert (tmp_path / "cmp" / "report.md").exists()
