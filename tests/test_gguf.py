"""Tests for moekit.convert.gguf: the q/k layout, export -> import round trips, refusals, corrupt files,
inspection, parity with transformers on a real SmolLM2 GGUF, and llama.cpp running a moekit MoE."""

import json
import re
import sys

import gguf
import numpy as np
import pytest
import torch
from torch.testing import assert_close

import moekit.convert.gguf as gguf_io
from moekit import ConfigError, ModelConfig, Transformer
from moekit.checkpoint import CheckpointError, load, save
from moekit.convert.gguf import (
    check_exportable,
    gguf_pre_tokenizer_name,
    inspect_gguf,
    load_gguf,
    permute_qk,
    save_gguf,
    unpermute_qk,
)
from moekit.data import decode, encode, load_tokenizer
from moekit.data.special import SpecialTokens, guess_special_tokens
from moekit.infer import generate, generate_tokens
from moekit.model.layers import apply_rope, rope_frequencies

TEXTS = ["Hello world! It's a test: don't panic.", "  two spaces,\nnew line\ttab end ", "naïve café, Ünïcödé ✓ 🙂",
         "<|endoftext|>after a special token", "ROMEO:\nBut soft, what light through yonder window breaks?"]


def rope_adjacent_pairs(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """llama.cpp's rope for the llama architecture (mode NORM): rotate pairs (2i, 2i + 1)."""
    Dh = x.shape[-1]
    angles = positions.float()[:, None] * theta ** (-torch.arange(0, Dh, 2).float() / Dh)  # [T, Dh/2]
    cos, sin = angles.cos(), angles.sin()
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def test_permute_qk_turns_rotate_half_into_llama_cpp_adjacent_pairs():
    H, Dh, D, T = 3, 8, 16, 5
    w, x, pos = torch.randn(H * Dh, D), torch.randn(T, D), torch.arange(T)
    cos, sin = rope_frequencies(Dh, pos, 10000.0)
    q_hf = apply_rope((x @ w.T).view(T, H, Dh).transpose(0, 1), cos, sin)  # [H, T, Dh], rotate-half
    q_cpp = rope_adjacent_pairs((x @ permute_qk(w, H).T).view(T, H, Dh).transpose(0, 1), pos, 10000.0)
    # Same rotated values, each head's features interleaved (x0, y0, x1, y1, ...): dot products agree.
    assert_close(q_cpp, q_hf.view(H, T, 2, Dh // 2).transpose(-1, -2).reshape(H, T, Dh))
    assert torch.equal(unpermute_qk(permute_qk(w, H), H), w)
    k = torch.randn(2 * Dh, D)  # GQA: k is permuted with the kv head count
    assert torch.equal(unpermute_qk(permute_qk(k, 2), 2), k)


# --------------------------------------------------------------------------- moekit -> GGUF -> moekit
@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def tiny_model(kind: str, seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    preset = "tiny-moe" if kind == "moe" else "tiny-dense"
    return Transformer(ModelConfig.from_preset(preset, n_layers=2, **kw)).eval()


def logits(model: Transformer, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the reference's logit scale."""
    return float((a - b).abs().max() / b.abs().max())


CONFIG_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "max_seq_len", "rope_theta",
                 "norm_eps", "tie_embeddings", "num_experts", "top_k", "router", "norm_topk_prob")


@pytest.mark.parametrize("kind, dtype, tol", [("moe", "f32", 0.0), ("moe", "f16", 2e-3), ("moe", "q8_0", 2e-2),
                                              ("dense", "f32", 0.0), ("dense", "q8_0", 2e-2)])
def test_round_trip_gives_same_logits_and_tokenizer(tmp_path, tok, kind, dtype, tol):
    model = tiny_model(kind, tie_embeddings=kind == "moe")  # the dense one has its own lm_head
    path = save_gguf(model, tok, tmp_path / f"{kind}.gguf", dtype=dtype)
    loaded, tok2 = load_gguf(path)
    for name in CONFIG_FIELDS:
        assert getattr(loaded.cfg, name) == getattr(model.cfg, name), name
    if model.cfg.num_experts:
        assert loaded.cfg.expert_ffn_dim == model.cfg.expert_ffn_dim
    else:
        assert loaded.cfg.ffn_dim == model.cfg.ffn_dim
    ids = encode(tok, TEXTS[-1])
    if dtype == "f32":  # exact: every weight survives bit for bit
        for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(a, b), name
        assert torch.equal(logits(loaded, ids), logits(model, ids))
    else:
        assert rel_diff(logits(loaded, ids), logits(model, ids)) < tol
    for text in TEXTS:
        assert encode(tok2, text) == encode(tok, text)
        assert decode(tok2, encode(tok2, text)) == text


def test_special_tokens_round_trip(tmp_path, tok):
    model = tiny_model("dense")
    loaded, _ = load_gguf(save_gguf(model, tok, tmp_path / "guessed.gguf"))
    # a model no loader made: guessed from names, and <|endoftext|> doubles as BOS (GPT-2; llama.cpp needs one)
    assert loaded.special_tokens == SpecialTokens(bos_id=0, eos_ids=(0,), pad_id=1)
    assert loaded.chat_template is None
    model.special_tokens = SpecialTokens(bos_id=1, eos_ids=(5, 0), pad_id=0, add_bos=True, chat_template="{{ x }}")
    model.chat_template = "{{ x }}"
    path = save_gguf(model, tok, tmp_path / "stated.gguf")
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.eot_token_id"].contents() == 0  # the second stop id: llama.cpp stops on it too
    loaded, tok2 = load_gguf(path)
    assert loaded.special_tokens == model.special_tokens and loaded.chat_template == "{{ x }}"
    assert tok2.encode("hi").ids[0] == 1  # add_bos: the rebuilt tokenizer prepends BOS, as llama.cpp does


def test_export_refuses_special_token_ids_outside_the_vocabulary(tmp_path, tok):
    model = tiny_model("dense")
    model.special_tokens = SpecialTokens(bos_id=0, eos_ids=(4096,))
    with pytest.raises(ConfigError, match=r"special token ids \{'eos': 4096\} are outside the model's vocab_size=4096"):
        save_gguf(model, tok, tmp_path / "x.gguf")


def test_loads_per_expert_tensors_of_older_mixtral_files(tmp_path, tok, monkeypatch):
    """Files from before stacked experts hold ``blk.{i}.ffn_gate.{e}.weight`` per expert."""
    model = tiny_model("moe")
    stacked = gguf_io._export_tensors

    def per_expert(m):
        out = []
        for name, w in stacked(m):
            match = re.fullmatch(r"blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight", name)
            out += [(f"blk.{match[1]}.ffn_{match[2]}.{e}.weight", w[e]) for e in range(len(w))] if match else [(name, w)]
        return out

    monkeypatch.setattr(gguf_io, "_export_tensors", per_expert)
    path = save_gguf(model, tok, tmp_path / "old.gguf")
    assert "blk.0.ffn_gate.7.weight" in {t.name for t in gguf.GGUFReader(path).tensors}
    loaded, _ = load_gguf(path)
    assert torch.equal(logits(loaded, [5, 6, 7]), logits(model, [5, 6, 7]))


@pytest.mark.parametrize("overrides, named", [
    (dict(router="expert_choice"), "router='expert_choice'"),
    (dict(router="noisy_topk"), "router='noisy_topk'"),
    (dict(router="switch", top_k=1), "router='switch'"),
    (dict(router="sigmoid_bias"), "router='sigmoid_bias'"),
    (dict(norm_topk_prob=False), "norm_topk_prob=False"),
    (dict(eval_capacity_factor=1.25), "eval_capacity_factor=1.25"),
    (dict(routed_scaling_factor=2.0), "routed_scaling_factor=2.0"),
    (dict(num_shared_experts=1), "num_shared_experts=1"),
    (dict(first_dense_layers=1), "first_dense_layers=1"),
    (dict(qk_norm="head"), "qk_norm='head'"),
    (dict(attention_bias=True), "attention_bias=True"),
])
def test_export_refuses_what_llama_cpp_cannot_express(tmp_path, tok, overrides, named):
    cfg = ModelConfig.from_preset("tiny-moe", n_layers=2, **overrides)
    with pytest.raises(ConfigError, match="Supported: ") as err:
        check_exportable(cfg)
    assert named in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError):
        save_gguf(Transformer(cfg), tok, tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_export_refuses_a_tokenizer_llama_cpp_cannot_split_like(tmp_path, tok):
    from tokenizers import pre_tokenizers

    assert gguf_pre_tokenizer_name(tok) == "gpt-2"
    other = load_tokenizer()
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ConfigError, match="pre-tokenizer"):
        save_gguf(tiny_model("moe"), other, tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


def write_minimal_gguf(path, arch: str) -> None:
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(8, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_unsupported_architecture_is_named_with_the_supported_ones(tmp_path):
    path = tmp_path / "other.gguf"
    write_minimal_gguf(path, "qwen2moe")
    with pytest.raises(CheckpointError, match=r"architecture 'qwen2moe' is not supported; supported: \['llama'\]"):
        load_gguf(path)
    info = inspect_gguf(path)
    assert info["architecture"] == "qwen2moe" and info["supported"] is False and "qwen2moe" in info["error"]


def test_corrupt_truncated_and_missing_files_name_the_file(tmp_path, tok):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 10)
    truncated = tmp_path / "truncated.gguf"
    data = save_gguf(tiny_model("moe"), tok, tmp_path / "good.gguf").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    for path in (garbage, truncated, tmp_path / "missing.gguf"):
        with pytest.raises(CheckpointError, match=re.escape(str(path))):
            load_gguf(path)


def test_an_unknown_gguf_version_is_named_with_the_supported_ones(tmp_path, tok):
    data = bytearray(save_gguf(tiny_model("dense"), tok, tmp_path / "good.gguf").read_bytes())
    for version, hint in ((1, ""), (0x03000000, r" \(a big-endian file\?\)")):
        data[4:8] = version.to_bytes(4, "little")
        (tmp_path / "other.gguf").write_bytes(data)
        with pytest.raises(CheckpointError, match=rf"other.gguf: GGUF version {version}{hint} is not supported; "
                                                  r"supported: little-endian versions \[2, 3\]"):
            load_gguf(tmp_path / "other.gguf")


def test_inspect_reads_metadata_and_tensor_types(tmp_path, tok):
    model = tiny_model("moe")
    info = inspect_gguf(save_gguf(model, tok, tmp_path / "m.gguf", dtype="q8_0"))
    total, active = model.cfg.param_counts()
    assert (info["architecture"], info["supported"], info["file_type"]) == ("llama", True, "MOSTLY_Q8_0")
    assert (info["params_total"], info["params_active"], info["params_in_file"]) == (total, active, total)
    assert (info["num_experts"], info["experts_per_token"], info["vocab_size"]) == (8, 2, 4096)
    assert set(info["tensor_types"]) == {"Q8_0", "F32"} and info["tokenizer"] == "gpt2/gpt-2"
    assert ModelConfig.from_dict(info["config"]).num_experts == 8


@pytest.mark.parametrize("tied", [True, False])
def test_q4_0_export_stores_4_bit_matrices_and_an_8_bit_head(tmp_path, tok, tied):
    """Every matrix is Q4_0 except the output projection (Q8_0, as llama-quantize keeps it above 4 bits);
    norms and the router stay F32; each stored tensor is exactly gguf-py's quantization of the export."""
    model = tiny_model("moe", tie_embeddings=tied)
    path = save_gguf(model, tok, tmp_path / "m.gguf", dtype="q4_0")
    info = inspect_gguf(path)
    assert info["file_type"] == "MOSTLY_Q4_0" and info["tensor_types"]["Q8_0"] == 1
    assert set(info["tensor_types"]) == {"Q4_0", "Q8_0", "F32"}
    assert path.stat().st_size < 0.75 * save_gguf(model, tok, tmp_path / "q8.gguf", dtype="q8_0").stat().st_size
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
    Q = gguf.GGMLQuantizationType
    for name, w in gguf_io._export_tensors(model):
        t = stored[name]
        want = (Q.F32 if w.dim() == 1 or name.endswith("ffn_gate_inp.weight")
                else Q.Q8_0 if name == ("token_embd.weight" if tied else "output.weight") else Q.Q4_0)
        assert t.tensor_type == want, name
        rows = w.reshape(-1, w.shape[-1]).numpy()
        assert np.array_equal(gguf.quants.dequantize(t.data, want).reshape(rows.shape),
                              gguf.quants.dequantize(gguf.quants.quantize(rows, want), want)), name


def test_export_names_the_supported_types(tmp_path, tok):
    with pytest.raises(ConfigError, match=r"'q4_k' is not supported; supported: f32, f16, q8_0, q4_0"):
        save_gguf(tiny_model("dense"), tok, tmp_path / "m.gguf", dtype="q4_k")


# --------------------------------------------------------------------------- a real model: SmolLM2-135M
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return load_gguf(smollm2_gguf, keep_quantized=False)  # dequantised: the parity reference


@pytest.fixture(scope="module")
def smollm2_quantized(smollm2_gguf):
    return load_gguf(smollm2_gguf)  # the default: Q4_1 stays int4, Q8_0 stays int8 with its block scales


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_gguf):
    """transformers' own GGUF import of the same file (its dequantisation, its tokenizer conversion)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF files")
    kw = dict(gguf_file=smollm2_gguf.name, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, dtype=torch.float32, **kw)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, **kw)


def test_smollm2_logits_match_transformers(smollm2, hf_smollm2):
    (model, tok), (hf_model, _) = smollm2, hf_smollm2
    assert model.cfg.num_experts == 0 and model.cfg.tie_embeddings
    ids = encode(tok, PROMPT + " Paris, and the capital of Germany is Berlin.")
    ours = logits(model, ids)
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0]
    assert rel_diff(ours, ref) < 1e-3
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_smollm2_tokenizer_matches_transformers_conversion(smollm2, hf_smollm2):
    (_, tok), (_, hf_tok) = smollm2, hf_smollm2
    for text in [*TEXTS, "<|im_start|>user\nHi!<|im_end|>"]:
        assert encode(tok, text) == hf_tok.encode(text, add_special_tokens=False), text
    # The file's pre-type "smollm" splits every digit (llama.cpp's SMOLLM regexes, like SmolLM2's own
    # tokenizer.json); transformers' GGUF conversion does not know that pre-type, so digits are checked here.
    assert [decode(tok, [i]) for i in encode(tok, "in 2024")] == ["in", " ", "2", "0", "2", "4"]


def test_smollm2_special_tokens_come_from_its_metadata(smollm2):
    model, tok = smollm2
    special = model.special_tokens
    assert special.eos_ids[0] == 2 and tok.id_to_token(2) == "<|im_end|>"  # not <|endoftext|> (0)
    assert (special.bos_id, special.pad_id, special.add_bos) == (1, 2, False)
    assert special.chat_template.startswith("{% for message in messages %}")
    assert model.chat_template == special.chat_template
    assert guess_special_tokens(tok).eos_ids[0] == 0  # what a guess by name would have stopped on


@pytest.fixture(scope="module")
def smollm2_hf(smollm2, tmp_path_factory):
    model, tok = smollm2
    return save(model, tok, tmp_path_factory.mktemp("smollm2") / "hf", format="hf")


def test_smollm2_special_tokens_survive_hf(smollm2, smollm2_hf):
    model, _ = smollm2
    config = json.loads((smollm2_hf / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    assert json.loads((smollm2_hf / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"
    hf_model, hf_tok = load(smollm2_hf)
    assert hf_model.special_tokens == model.special_tokens and hf_model.chat_template == model.chat_template
    assert hf_tok.get_vocab_size() == 49152


def test_smollm2_special_tokens_survive_hf_to_gguf(smollm2, smollm2_hf, tmp_path):
    model, _ = smollm2
    hf_model, hf_tok = load(smollm2_hf)
    back, _ = load(save(hf_model.float(), hf_tok, tmp_path / "smol.gguf", format="gguf"))  # as `moekit convert`
    assert back.special_tokens == model.special_tokens and back.chat_template == model.chat_template


def test_smollm2_greedy_answer_is_paris(smollm2):
    model, tok = smollm2
    text = generate(model, tok, PROMPT, max_new_tokens=8, temperature=0)
    assert "Paris" in text, text


def test_smollm2_inspect_and_reexport(tmp_path, smollm2_gguf, smollm2):
    info = inspect_gguf(smollm2_gguf)
    assert info["architecture"] == "llama" and "Q4_1" in info["tensor_types"] and info["num_experts"] == 0
    assert info["params_total"] == info["params_active"] == info["params_in_file"]
    assert 130e6 < info["params_total"] < 140e6 and info["tokenizer"] == "gpt2/smollm"
    model, tok = smollm2  # re-quantising Q4_1 values to Q8_0: lossy, but the next token stays
    loaded, tok2 = load_gguf(save_gguf(model, tok, tmp_path / "smol.gguf", dtype="q8_0"), keep_quantized=False)
    ids = encode(tok, PROMPT)
    ours, ref = logits(loaded, ids), logits(model, ids)
    assert rel_diff(ours, ref) < 5e-2 and ours[-1].argmax() == ref[-1].argmax()
    assert encode(tok2, "in 2024, naïve") == encode(tok, "in 2024, naïve")


# --------------------------------------------------------------------------- llama.cpp runs a moekit MoE
@pytest.mark.parametrize("dtype", ["f32", "q8_0", "q4_0"])
def test_llama_cpp_runs_exported_moe_like_moekit(tmp_path, tok, dtype):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'moekit[llamacpp]')")
    model = tiny_model("moe", init_std=0.1)  # mixtral-style (topk, norm_topk_prob=True); 0.1: decisive logits
    path = save_gguf(model, tok, tmp_path / "tiny-moe.gguf", dtype=dtype)
    prompt = "ROMEO:\nBut soft, what light"
    ids = encode(tok, prompt)
    llm = llama_cpp.Llama(str(path), n_ctx=128, logits_all=False, verbose=False, type_k=0, type_v=0)  # 0: F32 cache
    assert llm.tokenize(prompt.encode(), add_bos=False, special=False) == ids  # no BOS: moekit never adds one
    llm.eval(ids)
    cpp_last = torch.from_numpy(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1),
                                                      shape=(llm.n_vocab(),)).copy())
    if dtype != "f32":  # llama.cpp also rounds activations to 8 bits; compare with the same quantized weights
        # (measured: 1.4% for Q8_0, 1.9% for Q4_0; 4-bit weights move the logits 40-70% from float32 in a
        # random tiny model, so this compares the two runtimes, not the quantization)
        assert rel_diff(cpp_last, logits(load_gguf(path)[0], ids)[-1]) < 5e-2
        return
    assert rel_diff(cpp_last, logits(model, ids)[-1]) < 1e-5
    ours = [int(t[0]) for t in generate_tokens(model, ids, max_new_tokens=16, temperature=0)]
    llm.reset()
    theirs = []
    for token in llm.generate(ids, temp=0.0, repeat_penalty=1.0):  # temp 0: llama.cpp's greedy sampler
        theirs.append(token)
        if len(theirs) == len(ours):
            break
    assert theirs == ours and len(set(ours)) > 4  # a varied continuation, not one token repeated


# --------------------------------------------------------------------------- kept quantized
def test_smollm2_kept_quantized_matches_the_dequantized_path(smollm2, smollm2_quantized, smollm2_gguf):
    from moekit.quant import QuantizedWeight, quantized_weights

    (ref_model, tok), (model, _) = smollm2, smollm2_quantized
    weights = quantized_weights(model)
    assert {w.bits for w in weights.values()} == {4, 8}  # Q4_1 blocks, and the Q8_0 embedding / tied head
    assert isinstance(model.embed.weight, QuantizedWeight) and model.lm_head is None
    held = sum(w.nbytes() for w in weights.values()) + sum(p.numel() * p.element_size() for p in model.parameters())
    assert held <= 1.3 * smollm2_gguf.stat().st_size  # the model holds about the file's size (0.96x measured)
    # Q4_1 maps exactly onto int4 (scale d, zero m + 8d): every int4 weight dequantises to the reference's
    # float weight up to the bfloat16 rounding of its scale and zero point.
    q = model.layers[3].ffn.down_proj.weight.dequantize()
    assert rel_diff(q, ref_model.layers[3].ffn.down_proj.weight) < 1e-2
    ids = encode(tok, PROMPT + " Paris, and the capital of Germany is Berlin.")
    ours, ref = logits(model, ids), logits(ref_model, ids)
    # Stated bound: bfloat16 activations, scales and zero points in the int8/int4 kernels give <= 5% of
    # the logit scale; the next-token choices agree.
    assert rel_diff(ours, ref) < 0.05
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def reference_weights(path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """llama.cpp's own dequantization (gguf-py's) of every Q8_0 matrix, by moekit name, q/k un-permuted."""
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
    names = gguf_io._expected_gguf_names(cfg)
    for i in range(cfg.n_layers):
        if cfg.is_moe_layer(i):
            names[f"layers.{i}.ffn.experts.down_proj"] = f"blk.{i}.ffn_down_exps.weight"
    out = {}
    for name, gguf_name in names.items():
        t = stored[gguf_name]
        if t.tensor_type == gguf.GGMLQuantizationType.Q8_0:
            w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
            w = w.reshape(tuple(int(n) for n in reversed(t.shape.tolist())))
            heads = {"attn.q_proj.weight": cfg.n_heads, "attn.k_proj.weight": cfg.n_kv_heads}
            out[name] = next((unpermute_qk(w, h) for k, h in heads.items() if name.endswith(k)), w)
    return out


def test_q8_0_import_keeps_the_block_scales(tmp_path, tok):
    """Q8_0 weights load as int8 with llama.cpp's float16 scale per block of 32: each dequantizes to exactly
    what llama.cpp computes (q * d in float32), also in a row whose one block is 50x the others (where
    one scale per row, as before, multiplied the file's error by ~10)."""
    from moekit.quant import quantized_weights

    model = tiny_model("dense", tie_embeddings=False)
    with torch.no_grad():
        model.layers[1].ffn.down_proj.weight[5, 64:96] *= 50
    path = save_gguf(model, tok, tmp_path / "m.gguf", dtype="q8_0")
    loaded, _ = load_gguf(path)
    weights, ref = quantized_weights(loaded), reference_weights(path, loaded.cfg)
    assert set(weights) == set(ref) and len(ref) == 2 * 7 + 2  # every matrix, the embedding and the head
    for name, w in weights.items():
        assert w.grouped_int8 and w.group_size == 32, name
        assert torch.equal(w.dequantize(), ref[name]), name
    ids = encode(tok, TEXTS[-1])
    float_ref, _ = load_gguf(path, keep_quantized=False)  # gguf-py's dequantization, float32 kernels
    # kernels: activations and scales rounded to bfloat16 (2^-9 each), bfloat16 output; the same for the
    # engine's runner (fused q/k/v and gate/up from grouped rows, the tied head's rows gathered)
    from moekit.infer.runner import Runner

    with torch.inference_mode():
        ran = Runner(loaded, 1, len(ids))(torch.tensor([ids]), [0], [0], all_logits=True)[0]
    ref = logits(float_ref, ids)
    assert rel_diff(logits(loaded, ids), ref) < 1e-2 and rel_diff(ran, ref) < 1e-2


def test_a_q8_0_import_saves_loads_offloads_and_exports_its_blocks_unchanged(tmp_path, tok, capsys):
    from moekit.cli import main
    from moekit.infer.offload import load_offloaded
    from moekit.quant import quantized_weights

    path = save_gguf(tiny_model("moe"), tok, tmp_path / "m.gguf", dtype="q8_0")
    model, _ = load_gguf(path)
    assert model.quantization == {"bits": 8, "group_size": 32, "source": "gguf"}
    save(model, tok, tmp_path / "ck")
    back, _ = load(tmp_path / "ck")
    ours, theirs = quantized_weights(model), quantized_weights(back)
    assert set(ours) == set(theirs) and "layers.1.ffn.experts.gate_up_proj" in ours
    for name, w in ours.items():
        assert theirs[name].grouped_int8 and torch.equal(theirs[name].int8_values(), w.int8_values()), name
        assert theirs[name].scale.dtype == torch.float16 and torch.equal(theirs[name].scale, w.scale), name
    ids = encode(tok, TEXTS[-1])
    assert torch.equal(logits(back, ids), logits(model, ids))
    off_model, _, _ = load_offloaded(tmp_path / "ck", max_resident_experts=2)  # experts read from the file
    assert torch.equal(logits(off_model, ids), logits(model, ids))
    assert main(["info", str(tmp_path / "ck")]) == 0 and "int8" in capsys.readouterr().out
    # back to GGUF: the same blocks, byte for byte
    assert main(["convert", str(tmp_path / "ck"), str(tmp_path / "again.gguf"), "--gguf-type", "q8_0"]) == 0
    before = {t.name: t for t in gguf.GGUFReader(path).tensors}
    after = {t.name: t for t in gguf.GGUFReader(tmp_path / "again.gguf").tensors}
    for name, t in before.items():
        assert after[name].tensor_type == t.tensor_type and np.array_equal(after[name].data, t.data), name
    assert main(["quantize", str(tmp_path / "ck"), str(tmp_path / "q4"), "--bits", "4"]) == 0
    assert load(tmp_path / "q4")[0].quantization["bits"] == 4


# --------------------------------------------------------------------------- peak memory of a load
def peak_of_load(path) -> dict:
    """``benchmarks/gguf_load_memory.py`` on ``path``: a fresh process loads it and generates 8 tokens."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "gguf_load_memory.py"), str(path), "--json"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the RSS high-water mark from /proc")
def test_loading_a_gguf_peaks_near_the_files_size(tmp_path, tok, smollm2_gguf):
    """Loading the 98 MB SmolLM2 Q4_1 file peaks at <= 1.3x the file above what loading a ~1 MB one costs.

    The difference of two loads measures what grows with the file (was 5.3x: gguf-py's reader built
    ~160 MB of Python objects for the metadata, and whole-tensor temporaries); the tiny load carries the
    fixed costs (~22 MB here: library code pages the load touches first, the tokenizer's own tables), so
    the bound holds on any machine whatever those are. Measured 1.18x: the model itself is 1.05x the
    file (the Q8_0 embedding keeps a bfloat16 kernel scale beside its float16 one), the rest is a
    larger vocabulary and one chunk's temporaries. Generation after the load is the runner's business.
    """
    small = save_gguf(tiny_model("dense"), tok, tmp_path / "small.gguf", dtype="q4_0")
    big, tiny = peak_of_load(smollm2_gguf), peak_of_load(small)
    assert "Paris" in big["text"]  # the figures are for a model that works
    grew = (big["load_peak_bytes"] - tiny["load_peak_bytes"]) / (big["file_bytes"] - tiny["file_bytes"])
    assert grew <= 1.3, f"peak RSS of the load grew {grew:.2f}x the file's size ({big} vs {tiny})"
