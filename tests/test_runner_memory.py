"""One copy of the weights: building a Runner (an Engine) adds no weight bytes to the model, float or
quantized; the model still trains, its in-place updates reach the runner, and it saves the same files."""

import copy
import gc
import json
import struct
import warnings

import pytest
import torch
from torch.testing import assert_close

import moekit
from moekit import ModelConfig, Transformer
from moekit.data import load_tokenizer
from moekit.infer import Engine, SamplingParams
from moekit.infer.runner import Runner, _AttnPlan, _MLPPlan, _MoEPlan
from moekit.quant import QuantizedWeight, quantize_model

VOCAB = 256
GREEDY = SamplingParams(max_new_tokens=8, temperature=0, stop_ids=())


def model_for(kind: str, bits: int | None = None, **kw) -> Transformer:
    """Widths that are multiples of 64 (int4 row blocks pack apart, int8 rows stay aligned), so every
    fusion shares storage; ``kind``: "dense", or "moe" with a shared expert (gated) after a dense layer."""
    base = dict(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=128,
                max_seq_len=64, tie_embeddings=False, init_std=0.1)
    if kind == "moe":
        base.update(num_experts=4, top_k=2, expert_ffn_dim=64, num_shared_experts=1, shared_expert_ffn_dim=128,
                    shared_expert_gate=True, first_dense_layers=1)
    else:
        base["num_experts"] = 0
    base.update(kw)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**base)).eval()
    return model if bits is None else quantize_model(model, bits, 32 if bits == 4 else None)


def live_tensor_bytes(exclude: set[int] = frozenset()) -> int:
    """Bytes of every live tensor's storage in this process, each storage once (by address)."""
    gc.collect()
    storages = {}
    with warnings.catch_warnings():  # isinstance() on some torch objects warns about deprecated names
        warnings.simplefilter("ignore")
        for o in gc.get_objects():
            if isinstance(o, torch.Tensor) and o.device.type != "meta":
                s = o.untyped_storage()
                if s.data_ptr() not in exclude:
                    storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def cache_and_tables(runner: Runner) -> set[int]:
    """Storages the runner owns that are not weights: the KV cache and the rotary tables."""
    return {t.untyped_storage().data_ptr() for t in runner.cache.k + runner.cache.v + [runner.cos, runner.sin,
                                                                                        runner.freqs, runner.cos_half,
                                                                                        runner.sin_half]}


def storage(w) -> int:
    return (w.q if isinstance(w, QuantizedWeight) else w).untyped_storage().data_ptr()


FLOAT_TOL = dict(atol=1e-4, rtol=1e-4)
# Quantized kernels take bfloat16 activations and the int8 head writes bfloat16 logits (spacing 2^-6
# between 2 and 4, the logits' range here): the runner's float32 norms and rotation round differently
# from the model's, and a logit may land one rounding away (the same figures as before one copy).
QUANT_TOL = dict(atol=1e-2, rtol=1e-2)
CASES = [("dense", None), ("moe", None), ("dense", 8), ("moe", 8), ("dense", 4), ("moe", 4)]


@pytest.mark.parametrize("kind, bits", CASES)
def test_the_runner_adds_no_weight_copies(kind, bits):
    model = model_for(kind, bits)
    before = live_tensor_bytes()
    # (the PyTorch path; the native one adds an int4 weight's portable copy: tests/test_native.py)
    runner = Runner(model, slots=2, max_len=64, native=False)
    assert live_tensor_bytes(cache_and_tables(runner)) == before
    # ... and it did fuse: the fused tensors are the storage of the model's own q/k/v and gate/up weights.
    fused = 0
    for block, (attn, _, ffn) in zip(model.layers, runner.blocks):
        assert isinstance(attn, _AttnPlan) and attn.w_qkv is not None
        for layer in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj):
            assert storage(layer.weight) == storage(attn.w_qkv)
        mlp, plan = (block.ffn, ffn) if isinstance(ffn, _MLPPlan) else (block.ffn.shared_expert, ffn.shared)
        assert plan.w_gate_up is not None
        assert storage(mlp.gate_proj.weight) == storage(mlp.up_proj.weight) == storage(plan.w_gate_up)
        fused += 1 + isinstance(ffn, _MoEPlan)
    assert fused == (2 if kind == "dense" else 3)
    # A second runner on the same model finds the weights fused and shares them too.
    again = Runner(model, slots=1, max_len=64, native=False)
    assert storage(again.blocks[0][0].w_qkv) == storage(runner.blocks[0][0].w_qkv)
    assert live_tensor_bytes(cache_and_tables(runner) | cache_and_tables(again)) == before


def test_int4_rows_that_cannot_be_views_are_run_apart_not_copied():
    """Blocks of 32 rows do not pack apart in PyTorch's int4 layout (blocks of 64): the runner then calls
    the model's q/k/v layers one by one (nothing copied), and still matches the model."""
    model = model_for("dense", 4, head_dim=16, n_heads=2, ffn_dim=96)
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        ref = model(ids).logits
    before = live_tensor_bytes()
    runner = Runner(model, slots=1, max_len=64, native=False)
    assert live_tensor_bytes(cache_and_tables(runner)) == before
    assert runner.blocks[0][0].w_qkv is None
    with torch.inference_mode():
        assert_close(runner(ids, [0], [0], all_logits=True), ref, **QUANT_TOL)


@pytest.mark.parametrize("kind, bits", CASES)
def test_the_model_runs_the_same_after_a_runner_was_built(kind, bits):
    model = model_for(kind, bits)
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits
    # (the PyTorch path: the same kernels as the model's; the native one: tests/test_native.py)
    runner = Runner(model, slots=2, max_len=64, native=False)
    with torch.no_grad():
        assert_close(model(ids).logits, ref, atol=1e-6, rtol=1e-6)  # the same weights, now row blocks of one tensor
    with torch.inference_mode():
        assert_close(runner(ids[:1], [0], [0], all_logits=True), ref[:1], **(QUANT_TOL if bits else FLOAT_TOL))


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_generate_then_train_then_generate_sees_the_trained_weights(kind):
    """Train with AdamW after an engine was built: the same loss and gradients as a model that never had
    one, and the engine (same runner, no rebuild) then generates what a fresh engine on the trained
    model does: the optimizer's in-place updates reached the fused weights."""
    model = model_for(kind).train()
    twin = copy.deepcopy(model)
    engine = Engine(model, max_batch=1)
    runner = engine.runner
    prompt = torch.randint(0, VOCAB, (6,)).tolist()
    first = engine.generate([prompt], GREEDY)[0].token_ids
    ids = torch.randint(0, VOCAB, (4, 24))
    for m in (model, twin):
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=3e-2)
        for _ in range(3):
            out = m(ids[:, :-1], labels=ids[:, 1:])
            (out.loss + out.aux_loss).backward()
            opt.step()
            opt.zero_grad()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert_close(p, q, atol=1e-5, rtol=1e-5, msg=name)
    assert runner.is_current()  # in-place updates keep the runner valid
    after = engine.generate([prompt], GREEDY)[0].token_ids
    fresh = Engine(twin.eval(), max_batch=1).generate([prompt], GREEDY)[0].token_ids
    assert after == fresh and after != first


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_save_writes_the_same_files_after_a_runner_was_built(tmp_path, bits):
    tok = load_tokenizer()
    model = model_for("moe", bits, vocab_size=tok.get_vocab_size())
    moekit.save(model, tok, tmp_path / "before")
    Engine(model, tok).generate(["ROMEO:"], SamplingParams(max_new_tokens=3, temperature=0))
    moekit.save(model, tok, tmp_path / "after")
    assert (tmp_path / "after" / "config.json").read_bytes() == (tmp_path / "before" / "config.json").read_bytes()
    assert safetensors_content(tmp_path / "after" / "model.safetensors") == \
        safetensors_content(tmp_path / "before" / "model.safetensors")


def safetensors_content(path) -> tuple[dict, bytes]:
    """(header as a dict, data bytes): the bytes of the file but for the order of the metadata keys, which
    the safetensors writer does not keep (two saves of one model in one process differ there)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def test_replacing_or_casting_the_weights_makes_a_runner_stale():
    model = model_for("moe")
    runner = Runner(model, slots=1, max_len=64)
    assert runner.is_current()
    with torch.no_grad():
        model.layers[0].attn.q_proj.weight.mul_(2)  # in place: still current
    assert runner.is_current()
    model.to(torch.bfloat16)
    assert not runner.is_current()
    runner = Runner(model, slots=1, max_len=64)
    model.load_state_dict(model_for("moe").state_dict(), assign=True)
    assert not runner.is_current()
