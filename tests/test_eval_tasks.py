"""Held-out data and seeded tasks of moekit eval: the play parser, items built only from held-out plays and
the same for a seed, a uniform model at chance, perturbations."""

import torch

from moekit import ModelConfig, Transformer
from moekit.data import load_tokenizer
from moekit.data.corpus import VAL_PLAYS
from moekit.eval import metrics
from moekit.eval.data import austen_text, held_out_speeches, parse_play, pieces
from moekit.eval.perturb import PERTURBATIONS, perturb
from moekit.eval.run import _score_items
from moekit.eval.score import scoring_engine
from moekit.eval.tasks import CHOICES, MC_TASKS, build_items

PLAY = """THE PLAY

PERSONS REPRESENTED

KING, a king.
FOOL.

ACT I.

SCENE I. A hall.

[Enter KING and FOOL.]

KING.
Where is my crown? [Aside.] I had it here,
And now it is gone.

[Exit FOOL.]

Come back, fool!

FOOL.
Here, nuncle.

SCENE II. Another hall.

LADY MACBETH.
Out, damned spot!
"""


def test_parse_play_speakers_lines_and_directions():
    speeches = parse_play("p", PLAY)
    assert [(s.speaker, s.lines) for s in speeches] == [
        ("KING", ("Where is my crown? I had it here,", "And now it is gone.", "Come back, fool!")),
        ("FOOL", ("Here, nuncle.",)), ("LADY MACBETH", ("Out, damned spot!",))]


def test_the_held_out_plays_parse_into_many_speeches():
    speeches = held_out_speeches()
    assert {s.play for s in speeches} == set(VAL_PLAYS)
    assert len(speeches) > 2500 and sum(s.speaker == "MACBETH" for s in speeches) > 100
    assert all(s.lines and s.speaker == s.speaker.upper() for s in speeches)


def test_items_are_seeded_and_come_from_the_held_out_plays_only():
    speeches = held_out_speeches()
    lines_of = {p: {ln for s in speeches if s.play == p for ln in s.lines} for p in VAL_PLAYS}
    follows = {(s.play, a): b for s in speeches for a, b in zip(s.lines, s.lines[1:])}
    for task in MC_TASKS:
        a, b, c = (build_items(task, speeches, 40, seed) for seed in (0, 0, 1))
        assert a == b and a != c and len(a) == 40
        assert {it.answer for it in a} == set(range(CHOICES))  # the right answer moves around
        for it in a:
            assert len(set(it.choices)) == CHOICES and it.play in VAL_PLAYS
    for it in build_items("next-line", speeches, 40, 0):
        last = it.context.rstrip("\n").split("\n")[-1]
        assert follows[it.play, last] == it.choices[it.answer]  # the right line comes next in the speech
        assert all(ch in lines_of[it.play] for ch in it.choices)  # distractors: lines of the same held-out play
    for it in build_items("speaker", speeches, 40, 0):
        assert it.choices[it.answer].startswith(it.meta["speaker"] + ".\n")
        assert len({ch.split("\n", 1)[1] for ch in it.choices}) == 1  # the same line under four speakers
        assert it.choices[0].split("\n", 1)[1] in lines_of[it.play]
    for it in build_items("blank", speeches, 40, 0):
        word = it.meta["word"]
        assert it.choices[it.answer].startswith(word)
        rest = it.choices[it.answer][len(word):]
        assert all(ch.endswith(rest) and ch[:len(ch) - len(rest)].isalpha() for ch in it.choices)
        line = it.context.split("\n")[-1] + it.choices[it.answer]
        assert line in lines_of[it.play]


def test_lm_documents_are_pieces_cut_at_blank_lines():
    text = austen_text()
    docs = pieces(text)
    assert 150 < len(docs) < 300 and all(d and not d.startswith("\n") for d in docs)
    assert "".join(docs).replace("\n", "") == text.replace("\n", "")  # nothing lost but blank lines


def test_a_model_that_knows_nothing_scores_chance():
    """Distractors are drawn like the answers (by frequency), so a uniform model (zero output layer) is at
    25% within three standard errors on every task."""
    torch.set_num_threads(1)  # a tiny model: threads only contend (conftest restores the count)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=4096, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64,
                                    max_seq_len=64, tie_embeddings=False)).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    engine = scoring_engine(model, load_tokenizer())
    for task in MC_TASKS:
        items = build_items(task, held_out_speeches(), 150, 0)
        outcomes = [metrics.choice_outcomes(it.choices, s, it.answer) for it, s in zip(items, _score_items(engine, items, None))]
        m = metrics.mc_metrics(outcomes, CHOICES)
        assert abs(m["acc"] - 0.25) < 3 * m["acc_se"], (task, m)


def test_perturbations_are_seeded_change_the_text_and_keep_trailing_space():
    texts = ["When shall we three meet again?\nIn thunder, lightning, or in rain? ", "Fair is foul, and foul is fair:\n"] * 5
    for kind in PERTURBATIONS:
        a, b, c = perturb(texts, kind, 0), perturb(texts, kind, 0), perturb(texts, kind, 1)
        assert a == b and a != c and a != texts
        assert [t[len(t.rstrip()):] for t in a] == [t[len(t.rstrip()):] for t in texts]
    assert perturb(["a b"], "case", 0)[0].lower() == "a b"
    assert perturb(["Hello, world."], "punctuation", 3)[0].replace(",", "").replace(".", "") == "Hello world"
