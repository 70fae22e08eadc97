"""The checkpoint verbs end to end on real files: info, convert (moekit <-> hf <-> gguf), upcycle."""

import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import moekit  # noqa: E402
from moekit.checkpoint import convert_checkpoint, output_format, source_dtype  # noqa: E402
from moekit.cli import main  # noqa: E402
from moekit.config import ConfigError, ModelConfig  # noqa: E402
from moekit.convert.inspect import inspect_checkpoint, read_safetensors_header  # noqa: E402
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
    assert f"({fmt}, {extra[-1] if extra else 'f32'}, " in capsys.readouterr().out  # the source's dtype kept
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


# --------------------------------------------------------------------------- dtypes and sizes
def weights_bytes(directory) -> int:
    return (directory / "model.safetensors").stat().st_size


def test_convert_to_bf16_halves_the_size_and_keeps_the_logits(moe_ckpt, tmp_path, capsys):
    path, model = moe_ckpt
    ids = torch.randint(0, model.cfg.vocab_size, (1, 12))
    assert main(["convert", str(path), str(tmp_path / "f32"), "--format", "hf"]) == 0  # default: the source's f32
    assert main(["convert", str(path), str(tmp_path / "bf16"), "--format", "hf", "--dtype", "bf16"]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.search(r"\(hf, bf16, [\d.]+ KiB\)", out), out  # the written size on the final line
    assert 0.45 < weights_bytes(tmp_path / "bf16") / weights_bytes(tmp_path / "f32") < 0.55
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    back, _ = moekit.load(tmp_path / "bf16")
    assert back.embed.weight.dtype == torch.bfloat16  # Hugging Face directories load in their own dtype
    ref = logits(model, ids)
    ours = logits(back.float(), ids)
    assert (ours - ref).abs().max() < 0.02 * ref.abs().max() and torch.equal(ours.argmax(-1), ref.argmax(-1))
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours, atol=1e-4, rtol=1e-4)  # the same bf16 weights


def test_moekit_output_in_bf16_keeps_the_selection_bias_float32(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny-moe", dim=64, n_layers=2, router="sigmoid_bias")
    model = Transformer(cfg)
    model.layers[0].ffn.router.bias.copy_(torch.linspace(-0.3, 0.3, cfg.num_experts) + 1e-3)  # not bf16-exact
    src = moekit.save(model, load_tokenizer(), tmp_path / "src")
    assert main(["convert", str(src), str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    assert "(moekit, bf16, " in capsys.readouterr().out
    tensors, _ = read_safetensors_header(tmp_path / "bf16" / "model.safetensors")
    assert tensors["layers.0.ffn.router.bias"][0] == "F32" and tensors["embed.weight"][0] == "BF16"
    assert {dtype for dtype, _ in tensors.values()} == {"F32", "BF16"}
    assert source_dtype(tmp_path / "bf16") == "bf16"
    back, _ = moekit.load(tmp_path / "bf16", dtype=torch.bfloat16)
    assert torch.equal(back.layers[0].ffn.router.bias, model.layers[0].ffn.router.bias)
    # Python: the same dtype option, and the model itself is not cast
    moekit.save(model, None, tmp_path / "py", dtype="f16")
    assert read_safetensors_header(tmp_path / "py" / "model.safetensors")[0]["embed.weight"][0] == "F16"
    assert model.embed.weight.dtype == torch.float32
    with pytest.raises(ConfigError, match="bf16, f16, f32"):
        moekit.save(model, None, tmp_path / "bad", dtype="f8")


def test_default_dtype_of_a_gguf_source(moe_ckpt, tmp_path):
    path, _ = moe_ckpt
    for gguf_type, kept in (("f32", "f32"), ("f16", "f16"), ("q8_0", "bf16")):  # quantized: bf16
        gguf = convert_checkpoint(path, tmp_path / f"m-{gguf_type}.gguf", gguf_type=gguf_type).path
        assert source_dtype(gguf) == kept
        out = convert_checkpoint(gguf, tmp_path / f"hf-{gguf_type}", "hf")
        assert out.dtype == kept and out.size_bytes > weights_bytes(out.path)
        assert inspect_checkpoint(out.path)["dtype"] == {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[kept]
    assert source_dtype(path) == "f32"


def test_smollm2_q4_1_gguf_to_hf_in_bf16(smollm2_gguf, tmp_path, capsys):
    """The issue's figures: the 94 MiB Q4_1 file became 516 MiB of float32; bf16 is the default now."""
    assert main(["convert", str(smollm2_gguf), str(tmp_path / "bf16"), "--format", "hf"]) == 0
    out = capsys.readouterr().out
    assert "(hf, bf16, " in out and "134,515,008 parameters" in out
    assert main(["convert", str(smollm2_gguf), str(tmp_path / "f32"), "--format", "hf", "--dtype", "f32"]) == 0
    assert "(hf, f32, 516." in capsys.readouterr().out  # the Q4_1 values, exactly
    size, size_f32 = weights_bytes(tmp_path / "bf16"), weights_bytes(tmp_path / "f32")
    assert 255 * 2**20 < size < 262 * 2**20 and 0.49 < size / size_f32 < 0.51, size  # 134.5M parameters x 2 bytes
    ref, tok = moekit.load(tmp_path / "f32")
    bf16, _ = moekit.load(tmp_path / "bf16", dtype=torch.float32)
    from moekit.data import encode

    ids = torch.tensor([encode(tok, "The capital of France is Paris, a city known for its art and")])
    ref, ours = logits(ref, ids), logits(bf16, ids)
    assert (ours - ref).abs().max() < 0.01 * ref.abs().max() and torch.equal(ours.argmax(-1), ref.argmax(-1))


# --------------------------------------------------------------------------- format, extension and flag checks
@pytest.mark.parametrize("dst, flags, message", [
    ("r1", ["--format", "gguf"], "must end in .gguf", ),
    ("weird.gguf", ["--format", "hf"], "format 'hf' writes a directory, but"),
    ("weird.GGUF", ["--format", "moekit"], "ends in .gguf"),
    ("m.gguf", ["--dtype", "bf16"], "--gguf-type (f32, f16, q8_0, q4_0)"),
    ("hf-dir", ["--format", "hf", "--gguf-type", "q8_0"], "--gguf-type applies to GGUF output"),
    ("moekit-dir", ["--gguf-type", "q4_0"], "moekit output takes --dtype (bf16, f16, f32)"),
])
def test_convert_refuses_contradictions_in_one_line(moe_ckpt, tmp_path, capsys, dst, flags, message):
    path, _ = moe_ckpt
    assert main(["convert", str(path), str(tmp_path / dst), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    if dst == "r1":
        assert f"write {tmp_path / 'r1.gguf'} instead" in err
    assert not (tmp_path / dst).exists()


def test_convert_names_the_supported_gguf_types(moe_ckpt, tmp_path, capsys):
    path, _ = moe_ckpt
    with pytest.raises(SystemExit):
        main(["convert", str(path), str(tmp_path / "m.gguf"), "--gguf-type", "q4_k"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "'q4_k' is not supported; supported: f32, f16, q8_0, q4_0" in err and "llama-quantize" in err


def test_format_follows_the_extension(moe_ckpt, tmp_path, capsys):
    path, model = moe_ckpt
    assert output_format("a/b.gguf") == "gguf" and output_format("a/b") == "moekit" and output_format("x", "hf") == "hf"
    assert main(["convert", str(path), str(tmp_path / "m.gguf"), "--gguf-type", "q4_0"]) == 0
    assert "(gguf, q4_0, " in capsys.readouterr().out
    assert inspect_checkpoint(tmp_path / "m.gguf")["file_type"] == "MOSTLY_Q4_0"
    written = moekit.save(model, load_tokenizer(), tmp_path / "py.gguf")  # Python too: a file, not a directory
    assert written.is_file() and moekit.load(written)[0].cfg.num_experts == model.cfg.num_experts
    with pytest.raises(ConfigError, match="must end in .gguf"):
        moekit.save(model, load_tokenizer(), tmp_path / "py", format="gguf")
