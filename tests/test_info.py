"""``inspect_checkpoint``: the right numbers from headers alone, for every kind of path, and clear errors."""

import json
import struct
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from moekit import ModelConfig, Transformer
from moekit.checkpoint import CheckpointError, save
from moekit.convert.inspect import format_info, inspect_checkpoint, read_safetensors_header

SMALL = dict(vocab_size=256, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=128, expert_ffn_dim=64)


def small_model(preset="tiny-moe", **kw):
    return Transformer(ModelConfig.from_preset(preset, **{**SMALL, **kw}))


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset, kw", [
    ("tiny-moe", {}),
    ("tiny-dense", {}),
    ("tiny-moe", dict(router="sigmoid_bias", num_shared_experts=1, first_dense_layers=1)),  # a float32 buffer too
    ("tiny-moe", dict(router="noisy_topk", tie_embeddings=False, attention_bias=True, qk_norm="head")),
])
def test_moekit_checkpoint_counts(tmp_path, preset, kw):
    model = small_model(preset, **kw)
    save(model, None, tmp_path / "ckpt")
    info = inspect_checkpoint(tmp_path / "ckpt")
    cfg = model.cfg
    assert info["format"] == "moekit" and info["path"] == str(tmp_path / "ckpt")
    assert info["parameters"] == n_params(model) == cfg.param_counts()[0]
    assert info["active_parameters"] == cfg.param_counts()[1]
    assert info["tensors"] == len(model.state_dict())
    assert info["dtype"] == "float32" and info["warnings"] == []
    assert info["weights_bytes"] == (tmp_path / "ckpt" / "model.safetensors").stat().st_size
    assert info["size_bytes"] == sum(f.stat().st_size for f in (tmp_path / "ckpt").iterdir())
    assert info["tokenizer"] is False
    if cfg.num_experts:
        assert (info["num_experts"], info["top_k"], info["router"]) == (cfg.num_experts, cfg.top_k, cfg.router)
        assert info["active_parameters"] < info["parameters"]
        assert "MoE" in info["architecture"]
    else:
        assert info["num_experts"] == 0 and info["active_parameters"] == info["parameters"]
    text = format_info(info)
    assert f"{info['parameters']:,}" in text and "active per token" in text


def test_bf16_dtype_and_format_info(tmp_path):
    model = small_model(router="sigmoid_bias").to(torch.bfloat16)
    save(model, None, tmp_path / "ckpt")
    info = inspect_checkpoint(tmp_path / "ckpt")
    assert info["dtype"] == "bfloat16" and set(info["dtypes"]) == {"bfloat16"}  # the float32 bias is a buffer
    text = format_info(info)
    for expected in ("format", "moekit", "bfloat16", "8 per MoE layer in 2/2 layers, top-2, router sigmoid_bias",
                     "size on disk", "tensors"):
        assert expected in text, text


def test_run_directory_uses_newest_checkpoint(tmp_path):
    run = tmp_path / "run"
    for step, experts in ((2, 4), (4, 8)):
        ckpt = save(small_model(num_experts=experts), None, run / "checkpoints" / f"step-{step}")
        (ckpt / "trainer_state.pt").write_bytes(b"x")
    (run / "checkpoints" / "step-6").mkdir()  # incomplete: ignored
    (run / "config.json").write_text(json.dumps({"model": {}, "train": {}}))
    info = inspect_checkpoint(run)
    assert (info["run"], info["step"], info["checkpoints"], info["num_experts"]) == (str(run), 4, [2, 4], 8)
    assert "step 4" in format_info(info)


def test_errors(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        inspect_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        inspect_checkpoint(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        inspect_checkpoint(tmp_path / "notes.txt")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        inspect_checkpoint(tmp_path / "run")
    ckpt = save(small_model(), None, tmp_path / "ckpt")
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        inspect_checkpoint(ckpt)


def test_corrupt_and_truncated_safetensors(tmp_path):
    ckpt = save(small_model(), None, tmp_path / "ckpt")
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="is truncated"):
        inspect_checkpoint(ckpt)
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        inspect_checkpoint(ckpt)


def test_config_and_weights_disagree(tmp_path):
    ckpt = save(small_model(), None, tmp_path / "ckpt")
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "num_experts": 4}))
    info = inspect_checkpoint(ckpt)
    assert any("shapes the config does not expect" in w for w in info["warnings"])
    assert "warning" in format_info(info)


def test_dispatches_hf_and_gguf(tmp_path, monkeypatch):
    """HF directories and GGUF files go to their converters (stand-ins here), and their keys are mapped
    onto moekit's common ones."""
    moe_cfg = ModelConfig.from_preset("tiny-moe", **SMALL)
    hf = types.ModuleType("moekit.convert.hf")
    hf.inspect_hf = lambda path: {"architecture": "MixtralForCausalLM", "parameters": 10, "num_experts": 8,
                                  "config": moe_cfg.to_dict()}
    gguf = types.ModuleType("moekit.convert.gguf")
    gguf.inspect_gguf = lambda path: {"architecture": "llama", "params_total": 100, "params_active": 100,
                                      "num_experts": 0, "tensor_types": {"Q8_0": 7}, "tokenizer": "gpt2/smollm"}
    monkeypatch.setitem(sys.modules, "moekit.convert.hf", hf)
    monkeypatch.setitem(sys.modules, "moekit.convert.gguf", gguf)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    info = inspect_checkpoint(tmp_path / "hf")
    assert (info["format"], info["architecture"], info["path"]) == ("hf", "MixtralForCausalLM", str(tmp_path / "hf"))
    assert (info["top_k"], info["router"], info["moe_layers"], info["n_layers"]) == (2, "topk", 2, 2)
    (tmp_path / "m.GGUF").write_bytes(b"GGUF")
    info = inspect_checkpoint(tmp_path / "m.GGUF")
    assert (info["format"], info["parameters"], info["active_parameters"]) == ("gguf", 100, 100)
    text = format_info(info)
    assert "tensor types" in text and "Q8_0" in text and "gpt2/smollm" in text and "none (dense)" in text


def test_real_gguf_file(tmp_path):
    """The real GGUF converter's description, through inspect_checkpoint (skipped until it exists)."""
    gguf = pytest.importorskip("moekit.convert.gguf")
    from moekit.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    model = Transformer(ModelConfig.from_preset("tiny-dense", **{**SMALL, "vocab_size": tokenizer.get_vocab_size()}))
    path = gguf.save_gguf(model, tokenizer, tmp_path / "m.gguf")
    info = inspect_checkpoint(path)
    assert info["format"] == "gguf"
    assert info["parameters"] == info["active_parameters"] == n_params(model)
    assert "parameters" in format_info(info)


# --------------------------------------------------------------------------- no materialisation
def test_reads_no_weights(tmp_path, monkeypatch):
    """Every way of loading tensors is made to fail; inspecting must not need any of them."""
    import safetensors
    import safetensors.torch

    ckpt = save(small_model(), None, tmp_path / "ckpt")

    def refuse(*args, **kwargs):
        raise AssertionError("inspect_checkpoint loaded weights")

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(safetensors.torch, "load", refuse)
    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert inspect_checkpoint(ckpt)["parameters"] > 0


def write_sparse_safetensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> int:
    """A valid float32 safetensors file whose data region is a hole: gigabytes in size, none on disk."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 4 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)
    return offset


def test_large_checkpoint_is_described_without_reading_it(tmp_path):
    """A 1.4 GB checkpoint in a fresh process: peak memory grows by far less than the weights."""
    cfg = ModelConfig.from_preset("tiny-moe", vocab_size=32000, dim=1024, n_layers=4, n_heads=8, expert_ffn_dim=2816,
                                  ffn_dim=2816)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    ckpt = tmp_path / "big"
    ckpt.mkdir()
    cfg.to_json(ckpt / "config.json")
    data_bytes = write_sparse_safetensors(ckpt / "model.safetensors", shapes)
    assert data_bytes > 1.2e9
    tensors, _ = read_safetensors_header(ckpt / "model.safetensors")
    assert tensors.keys() == shapes.keys()
    child = (
        "import json, resource, sys\n"
        "from moekit.convert.inspect import inspect_checkpoint\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "info = inspect_checkpoint(sys.argv[1])\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(json.dumps({'grew_kb': peak - base, 'parameters': info['parameters'], 'warnings': info['warnings']}))\n"
    )
    out = subprocess.run([sys.executable, "-c", child, str(ckpt)], capture_output=True, text=True, timeout=120,
                         check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["parameters"] == cfg.param_counts()[0] and result["warnings"] == []
    assert result["grew_kb"] * 1024 < 100e6, result  # vs 1.4 GB of weights
