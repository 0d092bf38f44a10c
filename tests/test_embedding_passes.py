"""The embedding quality passes in Ray: the tiled all-pairs near-duplicate search takes the
decisions of the greedy rule (:func:`raydag.embed.embedding_near_duplicates`) on planted
vectors spread over many blocks, first as pure functions, then in Ray Data; and
:func:`raydag.quality.apply_quality` with the real MiniLM encoder marks embedding copies of
eval texts, of raw rows and of earlier rows, keeping every row."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from raydag.embed import embedding_near_duplicates, reference_pairs, tile_pairs, tile_plan
from raydag.filters.embedding import REASON_EMBEDDING_RAW, REASON_EMBEDDING_SYNTHETIC
from raydag.filters.near_dup import resolve_near_duplicates

from conftest import QUICKSTART

DIM, ON = 256, 16  # a planted vector is 1/4 on 16 of 256 positions: cosine = shared / 16


def _unit(positions) -> np.ndarray:
    vector = np.zeros(DIM, np.float32)
    vector[list(positions)] = 0.25  # 16 x 1/16 = 1: unit length, every cosine exact
    return vector


def _swap(rng, positions: list[int], count: int) -> list[int]:
    """``positions`` with ``count`` of them moved to positions not in it."""
    out = list(positions)
    free = [p for p in range(DIM) if p not in out]
    for slot, new in zip(rng.choice(len(out), count, replace=False),
                         rng.choice(free, count, replace=False)):
        out[slot] = int(new)
    return out


def planted(seed: int = 0, groups: int = 70):
    """Rows with planted near duplicates (threshold 0.8: 13 of 16 positions shared): random
    chains of variants (some exact copies), references close to some groups, and hand-made
    cases: a chain A ~ B ~ C with C far from A, a row tied between two kept rows, a row tied
    between two references, a row closer to a kept row than to a reference.

    Returns (orders, ids, vectors) of the rows (orders rise in the order rows were made; the
    rows are shuffled), (ids, vectors) of the references, and the hand-made rows' orders and
    references' indices by name."""
    rng = np.random.default_rng(seed)
    rows, references, named = [], [], {}

    def base() -> list[int]:
        return [int(p) for p in rng.choice(DIM, ON, replace=False)]

    def fresh(*taken: list[int]) -> list[int]:
        used = {p for positions in taken for p in positions}
        return [int(p) for p in rng.permutation([p for p in range(DIM) if p not in used])]

    def add(name: str, positions: list[int]) -> list[int]:
        assert len(set(positions)) == ON
        named[name] = len(rows)
        rows.append(positions)
        return positions

    for _ in range(groups):
        current = base()
        for _ in range(int(rng.integers(1, 6))):
            rows.append(current)
            current = _swap(rng, current, int(rng.integers(0, 5)))  # 0 swaps: an exact copy
        if rng.random() < 0.3:
            references.append(_swap(rng, rows[-1], int(rng.integers(1, 5))))
    a = add("chain_a", base())
    b = add("chain_b", a[:13] + fresh(a)[:3])  # 13 shared with a
    add("chain_c", a[:10] + b[13:] + fresh(a, b)[:3])  # 13 with b, 10 with a
    x = add("tie_x", base())
    y = add("tie_y", x[:10] + fresh(x)[:6])  # 10 with x: both kept
    add("tie_z", x[:10] + x[10:13] + y[10:13])  # 13 with x and with y: x is earlier
    r1 = base()
    r2 = r1[:14] + fresh(r1)[:2]
    references += [r1, r2]
    named_references = {"raw_tie_first": len(references) - 2}
    add("raw_tie", r1[:14] + fresh(r1, r2)[:2])  # 14 with each reference: the first wins
    k = add("kept_k", base())
    k2 = add("raw_over_closer", k[:15] + fresh(k)[:1])  # 15 with the kept row k...
    references.append(k[:12] + k2[15:] + fresh(k, k2)[:3])  # ...13 with a reference: it wins
    named_references["raw_over_closer_reference"] = len(references) - 1
    vectors = np.stack([_unit(p) for p in rows])
    orders = np.sort(rng.choice(10 * len(rows), len(rows), replace=False))  # with gaps
    named = {name: int(orders[i]) for name, i in named.items()} | named_references
    ids = np.array([f"row-{o}" for o in orders], dtype=object)
    shuffle = rng.permutation(len(rows))  # blocks do not follow the order
    reference_vectors = np.stack([_unit(p) for p in references])
    return (orders[shuffle], ids[shuffle], vectors[shuffle],
            [f"raw-{i}" for i in range(len(references))], reference_vectors, named)


def greedy_decisions(orders, ids, vectors, reference_ids, reference, threshold):
    """The greedy rule's decisions: dropped row's order -> (reason, id it repeats)."""
    by_order = np.argsort(orders, kind="stable")
    found = embedding_near_duplicates(vectors[by_order], threshold=threshold, reference=reference)
    return {int(orders[by_order[p]]): (reason, reference_ids[m] if reason == REASON_EMBEDDING_RAW
                                       else ids[by_order[m]])
            for p, (reason, m) in found.items()}


def tiled_decisions(orders, ids, vectors, reference_ids, reference, threshold, block_rows):
    """The tiled search and the resolution, as the Ray pass runs them, in one process."""
    blocks = [(orders[s:s + block_rows], vectors[s:s + block_rows], ids[s:s + block_rows])
              for s in range(0, len(orders), block_rows)]
    parts = []
    for i, j in tile_plan(len(blocks), references=len(reference) > 0):
        o, v, d = blocks[i]
        parts.append(reference_pairs(o, v, reference, reference_ids, threshold=threshold)
                     if j < 0 else tile_pairs(o, v, d, None if i == j else blocks[j],
                                              threshold=threshold))
    pairs = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    id_of = dict(zip(pairs["a"].tolist(), pairs["a_id"].tolist()))
    drops = resolve_near_duplicates(pairs["a"], pairs["b"], pairs["similarity"],
                                    threshold=float(np.float32(threshold)))
    return {b: (REASON_EMBEDDING_RAW, reference_ids[a + len(reference_ids)]) if a < 0
            else (REASON_EMBEDDING_SYNTHETIC, id_of[a]) for b, a in drops.items()}


def test_the_planted_cases_are_what_they_claim():
    orders, ids, vectors, reference_ids, reference, named = planted()
    want = greedy_decisions(orders, ids, vectors, reference_ids, reference, 0.8)
    reasons = [reason for reason, _ in want.values()]
    assert reasons.count(REASON_EMBEDDING_RAW) >= 10 and reasons.count(REASON_EMBEDDING_SYNTHETIC) >= 50
    similarity = vectors @ vectors.T
    assert set(np.unique(similarity * 16).tolist()) <= set(range(17))  # every cosine exact

    def row(name: str) -> str:
        return f"row-{named[name]}"

    assert want[named["chain_b"]] == (REASON_EMBEDDING_SYNTHETIC, row("chain_a"))
    assert named["chain_c"] not in want and named["chain_a"] not in want  # the far end is kept
    assert named["tie_x"] not in want and named["tie_y"] not in want
    assert want[named["tie_z"]] == (REASON_EMBEDDING_SYNTHETIC, row("tie_x"))  # the earlier
    assert want[named["raw_tie"]] == (REASON_EMBEDDING_RAW, reference_ids[named["raw_tie_first"]])
    assert want[named["raw_over_closer"]] == (
        REASON_EMBEDDING_RAW, reference_ids[named["raw_over_closer_reference"]])
    assert named["kept_k"] not in want


def test_a_tile_lists_each_close_pair_once_earlier_row_first():
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(90, 8)).astype(np.float32)
    vectors[30:60] = vectors[:30] + rng.normal(scale=0.05, size=(30, 8))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    orders = rng.permutation(90)
    ids = np.array([f"r{o}" for o in orders], dtype=object)
    full = vectors @ vectors.T
    want = {(min(orders[i], orders[j]), max(orders[i], orders[j]))
            for i in range(90) for j in range(i + 1, 90) if full[i, j] >= np.float32(0.9)}
    parts = [tile_pairs(orders[s:s + 20], vectors[s:s + 20], ids[s:s + 20],
                        None if i == j else (orders[t:t + 20], vectors[t:t + 20], ids[t:t + 20]),
                        threshold=0.9)
             for i, j in tile_plan(5, references=False) for s, t in [(20 * i, 20 * j)]]
    got = [(int(a), int(b)) for p in parts for a, b in zip(p["a"], p["b"])]
    assert len(want) >= 30 and sorted(got) == sorted(want)  # each pair once
    a_ids = {(int(a), int(b)): i for p in parts for a, b, i in zip(p["a"], p["b"], p["a_id"])}
    assert all(a_ids[pair] == f"r{pair[0]}" for pair in want)
    assert tile_pairs(orders[:0], vectors[:0], ids[:0], threshold=0.9)["a"].dtype == np.int64


@pytest.mark.parametrize("block_rows", [1, 17, 64, 10_000])
@pytest.mark.parametrize("threshold", [0.8, 0.75])  # 0.75: pairs exactly at the threshold count
def test_tiled_pairs_and_resolution_take_the_greedy_decisions(block_rows, threshold):
    orders, ids, vectors, reference_ids, reference, _ = planted()
    want = greedy_decisions(orders, ids, vectors, reference_ids, reference, threshold)
    got = tiled_decisions(orders, ids, vectors, reference_ids, reference, threshold, block_rows)
    assert len(want) > 60 and got == want
    no_reference = greedy_decisions(orders, ids, vectors, [], reference[:0], threshold)
    assert tiled_decisions(orders, ids, vectors, [], reference[:0], threshold,
                           block_rows) == no_reference


def test_tiled_decisions_on_noisy_float_vectors_equal_the_greedy_ones():
    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(1500, 32)).astype(np.float32)
    copies = rng.choice(1500, 400, replace=False)
    vectors[copies] = vectors[rng.choice(1500, 400)] + rng.normal(scale=0.15, size=(400, 32))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    reference = vectors[rng.choice(1500, 30)] + rng.normal(scale=0.15, size=(30, 32))
    reference = (reference / np.linalg.norm(reference, axis=1, keepdims=True)).astype(np.float32)
    orders = rng.permutation(1500)
    ids = np.array([f"r{o}" for o in orders], dtype=object)
    reference_ids = [f"raw-{i}" for i in range(30)]
    want = greedy_decisions(orders, ids, vectors, reference_ids, reference, 0.95)
    assert len(want) > 100
    assert tiled_decisions(orders, ids, vectors, reference_ids, reference, 0.95, 256) == want


# ---------------------------------------------------------------- in Ray

def _rows_dataset(frame: pd.DataFrame, blocks: int):
    import ray

    size = -(-len(frame) // blocks)
    return ray.data.from_pandas([frame.iloc[i:i + size] for i in range(0, len(frame), size)])


@pytest.mark.slow
def test_embedding_near_duplicates_in_ray_take_the_greedy_decisions(ray_local):
    import ray

    from raydag.filters.embedding import mark_embedding_near_duplicates

    orders, ids, vectors, reference_ids, reference, _ = planted(seed=3)
    count = len(orders)
    # Not candidates: a raw row a stage passed on (its id is a raw id) and two rows the
    # embedding decontamination dropped; plus rows that are not accepted.
    passed_on, contaminated = 5, [7, 11]
    ids = ids.copy()
    ids[passed_on] = reference_ids[0]
    status = np.array(["accepted"] * count, dtype=object)
    status[[2, 3]] = ["dropped", "quarantined"]
    frame = pd.DataFrame({"id": ids, "text": [f"text {o}" for o in orders], "_order": orders,
                          "_status": status, "_reason": "", "_stage": "create",
                          "label": "x"})
    frame.loc[[2, 3], "_reason"] = ["too_short", "judge_unsure"]
    rows = _rows_dataset(frame, blocks=4).materialize()
    accepted = status == "accepted"
    vectors_ds = _rows_dataset(pd.DataFrame({
        "id": ids[accepted], "_order": orders[accepted],
        "_embedding": list(vectors[accepted])}), blocks=3).materialize()
    excluded = ray.put((np.sort(orders[contaminated]).astype(np.int64), None))

    marked, counts = mark_embedding_near_duplicates(
        rows, vectors_ds, reference=reference, reference_ids=reference_ids, threshold=0.8,
        exclude_ids=reference_ids, exclude_orders=excluded, block_rows=13)
    out = marked.to_pandas().set_index("_order").sort_index()

    candidate = accepted.copy()
    candidate[[passed_on, *contaminated]] = False
    want = greedy_decisions(orders[candidate], ids[candidate], vectors[candidate],
                            reference_ids, reference, 0.8)
    dropped = out[out["_stage"] == "near_dup"]
    got = {int(o): (r, of) for o, r, of in zip(dropped.index, dropped["_reason"],
                                              dropped["near_dup_of"])}
    assert len(want) > 60 and got == want
    assert (dropped["_status"] == "dropped").all()
    assert counts == {REASON_EMBEDDING_SYNTHETIC: sum(r == REASON_EMBEDDING_SYNTHETIC
                                                      for r, _ in want.values()),
                      REASON_EMBEDDING_RAW: sum(r == REASON_EMBEDDING_RAW for r, _ in want.values())}
    # rows in = rows out; only the marks changed, and only on the dropped rows
    before = frame.set_index("_order").sort_index()
    assert out.index.tolist() == before.index.tolist()
    for column in ("id", "text", "label", "_reason", "_stage", "_status"):
        unchanged = out.drop(index=dropped.index)[column].tolist()
        assert unchanged == before.drop(index=dropped.index)[column].tolist(), column
    assert out["text"].tolist() == before["text"].tolist()
    assert out.drop(index=dropped.index)["near_dup_of"].isna().all()
    assert out.loc[orders[passed_on], "_status"] == "accepted"


TEXTS = {  # MiniLM cosines measured: A/A2 0.961, B/B2 0.943, P/eval 0.992, Q/raw 0.916
    "a": "The app crashes every time I open the settings page.",
    "b": "I was charged twice for my monthly subscription.",
    "a2": "The app crashes each time I open the settings screen.",
    "b2": "I was billed twice for my monthly subscription.",
    "p": "How can I reset my password in the mobile app?",
    "q": "My package never arrived and nobody answers the phone.",
    "c": "Can I change the delivery address of my order?",
    "a_late": "The app crashes every time I open the settings page.",  # not accepted
    "raw-b": "My package never showed up and no one answers the phone.",  # a raw row passed on
    "b_copy": "I was charged twice for my monthly subscription.",  # MinHash's, not embedding's
}


@pytest.mark.slow
@pytest.mark.parametrize("where", ["here", "actors"])
def test_apply_quality_marks_embedding_copies_with_the_real_encoder(ray_local, tmp_path,
                                                                    monkeypatch, where):
    """Same marks whether the few rows are encoded in this process (the default for small
    frames) or by Ray Data encoder actors (as beyond LOCAL_MODEL_ROWS rows)."""
    import raydag.stages
    from raydag.config import load_job
    from raydag.quality import apply_quality

    if where == "actors":
        monkeypatch.setattr(raydag.stages, "LOCAL_MODEL_ROWS", 0)

    frame = pd.DataFrame({"id": list(TEXTS), "text": list(TEXTS.values()),
                          "_order": range(len(TEXTS)), "_status": "accepted", "_reason": "",
                          "_stage": "create", "label": "billing", "method": "create"})
    frame.loc[frame["id"] == "a_late", ["_status", "_reason"]] = ["dropped", "too_short"]
    raw = pd.DataFrame({"id": ["raw-a", "raw-b"], "label": "billing",
                        "text": ["Where can I download last month's invoice?", TEXTS["raw-b"]]})
    evals = {"test": ["Do you ship to Canada?"],
             "dev": ["Is there a student discount?", "How do I reset my password on the mobile app?"]}
    job = load_job(QUICKSTART, ["quality.near_dup.embedding_threshold=0.9",
                                "quality.decontam.embedding_threshold=0.97"])
    cache: dict = {}
    marked, summary = apply_quality(_rows_dataset(frame, blocks=3), job, raw=raw, evals=evals,
                                    raw_student=None, run_dir=tmp_path, embeddings=cache)
    out = marked.to_pandas().set_index("id")

    assert sorted(out.index) == sorted(TEXTS)  # rows in = rows out
    assert (out.loc[frame["id"], "text"].tolist() == frame["text"].tolist())
    marks = {i: (r["_status"], r["_reason"], r["_stage"]) for i, r in out.iterrows()
             if r["_stage"] != "create"}
    assert marks == {
        "a2": ("dropped", REASON_EMBEDDING_SYNTHETIC, "near_dup"),
        "b2": ("dropped", REASON_EMBEDDING_SYNTHETIC, "near_dup"),
        "q": ("dropped", REASON_EMBEDDING_RAW, "near_dup"),
        "p": ("dropped", "contaminated_embedding", "decontam"),
        "b_copy": ("dropped", "near_duplicate_synthetic", "near_dup"),
    }
    assert out.loc[["a2", "b2", "q", "b_copy"], "near_dup_of"].tolist() == ["a", "b", "raw-b", "b"]
    assert out.loc["p", "contaminated_by"] == "dev:1"
    assert out.loc["a_late", ["_status", "_reason"]].tolist() == ["dropped", "too_short"]
    assert (out.loc[["a", "b", "c", "raw-b"], "_status"] == "accepted").all()

    near, decontam = summary["near_dup"], summary["decontam"]
    assert (near[REASON_EMBEDDING_SYNTHETIC], near[REASON_EMBEDDING_RAW],
            near["embedding_threshold"], near["near_duplicate_synthetic"]) == (2, 1, 0.9, 1)
    assert decontam["embedding_matched"] == 1 and decontam["embedding_threshold"] == 0.97
    (example,) = decontam["embedding_examples"]
    assert {k: example[k] for k in ("text", "eval_split", "eval_text")} == {
        "text": TEXTS["p"], "eval_split": "dev", "eval_text": evals["dev"][1]}
    assert 0.97 <= example["similarity"] <= 1.0
    # the counts reconcile with the rows: every drop of these passes is counted once
    by_reason = out["_reason"].value_counts()
    assert by_reason[REASON_EMBEDDING_SYNTHETIC] == 2 and by_reason[REASON_EMBEDDING_RAW] == 1
    assert by_reason["contaminated_embedding"] == decontam["embedding_matched"]
    # only the small texts (eval and raw) were embedded on the driver, into the run's cache
    assert set(cache) == set(evals["test"] + evals["dev"] + raw["text"].tolist())
