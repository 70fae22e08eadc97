"""Training throughput: moekit against Hugging Face ``transformers``' MixtralForCausalLM, same run.

Identical shapes (layers, width, heads, experts, top-k, vocabulary, sequence, batch), identical
weights (copied from moekit into the HF model), the same AdamW, the same batches; both include the
load-balancing loss. Reported: tokens/s of full training steps (forward, backward, clip, optimizer)
and the ratio to transformers float32; then a short loss-curve check that bf16 autocast trains like
float32.

    python benchmarks/train_throughput.py                 # default shapes (batch 8 x seq 256)
    python benchmarks/train_throughput.py --steps 10      # fewer timed steps
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from moekit import ModelConfig, Transformer
from moekit.utils import tune_cpu_allocator


def hf_mixtral_from(model: Transformer):
    """A transformers MixtralForCausalLM with the same shapes and weights as ``model``."""
    from transformers import MixtralConfig, MixtralForCausalLM

    c = model.cfg
    hcfg = MixtralConfig(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.expert_ffn_dim,
                         num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
                         head_dim=c.head_dim, max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
                         rope_theta=c.rope_theta, num_local_experts=c.num_experts, num_experts_per_tok=c.top_k,
                         tie_word_embeddings=c.tie_embeddings, output_router_logits=True,
                         router_aux_loss_coef=c.aux_loss_coef, router_jitter_noise=0.0, attn_implementation="sdpa")
    hf = MixtralForCausalLM(hcfg)
    sd = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight}
    if not c.tie_embeddings:
        sd["lm_head.weight"] = model.lm_head.weight
    for i, b in enumerate(model.layers):
        p = f"model.layers.{i}."
        a = b.attn
        sd.update({p + "input_layernorm.weight": b.attn_norm.weight, p + "post_attention_layernorm.weight": b.ffn_norm.weight,
                   p + "self_attn.q_proj.weight": a.q_proj.weight, p + "self_attn.k_proj.weight": a.k_proj.weight,
                   p + "self_attn.v_proj.weight": a.v_proj.weight, p + "self_attn.o_proj.weight": a.o_proj.weight,
                   p + "mlp.gate.weight": b.ffn.router.weight, p + "mlp.experts.gate_up_proj": b.ffn.experts.gate_up_proj,
                   p + "mlp.experts.down_proj": b.ffn.experts.down_proj})
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    missing = [m for m in missing if not (c.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"weight copy failed: missing {missing}, unexpected {unexpected}")
    return hf


def make_step(model, hf: bool, bf16: bool, lr: float = 1e-3):
    # Fused AdamW for both: moekit's trainer uses it, and so does transformers' Trainer by default.
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=True)
    aux_coef = model.config.router_aux_loss_coef if hf else None

    def step(x, y) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if hf:
                out = model(input_ids=x)
                logits, aux = out.logits, aux_coef * out.aux_loss
            else:  # moekit's training path: fused linear cross-entropy (no [B, T, V] logits)
                out = model(x, labels=y)
                loss, aux = out.loss, out.aux_loss
        if hf:  # what transformers' own loss does: float32 cross-entropy over the logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        (loss + aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


def gemm_rates(threads: int) -> str:
    """fp32 and bf16 GEMM rates of this CPU, and whether it has AMX: what a bf16 speed-up can be at most.

    bf16 pays only where the CPU multiplies bf16 faster than fp32 (AMX tiles, Sapphire Rapids and
    later). With AVX512-BF16 alone (this project's usual 2-core machines) oneDNN's bf16 GEMM ran at
    ~0.6x of fp32, so the same benchmark gives bf16 at 1.5x on one host and 0.6x on another."""
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 512), torch.randn(512, 1024)
    rates = {}
    for name, (x, y) in {"fp32": (a, b), "bf16": (a.bfloat16(), b.bfloat16())}.items():
        for _ in range(3):
            x @ y
        t0 = time.perf_counter()
        for _ in range(10):
            x @ y
        rates[name] = 10 * 2 * 2048 * 512 * 1024 / (time.perf_counter() - t0) / 1e9
    try:
        amx = "amx_bf16" in open("/proc/cpuinfo").read()
    except OSError:
        amx = False
    return (f"GEMM 2048x512x1024: fp32 {rates['fp32']:.0f} GFLOPS, bf16 {rates['bf16']:.0f} GFLOPS "
            f"({rates['bf16'] / rates['fp32']:.2f}x); AMX {'yes' if amx else 'no'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--dim", type=int, default=256, help="model width (default 256)")
    parser.add_argument("--layers", type=int, default=4, help="layers (default 4)")
    parser.add_argument("--experts", type=int, default=8, help="experts (default 8)")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    parser.add_argument("--expert-ffn", type=int, default=512, help="expert FFN width (default 512)")
    parser.add_argument("--vocab", type=int, default=4096, help="vocabulary (default 4096)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per candidate and round (default 8)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before timing (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of all candidates (default 3)")
    parser.add_argument("--candidate", default=None, help=argparse.SUPPRESS)  # internal: child process mode
    parser.add_argument("--curve-steps", type=int, default=50, help="steps of the loss-curve check (default 50; 0 = skip)")
    args = parser.parse_args()
    tune_cpu_allocator()
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny-moe", vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=8,
                                  n_kv_heads=4, num_experts=args.experts, top_k=args.top_k,
                                  expert_ffn_dim=args.expert_ffn, max_seq_len=args.seq, z_loss_coef=0.0)
    base = Transformer(cfg)
    data = torch.randint(0, args.vocab, (8, args.batch, args.seq + 1),
                         generator=torch.Generator().manual_seed(1))
    if not args.candidate:
        print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; batch {args.batch} x seq {args.seq}, "
              f"dim {args.dim}, {args.layers} layers, {args.experts} experts top-{args.top_k} (width {args.expert_ffn}), "
              f"vocab {args.vocab}")
        print(gemm_rates(torch.get_num_threads()))

    def fresh(kind: str):
        m = Transformer(cfg)
        m.load_state_dict(base.state_dict())
        if kind == "hf":
            return hf_mixtral_from(m).train(), True
        return m.train(), False

    candidates = {"transformers fp32": ("hf", False), "moekit fp32": ("moekit", False), "moekit bf16": ("moekit", True)}
    if args.candidate:  # child process: time one candidate, print its step times as JSON
        kind, bf16 = candidates[args.candidate]
        model, is_hf = fresh(kind)
        step = make_step(model, is_hf, bf16)
        times = []
        for i in range(args.warmup + args.steps):
            x, y = data[i % len(data), :, :-1], data[i % len(data), :, 1:]
            t0 = time.perf_counter()
            step(x, y)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        print(json.dumps({"times": times}))
        return

    # Each candidate runs in its own process (so no candidate inherits another's heap), after
    # ``--warmup`` steps that bring the allocator to its steady state; rounds alternate the
    # candidates so that drifting machine load hits all of them alike.
    times = {name: [] for name in candidates}
    for _ in range(args.rounds):
        for name in candidates:
            cmd = [sys.executable, __file__, "--candidate", name, *[a for a in sys.argv[1:]]]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            times[name] += json.loads(out.strip().splitlines()[-1])["times"]
    tokens = args.batch * args.seq
    ref = statistics.median(times["transformers fp32"])
    print(f"({args.rounds} rounds x {args.steps} timed steps per candidate, each after {args.warmup} warm-up steps)")
    print("| implementation | tokens/s | speed vs transformers fp32 |")
    print("|---|---|---|")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"| {name} | {tokens / t:,.0f} | {ref / t:.2f}x |", flush=True)

    if args.curve_steps:
        # Learnable data: a repeating pattern with 10% noise, so the loss really falls.
        # Same init, same batches: the loss of each step for fp32 and bf16 (and transformers fp32), plus
        # fp32 from another initialisation as the yardstick of run-to-run noise.
        pattern = torch.randint(0, args.vocab, (64,), generator=torch.Generator().manual_seed(2))
        curves = {}
        runs = dict(candidates)
        runs["moekit fp32, other init"] = ("moekit-seed1", False)
        for name, (kind, bf16) in runs.items():
            if kind == "moekit-seed1":
                torch.manual_seed(1)
                model, is_hf = Transformer(cfg).train(), False
            else:
                model, is_hf = fresh(kind)
            step = make_step(model, is_hf, bf16, lr=1e-3)
            g = torch.Generator().manual_seed(3)
            losses = []
            for _ in range(args.curve_steps):
                offsets = torch.randint(0, 64, (args.batch, 1), generator=g)
                seq = pattern[(offsets + torch.arange(args.seq + 1)) % 64]
                noise = torch.rand(seq.shape, generator=g) < 0.1
                seq = torch.where(noise, torch.randint(0, args.vocab, seq.shape, generator=g), seq)
                losses.append(step(seq[:, :-1], seq[:, 1:]))
            curves[name] = losses
        # Single steps are noisy (routing flips); compare means over windows of 5 steps.
        w = 5
        windows = range(0, args.curve_steps - w + 1, w)
        print(f"\nloss curve check (same batches, lr 1e-3), mean loss per {w}-step window:")
        print("| steps | " + " | ".join(curves) + " |")
        print("|---|" + "---|" * len(curves))
        means = {n: [sum(c[s:s + w]) / w for s in windows] for n, c in curves.items()}
        for i, s in enumerate(windows):
            print(f"| {s + 1}-{s + w} | " + " | ".join(f"{means[n][i]:.4f}" for n in curves) + " |")
        def gap(a: str, b: str) -> float:
            return max(abs(x - y) for x, y in zip(means[a], means[b]))

        print(f"largest window difference: moekit fp32 vs bf16 {gap('moekit fp32', 'moekit bf16'):.4f} nats; "
              f"fp32 vs fp32 from another init (noise) {gap('moekit fp32', 'moekit fp32, other init'):.4f} nats; "
              f"moekit vs transformers fp32 {gap('moekit fp32', 'transformers fp32'):.4f} nats "
              "(transformers averages its balance loss over layers, moekit sums it per layer)")


if __name__ == "__main__":
    main()
