"""Tests for moekit.data.special: guesses from token names, the Hugging Face files (read, write, round
trip), the moekit checkpoint format, and what survives save / load / upcycle."""

import json

import pytest
import torch
from tokenizers import Tokenizer, models, processors

import moekit
from moekit import ModelConfig, Transformer
from moekit.convert.upcycle import upcycle
from moekit.data.special import (
    SpecialTokens,
    bos_from_post_processor,
    guess_special_tokens,
    prepend_bos,
    read_chat_template,
    read_hf_special_tokens,
    special_tokens_of,
    write_hf_special_tokens,
)
from moekit.data.tokenizer import find_eos_id, load_tokenizer
from moekit.errors import CheckpointError

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def word_tokenizer(words: list[str]) -> Tokenizer:
    """A word-level tokenizer whose ids are the positions in ``words``."""
    return Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))


def tiny(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_preset("tiny-dense", n_layers=1, **kw)).eval()


# --------------------------------------------------------------------------- guesses from names
def test_guess_on_the_embedded_tokenizer(tok):
    special = guess_special_tokens(tok)
    assert special == SpecialTokens(bos_id=None, eos_ids=(0,), pad_id=1, add_bos=False, chat_template=None)
    assert special.eos_id == find_eos_id(tok) == 0  # the training document separator is unchanged


def test_guess_adds_end_of_turn_tokens_after_the_end_of_text():
    chatml = word_tokenizer(["<unk>", "<|im_end|>", "<|endoftext|>", "<s>", "<pad>", "<|eot_id|>"])
    special = guess_special_tokens(chatml)
    assert (special.bos_id, special.eos_ids, special.pad_id) == (3, (2, 1, 5), 4)
    assert find_eos_id(chatml) == 2
    only_turns = word_tokenizer(["<unk>", "<|im_end|>"])
    assert guess_special_tokens(only_turns).eos_ids == (1,) and find_eos_id(only_turns) == 1
    assert guess_special_tokens(None) == SpecialTokens()


@pytest.mark.parametrize("in_sequence", [False, True])
def test_bos_from_the_post_processor(in_sequence):
    t = word_tokenizer(["<unk>", "hello", "<|begin_of_text|>"])
    template = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 2)])
    # Llama 3's tokenizer.json: Sequence([ByteLevel, TemplateProcessing])
    t.post_processor = processors.Sequence([processors.ByteLevel(), template]) if in_sequence else template
    assert bos_from_post_processor(t) == 2
    special = guess_special_tokens(t)
    assert special.bos_id == 2 and special.add_bos


def test_no_bos_from_a_plain_post_processor(tok):
    assert bos_from_post_processor(tok) is None


def test_eos_ids_are_a_tuple_without_repeats():
    assert SpecialTokens(eos_ids=[2, 0, 2]).eos_ids == (2, 0)
    assert SpecialTokens().eos_id is None


def test_prepend_bos_only_when_expected_and_missing():
    special = SpecialTokens(bos_id=1, add_bos=True)
    assert prepend_bos([5, 6], special) == [1, 5, 6]
    assert prepend_bos([1, 5], special) == [1, 5]  # a chat template already wrote it
    assert prepend_bos([], special) == [1]
    assert prepend_bos([5], SpecialTokens(bos_id=1)) == [5]
    assert prepend_bos([5], SpecialTokens(add_bos=True)) == [5]


def test_special_tokens_of_prefers_what_the_loader_set(tok):
    model = tiny()
    assert special_tokens_of(model, tok) == guess_special_tokens(tok)
    model.special_tokens = SpecialTokens(bos_id=0, eos_ids=(1, 0), chat_template="A")
    model.chat_template = "A"
    assert special_tokens_of(model, tok) == model.special_tokens
    model.chat_template = "B"  # code that sets the older attribute still changes the template
    assert special_tokens_of(model, tok).chat_template == "B" and special_tokens_of(model, tok).eos_ids == (1, 0)


# --------------------------------------------------------------------------- Hugging Face files
def write(directory, name, data):
    (directory / name).write_text(json.dumps(data))


def test_read_generation_config_list_and_tokenizer_names(tmp_path, tok):
    # Llama-3.1-Instruct style: the tokenizer's eos first, then every id generation_config stops on
    write(tmp_path, "tokenizer_config.json", {"eos_token": {"content": "<|pad|>", "special": True},
                                              "add_bos_token": True, "chat_template": TEMPLATE})
    write(tmp_path, "generation_config.json", {"bos_token_id": 7, "eos_token_id": [0, 1, 9]})
    config = {"bos_token_id": 3, "eos_token_id": 4, "pad_token_id": 5}  # generation_config wins for ids
    special = read_hf_special_tokens(tmp_path, tok, config)
    assert special == SpecialTokens(bos_id=7, eos_ids=(1, 0, 9), pad_id=1, add_bos=True, chat_template=TEMPLATE)


def test_read_config_json_without_generation_config(tmp_path, tok):
    special = read_hf_special_tokens(tmp_path, tok, {"bos_token_id": 3, "eos_token_id": [4, 5], "pad_token_id": None})
    assert (special.bos_id, special.eos_ids, special.pad_id) == (3, (4, 5), 1)  # pad: guessed by name


def test_read_names_without_a_tokenizer(tmp_path):
    write(tmp_path, "tokenizer_config.json", {"eos_token": "<|im_end|>", "bos_token": None,
                                              "added_tokens_decoder": {"2": {"content": "<|im_end|>"}}})
    special = read_hf_special_tokens(tmp_path, None, {"bos_token_id": 1})
    assert (special.bos_id, special.eos_ids, special.pad_id, special.add_bos) == (1, (2,), None, False)


def test_read_chat_template_forms(tmp_path):
    assert read_chat_template(tmp_path) is None
    (tmp_path / "chat_template.jinja").write_text("from jinja")
    assert read_chat_template(tmp_path) == "from jinja"
    write(tmp_path, "tokenizer_config.json", {"chat_template": [{"name": "tool_use", "template": "T"},
                                                                {"name": "default", "template": "D"}]})
    assert read_chat_template(tmp_path) == "D"
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="tokenizer_config.json does not hold a JSON object"):
        read_hf_special_tokens(tmp_path, None)


def test_write_then_read_is_the_same(tmp_path, tok):
    special = SpecialTokens(bos_id=0, eos_ids=(1, 0), pad_id=1, add_bos=True, chat_template=TEMPLATE)
    write_hf_special_tokens(tmp_path, special, tok, model_max_length=64)
    assert json.loads((tmp_path / "generation_config.json").read_text()) == {
        "bos_token_id": 0, "eos_token_id": [1, 0], "pad_token_id": 1}
    tok_cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (tok_cfg["eos_token"], tok_cfg["bos_token"], tok_cfg["chat_template"]) == ("<|pad|>", "<|endoftext|>", TEMPLATE)
    assert read_hf_special_tokens(tmp_path, tok) == special


def test_write_removes_what_it_no_longer_says(tmp_path, tok):
    write_hf_special_tokens(tmp_path, SpecialTokens(eos_ids=(0,), chat_template="T"), tok)
    (tmp_path / "chat_template.jinja").write_text("stale")  # transformers would prefer it to ours
    write_hf_special_tokens(tmp_path, SpecialTokens(), None)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- moekit checkpoints
def test_moekit_format_round_trip(tmp_path, tok):
    model = tiny()
    model.special_tokens = SpecialTokens(bos_id=0, eos_ids=(1, 0), pad_id=1, add_bos=True, chat_template=TEMPLATE)
    model.chat_template = TEMPLATE
    # `moekit convert` saves model.float(): the same module, attributes and all
    back, _ = moekit.load(moekit.save(model.float(), tok, tmp_path / "ckpt"))
    assert back.special_tokens == model.special_tokens and back.chat_template == TEMPLATE
    # ... and on to Hugging Face and back
    hf_back, _ = moekit.load(moekit.save(back, tok, tmp_path / "hf", format="hf"))
    assert hf_back.special_tokens == model.special_tokens


def test_moekit_checkpoint_without_metadata_guesses(tmp_path, tok):
    directory = moekit.save(tiny(), tok, tmp_path / "ckpt")
    for name in ("tokenizer_config.json", "generation_config.json"):  # as written before these files existed
        (directory / name).unlink()
    back, _ = moekit.load(directory)
    assert back.special_tokens == guess_special_tokens(tok) and back.chat_template is None


def test_upcycle_keeps_special_tokens(tok):
    dense = tiny()
    dense.special_tokens, dense.chat_template = SpecialTokens(eos_ids=(1,), chat_template="T"), "T"
    moe = upcycle(dense, num_experts=2, top_k=1)
    assert moe.special_tokens == dense.special_tokens and moe.chat_template == "T"
