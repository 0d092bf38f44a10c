"""Decontamination: drop generated rows that share a word n-gram with an evaluation text.

Pure part: :func:`ngrams` and :class:`NgramIndex` (every n-gram of every eval text, kept as an
8-byte digest). Ray Data part: :func:`mark_contaminated` looks every accepted row up in the
index inside Ray Data tasks, brings one small key per accepted row to the driver for the
summary, and marks the matches as dropped. No row is added or removed.

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
_KEY_COLUMNS = ["_order", "contaminated_by", "eval_split", "eval_index", "gram", "text"]


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

    The index is built on the driver and handed to the Ray Data tasks in ``fn_kwargs``; the
    look-ups run in parallel, and only ``_order`` and the match (if any) of each accepted row
    come back for the summary. A match becomes ``_status="dropped"``,
    ``_reason="contaminated"``, ``_stage="decontam"`` and ``contaminated_by`` =
    ``"<split>:<eval index>"``; ``contaminated_by`` is null on all other rows.

    ``rows`` is executed twice (look-up, marking): materialize it first if it is expensive to
    compute. ``_order`` must be unique among accepted rows.

    Args:
        rows: Rows with ``text``, ``_status`` and ``_order``; only ``accepted`` rows are
            checked and changed.
        eval_texts: Split name -> its texts.
        n: Words per gram.

    Returns:
        The marked dataset (lazy) and a summary: ``method`` ("ngram"), ``n``, ``splits`` (split
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
    from raydag.stages import check_dataset_columns  # here: raydag.stages imports this package

    check_dataset_columns(STAGE, REQUIRED_COLUMNS, rows)
    index = NgramIndex(eval_texts, n)
    keys = rows.select_columns(list(REQUIRED_COLUMNS)).map_batches(
        _contamination_keys, fn_kwargs={"index": index}, batch_format="pandas").to_pandas()
    keys = keys.reindex(columns=_KEY_COLUMNS)  # no accepted rows at all: no columns either
    if keys["_order"].duplicated().any():
        raise ValueError("decontamination: _order is not unique among accepted rows")
    hits = keys[keys["contaminated_by"].notna()].sort_values("_order", kind="stable")
    marks = hits.set_index("_order")["contaminated_by"]
    summary = {
        "method": "ngram",
        "n": n,
        "splits": dict(index.split_sizes),
        "checked": len(keys),
        "matched": len(hits),
        "by_split": {name: int((hits["eval_split"] == name).sum())
                     for name in index.split_sizes},
        "examples": [{"text": h.text, "eval_split": h.eval_split,
                      "eval_text": eval_texts[h.eval_split][int(h.eval_index)], "gram": h.gram}
                     for h in hits.head(MAX_EXAMPLES).itertuples()],
    }
    marked = rows.map_batches(_mark_contaminated, fn_kwargs={"marks": marks},
                              batch_format="pandas")
    return marked, summary


def _contamination_keys(batch: pd.DataFrame, index: NgramIndex) -> pd.DataFrame:
    """One row per accepted row: its ``_order`` and match. Only a batch's five earliest matches
    carry their text, which is enough for the summary's five earliest overall."""
    accepted = batch[batch["_status"] == "accepted"]
    found = [index.match(t) for t in accepted["text"]]
    keys = pd.DataFrame({
        "_order": accepted["_order"].to_numpy(dtype="int64"),
        "contaminated_by": pd.array([f"{m[0]}:{m[1]}" if m else None for m in found],
                                    dtype="string"),
        "eval_split": pd.array([m[0] if m else None for m in found], dtype="string"),
        "eval_index": pd.array([m[1] if m else None for m in found], dtype="Int64"),
        "gram": pd.array([m[2] if m else None for m in found], dtype="string"),
        "text": pd.array([None] * len(found), dtype="string"),
    })
    first = keys[keys["contaminated_by"].notna()].nsmallest(MAX_EXAMPLES, "_order").index
    keys.loc[first, "text"] = accepted["text"].to_numpy()[first]
    return keys


def _mark_contaminated(batch: pd.DataFrame, marks: pd.Series) -> pd.DataFrame:
    batch = batch.copy()
    hit = (batch["_status"] == "accepted") & batch["_order"].isin(marks.index)
    batch.loc[hit, "_status"] = "dropped"
    batch.loc[hit, "_reason"] = REASON
    batch.loc[hit, "_stage"] = STAGE
    batch["contaminated_by"] = batch["_order"].map(marks).where(hit).astype("string")
    return batch
