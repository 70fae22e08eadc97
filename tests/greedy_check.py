"""Greedy continuations from different computations (batched vs single-row, cached vs recomputed, moekit
vs transformers) compared token for token, except where they part at a rounding tie; every token is
checked, past the tie too.

``model`` is anything called on token ids [1, T] that returns ``.logits`` [1, T, V]: a moekit
``Transformer`` or a transformers model, taken as the slow truth and recomputed on the whole sequence
for every token.
"""

from __future__ import annotations

import torch

# Two computations of the same logits differ by float rounding: the runner's logits agree with the
# model's to 1e-4 (test_engine.py::test_runner_matches_the_model_*), moekit's with transformers' to
# 1e-4 (test_convert_hf.py). A token within TIE of the top logit may be chosen by either.
TIE = 1e-3


def greedy_gaps(model, prompt: list[int], tokens: list[int]) -> list[float]:
    """For each token of a continuation, how far its logit is below the top one (0.0: it is the argmax),
    recomputed on the sequence up to it."""
    gaps = []
    with torch.no_grad():
        for i, t in enumerate(tokens):
            logits = model(torch.tensor([prompt + tokens[:i]])).logits[0, -1].float()
            gaps.append((logits.max() - logits[t]).item())
    return gaps


def assert_same_greedy(model, prompt: list[int], got: list[int], expected: list[int], tol: float = TIE) -> None:
    """``got == expected``, except that they may part at a near tie (two logits within rounding of each
    other may swap places when the computations differ).

    Every token is checked: where the two agree, and past the first difference too. From the first
    difference on, each sequence follows its own prefix, so each is checked on its own path against the
    recomputed truth: every token must be the top logit or within ``tol`` of it. At the first difference
    both prefixes are the same, so both tokens must be ties there.
    """
    got, expected = [int(t) for t in got], [int(t) for t in expected]
    assert len(got) == len(expected), (len(got), len(expected))
    first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), None)
    if first is None:
        return
    for name, seq in (("got", got), ("expected", expected)):
        for i, gap in enumerate(greedy_gaps(model, list(prompt), seq)[first:], start=first):
            assert gap < tol, (f"{name} token {i} ({seq[i]}; the sequences part at token {first}) is "
                               f"{gap:.2e} below the top logit: not a rounding tie")
