"""Near-duplicate (MinHash LSH) and n-gram decontamination filters: pure parts, then Ray Data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from raydag.filters.decontam import NgramIndex, mark_contaminated, ngrams
from raydag.filters.exact import normalize_text
from raydag.bench_minhash import synthetic_rows
from raydag.filters.near_dup import (
    BROADCAST_BYTES,
    REASON_RAW,
    REASON_SYNTHETIC,
    band_keys,
    bucket_pairs,
    lsh_bands,
    mark_near_duplicates,
    minhash_signatures,
    near_duplicate_pairs,
    resolve_near_duplicates,
    word_shingles,
)

WORDS = [f"{stem}{i}" for i in range(40) for stem in ("ka", "lo", "mi", "nu", "re")]  # 200


def sentence(start: int, length: int) -> str:
    """``length`` distinct words from WORDS, starting at ``start`` (so no shingle repeats)."""
    return " ".join(WORDS[start : start + length])


def replace_word(text: str, position: int, word: str = "zzzz") -> str:
    words = text.split()
    words[position] = word
    return " ".join(words)


# ---------------------------------------------------------------- shingles and n-grams

def test_word_shingles_are_normalised_word_ngrams():
    assert word_shingles("The  CAT sat, on the mat!", 3) == {
        b"the cat sat", b"cat sat on", b"sat on the", b"on the mat"}
    assert word_shingles("the cat -- sat on (the) mat", 3) == word_shingles(
        "The cat sat on the mat", 3)
    assert word_shingles("Hello there.", 3) == {b"hello there"}  # fewer words: one shingle
    assert word_shingles("one two three", 3) == {b"one two three"}
    assert word_shingles("", 3) == set()
    assert word_shingles("  ?!  ", 3) == set()  # nothing left after normalising
    with pytest.raises(ValueError, match="at least 1"):
        word_shingles("a b", 0)


def test_ngrams_edge_cases():
    assert ngrams("Where is my parcel?", 2) == {"where is", "is my", "my parcel"}
    assert ngrams("Refund me", 13) == {"refund me"}  # short text: one gram of all its words
    assert ngrams("a b a b a", 2) == {"a b", "b a"}
    assert ngrams("Where, is my... parcel?!", 4) == {"where is my parcel"}  # punctuation ignored
    assert ngrams("", 13) == set()
    assert ngrams(" ... ", 13) == set()
    with pytest.raises(ValueError, match="at least 1"):
        ngrams("a b", 0)


def test_one_middle_word_changed_in_20_words_has_jaccard_15_over_21():
    """The arithmetic the module docstring states: 3 of 18 shingles change."""
    a = sentence(0, 20)
    x, y = word_shingles(a, 3), word_shingles(replace_word(a, 10), 3)
    assert len(x & y) / len(x | y) == pytest.approx(15 / 21)


# ---------------------------------------------------------------- signatures

def test_signatures_are_datasketch_minhashes_and_deterministic():
    from datasketch import MinHash

    texts = [sentence(0, 20), sentence(5, 9), "", "Hi"]
    sigs = minhash_signatures(texts, num_perm=64, seed=3)
    assert sigs.shape == (4, 64) and sigs.dtype == np.uint64
    np.testing.assert_array_equal(sigs, minhash_signatures(texts, num_perm=64, seed=3))
    assert not np.array_equal(sigs, minhash_signatures(texts, num_perm=64, seed=4))
    direct = MinHash(num_perm=64, seed=3)
    direct.update_batch(word_shingles(texts[0], 3))
    np.testing.assert_array_equal(sigs[0], direct.hashvalues.astype(np.uint64))
    assert minhash_signatures([], num_perm=32).shape == (0, 32)


def test_batched_signatures_equal_datasketch_bulk_bit_for_bit(monkeypatch):
    """The batch arithmetic (one array of every shingle, reduced per text) gives what one
    datasketch MinHash per text gives, also across the bounded-memory chunks."""
    from datasketch import MinHash

    import raydag.filters.near_dup as near_dup

    texts = synthetic_rows(500, 0)[0]["text"].tolist() + ["", "!!", "Ünïcödé straße ﬁne", "a b"]
    for num_perm, size, seed in ((128, 3, 1), (64, 5, 3), (32, 1, 9)):
        bulk = MinHash.bulk((word_shingles(t, size) for t in texts), num_perm=num_perm,
                            seed=seed, scheme="affine32")
        np.testing.assert_array_equal(
            minhash_signatures(texts, num_perm=num_perm, shingle_size=size, seed=seed),
            np.stack([m.hashvalues for m in bulk]).astype(np.uint64))
    monkeypatch.setattr(near_dup, "_PERMUTED_SLOTS", 128 * 7)  # chunks of 7 shingles
    bulk = MinHash.bulk((word_shingles(t, 3) for t in texts), num_perm=128, seed=1,
                        scheme="affine32")
    np.testing.assert_array_equal(minhash_signatures(texts),
                                  np.stack([m.hashvalues for m in bulk]).astype(np.uint64))


# ---------------------------------------------------------------- near_duplicate_pairs

def test_one_word_changed_is_a_near_duplicate_and_an_unrelated_text_is_not():
    base = sentence(0, 20)
    near = replace_word(base, 19)  # last word: 1 of 18 shingles changes, Jaccard 17/19
    unrelated = sentence(20, 20)
    sigs = minhash_signatures([base, near, unrelated])
    drops = near_duplicate_pairs(sigs, [0, 1, 2], threshold=0.7, num_perm=128)
    assert drops == {1: (REASON_SYNTHETIC, 0)}


def test_earliest_order_wins_whatever_the_position():
    text = sentence(3, 25)
    sigs = minhash_signatures([text, sentence(30, 12), text + " again"])
    drops = near_duplicate_pairs(sigs, [7, 1, 2], threshold=0.8, num_perm=128)
    assert drops == {0: (REASON_SYNTHETIC, 2)}  # position 2 (order 2) is earlier than order 7


def test_reference_matches_are_raw_and_name_the_reference_index():
    text = sentence(0, 30)
    reference = minhash_signatures([sentence(31, 10), text])
    sigs = minhash_signatures([text, replace_word(text, 29), sentence(60, 15)])
    drops = near_duplicate_pairs(sigs, [0, 1, 2], threshold=0.8, num_perm=128,
                                 reference=reference)
    assert drops == {0: (REASON_RAW, 1), 1: (REASON_RAW, 1)}


def _random_signatures(rows: int, num_perm: int = 128, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**31, size=(rows, num_perm), dtype=np.uint64)


def test_a_dropped_row_is_not_indexed_so_a_chain_keeps_its_far_end():
    a, noise = _random_signatures(2)
    b = a.copy()
    b[:26] = noise[:26]  # A~B: 102/128 = 0.80 equal slots
    c = b.copy()
    c[-26:] = noise[-26:]  # B~C: 0.80, A~C: 76/128 = 0.59
    drops = near_duplicate_pairs(np.stack([a, b, c]), [0, 1, 2], threshold=0.7, num_perm=128)
    assert drops == {1: (REASON_SYNTHETIC, 0)}


def test_a_raw_match_beats_an_equally_close_earlier_synthetic_one():
    raw, x, noise = _random_signatures(3)
    x = raw.copy()
    x[:40] = noise[:40]  # X~R: 88/128 = 0.69, kept
    y = raw.copy()
    y[:20] = x[:20]  # Y~R: 108/128 = 0.84 and Y~X: 108/128 = 0.84
    drops = near_duplicate_pairs(np.stack([x, y]), [0, 1], threshold=0.75, num_perm=128,
                                 reference=raw[None, :])
    assert drops == {1: (REASON_RAW, 0)}


def test_lsh_candidates_below_the_threshold_are_not_dropped():
    a, b = _random_signatures(2)
    b[:64] = a[:64]  # every band in the first half collides, but only half the slots agree
    assert near_duplicate_pairs(np.stack([a, b]), [0, 1], threshold=0.8, num_perm=128) == {}
    assert near_duplicate_pairs(np.stack([a, b]), [0, 1], threshold=0.5, num_perm=128) == {
        1: (REASON_SYNTHETIC, 0)}


def test_empty_texts_are_neither_dropped_nor_matched():
    sigs = minhash_signatures(["", "", "  !  "])
    assert near_duplicate_pairs(sigs, [0, 1, 2], threshold=0.8, num_perm=128) == {}


def _planted(rows: int, seed: int):
    """Benchmark rows (10% planted copies) plus chains A ~ B ~ C and copies of references,
    in a shuffled order; returns (signatures, orders, reference signatures)."""
    frame, _ = synthetic_rows(rows, seed)
    texts = frame["text"].tolist()
    rng = np.random.default_rng(seed)
    for i in rng.choice(len(texts), size=rows // 20, replace=False).tolist():
        words = texts[i].split()
        for step in range(2):  # each step changes one more word: a chain
            words[int(rng.integers(len(words)))] = f"chain{step}"
            texts.append(" ".join(words))
    references = [texts[i] + " ok" for i in rng.choice(rows, size=rows // 50, replace=False)]
    texts += ["", ""]  # empty texts match nothing
    orders = rng.permutation(len(texts)) * 3  # not positions, not contiguous
    return (minhash_signatures(texts), orders,
            minhash_signatures(references + [""]))


def _decisions_by_buckets(signatures, orders, reference, threshold):
    """The distributed pass's steps, on one machine."""
    count = len(reference)
    every = np.concatenate([reference, signatures])
    order = np.concatenate([np.arange(count) - count, orders])
    nonempty = ~(every == 2**32 - 1).all(axis=1)
    bands, rows_per_band = lsh_bands(threshold, every.shape[1])
    keys = band_keys(every[nonempty], bands, rows_per_band)
    a, b = bucket_pairs(keys.reshape(-1), np.repeat(order[nonempty], bands))
    position = {o: i for i, o in enumerate(order.tolist())}
    pa = np.array([position[x] for x in a.tolist()], dtype=int)
    pb = np.array([position[x] for x in b.tolist()], dtype=int)
    similarity = (every[pa] == every[pb]).mean(axis=1) if len(pa) else np.empty(0)
    return resolve_near_duplicates(a, b, similarity, threshold=threshold)


@pytest.mark.parametrize("threshold", [0.8, 0.6])
def test_bucket_pairs_and_resolution_drop_the_rows_the_lsh_index_drops(threshold):
    signatures, orders, reference = _planted(3000, seed=threshold == 0.8)
    expected = near_duplicate_pairs(signatures, orders, threshold=threshold, num_perm=128,
                                    reference=reference)
    count = len(reference)
    expected = {int(orders[p]): (m - count if reason == REASON_RAW else int(orders[m]))
                for p, (reason, m) in expected.items()}
    got = _decisions_by_buckets(signatures, orders, reference, threshold)
    assert len(expected) > 150 and sum(m < 0 for m in expected.values()) >= 20
    assert got == expected


def test_bucket_pairs_lists_each_bucket_once_and_never_pairs_two_references():
    keys = np.array([7, 7, 7, 3, 3, 9, 5, 5], dtype=np.uint64)
    orders = np.array([4, -1, 2, -2, -3, 0, 8, 1])
    a, b = bucket_pairs(keys, orders)
    assert sorted(zip(a.tolist(), b.tolist())) == [(-1, 2), (-1, 4), (1, 8), (2, 4)]
    assert bucket_pairs(keys[:1], orders[:1])[0].size == 0


def test_resolution_keeps_a_chain_end_and_prefers_references_then_similarity():
    # 1 ~ 2 ~ 3: 2 is dropped (matches 1), so 3 only matches a dropped row and is kept.
    assert resolve_near_duplicates([1, 2], [2, 3], [0.9, 0.9], threshold=0.8) == {2: 1}
    # a reference beats a closer synthetic row; the most similar of two, then the earliest
    assert resolve_near_duplicates([-1, 0], [5, 5], [0.81, 0.99], threshold=0.8) == {5: -1}
    assert resolve_near_duplicates([0, 1, 2], [5, 5, 5], [0.85, 0.95, 0.95],
                                   threshold=0.8) == {5: 1}
    # below the threshold, duplicates of a pair: counted once
    assert resolve_near_duplicates([0, 0, 0], [1, 1, 2], [0.9, 0.9, 0.7],
                                   threshold=0.8) == {1: 0}
    assert band_keys(np.zeros((2, 8), np.uint32), 2, 4).tolist()[0] == band_keys(
        np.zeros((1, 8), np.uint32), 2, 4).tolist()[0]


def test_shapes_are_checked():
    sigs = minhash_signatures(["a b c d"], num_perm=64)
    with pytest.raises(ValueError, match="expected"):
        near_duplicate_pairs(sigs, [0], threshold=0.8, num_perm=128)
    with pytest.raises(ValueError, match="order"):
        near_duplicate_pairs(sigs, [0, 1], threshold=0.8, num_perm=64)
    with pytest.raises(ValueError, match="reference"):
        near_duplicate_pairs(sigs, [0], threshold=0.8, num_perm=64, reference=np.zeros((1, 8)))
    with pytest.raises(ValueError, match="32 bits"):
        near_duplicate_pairs(sigs + np.uint64(2**32), [0], threshold=0.8, num_perm=64)
    with pytest.raises(ValueError, match="threshold"):
        near_duplicate_pairs(sigs, [0], threshold=0.0, num_perm=64)


# ---------------------------------------------------------------- n-gram index

EVAL_LONG = sentence(0, 20)
EVAL_SHORT = "Is my refund on its way?"


def test_a_13_gram_copy_inside_a_longer_text_is_caught():
    index = NgramIndex({"test": [sentence(25, 15), EVAL_LONG]}, n=13)
    copied = " ".join(EVAL_LONG.split()[3:16])  # 13 consecutive words
    text = f"Dear team, {copied.upper()} - thanks a lot for your help"
    assert index.match(text) == ("test", 1, copied)


def test_a_whole_short_eval_sentence_copied_is_caught():
    index = NgramIndex({"test": [EVAL_LONG], "validation": ["other words", EVAL_SHORT]}, n=13)
    assert index.match("is my REFUND on its way") == ("validation", 1, "is my refund on its way")
    assert index.match("Is my refund on its way yet?") is None  # not the whole sentence


def test_twelve_shared_words_are_not_a_13_gram_but_are_an_8_gram():
    shared = EVAL_LONG.split()[4:16]  # 12 consecutive words of the eval text
    text = "please note " + " ".join(shared) + " kind regards from us"
    assert NgramIndex({"test": [EVAL_LONG]}, n=13).match(text) is None
    split, index, gram = NgramIndex({"test": [EVAL_LONG]}, n=8).match(text)
    assert (split, index, gram) == ("test", 0, " ".join(shared[:8]))  # the first shared gram


def test_index_stores_digests_and_reports_the_first_eval_text():
    index = NgramIndex({"a": [sentence(0, 5)], "b": [sentence(0, 5), sentence(2, 5)]}, n=3)
    assert len(index) == 5  # a: 3 grams; b[0]: the same 3; b[1]: 1 of those and 2 new
    assert index.match(sentence(2, 3)) == ("a", 0, sentence(2, 3))
    assert index.match(sentence(4, 3)) == ("b", 1, sentence(4, 3))
    assert index.split_sizes == {"a": 1, "b": 2}
    assert all(isinstance(k, bytes) and len(k) == 8 for k in index._grams)


def test_the_batch_screen_keeps_every_text_the_index_matches():
    import pickle
    import random

    from raydag.filters.exact import WORD, word_bytes

    rng = random.Random(0)
    words = ["refund", "parcel", "Día", "naïve", "straße", "ok", "x_y", "42", "½", "日本"]

    def text(k):
        return " ".join(rng.choice(words) + rng.choice(["", ",", "!", "?!", "-", "_"]) for _ in range(k))
    evals = {"test": [text(rng.randint(1, 20)) for _ in range(40)], "dev": [EVAL_SHORT, EVAL_LONG]}
    rows = [text(rng.randint(0, 25)) for _ in range(3000)] + [
        "is my REFUND on its way", EVAL_LONG.upper(), "Dear team, " + EVAL_LONG + " thanks", ""]
    for row in rows[:500]:  # the screen's fast word split finds findall's words
        assert word_bytes(row) == [w.encode() for w in WORD.findall(normalize_text(row))]
    for n in (1, 3, 13):
        index = pickle.loads(pickle.dumps(NgramIndex(evals, n)))  # as a worker gets it
        exact = np.array([index.match(row) is not None for row in rows])
        screened = index.may_match(rows)
        # the same texts: a candidate the look-up turns down needs a 64-bit key collision
        assert exact.sum() > 3 and (screened == exact).all()


# ---------------------------------------------------------------- Ray Data glue

@pytest.fixture(scope="module")
def ray_up():
    from raydag.resources import init_ray

    return init_ray()


def _dataset(rows: list[dict], blocks: int = 3):
    import ray

    frame = pd.DataFrame([{"_reason": None, "_stage": "create", **row} for row in rows])
    size = -(-len(frame) // blocks)
    return ray.data.from_pandas([frame.iloc[i : i + size] for i in range(0, len(frame), size)])


def _by_id(dataset) -> pd.DataFrame:
    return dataset.to_pandas().set_index("id").sort_index()


# the paired rows' signatures reach the Jaccard check broadcast (small) or by two joins (large)
CONFIRMATION = pytest.mark.parametrize("broadcast_bytes", [BROADCAST_BYTES, 0],
                                       ids=["broadcast", "joins"])


@pytest.mark.slow
@CONFIRMATION
def test_mark_near_duplicates_marks_copies_and_keeps_every_row(ray_up, broadcast_bytes):
    a, b, c, d = sentence(0, 25), sentence(25, 10), sentence(40, 30), sentence(80, 22)
    raw = ["nothing like the others here", c]
    rows = [
        {"id": "a", "text": a, "_order": 0, "_status": "accepted"},
        {"id": "b", "text": b, "_order": 1, "_status": "accepted"},
        {"id": "a2", "text": replace_word(a, 24), "_order": 2, "_status": "accepted"},
        {"id": "c2", "text": c + " thanks", "_order": 3, "_status": "accepted"},
        {"id": "a3", "text": a, "_order": 4, "_status": "dropped", "_reason": "too_short",
         "_stage": "create"},
        {"id": "a4", "text": a, "_order": 5, "_status": "quarantined",
         "_reason": "judge_unsure", "_stage": "judge"},
        {"id": "d_late", "text": d.upper(), "_order": 9, "_status": "accepted"},
        {"id": "d", "text": d, "_order": 6, "_status": "accepted"},
        {"id": "e", "text": "", "_order": 7, "_status": "accepted"},
    ]
    marked, summary = mark_near_duplicates(_dataset(rows), reference_texts=raw,
                                           reference_ids=["raw-1", "raw-2"], threshold=0.8,
                                           num_perm=128, shingle_size=3, seed=1,
                                           broadcast_bytes=broadcast_bytes)
    out = _by_id(marked)

    assert sorted(out.index) == sorted(r["id"] for r in rows)  # rows in == rows out
    dropped = out[out["_stage"] == "near_dup"]
    assert dict(zip(dropped.index, dropped["_reason"])) == {
        "a2": REASON_SYNTHETIC, "c2": REASON_RAW, "d_late": REASON_SYNTHETIC}
    assert (dropped["_status"] == "dropped").all()
    assert dict(zip(dropped.index, dropped["near_dup_of"])) == {
        "a2": "a", "c2": "raw-2", "d_late": "d"}
    others = out.drop(index=dropped.index)
    assert others["near_dup_of"].isna().all()
    assert out.loc["a3", ["_status", "_reason", "_stage"]].tolist() == [
        "dropped", "too_short", "create"]
    assert out.loc["a4", ["_status", "_reason", "_stage"]].tolist() == [
        "quarantined", "judge_unsure", "judge"]
    assert (out.loc[["a", "b", "d", "e"], "_status"] == "accepted").all()

    assert {k: summary[k] for k in ("checked", REASON_SYNTHETIC, REASON_RAW, "threshold",
                                     "num_perm", "shingle_size")} == {
        "checked": 7, REASON_SYNTHETIC: 2, REASON_RAW: 1, "threshold": 0.8, "num_perm": 128,
        "shingle_size": 3}
    assert summary["examples"] == [  # earliest dropped rows first
        {"text": replace_word(a, 24), "matched_text": a, "reason": REASON_SYNTHETIC},
        {"text": c + " thanks", "matched_text": c, "reason": REASON_RAW},
        {"text": d.upper(), "matched_text": d, "reason": REASON_SYNTHETIC},
    ]


@pytest.mark.slow
def test_mark_near_duplicates_without_reference_names_raw_rows_by_index(ray_up):
    text = sentence(0, 20)
    rows = [{"id": "x", "text": text + " ok", "_order": 0, "_status": "accepted"},
            {"id": "y", "text": sentence(20, 20), "_order": 1, "_status": "accepted"},
            {"id": "z", "text": text, "_order": 2, "_status": "dropped"}]  # a block of its own
    marked, summary = mark_near_duplicates(_dataset(rows, blocks=2), reference_texts=[text])
    out = _by_id(marked)
    assert out.loc["x", "near_dup_of"] == "raw:0" and pd.isna(out.loc["y", "near_dup_of"])
    assert (summary[REASON_RAW], summary[REASON_SYNTHETIC], summary["checked"]) == (1, 0, 2)

    nothing_accepted = _dataset([rows[2]], blocks=1)
    marked, summary = mark_near_duplicates(nothing_accepted, reference_texts=[text])
    assert len(_by_id(marked)) == 1 and summary["checked"] == 0 and summary["examples"] == []
    with pytest.raises(ValueError, match="reference_ids"):
        mark_near_duplicates(_dataset(rows, blocks=1), reference_texts=[text],
                             reference_ids=["a", "b"])


@pytest.mark.slow
@CONFIRMATION
def test_mark_near_duplicates_on_ray_drops_the_rows_the_lsh_index_drops(ray_up, broadcast_bytes):
    import ray

    frame, _ = synthetic_rows(4000, seed=3)
    frame = frame.sample(frac=1.0, random_state=0)  # orders out of block order
    raw = frame["text"].head(40).map(lambda t: t + " again").tolist()
    dataset = ray.data.from_pandas([frame.iloc[i : i + 700] for i in range(0, len(frame), 700)])
    marked, summary = mark_near_duplicates(dataset, reference_texts=raw, threshold=0.8,
                                           broadcast_bytes=broadcast_bytes)
    out = marked.to_pandas().set_index("_order")

    expected = near_duplicate_pairs(minhash_signatures(frame["text"].tolist()),
                                    frame["_order"].to_numpy(), threshold=0.8, num_perm=128,
                                    reference=minhash_signatures(raw))
    orders = frame["_order"].to_numpy()
    want = {int(orders[p]): reason for p, (reason, _) in expected.items()}
    got = out[out["_stage"] == "near_dup"]["_reason"].to_dict()
    assert len(want) > 100 and got == want
    assert len(out) == len(frame)
    assert summary[REASON_RAW] + summary[REASON_SYNTHETIC] == len(want)
    assert summary["checked"] == len(frame)


@pytest.mark.slow
def test_a_raw_row_passed_on_by_a_stage_is_not_its_own_near_duplicate(ray_up):
    # A judge or label stage over raw rows keeps their ids: they are the references.
    text = sentence(0, 20)
    rows = [{"id": "raw-7", "text": text, "_order": 0, "_status": "accepted"},
            {"id": "copy", "text": text + " ok", "_order": 1, "_status": "accepted"}]
    marked, summary = mark_near_duplicates(_dataset(rows, blocks=1), reference_texts=[text],
                                           reference_ids=["raw-7"])
    out = _by_id(marked)
    assert out.loc["raw-7", "_status"] == "accepted" and pd.isna(out.loc["raw-7", "near_dup_of"])
    assert out.loc["copy", "_reason"] == REASON_RAW and out.loc["copy", "near_dup_of"] == "raw-7"
    assert summary["checked"] == 1


@pytest.mark.slow
def test_mark_contaminated_drops_rows_sharing_a_gram_and_keeps_every_row(ray_up):
    eval_texts = {"test": [sentence(30, 8), EVAL_LONG], "validation": [EVAL_SHORT]}
    embedded = "Hello! " + " ".join(EVAL_LONG.split()[2:15]) + " and so on and so forth"
    rows = [
        {"id": "clean", "text": sentence(20, 18), "_order": 0, "_status": "accepted"},
        {"id": "embedded", "text": embedded, "_order": 1, "_status": "accepted"},
        {"id": "short", "text": "is my refund on its way", "_order": 2, "_status": "accepted"},
        {"id": "twelve", "text": "so " + " ".join(EVAL_LONG.split()[:12]) + " right",
         "_order": 3, "_status": "accepted"},
        {"id": "was_dropped", "text": EVAL_LONG, "_order": 4, "_status": "dropped",
         "_reason": "too_long", "_stage": "create"},
        {"id": "exact", "text": EVAL_LONG, "_order": 5, "_status": "accepted"},
    ]
    marked, summary = mark_contaminated(_dataset(rows), eval_texts=eval_texts, n=13)
    out = _by_id(marked)

    assert sorted(out.index) == sorted(r["id"] for r in rows)
    hit = out[out["_stage"] == "decontam"]
    assert dict(zip(hit.index, hit["contaminated_by"])) == {
        "embedded": "test:1", "short": "validation:0", "exact": "test:1"}
    assert (hit["_status"] == "dropped").all() and (hit["_reason"] == "contaminated").all()
    assert out.drop(index=hit.index)["contaminated_by"].isna().all()
    assert out.loc["was_dropped", ["_status", "_reason"]].tolist() == ["dropped", "too_long"]
    assert (out.loc[["clean", "twelve"], "_status"] == "accepted").all()

    assert {k: v for k, v in summary.items() if k != "examples"} == {
        "method": "ngram", "n": 13, "splits": {"test": 2, "validation": 1}, "checked": 5,
        "matched": 3, "by_split": {"test": 2, "validation": 1}}
    assert summary["examples"] == [
        {"text": embedded, "eval_split": "test", "eval_text": EVAL_LONG,
         "gram": " ".join(EVAL_LONG.split()[2:15])},
        {"text": "is my refund on its way", "eval_split": "validation",
         "eval_text": EVAL_SHORT, "gram": "is my refund on its way"},
        {"text": EVAL_LONG, "eval_split": "test", "eval_text": EVAL_LONG,
         "gram": " ".join(EVAL_LONG.split()[:13])},
    ]

    marked, summary = mark_contaminated(_dataset([rows[4]], blocks=1), eval_texts=eval_texts)
    assert len(_by_id(marked)) == 1
    assert (summary["checked"], summary["matched"], summary["examples"]) == (0, 0, [])


@pytest.mark.slow
def test_missing_columns_fail_before_any_work(ray_up):
    import ray

    from raydag.errors import ColumnContractError

    rows = ray.data.from_pandas(pd.DataFrame({"text": ["a b c"], "_status": ["accepted"]}))
    with pytest.raises(ColumnContractError, match=r"near_dup.*\['id', '_order'\]"):
        mark_near_duplicates(rows)
    with pytest.raises(ColumnContractError, match=r"decontam.*\['_order'\]"):
        mark_contaminated(rows, eval_texts={"test": ["a b c"]})
