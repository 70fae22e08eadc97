"""Hugging Face import/export: tiny random transformers models against moekit, logits and greedy tokens.

Each architecture is built with transformers, saved with ``save_pretrained`` (per-expert layout, the
default, and the fused 3-D layout of transformers 5), loaded with ``load_hf`` and compared in float32
on a right-padded batch. Exports go the other way and are loaded with ``from_pretrained``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local paths only: never reach the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from greedy_check import assert_same_greedy  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from moekit.checkpoint import CheckpointError  # noqa: E402
from moekit.config import ConfigError, ModelConfig  # noqa: E402
from moekit.convert import hf as hf_mod  # noqa: E402
from moekit.convert.hf import inspect_hf, load_hf, save_hf  # noqa: E402
from moekit.convert.hf_archs import ARCHITECTURES, ArchSpec, register_architecture  # noqa: E402
from moekit.data.special import SpecialTokens  # noqa: E402
from moekit.data.tokenizer import load_tokenizer  # noqa: E402
from moekit.infer.generate import generate_tokens  # noqa: E402
from moekit.model import Transformer  # noqa: E402

transformers = pytest.importorskip("transformers")
# transformers warns when it "initialises" the zero-width shared expert that stands for none (see qwen2_moe export).
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op:UserWarning")



@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Models this small gain nothing from threads, and on a shared CPU spinning worker threads made
    this file several times slower (measured: 6 s on one thread, 50 s on two under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


VOCAB = 128
BODY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, initializer_range=0.2,
            tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
            rope_parameters={"rope_type": "default", "rope_theta": 500.0})
MOE = dict(num_experts=4, num_experts_per_tok=2)


def hf_config(model_type: str):
    """A tiny transformers config for each architecture, exercising its particular features."""
    T = transformers
    if model_type == "mixtral":
        return T.MixtralConfig(**BODY, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
    if model_type == "qwen2_moe":  # shared expert with sigmoid gate, a dense first layer, q/k/v biases
        return T.Qwen2MoeConfig(**{**BODY, "num_hidden_layers": 3}, **MOE, moe_intermediate_size=32,
                                shared_expert_intermediate_size=48, norm_topk_prob=False, mlp_only_layers=[0])
    if model_type == "qwen3_moe":  # per-head QK-norm, head_dim != hidden / heads
        return T.Qwen3MoeConfig(**BODY, **MOE, moe_intermediate_size=32, norm_topk_prob=True, head_dim=32)
    if model_type == "olmoe":  # QK-norm over all heads
        return T.OlmoeConfig(**BODY, **MOE, norm_topk_prob=False)
    if model_type == "llama":
        return T.LlamaConfig(**{**BODY, "tie_word_embeddings": True})
    if model_type == "mistral":
        return T.MistralConfig(**BODY, sliding_window=None)
    if model_type == "qwen2":
        return T.Qwen2Config(**BODY)
    raise AssertionError(model_type)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights ~ N(0, 0.2), norms ~ N(1, 0.2), biases too, so that every tensor's place shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        mean = 1.0 if "norm" in name else 0.0
        p.copy_(mean + 0.2 * torch.randn(p.shape, generator=gen))


def hf_model(model_type: str):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(model_type), dtype=torch.float32)
    randomize(model)
    return model.eval()


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows, the second right-padded: ids [2, 9], mask [2, 9]."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask


@torch.no_grad()
def assert_same_logits(moekit_model, hf, atol: float = 1e-4) -> None:
    ids, mask = batch()
    want = hf(input_ids=ids, attention_mask=mask).logits
    got = moekit_model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=atol, rtol=1e-4)


@torch.no_grad()
def assert_same_greedy_tokens(moekit_model, hf, n: int = 6) -> None:
    prompt = batch(seed=2)[0][:1, :5]
    want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                       eos_token_id=None, pad_token_id=0)[:, prompt.shape[1]:]
    got = torch.stack(list(generate_tokens(moekit_model, prompt, n, temperature=0)), dim=1)
    # two implementations: the same tokens up to rounding ties, each checked against transformers' logits
    assert_same_greedy(hf, prompt[0].tolist(), got[0].tolist(), want[0].tolist())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``saved(model_type, layout)`` -> (HF model, directory), built once per module."""
    cache: dict[tuple[str, str], tuple] = {}

    def get(model_type: str, layout: str = "per_expert"):
        if (model_type, layout) not in cache:
            model = hf_model(model_type)
            directory = tmp_path_factory.mktemp(f"{model_type}-{layout}")
            kwargs = {"save_original_format": False} if layout == "fused" else {}
            if layout == "sharded":
                kwargs["max_shard_size"] = "60KB"
            model.save_pretrained(directory, **kwargs)
            cache[model_type, layout] = (model, directory)
        return cache[model_type, layout]

    return get


def copy_of(directory, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(directory, target)
    return target


def edit_config(directory, **changes) -> None:
    path = directory / "config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# =========================================================================== import parity
@pytest.mark.parametrize("model_type,layout", [
    ("mixtral", "per_expert"), ("mixtral", "fused"), ("mixtral", "sharded"),
    ("qwen2_moe", "per_expert"), ("qwen2_moe", "fused"),
    ("qwen3_moe", "per_expert"), ("qwen3_moe", "fused"),
    ("olmoe", "per_expert"), ("olmoe", "fused"),
    ("llama", "per_expert"), ("mistral", "per_expert"), ("qwen2", "per_expert"),
])
def test_import_matches_transformers(saved, model_type, layout):
    hf, directory = saved(model_type, layout)
    if layout == "sharded":
        assert (directory / "model.safetensors.index.json").exists()
    model, tokenizer = load_hf(directory)
    assert tokenizer is None and model.chat_template is None and not model.training
    assert model.embed.weight.dtype == torch.float32
    assert_same_logits(model, hf)
    assert_same_greedy_tokens(model, hf)


def test_import_translates_the_config(saved):
    cfg = load_hf(saved("qwen2_moe")[1])[0].cfg
    assert (cfg.num_experts, cfg.top_k, cfg.expert_ffn_dim, cfg.ffn_dim) == (4, 2, 32, 96)
    assert (cfg.num_shared_experts, cfg.shared_expert_ffn_dim, cfg.shared_expert_gate) == (1, 48, True)
    assert (cfg.first_dense_layers, cfg.moe_every, cfg.attention_bias, cfg.norm_topk_prob) == (1, 1, True, False)
    assert cfg.rope_theta == 500.0 and cfg.n_kv_heads == 2 and not cfg.tie_embeddings
    assert load_hf(saved("qwen3_moe")[1])[0].cfg.head_dim == 32
    assert load_hf(saved("llama")[1])[0].cfg.tie_embeddings


def test_import_older_mixtral_names(saved, tmp_path):
    """Mixtral checkpoints written as ``mlp.experts.{j}.w1`` (not ``block_sparse_moe``) load too."""
    hf, directory = saved("mixtral")
    target = copy_of(directory, tmp_path)
    state = load_file(target / "model.safetensors")
    assert any(".block_sparse_moe.experts.0.w1." in k for k in state)
    save_file({k.replace(".block_sparse_moe.", ".mlp."): v for k, v in state.items()}, target / "model.safetensors")
    assert_same_logits(load_hf(target)[0], hf)


def test_import_keeps_the_checkpoint_dtype_unless_asked(tmp_path):
    hf_model("olmoe").to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert load_hf(tmp_path / "bf16")[0].embed.weight.dtype == torch.bfloat16
    model = load_hf(tmp_path / "bf16", dtype=torch.float32)[0]
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_import_builds_on_meta_and_reads_lazily(saved, monkeypatch):
    """No initialised copy of the weights: the model is built on the meta device, and no whole-file
    reader is used."""
    devices = []
    original = Transformer.reset_parameters

    def spy(self, seed=None):
        devices.append(self.embed.weight.device.type)
        original(self, seed)

    monkeypatch.setattr(Transformer, "reset_parameters", spy)
    monkeypatch.setattr("safetensors.torch.load_file", lambda *a, **k: pytest.fail("read a whole file"))
    load_hf(saved("mixtral")[1])
    assert devices == ["meta"]


def test_import_tokenizer_and_chat_template(saved, tmp_path):
    target = copy_of(saved("llama")[1], tmp_path)
    load_tokenizer().save(str(target / "tokenizer.json"))
    (target / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    model, tokenizer = load_hf(target)
    assert tokenizer.token_to_id("<|endoftext|>") == 0
    assert model.chat_template == "{{ messages }}" == model.special_tokens.chat_template
    # the files name no special tokens: guessed from the tokenizer's names
    assert model.special_tokens == SpecialTokens(eos_ids=(0,), pad_id=1, chat_template="{{ messages }}")


def test_import_special_tokens_as_transformers_writes_them(saved, tmp_path):
    """Llama-3.1-Instruct style: generation_config.json stops on several ids, the tokenizer names its eos."""
    target = copy_of(saved("llama")[1], tmp_path)
    load_tokenizer().save(str(target / "tokenizer.json"))
    edit_config(target, bos_token_id=7, eos_token_id=3, pad_token_id=None)
    transformers.GenerationConfig(bos_token_id=7, eos_token_id=[0, 1, 9]).save_pretrained(target)
    (target / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|pad|>", "add_bos_token": True}))
    (target / "chat_template.jinja").write_text("{{ messages }}")  # transformers >= 4.50 keeps it here
    model, _ = load_hf(target)
    assert model.special_tokens == SpecialTokens(bos_id=7, eos_ids=(1, 0, 9), pad_id=1, add_bos=True,
                                                 chat_template="{{ messages }}")


# =========================================================================== export parity
def moekit_model(**overrides) -> Transformer:
    fields = dict(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64,
                  rope_theta=500.0, tie_embeddings=False, num_experts=4, top_k=2, expert_ffn_dim=32)
    model = Transformer(ModelConfig(**{**fields, **overrides}))
    randomize(model, seed=3)
    return model.eval()


def export_and_compare(model: Transformer, tmp_path, model_type: str, **kwargs):
    directory = save_hf(model, None, tmp_path / "export", **kwargs)
    assert json.loads((directory / "config.json").read_text())["model_type"] == model_type
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    assert_same_logits(model, hf)
    back = load_hf(directory)[0]
    assert_same_logits(back, hf)
    return hf, directory


@pytest.mark.parametrize("name,overrides,model_type", [
    ("topk", {}, "mixtral"),
    ("tied dense", dict(num_experts=0, tie_embeddings=True), "llama"),
    ("dense with q/k/v biases", dict(num_experts=0, attention_bias=True), "qwen2"),
    ("gated shared expert, dense first layer, no renormalisation",
     dict(n_layers=3, num_shared_experts=1, shared_expert_ffn_dim=48, shared_expert_gate=True, first_dense_layers=1,
          attention_bias=True, norm_topk_prob=False), "qwen2_moe"),
    ("ungated shared experts", dict(num_shared_experts=2, moe_every=2, n_layers=3), "qwen2_moe"),
    ("no renormalisation, no shared expert", dict(norm_topk_prob=False), "qwen2_moe"),
    ("switch", dict(router="switch", top_k=1, capacity_factor=1.25), "qwen2_moe"),
    ("per-head qk-norm", dict(qk_norm="head", head_dim=32), "qwen3_moe"),
    ("qk-norm over all heads", dict(qk_norm="full"), "olmoe"),
])
def test_export_matches_transformers(tmp_path, name, overrides, model_type):
    export_and_compare(moekit_model(**overrides), tmp_path, model_type)


def test_export_round_trip_is_exact(tmp_path):
    model = moekit_model(num_shared_experts=1, shared_expert_gate=True, first_dense_layers=1, n_layers=3)
    hf, directory = export_and_compare(model, tmp_path, "qwen2_moe", expert_layout="per_expert")
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in load_file(directory / "model.safetensors")
    back = load_hf(directory)[0]
    assert back.cfg == dataclasses.replace(model.cfg, z_loss_coef=0.0)
    for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name
    assert_same_greedy_tokens(back, hf)


def test_export_fused_and_sharded(tmp_path):
    model = moekit_model()
    _, directory = export_and_compare(model, tmp_path, "mixtral", expert_layout="fused", max_shard_bytes=40_000)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert "model.layers.0.mlp.experts.gate_up_proj" in index["weight_map"]
    assert len(set(index["weight_map"].values())) > 1 and not (directory / "model.safetensors").exists()
    # per-expert Mixtral files use the on-disk names of public checkpoints
    save_hf(model, None, directory)
    names = load_file(directory / "model.safetensors")
    assert "model.layers.1.block_sparse_moe.experts.2.w3.weight" in names
    assert not (directory / "model.safetensors.index.json").exists()


def test_export_tokenizer_and_chat_template(tmp_path):
    model = moekit_model(num_experts=0)
    model.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer = load_tokenizer()
    directory = save_hf(model, tokenizer, tmp_path / "export")
    config = json.loads((directory / "config.json").read_text())
    assert (config["eos_token_id"], config["pad_token_id"], config["bos_token_id"]) == (0, 1, None)
    assert transformers.GenerationConfig.from_pretrained(directory).eos_token_id == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(directory)
    assert hf_tok.encode("To be, or not") == tokenizer.encode("To be, or not").ids
    assert hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi"
    back, back_tok = load_hf(directory)
    assert back.chat_template == model.chat_template and back_tok.get_vocab_size() == tokenizer.get_vocab_size()


def test_export_writes_the_models_special_tokens_not_a_guess(tmp_path):
    model = moekit_model(num_experts=0, vocab_size=4096)
    template = "{% for m in messages %}{{ m['content'] }}<|pad|>{% endfor %}"
    model.special_tokens = SpecialTokens(bos_id=0, eos_ids=(1, 0), pad_id=0, chat_template=template)
    model.chat_template = template
    directory = save_hf(model, load_tokenizer(), tmp_path / "export")
    config = json.loads((directory / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (0, 1, 0)
    generation = transformers.GenerationConfig.from_pretrained(directory)
    assert (generation.eos_token_id, generation.bos_token_id) == ([1, 0], 0)  # transformers stops on both
    hf_tok = transformers.AutoTokenizer.from_pretrained(directory)
    assert (hf_tok.eos_token, hf_tok.bos_token, hf_tok.pad_token) == ("<|pad|>", "<|endoftext|>", "<|endoftext|>")
    assert hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi<|pad|>"
    assert load_hf(directory)[0].special_tokens == model.special_tokens


@pytest.mark.parametrize("router", ["expert_choice", "noisy_topk", "sigmoid_bias"])
def test_export_refuses_routers_without_equivalent(tmp_path, router):
    model = moekit_model(router=router)
    with pytest.raises(ConfigError, match=rf"router='{router}' has no Hugging Face equivalent; export supports "
                                          r"router in \['topk', 'switch'\]"):
        save_hf(model, None, tmp_path / "export")
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("overrides,model_type,message", [
    (dict(first_dense_layers=1), "mixtral", "first_dense_layers=1, moe_every=1: every mixtral layer is MoE"),
    (dict(qk_norm="head", head_dim=32), "qwen2_moe", "qk_norm='head': qwen2_moe has no QK-norm"),
    (dict(eval_capacity_factor=1.0), None, "eval_capacity_factor=1.0 drops tokens at inference"),
    (dict(routed_scaling_factor=2.0), "mixtral", "routed_scaling_factor=2.0 has no equivalent in mixtral's router"),
    (dict(num_experts=0, qk_norm="full"), None, "qk_norm='full': llama has no QK-norm"),
    (dict(num_shared_experts=1, qk_norm="full"), None, "olmoe has no shared experts"),
    ({}, "mistral", "cannot export as model_type='mistral'; export supports llama, mixtral, olmoe"),
    (dict(attention="mla", kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16), None,
     "attention='mla': mixtral has multi-head / grouped-query attention only"),
])
def test_export_refuses_what_the_architecture_cannot_hold(tmp_path, overrides, model_type, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        save_hf(moekit_model(**overrides), None, tmp_path / "export", model_type=model_type)


# =========================================================================== inspect
def test_inspect_reads_headers_only(saved, monkeypatch):
    hf, directory = saved("qwen2_moe", "fused")
    monkeypatch.setattr(hf_mod, "safe_open", lambda *a, **k: pytest.fail("opened the weights"))
    info = inspect_hf(directory)
    assert info["model_type"] == "qwen2_moe" and info["format"] == "hf" and info["dtype"] == "float32"
    assert info["architecture"] == "Qwen2MoeForCausalLM"
    assert (info["num_experts"], info["top_k"], info["num_shared_experts"], info["router"]) == (4, 2, 1, "topk")
    assert (info["n_layers"], info["moe_layers"], info["dim"], info["vocab_size"]) == (3, 2, 64, VOCAB)
    assert info["stored_parameters"] == sum(p.numel() for p in hf.parameters())
    assert info["parameters"] == info["stored_parameters"]
    per_expert = 3 * 64 * 32
    assert info["active_parameters"] == info["parameters"] - 2 * (4 - 2) * per_expert
    assert "MoE: 2/3 layers" in info["summary"] and info["files"] == ["model.safetensors"]
    assert info["tensors"] == len(hf.state_dict())  # saved fused: the files hold the module's own tensors
# =========================================================================== bad inputs
def config_only(tmp_path, model_type: str, **changes):
    """A directory holding only config.json: translation runs before any weight is looked at."""
    directory = tmp_path / model_type
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({**hf_config(model_type).to_dict(), **changes}))
    return directory


@pytest.mark.parametrize("model_type,changes,message", [
    ("mixtral", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}, rope_parameters=None),
     "rope_scaling with rope_type='yarn' is not supported"),
    ("llama", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
     "rope_parameters with rope_type='linear' is not supported"),
    ("mistral", dict(sliding_window=16), "sliding_window=16 < max_position_embeddings=64 is not supported"),
    ("qwen2", dict(use_sliding_window=True, sliding_window=16), "use_sliding_window=true with sliding_window=16"),
    ("qwen2_moe", dict(num_hidden_layers=4, mlp_only_layers=[2]),
     r"decoder_sparse_step=1, mlp_only_layers=\[2\] put MoE blocks in layers \[0, 1, 3\]"),
    ("qwen3_moe", dict(decoder_sparse_step=0), "decoder_sparse_step=0 must be an integer >= 1"),
    ("mixtral", dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    ("olmoe", dict(clip_qkv=8.0), "clip_qkv=8.0 is not supported"),
    ("qwen3_moe", dict(attention_bias=True), "attention_bias=true is not supported for qwen3_moe"),
    ("llama", dict(mlp_bias=True), "mlp_bias=true is not supported"),
])
def test_import_refuses_unsupported_settings(tmp_path, model_type, changes, message):
    with pytest.raises(ConfigError, match=message):
        load_hf(config_only(tmp_path, model_type, **changes))


def test_import_expressible_sparse_steps(tmp_path):
    cfg = ARCHITECTURES["qwen2_moe"].to_config({**hf_config("qwen2_moe").to_dict(), "num_hidden_layers": 6,
                                                "decoder_sparse_step": 2, "mlp_only_layers": []})
    assert (cfg.first_dense_layers, cfg.moe_every) == (1, 2)
    assert [cfg.is_moe_layer(i) for i in range(6)] == [False, True, False, True, False, True]


def test_unsupported_model_type_lists_the_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="model_type=.gpt2. is not supported; supported: deepseek_v3, llama, mistral, mixtral, "
                                          "olmoe, qwen2, qwen2_moe, qwen3_moe"):
        load_hf(tmp_path)


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing: not a Hugging Face checkpoint"):
        load_hf(tmp_path)


def test_missing_shard_is_named(saved, tmp_path):
    target = copy_of(saved("mixtral", "sharded")[1], tmp_path)
    shard = sorted(target.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"names shard '{shard.name}', which is missing"):
        load_hf(target)


def test_truncated_file_is_named(saved, tmp_path):
    target = copy_of(saved("olmoe")[1], tmp_path)
    path = target / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    for load in (load_hf, inspect_hf):
        with pytest.raises(CheckpointError, match=r"model\.safetensors is (corrupt or )?truncated"):
            load(target)


def test_wrong_shape_names_tensor_and_shapes(saved, tmp_path):
    target = copy_of(saved("mixtral", "fused")[1], tmp_path)
    edit_config(target, vocab_size=100)
    with pytest.raises(CheckpointError, match=r"tensor 'model.embed_tokens.weight' has shape \(128, 64\), "
                                              r"config.json implies \(100, 64\)"):
        load_hf(target)
    edit_config(target, vocab_size=VOCAB, intermediate_size=80)
    with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.experts.gate_up_proj' has shape \(4, 192, 64\)"):
        load_hf(target)


def test_wrong_expert_shape_names_the_expert(saved, tmp_path):
    target = copy_of(saved("qwen3_moe")[1], tmp_path)
    edit_config(target, moe_intermediate_size=16)
    with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.experts.0.gate_proj.weight' has shape "
                                              r"\(32, 64\), config.json implies \(16, 64\)"):
        load_hf(target)


def test_missing_and_unexpected_tensors(saved, tmp_path):
    target = copy_of(saved("qwen3_moe")[1], tmp_path)
    path = target / "model.safetensors"
    state = load_file(path)
    del state["model.norm.weight"], state["model.layers.1.mlp.experts.3.down_proj.weight"]
    state["model.layers.0.mlp.experts.4.up_proj.weight"] = state["model.layers.0.mlp.experts.0.up_proj.weight"].clone()
    state["model.layers.0.mlp.foo.weight"] = torch.zeros(2)
    save_file(state, path)
    with pytest.raises(CheckpointError) as err:
        load_hf(target)
    message = str(err.value)
    assert "\n" not in message
    assert "2 missing tensors ['model.layers.1.mlp.experts.3.down_proj.weight', 'model.norm.weight']" in message
    assert "2 unexpected tensors" in message and "'model.layers.0.mlp.foo.weight'" in message
    assert "'model.layers.0.mlp.experts.4.up_proj.weight'" in message


def test_register_architecture():
    spec = ArchSpec(to_config=lambda hf: ARCHITECTURES["llama"].to_config(hf))
    with pytest.raises(ValueError, match="already registered"):
        register_architecture("llama", spec)
    register_architecture("my_llama", spec)
    try:
        assert "my_llama" in ARCHITECTURES
    finally:
        del ARCHITECTURES["my_llama"]
