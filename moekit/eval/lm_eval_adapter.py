"""An lm-evaluation-harness model named ``moekit``: the harness's requests, answered by the engine.

lm-eval 0.4 finds models only in its own registry (no plugin entry points), so importing this module
registers :class:`MoekitLM` there; ``moekit lm-eval ARGS`` (:func:`main`) imports it and runs the
harness's own command line. From Python, pass an instance: ``lm_eval.simple_evaluate(model=MoekitLM(...))``.

Every number goes through the path ``moekit eval`` takes (:mod:`moekit.eval.score`), so a log-likelihood
here is the same float as there on the same text:

- ``loglikelihood``: :func:`~moekit.eval.score.score_continuations` (lm-eval 0.4's tokenisation), with
  ``is_greedy``;
- ``loglikelihood_rolling``: :func:`~moekit.eval.score.score_texts` (disjoint windows of
  ``engine.max_len - 1`` tokens);
- ``generate_until``: every request added to the engine at once (continuous batching over ``max_batch``
  slots), each with its own sampling settings and ``until`` stop strings.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import lm_eval.models  # noqa: F401  (fills the registry's table first: see the NOTE on register_model below)
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from tqdm import tqdm

from moekit.config import ConfigError
from moekit.eval.score import max_length, score_continuations, score_texts, scoring_engine, trained_context
from moekit.infer.engine import SamplingParams

DEFAULT_MAX_BATCH = 32
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default (HFLM.max_gen_toks)
#: gen_kwargs a request may carry besides ``until`` and the max-token aliases normalize_gen_kwargs reads.
GEN_KWARGS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "seed")


# NOTE: lm-eval's get_model imports its own model table only while the registry is empty; registering
# first would hide "hf" and the rest. The `import lm_eval.models` above fills it before this runs.
@register_model("moekit")
class MoekitLM(LM):
    """A moekit model in the harness.

    ``pretrained``: anything :func:`moekit.load` reads (run or checkpoint directory, int8/int4 included,
    Hugging Face directory, ``.gguf``), or a loaded model with ``tokenizer``. ``max_batch``: engine slots
    (requests in flight). ``threads``: torch CPU threads. ``max_gen_toks``: the answer length when a request
    does not say. The harness's ``batch_size`` and ``max_batch_size`` are accepted and unused: the engine
    batches continuously over ``max_batch`` slots whatever the request count.
    """

    def __init__(self, pretrained=None, tokenizer=None, max_batch: int = DEFAULT_MAX_BATCH, threads: int | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, device: str | None = None, batch_size=None,
                 max_batch_size=None, **unknown):
        super().__init__()
        if unknown:
            raise ConfigError(f"unknown model_args {', '.join(sorted(unknown))}: moekit takes pretrained, max_batch, "
                              "threads, max_gen_toks, device")
        if pretrained is None:
            raise ConfigError("model_args needs pretrained=PATH (a moekit run or checkpoint directory, a Hugging Face "
                              "directory or a .gguf file)")
        for name, value in (("max_batch", max_batch), ("max_gen_toks", max_gen_toks), ("threads", threads)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name}={value!r} must be an integer >= 1")
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        if isinstance(pretrained, (str, os.PathLike)):
            from moekit.checkpoint import load

            model, tokenizer = load(pretrained, device=_device(device))
            self.name = str(pretrained)
            context = trained_context(pretrained)
        else:
            model, self.name, context = pretrained, type(pretrained).__name__, None
        if tokenizer is None:
            raise ConfigError(f"{self.name} has no tokenizer: the harness sends text")
        self.engine = scoring_engine(model, tokenizer, max_batch=max_batch, context=context)
        self.max_gen_toks = max_gen_toks
        self._device = self.engine.device

    # ------------------------------------------------------------------ what the harness asks
    @property
    def max_length(self) -> int:
        """Tokens a prediction conditions on at most (lm-eval's ``max_length``)."""
        return max_length(self.engine)

    @property
    def tokenizer_name(self) -> str:
        """Names the request cache (``--use_cache``) together with the chat template."""
        return self.name.replace("/", "__")

    def get_model_info(self) -> dict:
        """What the harness writes into its results' ``config`` next to the model name."""
        cfg = self.engine.model.cfg
        total, active = cfg.param_counts()
        return {"model_name": self.name, "model_num_parameters": total, "model_active_parameters": active,
                "model_experts": cfg.num_experts, "max_length": self.max_length}

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.engine.special.chat_template or ""

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """``--apply_chat_template``: the checkpoint's own template, rendered as ``moekit chat`` does."""
        from moekit.infer.chat import render_chat

        return render_chat(chat_history, self.engine.special, self.engine.tokenizer, add_generation_prompt)

    def _bar(self, n: int, what: str, disable: bool) -> tqdm:
        return tqdm(total=n, desc=f"Running {what} requests", disable=disable or self.rank != 0)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), is_greedy)`` of each ``(context, continuation)`` request."""
        with self._bar(len(requests), "loglikelihood", disable_tqdm) as bar:
            scored = score_continuations(self.engine, [req.args for req in requests], bar.update, greedy=True)
        out = [(s.logprob, bool(s.greedy)) for s in scored]
        for req, result in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", req.args, result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each ``(text,)`` request, every token once, after the start token."""
        with self._bar(len(requests), "loglikelihood_rolling", disable_tqdm) as bar:
            scored = score_texts(self.engine, [req.args[0] for req in requests], bar.update)
        out = [s.logprob for s in scored]
        for req, result in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, result)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """The answer to each ``(context, gen_kwargs)`` request, cut before the first ``until`` string.

        NOTE: a context too long for the model is cut from the left by the engine, keeping at least half of
        the context for it (:func:`moekit.infer.engine.fit_prompt`); lm-eval's HF model keeps
        ``max_length - max_gen_toks`` tokens. The answer then ends where the context is full.
        """
        params = [self.sampling_params(req.args[1]) for req in requests]
        with self._bar(len(requests), "generate_until", disable_tqdm) as bar:
            done = self.engine.generate([req.args[0] for req in requests], params, progress=bar.update)
        out = [c.text for c in done]
        for req, text in zip(requests, out):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out

    def sampling_params(self, gen_kwargs: dict) -> SamplingParams:
        """A request's ``gen_kwargs`` as engine settings, read as lm-eval's ``normalize_gen_kwargs`` reads them:
        greedy unless ``do_sample`` (or a temperature > 0 without it); sampling at temperature 1 when
        ``do_sample`` names none; top-k and top-p off unless given."""
        if not isinstance(gen_kwargs, dict):
            raise ConfigError(f"generate_until: gen_kwargs must be a dict, got {gen_kwargs!r}")
        kw = dict(normalize_gen_kwargs(gen_kwargs, default_max_gen_toks=self.max_gen_toks))
        stop = [s for s in handle_stop_sequences(kw.pop("until"), None) if s]  # '' stops nothing (as in lm-eval)
        max_gen = kw.pop("max_gen_toks")
        unknown = sorted(set(kw) - set(GEN_KWARGS))
        if unknown:
            raise ConfigError(f"generate_until: gen_kwargs {', '.join(map(repr, unknown))} not supported; moekit "
                              f"reads until, max_gen_toks (or max_new_tokens), {', '.join(GEN_KWARGS)}")
        if isinstance(max_gen, bool) or not isinstance(max_gen, int) or max_gen < 0:
            raise ConfigError(f"generate_until: max_gen_toks={max_gen!r} must be an integer >= 0")
        sample = bool(kw.get("do_sample"))
        temperature = float(kw.get("temperature", 1.0)) if sample else 0.0
        return SamplingParams(
            # NOTE: the engine needs one context position for the prompt; a longer answer stops when it is full.
            max_new_tokens=min(max_gen, self.engine.max_len - 1), temperature=temperature,
            top_k=int(kw.get("top_k") or 0), top_p=float(kw.get("top_p", 1.0)),
            repetition_penalty=float(kw.get("repetition_penalty", 1.0)),
            seed=None if kw.get("seed") is None else int(kw["seed"]), stop=tuple(stop))


def _device(device: str | None) -> str:
    """The harness's ``--device`` (its command line's default is ``cuda:0``), as HFLM reads it: a CUDA
    device only where CUDA is available, else the CPU (moekit's home: see README)."""
    import torch

    if not device or (device.startswith("cuda") and not torch.cuda.is_available()):
        return "cpu"
    return device


# --------------------------------------------------------------------------- moekit lm-eval
USAGE = """usage: moekit lm-eval [--write-tasks DIR] HARNESS_ARGS...

Runs the lm-evaluation-harness command line (lm-eval run ...) with the model 'moekit' registered:
  moekit lm-eval --model moekit --model_args pretrained=PATH,max_batch=32 --tasks moekit --limit 20

model_args of 'moekit': pretrained=PATH (moekit run or checkpoint directory, int8/int4 too, Hugging Face
directory or .gguf), max_batch=N (requests in flight, default 32), threads=N, max_gen_toks=N (default 256).
This project's tasks (moekit_next_line, moekit_speaker, moekit_blank, moekit_shakespeare, moekit_austen;
tag 'moekit') are written to {tasks} and added as --include_path unless you give one.
--write-tasks DIR writes them to DIR instead and exits (then: lm_eval ... --include_path DIR).
The harness's built-in tasks download their data from the Hugging Face hub; offline they cannot run.

The harness's own options follow (lm-eval run --help):
"""


def main(argv: Sequence[str]) -> int:
    """``moekit lm-eval ARGS``: the harness's command line with ``moekit`` registered (see :data:`USAGE`)."""
    from moekit.eval.lm_eval_tasks import default_task_dir, set_offline, write_tasks

    args = list(argv)
    if "--write-tasks" in args:
        i = args.index("--write-tasks")
        if i + 1 >= len(args) or args[i + 1].startswith("-"):
            raise ConfigError("--write-tasks needs a directory: moekit lm-eval --write-tasks DIR")
        out = write_tasks(args[i + 1])
        print(f"wrote the moekit tasks to {out}; run them with: lm_eval ... --include_path {out} --tasks moekit")
        return 0
    wants_help = not args or any(a in ("-h", "--help") for a in args)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE.format(tasks=default_task_dir()), end="")
        args = ["run", "--help"]
    set_offline()
    # run, ls and validate all read --include_path
    if not wants_help and not any(a == "--include_path" or a.startswith("--include_path=") for a in args):
        args += ["--include_path", str(write_tasks(default_task_dir()))]
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *args]  # NOTE: the harness's parser reads sys.argv, not an argument
    try:
        cli_evaluate()
    except SystemExit as e:  # argparse's --help and its errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    finally:
        sys.argv = saved
    return 0


__all__ = ["MoekitLM", "main"]
