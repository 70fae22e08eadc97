"""Special tokens of a checkpoint: BOS, the ids that end generation, PAD, whether a prompt starts with
BOS, and the chat template. Read from the checkpoint's own metadata; guessed from token names only
when it has none.

Why metadata first: a chat model ends its turn with its own token (SmolLM2-Instruct: ``<|im_end|>``,
id 2) while its vocabulary also holds ``<|endoftext|>`` (id 0). A guess by name stops on the wrong
one, and the model runs on into a turn it invents.

Where each format keeps them (the loaders set ``model.special_tokens``; the writers read
:func:`special_tokens_of`):

==============  ===========================================  =====================================================
field           GGUF (``moekit.convert.gguf``)               Hugging Face directory and moekit checkpoint (here)
==============  ===========================================  =====================================================
bos_id          ``tokenizer.ggml.bos_token_id``              tokenizer_config ``bos_token``, else ``bos_token_id``
eos_ids         ``eos_token_id``, then ``eot_token_id``      tokenizer_config ``eos_token``, then ``eos_token_id``
                                                             (an int or a list)
pad_id          ``padding_token_id``                         tokenizer_config ``pad_token``, else ``pad_token_id``
add_bos         ``tokenizer.ggml.add_bos_token``             tokenizer_config ``add_bos_token``, else the
                                                             tokenizer.json post-processor
chat_template   ``tokenizer.chat_template``                  tokenizer_config ``chat_template``, else
                                                             ``chat_template.jinja``
==============  ===========================================  =====================================================

The ``*_token_id`` values come from ``generation_config.json`` when it exists, else ``config.json``,
as transformers' ``generate`` takes them. A moekit checkpoint has no ids in its ``config.json`` (that
is the ModelConfig) and keeps them in the same ``tokenizer_config.json`` and ``generation_config.json``
the Hugging Face export writes, so every format round-trips through the others.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from moekit.utils import atomic_write_text, read_json

# Names of special tokens across tokenizer families, most common first. The first EOS name found is
# "the" end of text (also the training document separator, ``find_eos_id``); end-of-turn tokens end a
# reply in chat models, so a guess stops on them too (ChatML, Llama 3, Gemma, Phi-3).
BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>")
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
END_OF_TURN_NAMES = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>")
PAD_NAMES = ("<|pad|>", "<pad>")

TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers >= 4.50 writes the template here


@dataclass
class SpecialTokens:
    """What a checkpoint says about its special tokens; ids index the checkpoint's own tokenizer."""

    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()  # every id that ends generation; eos_ids[0] is "the" eos (eos_token_id)
    pad_id: int | None = None
    add_bos: bool = False  # the model expects BOS at the start of a prompt (see prepend_bos)
    chat_template: str | None = None  # Jinja, as in Hugging Face's tokenizer_config.json

    def __post_init__(self) -> None:
        self.eos_ids = tuple(dict.fromkeys(int(i) for i in self.eos_ids))  # a list is fine; repeats dropped

    @property
    def eos_id(self) -> int | None:
        """"The" end-of-sequence id (the one written as ``eos_token_id``), or None."""
        return self.eos_ids[0] if self.eos_ids else None


# --------------------------------------------------------------------------- guessing from names
def _first_id(tokenizer: Tokenizer, names: Iterable[str]) -> int | None:
    return next((i for i in map(tokenizer.token_to_id, names) if i is not None), None)


def guess_eos_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """The first end-of-text token found by name, then every end-of-turn token the vocabulary has."""
    eos = _first_id(tokenizer, EOS_NAMES)
    turns = (tokenizer.token_to_id(name) for name in END_OF_TURN_NAMES)
    return tuple(dict.fromkeys(i for i in (eos, *turns) if i is not None))


def bos_from_post_processor(tokenizer: Tokenizer) -> int | None:
    """The BOS id that encoding prepends: a TemplateProcessing (alone, or inside a Sequence as in Llama 3's
    tokenizer.json) whose single-sequence template starts with a special token; None otherwise."""
    post = json.loads(tokenizer.to_str()).get("post_processor") or {}
    for proc in post.get("processors", [post]) if post.get("type") == "Sequence" else [post]:
        if proc.get("type") != "TemplateProcessing" or not proc.get("single"):
            continue
        first = proc["single"][0].get("SpecialToken")
        if first is None:
            return None
        ids = (proc.get("special_tokens", {}).get(first["id"]) or {}).get("ids") or []
        return int(ids[0]) if ids else tokenizer.token_to_id(first["id"])
    return None


def guess_special_tokens(tokenizer: Tokenizer | None) -> SpecialTokens:
    """Special tokens from names alone, for a checkpoint whose metadata says nothing (moekit's own
    tokenizer: eos ``<|endoftext|>`` = 0, pad ``<|pad|>`` = 1, no BOS). BOS is the token the
    tokenizer's post-processor prepends (then ``add_bos``), else one named like a BOS."""
    if tokenizer is None:
        return SpecialTokens()
    prepended = bos_from_post_processor(tokenizer)
    return SpecialTokens(bos_id=prepended if prepended is not None else _first_id(tokenizer, BOS_NAMES),
                         eos_ids=guess_eos_ids(tokenizer), pad_id=_first_id(tokenizer, PAD_NAMES),
                         add_bos=prepended is not None)


def fill_missing(found: SpecialTokens, tokenizer: Tokenizer | None) -> SpecialTokens:
    """``found`` (what metadata said), with an absent BOS, EOS or PAD guessed from token names."""
    if found.bos_id is not None and found.eos_ids and found.pad_id is not None:
        return found
    guess = guess_special_tokens(tokenizer)
    return dataclasses.replace(found, bos_id=found.bos_id if found.bos_id is not None else guess.bos_id,
                               eos_ids=found.eos_ids or guess.eos_ids,
                               pad_id=found.pad_id if found.pad_id is not None else guess.pad_id)


def special_tokens_of(model: Any, tokenizer: Tokenizer | None) -> SpecialTokens:
    """The special tokens to use with ``model``: ``model.special_tokens`` as its loader read them, or a
    guess from ``tokenizer``'s names for a model no loader made (a fresh or trained one).

    NOTE: ``model.chat_template`` is the older attribute, which code reads and sets; where the model has
    one it is the template (loaders set both to the same value).
    """
    special = getattr(model, "special_tokens", None)
    if not isinstance(special, SpecialTokens):
        special = guess_special_tokens(tokenizer)
    template = getattr(model, "chat_template", special.chat_template)
    if template != special.chat_template:
        special = dataclasses.replace(special, chat_template=template)
    return special


def prepend_bos(ids: list[int], special: SpecialTokens) -> list[int]:
    """``ids`` with BOS in front when the model expects it and it is not there already (a chat
    template often writes it as text). Encode prompts without special tokens, then call this."""
    if not special.add_bos or special.bos_id is None or ids[:1] == [special.bos_id]:
        return list(ids)
    return [special.bos_id, *ids]


# --------------------------------------------------------------------------- Hugging Face files
def _token_id(value: Any) -> int | None:
    """A token id from JSON: a non-negative int (not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _token_ids(value: Any) -> list[int]:
    """``eos_token_id`` may be an int or a list of ints."""
    values = value if isinstance(value, list) else [value]
    return [i for i in map(_token_id, values) if i is not None]


def _read_optional(path: Path) -> dict[str, Any]:
    return read_json(path) if path.is_file() else {}


def read_chat_template(directory: Path) -> str | None:
    """The chat template from ``tokenizer_config.json`` (the ``default`` one when it holds named
    templates), or transformers' ``chat_template.jinja``; None when there is none."""
    template = _read_optional(directory / TOKENIZER_CONFIG).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    if isinstance(template, str):
        return template
    jinja = directory / CHAT_TEMPLATE_FILE
    return jinja.read_text(encoding="utf-8") if jinja.is_file() else None


def read_hf_special_tokens(directory: Path, tokenizer: Tokenizer | None,
                           config: dict[str, Any] | None = None) -> SpecialTokens:
    """Special tokens from a Hugging Face directory or moekit checkpoint (see the module docstring for
    where each comes from); ``config`` is a Hugging Face ``config.json`` already read. Fields the files
    leave out are guessed from ``tokenizer``'s names."""
    tok_cfg = _read_optional(directory / TOKENIZER_CONFIG)
    gen_cfg = _read_optional(directory / GENERATION_CONFIG)
    ids_from = gen_cfg if (directory / GENERATION_CONFIG).is_file() else (config or {})
    added = {}  # names of added tokens, for a directory without tokenizer.json
    for key, token in (tok_cfg.get("added_tokens_decoder") or {}).items():
        if isinstance(token, dict) and str(key).isdigit():
            added[token.get("content")] = int(key)

    def named(key: str) -> int | None:
        name = tok_cfg.get(key)
        name = name.get("content") if isinstance(name, dict) else name  # an AddedToken serialised whole
        if not isinstance(name, str):
            return None
        found = tokenizer.token_to_id(name) if tokenizer is not None else None
        return found if found is not None else added.get(name)

    def first(*candidates: int | None) -> int | None:
        return next((i for i in candidates if i is not None), None)

    add_bos = tok_cfg.get("add_bos_token")
    found = SpecialTokens(
        bos_id=first(named("bos_token"), _token_id(ids_from.get("bos_token_id"))),
        eos_ids=[i for i in (named("eos_token"), *_token_ids(ids_from.get("eos_token_id"))) if i is not None],
        pad_id=first(named("pad_token"), _token_id(ids_from.get("pad_token_id"))),
        add_bos=add_bos if isinstance(add_bos, bool) else (
            tokenizer is not None and bos_from_post_processor(tokenizer) is not None),
        chat_template=read_chat_template(directory),
    )
    return fill_missing(found, tokenizer)


def hf_config_ids(special: SpecialTokens) -> dict[str, int | None]:
    """bos/eos/pad ids for a Hugging Face ``config.json``, written even when None so that transformers'
    class defaults (e.g. Mixtral's bos=1, eos=2) never apply to a tokenizer they do not fit."""
    return {"bos_token_id": special.bos_id, "eos_token_id": special.eos_id, "pad_token_id": special.pad_id}


def write_hf_special_tokens(directory: Path, special: SpecialTokens, tokenizer: Tokenizer | None,
                            model_max_length: int | None = None) -> None:
    """Write ``tokenizer_config.json`` (tokenizer class, token names, ``add_bos_token``, chat template) and
    ``generation_config.json`` (the ids; ``eos_token_id`` a list when several tokens end generation).
    A file with nothing to say is not written, and an older one in its place is removed, as is a
    ``chat_template.jinja`` (transformers prefers it to the template written here)."""
    directory = Path(directory)
    tok_cfg: dict[str, Any] = {}
    if tokenizer is not None:
        tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": special.add_bos}
        if model_max_length is not None:
            tok_cfg["model_max_length"] = model_max_length
        for key, token_id in (("bos_token", special.bos_id), ("eos_token", special.eos_id),
                              ("pad_token", special.pad_id)):
            name = tokenizer.id_to_token(token_id) if token_id is not None else None
            if name is not None:
                tok_cfg[key] = name
    if special.chat_template is not None:
        tok_cfg["chat_template"] = special.chat_template
    eos: int | list[int] | None = list(special.eos_ids) if len(special.eos_ids) > 1 else special.eos_id
    gen_cfg = {k: v for k, v in (("bos_token_id", special.bos_id), ("eos_token_id", eos),
                                 ("pad_token_id", special.pad_id)) if v is not None}
    for name, data in ((TOKENIZER_CONFIG, tok_cfg), (GENERATION_CONFIG, gen_cfg)):
        if data:
            atomic_write_text(directory / name, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        elif (directory / name).is_file():
            (directory / name).unlink()
    (directory / CHAT_TEMPLATE_FILE).unlink(missing_ok=True)
