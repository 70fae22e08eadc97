"""Expert offloading: a model whose expert weights are 4x (and 8x) the resident budget gives the
resident model's logits bit for bit, in every batch shape; the cache statistics add up; the resident
buffers stay within the budget; bad budgets are one clear line; the CLI flags work end to end."""

import io
import json

import pytest
import torch

import moekit
from moekit.checkpoint import CheckpointError
from moekit.cli import main
from moekit.config import ModelConfig
from moekit.data import load_tokenizer
from moekit.infer import Engine, SamplingParams
from moekit.infer.offload import (
    ExpertOffload,
    LayerStats,
    MappedQuantizedWeight,
    OffloadedExperts,
    OffloadError,
    SafetensorsFile,
    load_offloaded,
    resident_experts_per_layer,
)
from moekit.infer.runner import ResidentExperts, _MoEPlan, _swiglu
from moekit.model import Transformer
from moekit.quant import QuantizedWeight, linear, quantize_model

E = 8


def _config(router: str, **kw) -> ModelConfig:
    base = dict(vocab_size=4096, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=96, expert_ffn_dim=32,
                max_seq_len=96, tie_embeddings=False, init_std=0.1, num_experts=E, router=router,
                top_k=1 if router == "switch" else 2)
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """top-2 (a dense first layer, a shared expert) and switch (top-1) models, saved with a tokenizer."""
    root = tmp_path_factory.mktemp("offload")
    out = {}
    for router, extra in (("topk", dict(first_dense_layers=1, num_shared_experts=1)), ("switch", {})):
        torch.manual_seed(0)
        out[router] = moekit.save(Transformer(_config(router, **extra)), load_tokenizer(), root / router)
    return out


def _expert_fetches(routing: list) -> int:
    """Expert fetches of one runner call: each MoE layer fetches each expert it routes to once."""
    return sum(len(torch.unique(ids)) for ids, _ in routing)


# --------------------------------------------------------------------------- bit-identical outputs
@pytest.mark.parametrize("router, resident", [("topk", 2), ("switch", 1)])
def test_offloaded_runner_gives_bit_identical_logits_in_every_batch_shape(checkpoints, router, resident):
    path = checkpoints[router]
    model, _ = moekit.load(path)
    off_model, _, offload = load_offloaded(path, max_resident_experts=resident)
    ref, off = Engine(model, max_batch=4), Engine(off_model, max_batch=4)
    stats = off.stats.offload
    assert offload.max_resident_experts == resident and stats.max_resident_experts == resident
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (4, 60))
    calls = [  # (tokens, segments, all_logits)
        (ids[0, :40], [(0, 0, 40)], [True]),  # a prefill chunk above 16 tokens (sorted dispatch)
        (ids[1, :10], [(1, 0, 10)], [True]),  # a small chunk (Python grouping)
        (ids[2, :24], [(2, 0, 24)], [False]),
        (ids[0, 40:41], [(0, 40, 1)], None),  # decode at batch 1
        (torch.stack([ids[0, 41], ids[1, 10], ids[2, 24]]), [(0, 41, 1), (1, 10, 1), (2, 24, 1)], None),  # batched
        (torch.cat([ids[0, 42:43], ids[1, 11:12], ids[3, :30]]), [(0, 42, 1), (1, 11, 1), (3, 0, 30)],
         [False, False, True]),  # mixed: two decoding rows and a prefill chunk in one pass
    ]
    fetches = 0
    with torch.inference_mode():
        for tokens, segments, all_logits in calls:
            routing: list = []
            expected = ref.runner.forward(tokens, segments, all_logits)
            got = off.runner.forward(tokens, segments, all_logits, routing)
            assert torch.equal(got, expected), (segments, (got - expected).abs().max())
            fetches += _expert_fetches(routing)
    assert stats.fetches == stats.hits + stats.misses == fetches
    assert len(stats.layers) * resident < stats.misses <= fetches  # experts were evicted and read again
    assert stats.bytes_read == stats.misses * stats.bytes_per_expert
    for i, layer in stats.layers.items():
        assert layer.bytes_read == layer.misses * stats.bytes_per_expert and layer.fetches > 0
        assert len(off.runner.blocks[i][2].experts.resident()) == resident


@pytest.mark.parametrize("router, resident", [("topk", 2), ("switch", 1)])
def test_engine_generates_the_same_tokens_and_logprobs(checkpoints, router, resident):
    path = checkpoints[router]
    model, tok = moekit.load(path)
    off_model, _, _ = load_offloaded(path, max_resident_experts=resident)
    prompts = ["ROMEO: what light through yonder window breaks? It is the east", "To be", "a"]
    greedy = SamplingParams(max_new_tokens=12, temperature=0, stop_ids=(), logprobs=True)
    sampled = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=0, seed=3, stop_ids=(), logprobs=True)
    for params in (greedy, sampled):
        ref = Engine(model, tok, max_batch=2, prefill_chunk=20).generate(prompts, params)  # queue + chunks
        off_engine = Engine(off_model, tok, max_batch=2, prefill_chunk=20)
        got = off_engine.generate(prompts, params)
        assert [c.token_ids for c in got] == [c.token_ids for c in ref]
        assert [c.logprobs for c in got] == [c.logprobs for c in ref]
        s = off_engine.stats.offload
        assert s.fetches == s.hits + s.misses > 0 and 0 < s.hit_rate < 1
    assert moekit.infer.generate(off_model, tok, "To be", max_new_tokens=8, temperature=0) == \
        moekit.infer.generate(model, tok, "To be", max_new_tokens=8, temperature=0)


def test_any_stacked_expert_weights_can_be_offloaded(checkpoints):
    """ExpertOffload over tensors already in memory (e.g. another store): the engine API without a file."""
    model, _ = moekit.load(checkpoints["topk"])
    sources = {i: (b.ffn.experts.gate_up_proj.detach(), b.ffn.experts.down_proj.detach())
               for i, b in enumerate(model.layers) if b.is_moe}
    ref, off = Engine(model), Engine(model, offload=ExpertOffload(sources, 3))
    ids = torch.randint(0, 256, (30,))
    with torch.inference_mode():
        assert torch.equal(off.runner.forward(ids, [(0, 0, 30)], [True]), ref.runner.forward(ids, [(0, 0, 30)], [True]))
    assert off.stats.offload.max_resident_experts == 3 and off.stats.offload.misses > 0
    with pytest.raises(OffloadError, match="max_resident_experts=0 must be an integer from 1 to 8"):
        ExpertOffload(sources, 0)


def test_the_training_forward_reads_the_mapped_experts(checkpoints):
    """Bit for bit although the mapped experts sit off MKL's preferred alignment in the file (moekit.model.experts._aligned)."""
    model, _ = moekit.load(checkpoints["topk"])
    off_model, _, _ = load_offloaded(checkpoints["topk"], max_resident_experts=2)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for shape in ((2, 20), (1, 3), (4, 7), (1, 1)):  # small batches leave one-row expert groups
            ids = torch.randint(0, 256, shape, generator=gen)
            assert torch.equal(off_model(ids).logits, model(ids).logits), shape


# --------------------------------------------------------------------------- memory
def test_experts_stay_in_the_file_and_the_resident_buffers_fit_the_budget(checkpoints):
    model, _, offload = load_offloaded(checkpoints["topk"], max_resident_experts=2)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        assert not t.is_meta, name
    file = offload.file
    moe_blocks = sorted(offload.sources)
    assert moe_blocks == [1, 2]  # the first layer is dense
    for i in moe_blocks:  # the model's expert parameters are views on the mapped file: nothing was copied
        experts = model.layers[i].ffn.experts
        assert experts.gate_up_proj.data_ptr() == file.tensor(f"layers.{i}.ffn.experts.gate_up_proj").data_ptr()
        assert experts.down_proj.data_ptr() == file.tensor(f"layers.{i}.ffn.experts.down_proj").data_ptr()
    cfg = model.cfg
    per_expert = (2 * cfg.expert_ffn_dim * cfg.dim + cfg.dim * cfg.expert_ffn_dim) * 4  # float32
    engine = Engine(model)
    s = engine.stats.offload
    assert s.bytes_per_expert == per_expert
    assert s.resident_bytes == len(moe_blocks) * 2 * per_expert
    all_experts = sum(model.layers[i].ffn.experts.gate_up_proj.nbytes + model.layers[i].ffn.experts.down_proj.nbytes
                      for i in moe_blocks)
    assert all_experts == 4 * s.resident_bytes  # expert weights 4x the budget
    for i in moe_blocks:
        store = engine.runner.blocks[i][2].experts
        assert isinstance(store, OffloadedExperts) and store.resident_bytes == 2 * per_expert and store.slots == 2


def test_a_memory_budget_becomes_a_resident_count(checkpoints):
    cfg = moekit.load(checkpoints["topk"])[0].cfg  # 2 MoE layers
    per_expert = (3 * cfg.expert_ffn_dim * cfg.dim) * 4
    gb = lambda n: n * 2 * per_expert / 1e9  # noqa: E731 - n experts in each of the 2 layers
    assert resident_experts_per_layer(cfg, per_expert, expert_memory_gb=gb(3)) == 3
    assert resident_experts_per_layer(cfg, per_expert, expert_memory_gb=gb(3.9)) == 3
    assert resident_experts_per_layer(cfg, per_expert, expert_memory_gb=100.0) == E
    assert resident_experts_per_layer(cfg, per_expert, max_resident_experts=100) == E
    _, _, offload = load_offloaded(checkpoints["topk"], expert_memory_gb=gb(5))
    assert offload.max_resident_experts == 5
    _, _, offload = load_offloaded(checkpoints["topk"], expert_memory_gb=gb(2), dtype=torch.bfloat16)
    assert offload.max_resident_experts == 4 and offload.bytes_per_expert == per_expert // 2  # resident dtype


def test_bfloat16_offloaded_matches_bfloat16_resident(checkpoints):
    model, _ = moekit.load(checkpoints["topk"], dtype=torch.bfloat16)
    off_model, _, _ = load_offloaded(checkpoints["topk"], max_resident_experts=2, dtype=torch.bfloat16)
    ids = torch.randint(0, 256, (30,))
    with torch.inference_mode():
        a = Engine(model).runner.forward(ids, [(0, 0, 30)], [True])
        b = Engine(off_model).runner.forward(ids, [(0, 0, 30)], [True])
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)


# --------------------------------------------------------------------------- the cache itself
def test_least_recently_used_expert_is_evicted():
    w1, w2 = torch.randn(4, 6, 3), torch.randn(4, 3, 3)
    stats = LayerStats()
    store = OffloadedExperts(w1, w2, 2, stats)
    for e in (0, 1, 0, 2):  # 2 evicts 1, the least recently used
        a, b = store.get(e)
        assert torch.equal(a, w1[e]) and torch.equal(b, w2[e])
    assert store.resident() == [0, 2]
    assert (stats.hits, stats.misses, stats.bytes_read) == (1, 3, 3 * (18 + 9) * 4)
    with pytest.raises(IndexError, match="expert 4 is not in"):
        store.get(4)


@pytest.mark.parametrize("bits, group", [(8, None), (4, 32)])
def test_quantized_experts_are_offloaded_bit_identically(bits, group):
    w1 = QuantizedWeight.quantize(torch.randn(E, 64, 64), bits, group)
    w2 = QuantizedWeight.quantize(torch.randn(E, 64, 32), bits, group)
    resident, stats = ResidentExperts(w1, w2), LayerStats()
    store = OffloadedExperts(w1, w2, 2, stats)
    x = torch.randn(3, 64)
    for e in (5, 1, 5, 7, 0, 1):
        assert torch.equal(_swiglu(x, *store.get(e)), _swiglu(x, *resident.get(e)))
        assert torch.equal(linear(x, store.get(e)[0]), linear(x, w1[e]))
    assert stats.misses == 5 and stats.bytes_read == 5 * store.read_bytes


@pytest.mark.parametrize("bits, group", [(8, None), (4, 32)])
def test_quantized_checkpoints_are_offloaded_bit_identically(tmp_path, bits, group):
    torch.manual_seed(0)
    path = moekit.save(quantize_model(Transformer(_config("topk", first_dense_layers=1)), bits, group), None,
                       tmp_path / f"int{bits}")
    model, _ = moekit.load(path)
    off_model, _, offload = load_offloaded(path, max_resident_experts=2)
    assert isinstance(offload.sources[1][0], MappedQuantizedWeight)
    ref, off = Engine(model, max_batch=2), Engine(off_model, max_batch=2)
    ids = torch.randint(0, 256, (2, 40))
    with torch.inference_mode():
        for tokens, segments in ((ids[0, :30], [(0, 0, 30)]), (ids[1, :8], [(1, 0, 8)]),
                                 (torch.stack([ids[0, 30], ids[1, 8]]), [(0, 30, 1), (1, 8, 1)])):
            assert torch.equal(off.runner.forward(tokens, segments), ref.runner.forward(tokens, segments))
        assert torch.equal(off_model(ids).logits, model(ids).logits)
    s = off.stats.offload
    assert s.misses > 4 and s.bytes_read == s.misses * off.runner.blocks[1][2].experts.read_bytes
    assert s.resident_bytes == 2 * 2 * s.bytes_per_expert  # 2 MoE layers x 2 slots, kernel layout
    greedy = SamplingParams(max_new_tokens=8, temperature=0, stop_ids=())
    assert [c.token_ids for c in off.generate([[1, 2, 3]], greedy)] == [c.token_ids for c in ref.generate([[1, 2, 3]], greedy)]


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("kw, message", [
    (dict(max_resident_experts=1), "resident experts per layer = 1 is below the minimum of top_k=2"),
    (dict(max_resident_experts=0), "below the minimum of top_k=2"),
    (dict(expert_memory_gb=1e-6), "holds 0 experts per layer (2 MoE layers x 0.0246 MB per expert); the minimum is "
                                  "top_k=2 experts per layer: 9.83e-05 GB"),
    (dict(expert_memory_gb=-1.0), "expert memory -1.0 GB must be a number > 0"),
    (dict(), "exactly one of them"),
    (dict(max_resident_experts=2, expert_memory_gb=1.0), "exactly one of them"),
])
def test_bad_budgets_name_the_minimum(checkpoints, kw, message):
    with pytest.raises(OffloadError) as info:
        load_offloaded(checkpoints["topk"], **kw)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_checkpoints_it_cannot_offload_are_refused(tmp_path):
    torch.manual_seed(0)
    dense = moekit.save(Transformer(_config("topk", num_experts=0)), None, tmp_path / "dense")
    with pytest.raises(OffloadError, match="is a dense model"):
        load_offloaded(dense, max_resident_experts=2)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    with pytest.raises(CheckpointError, match="expert offloading reads moekit checkpoints; .* is a hf checkpoint"):
        load_offloaded(hf, max_resident_experts=2)
    broken = moekit.save(Transformer(_config("topk")), None, tmp_path / "broken")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_offloaded(broken, max_resident_experts=2)


def test_an_offload_for_another_model_is_refused(checkpoints):
    _, _, offload = load_offloaded(checkpoints["switch"], max_resident_experts=1)
    model, _ = moekit.load(checkpoints["topk"])
    with pytest.raises(OffloadError, match="not the same model"):
        Engine(model, offload=offload)
    assert isinstance(Engine(model).runner.blocks[1][2], _MoEPlan) and Engine(model).stats.offload is None


def test_the_file_reader_matches_safetensors(checkpoints):
    from safetensors.torch import load_file

    path = checkpoints["topk"] / "model.safetensors"
    file, state = SafetensorsFile(path), load_file(str(path))
    assert set(file.entries) == set(state) and file.metadata.get("moekit") == "1"
    for name, t in state.items():
        assert torch.equal(file.tensor(name), t), name


# --------------------------------------------------------------------------- the command line
def _cli(capsys, *args):
    code = main([*map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_with_offloading_prints_the_same_text_and_the_cache_figures(checkpoints, capsys):
    path = checkpoints["topk"]
    flags = ["--prompt", "ROMEO:", "--temperature", "0", "--max-new-tokens", "12"]
    code, expected, err = _cli(capsys, "generate", path, *flags)
    assert code == 0 and "hit rate" not in err
    # 0.0002 GB / (2 MoE layers x 24576 bytes per expert) = 4 experts per layer
    for extra, resident in ((["--max-resident-experts", "2"], 2), (["--expert-memory", "0.0002"], 4)):
        code, out, err = _cli(capsys, "generate", path, *flags, *extra)
        assert code == 0 and out == expected, err
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"[experts offloaded ({resident} of 8 resident per layer): hit rate ")
        assert "misses of" in last and "MB read" in last and "MB/token" in last


@pytest.mark.parametrize("flags, message", [
    (["--max-resident-experts", "1"], "resident experts per layer = 1 is below the minimum of top_k=2"),
    (["--expert-memory", "0.00001"], "the minimum is top_k=2 experts per layer"),
    (["--max-resident-experts", "2", "--expert-memory", "1"], "give --max-resident-experts N or --expert-memory GB"),
])
def test_bad_offload_flags_are_one_line(checkpoints, capsys, flags, message):
    code, out, err = _cli(capsys, "generate", checkpoints["topk"], "--prompt", "ROMEO:", *flags)
    assert code == 2 and out == ""
    assert err.startswith("moekit generate: error: ") and message in err and err.count("\n") == 1


def test_chat_with_offloading_reports_the_cache_at_the_end(checkpoints, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Who art thou?\nAnd whence?\n"))
    code, out, err = _cli(capsys, "chat", checkpoints["switch"], "--max-resident-experts", "1",
                          "--max-new-tokens", "6", "--temperature", "0")
    assert code == 0 and "Traceback" not in err
    assert "experts offloaded (1 of 8 resident per layer): hit rate" in err.strip().splitlines()[-1]
