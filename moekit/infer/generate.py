"""Text generation: prefill the prompt once into a KV cache, then decode one token at a time.

Legend: B batch, T tokens fed this step (the prompt at prefill, 1 when decoding), V vocabulary.

:func:`generate_tokens` streams token ids for a batch of equal-length prompts; :func:`generate` wraps
it for one text prompt and streams decoded text. A later, faster engine (batching of ragged prompts,
compiled decoding) builds on the same sampling functions.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Generator, Sequence

import torch
from tokenizers import Tokenizer

from moekit.data.tokenizer import decode, encode, find_eos_id
from moekit.infer.sampling import check_sampling_args, sample_next
from moekit.model.transformer import Transformer


def generate_tokens(model: Transformer, input_ids: torch.Tensor | Sequence[int], max_new_tokens: int,
                    temperature: float = 0.8, top_k: int = 50, top_p: float = 1.0, seed: int | None = None,
                    eos_id: int | None = None, stop_at_eos: bool = True, *,
                    repetition_penalty: float = 1.0) -> Generator[torch.Tensor, None, None]:
    """Yield the next token of every row, LongTensor [B], as soon as it is sampled (streaming).

    ``input_ids``: LongTensor [B, T] (or [T]) of real tokens, all rows the same length, or a list of
    ids (B = 1). At most ``max_new_tokens`` steps are yielded. With ``eos_id`` and ``stop_at_eos``, a
    row that has produced ``eos_id`` keeps yielding ``eos_id`` and generation ends once every row
    has. ``seed`` makes sampling deterministic (its own ``torch.Generator``; None uses torch's global
    RNG); ``temperature == 0`` is greedy.

    The prompt and the new tokens must fit in ``model.cfg.max_seq_len``: a longer prompt is cut from
    the left, keeping its most recent ``max_seq_len - max_new_tokens`` tokens, with a warning.

    Arguments are checked here, at the call, not at the first ``next()``. The model runs in eval mode
    and its training mode is restored when the iterator finishes or is closed.
    """
    check_sampling_args(temperature, top_k, top_p, repetition_penalty)
    max_seq_len = model.cfg.max_seq_len
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
    if max_new_tokens >= max_seq_len:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for the prompt in the model's "
                         f"max_seq_len={max_seq_len}: ask for at most {max_seq_len - 1}")
    vocab = model.cfg.vocab_size
    if eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, int) or not 0 <= eos_id < vocab):
        raise ValueError(f"eos_id={eos_id!r} must be a token id in [0, {vocab}) or None")
    device = next(model.parameters()).device
    ids_BT = _as_batch(input_ids, vocab).to(device)
    room = max_seq_len - max_new_tokens
    if ids_BT.shape[1] > room:
        warnings.warn(f"prompt of {ids_BT.shape[1]} tokens + max_new_tokens={max_new_tokens} exceeds the "
                      f"model's max_seq_len={max_seq_len}; keeping the last {room} prompt tokens", stacklevel=2)
        ids_BT = ids_BT[:, -room:]
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    return _decode(model, ids_BT, max_new_tokens, dict(temperature=temperature, top_k=top_k, top_p=top_p,
                   repetition_penalty=repetition_penalty), generator, eos_id if stop_at_eos else None)


def _as_batch(input_ids: torch.Tensor | Sequence[int], vocab_size: int) -> torch.Tensor:
    """Prompt ids as a LongTensor [B, T], checked to be non-empty and inside the vocabulary."""
    ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor(list(input_ids), dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq] or [seq], got shape {tuple(ids.shape)}")
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty: give at least one token (generate() starts from the "
                         "tokenizer's end-of-text token)")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {ids.dtype}")
    ids = ids.long()
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"input_ids hold token {lo if lo < 0 else hi}, outside the vocabulary [0, {vocab_size})")
    return ids


def _decode(model: Transformer, ids_BT: torch.Tensor, max_new_tokens: int, sampling: dict,
            generator: torch.Generator | None, eos_id: int | None) -> Generator[torch.Tensor, None, None]:
    """The decode loop: step 0 prefills the whole prompt into the cache, later steps feed one token."""
    was_training = model.training
    model.eval()
    try:
        B, T = ids_BT.shape
        cache = model.new_cache(B, T + max_new_tokens)
        seen_BT = ids_BT  # only read by the repetition penalty
        done_B = torch.zeros(B, dtype=torch.bool, device=ids_BT.device)
        for _ in range(max_new_tokens):
            # NOTE: inference mode wraps each step, never a `yield`: grad mode is thread-global, and
            # holding it across a yield would switch autograd off in the caller's code too.
            with torch.inference_mode():
                logits_BV = model(ids_BT, cache=cache).logits[:, -1]
                next_B = sample_next(logits_BV, generator=generator, prev_ids_BT=seen_BT, **sampling)
                if eos_id is not None:
                    next_B = next_B.masked_fill(done_B, eos_id)  # finished rows keep yielding eos
                    done_B = done_B | (next_B == eos_id)
                if sampling["repetition_penalty"] != 1:
                    seen_BT = torch.cat([seen_BT, next_B[:, None]], dim=1)
            yield next_B
            # NOTE: host-device sync, once per token; the caller reads each token anyway.
            if eos_id is not None and bool(done_B.all()):
                return
            ids_BT = next_B[:, None]
    finally:
        model.train(was_training)


def generate(model: Transformer, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 64,
             temperature: float = 0.8, top_k: int = 50, top_p: float = 1.0, seed: int | None = None,
             stream: Callable[[str], None] | None = None, *, repetition_penalty: float = 1.0) -> str:
    """The text continuing ``prompt`` (the prompt itself is not included); stops at end-of-text.

    ``stream`` is called with each new piece of text as it is produced; the pieces join to the
    returned string. An empty prompt starts from the tokenizer's end-of-text token, which is also
    how documents are separated in training. Sampling arguments as in :func:`generate_tokens`.
    """
    try:
        eos_id = find_eos_id(tokenizer)
    except ValueError:  # DataError: this tokenizer has no end-of-text token; generate to the length limit
        eos_id = None
    prompt_ids = encode(tokenizer, prompt)
    if not prompt_ids:
        if eos_id is None:
            raise ValueError("the prompt is empty and the tokenizer has no end-of-text token to start from")
        prompt_ids = [eos_id]
    streamer = _TextStreamer(tokenizer, stream) if stream is not None else None
    new_ids: list[int] = []
    tokens = generate_tokens(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, eos_id,
                             repetition_penalty=repetition_penalty)
    with contextlib.closing(tokens):
        for next_B in tokens:
            token = int(next_B[0])
            if token == eos_id:
                break
            new_ids.append(token)
            if streamer is not None:
                streamer.push(token)
    if streamer is not None:
        streamer.flush()
    return decode(tokenizer, new_ids)


class _TextStreamer:
    """Turns token ids into text pieces as they arrive, holding back a piece while it ends inside a
    multi-byte UTF-8 character (a byte-level BPE token can hold part of one; it decodes to U+FFFD).

    Incremental detokenization as in Hugging Face text-generation-inference (``decode_token``):
    decode only a short window from ``prefix`` (a boundary that decoded cleanly) so each step costs
    O(window), not O(text), and decoders that treat a sequence's start specially (SentencePiece's
    leading space) still see the context before the new tokens.
    """

    def __init__(self, tokenizer: Tokenizer, callback: Callable[[str], None]):
        self.tokenizer, self.callback = tokenizer, callback
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # tokens before this have been emitted

    def push(self, token: int) -> None:
        self.ids.append(token)
        self._emit(final=False)

    def flush(self) -> None:
        """Emit whatever is held back (U+FFFD included, if the model produced invalid UTF-8)."""
        if self.read < len(self.ids):
            self._emit(final=True)

    def _emit(self, final: bool) -> None:
        done_text = decode(self.tokenizer, self.ids[self.prefix:self.read])
        text = decode(self.tokenizer, self.ids[self.prefix:])
        if len(text) > len(done_text) and (final or not text.endswith("\ufffd")):
            self.callback(text[len(done_text):])
            self.prefix, self.read = self.read, len(self.ids)
