"""Near-duplicate filter: MinHash signatures and LSH (datasketch) over word shingles.

Pure part: :func:`word_shingles`, :func:`minhash_signatures` and :func:`near_duplicate_pairs`
decide which rows repeat an earlier row or a reference row (e.g. the raw examples) closely
enough. Ray Data part: :func:`mark_near_duplicates` makes the same decisions with every step in
Ray Data (LSH bands as a hash shuffle, candidate pairs given their signatures by a broadcast or
a join, one task resolving the confirmed pairs) and marks the later copies as dropped; the driver holds nothing
per row. A dropped row keeps all its columns: only ``_status``, ``_reason``, ``_stage`` and
``near_dup_of`` change.

The similarity is the Jaccard index of the sets of word ``shingle_size``-grams of the
normalised texts, estimated as the fraction of equal signature slots. With 3-word shingles one
word changed in the middle of an L-word text alters 3 of its L - 2 shingles, so the pair's
Jaccard is (L - 5) / (L + 1): 0.71 for 20 words, 0.8 only from 29 words on.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from raydag.filters.exact import word_bytes

if TYPE_CHECKING:
    import ray.data

# datasketch's default since 2.0.0, named so that a later change of default cannot mix schemes.
_SCHEME = "affine32"
# The value of every slot of the signature of an empty set under that scheme.
_EMPTY_SLOT = np.uint32((1 << 32) - 1)
_RAW, _SYNTHETIC = 0, 1  # key kinds in the LSH index; raw matches win over synthetic ones
REASON_RAW = "near_duplicate_raw"
REASON_SYNTHETIC = "near_duplicate_synthetic"
STAGE = "near_dup"
REQUIRED_COLUMNS = ("id", "text", "_status", "_order")
MAX_EXAMPLES = 5
# MinHashLSH's (false positive, false negative) weights when it picks bands and rows. LSH
# candidates are confirmed with the estimated Jaccard, so a false positive costs a comparison
# while a false negative is a duplicate kept: (0.05, 0.95) gives 16 bands of 8 rows at
# threshold 0.8 and 128 permutations, which finds 99.7% of the pairs whose estimate reaches the
# threshold in the benchmark, against 68% with datasketch's default (0.5, 0.5) (9 bands of 13).
LSH_WEIGHTS = (0.05, 0.95)
_SIGNATURE_BATCH_ROWS = 4096
# Paired rows (some 5% of the rows when 2% are near duplicates) up to this size are broadcast
# to the confirming tasks: 256 MB is about 480,000 rows at 128 permutations.
BROADCAST_BYTES = 256 << 20


def word_shingles(text: str, size: int) -> set[bytes]:
    """The word ``size``-grams of the normalised text, UTF-8 encoded.

    Words are the runs of letters and digits of
    :func:`raydag.filters.exact.normalize_text`'s output, so case and punctuation do not count.
    A text with fewer than ``size`` words yields one shingle of all its words, so short texts
    can still match; a text without words yields the empty set.

    Args:
        text: Any text; it is normalised with :func:`raydag.filters.exact.normalize_text`.
        size: Words per shingle, at least 1.

    Returns:
        The set of shingles, each the words joined by single spaces.

    Raises:
        ValueError: If ``size`` is below 1.

    Example:
        >>> sorted(word_shingles("The cat sat on the mat.", 3))
        [b'cat sat on', b'on the mat', b'sat on the', b'the cat sat']
        >>> word_shingles("Hello there", 3)
        {b'hello there'}
    """
    if size < 1:
        raise ValueError(f"shingle size must be at least 1, got {size}")
    words = word_bytes(text)
    if len(words) < size:
        return {b" ".join(words)} if words else set()
    return {b" ".join(words[i : i + size]) for i in range(len(words) - size + 1)}


def minhash_signatures(texts: list[str], *, num_perm: int = 128, shingle_size: int = 3,
                       seed: int = 1) -> np.ndarray:
    """MinHash signatures of the texts' word shingles: ``datasketch.MinHash`` values, computed
    for the whole batch at once.

    The values are those of ``datasketch.MinHash.bulk(shingle sets, num_perm=num_perm,
    seed=seed, scheme="affine32")`` bit for bit: datasketch's SHA-1 shingle hash
    (``sha1_hash32``), its MurmurHash3 pre-mix and its permutations (from ``seed`` alone), so
    equal settings give equal signatures on every machine and in every process. Only the
    arithmetic is batched: every shingle of the batch is permuted in one ``uint32`` array and
    reduced per text with ``np.minimum.reduceat``, instead of one MinHash object per text
    (about 4x fewer microseconds per text; see :mod:`raydag.bench_minhash`). An empty text
    gets the all-``2**32 - 1`` signature of the empty set, which :func:`near_duplicate_pairs`
    never matches. Cost: O(total shingles x num_perm).

    Args:
        texts: The texts to sign.
        num_perm: Signature length (permutations); more is more precise and slower.
        shingle_size: Words per shingle (see :func:`word_shingles`).
        seed: Seed of the permutations; only signatures with the same seed are comparable.

    Returns:
        A ``(len(texts), num_perm)`` uint64 array, one signature per row (the values fit in
        32 bits: datasketch's ``affine32`` scheme).

    Example:
        >>> sigs = minhash_signatures(["a b c d e f", "a b c d e g", ""], num_perm=64)
        >>> sigs.shape, sigs.dtype.name
        ((3, 64), 'uint64')
    """
    signatures = np.full((len(texts), num_perm), _EMPTY_SLOT, dtype=np.uint64)
    if not texts:
        return signatures
    a, b = _permutations(num_perm, seed)
    shingles = [word_shingles(t, shingle_size) for t in texts]
    sizes = np.fromiter((len(s) for s in shingles), dtype=np.int64, count=len(texts))
    signed = np.flatnonzero(sizes)
    # datasketch.hashfunc.sha1_hash32 of every shingle: the digest's first 4 bytes, little-endian
    digests = b"".join(hashlib.sha1(s).digest()[:4] for group in shingles for s in group)
    hashes = _fmix(np.frombuffer(digests, dtype="<u4").astype(np.uint32), 32)
    ends = np.cumsum(sizes[signed])
    starts = ends - sizes[signed]
    first = 0
    while first < len(signed):  # texts whose shingles fit one bounded array (at least one text)
        last = max(first + 1, int(np.searchsorted(
            ends, starts[first] + _PERMUTED_SLOTS // num_perm, side="right")))
        # uint32: the wraparound is the modulo 2**32
        permuted = hashes[starts[first]:ends[last - 1], None] * a + b
        signatures[signed[first:last]] = np.minimum.reduceat(
            permuted, starts[first:last] - starts[first], axis=0)
        first = last
    return signatures


# Shingles x permutations held at once while signing a batch (4 bytes each: 4 MB, reused by
# the allocator; a fresh 200 MB array costs more in page faults than in arithmetic).
_PERMUTED_SLOTS = 1 << 20


def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's affine permutations (``a``, ``b``) for these settings, as uint32."""
    from datasketch import MinHash

    a, b = MinHash(num_perm=num_perm, seed=seed, scheme=_SCHEME).permutations
    return a.astype(np.uint32), b.astype(np.uint32)


def _fmix(hashes: np.ndarray, width: int) -> np.ndarray:
    """datasketch's MurmurHash3 pre-mix of the shingle hashes (``affine32`` applies it once
    before the permutations)."""
    from datasketch.minhash import _fmix as fmix

    return fmix(hashes, width)


def near_duplicate_pairs(signatures: np.ndarray, order, *, threshold: float, num_perm: int,
                         reference: np.ndarray | None = None) -> dict[int, tuple[str, int]]:
    """Which candidate rows repeat a reference row or an earlier kept candidate.

    The rows are visited in ``order`` (ties by position). Each is looked up in a
    ``datasketch.MinHashLSH`` index holding the reference rows and the candidates kept so far;
    an LSH candidate counts only if its estimated Jaccard (the fraction of equal signature
    slots) is at least ``threshold``, so LSH false positives are never dropped. A row with a
    match is dropped and not inserted, so in a chain A ~ B ~ C where C is not close to A, A and
    C are kept. A reference match wins over a synthetic one; among several of a kind, the most
    similar, then the earliest. Rows with the empty signature (no words) are neither dropped nor
    matched: empty texts are the rule filters' business.

    Complexity: O((n + m) * b) band hashes and dict look-ups for n candidates, m reference
    rows and b LSH bands (16 at threshold 0.8 and 128 permutations, see ``LSH_WEIGHTS``), plus
    O(c * num_perm) to confirm the c candidates LSH returns (about n when duplicates are
    rare), and an O(n log n) sort; one thread. Memory: the signatures plus O((n + m) * b) band
    keys, each in a Python set of datasketch's dict storage. Measured: about 80 microseconds
    and 6.5 KB per indexed row (100,000 rows: 8 s and 0.67 GB; 1M rows would need ~7 GB).

    Args:
        signatures: ``(n, num_perm)`` signatures of the candidate rows, from
            :func:`minhash_signatures` (any integer dtype; the values fit in 32 bits).
        order: ``n`` generation orders (``_order``); a smaller order is earlier and wins.
        threshold: Estimated Jaccard at or above which two rows are near duplicates, in (0, 1].
        num_perm: Signature length; must match the signatures' second dimension.
        reference: Optional ``(m, num_perm)`` signatures of rows that always win (the raw
            examples), computed with the same settings.

    Returns:
        For each dropped candidate, its position -> (reason, matched position): reason
        ``"near_duplicate_raw"`` with the index into ``reference``, or
        ``"near_duplicate_synthetic"`` with the position of the kept candidate.

    Raises:
        ValueError: If the shapes disagree with each other or with ``num_perm``, a value does
            not fit in 32 bits, or the threshold is outside (0, 1].

    Example:
        >>> sigs = minhash_signatures(["one two three four five six seven eight nine ten",
        ...                            "one two three four five six seven eight nine ten"])
        >>> near_duplicate_pairs(sigs, [0, 1], threshold=0.8, num_perm=128)
        {1: ('near_duplicate_synthetic', 0)}
    """
    from datasketch import MinHashLSH

    signatures = _as_signatures(signatures, num_perm, "signatures")
    order = np.asarray(order)
    if order.shape != (len(signatures),):
        raise ValueError(f"order has shape {order.shape}, expected ({len(signatures)},)")
    reference = _as_signatures(reference if reference is not None else
                               np.empty((0, num_perm), dtype=np.uint64), num_perm, "reference")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")

    signatures32 = signatures.astype(np.uint32, copy=False)
    reference32 = reference.astype(np.uint32, copy=False)
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=LSH_WEIGHTS)
    for index, signature in enumerate(reference32):
        if not _is_empty(signature):
            lsh.insert((_RAW, index), _sketch(signature), check_duplication=False)
    drops: dict[int, tuple[str, int]] = {}
    for position in np.argsort(order, kind="stable").tolist():
        signature = signatures32[position]
        if _is_empty(signature):
            continue
        sketch = _sketch(signature)
        match = _best_match(signature, lsh.query(sketch), signatures32, reference32, order,
                            threshold)
        if match is None:
            lsh.insert((_SYNTHETIC, position), sketch, check_duplication=False)
        else:
            kind, matched = match
            drops[position] = (REASON_RAW if kind == _RAW else REASON_SYNTHETIC, matched)
    return drops


def _as_signatures(signatures, num_perm: int, name: str) -> np.ndarray:
    signatures = np.asarray(signatures)
    if signatures.ndim != 2 or signatures.shape[1] != num_perm:
        raise ValueError(f"{name} has shape {signatures.shape}, expected (rows, {num_perm})")
    if signatures.size and (signatures.min() < 0 or signatures.max() > _EMPTY_SLOT):
        raise ValueError(f"{name} hold values outside 32 bits: not minhash_signatures output")
    return signatures


def _is_empty(signature: np.ndarray) -> bool:
    return bool((signature == _EMPTY_SLOT).all())


def _sketch(signature: np.ndarray):
    """The LeanMinHash that MinHashLSH indexes; given uint32 values, it keeps them as uint32,
    so the band keys the index stores are half the size of uint64 ones."""
    from datasketch import LeanMinHash

    return LeanMinHash(seed=0, hashvalues=signature, scheme=_SCHEME)


def _best_match(signature: np.ndarray, keys: list[tuple[int, int]], signatures: np.ndarray,
                reference: np.ndarray, order: np.ndarray,
                threshold: float) -> tuple[int, int] | None:
    """The (kind, index) of the LSH candidate to report, or None if none is truly similar."""
    if not keys:
        return None
    others = np.stack([reference[i] if kind == _RAW else signatures[i] for kind, i in keys])
    similarity = (others == signature).mean(axis=1)
    ranked = sorted((kind, -s, i if kind == _RAW else int(order[i]), i)
                    for (kind, i), s in zip(keys, similarity.tolist()) if s >= threshold)
    if not ranked:
        return None
    kind, _, _, index = ranked[0]
    return kind, index


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """The (bands, rows per band) that ``datasketch.MinHashLSH`` picks for these settings with
    ``LSH_WEIGHTS``; band ``j`` is signature slots ``j * rows`` to ``(j + 1) * rows``.

    Example:
        >>> lsh_bands(0.8, 128)
        (16, 8)
    """
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=LSH_WEIGHTS)
    return lsh.b, lsh.r


def band_keys(signatures: np.ndarray, bands: int, rows_per_band: int) -> np.ndarray:
    """One 64-bit key per (row, band): equal bands of equal index give equal keys.

    The key mixes the band's index and its slots (a splitmix64-style hash), so two rows share
    a key when they share that LSH band, as in ``MinHashLSH``'s buckets; a chance collision of
    unequal bands (about 2**-64) only adds a candidate pair, which the Jaccard check confirms
    or not.

    Returns:
        A ``(n, bands)`` uint64 array.
    """
    signatures = np.asarray(signatures, dtype=np.uint64)
    keys = np.empty((len(signatures), bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for band in range(bands):
            h = np.full(len(signatures), _mix(np.uint64(band + 1)), dtype=np.uint64)
            for slot in range(band * rows_per_band, (band + 1) * rows_per_band):
                h = _mix(h ^ signatures[:, slot])
            keys[:, band] = h
    return keys


def _mix(x):
    """splitmix64's finaliser (wrapping uint64 arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def bucket_pairs(keys: np.ndarray, orders: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every pair of rows that share a bucket key, earlier order first.

    Pairs of two reference rows (negative orders) are left out: references never drop each
    other. A pair that shares several bands is returned once per shared band (and, across
    partitions, once per partition that holds one of them); :func:`resolve_near_duplicates`
    counts it once. Cost: O(n log n) plus O(k**2) for a bucket of k rows.

    Args:
        keys: Bucket keys (any dtype numpy can sort), one per row.
        orders: The rows' ``_order`` (references negative), one per row.

    Returns:
        Two int64 arrays ``(a, b)`` with ``a < b`` element-wise.
    """
    keys, orders = np.asarray(keys), np.asarray(orders, dtype=np.int64)
    if len(keys) < 2:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    index = np.lexsort((orders, keys))
    keys, orders = keys[index], orders[index]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    sizes = np.diff(np.r_[starts, len(keys)])
    first, second = [], []
    pairs_of_two = starts[sizes == 2]
    first.append(orders[pairs_of_two])
    second.append(orders[pairs_of_two + 1])
    for start, size in zip(starts[sizes > 2].tolist(), sizes[sizes > 2].tolist()):
        i, j = np.triu_indices(size, 1)
        first.append(orders[start + i])
        second.append(orders[start + j])
    a, b = np.concatenate(first), np.concatenate(second)
    keep = (b >= 0) & (a != b)
    return a[keep], b[keep]


def resolve_near_duplicates(a, b, similarity, *, threshold: float) -> dict[int, int]:
    """The rows to drop, from the candidate pairs and their estimated Jaccard.

    The same decisions as :func:`near_duplicate_pairs`, taken over the confirmed pairs only:
    rows are visited in order; a row is dropped when a pair links it at or above
    ``threshold`` to a reference row (negative order) or to an earlier row that was kept. A
    dropped row matches nothing later, so in a chain A ~ B ~ C where C is not close to A, A
    and C are kept. A reference match wins, then the most similar, then the earliest.
    Memory and time: O(p log p) for p pairs, none per row that has no candidate.

    Args:
        a, b: Orders of the pairs' rows, ``a < b``; duplicates are allowed.
        similarity: Estimated Jaccard of each pair.
        threshold: The near-duplicate threshold.

    Returns:
        Dropped row's order -> the order of the row it repeats (negative: a reference).

    Example:
        >>> resolve_near_duplicates([0, 1, -1], [1, 2, 3], [0.9, 0.9, 0.85], threshold=0.8)
        {1: 0, 3: -1}
    """
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    similarity = np.asarray(similarity, np.float64)
    keep = similarity >= threshold
    a, b, similarity = a[keep], b[keep], similarity[keep]
    # by row, then references first, the most similar, the earliest
    index = np.lexsort((a, -similarity, a >= 0, b))
    a, b = a[index].tolist(), b[index].tolist()
    drops: dict[int, int] = {}
    position = 0
    while position < len(b):
        row = b[position]
        end = position
        while end < len(b) and b[end] == row:
            end += 1
        for k in range(position, end):
            if a[k] < 0 or a[k] not in drops:
                drops[row] = a[k]
                break
        position = end
    return drops


def mark_near_duplicates(rows: ray.data.Dataset, *, reference_texts: list[str] | None = None,
                         reference_ids: list[str] | None = None, threshold: float = 0.8,
                         num_perm: int = 128, shingle_size: int = 3, seed: int = 1,
                         broadcast_bytes: int = BROADCAST_BYTES,
                         ) -> tuple[ray.data.Dataset, dict[str, Any]]:
    """Drop accepted rows that nearly repeat an earlier accepted row or a reference text.

    Rows whose ``id`` is a reference id are the references themselves and are left alone.

    Every step runs in Ray Data; the driver holds the plan and the counts, nothing per row:

    1. LSH buckets: ``map_batches`` signs the accepted rows and the reference texts (these
       get negative orders, so they come first) and emits one row per (row, band) with its
       band key, 16 bytes, hash-shuffled on the key so each bucket is in one block, where its
       pairs are listed (:func:`bucket_pairs`); the signatures are not kept;
    2. signatures of the paired rows: the rows of some pair (a sorted array of their orders,
       made by one task) are signed again, the others skipped;
    3. confirmation: the pairs get the signatures of both rows and are kept when the
       estimated Jaccard reaches ``threshold``. Up to ``broadcast_bytes`` of paired rows, one
       task sorts them into one object that every confirming task reads zero-copy (a
       broadcast join); beyond that, two hash joins (a Ray Data join costs about 5 s on 2
       cores however small it is);
    4. decisions: one Ray task visits the confirmed pairs in order
       (:func:`resolve_near_duplicates`: the decisions of :func:`near_duplicate_pairs`, so the
       same rows are dropped) and puts the marks in the object store;
    5. marking: ``map_batches`` looks each accepted row up in the marks.

    A dropped row gets ``_status="dropped"``, ``_reason`` ``near_duplicate_synthetic`` or
    ``near_duplicate_raw``, ``_stage="near_dup"`` and ``near_dup_of``, the id of the row it
    repeats (a kept row's ``id``, or the reference id); ``near_dup_of`` is null on all other
    rows. No row is added or removed. ``_order`` must be unique among accepted rows.

    ``rows`` is read five times (bands, the candidate count, the paired rows' signatures,
    examples, marking): materialize it first if it is expensive to compute.

    Args:
        rows: Rows with ``id``, ``text``, ``_status`` and ``_order``; only ``accepted`` rows are
            checked and changed.
        reference_texts: Texts that always win (the raw examples); None for none.
        reference_ids: Their ids, recorded in ``near_dup_of``; None for ``raw:<index>``.
        threshold: Estimated Jaccard at or above which two texts are near duplicates.
        num_perm: Signature length (MinHash permutations).
        shingle_size: Words per shingle.
        seed: Seed of the MinHash permutations.
        broadcast_bytes: The largest size of the paired rows' signatures (``id``, ``_order``
            and ``num_perm`` uint32 each) that is broadcast rather than joined.

    Returns:
        The marked dataset (lazy) and a summary: ``checked`` (accepted rows),
        ``near_duplicate_synthetic`` and ``near_duplicate_raw`` (rows dropped for each), the
        settings, and up to five ``examples`` (``text``, ``matched_text``, ``reason``), the
        earliest dropped rows first.

    Raises:
        ColumnContractError: If ``rows`` lacks a required column (checked when its
            schema is known without running it).
        ValueError: If ``reference_ids`` does not have one id per reference text.

    Example:
        >>> import pandas as pd, ray
        >>> text = "the parcel left the depot on monday and should arrive by friday at noon"
        >>> ds = ray.data.from_pandas(pd.DataFrame({
        ...     "id": ["a", "b"], "text": [text, text + " please"], "_order": [0, 1],
        ...     "_status": "accepted", "_reason": None, "_stage": "create"}))
        >>> marked, summary = mark_near_duplicates(ds, threshold=0.7)
        >>> summary["near_duplicate_synthetic"], marked.take(2)[1]["near_dup_of"]
        (1, 'a')
    """
    import ray

    # here: raydag.stages imports this package
    from raydag.stages import (check_dataset_columns, colocate, shuffle_partitions,
                               sorted_orders_task)

    check_dataset_columns(STAGE, REQUIRED_COLUMNS, rows)
    reference_texts = list(reference_texts or [])
    if reference_ids is None:
        reference_ids = [f"raw:{i}" for i in range(len(reference_texts))]
    if len(reference_ids) != len(reference_texts):
        raise ValueError(f"reference_ids has {len(reference_ids)} ids for "
                         f"{len(reference_texts)} reference texts")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    settings = {"num_perm": num_perm, "shingle_size": shingle_size, "seed": seed}
    bands, rows_per_band = lsh_bands(threshold, num_perm)

    # A row that is a reference itself (a raw example a label or judge stage passed on) is
    # not a candidate: it would match its own reference.
    candidates = rows.select_columns(list(REQUIRED_COLUMNS)).filter(
        expr=_is_candidate(reference_ids))
    count = len(reference_texts)
    references = ray.data.from_pandas(pd.DataFrame({
        "_order": np.arange(count, dtype=np.int64) - count, "id": reference_ids,
        "text": reference_texts, "_status": "accepted"})) if count else None

    def signed(fn, **kwargs):
        """``fn`` over the candidates and the references."""
        done = candidates.map_batches(fn, fn_kwargs={**settings, **kwargs},
                                      batch_format="pyarrow", batch_size=_SIGNATURE_BATCH_ROWS)
        if references is None:
            return done
        return done.union(references.map_batches(fn, fn_kwargs={**settings, **kwargs},
                                                 batch_format="pyarrow"))

    # Signatures are not kept: each candidate's band keys go straight into the shuffle, and
    # only the rows of some candidate pair are signed again for the Jaccard check.
    checked = candidates.count()
    banded = signed(_band_rows, bands=bands, rows_per_band=rows_per_band)
    partitions = shuffle_partitions((checked + count) * bands * 16)  # 16 bytes per band row
    pairs = colocate(banded, "_band", partitions).map_batches(
        _pairs_in_buckets, batch_size=None, batch_format="numpy").materialize()
    edge_blocks = []
    if pairs.count():  # a join of a dataset with no rows loses its columns
        # the orders of the rows in some pair, sorted (8 bytes per such row), made by one task
        involved = sorted_orders_task().remote(*pairs.to_arrow_refs(), columns=("a", "b"))
        keys = signed(_signed_rows, involved=[involved]).materialize()
        confirm = {"threshold": threshold, "num_perm": num_perm}
        if keys.size_bytes() <= broadcast_bytes:  # a broadcast join: one sorted copy for all
            table = _paired_rows_task().remote(num_perm, *keys.to_arrow_refs())
            edges = pairs.map_batches(_confirmed_from_table, fn_kwargs={
                "table": [table], **confirm}, batch_format="numpy")
        else:
            for side in ("a", "b"):
                pairs = pairs.join(keys.rename_columns({"_order": side, "id": f"{side}_id",
                                                        "_signature": f"{side}_signature"}),
                                   "inner", partitions, on=(side,))
            edges = pairs.map_batches(_confirmed, fn_kwargs=confirm, batch_format="numpy")
        edge_blocks = edges.to_arrow_refs()
    marks, found = _resolve_task().options(num_returns=2).remote(
        threshold, reference_ids, *edge_blocks)
    found = ray.get(found)

    summary = {
        "checked": checked,
        REASON_SYNTHETIC: found[REASON_SYNTHETIC], REASON_RAW: found[REASON_RAW],
        "threshold": threshold, "num_perm": num_perm, "shingle_size": shingle_size,
        "examples": _examples(rows, found["first"], reference_texts),
    }
    # The marks travel as one object-store reference; each task reads them zero-copy.
    marked = rows.map_batches(_mark_near_duplicates, fn_kwargs={"marks": [marks]},
                              batch_format="pyarrow")
    return marked, summary


def _is_candidate(reference_ids: list[str]):
    """The Ray Data expression of a candidate row: accepted, and not a reference itself."""
    from ray.data.expressions import col

    accepted = col("_status") == "accepted"
    return (accepted & ~col("id").is_in(list(reference_ids))) if reference_ids else accepted


def _signatures(batch, num_perm: int, shingle_size: int, seed: int) -> np.ndarray:
    return minhash_signatures(batch["text"].to_pylist(), num_perm=num_perm,
                              shingle_size=shingle_size, seed=seed)


def _band_rows(batch, *, num_perm: int, shingle_size: int, seed: int, bands: int,
               rows_per_band: int) -> dict[str, np.ndarray]:
    """One row per (candidate, band): ``_band`` (the key) and ``_order``; empty texts have
    none."""
    signatures = _signatures(batch, num_perm, shingle_size, seed)
    nonempty = ~(signatures == _EMPTY_SLOT).all(axis=1)
    keys = band_keys(signatures[nonempty], bands, rows_per_band)
    orders = batch["_order"].to_numpy().astype(np.int64)
    return {"_band": keys.reshape(-1), "_order": np.repeat(orders[nonempty], bands)}


def _signed_rows(batch, *, involved: list, num_perm: int, shingle_size: int, seed: int):
    """``_order``, ``id`` and the signature (``num_perm`` uint32, as bytes) of each candidate
    in some pair (its order is in the sorted array ``involved[0]``)."""
    import pyarrow as pa

    from raydag.stages import orders_in, shared_object

    hit, _ = orders_in(batch["_order"].to_numpy().astype(np.int64), shared_object(involved[0]))
    batch = batch.filter(pa.array(hit))
    signatures = _signatures(batch, num_perm, shingle_size, seed).astype(np.uint32)
    return pa.table({"_order": batch["_order"].cast(pa.int64()),
                     "id": batch["id"].cast(pa.string()),
                     "_signature": pa.array([row.tobytes() for row in signatures],
                                            type=pa.binary())})


def _signatures_of(column, num_perm: int) -> np.ndarray:
    if len(column) == 0:
        return np.empty((0, num_perm), dtype=np.uint32)
    return np.frombuffer(b"".join(column), dtype=np.uint32).reshape(len(column), num_perm)


def _pairs_in_buckets(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    a, b = bucket_pairs(batch["_band"], batch["_order"])
    return {"a": a, "b": b}


def _confirmed(batch: dict[str, np.ndarray], *, threshold: float,
               num_perm: int) -> dict[str, np.ndarray]:
    """The joined pairs whose estimated Jaccard (equal signature slots) reaches the
    threshold."""
    return _kept_pairs(batch["a"], batch["b"], _signatures_of(batch["a_signature"], num_perm),
                       _signatures_of(batch["b_signature"], num_perm), batch["a_id"],
                       batch["b_id"], threshold)


def _kept_pairs(a, b, a_signatures, b_signatures, a_ids, b_ids,
                threshold: float) -> dict[str, np.ndarray]:
    similarity = (a_signatures == b_signatures).mean(axis=1)
    keep = similarity >= threshold
    return {"a": a[keep].astype(np.int64), "b": b[keep].astype(np.int64),
            "similarity": similarity[keep], "a_id": a_ids[keep], "b_id": b_ids[keep]}


def _paired_rows(num_perm: int, *tables) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The paired rows' ``_order`` (sorted), signatures (``(n, num_perm)`` uint32) and ids."""
    import pyarrow as pa

    tables = [t for t in tables if t.num_rows]
    if not tables:
        return np.empty(0, np.int64), np.empty((0, num_perm), np.uint32), np.empty(0, object)
    table = pa.concat_tables(tables).sort_by("_order")
    ids = np.asarray(table["id"].to_pylist(), dtype=object)
    return (table["_order"].to_numpy().astype(np.int64),
            _signatures_of(table["_signature"].to_pylist(), num_perm), ids)


def _paired_rows_task():
    """The Ray task form of :func:`_paired_rows`, made on first use."""
    import ray

    return ray.remote(num_cpus=1)(_paired_rows)


def _confirmed_from_table(batch: dict[str, np.ndarray], *, table: list, threshold: float,
                          num_perm: int) -> dict[str, np.ndarray]:
    """:func:`_confirmed` with both rows of each pair looked up in the broadcast paired rows
    (a binary search each); a pair whose row is missing is left out, as an inner join
    would."""
    from raydag.stages import orders_in, shared_object

    orders, signatures, ids = shared_object(table[0])
    a, b = batch["a"].astype(np.int64), batch["b"].astype(np.int64)
    found_a, at_a = orders_in(a, orders)
    found_b, at_b = orders_in(b, orders)
    both = found_a & found_b
    at_a, at_b = at_a[both], at_b[both]
    return _kept_pairs(a[both], b[both], signatures[at_a], signatures[at_b], ids[at_a],
                       ids[at_b], threshold)


def _resolve_task_fn(threshold: float, reference_ids: list[str], *tables,
                     reasons: tuple[str, str] = (REASON_RAW, REASON_SYNTHETIC)):
    """Ray task: the decisions over every confirmed pair; returns (marks, counts).

    Args:
        threshold: Similarity at or above which a pair counts.
        reference_ids: The references' ids (reference ``k`` of ``m`` has order ``k - m``).
        *tables: Arrow tables of pairs (``a``, ``b``, ``similarity``, ``a_id``).
        reasons: The ``_reason`` of a row dropped for a reference and for an earlier row
            (the MinHash reasons by default; the embedding pass passes its own), also the
            keys of their counts.
    """
    import pyarrow as pa

    reason_raw, reason_synthetic = reasons
    tables = [t for t in tables if t.num_rows]
    if tables:
        edges = pa.concat_tables(tables, promote_options="permissive").to_pandas()
    else:
        edges = pd.DataFrame({"a": [], "b": [], "similarity": [], "a_id": []})
    drops = resolve_near_duplicates(edges["a"], edges["b"], edges["similarity"],
                                    threshold=threshold)
    id_of = dict(zip(edges["a"].astype(np.int64).tolist(), edges["a_id"].tolist()))
    count = len(reference_ids)
    orders = np.array(sorted(drops), dtype=np.int64)
    matched = [drops[o] for o in orders.tolist()]
    # the dropped rows' orders (sorted), reasons and matches, as _mark_near_duplicates reads them
    marks = (orders,
             np.array([reason_raw if m < 0 else reason_synthetic for m in matched], dtype=object),
             np.array([reference_ids[m + count] if m < 0 else id_of[m] for m in matched],
                      dtype=object))
    raw = sum(m < 0 for m in matched)
    first = [(int(o), int(m)) for o, m in zip(orders[:MAX_EXAMPLES].tolist(),
                                              matched[:MAX_EXAMPLES])]
    return marks, {reason_raw: raw, reason_synthetic: len(matched) - raw, "first": first}


def _resolve_task():
    """The Ray task form of :func:`_resolve_task_fn`, made on first use (importing this
    module does not import Ray)."""
    import ray

    return ray.remote(num_cpus=1)(_resolve_task_fn)


def _examples(rows: ray.data.Dataset, first: list[tuple[int, int]],
              reference_texts: list[str]) -> list[dict[str, str]]:
    """The earliest dropped rows with the text they repeat (one small extra read of ``rows``).

    ``first`` holds (dropped order, matched order); a negative matched order is reference
    ``len(reference_texts) + order``."""
    if not first:
        return []
    wanted = np.array(sorted({o for o, _ in first} | {m for _, m in first if m >= 0}), np.int64)
    found = rows.select_columns(["_order", "text", "_status"]).map_batches(
        _rows_with_orders, fn_kwargs={"orders": wanted}, batch_format="pyarrow").to_pandas()
    text_of = dict(zip(found["_order"].astype(int), found["text"]))
    count = len(reference_texts)
    return [{"text": text_of.get(order),
             "matched_text": reference_texts[m + count] if m < 0 else text_of.get(m),
             "reason": REASON_RAW if m < 0 else REASON_SYNTHETIC}
            for order, m in first]


def _rows_with_orders(batch, orders: np.ndarray):
    import pyarrow as pa

    from raydag.stages import orders_in

    keep, _ = orders_in(batch["_order"].to_numpy(), orders)
    keep &= batch["_status"].to_numpy(zero_copy_only=False) == "accepted"
    return batch.select(["_order", "text"]).filter(pa.array(keep))


def _mark_near_duplicates(batch, marks: list):
    from raydag.stages import orders_in, set_where, shared_object

    orders, reasons, of = shared_object(marks[0])
    found, at = orders_in(batch["_order"].to_numpy(), orders)
    hit = found & (batch["_status"].to_numpy(zero_copy_only=False) == "accepted")
    reason, near_dup_of = np.full(len(hit), None, object), np.full(len(hit), None, object)
    reason[hit], near_dup_of[hit] = reasons[at[hit]], of[at[hit]]
    return set_where(batch, hit, _status="dropped", _stage=STAGE, _reason=reason,
                     near_dup_of=near_dup_of)
