"""MoE layer forward+backward throughput: moekit's fast dispatch against named baselines, same run.

Baselines, all with the same active parameters per token:
- dense:     a SwiGLU MLP of hidden width k * F (what the MoE costs if routing were free)
- reference: moekit's plain per-expert loop (Experts.reference)
- hf:        transformers' MixtralSparseMoeBlock with the same weights (if transformers is installed)

Reported as ratios of time per step (lower is better for the MoE): machines here are shared and
noisy, so each configuration alternates the candidates and takes the median of several repeats.

    python benchmarks/moe_layer.py            # full grid, prints a markdown table
    python benchmarks/moe_layer.py --quick    # a smaller grid
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moekit import ModelConfig
from moekit.model.layers import MLP
from moekit.model.moe import MoE
from moekit.utils import tune_cpu_allocator


def step_time(fn, repeats: int, inner: int) -> float:
    """Median over ``repeats`` of the mean time of ``inner`` calls."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def fwd_bwd(module, x, moe: bool):
    def run():
        if moe:
            y, aux, _ = module(x)
            (y.float().pow(2).mean() + aux).backward()
        else:
            y = module(x)
            if isinstance(y, tuple):  # transformers' block returns (y, router_logits) in some versions
                y = y[0]
            y.float().pow(2).mean().backward()
        x.grad = None
        for p in module.parameters():
            p.grad = None
    return run


def hf_block(cfg: ModelConfig, moe: MoE):
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return None
    hcfg = MixtralConfig(hidden_size=cfg.dim, intermediate_size=cfg.expert_ffn_dim, num_local_experts=cfg.num_experts,
                         num_experts_per_tok=cfg.top_k, router_jitter_noise=0.0)
    block = MixtralSparseMoeBlock(hcfg)
    sd = block.state_dict()
    if "experts.gate_up_proj" in sd:  # transformers >= 5: fused 3-D experts, same layout as moekit
        block.load_state_dict({"gate.weight": moe.router.weight.data, "experts.gate_up_proj": moe.experts.gate_up_proj.data,
                               "experts.down_proj": moe.experts.down_proj.data})
    return block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small grid (fewer token counts)")
    parser.add_argument("--dim", type=int, default=256, help="model dim D (default 256)")
    parser.add_argument("--ffn", type=int, default=512, help="expert FFN width F (default 512)")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per candidate (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's allocator as it is (default: moekit.utils.tune_cpu_allocator(), as the CLI does)")
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32, 64], help="expert counts (default 8 32 64)")
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="token counts (default 64 512 2048 8192)")
    args = parser.parse_args()
    tuned = False if args.default_malloc else tune_cpu_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    token_counts = args.tokens or ([256, 2048, 8192] if args.quick else [64, 512, 2048, 8192])
    expert_counts = args.experts
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, D={args.dim}, F={args.ffn}, k={args.top_k}, "
          f"fp32, forward+backward, tuned allocator: {tuned}")
    header = "| experts | tokens | moekit fast (tok/s) | fast / dense-active | reference / fast | hf mixtral / fast |"
    print(header)
    print("|" + "---|" * 6)
    for E in expert_counts:
        cfg = ModelConfig.from_preset("tiny-moe", dim=args.dim, num_experts=E, top_k=args.top_k, expert_ffn_dim=args.ffn,
                                      n_heads=4, n_kv_heads=4, aux_loss_coef=0.01, z_loss_coef=0.001)
        torch.manual_seed(0)
        moe = MoE(cfg)
        for p in moe.parameters():
            torch.nn.init.normal_(p, std=0.02)
        ref = MoE(cfg)
        ref.load_state_dict(moe.state_dict())
        ref.dispatch = "reference"
        dense = MLP(args.dim, args.top_k * args.ffn)
        hf = None if args.no_hf else hf_block(cfg, moe)
        for T in token_counts:
            # The input needs a gradient, as it does inside a network (it came from earlier layers).
            x = torch.randn(1, T, args.dim, requires_grad=True)
            inner = max(1, 2048 // T)
            cands = {"fast": fwd_bwd(moe, x, True), "dense": fwd_bwd(dense, x, False), "ref": fwd_bwd(ref, x, True)}
            if hf is not None:
                cands["hf"] = fwd_bwd(hf, x, False)
            for fn in cands.values():  # warm up
                fn()
            times = {k: [] for k in cands}
            for _ in range(args.repeats):  # alternate candidates so drifting load hits all alike
                for k, fn in cands.items():
                    times[k].append(step_time(fn, 1, inner))
            t = {k: statistics.median(v) for k, v in times.items()}
            hf_ratio = f"{t['hf'] / t['fast']:.2f}x" if "hf" in t else "n/a"
            print(f"| {E} | {T} | {T / t['fast']:,.0f} | {t['fast'] / t['dense']:.2f}x | {t['ref'] / t['fast']:.2f}x | "
                  f"{hf_ratio} |", flush=True)


if __name__ == "__main__":
    main()
