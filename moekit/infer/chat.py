"""Conversations: messages -> prompt text with the model's chat template, and the terminal chat loop.

A checkpoint's chat template is Jinja (Hugging Face ``tokenizer_config.json``, GGUF
``tokenizer.chat_template``); it is rendered in a sandbox, as transformers' ``apply_chat_template``
does, with ``messages``, ``add_generation_prompt``, ``bos_token`` and ``eos_token``. A model without
a template (moekit's own, trained on plain text) gets a plain alternation of ``User:`` and
``Assistant:`` lines, and stops when it starts a ``User:`` line of its own.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from typing import TextIO

from moekit.data.special import SpecialTokens
from moekit.infer.engine import Engine, SamplingParams

#: Where a plain-alternation conversation stops: the model starting the user's next line.
PLAIN_STOPS = ("\nUser:",)


class ChatTemplateError(ValueError):
    """The checkpoint's chat template failed to render; the message says where."""


def render_chat(messages: list[dict[str, str]], special: SpecialTokens, tokenizer=None,
                add_generation_prompt: bool = True) -> str:
    """The prompt text for ``messages`` (dicts with ``role`` and ``content``)."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ChatTemplateError(f"message {i} must be {{'role': str, 'content': str}}, got {m!r}")
    if special.chat_template is None:
        return plain_chat(messages, add_generation_prompt)
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def token(token_id: int | None) -> str:
        return tokenizer.id_to_token(token_id) or "" if tokenizer is not None and token_id is not None else ""

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    try:
        template = env.from_string(special.chat_template)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=token(special.bos_id), eos_token=token(special.eos_id))
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the model's chat template failed: {e}") from None


def plain_chat(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """``System`` text first, then ``User: ...`` / ``Assistant: ...`` lines."""
    lines = []
    for m in messages:
        if m["role"] == "system":
            lines.append(m["content"].strip() + "\n")
        else:
            lines.append(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content'].strip()}")
    text = "\n".join(lines)
    return text + "\nAssistant:" if add_generation_prompt else text


def chat_stops(special: SpecialTokens) -> tuple[str, ...]:
    """Stop strings a conversation needs besides the model's end tokens."""
    return () if special.chat_template is not None else PLAIN_STOPS


def chat_prompt(messages: list[dict[str, str]], special: SpecialTokens, tokenizer=None) -> tuple[str, tuple[str, ...]]:
    """The prompt text that asks for the next assistant turn of ``messages``, and the stop strings its
    answer needs besides the model's end tokens. The one place that builds a chat request: the CLI's
    ``generate --chat``, :func:`chat_loop` and the server all call it, so none of them can forget the
    stops of a model without a template."""
    return render_chat(messages, special, tokenizer), chat_stops(special)


def chat_loop(engine: Engine, params: SamplingParams, lines: Iterable[str], write: Callable[[str], None],
              status: TextIO | None = None, system: str | None = None, prompt_marker: str = "") -> int:
    """Multi-turn chat: each line read is a user turn; ``/reset`` forgets the conversation and
    ``/exit`` (or end of input) ends it. Answers stream through ``write``; after each, tokens/s go
    to ``status``. Returns the number of answered turns."""
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    turns = 0
    write(prompt_marker)
    for line in lines:
        text = line.rstrip("\n")
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            history = history[:1] if system else []
            if status is not None:
                print("(conversation reset)", file=status, flush=True)
            write(prompt_marker)
            continue
        if not text.strip():
            write(prompt_marker)
            continue
        history.append({"role": "user", "content": text})
        prompt, stops = chat_prompt(history, engine.special, engine.tokenizer)
        rid = engine.add_request(prompt, dataclasses.replace(params, stop=tuple(params.stop) + stops))
        req = engine.request(rid)
        if req.notice and status is not None:
            print(f"note: {req.notice}", file=status, flush=True)
        start = time.perf_counter()
        while not req.finished:
            for ev in engine.step():
                if ev.text:
                    write(ev.text)
        elapsed = time.perf_counter() - start
        engine.release(rid)
        answer = req.text.strip()
        history.append({"role": "assistant", "content": answer})
        write("\n")
        turns += 1
        if status is not None:
            n = len(req.output_ids)
            print(f"[{n} tokens, {n / elapsed:.1f} tok/s]", file=status, flush=True)
        write(prompt_marker)
    return turns
