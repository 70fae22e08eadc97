"""The report of ``moekit eval``: report.json (keys in docs/eval.md), report.md and PNG plots.

The first paragraph of report.md (:func:`headline`, also ``report["headline"]``) answers the questions a
reader has in the first minute: which model is better and by how much (with the paired standard error),
at what cost to run, and what its experts do. The second says how calibrated and how robust each is.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from moekit.utils import atomic_write_text

#: The perturbations' and figures' names as the text says them.
_LM_NAMES = {"shakespeare": "the held-out plays", "austen": "Austen", "data": "your text"}


def _ok(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _pm(value: float, se: float, fmt: str = "{:.3f}", scale: float = 1.0) -> str:
    """``value ± se`` (no ± when the error is unknown, e.g. one document)."""
    text = fmt.format(value * scale)
    return text + (f" ± {fmt.replace('+', '').format(se * scale)}" if _ok(se) else "")


def _num(n: float) -> str:
    """12_345_678 -> '12.3M'."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"


def _lm_task(report: dict) -> str | None:
    return next(iter(report["models"][0]["lm"]), None)


def _mc_total(fig: dict) -> tuple[float, int]:
    """Accuracy over every multiple-choice item of every task, and the number of items."""
    n = sum(m["items"] for m in fig["mc"].values())
    return (sum(m["acc"] * m["items"] for m in fig["mc"].values()) / n if n else math.nan), n


def _cost(best: dict, other: dict) -> str | None:
    eb, eo = best.get("efficiency"), other.get("efficiency")
    if not eb or not eo:
        return None
    parts = []
    if eo["params_active"]:
        parts.append(f"{eb['params_active'] / eo['params_active']:.2f}x the active parameters per token "
                     f"({_num(eb['params_active'])} vs {_num(eo['params_active'])})")
    if eo["params_total"]:
        parts.append(f"{eb['params_total'] / eo['params_total']:.2f}x the parameters in memory "
                     f"({_num(eb['params_total'])} vs {_num(eo['params_total'])})")
    if eo.get("decode_tokens_per_s"):
        parts.append(f"{eb['decode_tokens_per_s'] / eo['decode_tokens_per_s']:.2f}x the decode speed "
                     f"({eb['decode_tokens_per_s']:,.0f} vs {eo['decode_tokens_per_s']:,.0f} tokens/s on this machine)")
    return ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1] if parts else None


def experts_sentence(fig: dict) -> str | None:
    """What one MoE model's experts do, in a sentence; None for a dense model."""
    r = fig.get("routing")
    if not r:
        return None
    E, k, layers = r["num_experts"], r["top_k"], len(r["layers"])
    dead = sum(len(d) for d in r["dead_experts"])
    worst = max(r["max_violation"]) if r["max_violation"] else math.nan
    ent = r["router_entropy"]
    text = (f"In {fig['name']} ({E} experts per layer, top-{k}, {layers} MoE layer{'s' if layers != 1 else ''}) "
            f"{'no expert is dead' if not dead else f'{dead} experts get no token'}, the busiest takes {1 + worst:.2f}x "
            f"an even share of the tokens (max-violation {worst:.2f}) and the router's entropy is "
            f"{sum(ent) / len(ent):.2f} nats (uniform: {math.log(E):.2f})")
    spec = r.get("specialisation") or {}
    if spec.get("pairs"):
        best_pair = max(range(len(spec["pairs"])), key=lambda p: max(spec["js_divergence"][p]))
        js = spec["js_divergence"][best_pair]
        layer = max(range(len(js)), key=lambda j: js[j])
        a, b = spec["pairs"][best_pair]
        text += (f"; the experts tell {a} from {b} text most (Jensen-Shannon divergence {js[layer]:.3f} bits in MoE "
                 f"layer {r['layers'][layer]}; 0: the same experts, 1: disjoint ones)")
    return text + "."


def _verdict(best: dict, other: dict, diff: dict, lm_task: str | None) -> str:
    """One sentence: how much better ``best`` is than ``other`` (diff holds other - best, paired)."""
    claims = []
    if lm_task is not None:
        d = diff["bits_per_byte"][lm_task]
        clear = _ok(d["delta_se"]) and d["delta"] > 2 * d["delta_se"]
        where = _LM_NAMES.get(lm_task, lm_task)
        lead = (f"{best['name']} predicts {where} better than {other['name']}" if clear else
                f"{best['name']} and {other['name']} predict {where} equally well within two standard errors"
                if _ok(d["delta_se"]) else
                f"{best['name']} predicts {where} better than {other['name']} (one document: no standard error)")
        for task, d in diff["bits_per_byte"].items():
            claims.append(f"{_pm(abs(d['delta']), d['delta_se'])} {'fewer' if d['delta'] >= 0 else 'more'} bits per byte "
                          f"on {_LM_NAMES.get(task, task)} ({best['lm'][task]['bits_per_byte']:.3f} vs "
                          f"{other['lm'][task]['bits_per_byte']:.3f})")
    if "acc_all" in diff:
        d = diff["acc_all"]
        acc_b, n = _mc_total(best)
        acc_o, _ = _mc_total(other)
        more = -d["delta"]
        claims.append(f"{_pm(abs(more), d['delta_se'], '{:.1f}', 100)} points {'more' if more >= 0 else 'fewer'} of "
                      f"{n} multiple-choice questions right ({100 * acc_b:.1f}% vs {100 * acc_o:.1f}%; chance 25%)")
        if lm_task is None:
            clear = _ok(d["delta_se"]) and more > 2 * d["delta_se"]
            lead = (f"{best['name']} answers better than {other['name']}" if clear else
                    f"{best['name']} and {other['name']} answer equally well within two standard errors")
    return f"{lead}: " + "; ".join(claims) + " (± paired standard errors, the same documents and questions for both)."


def headline(report: dict) -> str:
    """The first paragraph of report.md: which model is better, by how much, at what cost, what its experts do."""
    figs = {m["name"]: m for m in report["models"]}
    lm_task = _lm_task(report)
    cmp = report["comparison"]
    best = figs[cmp["best"]]
    sentences = []
    if len(figs) == 1:
        parts = []
        if lm_task is not None:
            m = best["lm"][lm_task]
            parts.append(f"{_pm(m['bits_per_byte'], m['bits_per_byte_se'])} bits per byte on {_LM_NAMES.get(lm_task, lm_task)}")
        if best["mc"]:
            acc, n = _mc_total(best)
            parts.append(f"{100 * acc:.1f}% of {n} multiple-choice questions right (chance 25%)")
        sentences.append(f"{best['name']}: " + (", ".join(parts) or "no scored task") + ".")
        if best.get("efficiency"):
            e = best["efficiency"]
            sentences.append(f"It has {_num(e['params_active'])} active parameters per token of {_num(e['params_total'])} "
                             f"({e['weights']}) and decodes {e['decode_tokens_per_s']:,.0f} tokens/s on this machine.")
    else:
        for diff in cmp["differences"]:
            other = figs[diff["model"]]
            sentences.append(_verdict(best, other, diff, lm_task))
            cost = _cost(best, other)
            if cost:
                sentences.append(f"It runs at {cost}.")
    order = [best["name"], *[f for f in figs if f != best["name"]]]
    experts = [s for s in (experts_sentence(figs[n]) for n in order) if s]
    if experts:
        if not best.get("routing") and best.get("experts") == 0:
            sentences.append(f"{best['name']} has no experts (dense).")
        sentences.append(experts[0])
    return " ".join(sentences)


def second_paragraph(report: dict) -> str:
    """Calibration and robustness of every model, one clause each."""
    out = []
    for fig in report["models"]:
        parts = []
        if "calibration" in fig:
            parts.append(f"expected calibration error {fig['calibration']['ece']:.3f} over {fig['calibration']['items']} "
                         "answers (10 equal-mass bins; 0 = confidence matches accuracy)")
        rob = fig.get("robustness")
        if rob:
            worst = []
            for kind, entry in rob.items():
                acc = [v["delta"] for v in entry["mc"].values()]
                bpb = [v["delta"] for v in entry["lm"].values()]
                bit = []
                if acc:
                    bit.append(f"accuracy {100 * sum(acc) / len(acc):+.1f} points")
                if bpb:
                    bit.append(f"bits per byte {sum(bpb) / len(bpb):+.3f}")
                worst.append(f"{kind} {', '.join(bit)}")
            parts.append("under perturbation: " + "; ".join(worst))
        if parts:
            out.append(f"{fig['name']}: " + "; ".join(parts) + ".")
    return " ".join(out)


# ------------------------------------------------------------------------------------------- tables
def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(report: dict, plots: list[str], routing_plots: dict[str, list[str]] | None = None) -> str:
    figs = report["models"]
    md = ["# moekit eval", "", report["headline"], ""]
    second = second_paragraph(report)
    if second:
        md += [second, ""]
    md += ["## Models", "", _table(["model", "path", "format", "weights", "parameters", "active / token", "seconds"], [
        [f["name"], f"`{f['path']}`", f["format"], (f.get("efficiency") or {}).get("weights", "-"),
         _num(f["params_total"]), _num(f["params_active"]), f"{f['seconds']:.1f}"] for f in figs]), ""]
    if figs[0]["lm"]:
        md += ["## Language modelling", "", "Loss in nats per token; bits per byte compare across tokenizers. "
               "± one standard error over documents (pieces of about 2,000 characters).", ""]
        for task in figs[0]["lm"]:
            m0 = figs[0]["lm"][task]
            md += [f"**{task}** ({m0['source']}; {m0['documents']} documents, {m0['bytes']:,} bytes)", "",
                   _table(["model", "loss", "perplexity", "bits per byte", "tokens"], [
                       [f["name"], _pm(f["lm"][task]["loss"], f["lm"][task]["loss_se"]),
                        _pm(f["lm"][task]["perplexity"], f["lm"][task]["perplexity_se"], "{:.1f}"),
                        _pm(f["lm"][task]["bits_per_byte"], f["lm"][task]["bits_per_byte_se"]),
                        f"{f['lm'][task]['tokens']:,}"] for f in figs]), ""]
    if figs[0]["mc"]:
        md += ["## Multiple choice", "", "Built from the held-out plays (seed "
               f"{report['seed']}); accuracy and length-normalised accuracy (log-likelihood per byte of the choice), "
               "± one standard error; chance is 25% (4 choices).", ""]
        head = ["task", "items", "chance"] + [f"{f['name']} acc" for f in figs] + [f"{f['name']} acc_norm" for f in figs]
        rows = []
        for task, m0 in figs[0]["mc"].items():
            rows.append([task, str(m0["items"]), f"{100 * m0['chance']:.0f}%"]
                        + [_pm(f["mc"][task]["acc"], f["mc"][task]["acc_se"], "{:.1f}", 100) for f in figs]
                        + [_pm(f["mc"][task]["acc_norm"], f["mc"][task]["acc_norm_se"], "{:.1f}", 100) for f in figs])
        md += [_table(head, rows), ""]
    if "calibration" in figs[0]:
        md += ["## Calibration", "", "Expected calibration error of the multiple-choice answers (confidence: the softmax "
               "over the choices' log-likelihoods; 10 bins of equal count).", "",
               _table(["model", "ECE (all)"] + list(figs[0]["calibration"]["per_task"]),
                      [[f["name"], f"{f['calibration']['ece']:.3f}"]
                       + [f"{v:.3f}" for v in f["calibration"]["per_task"].values()] for f in figs]), ""]
        if "reliability.png" in plots:
            md += ["![reliability diagram](reliability.png)", ""]
    if figs[0].get("robustness"):
        md += ["## Robustness", "", "Change from the clean figure on the same items (the first quarter of each task) "
               "under seeded perturbations, ± paired standard error. Accuracy in points (negative: worse); bits per byte "
               "(positive: worse).", ""]
        rob0 = figs[0]["robustness"]
        rows = []
        for kind, entry in rob0.items():
            for task in entry["lm"]:
                rows.append([kind, f"{task} (bits per byte)"]
                            + [_pm(f["robustness"][kind]["lm"][task]["delta"], f["robustness"][kind]["lm"][task]["delta_se"],
                                   "{:+.3f}") for f in figs])
            for task in entry["mc"]:
                rows.append([kind, f"{task} (accuracy, points)"]
                            + [_pm(f["robustness"][kind]["mc"][task]["delta"], f["robustness"][kind]["mc"][task]["delta_se"],
                                   "{:+.1f}", 100) for f in figs])
        md += [_table(["perturbation", "task"] + [f["name"] for f in figs], rows), ""]
        if "robustness.png" in plots:
            md += ["![robustness](robustness.png)", ""]
    if figs[0].get("efficiency"):
        md += ["## Efficiency", "", "Measured through the inference engine on this machine (batch 1).", "",
               _table(["model", "weights", "parameters", "active / token", "FLOPs / token", "prefill tok/s", "decode tok/s",
                       "peak RSS"], [
                   [f["name"], e["weights"], _num(e["params_total"]), _num(e["params_active"]), _num(e["flops_per_token"]),
                    f"{e['prefill_tokens_per_s']:,.0f}", f"{e['decode_tokens_per_s']:,.0f}",
                    f"{e['peak_rss_bytes'] / 2**20:,.0f} MiB"]
                   for f in figs if (e := f.get("efficiency"))]), ""]
    if any(f.get("routing") for f in figs):
        md += ["## Routing", ""]
        for f in figs:
            s = experts_sentence(f)
            md += [s if s else f"{f['name']}: no experts (dense).", ""]
            r = f.get("routing")
            if r:
                md += [_table(["MoE layer", "dead experts", "max-violation", "router entropy (nats)"]
                              + [f"JS {a} vs {b}" for a, b in r["specialisation"]["pairs"]],
                              [[str(layer), ", ".join(map(str, r["dead_experts"][j])) or "none",
                                f"{r['max_violation'][j]:.2f}", f"{r['router_entropy'][j]:.3f}"]
                               + [f"{js[j]:.3f}" for js in r["specialisation"]["js_divergence"]]
                               for j, layer in enumerate(r["layers"])]), ""]
                md += [f"![{f['name']} routing]({p})" for p in (routing_plots or {}).get(f["name"], [])] + [""]
    if len(figs) > 1:
        cmp = report["comparison"]
        md += ["## Differences", "", f"Each model minus {cmp['best']} (the best), on the same documents and items, "
               "± paired standard error.", ""]
        for d in cmp["differences"]:
            cells = [f"bits per byte on {t}: {_pm(v['delta'], v['delta_se'], '{:+.3f}')}" for t, v in d["bits_per_byte"].items()]
            cells += [f"accuracy on {t}: {_pm(v['delta'], v['delta_se'], '{:+.1f}', 100)} points" for t, v in d["acc"].items()]
            md += [f"- {d['model']}: " + "; ".join(cells)]
        md += [""]
    if "summary.png" in plots:
        md += ["![summary](summary.png)", ""]
    md += ["## How this was measured", "",
           f"Seed {report['seed']}; items per task: " + ", ".join(f"{t} {n}" for t, n in report["limits"].items())
           + ". Every log-likelihood comes from the inference engine (`Engine` with `prompt_logprobs`), batched; "
           "documents longer than the context are scored in disjoint windows (lm-eval's `loglikelihood_rolling`). "
           "Keys of report.json: docs/eval.md.", ""]
    return "\n".join(md)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# ------------------------------------------------------------------------------------------- plots
def plot_reliability(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", label="perfect calibration")
    for f in report["models"]:
        bins = f["calibration"]["bins"]
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o",
                label=f"{f['name']} (ECE {f['calibration']['ece']:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (mean in bin)", ylabel="accuracy in bin",
           title="Reliability, multiple choice (10 equal-mass bins)")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_summary(report: dict, path: Path) -> None:
    """Bits per byte per language-modelling set and accuracy per task, every model side by side, with error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figs = report["models"]
    panels = [p for p in (("lm", list(figs[0]["lm"])), ("mc", list(figs[0]["mc"]))) if p[1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    width = 0.8 / len(figs)
    for ax, (kind, tasks) in zip(axes[0], panels):
        x = np.arange(len(tasks))
        for i, f in enumerate(figs):
            if kind == "lm":
                vals = [f["lm"][t]["bits_per_byte"] for t in tasks]
                errs = [f["lm"][t]["bits_per_byte_se"] for t in tasks]
            else:
                vals = [100 * f["mc"][t]["acc"] for t in tasks]
                errs = [100 * f["mc"][t]["acc_se"] for t in tasks]
            errs = [e if _ok(e) else 0 for e in errs]
            ax.bar(x + (i - (len(figs) - 1) / 2) * width, vals, width, yerr=errs, capsize=3, label=f["name"])
        ax.set_xticks(x, tasks)
        if kind == "lm":
            ax.set(ylabel="bits per byte (lower is better)", title="Language modelling")
        else:
            ax.axhline(25, color="0.5", linestyle=":", label="chance")
            ax.set(ylabel="accuracy, % (higher is better)", title="Multiple choice")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_robustness(report: dict, path: Path) -> None:
    """Mean accuracy change over the multiple-choice tasks, per perturbation and model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figs = report["models"]
    kinds = list(figs[0]["robustness"])
    has_mc = any(figs[0]["robustness"][k]["mc"] for k in kinds)
    key = "mc" if has_mc else "lm"
    scale = 100 if has_mc else 1
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(figs)
    x = np.arange(len(kinds))
    for i, f in enumerate(figs):
        vals = [scale * np.mean([v["delta"] for v in f["robustness"][k][key].values()]) for k in kinds]
        ax.bar(x + (i - (len(figs) - 1) / 2) * width, vals, width, label=f["name"])
    ax.axhline(0, color="0.3", linewidth=0.8)
    ax.set_xticks(x, kinds)
    ax.set(ylabel="accuracy change, points" if has_mc else "bits per byte change",
           title="Robustness: change from clean (mean over tasks)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _json_safe(x):
    """NaN and infinities (a standard error over one document) become null: report.json is strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_report(report: dict, out_dir: str | Path) -> list[Path]:
    """Write report.json, report.md and the plots into ``out_dir`` (created); returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots: list[str] = []
    figs = report["models"]
    if figs[0]["lm"] or figs[0]["mc"]:
        plot_summary(report, out / "summary.png")
        plots.append("summary.png")
    if "calibration" in figs[0]:
        plot_reliability(report, out / "reliability.png")
        plots.append("reliability.png")
    if figs[0].get("robustness"):
        plot_robustness(report, out / "robustness.png")
        plots.append("robustness.png")
    routing_plots: dict[str, list[str]] = {}
    for f in figs:
        if f.get("routing"):
            from moekit.eval import routing

            routing_plots[f["name"]] = [Path(p).name for p in routing.plot(f["routing"], out, _slug(f["name"]))]
            plots += routing_plots[f["name"]]
    report = {**report, "plots": plots}
    atomic_write_text(out / "report.json", json.dumps(_json_safe(report), indent=1) + "\n")
    atomic_write_text(out / "report.md", render_markdown(report, plots, routing_plots))
    return [out / "report.json", out / "report.md", *(out / p for p in plots)]
