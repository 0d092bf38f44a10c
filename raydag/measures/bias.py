"""Label shortcuts in synthetic data: words and lengths that give the label away.

A teacher asked for "a positive review" tends to reach for the same few words ("delightful")
or to write one label longer than the others. A student then learns the shortcut instead of the
task. The empirical study in ``shared/papers`` found such teacher bias and removed it by
rephrasing the affected examples; this module finds the candidates:

- :func:`shortcut_words`: words far more tied to a label in the synthetic data than in the raw
  data, by the weighted log-odds ratio with an informative Dirichlet prior of Monroe, Colaresi
  & Quinn (2008, "Fightin' Words") (:func:`label_word_log_odds`).
- :func:`length_by_label`: labels whose synthetic texts are much longer or shorter than the
  other labels', when the raw data shows no such gap.
- :func:`flag_rows`: for each row, the shortcut words of its own label that it contains, to
  pick the rows an optional rephrase stage rewrites.

Words are the lowercase tokens of :func:`raydag.measures.diversity.word_tokens`; labels are
compared and reported as strings, so labels that went through JSON still match.

Example:
    >>> from raydag.measures.bias import flag_rows
    >>> flag_rows(["a delightful day", "a delightful mess"], ["pos", "neg"],
    ...           [{"label": "pos", "word": "delightful"}])
    [['delightful'], []]
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from raydag.measures.diversity import _as_text, word_tokens

# Without prior texts, the Dirichlet prior is the corpus's own word distribution carrying this
# many pseudo-counts per corpus token (total prior mass = 0.1 x corpus tokens). The mass sets
# how much a word seen under only one label is shrunk: a tiny prior gives such a word a huge
# variance (z near 0), a prior as big as the corpus halves every log-odds; about a tenth of the
# corpus gives exclusive words their strongest z at every corpus size we tried.
PRIOR_MASS_PER_TOKEN = 0.1
# A label's synthetic mean length must differ from the other labels' by more than this share
# of the overall mean length, and by more than LENGTH_GAP_RAW_FACTOR times the raw gap.
LENGTH_GAP_MIN = 0.25
LENGTH_GAP_RAW_FACTOR = 2.0
_DIGITS = 4
_COLUMNS = ["label", "word", "count_in_label", "count_other", "log_odds", "z"]


def _check_aligned(texts: Sequence[Any], labels: Sequence[Any], what: str) -> None:
    """Raise when a corpus does not have one label per text."""
    if len(texts) != len(labels):
        raise ValueError(f"{what}: {len(labels)} labels for {len(texts)} texts")


def _label_counts(texts: Sequence[Any], labels: Sequence[Any]) -> dict[str, Counter]:
    """Label -> word token counts over that label's texts."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for text, label in zip(texts, labels):
        counts[_as_text(label)].update(word_tokens(text))
    return counts


def label_word_log_odds(texts: Sequence[Any], labels: Sequence[Any], *,
                        prior_texts: Sequence[Any] | None = None,
                        prior_mass_per_token: float = PRIOR_MASS_PER_TOKEN) -> pd.DataFrame:
    """How strongly each word marks each label against all other labels ("Fightin' Words").

    For label ``L`` and word ``w``, with ``y`` the counts of ``w`` in ``L``'s texts and in the
    other labels' texts, ``n`` those texts' token totals, and a Dirichlet prior ``a_w`` with
    total ``a_0`` (Monroe, Colaresi & Quinn 2008, eq. 16 and 18)::

        log_odds = log((y_L + a_w) / (n_L + a_0 - y_L - a_w))
                 - log((y_o + a_w) / (n_o + a_0 - y_o - a_w))
        z        = log_odds / sqrt(1 / (y_L + a_w) + 1 / (y_o + a_w))

    The prior's shape is the word distribution of ``prior_texts`` plus the corpus (the corpus
    alone when no prior texts are given), and its total mass is always
    ``prior_mass_per_token`` x the corpus's token count, so z-scores from corpora of different
    sizes shrink alike.

    Args:
        texts: The corpus.
        labels: One label per text.
        prior_texts: Optional background texts (e.g. the raw data) shaping the prior.
        prior_mass_per_token: Prior pseudo-counts per corpus token (see
            :data:`PRIOR_MASS_PER_TOKEN`).

    Returns:
        A DataFrame with columns ``label, word, count_in_label, count_other, log_odds, z``, one
        row per label and corpus word, sorted by label then ``z`` descending (ties by word).
        Empty when the corpus has fewer than two labels or two distinct words: there is
        nothing to contrast.

    Raises:
        ValueError: When ``labels`` does not have one entry per text, or the prior mass is not
            positive.

    Example:
        >>> frame = label_word_log_odds(["good fun", "good day", "bad day", "bad mess"],
        ...                             ["pos", "pos", "neg", "neg"])
        >>> frame[frame.label == "pos"].iloc[0]["word"]
        'good'
    """
    _check_aligned(texts, labels, "label_word_log_odds")
    return _log_odds(_label_counts(texts, labels), prior_texts, prior_mass_per_token)


def _log_odds(per_label: dict[str, Counter], prior_texts: Sequence[Any] | None = None,
              prior_mass_per_token: float = PRIOR_MASS_PER_TOKEN) -> pd.DataFrame:
    """:func:`label_word_log_odds` from the corpus's word counts per label."""
    if prior_mass_per_token <= 0:
        raise ValueError(f"prior_mass_per_token must be positive, got {prior_mass_per_token}")
    label_names = sorted(per_label)
    vocabulary = sorted(set().union(*per_label.values())) if per_label else []
    if len(label_names) < 2 or len(vocabulary) < 2:
        return pd.DataFrame({column: [] for column in _COLUMNS})
    in_label = np.array([[per_label[label][w] for w in vocabulary] for label in label_names],
                        dtype=np.float64)
    overall = in_label.sum(axis=0)
    shape = overall.copy()
    if prior_texts is not None:
        background = Counter(w for text in prior_texts for w in word_tokens(text))
        shape += np.array([background[w] for w in vocabulary], dtype=np.float64)
    alpha_0 = prior_mass_per_token * overall.sum()
    alpha = alpha_0 * shape / shape.sum()
    other = overall[None, :] - in_label
    n_label = in_label.sum(axis=1, keepdims=True)
    n_other = other.sum(axis=1, keepdims=True)
    log_odds = (np.log(in_label + alpha) - np.log(n_label + alpha_0 - in_label - alpha)
                - np.log(other + alpha) + np.log(n_other + alpha_0 - other - alpha))
    z = log_odds / np.sqrt(1.0 / (in_label + alpha) + 1.0 / (other + alpha))
    frame = pd.DataFrame({
        "label": np.repeat(label_names, len(vocabulary)),
        "word": np.tile(vocabulary, len(label_names)),
        "count_in_label": in_label.ravel().astype(np.int64),
        "count_other": other.ravel().astype(np.int64),
        "log_odds": log_odds.ravel(),
        "z": z.ravel(),
    })
    return frame.sort_values(["label", "z", "word"], ascending=[True, False, True],
                             ignore_index=True)


def _rows_containing(texts: Sequence[Any], labels: Sequence[Any]) -> tuple[dict[str, Counter], Counter]:
    """Label -> word -> number of that label's rows containing the word, and label -> rows."""
    containing: dict[str, Counter] = defaultdict(Counter)
    rows: Counter = Counter()
    for text, label in zip(texts, labels):
        name = _as_text(label)
        containing[name].update(set(word_tokens(text)))
        rows[name] += 1
    return containing, rows


def shortcut_words(raw_texts: Sequence[Any], raw_labels: Sequence[Any],
                   syn_texts: Sequence[Any], syn_labels: Sequence[Any], *, z_min: float = 3.0,
                   min_count: int = 5, margin: float = 2.0, top_k: int = 20) -> list[dict]:
    """Words much more tied to a label in the synthetic data than in the raw data.

    A word is a shortcut for label ``L`` when, by :func:`label_word_log_odds` computed on each
    corpus separately, its synthetic ``z >= z_min``, it occurs at least ``min_count`` times in
    ``L``'s synthetic texts, and ``z_synthetic - z_raw >= margin``, where ``z_raw`` is its
    z-score for ``L`` in the raw data (0 when the raw data never has the word or has fewer
    than two labels).

    Args:
        raw_texts: The human (seed) texts.
        raw_labels: Their labels.
        syn_texts: The synthetic texts.
        syn_labels: Their labels.
        z_min: Least synthetic z-score.
        min_count: Least token count of the word in the label's synthetic texts.
        margin: Least gap between synthetic and raw z-scores.
        top_k: Most words kept per label (the highest synthetic z-scores).

    Returns:
        ``[{"label", "word", "z_synthetic", "z_raw", "count_synthetic", "count_raw",
        "share_of_label_rows"}]`` (counts are token counts in that label's texts;
        ``share_of_label_rows`` is the share of the label's synthetic rows containing the
        word), sorted by ``z_synthetic`` descending, floats rounded to 4 places.

    Raises:
        ValueError: When a corpus does not have one label per text.

    Example:
        >>> raw = ["a good day", "a bad day"] * 30
        >>> syn = ["a delightful good day", "a bad day"] * 30
        >>> [w["word"] for w in shortcut_words(raw, ["pos", "neg"] * 30, syn, ["pos", "neg"] * 30)]
        ['delightful']
    """
    _check_aligned(raw_texts, raw_labels, "shortcut_words raw")
    _check_aligned(syn_texts, syn_labels, "shortcut_words synthetic")
    return shortcut_words_from_counts(raw_texts, raw_labels, synthetic_counts(syn_texts, syn_labels),
                                      z_min=z_min, min_count=min_count, margin=margin, top_k=top_k)


def synthetic_counts(texts: Sequence[Any], labels: Sequence[Any]) -> dict[str, dict]:
    """What :func:`shortcut_words` needs of a synthetic corpus: per label, word token counts
    (``tokens``), rows containing each word (``containing``) and rows (``rows``). Counts of
    parts of a corpus add up (:func:`add_counts`), so a corpus can be counted block by block.

    Example:
        >>> synthetic_counts(["a b a"], ["x"])
        {'tokens': {'x': {'a': 2, 'b': 1}}, 'containing': {'x': {'a': 1, 'b': 1}}, 'rows': {'x': 1}}
    """
    containing, rows = _rows_containing(texts, labels)
    return {"tokens": {label: dict(c) for label, c in _label_counts(texts, labels).items()},
            "containing": {label: dict(c) for label, c in containing.items()},
            "rows": dict(rows)}


def add_counts(parts: Sequence[dict[str, dict]]) -> dict[str, dict]:
    """The :func:`synthetic_counts` of a corpus from those of its parts."""
    total: dict[str, dict] = {"tokens": {}, "containing": {}, "rows": {}}
    for part in parts:
        for key in ("tokens", "containing"):
            for label, counts in part[key].items():
                total[key].setdefault(label, Counter()).update(counts)
        for label, n in part["rows"].items():
            total["rows"][label] = total["rows"].get(label, 0) + n
    return total


def shortcut_words_from_counts(raw_texts: Sequence[Any], raw_labels: Sequence[Any],
                               synthetic: dict[str, dict], *, z_min: float = 3.0,
                               min_count: int = 5, margin: float = 2.0,
                               top_k: int = 20) -> list[dict]:
    """:func:`shortcut_words` with the synthetic corpus given by its :func:`synthetic_counts`
    (so the corpus never has to be in one place)."""
    _check_aligned(raw_texts, raw_labels, "shortcut_words raw")
    synthetic_odds = _log_odds({label: Counter(c) for label, c in synthetic["tokens"].items()})
    candidates = synthetic_odds[(synthetic_odds["z"] >= z_min)
                                & (synthetic_odds["count_in_label"] >= min_count)]
    if candidates.empty:
        return []
    raw = label_word_log_odds(raw_texts, raw_labels)
    raw_z = dict(zip(zip(raw["label"], raw["word"]), raw["z"]))
    raw_counts = _label_counts(raw_texts, raw_labels)
    containing, label_rows = synthetic["containing"], synthetic["rows"]
    kept: dict[str, list[dict]] = defaultdict(list)
    for label, word, count, z in zip(candidates["label"], candidates["word"],
                                     candidates["count_in_label"], candidates["z"]):
        z_raw = float(raw_z.get((label, word), 0.0))
        if z - z_raw < margin or len(kept[label]) >= top_k:
            continue  # candidates come sorted by z within a label, so the first top_k win
        kept[label].append({
            "label": label,
            "word": word,
            "z_synthetic": round(float(z), _DIGITS),
            "z_raw": round(z_raw, _DIGITS),
            "count_synthetic": int(count),
            "count_raw": int(raw_counts.get(label, Counter())[word]),
            "share_of_label_rows": round(containing[label].get(word, 0) / label_rows[label], _DIGITS),
        })
    words = [item for items in kept.values() for item in items]
    return sorted(words, key=lambda w: (-w["z_synthetic"], w["label"], w["word"]))


def _lengths_by_label(texts: Sequence[Any], labels: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Word counts per text and labels as strings, as aligned arrays."""
    lengths = np.array([len(word_tokens(text)) for text in texts], dtype=np.float64)
    names = np.array([_as_text(label) for label in labels], dtype=object)
    return lengths, names


def _relative_gap(lengths: np.ndarray, names: np.ndarray, label: str) -> tuple[float, float | None]:
    """``|mean(label) - mean(others)| / mean(all)`` and the others' mean (0.0 and None when
    the label or the other labels have no rows, or all texts are empty)."""
    mine, others = lengths[names == label], lengths[names != label]
    overall = lengths.mean() if lengths.size else 0.0
    if mine.size == 0 or others.size == 0 or overall == 0:
        return 0.0, None
    return abs(mine.mean() - others.mean()) / overall, float(others.mean())


def _length_summary(lengths: np.ndarray, names: np.ndarray, label: str) -> tuple[int, float | None, float | None]:
    """Rows, mean and median word count of one label (None when it has no rows)."""
    mine = lengths[names == label]
    if mine.size == 0:
        return 0, None, None
    return int(mine.size), round(float(mine.mean()), _DIGITS), round(float(np.median(mine)), _DIGITS)


def length_by_label(raw_texts: Sequence[Any], raw_labels: Sequence[Any],
                    syn_texts: Sequence[Any], syn_labels: Sequence[Any]) -> dict:
    """Text length (in words) per label, raw against synthetic, and labels whose length gives
    them away.

    A label's relative gap is ``|its mean length - the other labels' mean| / overall mean``
    (the other labels' rows pooled). A label is flagged as a length shortcut when its synthetic
    gap exceeds :data:`LENGTH_GAP_MIN` (0.25) and :data:`LENGTH_GAP_RAW_FACTOR` (2) times its
    raw gap (raw gap 0 when the raw data lacks the label or any other label): the teacher made
    the label longer or shorter than the human data does. With two labels a gap is shared, so
    both are flagged.

    Args:
        raw_texts: The human (seed) texts.
        raw_labels: Their labels.
        syn_texts: The synthetic texts.
        syn_labels: Their labels.

    Returns:
        ``{"by_label": {label: {"raw_rows", "raw_mean", "raw_median", "synthetic_rows",
        "synthetic_mean", "synthetic_median"}}, "flags": [{"label", "synthetic_mean",
        "others_mean", "raw_gap", "synthetic_gap"}]}``, means None for a side without the
        label, floats rounded to 4 places.

    Raises:
        ValueError: When a corpus does not have one label per text.

    Example:
        >>> report = length_by_label(["a b", "c d"], ["x", "y"], ["a b", "c d e f g h"], ["x", "y"])
        >>> [flag["label"] for flag in report["flags"]]
        ['x', 'y']
    """
    _check_aligned(raw_texts, raw_labels, "length_by_label raw")
    _check_aligned(syn_texts, syn_labels, "length_by_label synthetic")
    raw_lengths, raw_names = _lengths_by_label(raw_texts, raw_labels)
    syn_lengths, syn_names = _lengths_by_label(syn_texts, syn_labels)
    by_label, flags = {}, []
    for label in sorted(set(raw_names) | set(syn_names)):
        raw_rows, raw_mean, raw_median = _length_summary(raw_lengths, raw_names, label)
        syn_rows, syn_mean, syn_median = _length_summary(syn_lengths, syn_names, label)
        by_label[label] = {"raw_rows": raw_rows, "raw_mean": raw_mean, "raw_median": raw_median,
                           "synthetic_rows": syn_rows, "synthetic_mean": syn_mean,
                           "synthetic_median": syn_median}
        synthetic_gap, others_mean = _relative_gap(syn_lengths, syn_names, label)
        raw_gap, _ = _relative_gap(raw_lengths, raw_names, label)
        if synthetic_gap > LENGTH_GAP_MIN and synthetic_gap > LENGTH_GAP_RAW_FACTOR * raw_gap:
            flags.append({"label": label, "synthetic_mean": syn_mean,
                          "others_mean": round(others_mean, _DIGITS),
                          "raw_gap": round(raw_gap, _DIGITS),
                          "synthetic_gap": round(synthetic_gap, _DIGITS)})
    return {"by_label": by_label, "flags": flags}


def flag_rows(texts: Sequence[Any], labels: Sequence[Any], words: Sequence[dict]) -> list[list[str]]:
    """For each row, the shortcut words of its own label that it contains.

    Args:
        texts: The rows' texts.
        labels: The rows' labels.
        words: Shortcut items with at least ``label`` and ``word`` (as :func:`shortcut_words`
            returns them).

    Returns:
        One list per row, in the order of ``words``; empty when the row has none.

    Raises:
        ValueError: When ``labels`` does not have one entry per text.

    Example:
        >>> flag_rows(["so delightful"], ["pos"], [{"label": "neg", "word": "delightful"}])
        [[]]
    """
    _check_aligned(texts, labels, "flag_rows")
    by_label: dict[str, list[str]] = defaultdict(list)
    for item in words:
        by_label[_as_text(item["label"])].append(item["word"])
    flagged = []
    for text, label in zip(texts, labels):
        candidates = by_label.get(_as_text(label), [])
        present = set(word_tokens(text)) if candidates else set()
        flagged.append([word for word in candidates if word in present])
    return flagged


def bias_report(raw_texts: Sequence[Any], raw_labels: Sequence[Any],
                syn_texts: Sequence[Any], syn_labels: Sequence[Any], *, z_min: float = 3.0,
                min_count: int = 5, margin: float = 2.0, top_k: int = 20) -> dict:
    """Label shortcuts of a synthetic corpus against its raw data, as a JSON-ready dict.

    Args:
        raw_texts: The human (seed) texts.
        raw_labels: Their labels.
        syn_texts: The synthetic texts.
        syn_labels: Their labels.
        z_min: See :func:`shortcut_words`.
        min_count: See :func:`shortcut_words`.
        margin: See :func:`shortcut_words`.
        top_k: See :func:`shortcut_words`.

    Returns:
        ``{"shortcut_words": [...] (:func:`shortcut_words`), "length": {...}
        (:func:`length_by_label`), "flagged_rows": synthetic rows holding at least one
        shortcut word of their label, "settings": {the thresholds and constants used}}``.

    Raises:
        ValueError: When a corpus does not have one label per text.

    Example:
        >>> raw = ["a good day", "a bad day"] * 30
        >>> syn = ["a delightful good day", "a bad day"] * 30
        >>> bias_report(raw, ["pos", "neg"] * 30, syn, ["pos", "neg"] * 30)["flagged_rows"]
        30
    """
    words = shortcut_words(raw_texts, raw_labels, syn_texts, syn_labels, z_min=z_min,
                           min_count=min_count, margin=margin, top_k=top_k)
    return {
        "shortcut_words": words,
        "length": length_by_label(raw_texts, raw_labels, syn_texts, syn_labels),
        "flagged_rows": sum(1 for found in flag_rows(syn_texts, syn_labels, words) if found),
        "settings": {"z_min": z_min, "min_count": min_count, "margin": margin, "top_k": top_k,
                     "prior_mass_per_token": PRIOR_MASS_PER_TOKEN,
                     "length_gap_min": LENGTH_GAP_MIN,
                     "length_gap_raw_factor": LENGTH_GAP_RAW_FACTOR},
    }
