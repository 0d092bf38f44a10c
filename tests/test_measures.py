"""Diversity and label-shortcut measures on hand-made corpora with known answers."""

from __future__ import annotations

import math
import random
import time
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from raydag.measures.bias import (
    LENGTH_GAP_MIN,
    PRIOR_MASS_PER_TOKEN,
    bias_report,
    flag_rows,
    label_word_log_odds,
    length_by_label,
    shortcut_words,
)
from raydag.measures.diversity import (
    distinct_n,
    diversity_by_group,
    diversity_report,
    mean_pairwise_cosine_distance,
    self_bleu,
    top_ngrams,
    word_tokens,
)

FILLER = [f"w{i}" for i in range(60)]


def _sentences(count: int, words: int, seed: int, vocabulary: list[str] = FILLER) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(vocabulary) for _ in range(words)) for _ in range(count)]


def _naive_bleu(hypothesis: list[str], references: list[list[str]], max_n: int = 4) -> float:
    """Textbook sentence BLEU with Lin & Och smoothing above unigrams, a pass per reference."""
    if not hypothesis:
        return 0.0
    log_p = 0.0
    for n in range(1, max_n + 1):
        grams = Counter(tuple(hypothesis[i:i + n]) for i in range(len(hypothesis) - n + 1))
        ref_max: Counter = Counter()
        for ref in references:
            for gram, c in Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1)).items():
                ref_max[gram] = max(ref_max[gram], c)
        matched = sum(min(c, ref_max[g]) for g, c in grams.items())
        total = sum(grams.values())
        if n == 1:
            if matched == 0:
                return 0.0
            log_p += math.log(matched / total)
        else:
            log_p += math.log((matched + 1) / (total + 1))
    ref_len = min((abs(len(r) - len(hypothesis)), len(r)) for r in references)[1]
    bp = 1.0 if len(hypothesis) > ref_len else math.exp(1 - ref_len / len(hypothesis))
    return bp * math.exp(log_p / max_n)


# --- tokens and distinct-n ---------------------------------------------------------------


def test_word_tokens_lowercase_keep_inner_apostrophes_and_skip_missing():
    assert word_tokens("  Don't STOP, 'now'!") == ["don't", "stop", "now"]
    assert word_tokens(None) == []
    assert word_tokens(float("nan")) == []
    assert word_tokens(42) == ["42"]


def test_distinct_n_on_hand_examples():
    assert distinct_n(["a b a", "b c"], 1) == pytest.approx(3 / 5)
    assert distinct_n(["a b a", "b c"], 2) == pytest.approx(1.0)
    assert distinct_n(["the cat the cat"], 2) == pytest.approx(2 / 3)
    # n-grams never span two texts: "a" + "b" would give the bigram "a b" only if they did.
    assert distinct_n(["a", "b"], 2) == 0.0
    assert distinct_n([], 1) == 0.0
    with pytest.raises(ValueError, match="n must be"):
        distinct_n(["a"], 0)


# --- self-BLEU ---------------------------------------------------------------------------


def test_self_bleu_is_one_for_identical_texts_and_zero_for_disjoint_ones():
    same = ["the quick brown fox jumps over the lazy dog"] * 5
    assert self_bleu(same) == pytest.approx(1.0)
    disjoint = [f"a{i} b{i} c{i} d{i} e{i}" for i in range(6)]
    assert self_bleu(disjoint) == 0.0
    assert self_bleu(["only one text"]) == 0.0


def test_self_bleu_of_two_texts_matches_a_hand_computation():
    # A = "the cat sat on the mat" against B = "the cat sat":
    #   p1 = 3/6 (clipped "the"), p2 = (2+1)/(5+1), p3 = (1+1)/(4+1), p4 = (0+1)/(3+1), BP = 1.
    # B against A: every n-gram matches, p2..p4 = 1 (p4 is (0+1)/(0+1)), BP = exp(1 - 6/3).
    bleu_a = (3 / 6 * 3 / 6 * 2 / 5 * 1 / 4) ** 0.25
    bleu_b = math.exp(1 - 6 / 3)
    value = self_bleu(["The cat sat on the mat.", "the cat sat"])
    assert value == pytest.approx((bleu_a + bleu_b) / 2, abs=1e-12)


def test_self_bleu_equals_a_naive_pass_over_every_other_reference():
    vocabulary = FILLER[:8]  # small, so n-grams repeat and clipping and top-2 counts matter
    texts = _sentences(30, 9, seed=3, vocabulary=vocabulary) + ["w1 w1 w1 w1", "w1", "w2 w3"]
    tokens = [word_tokens(t) for t in texts]
    expected = np.mean([_naive_bleu(tokens[i], tokens[:i] + tokens[i + 1:])
                        for i in range(len(tokens))])
    assert self_bleu(texts, sample_size=100) == pytest.approx(expected, abs=1e-12)


def test_self_bleu_ranks_a_repetitive_corpus_above_a_varied_one_and_is_seeded():
    varied = _sentences(300, 15, seed=1, vocabulary=[f"v{i}" for i in range(2000)])
    template = [f"i really loved this product because it is {w}" for w in FILLER * 5]
    # unrelated texts keep a floor: shared words and the add-one smoothing of higher orders
    assert self_bleu(template) > 0.8 > 0.2 > self_bleu(varied)
    mixed = varied[:150] + template[:150]
    assert self_bleu(mixed, sample_size=50, seed=7) == self_bleu(mixed, sample_size=50, seed=7)
    assert self_bleu(mixed, sample_size=50, seed=7) != self_bleu(mixed, sample_size=50, seed=8)
    with pytest.raises(ValueError):
        self_bleu(mixed, sample_size=0)


def test_self_bleu_on_200_twenty_word_texts_is_fast():
    texts = _sentences(400, 20, seed=5, vocabulary=[f"t{i}" for i in range(300)])
    start = time.perf_counter()
    value = self_bleu(texts, sample_size=200, seed=0)
    elapsed = time.perf_counter() - start
    assert 0.0 < value < 1.0
    assert elapsed < 2.0, f"self_bleu took {elapsed:.2f}s"


# --- embeddings --------------------------------------------------------------------------


def test_cosine_distance_on_identical_orthogonal_and_opposite_vectors():
    assert mean_pairwise_cosine_distance(np.tile([[0.3, 0.4, 1.2]], (6, 1))) == pytest.approx(0.0, abs=1e-12)
    assert mean_pairwise_cosine_distance(np.eye(4) * 3.0) == pytest.approx(1.0)
    assert mean_pairwise_cosine_distance(np.array([[1.0, 1.0], [-2.0, -2.0]])) == pytest.approx(2.0)
    # pairs: (e1, e1+e2) 1 - 1/sqrt2, (e1, e2) 1, (e1+e2, e2) 1 - 1/sqrt2
    three = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    assert mean_pairwise_cosine_distance(three) == pytest.approx((3 - 2 / math.sqrt(2)) / 3)
    # a zero row has cosine 0 with everything
    assert mean_pairwise_cosine_distance(np.array([[0.0, 0.0], [1.0, 0.0]])) == pytest.approx(1.0)
    assert mean_pairwise_cosine_distance(np.ones((1, 3))) == 0.0
    with pytest.raises(ValueError, match="2-d"):
        mean_pairwise_cosine_distance(np.ones(3))


def test_cosine_distance_sample_is_seeded_and_matches_the_full_pair_matrix():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 8))
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = unit @ unit.T
    full = 1 - (sims.sum() - np.trace(sims)) / (50 * 49)
    assert mean_pairwise_cosine_distance(vectors) == pytest.approx(full)
    first = mean_pairwise_cosine_distance(vectors, sample_size=10, seed=1)
    assert first == mean_pairwise_cosine_distance(vectors, sample_size=10, seed=1)
    assert first != mean_pairwise_cosine_distance(vectors, sample_size=10, seed=2)


# --- repeated phrases and reports --------------------------------------------------------


def test_top_ngrams_counts_keep_repeats_only_and_break_ties_alphabetically():
    texts = ["I love this phone", "i love this case", "we love this phone", "a b c"]
    assert top_ngrams(texts, n=3, k=10) == [{"ngram": "i love this", "count": 2},
                                            {"ngram": "love this phone", "count": 2}]
    assert top_ngrams(texts, n=3, k=1) == [{"ngram": "i love this", "count": 2}]
    assert top_ngrams(texts, n=2, k=2) == [{"ngram": "love this", "count": 3},
                                           {"ngram": "i love", "count": 2}]
    assert top_ngrams(["a b c", "d e f"], n=2) == []


def test_diversity_report_fields_and_label_shares():
    texts = ["good phone", "good phone", "bad case"]
    report = diversity_report(texts, ["pos", "pos", "neg"], embeddings=np.eye(3))
    assert report["rows"] == 3
    assert report["distinct_1"] == round(4 / 6, 4)
    assert report["distinct_2"] == round(2 / 3, 4)
    assert report["embedding_cosine_distance"] == 1.0
    assert report["label_distribution"] == {"neg": round(1 / 3, 4), "pos": round(2 / 3, 4)}
    assert report["label_counts"] == {"neg": 1, "pos": 2}
    assert report["top_ngrams"] == []  # the default trigrams: none repeats
    assert 0.0 < report["self_bleu"] < 1.0
    assert diversity_report(texts, None)["embedding_cosine_distance"] is None
    with pytest.raises(ValueError, match="embedding rows"):
        diversity_report(texts, None, embeddings=np.eye(2))
    with pytest.raises(ValueError, match="labels"):
        diversity_report(texts, ["pos"])


def test_diversity_by_group_slices_texts_labels_and_embeddings_per_group():
    frame = pd.DataFrame({
        "text": ["same words here", "same words here", "alpha beta", "gamma delta"],
        "label": ["a", "b", "a", "a"],
        "method": ["copy", "copy", "topic", "topic"],
    })
    embeddings = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    report = diversity_by_group(frame, embeddings=embeddings)
    assert report["all"]["rows"] == 4
    assert set(report["by_method"]) == {"copy", "topic"}
    copy, topic = report["by_method"]["copy"], report["by_method"]["topic"]
    assert copy["embedding_cosine_distance"] == 0.0 and topic["embedding_cosine_distance"] == 1.0
    assert copy["self_bleu"] == 1.0 and topic["self_bleu"] == 0.0
    assert copy["label_counts"] == {"a": 1, "b": 1} and topic["label_counts"] == {"a": 2}
    assert "by_source" in diversity_by_group(frame.assign(source="x"), group_column="source")
    with pytest.raises(ValueError, match="'method'"):
        diversity_by_group(frame.drop(columns="method"))


# --- label shortcuts ---------------------------------------------------------------------


def _planted(seed: int, marker: str | None, rows_per_label: int = 60) -> tuple[list[str], list[str]]:
    """Two-label corpus: positives carry "great" in every other row, and ``marker`` in all."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(rows_per_label):
        words = [rng.choice(FILLER) for _ in range(8)]
        if i % 2 == 0:
            words.insert(rng.randrange(9), "great")
        if marker:
            words.insert(rng.randrange(len(words) + 1), marker)
        texts.append(" ".join(words))
        labels.append("positive")
        texts.append(" ".join(rng.choice(FILLER) for _ in range(9)))
        labels.append("negative")
    return texts, labels


def test_log_odds_matches_the_fightin_words_formula_and_is_antisymmetric():
    texts = ["good good fun", "good day", "bad day", "bad mess day"]
    labels = ["pos", "pos", "neg", "neg"]
    frame = label_word_log_odds(texts, labels)
    assert list(frame.columns) == ["label", "word", "count_in_label", "count_other", "log_odds", "z"]
    assert len(frame) == 2 * 5
    # "good" for pos: y_pos = 3, y_neg = 0, n_pos = 5, n_neg = 5; prior from the corpus shares.
    alpha_0 = PRIOR_MASS_PER_TOKEN * 10
    alpha = alpha_0 * 3 / 10
    delta = (math.log((3 + alpha) / (5 + alpha_0 - 3 - alpha))
             - math.log((0 + alpha) / (5 + alpha_0 - 0 - alpha)))
    z = delta / math.sqrt(1 / (3 + alpha) + 1 / (0 + alpha))
    good = frame[(frame.label == "pos") & (frame.word == "good")].iloc[0]
    assert (good.count_in_label, good.count_other) == (3, 0)
    assert good.log_odds == pytest.approx(delta) and good.z == pytest.approx(z)
    assert frame[frame.label == "pos"].iloc[0].word == "good"  # sorted by z within a label
    merged = frame[frame.label == "pos"].merge(frame[frame.label == "neg"], on="word")
    np.testing.assert_allclose(merged.z_x, -merged.z_y)  # two labels: one's gain is the other's loss


def test_log_odds_prior_texts_shape_the_prior_and_one_label_gives_nothing():
    texts = ["good good fun", "good day", "bad day", "bad mess day"]
    labels = ["pos", "pos", "neg", "neg"]
    plain = label_word_log_odds(texts, labels).set_index(["label", "word"])
    with_prior = label_word_log_odds(texts, labels, prior_texts=["good"] * 50).set_index(["label", "word"])
    # a prior full of "good" gives it more pseudo-counts: its log-odds shrink towards 0
    assert 0 < with_prior.log_odds["pos", "good"] < plain.log_odds["pos", "good"]
    # the prior only reweights the corpus's words; it adds none
    assert len(label_word_log_odds(texts, labels, prior_texts=["zebra"] * 50)) == len(plain)
    assert label_word_log_odds(["a b", "c d"], ["x", "x"]).empty
    with pytest.raises(ValueError, match="labels"):
        label_word_log_odds(["a b"], ["x", "y"])


def test_planted_shortcut_word_is_flagged_and_a_word_shared_with_raw_is_not():
    raw_texts, raw_labels = _planted(seed=1, marker=None)
    syn_texts, syn_labels = _planted(seed=2, marker="delightful")
    words = shortcut_words(raw_texts, raw_labels, syn_texts, syn_labels)
    found = {(w["label"], w["word"]): w for w in words}
    assert ("positive", "delightful") in found
    delightful = found["positive", "delightful"]
    assert delightful["z_synthetic"] >= 3.0 and delightful["z_raw"] == 0.0
    assert delightful["count_synthetic"] == 60 and delightful["count_raw"] == 0
    assert delightful["share_of_label_rows"] == 1.0
    # "great" marks positives just as strongly in the raw data: strong, but no shortcut
    great = label_word_log_odds(syn_texts, syn_labels).set_index(["label", "word"]).z["positive", "great"]
    assert great >= 3.0
    assert ("positive", "great") not in found
    assert not any(w["label"] == "negative" for w in words)
    assert [w["z_synthetic"] for w in words] == sorted((w["z_synthetic"] for w in words), reverse=True)
    # the thresholds bite: a margin no word reaches, or a count no word has, flags nothing
    assert shortcut_words(raw_texts, raw_labels, syn_texts, syn_labels, margin=1e6) == []
    assert shortcut_words(raw_texts, raw_labels, syn_texts, syn_labels, min_count=61) == []


def test_shortcut_words_keeps_top_k_per_label():
    raw_texts, raw_labels = _planted(seed=1, marker=None)
    syn_texts, syn_labels = _planted(seed=2, marker="delightful")
    syn_texts = [t + " superb" if label == "positive" else t for t, label in zip(syn_texts, syn_labels)]
    both = shortcut_words(raw_texts, raw_labels, syn_texts, syn_labels)
    assert {w["word"] for w in both} >= {"delightful", "superb"}
    assert len(shortcut_words(raw_texts, raw_labels, syn_texts, syn_labels, top_k=1)) == 1


def test_length_shortcut_is_flagged_only_when_raw_lacks_the_gap():
    short = _sentences(40, 6, seed=1)
    long = _sentences(40, 18, seed=2)
    labels = ["positive"] * 40 + ["negative"] * 40
    raw_even = _sentences(40, 6, seed=3) + _sentences(40, 6, seed=4)
    report = length_by_label(raw_even, labels, short + long, labels)
    flagged = {f["label"]: f for f in report["flags"]}
    assert "negative" in flagged
    negative = flagged["negative"]
    assert negative["synthetic_mean"] == 18.0 and negative["others_mean"] == 6.0
    assert negative["synthetic_gap"] == pytest.approx(12 / 12) and negative["raw_gap"] == 0.0
    assert report["by_label"]["negative"] == {"raw_rows": 40, "raw_mean": 6.0, "raw_median": 6.0,
                                              "synthetic_rows": 40, "synthetic_mean": 18.0,
                                              "synthetic_median": 18.0}
    raw_same_gap = _sentences(40, 6, seed=3) + _sentences(40, 18, seed=4)
    assert length_by_label(raw_same_gap, labels, short + long, labels)["flags"] == []
    # a gap under the threshold is no shortcut even when raw has none
    slightly = _sentences(40, 10, seed=5) + _sentences(40, 12, seed=6)
    gap = 2 / 11
    assert gap < LENGTH_GAP_MIN
    assert length_by_label(raw_even, labels, slightly, labels)["flags"] == []


def test_flag_rows_lists_a_word_only_for_rows_of_its_label():
    words = [{"label": "positive", "word": "delightful"}, {"label": "positive", "word": "superb"},
             {"label": "negative", "word": "awful"}]
    texts = ["A delightful, superb day", "a delightful mess", "awful and superb", "plain", "Awful!"]
    labels = ["positive", "negative", "positive", "positive", "negative"]
    assert flag_rows(texts, labels, words) == [["delightful", "superb"], [], ["superb"], [], ["awful"]]
    assert flag_rows(["x 1"], [1], [{"label": "1", "word": "x"}]) == [["x"]]  # labels as strings


def test_bias_report_counts_flagged_rows_and_records_settings():
    raw_texts, raw_labels = _planted(seed=1, marker=None)
    syn_texts, syn_labels = _planted(seed=2, marker="delightful")
    report = bias_report(raw_texts, raw_labels, syn_texts, syn_labels, z_min=3.0, margin=2.0)
    assert any(w["word"] == "delightful" for w in report["shortcut_words"])
    assert report["flagged_rows"] == 60  # every synthetic positive, no negative
    assert report["settings"]["z_min"] == 3.0 and report["settings"]["min_count"] == 5
    assert report["length"]["flags"] == []
    assert set(report["length"]["by_label"]) == {"negative", "positive"}
