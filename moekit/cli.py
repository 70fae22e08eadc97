"""The command line: thin. Each verb parses flags and calls one documented function elsewhere.

Every ``ModelConfig`` and ``TrainConfig`` field is a flag (``--num-experts 16``); precedence is
preset < ``--config`` file < flags.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import sys
import textwrap
from dataclasses import fields
from pathlib import Path
from typing import Any

from moekit.config import PRESETS, ConfigError, ModelConfig, _allowed_types


def _field_help(cls) -> dict[str, str]:
    """Help text for each dataclass field, taken from its inline ``# comment`` in the source."""
    out = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=[^#]*#\s*(.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def _parse_value(kind: tuple[type, ...]):
    def parse(text: str) -> Any:
        if type(None) in kind and text.lower() in ("none", "null"):
            return None
        if dict in kind:  # a mapping (task_experts): JSON
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = None
            if not isinstance(value, dict):
                raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"code\": [0, 1]}}', got {text!r}")
            return value
        if bool in kind:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
        for t in (int, float, str):
            if t in kind:
                try:
                    return t(text)
                except ValueError:
                    continue
        raise argparse.ArgumentTypeError(f"cannot read {text!r} as {' or '.join(k.__name__ for k in kind)}")
    return parse


def _add_dataclass_flags(group, cls, skip: set[str] = frozenset(), preset: str | None = None) -> None:
    """One flag per field. With ``preset``, the default shown is that preset's value (model settings come
    from the preset, so the dataclass default would be wrong: tiny-moe has 8 experts, not 0)."""
    helps = _field_help(cls)
    base = ModelConfig.from_preset(preset) if preset else None
    for f in fields(cls):
        if f.name in skip:
            continue
        kind = _allowed_types(f.type)
        meta = "BOOL" if bool in kind else f.name.upper()
        default = (f"default: the preset's; {preset}: {getattr(base, f.name)!r}" if base is not None
                   else f"default {f.default!r}")
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=_parse_value(kind), metavar=meta,
                           default=argparse.SUPPRESS, help=f"{helps.get(f.name, f.name)} ({default})")


def _settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    from moekit.data.tasks import parse_data_flags, parse_task_weights
    from moekit.train.config import MODEL_KEYS, TRAIN_KEYS

    settings = {k: v for k, v in vars(args).items() if k in MODEL_KEYS or k in TRAIN_KEYS}
    # parsed here, not by argparse, so that a bad value is one line (argparse adds its usage text)
    if "data" in settings:
        settings["data"] = parse_data_flags(settings["data"])
    if "task_weights" in settings:
        settings["task_weights"] = parse_task_weights(settings["task_weights"])
    return settings


def _configs(args: argparse.Namespace, default_preset: str):
    """preset < config file < flags."""
    from moekit.train.config import build_configs, read_config_file, split_settings

    settings: dict[str, Any] = {}
    if getattr(args, "config", None):
        settings.update(read_config_file(args.config))
    preset, model, train = split_settings(settings, args.config or "the config file")
    _, flag_model, flag_train = split_settings(_settings_from_args(args), "flags")
    model.update(flag_model)
    train.update(flag_train)
    return build_configs(args.preset or preset, model, train, default_preset), flag_model


# --------------------------------------------------------------------------- verbs
def _cmd_demo(args: argparse.Namespace) -> None:
    from moekit.summary import run_demo
    from moekit.utils import tune_cpu_allocator

    tune_cpu_allocator()
    run_demo(args.preset, batch=args.batch, seq_len=args.seq_len, seed=args.seed)


def _parallel(args: argparse.Namespace):
    """This process's place in a torchrun launch (one process without torchrun)."""
    from moekit.parallel import Parallel

    return Parallel.from_env(args.expert_parallel)


def _cmd_train(args: argparse.Namespace) -> None:
    from moekit.train import train
    from moekit.utils import tune_cpu_allocator

    tune_cpu_allocator()
    par = args.parallel = _parallel(args)
    if args.resume:
        from moekit.train.config import split_settings

        _, flag_model, flag_train = split_settings(_settings_from_args(args), "flags")
        if flag_model or args.preset or args.config:
            raise ConfigError("--resume continues a run with its saved settings; model settings, --preset and "
                              "--config cannot change (only --max-steps, --eval-every, --save-every, ...)")
        if args.out or args.init:
            raise ConfigError(f"--resume continues {args.resume} in place and from its own checkpoint; drop "
                              + " and ".join(f for f, v in (("--out", args.out), ("--init", args.init)) if v))
        result = train(args.resume, resume=True, overrides=flag_train, progress=not args.quiet, parallel=par)
    else:
        if not args.out:
            raise ConfigError("--out RUN is required (the run directory to create), or --resume RUN")
        if args.init:  # the model (and tokenizer) come from the checkpoint: moekit, Hugging Face or .gguf
            (_, tcfg), flag_model = _configs(args, "tiny-moe")
            if flag_model or args.preset:
                raise ConfigError("--init takes the model settings from the checkpoint; drop --preset and model flags")
            model_cfg = None
        else:
            (model_cfg, tcfg), _ = _configs(args, "tiny-moe")
        result = train(args.out, model_cfg, tcfg, init=args.init, progress=not args.quiet, parallel=par)
    if not par.is_main:
        return
    print(f"done: {result.step} steps, {result.tokens:,} tokens in {result.elapsed_s:.1f} s; "
          f"train loss {result.train_loss:.4f}"
          + (f", val loss {result.val_loss:.4f} ({result.val_bpb:.4f} bits/byte)" if result.val_loss else ""))
    if result.val_loss_task:
        print("per task: " + ", ".join(f"{task} {loss:.4f} ({result.val_bpb_task[task]:.4f} bits/byte)"
                                       for task, loss in result.val_loss_task.items()))
    print(f"run: {result.run_dir}  (metrics.jsonl, plots/, checkpoints/)")


def _cmd_compare(args: argparse.Namespace) -> None:
    from moekit.train.compare import ALL_ROUTERS, compare, reading, sample_candidates
    from moekit.utils import tune_cpu_allocator

    tune_cpu_allocator()
    par = args.parallel = _parallel(args)
    (moe_cfg, tcfg), _ = _configs(args, "tiny-moe")
    routers = list(ALL_ROUTERS) if args.routers == ["all"] else args.routers
    summary = compare(args.out, moe_cfg, tcfg, routers=routers, experts=args.experts, seeds=args.seeds,
                      dense_lr=args.dense_lr, progress=not args.quiet, parallel=par,
                      ceiling=args.ceiling_seeds if args.ceiling_seeds is not None else args.ceiling,
                      evaluate=not args.no_eval, eval_limit=args.eval_limit)
    if not par.is_main:
        return
    print()
    print(_compare_table(summary))
    print()
    print(textwrap.fill(reading(summary), width=110))
    if summary.get("eval_headline"):
        print("\nmoekit eval of the first seed's final models (" + str(Path(args.out) / "eval" / "report.md") + "):")
        print(textwrap.fill(summary["eval_headline"], width=110, break_on_hyphens=False))
    plots = "val_loss.png" + (", scaling.png" if args.experts else "")
    print(f"\nreport: {Path(args.out) / 'report.md'}  (plots: {plots})")
    if args.sample:
        from moekit.checkpoint import load
        from moekit.infer import generate

        best = sample_candidates(summary)[0]
        model, tokenizer = load(best["run"])
        print(f"\nsample from {Path(best['run']).name} (prompt {args.sample!r}):\n")
        print(args.sample, end="")
        generate(model, tokenizer, args.sample, max_new_tokens=80, temperature=0.8, top_k=50, seed=0,
                 stream=lambda piece: print(piece, end="", flush=True))
        print()


def _compare_table(summary: dict) -> str:
    from moekit.train.compare import _fmt_spread

    n = len(summary["models"][0]["seeds"])
    head = "mean ± std over " + f"{n} seeds" if n > 1 else "1 seed"
    w = max(len(m["name"]) for m in summary["models"]) + 1
    noise = summary.get("eval_noise")
    rows = [f"({head}; fraction = seconds to reach the dense final loss / dense seconds"
            + (f"; evaluation noise: ± {noise:.4f} nats, the standard error of a final val loss)" if noise else ")"),
            f"{'model':<{w}} {'val loss':>17} {'tok/s':>8} {'step cost':>9} {'token frac':>12} {'time frac':>12}"]
    for m in summary["models"]:
        rows.append(f"{m['name']:<{w}} {_fmt_spread(m['final_val_loss'], '{:.4f}'):>17} {m['tokens_per_s']:>8,.0f} "
                    f"{m['step_cost_vs_dense']:>8.2f}x {_fmt_spread(m['token_fraction']):>12} "
                    f"{_fmt_spread(m['time_fraction']):>12}")
        if n > 1 and m["name"] != "dense":
            per = ", ".join("-" if v is None else f"{v:.2f}" for v in m["time_fraction_per_seed"])
            rows.append(f"{'':<{w}} time fraction per seed: {per}")
        if m.get("final_val_loss_task"):
            per = ", ".join(f"{task} {_fmt_spread(v, '{:.4f}')}" for task, v in m["final_val_loss_task"].items())
            rows.append(f"{'':<{w}} val loss per task: {per}")
        if "recovery" in m:
            per = ", ".join(f"s{seed} " + ("-" if v is None else f"{v:.2f}")
                            for seed, v in zip(m["ceiling_seeds"], m["recovery_per_seed"]))
            rec = _fmt_spread(m["recovery"]) if m["recovery"] is not None else "n/a"
            rows.append(f"{'':<{w}} recovery of the dense-total gain: {rec} ({per}); "
                        f"time fraction vs dense-total: {_fmt_spread(m['time_fraction_vs_ceiling'])}")
    return "\n".join(rows)


def _sampling_params(args: argparse.Namespace, stop: tuple[str, ...] = ()):
    from moekit.infer import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, repetition_penalty=args.repetition_penalty,
                          stop=tuple(args.stop or ()) + stop, task=args.task)


def _check_sampling_flags(args: argparse.Namespace) -> None:
    """Bad sampling flags fail before the model is loaded or anything is printed."""
    from moekit.infer import EngineError

    params = _sampling_params(args)
    try:
        params.check(vocab_size=2**62, max_len=2**62)  # the context is checked once the model is known
    except EngineError as e:
        raise ConfigError(str(e)) from None


def _load_for_generation(path: str, args: argparse.Namespace, bits: int | None = None):
    """(model, tokenizer); with --max-resident-experts / --expert-memory the experts stay in the file.
    ``bits`` (serve --bits): quantize a float checkpoint on load (int4 in groups of 64), offloaded
    experts included (each quantized as it is read into memory)."""
    from moekit.checkpoint import load
    from moekit.quant import quantize_model, quantized_weights

    group_size = 64 if bits == 4 else None
    if args.max_resident_experts is not None and args.expert_memory is not None:
        raise ConfigError("give --max-resident-experts N or --expert-memory GB, not both")
    if args.max_resident_experts is not None or args.expert_memory is not None:
        from moekit.infer.offload import load_offloaded

        model, tokenizer, _ = load_offloaded(path, max_resident_experts=args.max_resident_experts,
                                             expert_memory_gb=args.expert_memory, bits=bits, group_size=group_size)
    else:
        model, tokenizer = load(path)
        if bits is not None and not quantized_weights(model):
            quantize_model(model.float(), bits, group_size)
    if tokenizer is None:
        raise ConfigError(f"{path} has no tokenizer; cannot turn text into tokens")
    return model, tokenizer


def _cmd_generate(args: argparse.Namespace) -> None:
    import time

    from moekit.infer import Engine
    from moekit.infer.chat import chat_prompt
    from moekit.utils import tune_cpu_allocator

    _check_sampling_flags(args)
    if args.prompts is not None and args.prompt is not None:
        raise ConfigError("give --prompt TEXT or --prompts FILE, not both")
    if args.system is not None and not args.chat:
        raise ConfigError("--system TEXT needs --chat (it is the system turn of the chat template)")
    if args.prompts is not None:
        prompts = _read_prompts(args.prompts)
    else:
        prompts = [args.prompt if args.prompt is not None else ""]
    tune_cpu_allocator()
    model, tokenizer = _load_for_generation(args.checkpoint, args)
    engine = Engine(model, tokenizer, max_batch=min(len(prompts), 64))
    stops = ()
    if args.chat:
        messages = [[{"role": "system", "content": args.system}] if args.system else [] for _ in prompts]
        built = [chat_prompt(m + [{"role": "user", "content": p}], engine.special, tokenizer)
                 for m, p in zip(messages, prompts)]
        texts, stops = [t for t, _ in built], built[0][1]
    else:
        texts = prompts
    params = _sampling_params(args, stops)
    ids = [engine.add_request(t, params) for t in texts]  # every request is checked before anything is printed
    for i in ids:
        if engine.request(i).notice:
            print(f"moekit generate: note: {engine.request(i).notice}", file=sys.stderr)
    show_prompt = not args.quiet_prompt and not args.chat
    start = time.perf_counter()
    if len(ids) == 1:
        if show_prompt:
            print(prompts[0], end="", flush=True)
        while engine.has_work():
            for ev in engine.step():
                if ev.text:
                    print(ev.text, end="", flush=True)
        print()
    else:
        while engine.has_work():
            engine.step()
        for n, (prompt, i) in enumerate(zip(prompts, ids)):
            if n:
                print("\n" + "-" * 40)
            print((prompt if show_prompt else "") + engine.request(i).text)
    elapsed = time.perf_counter() - start
    generated = engine.stats.generated_tokens
    print(f"[{generated} tokens in {elapsed:.2f} s: {generated / max(elapsed, 1e-9):.1f} tok/s; "
          f"{engine.stats.prompt_tokens} prompt tokens; {len(ids)} sequence{'s' if len(ids) > 1 else ''}]",
          file=sys.stderr)
    if engine.stats.offload is not None:
        print(f"[{engine.stats.offload.summary(engine.stats.prompt_tokens + generated)}]", file=sys.stderr)


def _read_prompts(path: str) -> list[str]:
    """One prompt a line (``\\n`` inside a line is a newline); blank lines are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConfigError(f"--prompts file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read --prompts file {path}: {e}") from None
    prompts = [line.replace("\\n", "\n") for line in lines if line.strip()]
    if not prompts:
        raise ConfigError(f"--prompts file {path} holds no prompt (one prompt a line)")
    return prompts


def _cmd_chat(args: argparse.Namespace) -> None:
    from moekit.infer import Engine
    from moekit.infer.chat import chat_loop
    from moekit.utils import tune_cpu_allocator

    _check_sampling_flags(args)
    tune_cpu_allocator()
    model, tokenizer = _load_for_generation(args.checkpoint, args)
    engine = Engine(model, tokenizer, max_batch=1)
    engine.task_id(args.task)  # an unknown task fails now, not at the first line typed
    interactive = sys.stdin.isatty()
    if interactive:
        template = "its chat template" if engine.special.chat_template else "plain User:/Assistant: turns"
        print(f"chatting with {args.checkpoint} ({template}); /reset forgets the conversation, /exit ends it",
              file=sys.stderr)
    chat_loop(engine, _sampling_params(args), sys.stdin, lambda s: print(s, end="", flush=True),
              status=sys.stderr, system=args.system, prompt_marker="> " if interactive else "")
    if engine.stats.offload is not None:
        tokens = engine.stats.prompt_tokens + engine.stats.generated_tokens
        print(f"[{engine.stats.offload.summary(tokens)}]", file=sys.stderr)


def _cores() -> int:
    """CPU cores this process may run on."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _cmd_serve(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from moekit.serve import begin_shutdown, create_app
    except ImportError as e:
        raise ConfigError(f"moekit serve needs the serve extra (pip install 'moekit[serve]'): {e}") from None
    import os

    from moekit.infer import Engine
    from moekit.utils import tune_cpu_allocator

    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads {args.threads} must be >= 1")
    for name in ("max_batch", "max_queue", "port"):
        if getattr(args, name) < (0 if name == "max_queue" else 1):
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= "
                              f"{0 if name == 'max_queue' else 1}")
    tune_cpu_allocator()
    import torch

    # NOTE: by default the engine leaves one core to the HTTP side (event loop, tokenizer, local clients):
    # torch's threads spin between kernels, and on 2 cores a server using both served one client at
    # 0.85-0.97x of the engine's own speed and 8 clients at 0.59x; with one thread, 1.04-1.09x and 0.86x
    # (benchmarks/serve.py, BENCHMARKS.md "Serving").
    threads = args.threads or max(1, _cores() - 1)
    torch.set_num_threads(threads)
    model, tokenizer = _load_for_generation(args.checkpoint, args, bits=args.bits)
    engine = Engine(model, tokenizer, max_batch=args.max_batch, max_queue=args.max_queue)
    api_key = args.api_key or os.environ.get("MOEKIT_API_KEY") or None
    name = args.model_name or Path(args.checkpoint).name
    app = create_app(engine, name, api_key=api_key, cors_origins=args.cors_origin or None)
    print(f"serving {args.checkpoint} as {name!r} on http://{args.host}:{args.port}/v1 "
          f"(batch {args.max_batch}, queue {args.max_queue}, {threads} torch thread{'s' if threads > 1 else ''}"
          f"{', API key required' if api_key else ''}); the page: http://{args.host}:{args.port}/", file=sys.stderr)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # requests in flight fail now (503), not after the graceful timeout
            begin_shutdown(app)
            super().handle_exit(sig, frame)

    Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                          timeout_graceful_shutdown=10)).run()


def _cmd_dashboard(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from moekit.serve import create_dashboard_app
    except ImportError as e:
        raise ConfigError(f"moekit dashboard needs the serve extra (pip install 'moekit[serve]'): {e}") from None
    if not Path(args.run).is_dir():
        raise ConfigError(f"{args.run} is not a directory: give a run directory (with metrics.jsonl) or a "
                          "`moekit compare` output directory")
    if args.port < 1:
        raise ConfigError(f"--port {args.port} must be >= 1")
    app = create_dashboard_app(args.run)
    print(f"dashboard of {args.run} on http://{args.host}:{args.port}/ (read-only)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def _cmd_info(args: argparse.Namespace) -> None:
    from moekit.convert.inspect import format_info, inspect_checkpoint

    print(format_info(inspect_checkpoint(args.path)))


def _cmd_convert(args: argparse.Namespace) -> None:
    from moekit.checkpoint import convert_checkpoint
    from moekit.summary import human_bytes

    out = convert_checkpoint(args.src, args.dst, args.format, dtype=args.dtype, gguf_type=args.gguf_type,
                             overwrite=args.overwrite)
    total, active = out.cfg.param_counts()
    print(f"wrote {out.path} ({out.format}, {out.dtype}, {human_bytes(out.size_bytes)}): {total:,} parameters, "
          f"{active:,} active per token")


def _cmd_quantize(args: argparse.Namespace) -> None:
    from moekit.checkpoint import load, save
    from moekit.quant import check_settings, quantize_model, quantized_weights

    group_size = args.group_size if args.bits == 4 else None
    check_settings(args.bits, group_size)  # before anything is loaded
    if Path(args.dst).exists() and not args.overwrite:
        raise ConfigError(f"{args.dst} already exists; pass --overwrite to replace it")
    if str(args.dst).lower().endswith(".gguf"):
        raise ConfigError(f"{args.dst}: moekit quantize writes a moekit checkpoint directory; for a quantized GGUF "
                          "use moekit convert SRC model.gguf --gguf-type q8_0|q4_0")
    model, tokenizer = load(args.src, quantized=False)  # a quantized GGUF source is dequantized first
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    quantize_model(model.float(), args.bits, group_size)
    after = sum(p.numel() * p.element_size() for p in model.parameters())
    after += sum(w.nbytes() for w in quantized_weights(model).values())
    out = save(model, tokenizer, args.dst)
    kind = f"int{args.bits}" + (f", groups of {group_size}" if group_size else ", per output channel")
    print(f"wrote {out} ({kind}): weights {before / 2**20:,.1f} MiB -> {after / 2**20:,.1f} MiB in memory")


def _cmd_upcycle(args: argparse.Namespace) -> None:
    from moekit.convert.upcycle import upcycle_checkpoint

    if Path(args.dst).exists() and not args.overwrite:
        raise ConfigError(f"{args.dst} already exists; pass --overwrite to replace it")
    out = upcycle_checkpoint(args.src, args.dst, args.experts, args.top_k, router=args.router, noise=args.noise,
                             seed=args.seed)
    print(f"wrote {out}; continue training with: moekit train --init {out} --out RUN")


def _cmd_eval(args: argparse.Namespace) -> None:
    from moekit.eval.report import write_report
    from moekit.eval.run import evaluate
    from moekit.utils import tune_cpu_allocator

    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out} is a file: give a directory for report.json, report.md and the plots")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads {args.threads} must be >= 1")
        import torch

        torch.set_num_threads(args.threads)
    tune_cpu_allocator()
    report = evaluate(args.paths, tasks=args.tasks, data=args.data, limit=args.limit, seed=args.seed,
                      progress=not args.quiet)
    print(textwrap.fill(report["headline"], width=110, break_on_hyphens=False))
    if args.out is not None:
        files = write_report(report, args.out)
        print(f"\nreport: {files[1]}  (report.json; plots: {', '.join(f.name for f in files[2:]) or 'none'})")


def _cmd_paths(args: argparse.Namespace) -> None:
    from moekit.paths.report import headline, write_paths
    from moekit.paths.trace import trace_paths
    from moekit.utils import tune_cpu_allocator

    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out} is a file: give a directory for paths.json, paths.md and the heatmaps")
    tune_cpu_allocator()
    result = trace_paths(args.checkpoint, args.data, limit=args.limit, seed=args.seed, progress=not args.quiet)
    print(textwrap.fill(headline(result), width=110, break_on_hyphens=False))
    if args.out is not None:
        files = write_paths(result, args.out)
        print(f"\nreport: {files[1]}  (paths.json; heatmaps: {', '.join(f.name for f in files[2:])})")


def _cmd_extract(args: argparse.Namespace) -> None:
    from moekit.paths.extract import extract
    from moekit.utils import tune_cpu_allocator

    tune_cpu_allocator()
    x = extract(args.src, args.dst, args.task, coverage=args.coverage, per_layer=args.experts_per_layer,
                data=args.data, paths_file=args.paths, limit=args.limit, seed=args.seed, overwrite=args.overwrite)
    held = "its own experts" if x.held is None else f"at least {min(x.held):.1%} of its assignments in every layer"
    print(f"wrote {x.path}: task {x.task!r}, {x.num_experts[1]} of {x.num_experts[0]} experts per layer "
          f"(top-{x.top_k[1]}), holding {held}; expert parameters "
          f"{x.expert_params[0]:,} -> {x.expert_params[1]:,}, total {x.params[0]:,} -> {x.params[1]:,}")
    print(f"{'exact' if x.exact else 'not exact'} on the task's text: {x.why}")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 8,16,32, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers like 8,16,32, got {text!r}")
    return values


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from moekit.train.config import TrainConfig

    parser = argparse.ArgumentParser(prog="moekit", description="Sparse Mixture-of-Experts language models.",
                                     allow_abbrev=False)
    # allow_abbrev=False everywhere: a misspelt flag (--num-expert) must be an error, not a silent prefix match.
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB",
                                parser_class=lambda **kw: argparse.ArgumentParser(allow_abbrev=False, **kw))

    p = sub.add_parser("demo", help="build a preset model, run one forward/backward, print sizes and routing")
    p.add_argument("--preset", default="tiny-moe", choices=sorted(PRESETS), help="model preset (default tiny-moe)")
    p.add_argument("--batch", type=int, default=8, help="sequences in the random batch (default 8)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=_cmd_demo)

    def run_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="model preset (default tiny-moe)")
        p.add_argument("--config", default=None, metavar="FILE",
                       help="TOML or JSON file of model and training settings (flags override it)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.add_argument("--expert-parallel", type=int, default=1, metavar="EP",
                       help="under torchrun: split each MoE layer's experts over groups of EP processes (EP divides "
                            "the number of processes and of experts; default 1 = plain data parallelism). "
                            "See docs/distributed.md")
        group = p.add_argument_group("training settings")
        _add_dataclass_flags(group, TrainConfig, skip={"data", "task_weights"})
        group.add_argument("--data", dest="data", action="append", default=argparse.SUPPRESS, metavar="PATH|NAME=PATH",
                           help="training text: a .txt / .jsonl file or a folder of them (.jsonl records may carry a "
                                "\"task\"), or NAME=PATH once per task (default: the embedded Shakespeare corpus)")
        group.add_argument("--task-weights", dest="task_weights", default=argparse.SUPPRESS, metavar="NAME=W,...",
                           help="each task's relative share of the batch rows, e.g. code=2,prose=1 (default: "
                                "proportional to its training tokens)")
        # The model's vocab_size always follows the tokenizer (--vocab-size trains a new one), its tasks the data.
        _add_dataclass_flags(p.add_argument_group("model settings (default: the preset's values)"), ModelConfig,
                             skip={"vocab_size", "tasks"}, preset="tiny-moe")

    p = sub.add_parser("train", help="train a model on the embedded corpus or your text",
                       description="Train a model. Example: moekit train --preset tiny-moe --max-steps 60 --out runs/a")
    p.add_argument("--out", default=None, metavar="RUN", help="run directory to create (must not exist)")
    p.add_argument("--resume", default=None, metavar="RUN",
                   help="continue RUN from its last complete checkpoint (with --max-steps N: extend a finished run)")
    p.add_argument("--init", default=None, metavar="CKPT",
                   help="start from the weights, config and tokenizer of CKPT: a moekit checkpoint or run directory, "
                        "a Hugging Face directory or a .gguf file")
    run_flags(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("compare", help="train a dense model and its sparse twin, report who reaches what loss when",
                       description="Dense vs MoE at equal active parameters per token on the same token budget.")
    p.add_argument("--out", default="compare", metavar="DIR", help="output directory (default ./compare)")
    p.add_argument("--ceiling", action="store_true",
                   help="also train a dense model with the MoE's total parameters (dense-total) and report each "
                   "MoE's recovery of its gain over the dense twin, and its fractions against it")
    p.add_argument("--no-eval", action="store_true",
                   help="skip the evaluation of the final models (by default `moekit eval` runs on the first seed's "
                        "models and writes OUT/eval/)")
    p.add_argument("--eval-limit", type=int, default=None, metavar="N",
                   help="items per task in that evaluation (default: moekit eval's own limits)")
    p.add_argument("--ceiling-seeds", type=int, default=None, metavar="N",
                   help="train dense-total for the first N seeds only (it is the costliest model; recovery is "
                        "then over those seeds); implies --ceiling")
    p.add_argument("--routers", nargs="+", default=None, metavar="ROUTER",
                   help="routers to sweep (topk switch expert_choice sigmoid_bias noisy_topk, or 'all'); "
                        "default: the config's router")
    p.add_argument("--experts", type=_int_list, default=None, metavar="N,N,...",
                   help="sweep the number of experts at fixed active parameters, e.g. 8,16,32,64 "
                        "(report and scaling.png: final loss and time fraction against experts)")
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="train every model with N seeds (--seed, --seed+1, ...) and report mean and spread (default 1)")
    p.add_argument("--dense-lr", type=float, default=None, metavar="LR",
                   help="the dense twin's own learning rate (default: --lr, the same as the MoE)")
    p.add_argument("--sample", default=None, metavar="PROMPT", help="print a text sample from the best MoE at the end")
    run_flags(p)
    p.set_defaults(func=_cmd_compare)

    def sampling_flags(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
        p.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                       help=f"tokens to generate at most (default {max_new_tokens})")
        p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (default 0.8)")
        p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens; 0 = off (default 50)")
        p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 = off (default 1.0)")
        p.add_argument("--repetition-penalty", type=float, default=1.0,
                       help="> 1 discourages repeating tokens; 1 = off (default 1.0)")
        p.add_argument("--seed", type=int, default=None, help="random seed for reproducible samples")
        p.add_argument("--stop", action="append", default=None, metavar="STRING",
                       help="end the answer at this text (not printed); repeatable")
        p.add_argument("--task", default=None, metavar="NAME",
                       help="the task, for a model trained with task-aware routing (one of the tasks in its config; "
                            "required when its task_routing is 'task')")

    def offload_flags(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("expert offloading", "keep the expert weights in the checkpoint file and only "
                                 "some of them in memory (moekit checkpoints; outputs are unchanged)")
        g.add_argument("--max-resident-experts", type=int, default=None, metavar="N",
                       help="experts per MoE layer held in memory (at least the model's top_k)")
        g.add_argument("--expert-memory", type=float, default=None, metavar="GB",
                       help="memory for resident experts, all layers together (GB = 10^9 bytes)")

    p = sub.add_parser("generate", help="generate text from a checkpoint or run directory, streaming",
                       description="Continue a prompt (or a file of prompts, as one batch). The answer ends at the "
                                   "model's end token, a --stop string or --max-new-tokens; speed goes to stderr.")
    p.add_argument("checkpoint", metavar="PATH", help="moekit/run directory, Hugging Face directory or .gguf file")
    p.add_argument("--prompt", default=None, help="text to continue (default: empty, i.e. from the end-of-text token)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="generate for every line of FILE (one prompt a line, \\n for a newline inside), as one batch")
    p.add_argument("--chat", action="store_true", help="treat the prompt as a user message in the model's chat template")
    p.add_argument("--system", default=None, metavar="TEXT", help="system message (with --chat)")
    sampling_flags(p, 100)
    offload_flags(p)
    p.add_argument("--quiet-prompt", action="store_true", help="print only the continuation")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("chat", help="talk to a model in the terminal (its chat template, streamed answers)",
                       description="Interactive multi-turn chat. Each input line is a user turn; /reset forgets the "
                                   "conversation, /exit (or Ctrl-D) ends it. Input may be piped. Tokens/s go to stderr.")
    p.add_argument("checkpoint", metavar="PATH", help="moekit/run directory, Hugging Face directory or .gguf file")
    p.add_argument("--system", default=None, metavar="TEXT", help="system message at the start of the conversation")
    sampling_flags(p, 256)
    offload_flags(p)
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat, streaming) on a checkpoint",
                       description="Serve CHECKPOINT over an OpenAI-compatible API: /v1/models, /v1/completions, "
                                   "/v1/chat/completions (stream: true = server-sent events), /health, /metrics, "
                                   "/v1/moekit/route and a chat and routing page at /.")
    p.add_argument("checkpoint", help="moekit checkpoint or run directory, Hugging Face directory or .gguf file")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health (default: $MOEKIT_API_KEY, "
                        "else none)")
    p.add_argument("--max-batch", type=int, default=16, metavar="N",
                   help="requests decoded together (KV-cache slots; default 16)")
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests waiting for a slot before new ones get 429 (default 64)")
    p.add_argument("--bits", type=int, choices=[8, 4], default=None,
                   help="quantize the weights on load (int8 per channel, int4 groups of 64)")
    p.add_argument("--model-name", default=None, help="the model id clients use (default: the checkpoint's name)")
    p.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN",
                   help="allow browser requests from ORIGIN (repeatable; default: no CORS)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the cores less one, left to the HTTP side; at least 1)")
    offload_flags(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("dashboard", help="a live page of a training run or compare directory (loss, aux loss, expert "
                                         "load, tokens/s, lr)",
                       description="Serve a read-only dashboard of RUN_OR_COMPARE_DIR at http://HOST:PORT/: it polls "
                                   "the runs' metrics.jsonl every 2 s, so it follows a run that is still training.")
    p.add_argument("run", metavar="RUN_OR_COMPARE_DIR", help="a run directory or a `moekit compare` output directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8001, help="port (default 8001)")
    p.set_defaults(func=_cmd_dashboard)

    p = sub.add_parser("info", help="what is inside a checkpoint (moekit, Hugging Face or GGUF), without loading it")
    p.add_argument("path", metavar="PATH", help="checkpoint directory, run directory, Hugging Face directory or .gguf")
    p.set_defaults(func=_cmd_info)

    from moekit.convert.gguf import EXPORT_DTYPES, check_export_dtype
    from moekit.model.dtypes import FLOAT_DTYPES

    def gguf_type(text: str) -> str:
        try:
            check_export_dtype(text)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text

    p = sub.add_parser("convert", help="convert between checkpoint formats (moekit, Hugging Face, GGUF)",
                       description="Read SRC in any supported format and write DST. Examples: "
                                   "moekit convert runs/a/checkpoints/step-60 model.gguf --gguf-type q8_0; "
                                   "moekit convert SmolLM2.Q4_1.gguf smol-hf --format hf --dtype bf16")
    p.add_argument("src", metavar="SRC", help="moekit/run directory, Hugging Face directory or .gguf file")
    p.add_argument("dst", metavar="DST", help="output directory (moekit, hf) or .gguf file")
    p.add_argument("--format", choices=["moekit", "hf", "gguf"], default=None,
                   help="output format (default: gguf if DST ends in .gguf, else moekit); gguf needs a DST "
                        "ending in .gguf, moekit and hf one that does not")
    p.add_argument("--dtype", choices=list(FLOAT_DTYPES), default=None,
                   help="moekit and hf outputs: storage dtype (default: the source's; bf16 for a quantized GGUF)")
    p.add_argument("--gguf-type", type=gguf_type, default=None, metavar="|".join(EXPORT_DTYPES),
                   help="GGUF output: tensor type of the matrices (default f16; q4_0 keeps the output "
                        "projection at q8_0)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("quantize", help="weight-only int8 / int4 quantization of a checkpoint",
                       description="Quantize the linear and expert weights (int8 per output channel, or int4 in groups "
                                   "along the input); embeddings, norms and routers stay float. moekit.load, generate, "
                                   "chat and the engine run the result without dequantizing it.")
    p.add_argument("src", metavar="SRC", help="moekit/run directory, Hugging Face directory or .gguf file")
    p.add_argument("dst", metavar="DST", help="output moekit checkpoint directory")
    p.add_argument("--bits", type=int, required=True, metavar="8|4", help="8 (per-channel int8) or 4 (group-wise int4)")
    p.add_argument("--group-size", type=int, default=32, metavar="32|64|128",
                   help="int4: input features sharing one scale and zero point (default 32)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser("upcycle", help="turn a dense model into an MoE by copying its MLPs into experts",
                       description="Sparse upcycling (Komatsuzaki et al. 2022). At initialisation the MoE computes "
                                   "the dense model's outputs; continue with moekit train --init DST.")
    p.add_argument("src", metavar="SRC", help="dense model: moekit/run directory, Hugging Face directory or .gguf")
    p.add_argument("dst", metavar="DST", help="output moekit checkpoint directory")
    p.add_argument("--experts", type=int, required=True, help="experts per MoE layer")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    p.add_argument("--router", default="topk",
                   choices=["topk", "switch", "noisy_topk", "expert_choice", "sigmoid_bias"],
                   help="router (default topk; switch and expert_choice do not reproduce the dense outputs at init)")
    p.add_argument("--noise", type=float, default=0.0, help="relative std of noise added to each expert copy (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed for the router init and noise (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=_cmd_upcycle)
    from moekit.eval.run import ALL_TASKS, DEFAULT_LM_LIMIT, DEFAULT_MC_LIMIT
    from moekit.paths.trace import DEFAULT_LIMIT as DEFAULT_PATHS_LIMIT

    p = sub.add_parser("eval", help="evaluate models side by side: language modelling, multiple choice, calibration, "
                                    "robustness, efficiency, routing",
                       description="Evaluate every PATH on the same seeded items through the inference engine and "
                                   "report which is better, by how much, at what cost, and what its experts do. "
                                   "Example: moekit eval runs/compare/dense-s0 runs/compare/moe-sigmoid_bias-s0 --out report/. "
                                   "Report keys: docs/eval.md.")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="models: moekit checkpoint or run directories (int8/int4 too), Hugging Face directories, .gguf")
    p.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                   help=f"tasks to run (default all): {', '.join(ALL_TASKS)}, data; comma- or space-separated")
    p.add_argument("--data", default=None, metavar="FILE_OR_DIR",
                   help="also score your text (.txt, .jsonl or a folder of them) as the task 'data'")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write report.json, report.md and the plots into DIR (default: print the summary only)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help=f"items per task (default {DEFAULT_LM_LIMIT} documents per language-modelling set, "
                        f"{DEFAULT_MC_LIMIT} questions per multiple-choice task)")
    p.add_argument("--seed", type=int, default=0, help="seed of the items, perturbations and measurements (default 0)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is faster for tiny models on a busy machine)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("paths", help="which experts serve each task, and how much of the network each task uses",
                       description="Route each task's text through the inference engine and report, per task and MoE "
                                   "layer, each expert's share of the (token, expert) assignments and the smallest "
                                   "expert sets covering 90/95/99% of them; heatmaps per layer. Works on any MoE "
                                   "checkpoint, with or without task labels. Example: moekit paths CKPT --data "
                                   "plays=plays.txt --data code=src/ --out paths/. Keys: docs/pathways.md.")
    p.add_argument("checkpoint", metavar="CKPT", help="MoE model: moekit/run directory, Hugging Face directory or .gguf")
    p.add_argument("--data", action="append", required=True, metavar="NAME=PATH",
                   help="a task and its text (.txt, .jsonl or a folder of them); repeat for each task (a bare PATH is "
                        "named after its file or folder). A task-aware model must know NAME")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write paths.json, paths.md and the heatmaps into DIR (default: print the summary only)")
    p.add_argument("--limit", type=int, default=DEFAULT_PATHS_LIMIT, metavar="N",
                   help=f"documents (pieces of ~2,000 characters, spread through the text) per task (default "
                        f"{DEFAULT_PATHS_LIMIT})")
    p.add_argument("--seed", type=int, default=0, help="request seed (prefill only: nothing is sampled; default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_paths)

    p = sub.add_parser("extract", help="a smaller checkpoint holding only one task's experts",
                       description="Keep, in every MoE layer, the experts that serve a task (from its routing "
                                   "statistics: --data its text, or --paths a paths.json), with the router cut to "
                                   "them. The result is an ordinary checkpoint (load, generate, eval, quantize, serve, "
                                   "convert). At --coverage 1 it gives the full model's logits on that text. "
                                   "Example: moekit extract CKPT plays-path --task plays --data plays.txt --coverage 0.95")
    p.add_argument("src", metavar="CKPT", help="MoE model: moekit/run directory, Hugging Face directory or .gguf")
    p.add_argument("dst", metavar="DST", help="output moekit checkpoint directory")
    p.add_argument("--task", required=True, metavar="NAME", help="the task whose experts to keep")
    p.add_argument("--coverage", type=float, default=None, metavar="C",
                   help="keep the experts holding this share of the task's assignments in each layer, in (0, 1] "
                        "(default 0.95; 1 = every expert the task reaches). A task-routed model given no statistics "
                        "keeps the task's own experts")
    p.add_argument("--experts-per-layer", type=int, default=None, metavar="K",
                   help="keep the K experts per layer with the most of the task's assignments (top_k <= K <= experts)")
    p.add_argument("--data", default=None, metavar="PATH", help="the task's text (.txt, .jsonl or a folder), routed now")
    p.add_argument("--paths", default=None, metavar="FILE", help="the task's statistics from a paths.json (moekit paths)")
    p.add_argument("--limit", type=int, default=DEFAULT_PATHS_LIMIT, metavar="N",
                   help=f"with --data: documents of ~2,000 characters to route (default {DEFAULT_PATHS_LIMIT})")
    p.add_argument("--seed", type=int, default=0, help="request seed (prefill only; default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=_cmd_extract)

    # Parsed by the harness, not here (main() hands everything after the verb over untouched); this entry
    # puts it in `moekit --help`.
    sub.add_parser("lm-eval", add_help=False,
                   help="run the lm-evaluation-harness (lm-eval run ARGS) with the model 'moekit' and this project's "
                        "tasks; moekit lm-eval --help")
    return parser


def _lm_eval(argv: list[str]) -> int:
    """``moekit lm-eval ARGS``: the harness's own command line (:func:`moekit.eval.lm_eval_adapter.main`).

    NOTE: handed over before argparse sees it: a subparser would take the harness's flags for its own
    (``-h``, prefixes) or refuse them, and argparse.REMAINDER cannot start with an option.
    """
    from moekit.checkpoint import CheckpointError
    from moekit.data import DataError
    from moekit.eval.lm_eval_tasks import set_offline
    from moekit.infer import EngineError

    set_offline()  # before lm_eval imports datasets, which reads it once
    try:
        from moekit.eval.lm_eval_adapter import main as harness_main
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "lm_eval":
            raise
        print("moekit lm-eval: error: lm-eval is not installed: pip install 'moekit[eval]'", file=sys.stderr)
        return 2
    try:
        code = harness_main(argv)
        sys.stdout.flush()
        return code
    except (ConfigError, DataError, CheckpointError, EngineError) as e:
        print(f"moekit lm-eval: error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:
        return _lm_eval(argv[1:])
    parser = build_parser()
    parser.add_argument("--version", action="version", version=f"moekit {_version()}")
    args = parser.parse_args(argv)
    from moekit.checkpoint import CheckpointError
    from moekit.data import DataError
    from moekit.infer import EngineError
    from moekit.infer.chat import ChatTemplateError
    from moekit.quant import QuantizationError
    from moekit.train.loop import RunError

    try:
        args.func(args)
        sys.stdout.flush()
    except (ConfigError, DataError, CheckpointError, RunError, EngineError, ChatTemplateError,
            QuantizationError) as e:
        print(f"moekit {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"moekit {args.verb}: error: file not found: {e.filename}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`moekit generate ... | head -5`): stop quietly, as Unix tools do.
        # Python docs, "Note on SIGPIPE": point stdout at devnull so the exit flush cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank is interrupted; one says so
            print(f"\ninterrupted{_interrupt_hint(args)}", file=sys.stderr)
        return 130
    finally:
        _close_parallel(args)
    return 0


def _close_parallel(args: argparse.Namespace) -> None:
    """Leave the process group cleanly after a distributed verb that finished."""
    par = getattr(args, "parallel", None)
    if par is not None:
        par.close()


def _interrupt_hint(args: argparse.Namespace) -> str:
    """What to do after Ctrl-C: only training verbs have something to continue."""
    if args.verb == "compare":
        return "; run the same command again: finished runs are reused, the interrupted one continues"
    if args.verb != "train":
        return ""
    from moekit.checkpoint import find_checkpoints

    run = args.resume or args.out
    if run and find_checkpoints(Path(run)):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            return (f"; continue from the last checkpoint on any number of processes: torchrun --nproc-per-node N "
                    f"-m moekit train --resume {run} [--expert-parallel EP], or moekit train --resume {run}")
        return f"; continue from the last checkpoint with: moekit train --resume {run}"
    return "; no checkpoint had been written, so nothing was kept: run the same command again"


def _version() -> str:
    from moekit import __version__

    return __version__
