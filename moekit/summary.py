"""Human-readable summaries of a model and its routing (used by `moekit demo` and `moekit info`)."""

from __future__ import annotations

import time

import torch

from moekit.config import ModelConfig
from moekit.model.router import RouterStats


def human(n: float) -> str:
    """12_345_678 -> '12.35M'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def human_bytes(n: int) -> str:
    """541_065_216 -> '516.00 MiB'."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def describe_config(cfg: ModelConfig) -> str:
    total, active = cfg.param_counts()
    lines = [
        f"layers {cfg.n_layers}, dim {cfg.dim}, heads {cfg.n_heads} (kv {cfg.n_kv_heads}), vocab {cfg.vocab_size}",
        f"parameters: {human(total)} total, {human(active)} active per token ({active / total:.1%})",
    ]
    if cfg.num_experts:
        shared = f", {cfg.num_shared_experts} shared" if cfg.num_shared_experts else ""
        lines.append(
            f"MoE: {cfg.num_moe_layers}/{cfg.n_layers} layers, {cfg.num_experts} experts of width "
            f"{cfg.expert_ffn_dim}{shared}, router {cfg.router}, top-{cfg.top_k}, "
            f"capacity factor train {cfg.capacity_factor} / eval {cfg.eval_capacity_factor}"
        )
    else:
        lines.append(f"dense SwiGLU MLP of width {cfg.ffn_dim}")
    if cfg.tasks:
        routing = cfg.task_routing if cfg.num_experts else "none"
        line = f"tasks: {', '.join(cfg.tasks)}; task routing {routing}"
        if routing == "task":
            line += " (experts " + "; ".join(f"{name}: {_ranges(e)}" for name, e in cfg.task_expert_sets().items()) + ")"
        lines.append(line)
    return "\n".join(lines)


def _ranges(ids: list[int]) -> str:
    """Expert indices as ranges: [0, 1, 2, 5] -> "0-2, 5"."""
    out, ids = [], sorted(ids)
    start = prev = ids[0]
    for i in ids[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(out)


def routing_table(stats: list[RouterStats], moe_layer_ids: list[int]) -> str:
    """One line per MoE layer: load per expert, dropped share, entropy, max-violation."""
    rows = [f"{'layer':>5}  {'tokens per expert':<40} {'dropped':>7} {'entropy':>7} {'maxvio':>7}"]
    for layer, s in zip(moe_layer_ids, stats):
        load = s.tokens_per_expert.tolist()
        shown = " ".join(str(int(v)) for v in load[:12]) + (" ..." if len(load) > 12 else "")
        rows.append(f"{layer:>5}  {shown:<40} {float(s.dropped_fraction):>7.1%} "
                    f"{float(s.entropy):>7.3f} {float(s.max_violation):>7.2f}")
    return "\n".join(rows)


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``), or None if unknown."""
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_demo(preset: str = "tiny-moe", batch: int = 8, seq_len: int = 128, seed: int = 0) -> None:
    """Build a preset, run one forward/backward on random tokens, print sizes and routing."""
    from moekit.model import Transformer

    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset(preset)
    print(f"preset {preset}\n{describe_config(cfg)}")
    total, _ = cfg.param_counts()
    need = total * 4 * 2  # float32 weights and their gradients; activations come on top
    available = available_memory()
    if available is not None and need > available // 2:
        with torch.device("meta"):  # shapes only: nothing is allocated
            meta = Transformer(cfg)
        counted = sum(p.numel() for p in meta.parameters())
        print(f"built on the meta device (shapes only): {counted:,} parameters, matching the count above. "
              f"A forward/backward needs over {human_bytes(need)} for float32 weights and gradients; this "
              f"machine has {human_bytes(available)} available, so the demo stops here.")
        return
    model = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (batch, min(seq_len, cfg.max_seq_len)))
    t0 = time.perf_counter()
    out = model(ids)
    loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    (loss + out.aux_loss).backward()
    dt = time.perf_counter() - t0
    print(f"forward+backward on {ids.numel()} tokens: {dt * 1000:.0f} ms; "
          f"lm loss {loss.item():.3f} (ln V = {torch.log(torch.tensor(float(cfg.vocab_size))):.3f}), "
          f"aux loss {out.aux_loss.item():.4f}")
    if out.router_stats:
        layer_ids = [i for i, b in enumerate(model.layers) if b.is_moe]
        print("routing at initialisation:\n" + routing_table(out.router_stats, layer_ids))
