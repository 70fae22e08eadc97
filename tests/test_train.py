"""The trainer end to end on real files: loss falls, resume after SIGKILL equals an uninterrupted run,
checkpoints round-trip, and bad input gives one clear line."""

import errno
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moekit
from moekit.checkpoint import CheckpointError, find_checkpoints, load, load_trainer_state, save
from moekit.cli import main
from moekit.config import ModelConfig
from moekit.model import Transformer
from moekit.train import TrainConfig, evaluate, lr_at, param_groups, train

SMALL_MODEL = dict(dim=64, n_layers=2, n_heads=2, n_kv_heads=1, expert_ffn_dim=64, ffn_dim=128, max_seq_len=64)
SMALL_FLAGS = ["--dim", "64", "--n-layers", "2", "--n-heads", "2", "--n-kv-heads", "1", "--expert-ffn-dim", "64",
               "--ffn-dim", "128", "--max-seq-len", "64", "--batch-size", "4", "--seq-len", "32", "--eval-batches", "2"]


def small_cfg(**kw):
    return ModelConfig.from_preset("tiny-moe", **{**SMALL_MODEL, **kw})


def small_train(**kw):
    base = dict(max_steps=12, batch_size=4, seq_len=32, eval_every=6, save_every=6, log_every=2, eval_batches=2,
                warmup_steps=2)
    return TrainConfig(**{**base, **kw})


def metrics(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- pure pieces
def test_lr_schedule():
    assert lr_at(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at(10, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at(55, 1.0, 10, 100, 0.1) == pytest.approx(0.1 + 0.5 * 0.9)
    assert lr_at(100, 1.0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_at(500, 1.0, 10, 100, 0.1) == pytest.approx(0.1)
    values = [lr_at(s, 1.0, 10, 100) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert lr_at(10, 1.0, 10, 100, schedule="constant") == lr_at(10_000, 1.0, 10, 100, schedule="constant") == 1.0
    assert lr_at(39, 1.0, 10, 100, schedule="inv_sqrt") == pytest.approx(0.5)  # sqrt(10 / 40)
    assert lr_at(10**6, 1.0, 10, 100, 0.1, schedule="inv_sqrt") == pytest.approx(0.1)
    assert lr_at(5, 1.0, 10, 100, schedule="inv_sqrt") == lr_at(5, 1.0, 10, 100)  # same warmup


def test_no_weight_decay_on_norms_biases_embeddings():
    model = Transformer(small_cfg(attention_bias=True))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert "embed.weight" in no_decay_names
    assert all("norm" in n or n.endswith(".bias") or "embed" in n for n in no_decay_names)
    assert any("experts.gate_up_proj" in n for n in decay_names) and any("router.weight" in n for n in decay_names)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_every_setting_has_help_text():
    from dataclasses import fields

    from moekit.cli import _field_help

    for cls in (ModelConfig, TrainConfig):
        helps = _field_help(cls)
        assert [f.name for f in fields(cls) if f.name not in helps] == [], cls.__name__


# --------------------------------------------------------------------------- training
def test_short_training_lowers_validation_loss(tmp_path):
    cfg, tcfg = small_cfg(), small_train(max_steps=60, batch_size=16, seq_len=64, lr=1e-2, eval_every=30, save_every=30,
                                         warmup_steps=5)
    from moekit.data import load_tokenizer, prepare_data

    _, val = prepare_data(None, load_tokenizer(), tmp_path / ".moekit-cache")
    torch.manual_seed(tcfg.seed)
    before = evaluate(Transformer(cfg), val, tcfg)
    result = train(tmp_path / "run", cfg, tcfg, progress=False)
    assert before == pytest.approx(math.log(4096), abs=0.3)
    assert result.val_loss < before - 1.5
    assert 0 < result.val_bpb < before / math.log(2)
    records = metrics(tmp_path / "run")
    train_records = [r for r in records if "train_loss" in r]
    assert {"step", "tokens", "elapsed_s", "train_loss", "aux_loss"} <= set(train_records[0])
    assert train_records[-1]["train_loss"] < train_records[0]["train_loss"] - 1.0
    assert len(train_records[0]["expert_load"]) == 2 and len(train_records[0]["expert_load"][0]) == 8
    assert [s for s, _ in find_checkpoints(tmp_path / "run")] == [30, 60]
    for png in ("loss.png", "expert_load.png"):
        assert (tmp_path / "run" / "plots" / png).stat().st_size > 1000
    card = (tmp_path / "run" / "checkpoints" / "step-60" / "README.md").read_text()
    assert "parameters (active per token)" in card and "tokens seen | 61,440" in card


@pytest.mark.parametrize("router", ["sigmoid_bias", "switch"])
def test_training_other_routers_with_accumulation_and_bf16(tmp_path, router):
    cfg = small_cfg(router=router, top_k=1 if router == "switch" else 2, capacity_factor=1.0 if router == "switch" else None)
    result = train(tmp_path / "run", cfg, small_train(max_steps=6, grad_accum=2, bf16=True, eval_every=0, save_every=0),
                   progress=False)
    assert math.isfinite(result.val_loss)
    if router == "sigmoid_bias":
        model, _ = load(tmp_path / "run")
        assert model.moe_layers()[0].router.bias.abs().sum() > 0  # the balance update ran


def test_checkpoint_round_trip(tmp_path):
    cfg, tcfg = small_cfg(router="sigmoid_bias"), small_train(max_steps=4, save_every=4, eval_every=0)
    train(tmp_path / "run", cfg, tcfg, progress=False)
    (step, ckpt), = find_checkpoints(tmp_path / "run")
    state = load_trainer_state(ckpt)
    assert step == state["step"] == 4 and state["tokens"] == 4 * 4 * 32
    assert set(state["optimizer"]["state"]) and "rng" in state
    model, tok = moekit.load(ckpt)
    assert model.cfg == ModelConfig.from_json(ckpt / "config.json") and tok.get_vocab_size() == model.cfg.vocab_size
    save(model, tok, tmp_path / "copy")
    model2, _ = moekit.load(tmp_path / "copy")
    for (n, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), n
    model3, _ = moekit.load(tmp_path / "run")  # a run directory loads its newest checkpoint
    assert torch.equal(model3.embed.weight, model.embed.weight)


def _train_cmd(run, steps, extra=(), save_every=3, log_every=1):
    return [sys.executable, "-m", "moekit", "train", "--out", str(run), "--max-steps", str(steps), "--save-every",
            str(save_every), "--eval-every", "5", "--log-every", str(log_every), "--threads", "1", "--quiet",
            *SMALL_FLAGS, *extra]


# Run the CLI, but SIGKILL the process in the middle of writing checkpoint step-N: its model files are in
# the .tmp- folder, its trainer state is not. Deterministic, where polling for the .tmp- folder from
# outside raced the write (a few ms) and could miss it on a loaded machine.
_KILLED_MID_WRITE = """
import os, signal, sys
import moekit.checkpoint as checkpoint
from moekit.cli import main

step, write = sys.argv[1], checkpoint.atomic_write

def dying_write(path, fn):
    if os.path.basename(path) == "trainer_state.pt" and os.path.basename(os.path.dirname(path)).startswith(
            f".tmp-step-{step}-"):
        os.kill(os.getpid(), signal.SIGKILL)
    return write(path, fn)

checkpoint.atomic_write = dying_write
sys.exit(main(sys.argv[2:]))
"""


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tmp_path):
    # save_every 7 is not a multiple of log_every 5: the first logged train_loss after the resume
    # averages steps from before and after the kill, so the averaging window must be restored too.
    steps, cmd = 21, dict(save_every=7, log_every=5)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ref = subprocess.run(_train_cmd(tmp_path / "ref", steps, **cmd), capture_output=True, text=True, env=env,
                         timeout=300)
    assert ref.returncode == 0, ref.stderr

    # SIGKILL while checkpoint step-14 is being written, after one complete checkpoint (step-7).
    run = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", _KILLED_MID_WRITE, "14", *_train_cmd(run, steps, **cmd)[3:]],
                            capture_output=True, text=True, env=env, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    torn = [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert [p.name.startswith(".tmp-step-14-") for p in torn] == [True]  # the torn write is there
    assert (torn[0] / "model.safetensors").exists() and not (torn[0] / "trainer_state.pt").exists()
    assert [s for s, _ in find_checkpoints(run)] == [7]

    resumed = subprocess.run([sys.executable, "-m", "moekit", "train", "--resume", str(run), "--quiet"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert not any(p.name.startswith(".tmp-") for p in (run / "checkpoints").iterdir())
    a, b = metrics(tmp_path / "ref"), metrics(run)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("train_loss", "aux_loss", "val_loss", "tokens", "lr"):
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-7), (ra["step"], key)
    wa, _ = load(tmp_path / "ref")
    wb, _ = load(run)
    for (n, x), (_, y) in zip(wa.state_dict().items(), wb.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=n)


def test_resume_extends_a_finished_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--max-steps", "4", "--quiet", *SMALL_FLAGS]) == 0
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    assert "already finished 4 steps; pass --max-steps N with N > 4" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--max-steps", "6", "--quiet"]) == 0
    assert max(s for s, _ in find_checkpoints(run)) == 6
    assert main(["train", "--resume", str(run), "--max-steps", "8", "--num-experts", "4", "--quiet"]) == 2
    assert "model settings, --preset and --config cannot change" in capsys.readouterr().err


def test_init_from_checkpoint(tmp_path):
    train(tmp_path / "a", small_cfg(), small_train(max_steps=4, eval_every=0), progress=False)
    ckpt = find_checkpoints(tmp_path / "a")[-1][1]
    assert main(["train", "--out", str(tmp_path / "b"), "--init", str(ckpt), "--max-steps", "1", "--lr", "1e-9",
                 "--warmup-steps", "0", "--batch-size", "4", "--seq-len", "32", "--quiet"]) == 0
    a, _ = load(ckpt)
    b, _ = load(tmp_path / "b")
    torch.testing.assert_close(a.embed.weight, b.embed.weight, atol=1e-6, rtol=0)


def test_user_data_and_trained_tokenizer(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog, héllo wörld.\n" for i in range(3000))
    (corpus / "a.txt").write_text(text)
    (corpus / "b.jsonl").write_text("\n".join(json.dumps({"text": text[:5000]}) for _ in range(5)))
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--data", str(corpus), "--vocab-size", "300", "--max-steps", "6",
                 "--quiet", *SMALL_FLAGS]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["vocab_size"] == 300
    assert any("val_loss" in r for r in metrics(run))


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("setup, args, message", [
    (None, ["--data", "{tmp}/missing.txt"], "data path not found"),
    (("empty.txt", b""), ["--data", "{tmp}/empty.txt"], "empty.txt"),
    (("bad.txt", b"hello \xff\xfe world"), ["--data", "{tmp}/bad.txt"], "bad.txt"),
    (("dir/notes.md", b"# hi"), ["--data", "{tmp}/dir"], "no .txt or .jsonl"),
    (("cfg.toml", b"num_expert = 4\n"), ["--config", "{tmp}/cfg.toml"], "unknown setting 'num_expert'"),
    (("cfg.json", b"{\"lr\": \"fast\"}"), ["--config", "{tmp}/cfg.json"], "lr='fast'"),
    (None, ["--router", "top2"], "router='top2' is not one of"),
    (None, ["--seq-len", "128"], "seq_len=128 exceeds the model's max_seq_len=64"),
])
def test_bad_input_gives_one_clear_line(tmp_path, capsys, setup, args, message):
    if setup:
        path = tmp_path / setup[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(setup[1])
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code = main(["train", "--out", str(tmp_path / "run"), "--max-steps", "2", "--quiet", *SMALL_FLAGS, *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_unknown_flag_is_rejected(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--out", "x", "--num-expert", "4"])
    assert e.value.code == 2
    assert "unrecognized arguments: --num-expert" in capsys.readouterr().err


def test_existing_run_dir_needs_resume(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "something").write_text("x")
    (run / "config.json").write_text("{}")  # someone else's: the refusal must not clean it up
    (run / "plots").mkdir()
    assert main(["train", "--out", str(run), "--quiet", *SMALL_FLAGS]) == 2
    assert f"run directory {run} already exists; continue it with --resume" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "plots", "something"]


def test_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    run = tmp_path / "run"
    train(run, small_cfg(), small_train(max_steps=6, save_every=3, eval_every=0, keep_last=3), progress=False)
    newest = find_checkpoints(run)[-1][1]
    data = (newest / "model.safetensors").read_bytes()
    (newest / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="step-6/model.safetensors is corrupt or truncated"):
        load(newest)
    assert main(["train", "--resume", str(run), "--max-steps", "8", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "skipping checkpoint" in err and "step-6" in err
    assert max(s for s, _ in find_checkpoints(run)) == 8


def test_no_good_checkpoint_gives_clear_error(tmp_path, capsys):
    run = tmp_path / "run"
    train(run, small_cfg(), small_train(max_steps=3, save_every=3, eval_every=0), progress=False)
    ckpt = find_checkpoints(run)[-1][1]
    (ckpt / "trainer_state.pt").write_bytes(b"not a pickle")
    assert main(["train", "--resume", str(run), "--max-steps", "6", "--quiet"]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_disk_full_while_saving_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(run, small_cfg(), small_train(max_steps=3, save_every=3, eval_every=0), progress=False)
    good = find_checkpoints(run)[-1][1]
    before = (good / "model.safetensors").read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("moekit.checkpoint.save_file", full)
    with pytest.raises(CheckpointError, match=r"disk full while saving checkpoint step-6 .*step-3 is intact"):
        train(run, small_cfg(), small_train(max_steps=6, save_every=3, eval_every=0), resume=True, progress=False)
    assert (good / "model.safetensors").read_bytes() == before
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert [s for s, _ in find_checkpoints(run)] == [3]


def test_generate_cli_streams_text(tmp_path, capsys):
    run = tmp_path / "run"
    train(run, small_cfg(), small_train(max_steps=2, eval_every=0), progress=False)
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "12", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ROMEO:") and len(out) > len("ROMEO:\n")
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


