"""What the experts do: load, balance, router confidence and specialisation, from routing through the engine.

Legend: L MoE layers, E experts per layer, K experts per token, T text tokens.

Every passage is prefilled through :class:`moekit.infer.engine.Engine` with ``SamplingParams(routing=True,
max_new_tokens=0)``: the engine records, per fed token and per MoE layer, the (expert ids, gate weights)
its router chose -- the assignments that serve. A BOS token the engine puts in front of a passage is
not counted: its routing is the same for every passage and would swamp short ones.

Kinds of text (:func:`text_kinds`) come in contrasting pairs -- in-domain vs out-of-domain, verse vs
prose, speech vs stage directions -- and a pair's specialisation is the Jensen-Shannon divergence between
the two kinds' expert shares in each layer: 0 bits when both use the experts alike, 1 bit when they use
disjoint experts.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from moekit.model import losses

#: The contrasting pairs of :func:`text_kinds`, in its order.
PAIRS: tuple[tuple[str, str], ...] = (("in-domain", "out-of-domain"), ("verse", "prose"), ("speech", "stage directions"))
#: Longest context one passage gets (longer passages run as consecutive windows of this many tokens).
MAX_WINDOW = 1024
#: Target size of the in-domain and out-of-domain passages (blank-line blocks joined up to this many characters).
PASSAGE_CHARS = 800


# --------------------------------------------------------------------------- pure math
def shares(counts: Sequence[Sequence[float]]) -> list[list[float]]:
    """Each row divided by its sum: [L][E] counts -> [L][E] shares (a row with no counts stays all 0)."""
    out = []
    for row in counts:
        total = float(sum(row))
        out.append([c / total if total > 0 else 0.0 for c in row])
    return out


def js_divergence(p: Sequence[float], q: Sequence[float]) -> float:
    """Jensen-Shannon divergence in bits between two distributions over the same experts, in [0, 1]:
    JS = (KL(p || m) + KL(q || m)) / 2 with m = (p + q) / 2 (0 log 0 = 0)."""
    if len(p) != len(q):
        raise ValueError(f"distributions of different lengths: {len(p)} and {len(q)}")

    def kl_to_mid(a: Sequence[float], b: Sequence[float]) -> float:
        return sum(x * math.log2(2 * x / (x + y)) for x, y in zip(a, b) if x > 0)

    return max(0.0, (kl_to_mid(p, q) + kl_to_mid(q, p)) / 2)  # (rounding can dip a hair below 0)


def max_violation(load: Sequence[float]) -> float:
    """(max load - mean load) / mean load of one layer (0 when nothing was routed); see
    :func:`moekit.model.losses.max_violation`, the figure training logs."""
    return float(losses.max_violation(torch.tensor(load, dtype=torch.float64)))


def dead_experts(load: Sequence[float]) -> list[int]:
    """The experts of one layer that got no token."""
    return [e for e, n in enumerate(load) if n == 0]


# --------------------------------------------------------------------------- kinds of text
_DIRECTION = re.compile(r"\[[^\[\]]{1,300}\]")  # "[Enter VIOLA.]", "[Aside.]": bracketed, maybe across lines
_CUT_DIRECTION = re.compile(r"[ \t]*\[[^\[\]]{1,300}\][ \t]*")  # the same with the spaces around it
_SPEAKER = re.compile(r"[A-Z][A-Z0-9' ,&-]*[A-Z]\.")  # "LADY MACBETH.", "SIR TOBY.": a line of its own
_HEADER = re.compile(r"(ACT|SCENE|EPILOGUE|PROLOGUE|THE END|FINIS)\b")


def classify_speech(body: str) -> str | None:
    """"verse", "prose", or None (too short to tell) for the text of one speech.

    The heuristic: the plays' etexts keep verse lineation, and a verse line starts with a capital;
    prose runs to the margin and is wrapped wherever the line is full, so its continuation lines start
    with whatever word comes next, mostly lower case. A speech of at least three lines is "verse" when
    at most a quarter of its continuation lines (the lines after the first) start in lower case (a
    verse line the etext wrapped leaves a short lower-case stub), "prose" when at least half do, and
    undecided in between. The first letter of a line counts ('tis -> t); lines without letters are skipped.
    """
    lines = [line for line in body.split("\n") if re.search(r"[A-Za-z]", line)]
    if len(lines) < 3:
        return None
    lower = [re.search(r"[A-Za-z]", line).group().islower() for line in lines[1:]]
    fraction = sum(lower) / len(lower)
    if fraction <= 0.25:
        return "verse"
    if fraction >= 0.5:
        return "prose"
    return None


def split_play(text: str) -> tuple[list[str], list[str]]:
    """(speeches, stage directions) of plays in the embedded etexts' format.

    Stage directions are the bracketed spans, whole lines or inline ("[Aside.]"), newlines folded to
    spaces. Speeches are the blank-line blocks that start with a speaker tag (a line in capitals ending
    in a period, e.g. "LADY MACBETH."), tag removed, plus untagged blocks that continue a speech after a
    stage direction; act and scene headers end a speech, and front matter (title, list of persons) comes
    before any speech, so it is never taken. The stage directions are cut out of the speeches.
    """
    directions = [" ".join(d.split()) for d in _DIRECTION.findall(text)]
    speeches: list[str] = []
    in_speech = False
    for block in re.split(r"\n[ \t]*\n", _CUT_DIRECTION.sub(" ", text)):
        lines = [line.rstrip() for line in block.split("\n") if re.search(r"[A-Za-z]", line)]
        if not lines:
            continue  # a block that held only a stage direction: the speech, if any, goes on
        first = lines[0].strip()
        if _HEADER.match(first):
            in_speech = False
        elif _SPEAKER.fullmatch(first):
            in_speech = True
            if len(lines) > 1:
                speeches.append("\n".join(line.strip() for line in lines[1:]))
        elif in_speech:
            speeches.append("\n".join(line.strip() for line in lines))
    return speeches, directions


def passages(text: str, size: int = PASSAGE_CHARS) -> list[str]:
    """``text`` cut at blank lines into passages of consecutive blocks, each up to about ``size``
    characters (a longer block is a passage of its own)."""
    return join_up(re.split(r"\n[ \t]*\n", text), size, "\n\n")


def join_up(items: Sequence[str], size: int, sep: str) -> list[str]:
    """Consecutive non-blank ``items`` joined with ``sep`` into pieces of at most ``size`` characters
    (an item longer than that is a piece of its own)."""
    out, current = [], ""
    for item in items:
        item = item.strip("\n")
        if not item.strip():
            continue
        if current and len(current) + len(sep) + len(item) > size:
            out.append(current)
            current = ""
        current = f"{current}{sep}{item}" if current else item
    if current:
        out.append(current)
    return out


def spread(items: list[str], max_chars: int) -> list[str]:
    """Up to ``max_chars`` characters of ``items``, spread evenly through the whole list (so that every
    play contributes, not just the first), in their original order: an item is taken when the characters
    taken so far, with it, stay within ``max_chars / total`` of the characters seen so far. Falls short
    of ``max_chars`` by less than one item."""
    total = sum(len(s) for s in items)
    if total <= max_chars:
        return list(items)
    picked, used, seen = [], 0, 0
    for s in items:
        seen += len(s)
        if (used + len(s)) * total <= seen * max_chars:  # integers: no rounding
            picked.append(s)
            used += len(s)
    return picked


def text_kinds(plays_text: str, other_text: str, *, max_chars_per_kind: int = 20000) -> dict[str, list[str]]:
    """Passages of each kind of text, at most ``max_chars_per_kind`` characters per kind, deterministic:
    "in-domain" (``plays_text``, held-out plays) and "out-of-domain" (``other_text``) cut at blank lines,
    "verse" and "prose" (speeches, :func:`classify_speech`), "speech" (every speech, verse, prose or too
    short to tell) and "stage directions" (:func:`split_play`; consecutive ones joined, one per line, into
    passages of up to :data:`PASSAGE_CHARS`). A kind may be empty (e.g. no prose)."""
    if isinstance(max_chars_per_kind, bool) or not isinstance(max_chars_per_kind, int) or max_chars_per_kind < 1:
        raise ValueError(f"max_chars_per_kind={max_chars_per_kind!r} must be an integer >= 1")
    speeches, directions = split_play(plays_text)
    by_form = {"verse": [], "prose": []}
    for s in speeches:
        form = classify_speech(s)
        if form is not None:
            by_form[form].append(s)
    kinds = {
        "in-domain": passages(plays_text),
        "out-of-domain": passages(other_text),
        "verse": by_form["verse"],
        "prose": by_form["prose"],
        "speech": speeches,
        # Joined (one per line, as in the plays) so that a direction is read after others, not only
        # after BOS, and so that ~600 ten-token requests do not dominate the time.
        "stage directions": join_up(directions, PASSAGE_CHARS, "\n"),
    }
    return {kind: spread(items, max_chars_per_kind) for kind, items in kinds.items()}


# --------------------------------------------------------------------------- routing through the engine
class _EntropyProbe:
    """While active, each MoE layer's router also reports the entropy of its full distribution.

    The engine's routing gives only the k chosen experts and their gates; the full distribution over
    all E experts needs the router's input, which the runner passes to ``router.select``. The probe
    shadows ``select`` on each router instance (removed on exit; the model's class is untouched) and
    runs the router's own ``forward`` on the same input, whose ``stats.entropy`` is the figure training
    logs (:func:`moekit.model.losses.router_entropy`): softmax of the logits, or for sigmoid routers the
    scores normalised to sum 1. It sums over every row it sees (:func:`analyse` takes a BOS's share out).
    """

    def __init__(self, routers: list):
        self.routers = routers
        self.total = [0.0] * len(routers)  # sum over counted tokens of the entropy (nats)
        self.tokens = [0] * len(routers)

    def __enter__(self):
        for j, router in enumerate(self.routers):
            router.select = self._wrap(j, router, type(router).select)
        return self

    def __exit__(self, *exc):
        for router in self.routers:
            router.__dict__.pop("select", None)

    def _wrap(self, j: int, router, select):
        def probed(x_TD: torch.Tensor, task_T: torch.Tensor | None = None):
            if len(x_TD):
                # NOTE: host sync per layer and call; routing analysis is not a hot path.
                self.total[j] += float(router.forward(x_TD, None, task_T).stats.entropy) * len(x_TD)
                self.tokens[j] += len(x_TD)
            return select(router, x_TD, task_T)

        return probed


def moe_layers(cfg) -> list[int]:
    """Indices of the MoE blocks of a model with config ``cfg``."""
    return [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]


def check_texts(tokenizer, texts_by_kind) -> None:
    """The routing views need a tokenizer and ``{kind: [text, ...]}``; ValueError otherwise."""
    if tokenizer is None:
        raise ValueError("routing analysis needs the model's tokenizer to encode the passages; this model has none")
    if not isinstance(texts_by_kind, dict) or not all(isinstance(t, str) for ts in texts_by_kind.values() for t in ts):
        raise ValueError("texts_by_kind must map each kind's name to a list of strings")


def routing_engine(model, tokenizer, context: int | None = None):
    """The engine the routing views prefill through: 16 requests in flight, windows of at most
    :data:`MAX_WINDOW` tokens and ``context`` (default: the model's ``max_seq_len``; a run's trained
    context, :func:`moekit.eval.score.trained_context`) -- its ``max_len`` -- prefilled four at a time."""
    from moekit.infer.engine import Engine

    window = min(model.cfg.max_seq_len, MAX_WINDOW, context or model.cfg.max_seq_len)
    return Engine(model, tokenizer, max_batch=16, max_len=window, prefill_chunk=4 * window)


def routing_windows(engine, texts_by_kind: dict[str, list[str]]) -> list[tuple[str, list[int], int]]:
    """Every passage of every kind as requests of at most ``engine.max_len`` tokens: ``(kind, token ids,
    leading rows to leave out)``, the rows left out being a BOS the engine puts before a passage (in its
    first window only). A window that would hold nothing but that BOS is dropped."""
    window, chunks = engine.max_len, []
    for kind, texts in texts_by_kind.items():
        for text in texts:
            ids = engine.encode(text)
            prefix = len(ids) - len(engine.tokenizer.encode(text, add_special_tokens=False).ids)  # 1 with BOS
            for start in range(0, len(ids), window):
                chunk, skip = ids[start:start + window], prefix if start == 0 else 0
                if len(chunk) > skip:
                    chunks.append((kind, chunk, skip))
    return chunks


def count_assignments(chunks: Sequence[tuple[str, list[int], int]], completions, kinds, n_layers: int,
                      num_experts: int) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """({kind: [L, E] (token, expert) assignments}, {kind: text tokens}) from the engine's routing record
    of each of :func:`routing_windows`' requests (``completions`` in the same order), the leading BOS
    rows left out. Every kind of ``kinds`` is in both dicts, with zeros when it got no window."""
    counts = {kind: np.zeros((n_layers, num_experts), dtype=np.int64) for kind in kinds}
    tokens = dict.fromkeys(kinds, 0)
    for (kind, _, skip), done in zip(chunks, completions, strict=True):
        fed = done.routing[skip:]
        ids_TLK = np.array([[ids_K for ids_K, _ in per_layer] for per_layer in fed], dtype=np.int64)
        for j in range(n_layers):
            counts[kind][j] += np.bincount(ids_TLK[:, j].ravel(), minlength=num_experts)
        tokens[kind] += len(fed)
    return counts, tokens


def analyse(model, tokenizer, texts_by_kind: dict[str, list[str]], *, seed: int = 0,
            pairs: Sequence[tuple[str, str]] | None = None, context: int | None = None) -> dict | None:
    """Route every passage of every kind through the engine and summarise; None for a dense model.

    Returns:
    - ``layers``: indices of the MoE layers; ``num_experts``; ``top_k``;
    - ``tokens_per_kind``: {kind: text tokens routed};
    - ``tokens_per_expert``: [L][E] (token, expert) assignments over all kinds' passages (kinds overlap:
      a play's line is in "in-domain" and in "speech", so it counts twice);
    - ``share_per_kind``: {kind: [L][E]} each expert's share of the kind's assignments in that layer;
    - ``dead_experts``: [L] experts that got no assignment; ``max_violation``: [L] (max - mean) / mean
      load over ``tokens_per_expert``;
    - ``router_entropy``: [L] mean over text tokens of the entropy (nats) of the router's full
      distribution over all E experts (softmax of its logits; sigmoid routers: scores normalised to sum
      1), as training logs it; ln E for a uniform router, 0 for a one-hot one;
    - ``specialisation``: {"pairs": [[kind_a, kind_b], ...], "js_divergence": [pair][L]} in bits.

    ``pairs``: which kinds to contrast; default :data:`PAIRS` where both kinds are present, else every
    pair of the kinds given. Kinds with no tokens are left out of ``share_per_kind`` and the pairs.
    ``seed`` seeds the requests (prefill only, so nothing is sampled: the result does not depend on it).
    ``context``: the longest window (default: the model's ``max_seq_len``; ``moekit eval`` gives a run's
    trained context, :func:`moekit.eval.score.trained_context`).
    """
    from moekit.infer.engine import SamplingParams

    cfg = model.cfg
    if not cfg.num_experts:
        return None
    check_texts(tokenizer, texts_by_kind)
    layers = moe_layers(cfg)
    E = cfg.num_experts
    # Many requests in flight (continuous batching); the probe sums the entropy of every row it sees. A
    # prepended BOS is the first row of its request's first window: with no context, its hidden state, and
    # so its entropy, is the same in every request, measured once alone and subtracted per request.
    engine = routing_engine(model, tokenizer, context)
    params = SamplingParams(max_new_tokens=0, temperature=0.0, seed=seed, routing=True)
    chunks = routing_windows(engine, texts_by_kind)
    routers = [model.layers[i].ffn.router for i in layers]
    bos_entropy = [0.0] * len(layers)
    n_bos = sum(skip for _, _, skip in chunks)
    if n_bos:
        with _EntropyProbe(routers) as probe:
            engine.generate([chunks[0][1][:1]], params)
        bos_entropy = [t / n for t, n in zip(probe.total, probe.tokens)]
    with _EntropyProbe(routers) as probe:
        completions = engine.generate([chunk for _, chunk, _ in chunks], params)
    counts, tokens = count_assignments(chunks, completions, texts_by_kind, len(layers), E)
    entropy = [(t - n_bos * b) / (n - n_bos) if n > n_bos else 0.0
               for t, n, b in zip(probe.total, probe.tokens, bos_entropy)]
    present = [k for k in texts_by_kind if tokens[k]]
    if pairs is None:
        pairs = [p for p in PAIRS if p[0] in present and p[1] in present] or list(itertools.combinations(present, 2))
    for a, b in pairs:
        for kind in (a, b):
            if kind not in present:
                raise ValueError(f"pair ({a!r}, {b!r}) names {kind!r}, which has no tokens; kinds with tokens: {present}")
    share = {kind: shares(counts[kind].tolist()) for kind in present}
    total = sum((counts[k] for k in texts_by_kind), np.zeros((len(layers), E), dtype=np.int64)).tolist()
    return {
        "layers": layers,
        "num_experts": E,
        "top_k": cfg.top_k,
        "tokens_per_kind": tokens,
        "tokens_per_expert": total,
        "share_per_kind": share,
        "dead_experts": [dead_experts(row) for row in total],
        "max_violation": [max_violation(row) for row in total],
        "router_entropy": entropy,
        "specialisation": {
            "pairs": [[a, b] for a, b in pairs],
            "js_divergence": [[js_divergence(pa, pb) for pa, pb in zip(share[a], share[b])] for a, b in pairs],
        },
    }


# --------------------------------------------------------------------------- figures
def plot(result: dict, out_dir: Path, name: str) -> list[Path]:
    """Two PNGs in ``out_dir``: ``{name}_experts.png`` (each layer's share of assignments per expert, dead
    experts marked) and ``{name}_specialisation.png`` (per layer, the divergence of each pair of kinds)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, renders PNG with Agg

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layers, E = result["layers"], result["num_experts"]
    load = np.array(shares(result["tokens_per_expert"]))
    fig = Figure(figsize=(max(5.0, 0.35 * E + 2.5), max(2.4, 0.45 * len(layers) + 1.6)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(load, aspect="auto", cmap="viridis", vmin=0)
    for j, dead in enumerate(result["dead_experts"]):
        for e in dead:
            ax.text(e, j, "x", ha="center", va="center", color="red", fontsize=9)
    ax.set_xticks(range(E))
    ax.set_yticks(range(len(layers)), [str(i) for i in layers])
    ax.set_xlabel("expert" + (" (x: no tokens)" if any(result["dead_experts"]) else ""))
    ax.set_ylabel("layer")
    ax.set_title(f"{name}: share of tokens per expert (uniform = {1 / E:.3f})")
    fig.colorbar(image, ax=ax, label="share of the layer's assignments")
    paths = [out_dir / f"{name}_experts.png"]
    fig.savefig(paths[0], dpi=110)

    spec = result["specialisation"]
    fig = Figure(figsize=(max(5.0, 1.2 * len(layers) + 3), 3.6), layout="constrained")
    ax = fig.subplots()
    n = max(len(spec["pairs"]), 1)
    width = 0.8 / n
    x = np.arange(len(layers))
    for p, ((a, b), js) in enumerate(zip(spec["pairs"], spec["js_divergence"])):
        ax.bar(x + (p - (n - 1) / 2) * width, js, width, label=f"{a} vs {b}")
    ax.set_xticks(x, [str(i) for i in layers])
    ax.set_xlabel("layer")
    ax.set_ylabel("Jensen-Shannon divergence (bits)")
    ax.set_title(f"{name}: how differently kinds of text use the experts")
    ax.grid(axis="y", alpha=0.3)
    if spec["pairs"]:
        ax.legend(fontsize=8)
    paths.append(out_dir / f"{name}_specialisation.png")
    fig.savefig(paths[1], dpi=110)
    return paths
