"""``serve --bits N`` with expert offloading: the offloaded experts are stored and run quantized (each
quantized as it is read from the float checkpoint), bit-identical to the resident quantized model,
and the memory budget counts quantized experts."""

import pytest
import torch

import moekit
import moekit.serve
from moekit.cli import _load_for_generation, build_parser, main
from moekit.config import ModelConfig
from moekit.data import load_tokenizer
from moekit.infer import Engine, SamplingParams
from moekit.infer.offload import OffloadedExperts, QuantizedOnRead
from moekit.model import Transformer
from moekit.quant import QuantizedWeight


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A float MoE checkpoint (a dense first layer, a shared expert); widths divisible by 64 for int4."""
    cfg = ModelConfig(vocab_size=4096, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=128, expert_ffn_dim=64,
                      max_seq_len=96, tie_embeddings=False, init_std=0.1, num_experts=8, top_k=2,
                      first_dense_layers=1, num_shared_experts=1)
    torch.manual_seed(0)
    return moekit.save(Transformer(cfg), load_tokenizer(), tmp_path_factory.mktemp("bits") / "moe")


def serve_load(path, *flags):
    """What ``moekit serve PATH FLAGS`` loads (the function its command calls, with its parsed flags)."""
    args = build_parser().parse_args(["serve", str(path), *flags])
    return _load_for_generation(args.checkpoint, args, bits=args.bits)


@pytest.mark.parametrize("bits", [8, 4])
def test_offloaded_experts_are_quantized_and_bit_identical_to_the_resident_quantized_model(checkpoint, bits):
    resident, _ = serve_load(checkpoint, "--bits", str(bits))
    offloaded, _ = serve_load(checkpoint, "--bits", str(bits), "--max-resident-experts", "2")
    assert offloaded.quantization == resident.quantization == {"bits": bits, "group_size": 64 if bits == 4 else None}
    ref, off = Engine(resident, max_batch=2), Engine(offloaded, max_batch=2)
    for i in (1, 2):
        assert isinstance(offloaded.layers[i].ffn.experts.gate_up_proj, QuantizedOnRead)  # no quantized stack in RAM
        store = off.runner.blocks[i][2].experts
        assert isinstance(store, OffloadedExperts)
        assert all(isinstance(w, QuantizedWeight) and w.bits == bits for pair in store._pairs for w in pair)
    ids = torch.randint(0, 4096, (2, 40))
    with torch.inference_mode():
        for tokens, segments in ((ids[0, :30], [(0, 0, 30)]), (ids[1, :8], [(1, 0, 8)]),
                                 (torch.stack([ids[0, 30], ids[1, 8]]), [(0, 30, 1), (1, 8, 1)])):
            assert torch.equal(off.runner.forward(tokens, segments), ref.runner.forward(tokens, segments))
    s = off.stats.offload
    assert s.misses > 4 and s.bytes_read == s.misses * (64 * 2 * 64 + 64 * 64) * 4  # float32 experts read
    quantized_expert = sum(w.nbytes() for w in (resident.layers[1].ffn.experts.gate_up_proj[0],
                                                 resident.layers[1].ffn.experts.down_proj[0]))
    assert s.bytes_per_expert == quantized_expert < (64 * 2 * 64 + 64 * 64) * 4 / (3 if bits == 8 else 6)
    assert s.resident_bytes == 2 * 2 * quantized_expert  # 2 MoE layers x 2 slots
    greedy = SamplingParams(max_new_tokens=8, temperature=0, stop_ids=())
    assert off.generate([[1, 2, 3]], greedy)[0].token_ids == ref.generate([[1, 2, 3]], greedy)[0].token_ids


def test_the_memory_budget_counts_quantized_experts(checkpoint):
    """0.0001 GB over 2 MoE layers is 50,000 bytes per layer: one float32 expert (49,152 bytes) fits,
    below the minimum of top_k=2; int8 experts (12,288 bytes and 192 bfloat16 scales: 12,672) fit 3."""
    with pytest.raises(moekit.config.ConfigError, match="minimum is top_k=2"):
        serve_load(checkpoint, "--expert-memory", "0.0001")
    model, _ = serve_load(checkpoint, "--bits", "8", "--expert-memory", "0.0001")
    assert model.expert_offload.max_resident_experts == 50_000 // model.expert_offload.bytes_per_expert == 3


def test_serve_builds_its_engine_on_quantized_offloaded_experts(checkpoint, monkeypatch):
    """The command itself (the HTTP server left out): its engine's expert slots hold int8 experts."""
    engines = []
    monkeypatch.setattr(moekit.serve, "create_app", lambda engine, *a, **kw: engines.append(engine))
    monkeypatch.setattr("uvicorn.Server.run", lambda self, *a, **kw: None)
    assert main(["serve", str(checkpoint), "--bits", "8", "--max-resident-experts", "2"]) == 0
    [engine] = engines
    store = engine.runner.blocks[1][2].experts
    assert engine.stats.offload is not None and store.slots == 2
    assert all(isinstance(w, QuantizedWeight) and w.bits == 8 for pair in store._pairs for w in pair)


def test_an_int4_checkpoints_offloaded_experts_hold_what_the_loaded_model_holds(checkpoint, tmp_path):
    """Each expert read from an int4 checkpoint takes the kernel layout only (it kept the portable
    nibbles too, half as many bytes again, when read_quantized got its arguments shifted)."""
    model, tok = serve_load(checkpoint, "--bits", "4")
    path = moekit.save(model, tok, tmp_path / "int4")
    loaded, _ = moekit.load(path)
    _, _, offload = moekit.infer.offload.load_offloaded(path, max_resident_experts=2)
    experts = loaded.layers[1].ffn.experts
    assert offload.bytes_per_expert == experts.gate_up_proj[0].nbytes() + experts.down_proj[0].nbytes()
    assert offload.sources[1][0][3].nibbles is None
