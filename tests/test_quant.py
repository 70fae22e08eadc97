"""Weight-only quantization: the math against hand bounds, PyTorch's kernels against the dequantized
weights, the kernel layout inverted exactly, quantized models through save/load, the engine and the CLI."""

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

import moekit
from moekit import ModelConfig, Transformer
from moekit.checkpoint import CheckpointError
from moekit.cli import main
from moekit.data import load_tokenizer
from moekit.infer import Engine, SamplingParams
from moekit.infer.runner import Runner
from moekit.quant import (
    QuantizationError,
    QuantizedWeight,
    cat_rows,
    dequantize_int4,
    dequantize_int8,
    pack_nibbles,
    quantize_int4,
    quantize_int8,
    quantize_model,
    select_rows,
    unpack_nibbles,
)


def test_int8_per_channel_error_is_at_most_half_a_step():
    w = torch.randn(48, 80) * torch.linspace(0.1, 3, 48)[:, None]  # rows of very different scales
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (48,)
    assert (dequantize_int8(q, scale) - w).abs().le(scale[:, None] / 2 + 1e-6).all()
    assert q.abs().max() == 127  # every row uses its full range


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_groups_error_is_at_most_half_a_step(group):
    w = torch.randn(24, 256)
    q, scale, zero = quantize_int4(w, group)
    assert q.max() <= 15 and scale.shape == (24, 256 // group)
    err = (dequantize_int4(q, scale, zero) - w).abs().reshape(24, -1, group)
    assert err.le(scale[..., None] / 2 + 1e-5).all()
    with pytest.raises(QuantizationError, match="group_size=128 does not divide the input width 96"):
        quantize_int4(torch.randn(4, 96), 128)


def test_nibbles_round_trip():
    q = torch.randint(0, 16, (5, 7, 64), dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(q)), q)


# Every weight shape the tests' models and the decode benchmark use: [N, K] with K the input width.
SHAPES = [(64, 64), (192, 64), (64, 96), (4096, 64), (1024, 512), (2048, 512), (512, 1024), (96, 64)]


def grouped_int8(N: int, K: int, seed: int = 0, outlier: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0-like values: int8 [N, K] over the full range and one float16 scale per 32 inputs, spread over
    three decades, with one block per row 50x larger (the case a per-row scale handles worst)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 128, (N, K), generator=gen, dtype=torch.int8)
    scale = torch.rand(N, K // 32, generator=gen) * 10 ** (-3 * torch.rand(N, K // 32, generator=gen)) * 0.01
    if outlier:
        scale[torch.arange(N), torch.randint(0, K // 32, (N,), generator=gen)] *= 50
    return q, scale.half()


@pytest.mark.parametrize("bits", [8, 4, "8g"])
@pytest.mark.parametrize("N, K", SHAPES)
def test_kernels_match_the_dequantized_weights(bits, N, K):
    torch.manual_seed(N + K)
    w = torch.randn(N, K) * 0.05
    qw = QuantizedWeight.from_int8(*grouped_int8(N, K)) if bits == "8g" else QuantizedWeight.quantize(w, bits, 32)
    for M in (1, 5, 40):
        x = torch.randn(M, K)
        ref = F.linear(x, qw.dequantize())
        # The kernels read activations, scales (and zero points) in bfloat16 and write bfloat16: each
        # rounding is at most 2^-8 relative, summed over K, plus the output's own rounding.
        wabs = qw.dequantize().abs()
        if bits == 4:  # w = (q - 8) * scale + zero: the rounding of scale and zero scales with 8|s| + |z|
            scale, zero = qw.scales_zeros()
            wabs = wabs + (8 * scale + zero.abs()).repeat_interleave(K // scale.shape[-1], dim=-1)
        bound = (x.abs() @ wabs.t()) * 2**-7 + ref.abs() * 2**-8 + 1e-4
        assert ((qw.linear(x) - ref).abs() <= bound).all()
    if bits == 4:  # the kernel's private layout is inverted exactly
        q, _, _ = quantize_int4(w, 32)
        assert torch.equal(qw.int4_values(), q)


@pytest.mark.parametrize("N, K", [(64, 64), (4096, 64), (96, 96), (40, 64), (7, 32), (200, 1024)])
def test_grouped_int8_keeps_every_value_and_scale(N, K):
    """Grouped int8 lives in the int4 kernel's layout (two nibble planes); rows not a multiple of 16 are
    padded. The values, the float16 scales and the rows read for an embedding come back exactly."""
    q, scale = grouped_int8(N, K)
    w = QuantizedWeight.from_int8(q, scale)
    assert w.grouped_int8 and w.group_size == 32
    exact = (q.float().reshape(N, -1, 32) * scale.float()[..., None]).reshape(N, K)  # float32 holds q * d exactly
    assert torch.equal(w.int8_values(), q) and torch.equal(w.dequantize(), exact)
    ids = torch.tensor([[0, N - 1], [N // 2, 0]])
    assert torch.equal(w.embedding(ids), exact[ids])
    stacked = QuantizedWeight.from_int8(torch.stack([q, q.flip(0)]), torch.stack([scale, scale.flip(0)]))
    assert torch.equal(stacked[1].int8_values(), q.flip(0)) and torch.equal(stacked[1].scale, scale.flip(0))


def test_the_int4_layout_is_recovered_without_a_table_per_weight():
    """The packed layout is kept as one tile's row order (a few dozen numbers per shape, in a bounded
    cache), not as an int64 table of N * K entries (470 MB for one 14336 x 4096 weight)."""
    from moekit import quant

    assert not hasattr(quant, "_LAYOUTS")
    for rows, width in ((14336, 4096), (4096, 64), (48, 96), (16, 2)):
        tiles = quant._tile_layout(rows, width)
        assert tiles is not None and tiles.order.numel() == tiles.rows <= 64 and tiles.tail_order.numel() < tiles.rows
        assert tiles.order.element_size() == 2
    assert quant._tile_layout.cache_info().maxsize == quant._LAYOUT_CACHE <= 64
    q, scale, zero = quantize_int4(torch.randn(4100, 64), 32)  # 4100 rows: padded to 4112, a short last tile
    assert torch.equal(QuantizedWeight.from_int4(q, scale, zero).int4_values(), q)


def test_a_layout_without_the_tiled_form_falls_back_to_a_full_table(monkeypatch):
    """Should a PyTorch build pack int4 some other way, values still come back exactly (slower, and with
    a table for the call's duration only)."""
    from moekit import quant

    q, scale, zero = quantize_int4(torch.randn(96, 64), 32)
    q8, s8 = grouped_int8(48, 64)
    monkeypatch.setattr(quant, "_tile_layout", lambda rows, width: None)
    w, w8 = QuantizedWeight.from_int4(q, scale, zero), QuantizedWeight.from_int8(q8, s8)
    assert torch.equal(w.int4_values(), q) and torch.equal(w8.int8_values(), q8)
    assert torch.equal(w8.embedding(torch.tensor([3, 47])), w8.dequantize()[[3, 47]])


@pytest.mark.parametrize("bits", [8, 4, "8g"])
def test_rows_move_exactly_for_fused_projections(bits):
    a, b = torch.randn(32, 64), torch.randn(16, 64)
    if bits == "8g":
        qa, qb = QuantizedWeight.from_int8(*grouped_int8(32, 64)), QuantizedWeight.from_int8(*grouped_int8(16, 64, 1))
    else:
        qa, qb = QuantizedWeight.quantize(a, bits, 32), QuantizedWeight.quantize(b, bits, 32)
    perm = torch.randperm(32)
    fused = cat_rows([select_rows(qa, perm), qb])
    assert torch.equal(fused.dequantize(), torch.cat([qa.dequantize()[perm], qb.dequantize()]))


def test_stacked_experts_index_to_views():
    w = torch.randn(4, 64, 96)
    for bits in (8, 4):
        qw = QuantizedWeight.quantize(w, bits, 32)
        assert torch.equal(qw[2].dequantize(), qw.dequantize()[2])
        assert qw[2].q.data_ptr() != qw[1].q.data_ptr()
        assert qw[2].q.untyped_storage().data_ptr() == qw.q.untyped_storage().data_ptr()  # a view


def test_bad_settings_are_named():
    with pytest.raises(QuantizationError, match=r"bits=3 is not supported; choose one of \[8, 4\]"):
        QuantizedWeight.quantize(torch.randn(4, 64), 3)
    with pytest.raises(QuantizationError, match=r"group_size=48 is not supported for int4"):
        QuantizedWeight.quantize(torch.randn(4, 96), 4, 48)


# --------------------------------------------------------------------------- whole models
def tiny(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny-moe", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, expert_ffn_dim=96,
                                  tie_embeddings=False, max_seq_len=64, **kw)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("extra", [{}, {"qk_norm": "head", "attention_bias": True, "num_shared_experts": 1,
                                        "first_dense_layers": 1}])
def test_a_quantized_model_saves_loads_and_runs_in_the_engine(tmp_path, bits, extra):
    model = tiny(**extra)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 24))
    quantized = quantize_model(copy.deepcopy(model), bits, 32)
    with torch.no_grad():
        logits = quantized(ids).logits
        ref = model(ids).logits
    assert (logits - ref).abs().mean() < (0.02 if bits == 8 else 0.1) * ref.abs().mean()
    moekit.save(quantized, load_tokenizer(), tmp_path / "q")
    loaded, tok = moekit.load(tmp_path / "q")
    assert loaded.quantization == {"bits": bits, "group_size": 32 if bits == 4 else None}
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)  # exactly what was saved
    runner = Runner(loaded, 2, 64)  # fused q/k/v from permuted quantized rows
    with torch.inference_mode():
        assert_close(runner(ids[:1], [0], [0], all_logits=True), logits[:1], atol=2e-3, rtol=2e-3)
    # The engine's greedy answer is the quantized model's own greedy continuation: each token is the
    # argmax of the model's forward logits up to the runner-vs-forward difference bounded just above
    # (2e-3 each way; a near-tie within it may go either way, anything further may not).
    prompt = ids[0, :8].tolist()
    out = Engine(loaded, tok).generate([prompt], SamplingParams(max_new_tokens=6, temperature=0, stop_ids=()))[0]
    assert len(out.token_ids) == 6 and out.text == tok.decode(out.token_ids)
    with torch.no_grad():
        forward = loaded(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1:-1]  # [6, V]
    picked = forward.gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
    assert (picked >= forward.max(-1).values - 4e-3).all()
    size = (tmp_path / "q" / "model.safetensors").stat().st_size
    moekit.save(model, tok, tmp_path / "f")
    assert size < (tmp_path / "f" / "model.safetensors").stat().st_size * (0.55 if bits == 8 else 0.5)  # float embeddings stay


def test_a_checkpoint_missing_its_scales_names_the_file_and_tensor(tmp_path):
    moekit.save(quantize_model(tiny(), 8), load_tokenizer(), tmp_path / "q")
    path = tmp_path / "q" / "model.safetensors"
    state = load_file(path)
    del state["layers.0.ffn.experts.down_proj.scales"]
    save_file(state, path)
    with pytest.raises(CheckpointError, match=r"model.safetensors: quantized tensor layers.0.ffn.experts.down_proj "
                                              r"is missing layers.0.ffn.experts.down_proj.scales"):
        moekit.load(tmp_path / "q")


def test_quantize_cli(tmp_path, capsys):
    moekit.save(tiny(), load_tokenizer(), tmp_path / "f")
    assert main(["quantize", str(tmp_path / "f"), str(tmp_path / "q4"), "--bits", "4", "--group-size", "32"]) == 0
    assert "int4, groups of 32" in capsys.readouterr().out
    assert moekit.load(tmp_path / "q4")[0].quantization["bits"] == 4
    for flags, message in ((["--bits", "3"], "bits=3 is not supported"),
                           (["--bits", "4", "--group-size", "128"],
                            "group_size=128 does not divide the input width 64 of layers.0.attn.q_proj"),
                           (["--bits", "8"], "already exists")):
        dst = tmp_path / ("q4" if "already" in message else "x")
        assert main(["quantize", str(tmp_path / "f"), str(dst), *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


def test_a_quantized_head_gives_float_resolution_for_the_top_logits():
    from moekit.quant import REFINED_LOGITS, head_logits

    w = QuantizedWeight.quantize(torch.randn(1000, 64), 8)
    h = torch.randn(3, 64) * 4
    exact = h @ w.dequantize().t()  # float activations on the quantized weights
    got = head_logits(h, w)
    top = exact.topk(10, dim=-1).indices
    assert torch.allclose(got.gather(-1, top), exact.gather(-1, top), atol=1e-4)  # not bfloat16's 2^-8 steps
    assert (got.argmax(-1) == exact.argmax(-1)).all() and REFINED_LOGITS >= 10


@pytest.mark.parametrize("bits, stored", [(4, "Q4_1"), (8, "Q8_0")])
def test_gguf_export_keeps_the_integers_without_going_through_float(tmp_path, bits, stored):
    import gguf

    from moekit.convert.gguf import load_gguf
    from moekit.quant import quantized_weights

    moekit.save(quantize_model(tiny(), bits, 32), load_tokenizer(), tmp_path / "q")
    assert main(["convert", str(tmp_path / "q"), str(tmp_path / "q.gguf"), "--gguf-type", "q4_0" if bits == 4 else "q8_0"]) == 0
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors}
    assert types["blk.0.ffn_gate_exps.weight"] == types["blk.1.attn_q.weight"] == stored
    source, _ = moekit.load(tmp_path / "q")
    back, _ = load_gguf(tmp_path / "q.gguf")
    ours, theirs = quantized_weights(source), quantized_weights(back)
    for name in ("layers.0.attn.q_proj.weight", "layers.1.attn.k_proj.weight", "layers.1.ffn.experts.gate_up_proj",
                 "layers.0.ffn.experts.down_proj"):
        a, b = ours[name], theirs[name]
        if bits == 8:
            assert torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale)
        else:  # the same integers; scale and zero go through float16 (Q4_1's d and m)
            assert torch.equal(a.int4_values(), b.int4_values())
            assert_close(a.dequantize(), b.dequantize(), atol=1e-4, rtol=0)


def test_info_describes_a_quantized_checkpoint(tmp_path, capsys):
    model = tiny()
    moekit.save(quantize_model(copy.deepcopy(model), 4, 32), load_tokenizer(), tmp_path / "q")
    assert main(["info", str(tmp_path / "q")]) == 0
    out = capsys.readouterr().out
    total, active = model.cfg.param_counts()
    assert f"({total:,})" in out and "int4" in out and "quantized" in out and "warning" not in out
