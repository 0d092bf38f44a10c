"""Diversity of a text corpus: distinct-n, self-BLEU, embedding spread and repeated phrases.

Synthetic data helps a student most when it is diverse (the empirical study in
``shared/papers``: topic-seeded zero-shot generation gave the most diverse data and the best
students), and a teacher that repeats itself shows up here first: low distinct-n, high
self-BLEU, small pairwise embedding distance, the same trigrams again and again.

Everything is a pure function of its inputs (and of ``seed`` where a sample is drawn), so a
report can be recomputed and compared across runs. Texts are compared as lowercase word tokens
(:func:`word_tokens`) of :func:`raydag.filters.exact.normalize_text`.

Example:
    >>> from raydag.measures.diversity import distinct_n, self_bleu
    >>> distinct_n(["a b a", "b c"], 1)
    0.6
    >>> self_bleu(["the cat sat", "the cat sat"])
    1.0
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from raydag.filters.exact import normalize_text

# A word, with inner apostrophes kept ("don't") and edge quotes dropped ("'hi'" -> "hi").
_WORD = re.compile(r"\w+(?:'\w+)*")
_DIGITS = 4

NGram = tuple[str, ...]


def _as_text(value: Any) -> str:
    """``value`` as a string; None and missing values (NaN, pd.NA) become ``""``."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    try:
        if pd.isna(value):
            return ""
    except (TypeError, ValueError):
        pass
    return str(value)


def word_tokens(text: Any) -> list[str]:
    """Lowercase word tokens of a text, the unit every measure here counts.

    Args:
        text: Any text; None or a missing value gives no tokens.

    Returns:
        The words of ``normalize_text(text)`` in order, inner apostrophes kept.

    Example:
        >>> word_tokens("Don't  STOP, 'now'!")
        ["don't", 'stop', 'now']
    """
    return _WORD.findall(normalize_text(_as_text(text)))


def _ngrams(tokens: Sequence[str], n: int) -> list[NGram]:
    """The n-grams of one token list (none when it has fewer than ``n`` tokens)."""
    return list(zip(*(tokens[i:] for i in range(n))))


def _sample_indices(size: int, sample_size: int, seed: int) -> np.ndarray:
    """Sorted row positions of a seeded sample without replacement (all rows when few)."""
    if sample_size < 1:
        raise ValueError(f"sample_size must be at least 1, got {sample_size}")
    if size <= sample_size:
        return np.arange(size)
    return np.sort(np.random.default_rng(seed).choice(size, size=sample_size, replace=False))


def distinct_n(texts: Sequence[Any], n: int) -> float:
    """Unique n-grams over all n-grams of a corpus (n-grams never cross two texts).

    Args:
        texts: The corpus.
        n: The n-gram order (1 for words, 2 for word pairs...).

    Returns:
        The ratio in [0, 1]; 0.0 when the corpus has no n-gram at all.

    Raises:
        ValueError: When ``n`` is below 1.

    Example:
        >>> distinct_n(["a b a", "b c"], 2)
        1.0
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    seen: set[NGram] = set()
    total = 0
    for text in texts:
        grams = _ngrams(word_tokens(text), n)
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def _top_two_counts(counts: list[list[Counter]], max_n: int) -> list[dict[NGram, list[int]]]:
    """Per order, n-gram -> ``[largest count, its text, second-largest count]`` over texts.

    The largest count of an n-gram among all texts but ``i`` is then the second-largest when
    ``i`` holds the largest, else the largest: excluding a hypothesis from its own references
    costs one lookup instead of a pass over the other texts.
    """
    tops: list[dict[NGram, list[int]]] = [{} for _ in range(max_n)]
    for text_index, per_order in enumerate(counts):
        for order_index, grams in enumerate(per_order):
            table = tops[order_index]
            for gram, count in grams.items():
                entry = table.get(gram)
                if entry is None:
                    table[gram] = [count, text_index, 0]
                elif count > entry[0]:
                    entry[2], entry[0], entry[1] = entry[0], count, text_index
                elif count > entry[2]:
                    entry[2] = count
    return tops


def _closest_other_lengths(lengths: np.ndarray) -> np.ndarray:
    """For each text, the length of the other text closest in length (ties: the shorter)."""
    gaps = np.abs(lengths[None, :] - lengths[:, None]).astype(np.float64)
    np.fill_diagonal(gaps, np.inf)
    closest = gaps.min(axis=1, keepdims=True)
    candidates = np.where(gaps == closest, lengths[None, :].astype(np.float64), np.inf)
    return candidates.min(axis=1)


def _smoothed_bleu(matches: list[int], totals: list[int], hyp_len: int, ref_len: float) -> float:
    """Sentence BLEU from clipped matches and n-gram totals per order.

    Unigram precision is unsmoothed (no shared word means BLEU 0); higher orders add one to
    matches and totals (Lin & Och 2004, "smoothing 2"), so a short text whose 4-grams all miss
    still scores by its lower orders, and an order the text is too short for counts as 1/1.
    """
    if hyp_len == 0 or matches[0] == 0:
        return 0.0
    log_precision = math.log(matches[0] / totals[0])
    log_precision += sum(math.log((m + 1) / (t + 1)) for m, t in zip(matches[1:], totals[1:]))
    brevity = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / hyp_len)
    return brevity * math.exp(log_precision / len(totals))


def self_bleu(texts: Sequence[Any], *, sample_size: int = 200, seed: int = 0, max_n: int = 4) -> float:
    """Mean BLEU of each sampled text against all the other sampled texts (higher: less diverse).

    A seeded sample of at most ``sample_size`` texts is drawn without replacement. Each one is
    scored as a hypothesis with every other sampled text as a reference: modified n-gram
    precision (a hypothesis n-gram counts at most as often as in the reference that has it
    most), Lin & Och add-one smoothing for orders above 1, and the brevity penalty taken from
    the reference closest in length (ties: the shorter one).

    Args:
        texts: The corpus.
        sample_size: Most texts compared (the cost grows with the sample's n-gram count).
        seed: Seed of the sample; the same seed gives the same value.
        max_n: Highest n-gram order (4 for BLEU-4).

    Returns:
        The mean in [0, 1]; 0.0 when fewer than two texts are sampled.

    Raises:
        ValueError: When ``max_n`` or ``sample_size`` is below 1.

    Example:
        >>> round(self_bleu(["the cat sat on the mat", "the cat sat"]), 4)
        0.3828
    """
    if max_n < 1:
        raise ValueError(f"max_n must be at least 1, got {max_n}")
    texts = list(texts)
    tokens = [word_tokens(texts[i]) for i in _sample_indices(len(texts), sample_size, seed)]
    if len(tokens) < 2:
        return 0.0
    counts = [[Counter(_ngrams(toks, n)) for n in range(1, max_n + 1)] for toks in tokens]
    tops = _top_two_counts(counts, max_n)
    ref_lengths = _closest_other_lengths(np.array([len(toks) for toks in tokens]))
    scores = []
    for index, per_order in enumerate(counts):
        matches = []
        for table, grams in zip(tops, per_order):
            matched = 0
            for gram, count in grams.items():
                top, owner, second = table[gram]
                matched += min(count, second if owner == index else top)
            matches.append(matched)
        totals = [sum(grams.values()) for grams in per_order]
        scores.append(_smoothed_bleu(matches, totals, len(tokens[index]), ref_lengths[index]))
    return float(np.mean(scores))


def mean_pairwise_cosine_distance(embeddings: np.ndarray, *, sample_size: int = 500,
                                  seed: int = 0) -> float:
    """Mean of ``1 - cosine`` over all distinct pairs of a seeded sample of embedding rows.

    Rows are unit-normalised; an all-zero row has cosine 0 with every row. The sum over pairs
    is taken from the norm of the summed unit rows, so memory stays linear in the sample.

    Args:
        embeddings: A ``(rows, dim)`` array, one row per text.
        sample_size: Most rows compared.
        seed: Seed of the sample.

    Returns:
        The mean distance in [0, 2] (0: all the same direction); 0.0 with fewer than two rows.

    Raises:
        ValueError: When ``embeddings`` is not two-dimensional.

    Example:
        >>> import numpy as np
        >>> mean_pairwise_cosine_distance(np.array([[1.0, 0.0], [0.0, 2.0]]))
        1.0
    """
    matrix = np.asarray(embeddings, dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"embeddings must be a 2-d array, got shape {matrix.shape}")
    rows = matrix[_sample_indices(len(matrix), sample_size, seed)]
    count = len(rows)
    if count < 2:
        return 0.0
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    unit = np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)
    # sum over i != j of u_i . u_j  ==  |sum_i u_i|^2 - sum_i |u_i|^2
    pair_sum = float(np.square(unit.sum(axis=0)).sum() - np.square(unit).sum())
    mean_cosine = pair_sum / (count * (count - 1))
    return float(min(max(1.0 - mean_cosine, 0.0), 2.0))


def top_ngrams(texts: Sequence[Any], *, n: int = 3, k: int = 10) -> list[dict]:
    """The most repeated n-grams of a corpus: the phrases a teacher keeps reusing.

    Args:
        texts: The corpus.
        n: The n-gram order.
        k: Most n-grams returned.

    Returns:
        ``[{"ngram": "words joined by spaces", "count": c}]``, only n-grams seen at least twice,
        most frequent first, ties in alphabetical order.

    Example:
        >>> top_ngrams(["i love it", "i love this"], n=2)
        [{'ngram': 'i love', 'count': 2}]
    """
    counts: Counter[NGram] = Counter()
    for text in texts:
        counts.update(_ngrams(word_tokens(text), n))
    repeated = sorted((" ".join(g), c) for g, c in counts.items() if c >= 2)
    repeated.sort(key=lambda item: -item[1])  # stable: alphabetical within a count
    return [{"ngram": gram, "count": count} for gram, count in repeated[:k]]


def _label_shares(labels: Sequence[Any] | None) -> tuple[dict[str, float], dict[str, int]]:
    """Label -> share of rows and label -> row count, labels as strings in sorted order."""
    if labels is None:
        return {}, {}
    counts = Counter(_as_text(label) for label in labels)
    total = sum(counts.values())
    ordered = sorted(counts)
    return ({label: round(counts[label] / total, _DIGITS) for label in ordered},
            {label: counts[label] for label in ordered})


def diversity_report(texts: Sequence[Any], labels: Sequence[Any] | None, *,
                     embeddings: np.ndarray | None = None, sample_size: int = 200, seed: int = 0,
                     embedding_sample_size: int = 500) -> dict:
    """Every diversity measure of one corpus, as a JSON-ready dict.

    Args:
        texts: The corpus.
        labels: One label per text, or None for unlabelled data (empty label tables).
        embeddings: Optional ``(len(texts), dim)`` array aligned with ``texts``.
        sample_size: Texts sampled for self-BLEU.
        seed: Seed of every sample.
        embedding_sample_size: Rows sampled for the embedding distance.

    Returns:
        ``{"rows", "distinct_1", "distinct_2", "self_bleu", "embedding_cosine_distance"
        (None without embeddings), "label_distribution": {label: share},
        "label_counts": {label: count}, "top_ngrams": [{"ngram", "count"}]}``, floats rounded
        to 4 places, labels as strings.

    Raises:
        ValueError: When ``labels`` or ``embeddings`` do not have one entry per text.

    Example:
        >>> diversity_report(["a b", "a c"], ["x", "y"])["distinct_1"]
        0.75
    """
    texts = list(texts)
    if labels is not None and len(labels) != len(texts):
        raise ValueError(f"{len(labels)} labels for {len(texts)} texts")
    distance = None
    if embeddings is not None:
        if len(embeddings) != len(texts):
            raise ValueError(f"{len(embeddings)} embedding rows for {len(texts)} texts")
        distance = round(mean_pairwise_cosine_distance(
            embeddings, sample_size=embedding_sample_size, seed=seed), _DIGITS)
    shares, counts = _label_shares(labels)
    return {
        "rows": len(texts),
        "distinct_1": round(distinct_n(texts, 1), _DIGITS),
        "distinct_2": round(distinct_n(texts, 2), _DIGITS),
        "self_bleu": round(self_bleu(texts, sample_size=sample_size, seed=seed), _DIGITS),
        "embedding_cosine_distance": distance,
        "label_distribution": shares,
        "label_counts": counts,
        "top_ngrams": top_ngrams(texts),
    }


def diversity_by_group(frame: pd.DataFrame, *, group_column: str = "method",
                       text_column: str = "text", label_column: str = "label",
                       embeddings: np.ndarray | None = None, sample_size: int = 200,
                       seed: int = 0, embedding_sample_size: int = 500) -> dict:
    """Diversity of a whole table and of each group in it (e.g. each generation method).

    Args:
        frame: One row per text.
        group_column: Column whose values split the rows into groups.
        text_column: Column holding the texts.
        label_column: Column holding the labels; when absent the reports have no label tables.
        embeddings: Optional array aligned with ``frame``'s rows (by position).
        sample_size: Texts sampled for self-BLEU, per report.
        seed: Seed of every sample.
        embedding_sample_size: Rows sampled for the embedding distance, per report.

    Returns:
        ``{"all": report, "by_<group_column>": {group: report}}`` with
        :func:`diversity_report` reports; groups as strings, sorted, a missing value as ``""``.

    Raises:
        ValueError: When ``text_column`` or ``group_column`` is missing, or ``embeddings`` is
            not aligned with the rows.

    Example:
        >>> import pandas as pd
        >>> frame = pd.DataFrame({"text": ["a b", "a c"], "label": ["x", "y"], "method": ["m", "n"]})
        >>> sorted(diversity_by_group(frame)["by_method"])
        ['m', 'n']
    """
    for column in (text_column, group_column):
        if column not in frame.columns:
            raise ValueError(f"diversity_by_group needs column {column!r}; "
                             f"the table has {list(frame.columns)}")
    if embeddings is not None and len(embeddings) != len(frame):
        raise ValueError(f"{len(embeddings)} embedding rows for {len(frame)} table rows")
    settings = {"sample_size": sample_size, "seed": seed,
                "embedding_sample_size": embedding_sample_size}
    texts = frame[text_column].tolist()
    labels = frame[label_column].tolist() if label_column in frame.columns else None
    groups = np.array([_as_text(value) for value in frame[group_column]], dtype=object)
    by_group = {}
    for group in sorted(set(groups)):
        positions = np.flatnonzero(groups == group)
        by_group[group] = diversity_report(
            [texts[p] for p in positions],
            None if labels is None else [labels[p] for p in positions],
            embeddings=None if embeddings is None else np.asarray(embeddings)[positions],
            **settings)
    return {"all": diversity_report(texts, labels, embeddings=embeddings, **settings),
            f"by_{group_column}": by_group}
