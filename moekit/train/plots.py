"""PNG plots of a run: loss curves, and each MoE layer's expert load over time."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moekit.train.loop import read_metrics  # noqa: E402


def plot_run(run: str | Path) -> list[Path]:
    """Write ``plots/loss.png`` and, for MoE runs, ``plots/expert_load.png``; returns the paths."""
    run = Path(run)
    records = read_metrics(run)
    if not records:
        return []
    plots = run / "plots"
    plots.mkdir(exist_ok=True)
    written = []

    train = [r for r in records if "train_loss" in r]
    val = [r for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if train:
        ax.plot([r["tokens"] for r in train], [r["train_loss"] for r in train], label="train", alpha=0.8)
    if val:
        ax.plot([r["tokens"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("tokens")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"{run.name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(plots / "loss.png", dpi=110)
    plt.close(fig)
    written.append(plots / "loss.png")

    loads = [r for r in train if r.get("expert_load")]
    if loads:
        n_layers = len(loads[0]["expert_load"])
        fig, axes = plt.subplots(n_layers, 1, figsize=(7, 1.6 * n_layers + 0.8), sharex=True, squeeze=False)
        steps = [r["step"] for r in loads]
        for layer in range(n_layers):
            grid = np.array([r["expert_load"][layer] for r in loads]).T  # [E, logged steps]
            E = grid.shape[0]
            ax = axes[layer, 0]
            im = ax.imshow(grid * E, aspect="auto", origin="lower", cmap="magma", vmin=0, vmax=max(2.0, float(grid.max() * E)),
                           extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, E - 0.5), interpolation="nearest")
            ax.set_ylabel(f"MoE {layer}\nexpert")
        axes[-1, 0].set_xlabel("step")
        fig.colorbar(im, ax=axes[:, 0], label="load / uniform share")
        fig.suptitle(f"{run.name}: expert load over time (1 = perfectly balanced)")
        fig.savefig(plots / "expert_load.png", dpi=110)
        plt.close(fig)
        written.append(plots / "expert_load.png")
    return written
