"""How much of the network a task uses: pure functions over routing counts.

Legend: L MoE layers, E experts per layer.

A task's routing in one layer is the number of (token, expert) assignments each expert received from the
task's tokens. The experts that serve ``coverage`` of them are the smallest set whose assignments reach
that share: experts ranked by count, highest first (ties: the lower id first), taken until the running
count reaches ``coverage`` x the total. At coverage 1 that is every expert that got any assignment --
every expert the task's tokens reach.

Coverages are compared as the decimals they are written as (``Fraction("0.07")``, not the binary float
0.07000000000000000666...), so 7 assignments of 100 cover 0.07 exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

#: The coverages ``moekit paths`` reports.
COVERAGES: tuple[float, ...] = (0.9, 0.95, 0.99)


def check_coverage(coverage: float) -> None:
    """ValueError unless ``coverage`` is a number in (0, 1]."""
    if isinstance(coverage, bool) or not isinstance(coverage, (int, float)) or not 0 < coverage <= 1:
        raise ValueError(f"coverage {coverage!r} must be a number in (0, 1] (1 = every expert the task reaches)")


def ranking(counts_E: Sequence[int]) -> list[int]:
    """Expert ids of one layer, most assignments first; ties broken by the lower id."""
    return sorted(range(len(counts_E)), key=lambda e: (-counts_E[e], e))


def coverage_set(counts_E: Sequence[int], coverage: float) -> list[int]:
    """The smallest set of experts holding at least ``coverage`` of one layer's assignments, most
    assignments first (a prefix of :func:`ranking`); [] when the layer got none."""
    check_coverage(coverage)
    total = sum(counts_E)
    need = Fraction(repr(float(coverage))) * total
    taken, held = [], 0
    for e in ranking(counts_E):
        if held >= need or counts_E[e] == 0:
            break
        taken.append(e)
        held += counts_E[e]
    return taken


def held_share(counts_E: Sequence[int], experts: Sequence[int]) -> float:
    """The share of one layer's assignments that ``experts`` received (0 when there were none)."""
    total = sum(counts_E)
    return sum(counts_E[e] for e in experts) / total if total else 0.0


def coverage_summary(counts_LE: Sequence[Sequence[int]], coverage: float, params_per_expert: int) -> dict:
    """Per layer, the experts covering ``coverage`` of a task's assignments, and what they add up to.

    Returns ``experts`` [L] (ids, most assignments first), ``count`` [L], ``mean_count`` (over layers),
    ``expert_params`` (the sets' routed-expert parameters, all layers) and ``fraction`` (of all routed
    experts of all MoE layers)."""
    sets = [coverage_set(row, coverage) for row in counts_LE]
    count = [len(s) for s in sets]
    slots = sum(len(row) for row in counts_LE)
    return {
        "experts": sets,
        "count": count,
        "mean_count": sum(count) / len(count) if count else 0.0,
        "expert_params": sum(count) * params_per_expert,
        "fraction": sum(count) / slots if slots else 0.0,
    }


def kept_experts(counts_LE: Sequence[Sequence[int]], *, coverage: float | None = None, per_layer: int | None = None,
                 always: Sequence[Sequence[int]] | None = None, within: Sequence[int] | None = None) -> list[list[int]]:
    """The experts an extraction keeps in each layer, ascending ids; every layer keeps the same number.

    ``always`` [L]: experts kept in any case (those of the BOS that starts every request), ahead of the
    others. Then ``per_layer``: the experts with the most assignments up to ``per_layer`` in all; or
    ``coverage``: each layer's :func:`coverage_set`. Since one config holds one ``num_experts`` for every
    layer (as the Hugging Face and GGUF formats do), layers that need fewer are filled up to the largest
    layer's number with their next experts by assignments. Filling only adds experts, so every assignment
    a set holds stays. ``within``: the only experts that may be kept (a task-routed model's task set: its
    tokens can reach no other, so filling must not take them).
    """
    if (coverage is None) == (per_layer is None):
        raise ValueError("give exactly one of coverage and per_layer")
    always = always or [[] for _ in counts_LE]
    allowed = set(range(max(map(len, counts_LE), default=0))) if within is None else set(within)
    # Per layer: the always-kept experts, then the rest in ranking order.
    order = [list(keep) + [e for e in ranking(row) if e not in keep and e in allowed]
             for row, keep in zip(counts_LE, always, strict=True)]
    if per_layer is None:
        per_layer = max((len(set(keep) | set(coverage_set(row, coverage))) for row, keep in zip(counts_LE, always)),
                        default=0)
    smallest = min(map(len, order), default=0)
    if isinstance(per_layer, bool) or not isinstance(per_layer, int) or not 1 <= per_layer <= smallest:
        raise ValueError(f"per_layer={per_layer!r} must be an integer in [1, {smallest}]")
    if any(len(keep) > per_layer for keep in always):
        raise ValueError(f"per_layer={per_layer} is fewer than the {max(map(len, always))} experts always kept")
    return [sorted(o[:per_layer]) for o in order]
