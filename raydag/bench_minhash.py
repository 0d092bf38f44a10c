"""Benchmark of the near-duplicate filter: rows per second through :func:`mark_near_duplicates`.

``python -m raydag.bench_minhash --rows 100000`` builds seeded synthetic rows (8-40 words from a
3,000-word vocabulary drawn with Zipf-like frequencies; 10% are planted copies of an earlier row
with one or two words replaced), runs the whole pass on local Ray (signatures in Ray Data, LSH
on the driver, marking) with the default settings, materializes it, and prints the rows per
second, the recall on the planted copies and finally ``minhash_rows_per_s=<number>``. Building
the rows and starting Ray are not timed.

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


def bench_minhash(rows: int = 100_000, *, seed: int = 0) -> float:
    """Time one near-duplicate pass over ``rows`` synthetic rows and print what it found.

    Args:
        rows: How many rows to deduplicate.
        seed: Seed of the synthetic rows.

    Returns:
        Rows per second of the whole pass (signatures, LSH, marking, materialize).
    """
    import ray

    from raydag.filters.near_dup import REASON_SYNTHETIC, mark_near_duplicates, word_shingles
    from raydag.pipeline import init_ray

    frame, planted = synthetic_rows(rows, seed)
    init_ray()
    # One DataFrame per block (from_pandas's override_num_blocks fails on pandas 3 in Ray 2.60).
    dataset = ray.data.from_pandas([frame.iloc[i : i + ROWS_PER_BLOCK]
                                    for i in range(0, rows, ROWS_PER_BLOCK)])
    started = time.perf_counter()
    marked, summary = mark_near_duplicates(dataset, threshold=THRESHOLD, num_perm=NUM_PERM,
                                           shingle_size=SHINGLE_SIZE)
    marked = marked.materialize()
    seconds = time.perf_counter() - started
    rows_per_s = rows / seconds

    out = marked.select_columns(["id", "_order", "_status", "_reason", "near_dup_of"]).to_pandas()
    out = out.set_index("_order").sort_index()
    assert len(out) == rows, f"{len(out)} rows came out of {rows}"
    dropped = out["_reason"].eq(REASON_SYNTHETIC).fillna(False).astype(bool)
    found = {c for c in planted if dropped[c]}
    to_source = sum(out.at[c, "near_dup_of"] == frame.at[planted[c], "id"] for c in found)

    def jaccard(a: str, b: str) -> float:
        x, y = word_shingles(a, SHINGLE_SIZE), word_shingles(b, SHINGLE_SIZE)
        return len(x & y) / len(x | y)

    eligible = {c for c, s in planted.items()
                if jaccard(frame.at[c, "text"], frame.at[s, "text"]) >= THRESHOLD}
    unplanted = int((dropped & ~out.index.isin(list(planted))).sum())
    print(f"rows={rows} seconds={seconds:.2f} rows_per_s={rows_per_s:.0f} "
          f"(threshold={THRESHOLD} num_perm={NUM_PERM} shingle_size={SHINGLE_SIZE}, "
          f"{dataset.num_blocks()} blocks)")
    print(f"planted={len(planted)} found={len(found)} ({to_source} matched to their source) "
          f"recall={len(found) / max(len(planted), 1):.3f}")
    found_eligible = len(found & eligible)
    print(f"planted with true jaccard>={THRESHOLD}: {len(eligible)} found={found_eligible} "
          f"recall={found_eligible / max(len(eligible), 1):.3f}")
    print(f"dropped rows that are not planted copies: {unplanted}; "
          f"summary checked={summary['checked']} synthetic={summary[REASON_SYNTHETIC]}")
    print(f"minhash_rows_per_s={rows_per_s:.1f}")
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
