"""Multi-head latent attention in the runner caches the latent (R + r numbers per token and layer) and
runs the absorbed form; its logits match ``Transformer.forward`` for prefill chunks and for many decode
steps of a continuous batch."""

import copy

import pytest
import torch
from torch.testing import assert_close

from moekit import ModelConfig, Transformer
from moekit.infer import Engine, SamplingParams
from moekit.infer.runner import Runner, cache_bytes_per_token
from moekit.quant import quantize_model

VOCAB = 256
# Float32 throughout: the absorbed form sums the same products in another order (W_UK^T q . c instead of
# q . W_UK c), so the two agree to float32 rounding of logits of size ~3, not bit for bit.
TOL = dict(atol=1e-4, rtol=1e-4)


def mla_model(q_lora_rank=None, interleave=False, **kw) -> Transformer:
    cfg = dict(vocab_size=VOCAB, dim=64, n_layers=3, n_heads=4, max_seq_len=64, tie_embeddings=False, init_std=0.1,
               attention="mla", kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
               q_lora_rank=q_lora_rank, rope_interleave=interleave, num_experts=4, top_k=2, router="sigmoid_bias",
               num_shared_experts=1, first_dense_layers=1)
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**cfg, **kw})).eval()


@pytest.mark.parametrize("q_lora_rank, interleave", [(None, False), (24, True)])
def test_prefill_and_decode_in_a_continuous_batch_match_the_model(q_lora_rank, interleave):
    """Three sequences: A prefills in two chunks; then each call decodes the running ones (ragged
    positions) while the next prompt prefills in the same call; every logit against the full forward."""
    model = mla_model(q_lora_rank, interleave)
    ids = torch.randint(0, VOCAB, (3, 30))
    with torch.no_grad():
        ref = model(ids).logits  # [3, 30, V]
    runner = Runner(model, slots=4, max_len=64)
    slot = {0: 2, 1: 0, 2: 3}
    pos = {}
    with torch.inference_mode():
        got = runner.forward(ids[0, :9], [(slot[0], 0, 9)], [True])  # A: chunk 1
        assert_close(got, ref[0, :9], **TOL)
        got = runner.forward(ids[0, 9:14], [(slot[0], 9, 5)], [True])  # A: chunk 2 attends to chunk 1
        assert_close(got, ref[0, 9:14], **TOL)
        pos[0] = 14
        for step, (joining, length) in enumerate([(1, 11), (2, 6), (None, 0), (None, 0), (None, 0), (None, 0)]):
            running = sorted(pos)
            tokens = [ids[b, pos[b]] for b in running]
            segments = [(slot[b], pos[b], 1) for b in running]
            if joining is not None:
                tokens += list(ids[joining, :length])
                segments.append((slot[joining], 0, length))
            got = runner.forward(torch.stack(tokens), segments, [False] * len(running) + [True] * (joining is not None))
            expected = [ref[b, pos[b]][None] for b in running]
            if joining is not None:
                expected.append(ref[joining, :length])
            assert_close(got, torch.cat(expected), **TOL, msg=f"step {step}")
            for b in running:
                pos[b] += 1
            if joining is not None:
                pos[joining] = length


def test_the_cache_holds_the_latent_and_the_rotary_key_only():
    model = mla_model()
    runner = Runner(model, slots=2, max_len=64)
    c = model.cfg
    assert [tuple(k.shape) for k in runner.cache.k] == [(2, 1, 64, c.kv_lora_rank + c.qk_rope_head_dim)] * c.n_layers
    for k, v in zip(runner.cache.k, runner.cache.v):  # the values are the latent: a view, no memory of their own
        assert v.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() and v.shape[-1] == c.kv_lora_rank
    per_token = (c.kv_lora_rank + c.qk_rope_head_dim) * c.n_layers * 4
    assert runner.cache.nbytes() == 2 * 64 * per_token == 2 * 64 * cache_bytes_per_token(c, torch.float32)


def test_deepseek_v3_caches_71x_less_per_token():
    """From the config alone: 61 layers x (512 + 64) bfloat16 numbers, against 128 heads x (128 + 64)
    keys and 128 x 128 values decompressed."""
    c = ModelConfig.from_preset("deepseek-v3")
    latent = cache_bytes_per_token(c, torch.bfloat16)
    decompressed = c.n_layers * c.n_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) * 2
    assert latent == 61 * 576 * 2 == 70_272
    assert decompressed == 4_997_120 and round(decompressed / latent, 1) == 71.1


@pytest.mark.parametrize("bits", [8, 4])
def test_a_quantized_latent_projection_runs_absorbed(bits):
    """kv_b_proj quantized: the runner dequantizes it per call for the absorbed matmuls (float32
    activations), where the model's forward runs the kernel (bfloat16 activations). So the reference
    is the quantized model with that one layer dequantized; the other quantized layers round their
    bfloat16 activations alike in both, up to the norms' and rotation's order (a looser tolerance)."""
    model = quantize_model(mla_model(qk_rope_head_dim=16, v_head_dim=16), bits, 32 if bits == 4 else None)
    reference = copy.deepcopy(model)
    for block in reference.layers:
        kv_b = block.attn.kv_b_proj
        block.attn.kv_b_proj = torch.nn.Linear(kv_b.in_features, kv_b.out_features, bias=False)
        block.attn.kv_b_proj.weight.data = kv_b.qweight.dequantize()
    ids = torch.randint(0, VOCAB, (1, 20))
    with torch.no_grad():
        ref = reference(ids).logits
    runner = Runner(model, slots=1, max_len=64, native=False)  # (the native kernels compute the other quantized
    with torch.inference_mode():                                # layers more exactly than bfloat16: tests/test_native.py)
        got = torch.cat([runner(ids[:, :12], [0], [0], all_logits=True)[0]]
                        + [runner(ids[:, t:t + 1], [0], [t]) for t in range(12, 20)])
    assert_close(got, ref[0], atol=1e-2, rtol=1e-2)


def test_the_engine_generates_what_the_no_cache_loop_does():
    model = mla_model()
    prompt = torch.randint(0, VOCAB, (7,)).tolist()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    [done] = Engine(model, max_batch=2).generate([prompt], SamplingParams(max_new_tokens=12, temperature=0, stop_ids=()))
    assert done.token_ids == ids[len(prompt):]
