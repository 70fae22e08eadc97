"""What new users and a strict review ran into (issue 10): each defect, rerun as reported."""

import dataclasses
import math
import os
import stat

import pytest
import torch

import moekit
from moekit.cli import main
from moekit.config import ModelConfig
from moekit.convert.hf_archs import aux_coef_from_hf, aux_coef_to_hf
from moekit.convert.inspect import format_info
from moekit.data import load_tokenizer, train_tokenizer
from moekit.model import Transformer, losses
from moekit.model.cross_entropy import linear_cross_entropy
from moekit.model.router import build_router
from moekit.train import TrainConfig, train
from moekit.train.loop import read_metrics

TINY = ["--dim", "32", "--n-layers", "1", "--n-heads", "2", "--n-kv-heads", "1", "--expert-ffn-dim", "32",
        "--ffn-dim", "64", "--num-experts", "4", "--max-seq-len", "32"]
TINY_TRAIN = ["--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--quiet"]


def tiny_cfg(**kw):
    return ModelConfig.from_preset("tiny-moe", **{**dict(dim=32, n_layers=2, n_heads=2, n_kv_heads=1,
                                                         expert_ffn_dim=32, ffn_dim=64, max_seq_len=32,
                                                         num_experts=4), **kw})


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))


# --------------------------------------------------------------------------- 1. --init takes everything from the checkpoint
@pytest.fixture
def own_tokenizer_ckpt(tmp_path):
    """A small MoE with its own 300-token tokenizer (not the embedded 4096-token one)."""
    from moekit.data.corpus import load_shakespeare

    tok = train_tokenizer(iter([load_shakespeare("train")[:200_000]]), 300)
    torch.manual_seed(0)
    model = Transformer(tiny_cfg(vocab_size=300))
    return moekit.save(model, tok, tmp_path / "base"), tok


@pytest.mark.parametrize("fmt", ["moekit", "hf", "gguf"])
def test_train_init_takes_the_checkpoints_tokenizer_from_any_format(own_tokenizer_ckpt, tmp_path, capsys, fmt):
    base, tok = own_tokenizer_ckpt
    src = {"moekit": base, "hf": tmp_path / "base-hf", "gguf": tmp_path / "base.gguf"}[fmt]
    if fmt != "moekit":
        assert main(["convert", str(base), str(src)]) == 0
    out = tmp_path / f"run-{fmt}"
    assert main(["train", "--init", str(src), "--out", str(out), "--max-steps", "2", *TINY_TRAIN]) == 0, \
        capsys.readouterr().err
    assert load_tokenizer(out / "tokenizer.json").get_vocab() == tok.get_vocab()
    trained, _ = moekit.load(out)
    assert trained.cfg.vocab_size == 300 and trained.cfg.num_experts == 4


def test_train_init_refuses_model_flags_and_a_bad_checkpoint_in_one_line(own_tokenizer_ckpt, tmp_path, capsys):
    base, _ = own_tokenizer_ckpt
    assert main(["train", "--init", str(base), "--out", str(tmp_path / "r"), "--num-experts", "8"]) == 2
    assert "--init takes the model settings from the checkpoint" in capsys.readouterr().err
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    assert main(["train", "--init", str(tmp_path / "broken"), "--out", str(tmp_path / "r2"), *TINY_TRAIN]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "broken" in err
    assert not (tmp_path / "r2").exists()


# --------------------------------------------------------------------------- 2. a failed run leaves nothing behind
@pytest.mark.parametrize("extra", [
    ["--data", "no/such/file.txt"],
    ["--seq-len", "1000"],
    ["--threads", "-2"],
    ["--data", "EMPTY"],
])
def test_a_failed_train_leaves_no_run_directory_and_the_same_command_works_after(tmp_path, capsys, extra):
    if extra == ["--data", "EMPTY"]:
        (tmp_path / "empty.txt").write_text("")
        extra = ["--data", str(tmp_path / "empty.txt")]
    out = tmp_path / "d_zero"
    assert main(["train", "--out", str(out), "--max-steps", "2", *TINY, *TINY_TRAIN, *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert not out.exists()
    assert main(["train", "--out", str(out), "--max-steps", "2", *TINY, *TINY_TRAIN]) == 0  # no "already exists"


def test_a_failed_compare_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--out", str(out), "--max-steps", "2", *TINY, *TINY_TRAIN, "--seq-len", "1000"]) == 2
    assert not out.exists()


def test_resume_refuses_out_and_init(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--max-steps", "2", *TINY, *TINY_TRAIN]) == 0
    capsys.readouterr()
    for flags in (["--out", str(tmp_path / "x")], ["--init", str(run)]):
        assert main(["train", "--resume", str(run), "--max-steps", "4", *flags]) == 2
        err = capsys.readouterr().err
        assert f"drop {flags[0]}" in err and err.count("\n") == 1


def test_ctrl_c_says_what_to_do_for_each_verb(tmp_path, capsys, monkeypatch):
    import moekit.checkpoint
    import moekit.train

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--max-steps", "2", *TINY, *TINY_TRAIN]) == 0
    capsys.readouterr()
    monkeypatch.setattr(moekit.checkpoint, "convert_checkpoint", interrupt)
    assert main(["convert", "a", "b"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"
    monkeypatch.setattr(moekit.train, "train", interrupt)
    assert main(["train", "--out", str(tmp_path / "new"), "--quiet"]) == 130
    assert "nothing was kept: run the same command again" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--max-steps", "4", "--quiet"]) == 130
    assert f"continue from the last checkpoint with: moekit train --resume {run}" in capsys.readouterr().err
    # under torchrun (the layout faked: no process group here) rank 0 alone says it, naming torchrun
    import moekit.cli
    from moekit.parallel import Parallel

    monkeypatch.setattr(moekit.cli, "_parallel", lambda args: Parallel.single())
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["train", "--resume", str(run), "--max-steps", "4", "--quiet"]) == 130
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert main(["train", "--resume", str(run), "--max-steps", "4", "--quiet"]) == 130
    assert f"torchrun --nproc-per-node N -m moekit train --resume {run}" in capsys.readouterr().err


# --------------------------------------------------------------------------- 4. files get plain permissions
def test_checkpoints_and_reports_get_the_permissions_of_a_plain_open(tmp_path):
    old = os.umask(0o022)
    try:
        run = tmp_path / "run"
        train(run, tiny_cfg(), TrainConfig(max_steps=2, batch_size=2, seq_len=16, eval_batches=1, save_every=2),
              progress=False)
        moekit.save(moekit.load(run)[0], load_tokenizer(run / "tokenizer.json"), tmp_path / "copy.gguf")
    finally:
        os.umask(old)
    paths = [p for p in run.rglob("*")] + [tmp_path / "copy.gguf"]
    files = [p for p in paths if p.is_file()]
    dirs = [p for p in paths if p.is_dir()]
    assert files and dirs
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {"0o644"}
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in dirs} == {"0o755"}


# --------------------------------------------------------------------------- 6, 7. demo and help
def test_demo_of_a_huge_preset_counts_it_without_building_it(capsys):
    assert main(["demo", "--preset", "deepseek-v3"]) == 0
    out = capsys.readouterr().out
    total, _ = ModelConfig.from_preset("deepseek-v3").param_counts()
    assert f"{total:,} parameters, matching the count above" in out and "meta device" in out


def test_help_shows_the_presets_values_not_the_dataclass_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "routed experts per MoE layer; 0 = dense model (default: the preset's; tiny-moe: 8)" in text
    assert "(default 0)" not in text.split("--num-experts", 1)[1][:200]


# --------------------------------------------------------------------------- 8. warm-up on short runs
def test_warmup_is_capped_at_a_tenth_of_a_short_run(tmp_path, capsys):
    assert TrainConfig(max_steps=20).effective_warmup == 2 and TrainConfig(max_steps=1000).effective_warmup == 20
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--max-steps", "20", "--log-every", "1", *TINY, *TINY_TRAIN]) == 0
    assert "warm-up capped at 2 steps" in capsys.readouterr().err
    lrs = [r["lr"] for r in read_metrics(run) if "lr" in r]
    assert lrs[1] == pytest.approx(3e-3) and lrs[-1] < lrs[2]  # warm-up over at step 2, then the cosine decays
    from moekit.train.compare import render_report

    assert "warmup 2 steps (capped from 20 at a tenth of the run)" in render_report(
        {"dense_final_val_loss": {"mean": 1.0, "std": 0.0, "min": 1.0, "max": 1.0}, "models": [], "runs": []},
        TrainConfig(max_steps=20))


# --------------------------------------------------------------------------- 9. the balance-loss coefficient
def test_balance_coefficient_means_what_transformers_means_after_conversion():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    cfg = tiny_cfg(n_layers=3, num_experts=4, top_k=2)
    hf_coef = 0.02
    coef = aux_coef_from_hf(hf_coef, cfg)
    assert coef == pytest.approx(0.02 * 2 / 3) and aux_coef_to_hf(dataclasses.replace(cfg, aux_loss_coef=coef)) \
        == pytest.approx(hf_coef)
    logits = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    probs = logits.softmax(-1)
    ids = probs.topk(2, dim=-1).indices
    per_layer = losses.load_balance_loss(probs, ids)
    moekit_loss = coef * 3 * per_layer  # three layers with the same routing: moekit sums them
    hf_loss = hf_coef * load_balancing_loss_func((logits, logits, logits), 4, 2)
    assert moekit_loss.item() == pytest.approx(hf_loss.item(), rel=1e-5)
    mixtral = ModelConfig.from_preset("mixtral-8x7b")
    assert aux_coef_to_hf(mixtral) == pytest.approx(0.02)  # Mixtral's own value, in transformers' terms


# --------------------------------------------------------------------------- 10. evaluation makes no gradients
def test_fused_cross_entropy_under_no_grad_runs_one_matmul_per_chunk():
    from torch.profiler import ProfilerActivity, profile

    h = torch.randn(64, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    y = torch.randint(0, 50, (64,))

    def matmuls(grad: bool) -> int:
        with torch.set_grad_enabled(grad), profile(activities=[ProfilerActivity.CPU]) as prof:
            linear_cross_entropy(h, w, y, chunk=16)
        return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm_", "aten::addmm"))

    assert matmuls(grad=False) == 4  # 4 chunks x the forward product
    assert matmuls(grad=True) == 12  # and the two gradient products per chunk
    with torch.no_grad():
        assert linear_cross_entropy(h, w, y, chunk=16).item() == pytest.approx(
            torch.nn.functional.cross_entropy(h @ w.t(), y).item(), rel=1e-5)


# --------------------------------------------------------------------------- 12. the data cache
def test_tokenized_data_is_cached_in_the_cache_dir_not_beside_out(tmp_path):
    run = tmp_path / "runs" / "a"
    train(run, tiny_cfg(), TrainConfig(max_steps=1, batch_size=2, seq_len=16, eval_batches=1), progress=False)
    assert not (tmp_path / "runs" / ".moekit-cache").exists()
    assert list((tmp_path / "cache").glob("shakespeare-train-*.bin"))


# --------------------------------------------------------------------------- 13. info
def test_info_keeps_a_multi_line_value_whole_and_aligned():
    text = format_info({"path": "p", "format": "hf", "summary": "line one\nline two, which is the second"})
    lines = text.splitlines()
    i = next(n for n, line in enumerate(lines) if line.startswith("summary"))
    assert lines[i].endswith("line one") and lines[i + 1].strip() == "line two, which is the second"
    assert lines[i + 1].index("line two") == lines[i].index("line one")


# --------------------------------------------------------------------------- tests the review asked for
def test_gradient_accumulation_equals_one_big_batch():
    """The trainer's accumulation ((loss + aux) / grad_accum per micro-batch, then clip and step) against
    one pass over the whole batch: the same gradients, and the same parameters after an SGD step.
    (After an Adam step, components whose gradient is ~1e-9 move by +-lr depending on rounding, since
    Adam's first update is about lr * sign(g): parameters there are not a fair comparison.)"""
    cfg = tiny_cfg(router="sigmoid_bias", z_loss_coef=0.0)  # no batch-level aux loss: accumulation is exact
    x = torch.randint(0, cfg.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, cfg.vocab_size, (4, 16), generator=torch.Generator().manual_seed(2))
    grads, params = [], []
    for micro in (4, 2, 1):
        torch.manual_seed(0)
        model = Transformer(cfg)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        accum = 4 // micro
        for i in range(accum):
            out = model(x[i * micro:(i + 1) * micro], labels=y[i * micro:(i + 1) * micro])
            ((out.loss + out.aux_loss) / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
        params.append(dict(model.named_parameters()))
    for g, p in zip(grads[1:], params[1:]):
        for name in grads[0]:
            torch.testing.assert_close(g[name], grads[0][name], rtol=1e-4, atol=1e-7, msg=name)
            torch.testing.assert_close(p[name], params[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_noisy_topk_load_loss_against_a_hand_computed_case():
    cfg = ModelConfig.from_preset("tiny-moe", router="noisy_topk", dim=2, n_heads=1, n_kv_heads=1, num_experts=3,
                                  top_k=1, aux_loss_coef=1.0, z_loss_coef=0.0)
    router = build_router(cfg).train()
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0], [-1.0, 0.0]]))  # clean logits x0, 0, -x0
    x = torch.tensor([[1.0, 0.0], [0.5, 0.0]])
    torch.manual_seed(7)
    noise = torch.randn(2, 3)
    torch.manual_seed(7)
    r = router(x)
    # by hand: std = softplus(0) + 0.01 for every expert; H = clean + noise * std
    std = math.log(2.0) + 0.01
    clean = [[1.0, 0.0, -1.0], [0.5, 0.0, -0.5]]
    phi = lambda z: 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))  # noqa: E731
    load = [0.0, 0.0, 0.0]
    gates = [0.0, 0.0, 0.0]
    for t in range(2):
        h = [clean[t][i] + noise[t, i].item() * std for i in range(3)]
        order = sorted(range(3), key=lambda i: -h[i])
        first, second = h[order[0]], h[order[1]]
        gates[order[0]] += 1.0  # top-1: the kept gate is softmax over one value
        for i in range(3):
            threshold = second if i == order[0] else first  # stay in: beat the 2nd; get in: beat the 1st
            load[i] += phi((clean[t][i] - threshold) / std)

    def cv2(v):
        mean = sum(v) / len(v)
        return sum((a - mean) ** 2 for a in v) / len(v) / mean**2

    assert r.aux_loss.item() == pytest.approx(cv2(gates) + cv2(load), rel=1e-5)
    assert losses.noisy_load_loss(torch.tensor([[0.5, 0.5], [1.0, 0.0]])).item() == pytest.approx(0.25)
