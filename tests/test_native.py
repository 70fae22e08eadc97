"""The native decode path (moekit/native, C++) against the PyTorch reference it sits beside.

- kernels: float32 products to 1e-5; int8 / int4 the quantized weight's float32 product to 1e-4 (the
  native kernels quantize activations to int16 per block; the reference rounds them to bfloat16); every
  instruction set this CPU has (AVX512-VNNI, AVX2, plain C) gives the same integer sums; a row's result
  does not depend on the other rows of the batch;
- the runner with the native path against the reference runner for every router, shared experts,
  dense-first layers, qk-norm kinds, multi-head latent attention, grouped-query attention, batch shapes
  1-32, float32 and quantized; greedy text identical on a moekit MoE and on the SmolLM2 GGUF (Q4_1, f16);
- offloaded experts through the native path bit-identical to resident ones;
- a machine without the extension (simulated): one line of notice, the reference's answers.

Without the built extension these tests skip (``python -m moekit.native build``), except under
``MOEKIT_NATIVE_TESTS=require`` (set by .ci/run), where they fail.
"""

import os

import pytest
import torch

import moekit
from moekit import native
from moekit.config import ModelConfig
from moekit.infer import Engine, SamplingParams
from moekit.infer.runner import Runner
from moekit.model import Transformer
from moekit.quant import QuantizedWeight, dequantize_model, quantize_model


@pytest.fixture(scope="module")
def kern():
    k = native.kernels()
    if k is None:
        if os.environ.get("MOEKIT_NATIVE_TESTS") == "require":
            pytest.fail("the native kernels are not built (python -m moekit.native build); MOEKIT_NATIVE_TESTS=require")
        pytest.skip("the native kernels are not built: python -m moekit.native build")
    yield k
    k.set_isa(k.best_isa())


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# --------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("N, K", [(64, 512), (96, 576), (33, 1024), (40, 96)])
@pytest.mark.parametrize("M", [1, 3, 32])
def test_float32_products_match_torch_on_every_instruction_set(kern, N, K, M):
    gen = torch.Generator().manual_seed(N * K + M)
    w, x, b = torch.randn(N, K, generator=gen), torch.randn(M, K, generator=gen), torch.randn(N, generator=gen)
    ref = torch.nn.functional.linear(x.double(), w.double(), b.double()).float()
    for isa in range(kern.best_isa() + 1):
        kern.set_isa(isa)
        y = kern.linear(x, native.native_weight(w, b))
        assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item()), isa


@pytest.mark.parametrize("M", [1, 7, 32])
def test_bfloat16_weights_are_widened_exactly(kern, M):
    gen = torch.Generator().manual_seed(M)
    w, x = torch.randn(96, 576, generator=gen).bfloat16(), torch.randn(M, 576, generator=gen)
    ref = (x.double() @ w.double().T).float()
    for isa in range(kern.best_isa() + 1):
        kern.set_isa(isa)
        y = kern.linear(x, native.native_weight(w))
        assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item()), isa
    assert torch.equal(kern.dequantize(native.native_weight(w)), w.float())


def test_a_bfloat16_model_decodes_natively_as_the_reference_does(kern):
    model = _model().to(torch.bfloat16)
    got, ref = _decode_logits(model, True, 4).float(), _decode_logits(model, False, 4).float()
    runner = Runner(model, 1, 64, native=True)
    assert runner.blocks[0][0].qkv.nw is not None and runner.blocks[0][0].qkv.nw.kind == native.KINDS["bfloat16"]
    # both round activations and outputs to bfloat16 (spacing 2^-8 relative); the native path accumulates
    # its products in float32 from float32 activations, PyTorch's bfloat16 GEMM likewise: a few roundings apart
    assert _rel(got[0], ref[0]) < 0.02


@pytest.mark.parametrize("bits, group, N, K", [(b, g, n, k) for b, g in [(8, None), (4, 32), (4, 64), (4, 128)]
                                               for n, k in [(64, 512), (96, 576), (33, 1024)] if g is None or k % g == 0])
def test_quantized_products_are_within_the_references_error(kern, bits, group, N, K):
    gen = torch.Generator().manual_seed(N + K + bits)
    w, x = torch.randn(N, K, generator=gen), torch.randn(32, K, generator=gen)
    qw = QuantizedWeight.quantize(w, bits, group)
    nw = native.native_weight(qw)
    exact = x @ qw.dequantize().T  # the quantized weight, float32 activations
    truth = x @ w.T  # the float weight
    ref = qw.linear(x)  # PyTorch's kernels: bfloat16 activations
    outs = []
    for isa in range(kern.best_isa() + 1):
        kern.set_isa(isa)
        outs.append(kern.linear(x, nw))
    for y in outs:
        assert _rel(y, exact) < 1e-4  # int16 activations in blocks: the quantized weight's own product
        assert _rel(y, truth) <= _rel(ref, truth) + 1e-4  # no further from the float weight than the reference
        # every instruction set sums the same integers; only the float32 order of the block sums differs
        assert torch.allclose(y, outs[0], rtol=0, atol=1e-5 * outs[0].abs().max().item())
    for isa in range(kern.best_isa() + 1):  # (q - 8) s + z computed as q s + (z - 8 s): float32 rounding apart
        kern.set_isa(isa)
        assert torch.allclose(kern.dequantize(nw), qw.dequantize(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_a_rows_result_does_not_depend_on_the_rest_of_the_batch(kern, bits):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(128, 512, generator=gen)
    nw = native.native_weight(w if bits is None else QuantizedWeight.quantize(w, bits, 32 if bits == 4 else None))
    x = torch.randn(32, 512, generator=gen)
    x[5:] *= 40  # large neighbours: a per-batch activation scale (FBGEMM's) would change row 0
    batch = kern.linear(x, nw)
    for m in (0, 3, 31):
        assert torch.equal(kern.linear(x[m:m + 1], nw)[0], batch[m])


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_the_fused_moe_call_is_the_loop_over_experts(kern, bits):
    gen = torch.Generator().manual_seed(2)
    E, D, F, M, K = 6, 128, 64, 7, 2
    w1, w2 = torch.randn(E, 2 * F, D, generator=gen) / 10, torch.randn(E, D, F, generator=gen) / 10
    if bits is not None:
        g = 32 if bits == 4 else None
        w1 = [QuantizedWeight.quantize(w1[e], bits, g) for e in range(E)]
        w2 = [QuantizedWeight.quantize(w2[e], bits, g) for e in range(E)]
    experts = kern.Experts([native.native_weight(w1[e]) for e in range(E)], [native.native_weight(w2[e]) for e in range(E)])
    x = torch.randn(M, D, generator=gen)
    ids = torch.tensor([[0, 3], [3, 5], [1, -1], [2, 4], [5, 0], [0, 1], [4, 4]])
    gates = torch.rand(M, K, generator=gen)
    y = kern.moe(x, ids, gates, experts)
    ref = torch.zeros(M, D)
    for m in range(M):
        for e, g in zip(ids[m].tolist(), gates[m].tolist()):
            if e < 0:
                continue
            a = w1[e] if bits is None else w1[e].dequantize()
            b = w2[e] if bits is None else w2[e].dequantize()
            h = a @ x[m]
            ref[m] += g * (b @ (torch.nn.functional.silu(h[:F]) * h[F:]))
    assert _rel(y, ref) < (1e-5 if bits is None else 1e-4)
    with pytest.raises(RuntimeError, match="expert id 9 not in"):
        kern.moe(x, torch.full((M, K), 9), gates, experts)


def test_bad_shapes_are_clear_errors_not_crashes(kern):
    nw = native.native_weight(torch.randn(64, 128))
    with pytest.raises(RuntimeError, match=r"x float32 \[M, K\]"):
        kern.linear(torch.randn(2, 64), nw)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        kern.Weight(0, [torch.randn(8, 40)], 0)
    assert native.native_weight(torch.randn(8, 40)) is None  # the runner then keeps the PyTorch path
    assert native.native_weight(torch.randn(8, 64, dtype=torch.float16)) is None


# --------------------------------------------------------------------------- the runner
ROUTERS = ["topk", "switch", "noisy_topk", "sigmoid_bias"]


def _model(**kw):
    torch.manual_seed(0)
    base = dict(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, expert_ffn_dim=64, max_seq_len=128, vocab_size=512,
                init_std=0.05)
    return Transformer(ModelConfig.from_preset("tiny-moe", **{**base, **kw})).eval().requires_grad_(False)


def _decode_logits(model, native_on: bool, rows: int, steps: int = 3) -> torch.Tensor:
    """Prefill ``rows`` sequences of different lengths, then decode ``steps`` tokens for all rows together;
    the logits of every decode step [steps, rows, V]."""
    runner = Runner(model, rows, 64, native=native_on)
    gen = torch.Generator().manual_seed(rows)
    out = []
    with torch.inference_mode():
        lens = [3 + (r * 5) % 11 for r in range(rows)]
        for r, n in enumerate(lens):
            runner.forward(torch.randint(0, 512, (n,), generator=gen), [(r, 0, n)])
        tok = torch.randint(0, 512, (rows,), generator=gen)
        for step in range(steps):
            logits = runner.forward(tok, [(r, lens[r] + step, 1) for r in range(rows)])
            out.append(logits)
            tok = logits.argmax(-1)
    return torch.stack(out)


CASES = {
    **{f"router-{r}": dict(router=r, top_k=1 if r == "switch" else 2) for r in ROUTERS},
    "shared-expert-gated": dict(num_shared_experts=1, shared_expert_ffn_dim=64, shared_expert_gate=True),
    "dense-first-layers": dict(first_dense_layers=1, ffn_dim=128),
    "qk-norm-head": dict(qk_norm="head"),
    "qk-norm-full": dict(qk_norm="full"),
    "mha": dict(n_kv_heads=4),
    "mla": dict(attention="mla", q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
                v_head_dim=16),
    "attention-bias": dict(attention_bias=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("rows", [1, 5, 32])
def test_native_runner_matches_the_reference_in_float32(kern, case, rows):
    model = _model(**CASES[case])
    native_logits = _decode_logits(model, True, rows)
    ref = _decode_logits(model, False, rows)
    scale = ref.abs().max().item()
    assert torch.allclose(native_logits, ref, rtol=1e-5, atol=1e-5 * scale), (native_logits - ref).abs().max().item()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("case", ["router-topk", "router-sigmoid_bias", "shared-expert-gated", "dense-first-layers"])
def test_native_runner_is_within_the_quantized_references_error(kern, bits, case):
    float_logits = _decode_logits(_model(**CASES[case]), False, 4)
    model = quantize_model(_model(**CASES[case]), bits, 32 if bits == 4 else None)
    got, ref = _decode_logits(model, True, 4), _decode_logits(model, False, 4)
    # (the decoded tokens may differ between the three; compare the first step, where the inputs are equal)
    assert _rel(got[0], float_logits[0]) < _rel(ref[0], float_logits[0]) + 1e-3
    # the native kernels compute the quantized model's products in float32 (int16 activations); the
    # reference rounds activations to bfloat16: ~0.3% per product
    assert _rel(got[0], ref[0]) < 0.02


def test_greedy_text_is_the_references_on_a_moekit_moe(kern):
    from greedy_check import assert_same_greedy

    model = _model(router="sigmoid_bias", num_shared_experts=1, shared_expert_ffn_dim=64)
    prompts = [[1, 7, 9, 4], [5, 5, 2], [11, 12, 13, 14, 15, 16]]
    params = SamplingParams(max_new_tokens=24, temperature=0)
    got = Engine(model, max_batch=3, native=True).generate(prompts, params)
    ref = Engine(model, max_batch=3, native=False).generate(prompts, params)
    for p, a, b in zip(prompts, got, ref):
        assert_same_greedy(model, p, a.token_ids, b.token_ids)


@pytest.mark.parametrize("fmt", ["q4_1", "f16"])
def test_greedy_text_is_the_references_on_smollm2(kern, smollm2_gguf, tmp_path, fmt):
    path = smollm2_gguf
    if fmt == "f16":
        model, tok = moekit.load(smollm2_gguf)  # its Q4_1 weights as float, written as f16, read back as float32
        path = moekit.save(dequantize_model(model), tok, tmp_path / "smollm2-f16.gguf", dtype="f16")
    model, tok = moekit.load(path)
    kinds = {type(m.weight if hasattr(m, "weight") else m.qweight).__name__ for m in model.layers[0].ffn.children()}
    assert kinds == ({"QuantizedWeight"} if fmt == "q4_1" else {"Parameter"})
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "The three laws of robotics"]
    params = SamplingParams(max_new_tokens=24, temperature=0)
    got = [r.token_ids for r in Engine(model, tok, max_batch=4, native=True).generate(prompts, params)]
    ref = [r.token_ids for r in Engine(model, tok, max_batch=4, native=False).generate(prompts, params)]
    assert got == ref


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_offloaded_experts_through_the_native_path_are_bit_identical(kern, tmp_path, bits):
    from moekit.infer.offload import load_offloaded

    model = _model()
    if bits is not None:
        quantize_model(model, bits, 32 if bits == 4 else None)
    path = moekit.save(model, None, tmp_path / "ckpt")
    resident, _ = moekit.load(path)
    offloaded, _, _ = load_offloaded(path, max_resident_experts=2)
    a = _decode_logits(resident, True, 5, steps=4)
    b = _decode_logits(offloaded, True, 5, steps=4)
    assert torch.equal(a, b)


def test_without_the_extension_the_reference_runs_and_says_so_once(kern, tmp_path, monkeypatch, capfd):
    model = _model()
    ref = _decode_logits(model, False, 3)
    monkeypatch.setenv("MOEKIT_NATIVE_DIR", str(tmp_path / "nothing-built-here"))
    native.disable_for_tests(False)  # forget the loaded module: look again, in the empty directory
    try:
        assert native.kernels() is None and native.kernels() is None
        err = capfd.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "native decode kernels not built" in err[0] and "PyTorch path" in err[0]
        runner = Runner(model, 3, 64)  # native=None: where built, so the PyTorch path here
        assert runner.native is False
        assert torch.equal(_decode_logits(model, None, 3), ref)
        with pytest.raises(ValueError, match="not available"):
            Runner(model, 3, 64, native=True)
    finally:
        monkeypatch.delenv("MOEKIT_NATIVE_DIR")
        native.disable_for_tests(False)
    assert native.kernels() is not None


def test_quantized_prefill_is_the_dequantized_float_product(kern):
    model = quantize_model(_model(), 8)
    runner_n, runner_r = Runner(model, 1, 128, native=True), Runner(model, 1, 128, native=False)
    ids = torch.randint(0, 512, (100,), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        a = runner_n.forward(ids, [(0, 0, 100)], [True])
        b = runner_r.forward(ids, [(0, 0, 100)], [True])
    assert _rel(a, b) < 0.02  # float32 activations against the reference's bfloat16 ones


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_the_native_path_reads_float_and_int8_weights_in_place_and_copies_int4_once(kern, bits):
    """One copy of the weights (tests/test_runner_memory.py) holds on the native path for float32 and int8
    (values and bfloat16 scales read in place); an int4 weight gets its portable form: nibbles (0.5 byte
    a weight) and bfloat16 scales and zeros row by row (4 bytes a group)."""
    from test_runner_memory import cache_and_tables, live_tensor_bytes, model_for

    from moekit.quant import quantized_weights

    model = model_for("moe", bits)
    before = live_tensor_bytes()
    runner = Runner(model, slots=2, max_len=64, native=True)
    with torch.inference_mode():  # the experts' native forms are built at their first decode
        runner.forward(torch.tensor([3, 4]), [(0, 0, 1), (1, 0, 1)])
    added = live_tensor_bytes(cache_and_tables(runner)) - before
    if bits != 4:
        assert added == 0
    else:
        weights = [w for name, w in quantized_weights(model).items() if w.bits == 4]
        values = sum(w.shape[-2] * w.shape[-1] * (w.shape[0] if len(w.shape) == 3 else 1) for w in weights)
        expected = values // 2 + 4 * values // 32  # nibbles; bfloat16 scale and zero per group of 32
        assert expected <= added <= expected + 1024  # (and a few small tensors of bookkeeping)
