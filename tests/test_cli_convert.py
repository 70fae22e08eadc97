"""The checkpoint verbs end to end on real files: info, convert (moekit <-> hf <-> gguf), upcycle."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import moekit  # noqa: E402
from moekit.cli import main  # noqa: E402
from moekit.config import ModelConfig  # noqa: E402
from moekit.data import load_tokenizer  # noqa: E402
from moekit.model import Transformer  # noqa: E402


@pytest.fixture
def moe_ckpt(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny-moe", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, expert_ffn_dim=32,
                                  init_std=0.1)
    model = Transformer(cfg)
    return moekit.save(model, load_tokenizer(), tmp_path / "moe"), model


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids).logits


def test_info_prints_counts_without_loading(moe_ckpt, capsys):
    path, model = moe_ckpt
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    total, active = model.cfg.param_counts()
    from moekit.summary import human

    assert f"({total:,})" in out and f"{human(active)} active per token" in out and "moekit" in out
    assert main(["info", str(path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("fmt, dst, extra", [("hf", "hf-dir", []), ("gguf", "m.gguf", ["--gguf-type", "f32"])])
def test_convert_round_trip_keeps_logits(moe_ckpt, tmp_path, capsys, fmt, dst, extra):
    path, model = moe_ckpt
    out = tmp_path / dst
    assert main(["convert", str(path), str(out), "--format", fmt, *extra]) == 0
    assert f"({fmt})" in capsys.readouterr().out
    back, tok = moekit.load(out)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 12))
    torch.testing.assert_close(logits(back, ids), logits(model, ids), atol=1e-4, rtol=1e-4)
    assert tok is not None and tok.get_vocab_size() == model.cfg.vocab_size
    assert main(["convert", str(path), str(out), "--format", fmt, *extra]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err


def test_convert_refuses_routers_without_equivalent(tmp_path, capsys):
    cfg = ModelConfig.from_preset("tiny-moe", dim=64, n_layers=2, router="expert_choice")
    path = moekit.save(Transformer(cfg), load_tokenizer(), tmp_path / "ec")
    assert main(["convert", str(path), str(tmp_path / "out"), "--format", "hf"]) == 2
    err = capsys.readouterr().err
    assert "expert_choice" in err and "topk" in err and "Traceback" not in err


def test_upcycle_cli_gives_the_dense_outputs(tmp_path, capsys):
    torch.manual_seed(0)
    dense = Transformer(ModelConfig.from_preset("tiny-dense", dim=64, n_layers=2, init_std=0.1))
    src = moekit.save(dense, load_tokenizer(), tmp_path / "dense")
    dst = tmp_path / "moe"
    assert main(["upcycle", str(src), str(dst), "--experts", "4", "--top-k", "2"]) == 0
    assert "moekit train --init" in capsys.readouterr().out
    moe, _ = moekit.load(dst)
    assert moe.cfg.num_experts == 4 and moe.cfg.top_k == 2
    ids = torch.randint(0, dense.cfg.vocab_size, (2, 10))
    torch.testing.assert_close(logits(moe, ids), logits(dense, ids), atol=1e-5, rtol=1e-5)
    assert main(["upcycle", str(dst), str(tmp_path / "again"), "--experts", "4"]) == 2
    assert "already" in capsys.readouterr().err.lower()
