"""moekit.eval.routing: the pure math against hand-computed values, the kinds of text on a hand-written
play, and the analysis through the engine against the model's own forward pass."""

import math

import pytest
import torch

from moekit.config import ModelConfig
from moekit.data import load_tokenizer
from moekit.data.special import SpecialTokens
from moekit.eval import routing
from moekit.model import Transformer

PLAY = """THE TRAGEDY OF TESTING

by Someone


PERSONS REPRESENTED

DUKE, a ruler.
FOOL.

ACT I.

SCENE I. A room.

[Enter DUKE and FOOL.]

DUKE.
If music be the food of love, play on,
Give me excess of it; that, surfeiting,
The appetite may sicken and so die.

FOOL.
Marry, sir, I will not be so hard-hearted; I will give out
divers schedules of my beauty. It shall be inventoried, and
every particle labelled to my will.

DUKE.
Ay. [Aside.] What now?

[Exit FOOL.]

Now to my chamber, where the lamps
Burn low and long,
And sleep attends.

[Exeunt.]
"""
VERSE = "If music be the food of love, play on,\nGive me excess of it; that, surfeiting,\nThe appetite may sicken and so die."
PROSE = ("Marry, sir, I will not be so hard-hearted; I will give out\ndivers schedules of my beauty. It shall be "
         "inventoried, and\nevery particle labelled to my will.")
CONTINUED = "Now to my chamber, where the lamps\nBurn low and long,\nAnd sleep attends."


# --------------------------------------------------------------------------- pure math
def test_shares():
    assert routing.shares([[1, 3], [0, 0], [2, 2]]) == [[0.25, 0.75], [0.0, 0.0], [0.5, 0.5]]


def test_js_divergence_by_hand():
    assert routing.js_divergence([1, 0], [0, 1]) == 1.0  # disjoint: 1 bit
    assert routing.js_divergence([0.3, 0.7], [0.3, 0.7]) == 0.0
    # m = (0.75, 0.25): KL(p||m) = 0.5 log2(2/3) + 0.5, KL(q||m) = log2(4/3); JS = 1.5 - 0.75 log2 3.
    assert routing.js_divergence([0.5, 0.5], [1, 0]) == pytest.approx(1.5 - 0.75 * math.log2(3), abs=1e-12)
    assert routing.js_divergence([0.5, 0.5], [1, 0]) == routing.js_divergence([1, 0], [0.5, 0.5])
    with pytest.raises(ValueError, match="different lengths: 2 and 3"):
        routing.js_divergence([0.5, 0.5], [0.2, 0.3, 0.5])


def test_max_violation_and_dead_experts():
    assert routing.max_violation([1, 1, 4, 2]) == 1.0  # mean 2, max 4
    assert routing.max_violation([3, 3, 3]) == 0.0
    assert routing.max_violation([0, 0]) == 0.0
    assert routing.dead_experts([0, 5, 0, 1]) == [0, 2]


# --------------------------------------------------------------------------- kinds of text
def test_classify_speech():
    assert routing.classify_speech(VERSE) == "verse"
    assert routing.classify_speech(PROSE) == "prose"
    assert routing.classify_speech("Ay.\nWhat now?") is None  # two lines: too short to tell
    # A verse line the etext wrapped leaves one lower-case stub among five continuation lines: still verse.
    wrapped = ("To wear a heart so white. I hear knocking\nAt the south entry:\nHath left you. Hark, more\n"
               "knocking:\nGet on\nSo poorly.")
    assert routing.classify_speech(wrapped) == "verse"
    # Two of five continuation lines in lower case: between the two thresholds, undecided.
    mixed = "One line\nTwo line\nthree line\nfour line\nFive line\nSix line"
    assert routing.classify_speech(mixed) is None
    assert routing.classify_speech("'Tis so\n'Tis not\n'tis maybe") == "prose"  # the first letter counts, not the quote


def test_split_play():
    speeches, directions = routing.split_play(PLAY)
    # Front matter (title, persons) is not speech; the inline aside is cut out; the lines after
    # "[Exit FOOL.]" continue the Duke's speech.
    assert speeches == [VERSE, PROSE, "Ay. What now?", CONTINUED]
    assert directions == ["[Enter DUKE and FOOL.]", "[Aside.]", "[Exit FOOL.]", "[Exeunt.]"]
    assert routing.split_play("[Enter, in procession, CAESAR;\nANTONY, for the course.]\n") == (
        [], ["[Enter, in procession, CAESAR; ANTONY, for the course.]"])


def test_join_up_and_spread():
    assert routing.join_up(["a", "b", "", "c"], 3, "\n") == ["a\nb", "c"]
    assert routing.join_up(["abcdef", "g"], 3, "\n") == ["abcdef", "g"]
    assert routing.passages("one\n\ntwo\n \nthree", size=8) == ["one\n\ntwo", "three"]
    assert routing.spread(["aa", "bb", "cc", "dd"], 8) == ["aa", "bb", "cc", "dd"]
    assert routing.spread(["aa", "bb", "cc", "dd"], 4) == ["bb", "dd"]  # every other one, through the whole list
    assert routing.spread(["a" * 5, "b", "c" * 4, "d"], 6) == ["b", "c" * 4, "d"]


def test_text_kinds():
    other = "It is a truth universally acknowledged.\n\nHowever little known the feelings."
    kinds = routing.text_kinds(PLAY, other)
    assert list(kinds) == ["in-domain", "out-of-domain", "verse", "prose", "speech", "stage directions"]
    assert kinds["verse"] == [VERSE, CONTINUED]
    assert kinds["prose"] == [PROSE]
    assert kinds["speech"] == [VERSE, PROSE, "Ay. What now?", CONTINUED]
    assert kinds["stage directions"] == ["[Enter DUKE and FOOL.]\n[Aside.]\n[Exit FOOL.]\n[Exeunt.]"]
    assert kinds["out-of-domain"] == [other]
    assert "".join(kinds["in-domain"]).count("If music be") == 1
    assert routing.text_kinds(PLAY, other) == kinds  # deterministic
    small = routing.text_kinds(PLAY, other, max_chars_per_kind=100)
    assert all(sum(map(len, v)) <= 100 for v in small.values())
    with pytest.raises(ValueError, match=r"max_chars_per_kind=0 must be an integer >= 1"):
        routing.text_kinds(PLAY, other, max_chars_per_kind=0)


def test_text_kinds_on_the_held_out_plays():
    """The embedded etexts give every kind, and the heuristic finds both verse and prose in them."""
    from moekit.data.corpus import load_shakespeare

    kinds = routing.text_kinds(load_shakespeare("val"), "Some other text.\n\nAnd more.", max_chars_per_kind=5000)
    for kind in ("in-domain", "verse", "prose", "speech", "stage directions"):
        assert 4000 <= sum(map(len, kinds[kind])) <= 5000, kind
    assert all(s.startswith("[") for d in kinds["stage directions"] for s in d.split("\n"))


# --------------------------------------------------------------------------- through the engine
def tiny(**overrides) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny-moe", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, expert_ffn_dim=64,
                                  max_seq_len=128, init_std=0.05, **overrides)
    return Transformer(cfg).eval()


TEXTS = {"verse": [VERSE, CONTINUED], "prose": [PROSE]}


def _reference(model, ids: list[int]):
    """Per MoE layer: expert loads and mean router entropy of the model's own forward over ``ids``."""
    with torch.no_grad():
        stats = model(torch.tensor([ids])).router_stats
    return [s.expert_load.tolist() for s in stats], [float(s.entropy) for s in stats]


@pytest.mark.parametrize("bos", [False, True])
def test_analyse_matches_the_models_own_forward(bos):
    """Counts and entropy from the engine agree with the training forward's router statistics; a BOS the
    engine prepends is left out of both (its loads and entropy come from a forward of BOS alone)."""
    model, tok = tiny(), load_tokenizer()
    if bos:
        model.special_tokens = SpecialTokens(bos_id=2, eos_ids=(0,), add_bos=True)
    r = routing.analyse(model, tok, TEXTS)
    E = model.cfg.num_experts
    expected = {kind: [[0] * E, [0] * E] for kind in TEXTS}
    entropy_sum, n = [0.0, 0.0], 0
    for kind, texts in TEXTS.items():
        for text in texts:
            ids = tok.encode(text, add_special_tokens=False).ids
            loads, ents = _reference(model, [2, *ids] if bos else ids)
            if bos:
                bos_loads, bos_ents = _reference(model, [2])
                loads = [[a - b for a, b in zip(la, lb)] for la, lb in zip(loads, bos_loads)]
                ents = [(e * (len(ids) + 1) - eb) / len(ids) for e, eb in zip(ents, bos_ents)]
            for j in range(2):
                expected[kind][j] = [a + b for a, b in zip(expected[kind][j], loads[j])]
                entropy_sum[j] += ents[j] * len(ids)
            n += len(ids)
    assert r["layers"] == [0, 1] and r["num_experts"] == E and r["top_k"] == 2
    assert r["tokens_per_kind"] == {k: sum(len(tok.encode(t, add_special_tokens=False).ids) for t in v)
                                    for k, v in TEXTS.items()}
    total = [[a + b for a, b in zip(expected["verse"][j], expected["prose"][j])] for j in range(2)]
    assert r["tokens_per_expert"] == total
    assert r["share_per_kind"] == {k: routing.shares(v) for k, v in expected.items()}
    assert r["router_entropy"] == pytest.approx([s / n for s in entropy_sum], abs=1e-5)
    assert 0 < min(r["router_entropy"]) and max(r["router_entropy"]) <= math.log(E)
    assert r["dead_experts"] == [routing.dead_experts(row) for row in total]
    assert r["max_violation"] == [routing.max_violation(row) for row in total]
    assert r["specialisation"]["pairs"] == [["verse", "prose"]]
    assert r["specialisation"]["js_divergence"] == [
        [routing.js_divergence(a, b) for a, b in zip(r["share_per_kind"]["verse"], r["share_per_kind"]["prose"])]]
    # The probe is gone: the routers answer with their own method again.
    assert all("select" not in vars(model.layers[i].ffn.router) for i in (0, 1))


def test_analyse_identical_kinds_do_not_diverge_and_long_texts_run_in_windows():
    model, tok = tiny(), load_tokenizer()
    long = " ".join([PROSE] * 12)  # ~400 tokens: four windows of the 128-token context
    r = routing.analyse(model, tok, {"a": [long], "b": [long], "empty": []})
    assert r["specialisation"] == {"pairs": [["a", "b"]], "js_divergence": [[0.0, 0.0]]}
    assert r["tokens_per_kind"] == {"a": len(tok.encode(long).ids), "b": len(tok.encode(long).ids), "empty": 0}
    assert "empty" not in r["share_per_kind"]
    with pytest.raises(ValueError, match=r"pair \('a', 'empty'\) names 'empty', which has no tokens"):
        routing.analyse(model, tok, {"a": [PROSE], "empty": []}, pairs=[("a", "empty")])


def test_analyse_dense_model_is_none():
    assert routing.analyse(tiny(num_experts=0), load_tokenizer(), TEXTS) is None


def test_plot_writes_two_pngs(tmp_path):
    model, tok = tiny(), load_tokenizer()
    r = routing.analyse(model, tok, TEXTS)
    r["dead_experts"][0] = [3]  # the marker path
    paths = routing.plot(r, tmp_path / "plots", "tiny")
    assert [p.name for p in paths] == ["tiny_experts.png", "tiny_specialisation.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
