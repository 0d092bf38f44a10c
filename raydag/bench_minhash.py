"""Benchmark of the near-duplicate filter: rows per second through :func:`mark_near_duplicates`.

``python -m raydag.bench_minhash --rows 100000`` builds seeded synthetic rows (8-40 words from a
3,000-word vocabulary drawn with Zipf-like frequencies; 10% are planted copies of an earlier row
with one or two words replaced), runs the whole pass on local Ray (every step in Ray Data: see
:func:`raydag.filters.near_dup.mark_near_duplicates`) with the default settings, materializes
it, and prints the rows per second, the recall on the planted copies and finally
``minhash_rows_per_s=<number> driver_peak_rss_mb=<number>``. The rows are made in Ray tasks,
blocks of 5,000 with the planted copies inside their block; making them and starting Ray are not
timed.

Recall is printed twice: over all planted copies, and over those whose true shingle Jaccard
with their source reaches the threshold, the only ones the filter is meant to find (one word
replaced in the middle of an L-word text gives (L - 5) / (L + 1), below 0.8 under 29 words).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

VOCABULARY_SIZE = 3000
MIN_WORDS, MAX_WORDS = 8, 40
PLANTED_FRACTION = 0.10
ROWS_PER_BLOCK = 5000  # like the pipeline's Parquet shards: many blocks, so tasks run in parallel
THRESHOLD, NUM_PERM, SHINGLE_SIZE = 0.8, 128, 3


def synthetic_rows(rows: int, seed: int) -> tuple[pd.DataFrame, dict[int, int]]:
    """Seeded chain-output rows, some of them planted near copies of earlier rows.

    Args:
        rows: How many rows.
        seed: Seed of everything random here.

    Returns:
        The rows (``id``, ``text``, ``_order``, ``_status``, ``_reason``, ``_stage``) and the
        planted copies as copy position -> source position (sources are never copies).
    """
    rng = np.random.default_rng(seed)
    vocabulary = _vocabulary(rng, VOCABULARY_SIZE)
    weights = 1.0 / np.arange(1, VOCABULARY_SIZE + 1)
    weights /= weights.sum()
    lengths = rng.integers(MIN_WORDS, MAX_WORDS + 1, size=rows)
    word_ids = rng.choice(VOCABULARY_SIZE, size=int(lengths.sum()), p=weights)
    sentences = np.split(word_ids, np.cumsum(lengths)[:-1])
    copies = np.sort(rng.choice(np.arange(1, rows), size=int(rows * PLANTED_FRACTION),
                                replace=False)) if rows > 1 else np.empty(0, int)
    is_copy = np.zeros(rows, bool)
    is_copy[copies] = True
    originals = np.flatnonzero(~is_copy)
    planted = {}
    for position in copies.tolist():
        source = int(originals[rng.integers(np.searchsorted(originals, position))])
        sentence = sentences[source].copy()
        changed = rng.choice(len(sentence), size=int(rng.integers(1, 3)), replace=False)
        sentence[changed] = (sentence[changed] + rng.integers(1, VOCABULARY_SIZE,
                                                               size=len(changed))) % VOCABULARY_SIZE
        sentences[position] = sentence
        planted[position] = source
    texts = [" ".join(vocabulary[i] for i in s) for s in sentences]
    frame = pd.DataFrame({"id": [f"row-{i}" for i in range(rows)], "text": texts,
                          "_order": np.arange(rows, dtype=np.int64), "_status": "accepted",
                          "_reason": None, "_stage": "create"})
    return frame, planted


def _vocabulary(rng: np.random.Generator, size: int) -> list[str]:
    syllables = [c + v for c in "bdfghklmnprstvz" for v in "aeiou"]
    words: dict[str, None] = {}
    while len(words) < size:
        words["".join(rng.choice(syllables, size=int(rng.integers(1, 4))))] = None
    return list(words)


def _block(batch: dict[str, np.ndarray], *, seed: int) -> pd.DataFrame:
    """Ray Data task: the rows of one block (``batch["id"]`` holds the block's index), with
    each planted copy's source order (``_source``, -1 for none) and whether its true
    shingle Jaccard with the source reaches the threshold (``_eligible``)."""
    from raydag.filters.near_dup import word_shingles

    block = int(batch["id"][0])
    frame, planted = synthetic_rows(ROWS_PER_BLOCK, seed * 1_000_003 + block)
    start = block * ROWS_PER_BLOCK
    frame["_order"] += start
    frame["id"] = [f"row-{start + i}" for i in range(len(frame))]
    source = np.full(len(frame), -1, dtype=np.int64)
    eligible = np.zeros(len(frame), dtype=bool)
    texts = frame["text"].tolist()
    for copy, original in planted.items():
        source[copy] = start + original
        x, y = word_shingles(texts[copy], SHINGLE_SIZE), word_shingles(texts[original], SHINGLE_SIZE)
        eligible[copy] = len(x & y) / len(x | y) >= THRESHOLD
    frame["_source"], frame["_eligible"] = source, eligible
    return frame


def _scores(batch: pd.DataFrame) -> pd.DataFrame:
    """Per block: planted copies found, found to their source, false drops."""
    from raydag.filters.near_dup import REASON_SYNTHETIC

    dropped = batch["_reason"].eq(REASON_SYNTHETIC).fillna(False).astype(bool)
    planted = batch["_source"] >= 0
    to_source = batch["near_dup_of"].astype(object) == batch["_source"].map(lambda o: f"row-{o}")
    return pd.DataFrame({name: [int(value)] for name, value in {
        "planted": planted.sum(), "found": (dropped & planted).sum(),
        "to_source": (dropped & planted & to_source).sum(),
        "eligible": batch["_eligible"].sum(), "found_eligible": (dropped & batch["_eligible"]).sum(),
        "unplanted": (dropped & ~planted).sum()}.items()})


def driver_peak_rss_mb() -> float:
    """Peak resident memory of this process (the driver), in MB."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def bench_minhash(rows: int = 100_000, *, seed: int = 0) -> float:
    """Time one near-duplicate pass over ``rows`` synthetic rows and print what it found.

    The rows are made in Ray Data tasks, in blocks of ``ROWS_PER_BLOCK`` with the planted
    copies inside their block, so the driver holds none of them: its peak RSS
    (``driver_peak_rss_mb``) is the pass's own.

    Args:
        rows: How many rows to deduplicate (rounded up to whole blocks).
        seed: Seed of the synthetic rows.

    Returns:
        Rows per second of the whole pass (signatures, LSH, marking, materialize).
    """
    import ray

    from raydag.filters.near_dup import REASON_SYNTHETIC, mark_near_duplicates
    from raydag.resources import init_ray

    init_ray()
    blocks = -(-rows // ROWS_PER_BLOCK)
    dataset = ray.data.range(blocks, override_num_blocks=blocks).map_batches(
        _block, fn_kwargs={"seed": seed}, batch_size=1, batch_format="numpy").materialize()
    rows = dataset.count()
    started = time.perf_counter()
    marked, summary = mark_near_duplicates(dataset, threshold=THRESHOLD, num_perm=NUM_PERM,
                                           shingle_size=SHINGLE_SIZE)
    marked = marked.materialize()
    seconds = time.perf_counter() - started
    rows_per_s = rows / seconds
    peak = driver_peak_rss_mb()

    assert marked.count() == rows, "rows were lost"
    score = marked.map_batches(_scores, batch_size=None, batch_format="pandas").sum(
        ["planted", "found", "to_source", "eligible", "found_eligible", "unplanted"])
    print(f"rows={rows} seconds={seconds:.2f} rows_per_s={rows_per_s:.0f} "
          f"(threshold={THRESHOLD} num_perm={NUM_PERM} shingle_size={SHINGLE_SIZE}, "
          f"{blocks} blocks)")
    print(f"planted={score['sum(planted)']} found={score['sum(found)']} "
          f"({score['sum(to_source)']} matched to their source) "
          f"recall={score['sum(found)'] / max(score['sum(planted)'], 1):.3f}")
    print(f"planted with true jaccard>={THRESHOLD}: {score['sum(eligible)']} "
          f"found={score['sum(found_eligible)']} "
          f"recall={score['sum(found_eligible)'] / max(score['sum(eligible)'], 1):.3f}")
    print(f"dropped rows that are not planted copies: {score['sum(unplanted)']}; "
          f"summary checked={summary['checked']} synthetic={summary[REASON_SYNTHETIC]}")
    print(f"minhash_rows_per_s={rows_per_s:.1f} driver_peak_rss_mb={peak:.0f}")
    return rows_per_s


def main(argv: list[str] | None = None) -> float:
    """Command line: ``python -m raydag.bench_minhash [--rows N] [--seed S]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows to deduplicate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic rows")
    args = parser.parse_args(argv)
    return bench_minhash(args.rows, seed=args.seed)


if __name__ == "__main__":
    main()
