"""``POST /v1/completions``: prompts (text or token ids) in, text choices out.

``logprobs=k`` gives each generated token's log-probability and, for k > 0, the k most likely
tokens at its position; ``echo`` puts the prompt before the answer (with its tokens' log-probabilities
when ``logprobs`` is set, the first being null: the scoring call of lm-evaluation-harness with
``max_tokens=0``). ``tokens`` are the pieces of text each token adds, so ``text_offset`` indexes
``text``.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request

from moekit.infer.engine import Event
from moekit.serve.protocol import APIError, CompletionRequest
from moekit.serve.serving import Choice, OpenAIServing, Prompt


class CompletionServing(OpenAIServing):
    object_name = "text_completion"
    id_prefix = "cmpl-"

    async def create(self, body: CompletionRequest, request: Request):
        self.check_model(body.model)
        n = body.n or 1
        prompts = await self._prompts(body.prompt)
        echo = bool(body.echo)
        max_tokens = self.fit(prompts, body.max_tokens, n, "prompt", "max_tokens")
        k = body.logprobs
        params = [self.sampling_params(body, max_tokens, body.seed, logprobs=k is not None, top_logprobs=k or 0,
                                       prompt_logprobs=echo and k is not None) for _ in prompts]
        return await self.serve(request, body, prompts, params, echo=echo)

    async def _prompts(self, prompt) -> list[Prompt]:
        """A string, a list of strings, a list of token ids or a list of lists of token ids."""
        if isinstance(prompt, str):
            items: list[str | list[int]] = [prompt]
        elif prompt and all(isinstance(t, int) for t in prompt):
            items = [list(prompt)]
        else:
            items = list(prompt)
        if not items:
            raise APIError(400, "prompt must not be an empty list", param="prompt")
        texts = list(dict.fromkeys(p for p in items if isinstance(p, str)))
        encoded = dict(zip(texts, await self.tokenize(texts))) if texts else {}
        out, seen = [], {}
        for i, p in enumerate(items):
            if isinstance(p, str):
                key: Any = p
                ids = encoded[p]
            else:
                if not p:
                    raise APIError(400, f"prompt[{i}] is an empty list of token ids", param="prompt")
                bad = next((t for t in p if not 0 <= t < self.engine.vocab_size), None)
                if bad is not None:
                    raise APIError(400, f"prompt[{i}] holds {bad}, not a token id in [0, {self.engine.vocab_size})",
                                   param="prompt", code="invalid_value")
                key, ids = tuple(p), p
            if key not in seen:  # a prompt sent twice is one prompt (usage counts it once per copy, below)
                seen[key] = Prompt(ids, p if isinstance(p, str) else self.decode(p))
            out.append(Prompt(seen[key].ids, seen[key].text))
        return out

    # ------------------------------------------------------------------ formatting
    def _logprobs(self, c: Choice, pieces: list[str], start: int, offset: int, with_prompt: bool) -> dict[str, Any]:
        """OpenAI's completion logprobs object for generated tokens ``start..`` (and the prompt's first)."""
        tokens, lps, tops = [], [], []
        if with_prompt and c.prompt_logprobs is not None:
            prompt_pieces = self.text_pieces(c.prompt.ids)
            tokens += prompt_pieces
            lps += list(c.prompt_logprobs)
            tops += list(c.prompt_top_logprobs or [None] * len(prompt_pieces))
        tokens += pieces
        lps += c.logprobs[start:start + len(pieces)]
        tops += c.top_logprobs[start:start + len(pieces)]
        offsets = []
        for piece in tokens:
            offsets.append(offset)
            offset += len(piece)
        want_top = any(t is not None for t in tops)
        return {"tokens": tokens, "token_logprobs": lps,
                "top_logprobs": [None if t is None else {self.token_text(i): lp for i, lp in t} for t in tops]
                if want_top else None, "text_offset": offsets}

    def choice(self, c: Choice, echo: bool) -> dict[str, Any]:
        text = "".join(c.text)
        prefix = c.prompt.text if echo else ""
        logprobs = None
        if c.pieces is not None:
            logprobs = self._logprobs(c, self.pieces(c, 0), 0, 0, with_prompt=echo)
            if echo and c.prompt_logprobs is None:  # echo without prompt scores: offsets still index the text
                logprobs["text_offset"] = [o + len(prefix) for o in logprobs["text_offset"]]
        return {"index": c.index, "text": prefix + text, "finish_reason": c.finish_reason, "logprobs": logprobs}

    def first_chunk(self, c: Choice, echo: bool) -> dict[str, Any] | None:
        if echo and c.pieces is None:  # with logprobs the prompt comes with its scores (echo_chunk)
            return {"index": c.index, "text": c.prompt.text, "finish_reason": None, "logprobs": None}
        return None

    def echo_chunk(self, c: Choice) -> dict[str, Any] | None:
        lp = self._logprobs(c, [], 0, 0, with_prompt=True)
        c.offset = len(c.prompt.text)
        return {"index": c.index, "text": c.prompt.text, "finish_reason": None, "logprobs": lp}

    def delta(self, c: Choice, ev: Event, n_before: int) -> dict[str, Any] | None:
        logprobs = None
        if c.pieces is not None and len(c.token_ids) > n_before:
            pieces = self.pieces(c, n_before)
            logprobs = self._logprobs(c, pieces, n_before, c.offset, with_prompt=False)
            c.offset += sum(map(len, pieces))
        if not ev.text and not ev.finished and logprobs is None:
            return None
        return {"index": c.index, "text": ev.text, "finish_reason": ev.finish_reason if ev.finished else None,
                "logprobs": logprobs}

