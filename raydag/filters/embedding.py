"""Embedding passes of the quality step: embedding decontamination and exact embedding
near-duplicates, in Ray Data.

The accepted rows are embedded by encoder actors (:func:`embed_accepted`; the student encoder,
:class:`raydag.embed.TextEncoder`) and their vectors stay in the object store.
:func:`mark_embedding_contaminated` drops rows too close to an evaluation text;
:func:`mark_embedding_near_duplicates` drops rows too close to a raw row or to an earlier kept
row, with the decisions of the greedy rule (:func:`raydag.embed.embedding_near_duplicates`)
found by a tiled all-pairs search. A dropped row keeps its columns: only ``_status``,
``_reason``, ``_stage`` and ``contaminated_by`` or ``near_dup_of`` change. The driver holds the
plan, counts and a few examples.
"""

from __future__ import annotations

import numpy as np

# Rows of one block of the all-pairs embedding near-duplicate search: a tile multiplies two
# blocks, a 4096 x 4096 float32 matrix (64 MB), about 0.3 s on one core at 384 dimensions.
EMBEDDING_BLOCK_ROWS = 4096
# At most this many tasks share the tiles (a 1,000,000-row search has some 30,000 tiles).
MAX_TILE_TASKS = 2000
REASON_EMBEDDING_RAW = "embedding_duplicate_raw"
REASON_EMBEDDING_SYNTHETIC = "embedding_duplicate_synthetic"
REASON_CONTAMINATED_EMBEDDING = "contaminated_embedding"


def embed_accepted(rows, model: str, *, exclude_ids: list[str] | None = None):
    """The embeddings of the accepted rows, computed in Ray Data and kept in the object store.

    Encoder actors (:class:`raydag.embed.TextEncoder`; one per GPU on a cluster with GPUs,
    else one CPU actor with this machine's cores, see
    :func:`raydag.resources.model_actor_options`) embed the accepted rows' texts in batches
    of 64; the text is dropped after encoding. Nothing passes through the driver, unless
    there are at most :data:`raydag.stages.LOCAL_MODEL_ROWS` rows: those are encoded here
    (see :func:`raydag.stages.map_with_model`).

    Args:
        rows: Dataset of rows with ``id``, ``text``, ``_status`` and ``_order``.
        model: Model reference of the encoder.
        exclude_ids: Ids of rows not to embed (the raw rows, for near-duplicates alone).

    Returns:
        A materialized dataset of ``id``, ``_order`` and ``_embedding`` (a fixed-size float32
        tensor column, L2-normalised), one row per embedded row.

    Raises:
        ColumnContractError: If ``rows`` lacks one of those columns (when its schema is known
            without running it).
    """
    import os

    import ray
    from ray.data.expressions import col

    from raydag.embed import TextEncoder
    from raydag.filters.near_dup import REQUIRED_COLUMNS, _is_candidate
    from raydag.resources import model_actor_options
    from raydag.stages import LOCAL_MODEL_ROWS, check_dataset_columns, map_with_model

    check_dataset_columns("embedding passes", REQUIRED_COLUMNS, rows)
    accepted = _is_candidate(exclude_ids) if exclude_ids else col("_status") == "accepted"
    # Materialised first: an encoder actor that holds a CPU while the filter task upstream of
    # it waits for one deadlocks a small cluster (measured: a judge replica up beside a job on
    # 2 CPUs left the filter pending forever).
    wanted = rows.filter(expr=accepted).select_columns(["id", "text", "_order"]).materialize()
    if wanted.count() <= LOCAL_MODEL_ROWS:  # a few rows: this process's encoder, no actor
        frame = map_with_model(wanted.to_pandas(), TextEncoder, {"model": model, "keep_text": False})
        return ray.data.from_pandas(frame).materialize()
    options = model_actor_options(ray.cluster_resources().get("GPU", 0.0),
                                  len(os.sched_getaffinity(0)))
    return wanted.map_batches(
        TextEncoder, fn_constructor_kwargs={"model": model, "keep_text": False}, batch_size=64,
        batch_format="pandas", **options).materialize()


def mark_embedding_contaminated(rows, vectors, eval_vectors, evals: dict[str, list[str]], *,
                                threshold: float, examples: int):
    """Drop accepted rows whose embedding is at least ``threshold`` cosine-similar to an
    evaluation text, in Ray Data.

    A ``map_batches`` over the rows' vectors finds each row's most similar evaluation text
    (:func:`raydag.embed.max_similarity`, the eval vectors read from the object store) and
    emits only the hits; one Ray task sorts them into the marks (per hit: its order and
    ``split:index``), which the marking ``map_batches`` reads from the object store. A hit gets
    ``_status="dropped"``, ``_reason="contaminated_embedding"``, ``_stage="decontam"`` and
    ``contaminated_by``. The driver gets the count and the first ``examples`` hits.

    Args:
        rows: Dataset of all rows (``_order``, ``_status``, ``text``).
        vectors: The accepted rows' embeddings (see :func:`embed_accepted`).
        eval_vectors: Object-store reference to the evaluation texts' embeddings, in the
            order of ``evals`` (split by split).
        evals: Evaluation texts by split.
        threshold: The cosine similarity that marks a copy.
        examples: Hits listed in the summary, the earliest rows first.

    Returns:
        The marked dataset (lazy), the count of hits, the examples (``text``, ``eval_split``,
        ``eval_text``, ``similarity`` rounded to 4) and a reference to the marks (their sorted
        orders first), so later passes can skip these rows.
    """
    import ray

    splits = [(name, len(texts)) for name, texts in evals.items()]
    hits = vectors.map_batches(_eval_hits, fn_kwargs={"eval_vectors": [eval_vectors],
                                                      "threshold": threshold},
                               batch_format="numpy").materialize()
    marks, found = _contamination_task().options(num_returns=2).remote(
        splits, examples, *hits.to_arrow_refs())
    found = ray.get(found)
    text_of = _texts_of(rows, [order for order, *_ in found["first"]])
    listed = [{"text": text_of.get(order), "eval_split": split, "eval_text": evals[split][index],
               "similarity": round(similarity, 4)}
              for order, split, index, similarity in found["first"]]
    marked = rows.map_batches(_mark_contaminated_embedding, fn_kwargs={"marks": [marks]},
                              batch_format="pyarrow")
    return marked, found["matched"], listed, marks


def _eval_hits(batch: dict[str, np.ndarray], eval_vectors: list,
               threshold: float) -> dict[str, np.ndarray]:
    """Ray Data task: the rows of a batch at least ``threshold`` cosine-similar to an eval
    text: ``_order``, ``eval_index`` (flat, over the splits in order), ``similarity``."""
    from raydag.embed import max_similarity
    from raydag.stages import shared_object

    best, where = max_similarity(np.asarray(batch["_embedding"], np.float32),
                                 shared_object(eval_vectors[0]))
    hit = best >= threshold
    return {"_order": batch["_order"][hit].astype(np.int64), "eval_index": where[hit],
            "similarity": best[hit]}


def _contamination_marks(splits: list[tuple[str, int]], examples: int, *tables):
    """Ray task: the hits of :func:`_eval_hits` as marks (sorted orders, ``split:index``) and
    a small summary (``matched``, the ``first`` hits: order, split, index, similarity)."""
    import pyarrow as pa

    tables = [t for t in tables if t.num_rows]
    if tables:
        hits = pa.concat_tables(tables).sort_by("_order")
        orders = hits["_order"].to_numpy().astype(np.int64)
        flat = hits["eval_index"].to_numpy().astype(np.int64)
        similarity = hits["similarity"].to_numpy().astype(np.float64)
    else:
        orders, flat, similarity = np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0)
    ends = np.cumsum([size for _, size in splits])
    split = np.searchsorted(ends, flat, side="right")
    index = flat - (ends[split] - np.array([size for _, size in splits])[split])
    names = [splits[s][0] for s in split.tolist()]
    contaminated_by = np.array([f"{n}:{i}" for n, i in zip(names, index.tolist())], dtype=object)
    first = [(int(o), n, int(i), float(s)) for o, n, i, s in
             zip(orders[:examples].tolist(), names, index.tolist(), similarity.tolist())]
    return (orders, contaminated_by), {"matched": len(orders), "first": first}


def _contamination_task():
    """The Ray task form of :func:`_contamination_marks`, made on first use."""
    import ray

    return ray.remote(num_cpus=1)(_contamination_marks)


def _texts_of(rows, orders: list[int]) -> dict[int, str]:
    """The texts of a few accepted rows by order (one small read of ``rows``)."""
    from raydag.filters.near_dup import _rows_with_orders

    if not orders:
        return {}
    found = rows.select_columns(["_order", "text", "_status"]).map_batches(
        _rows_with_orders, fn_kwargs={"orders": np.array(sorted(set(orders)), np.int64)},
        batch_format="pyarrow").to_pandas()
    return dict(zip(found["_order"].astype(int).tolist(), found["text"]))


def _mark_contaminated_embedding(batch, marks: list):
    from raydag.stages import orders_in, set_where, shared_object

    orders, of = shared_object(marks[0])
    found, at = orders_in(batch["_order"].to_numpy(), orders)
    hit = found & (batch["_status"].to_numpy(zero_copy_only=False) == "accepted")
    contaminated_by = np.full(len(hit), None, object)
    contaminated_by[hit] = of[at[hit]]
    return set_where(batch, hit, _status="dropped", _reason=REASON_CONTAMINATED_EMBEDDING,
                     _stage="decontam", contaminated_by=contaminated_by)


def mark_embedding_near_duplicates(rows, vectors, *, reference: np.ndarray,
                                   reference_ids: list[str], threshold: float,
                                   exclude_ids: list[str] | None = None, exclude_orders=None,
                                   block_rows: int = EMBEDDING_BLOCK_ROWS):
    """Drop accepted rows whose embedding is at least ``threshold`` cosine-similar to a
    reference row or to an earlier kept row: exact, in Ray, with the decisions of
    :func:`raydag.embed.embedding_near_duplicates` (the greedy rule: rows visited by
    ``_order``, a row linked to a reference or to an earlier kept row is dropped; a reference
    wins, then the most similar, then the earliest).

    1. The candidates' vectors are cut into blocks of ``block_rows`` rows (``repartition``),
       kept in the object store; the list of block references and the reference vectors go
       into the object store once.
    2. A Ray Data dataset of tiles (:func:`raydag.embed.tile_plan`: each pair of blocks once,
       each block with itself and with the references) runs in ``map_batches``: each tile
       reads its two blocks and emits the pairs at or above the threshold
       (:func:`raydag.embed.tile_pairs`, :func:`raydag.embed.reference_pairs`).
    3. One Ray task visits the pairs in order
       (:func:`raydag.filters.near_dup.resolve_near_duplicates`) and puts the marks in the
       object store; ``map_batches`` marks the rows from there.

    Cost: exact all pairs, n(n-1)/2 dot products for n candidates plus n per reference row,
    spread over Ray tasks: about 0.3 s of one core per 4096 x 4096 tile at 384 dimensions
    (measured: 60,000 rows in 44 s on 2 cores shared with other work), four times that per
    doubling of rows. It suits up to about 100,000 rows on a CPU machine and a cluster of
    many cores beyond (the tiles are NumPy products on CPUs); MinHash
    (:mod:`raydag.filters.near_dup`) is the near-duplicate pass that scales. Memory: two
    blocks and their similarity matrix per task (64 MB at 4096 rows), the pairs above the
    threshold in the deciding task (many near-identical rows make them quadratic in their
    number); the driver holds the tile plan (O(blocks**2) small integers) and the counts.

    Args:
        rows: Dataset of all rows (``_order``, ``_status``); only accepted rows change.
        vectors: The accepted rows' embeddings (``id``, ``_order``, ``_embedding``; see
            :func:`embed_accepted`).
        reference: The reference rows' embeddings (the raw examples), ``(m, dim)``; m may be 0.
        reference_ids: Their ids, recorded in ``near_dup_of``.
        threshold: The cosine similarity at which two rows are near duplicates.
        exclude_ids: Ids of rows that are not candidates (the raw rows a stage passed on).
        exclude_orders: Object-store reference whose first item is a sorted array of orders
            that are not candidates (the rows dropped by embedding decontamination), or None.
        block_rows: Rows per block of the search.

    Returns:
        The marked dataset (lazy): a dropped row gets ``_status="dropped"``, ``_reason``
        ``embedding_duplicate_raw`` or ``embedding_duplicate_synthetic``,
        ``_stage="near_dup"`` and ``near_dup_of`` (the reference id or the kept row's id);
        and the count per reason.
    """
    import ray
    from ray.data.expressions import col

    from raydag.embed import tile_plan
    from raydag.filters.near_dup import _mark_near_duplicates, _resolve_task

    candidates = vectors
    if exclude_ids:
        candidates = candidates.filter(expr=~col("id").is_in(list(exclude_ids)))
    if exclude_orders is not None:
        candidates = candidates.map_batches(_orders_not_in, fn_kwargs={"orders": [exclude_orders]},
                                            batch_format="pyarrow")
    candidates = candidates.repartition(target_num_rows_per_block=block_rows).materialize()
    edges = []
    if candidates.count():
        blocks = candidates.to_arrow_refs()
        tiles = tile_plan(len(blocks), references=len(reference) > 0)
        plan = ray.put({"blocks": blocks, "reference": np.asarray(reference, np.float32),
                        "reference_ids": list(reference_ids)})
        pairs = ray.data.from_items(
            [{"i": i, "j": j} for i, j in tiles],
            override_num_blocks=min(len(tiles), MAX_TILE_TASKS)).map_batches(
            _pairs_of_tiles, fn_kwargs={"plan": [plan], "threshold": threshold},
            batch_size=1, batch_format="numpy").materialize()
        edges = pairs.to_arrow_refs()
    # The tiles compared in float32, as the greedy rule does: the same threshold here.
    marks, found = _resolve_task().options(num_returns=2).remote(
        float(np.float32(threshold)), list(reference_ids), *edges,
        reasons=(REASON_EMBEDDING_RAW, REASON_EMBEDDING_SYNTHETIC))
    found = ray.get(found)
    marked = rows.map_batches(_mark_near_duplicates, fn_kwargs={"marks": [marks]},
                              batch_format="pyarrow")
    return marked, {reason: found[reason]
                    for reason in (REASON_EMBEDDING_SYNTHETIC, REASON_EMBEDDING_RAW)}


def _orders_not_in(batch, orders: list):
    import pyarrow as pa

    from raydag.stages import orders_in, shared_object

    hit, _ = orders_in(batch["_order"].to_numpy().astype(np.int64), shared_object(orders[0])[0])
    return batch.filter(pa.array(~hit))


def _block_arrays(block) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``_order``, ``_embedding`` (float32 matrix) and ``id`` of a block of vectors."""
    from ray.data.block import BlockAccessor

    batch = BlockAccessor.for_block(block).to_batch_format("numpy")
    return (batch["_order"].astype(np.int64), np.asarray(batch["_embedding"], np.float32),
            np.asarray(batch["id"], dtype=object))


def _pairs_of_tiles(batch: dict[str, np.ndarray], plan: list,
                    threshold: float) -> dict[str, np.ndarray]:
    """Ray Data task: the pairs at or above ``threshold`` of each tile of the batch, its two
    blocks read from the object store (``j == -1``: block ``i`` against the references)."""
    import ray

    from raydag.embed import reference_pairs, tile_pairs
    from raydag.stages import shared_object

    search = shared_object(plan[0])
    found = []
    for i, j in zip(batch["i"].tolist(), batch["j"].tolist()):
        orders, vectors, ids = _block_arrays(ray.get(search["blocks"][i]))
        if j < 0:
            found.append(reference_pairs(orders, vectors, search["reference"],
                                         search["reference_ids"], threshold=threshold))
        elif i == j:
            found.append(tile_pairs(orders, vectors, ids, threshold=threshold))
        else:
            other = _block_arrays(ray.get(search["blocks"][j]))
            found.append(tile_pairs(orders, vectors, ids, other, threshold=threshold))
    return {key: np.concatenate([part[key] for part in found]) for key in found[0]}
