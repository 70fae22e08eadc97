"""The command line: thin. Each verb parses flags and calls one documented function elsewhere."""

from __future__ import annotations

import argparse
import sys

from moekit.config import PRESETS, ConfigError


def _cmd_demo(args: argparse.Namespace) -> None:
    from moekit.summary import run_demo
    from moekit.utils import tune_cpu_allocator

    tune_cpu_allocator()
    run_demo(args.preset, batch=args.batch, seq_len=args.seq_len, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moekit", description="Sparse Mixture-of-Experts language models.")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("demo", help="build a preset model, run one forward/backward, print sizes and routing")
    p.add_argument("--preset", default="tiny-moe", choices=sorted(PRESETS), help="model preset (default tiny-moe)")
    p.add_argument("--batch", type=int, default=8, help="sequences in the random batch (default 8)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"moekit {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
