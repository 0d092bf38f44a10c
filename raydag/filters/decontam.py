"""Decontamination: drop generated rows that share a word n-gram with an evaluation text.

Pure part: :func:`ngrams` and :class:`NgramIndex` (every n-gram of every eval text, kept as an
8-byte digest). Ray Data part: :func:`mark_contaminated` puts the index in the object store
once (its size grows with the eval texts, not with the rows), looks every accepted row up and
marks the matches as dropped in one ``map_batches`` pass, then sums the matches per block for
the summary. No row is added or removed, and nothing per row comes to the driver.

A text with fewer than n words is one gram of all its words (the GPT-3 convention), so a short
eval sentence copied whole is caught; a short eval sentence embedded in a longer text is not
(its words never form an n-gram of that text), which keeps three-word eval texts from
flagging every text that contains those three words.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

from raydag.filters.exact import normalize_text

if TYPE_CHECKING:
    import ray.data

REASON = "contaminated"
STAGE = "decontam"
REQUIRED_COLUMNS = ("text", "_status", "_order")
MAX_EXAMPLES = 5
_WORD = re.compile(r"\w+")  # punctuation separates words and is dropped: "parcel?" = "parcel"


def ngrams(text: str, n: int) -> set[str]:
    """The word n-grams of the normalised text, each the words joined by single spaces.

    Words are the runs of letters and digits of
    :func:`raydag.filters.exact.normalize_text`'s output, so case and punctuation do not count
    ("Where is my parcel?" and "where is my parcel..." share their grams).

    Args:
        text: Any text; it is normalised with :func:`raydag.filters.exact.normalize_text`.
        n: Words per gram, at least 1. A text with fewer words yields one gram of all its
            words; an empty text yields the empty set.

    Returns:
        The set of grams.

    Raises:
        ValueError: If ``n`` is below 1.

    Example:
        >>> sorted(ngrams("Where is my parcel?", 3))
        ['is my parcel', 'where is my']
        >>> ngrams("Refund me", 13)
        {'refund me'}
    """
    return set(_ngram_sequence(text, n))


def _ngram_sequence(text: str, n: int) -> Iterator[str]:
    """The grams of :func:`ngrams` in the order they start in the text (repeats included)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    words = _WORD.findall(normalize_text(text or ""))
    if len(words) < n:
        if words:
            yield " ".join(words)
        return
    for i in range(len(words) - n + 1):
        yield " ".join(words[i : i + n])


def _digest(gram: str) -> bytes:
    return hashlib.blake2b(gram.encode(), digest_size=8).digest()


class NgramIndex:
    """Every word n-gram of a set of evaluation splits, for fast contamination look-ups.

    Each gram is kept as an 8-byte blake2b digest mapped to the first eval text (in split
    order, then index order) that contains it: about 100 bytes per distinct gram, whatever the
    text length. A digest collision (odds ~ grams**2 / 2**64) would report a false match.

    Args:
        eval_texts: Split name -> its texts, e.g. ``{"test": [...], "validation": [...]}``.
        n: Words per gram (13 in GPT-3's decontamination).

    Example:
        >>> index = NgramIndex({"test": ["my parcel never arrived at the depot"]}, n=4)
        >>> index.match("Hi, my parcel never arrived at all")
        ('test', 0, 'my parcel never arrived')
        >>> index.match("my order never arrived") is None
        True
    """

    def __init__(self, eval_texts: Mapping[str, Sequence[str]], n: int) -> None:
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        self.n = n
        self.split_sizes = {name: len(texts) for name, texts in eval_texts.items()}
        self._owners: list[tuple[str, int]] = []
        self._grams: dict[bytes, int] = {}
        for name, texts in eval_texts.items():
            for index, text in enumerate(texts):
                owner = len(self._owners)
                self._owners.append((name, index))
                for gram in _ngram_sequence(text, n):
                    self._grams.setdefault(_digest(gram), owner)

    def __len__(self) -> int:
        """The number of distinct grams indexed."""
        return len(self._grams)

    def match(self, text: str) -> tuple[str, int, str] | None:
        """The first gram of ``text`` (by position) that an eval text also has.

        Args:
            text: The text to check.

        Returns:
            (eval split, index of the eval text in it, the shared gram), or None.
        """
        for gram in _ngram_sequence(text, self.n):
            owner = self._grams.get(_digest(gram))
            if owner is not None:
                split, index = self._owners[owner]
                return split, index, gram
        return None


def mark_contaminated(rows: ray.data.Dataset, *, eval_texts: Mapping[str, Sequence[str]],
                      n: int = 13) -> tuple[ray.data.Dataset, dict[str, Any]]:
    """Drop accepted rows whose text shares a word n-gram with any evaluation text.

    The index is built on the driver (from the eval texts) and shared through the object
    store; the look-ups and the marking run in one parallel pass, and only per-block counts and
    each block's five earliest matches come back for the summary. A match becomes ``_status="dropped"``,
    ``_reason="contaminated"``, ``_stage="decontam"`` and ``contaminated_by`` =
    ``"<split>:<eval index>"``; ``contaminated_by`` is null on all other rows.

    The marked dataset comes back materialized; ``rows`` is executed once.

    Args:
        rows: Rows with ``text``, ``_status`` and ``_order``; only ``accepted`` rows are
            checked and changed.
        eval_texts: Split name -> its texts.
        n: Words per gram.

    Returns:
        The marked dataset (materialized) and a summary: ``method`` ("ngram"), ``n``, ``splits`` (split
        -> size), ``checked`` (accepted rows), ``matched``, ``by_split`` (split -> rows matched)
        and up to five ``examples`` (``text``, ``eval_split``, ``eval_text``, ``gram``), the
        earliest rows first.

    Raises:
        ColumnContractError: If ``rows`` lacks a required column (checked when its schema is
            known without running it).
        ValueError: If ``n`` is below 1.

    Example:
        >>> import pandas as pd, ray
        >>> ds = ray.data.from_pandas(pd.DataFrame({
        ...     "text": ["where is my parcel", "cancel my plan"], "_order": [0, 1],
        ...     "_status": "accepted", "_reason": None, "_stage": "create"}))
        >>> marked, summary = mark_contaminated(ds, eval_texts={"test": ["Where is my parcel?"]})
        >>> summary["matched"], marked.take(1)[0]["contaminated_by"]
        (1, 'test:0')
    """
    import ray
    from ray.data.expressions import col

    # here: raydag.stages imports this package
    from raydag.stages import check_dataset_columns

    check_dataset_columns(STAGE, REQUIRED_COLUMNS, rows)
    index = NgramIndex(eval_texts, n)
    shared = ray.put(index)  # one copy in the object store, read once per worker
    marked = rows.map_batches(_mark_contaminated, fn_kwargs={"index": [shared]},
                              batch_format="pyarrow").materialize()
    hits = marked.filter(expr=col("_stage") == STAGE).select_columns(
        ["_order", "contaminated_by", "text", "_status"])
    blocks = hits.map_batches(_block_summary, fn_kwargs={"index": [shared]}, batch_size=None,
                              batch_format="pandas").take_all()
    by_split = {name: int(sum(b["by_split"].get(name, 0) for b in blocks))
                for name in index.split_sizes}
    first = sorted((e for b in blocks for e in b["examples"]), key=lambda e: e[0])[:MAX_EXAMPLES]
    matched = sum(by_split.values())
    summary = {
        "method": "ngram",
        "n": n,
        "splits": dict(index.split_sizes),
        "checked": marked.filter(expr=col("_status") == "accepted").count() + matched,
        "matched": matched,
        "by_split": by_split,
        "examples": [{"text": text, "eval_split": split,
                      "eval_text": eval_texts[split][position], "gram": gram}
                     for _, text, split, position, gram in first],
    }
    return marked, summary


def _block_summary(batch: pd.DataFrame, index: list) -> pd.DataFrame:
    """One row per block of matches: rows matched by split, and the block's earliest five
    with the gram they share (looked up again: five look-ups)."""
    from raydag.stages import shared_object

    if not len(batch):
        return pd.DataFrame({"by_split": [{}], "examples": [[]]})
    split = batch["contaminated_by"].astype(str).str.rsplit(":", n=1).str[0]
    first = batch.nsmallest(MAX_EXAMPLES, "_order")
    found = shared_object(index[0])
    return pd.DataFrame({"by_split": [split.value_counts().to_dict()],
                         "examples": [[(int(o), t, *found.match(t))
                                       for o, t in zip(first["_order"], first["text"])]]})


def _mark_contaminated(batch, index: list):
    """Ray Data task (Arrow batches): each accepted row's first shared gram looked up, the
    matches marked; ``contaminated_by`` is ``"<split>:<eval index>"`` there, null elsewhere."""
    import numpy as np

    from raydag.stages import set_where, shared_object

    found = shared_object(index[0])
    accepted = batch["_status"].to_numpy(zero_copy_only=False) == "accepted"
    by = [None] * batch.num_rows
    for position, text in enumerate(batch["text"].to_pylist()):
        if accepted[position]:
            match = found.match(text)
            if match:
                by[position] = f"{match[0]}:{match[1]}"
    if "contaminated_by" in batch.column_names:
        batch = batch.drop_columns(["contaminated_by"])
    return set_where(batch, np.array([b is not None for b in by], dtype=bool), _status="dropped",
                     _reason=REASON, _stage=STAGE, contaminated_by=by)
