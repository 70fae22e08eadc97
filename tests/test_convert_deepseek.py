"""DeepSeek-V3 import: a tiny random transformers DeepseekV3ForCausalLM against moekit (MLA, sigmoid
routing with a selection bias and group-limited top-k, shared experts, dense first layer)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from greedy_check import assert_same_greedy  # noqa: E402

from moekit.config import ConfigError  # noqa: E402
from moekit.convert.hf import load_hf  # noqa: E402
from moekit.infer.generate import generate_tokens  # noqa: E402

transformers = pytest.importorskip("transformers")


def tiny(q_lora_rank):
    return transformers.DeepseekV3Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
        n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=q_lora_rank, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=64, routed_scaling_factor=2.5,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0})


@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_deepseek_v3_import_matches_transformers(tmp_path, q_lora_rank):
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(tiny(q_lora_rank), dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.2 * torch.randn(p.shape, generator=gen))
        for layer in hf.model.layers[1:]:  # a selection bias that matters
            layer.mlp.gate.e_score_correction_bias.copy_(0.3 * torch.randn(8, generator=gen))
    hf.save_pretrained(tmp_path)
    model, _ = load_hf(tmp_path)
    assert model.cfg.attention == "mla" and model.cfg.router == "sigmoid_bias" and model.cfg.first_dense_layers == 1
    assert torch.equal(model.layers[1].ffn.router.bias, hf.model.layers[1].mlp.gate.e_score_correction_bias)

    ids = torch.randint(0, 128, (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).logits
        got = model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=1e-4)

    prompt = ids[:1, :5]
    want_tokens = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[:, 5:]
    got_tokens = torch.stack(list(generate_tokens(model, prompt, 6, temperature=0)), dim=1)
    # two implementations: the same tokens up to rounding ties, each checked against transformers' logits
    assert_same_greedy(hf, prompt[0].tolist(), got_tokens[0].tolist(), want_tokens[0].tolist())


def test_deepseek_v3_refuses_yarn(tmp_path):
    import json

    cfg = tiny(None).to_dict()
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="rope_type='yarn' is not supported"):
        load_hf(tmp_path)


def test_deepseek_v3_bf16_checkpoint_keeps_the_selection_bias_float32(tmp_path):
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(tiny(None), dtype=torch.float32)
    for layer in hf.model.layers[1:]:
        layer.mlp.gate.e_score_correction_bias.copy_(torch.linspace(-0.3, 0.3, 8) + 1e-3)  # not bf16-exact
    hf.save_pretrained(tmp_path)  # float32 bias, as DeepSeek-V3 ships it; then the weights in bf16
    model, _ = load_hf(tmp_path, dtype="bfloat16")
    bias = model.layers[1].ffn.router.bias
    assert model.embed.weight.dtype == torch.bfloat16 and bias.dtype == torch.float32
    assert torch.equal(bias, hf.model.layers[1].mlp.gate.e_score_correction_bias)
