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
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from raydag.filters.exact import WORD, normalize_text, word_bytes

if TYPE_CHECKING:
    import ray.data

REASON = "contaminated"
STAGE = "decontam"
REQUIRED_COLUMNS = ("text", "_status", "_order")
MAX_EXAMPLES = 5


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
    words = WORD.findall(normalize_text(text or ""))
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
        self._eval_texts = [text for texts in eval_texts.values() for text in texts]
        self._keys: np.ndarray | None = None  # gram keys of the eval texts, built per process

    def __getstate__(self) -> dict:
        # the keys hash words with this process's str hash: each process builds its own
        return {**self.__dict__, "_keys": None}

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

    def may_match(self, texts: Sequence[str]) -> np.ndarray:
        """Which ``texts`` may share a gram with an eval text (bool per text): a screen with
        no false negatives, for a batch at once; :meth:`match` settles the candidates.

        Each word becomes its 64-bit ``hash``, each gram (of ``n`` words, or a short text's
        one gram) a weighted sum of its words' hashes, computed for every gram of the batch
        with array operations; a text is a candidate when one of its gram keys is an eval
        gram's. Equal grams have equal keys, so no match is missed; a key shared by different
        grams (odds ~ 2**-64 per pair) only makes a candidate that :meth:`match` turns down.
        """
        if self._keys is None:
            keys, _ = _gram_keys(self._eval_texts, self.n)
            self._keys = np.unique(keys)
        keys, owner = _gram_keys(texts, self.n)
        hit = np.zeros(len(texts), dtype=bool)
        if len(keys) and len(self._keys):
            at = np.minimum(np.searchsorted(self._keys, keys), len(self._keys) - 1)
            hit[owner[self._keys[at] == keys]] = True
        return hit


# Fixed weights of a gram key's word positions, and one offset per gram length (the lengths
# of short texts' grams); odd, so that no weight erases a word's bits.
_WEIGHTS = np.random.default_rng(1729).integers(0, 2**63, size=(2, 4096), dtype=np.uint64) * 2 + 1


def _gram_keys(texts: Sequence[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """A uint64 key per gram of :func:`_ngram_sequence` of each text, and the text each came
    from (its position in ``texts``); words hashed with this process's ``hash``."""
    if n > _WEIGHTS.shape[1]:
        raise ValueError(f"n must be at most {_WEIGHTS.shape[1]}, got {n}")
    words: list[bytes] = []
    lengths = np.zeros(len(texts), dtype=np.int64)
    for position, text in enumerate(texts):
        found = word_bytes(text)
        lengths[position] = len(found)
        words.extend(found)
    values = np.fromiter(map(hash, words), dtype=np.int64, count=len(words)).view(np.uint64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(texts) else lengths
    padded = np.concatenate([values, np.zeros(n, dtype=np.uint64)])
    window = np.zeros(len(values), dtype=np.uint64)
    short = np.flatnonzero((lengths > 0) & (lengths < n))
    keys, owners = [], []
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as a hash should
        for width in range(1, n + 1):  # window[i] = the key of the `width` words from i
            window += padded[width - 1:width - 1 + len(values)] * _WEIGHTS[0, width - 1]
            ended = short[lengths[short] == width]
            if len(ended):
                keys.append(window[starts[ended]] + _WEIGHTS[1, width - 1])
                owners.append(ended)
        full = np.flatnonzero(lengths >= n)
        if len(full):
            grams = lengths[full] - n + 1  # grams per text
            owner = np.repeat(full, grams)
            first = np.repeat(starts[full] - np.concatenate([[0], np.cumsum(grams)[:-1]]), grams)
            keys.append(window[first + np.arange(len(owner))] + _WEIGHTS[1, n - 1])
            owners.append(owner)
    if not keys:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    return np.concatenate(keys), np.concatenate(owners)


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
    hits = marked.select_columns(["_order", "contaminated_by", "text", "_status", "_stage"]
                                 ).filter(expr=col("_stage") == STAGE)
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
        "checked": marked.select_columns(["_status"]).filter(
            expr=col("_status") == "accepted").count() + matched,
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
    """Ray Data task (Arrow batches): each accepted row's first shared gram looked up (the
    candidates of :meth:`NgramIndex.may_match`), the matches marked; ``contaminated_by`` is
    ``"<split>:<eval index>"`` there, null elsewhere."""
    from raydag.stages import set_where, shared_object

    found = shared_object(index[0])
    accepted = np.flatnonzero(batch["_status"].to_numpy(zero_copy_only=False) == "accepted")
    texts = batch["text"].take(accepted).to_pylist()
    by = [None] * batch.num_rows
    for position in np.flatnonzero(found.may_match(texts)):  # the screen, then the exact look-up
        match = found.match(texts[position])
        if match:
            by[int(accepted[position])] = f"{match[0]}:{match[1]}"
    if "contaminated_by" in batch.column_names:
        batch = batch.drop_columns(["contaminated_by"])
    return set_where(batch, np.array([b is not None for b in by], dtype=bool), _status="dropped",
                     _reason=REASON, _stage=STAGE, contaminated_by=by)
