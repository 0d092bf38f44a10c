"""Sentence embeddings with the student encoder (all-MiniLM-L6-v2 by default), in Ray Data.

Used by the quality passes (embedding near-duplicates, embedding decontamination) and by the
diversity measure. Embeddings are mean-pooled last hidden states, L2-normalised, so a dot
product is a cosine similarity.

The all-pairs near-duplicate search of the quality pass is cut into tiles (one block of rows
against another, or against the reference rows); :func:`tile_plan`, :func:`tile_pairs` and
:func:`reference_pairs` are its pure parts, and :func:`embedding_near_duplicates` is the greedy
reference its decisions are checked against.

Example:
    >>> from raydag.embed import encode_texts  # doctest: +SKIP
    >>> encode_texts(["a fine film", "a good movie"], "embedded:all-minilm-l6-v2").shape  # doctest: +SKIP
    (2, 384)
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd


def model_device(device: str | None) -> str:
    """Set up torch for a small model in this process and return its device: an actor's
    threads (``OMP_NUM_THREADS``; unset outside actors: torch's default), and ``device`` or
    the GPU when the process sees one."""
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


class TextEncoder:
    """Ray Data actor: adds ``_embedding`` (float32 list) to each row from its ``text``.

    Args:
        model: Model reference (``embedded:<name>``, Hugging Face id, or local folder).
        max_length: Tokens per text after truncation.
        keep_text: Whether the output keeps the ``text`` column (the quality passes drop it:
            only the vectors travel on).
        device: ``cpu`` or ``cuda``; default the GPU when the process sees one.
    """

    # A model reference names fixed weights, so one instance may serve a whole process (see
    # raydag.stages.map_with_model).
    shareable = True

    def __init__(self, model: str, max_length: int = 128, keep_text: bool = True,
                 device: str | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer

        from raydag.models import resolve_model

        self._device = model_device(device)
        path = resolve_model(model)
        local = os.path.isdir(path)
        self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
        self._model = AutoModel.from_pretrained(path, local_files_only=local).eval().to(self._device)
        self._max_length = max_length
        self._keep_text = keep_text

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        import torch

        enc = self._tokenizer([str(t) for t in batch["text"]], padding=True, truncation=True,
                              max_length=self._max_length, return_tensors="pt").to(self._device)
        with torch.no_grad():
            hidden = self._model(**enc).last_hidden_state
        pooled = pool_states(hidden, enc["attention_mask"], "mean")
        pooled = torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()
        out = batch.copy() if self._keep_text else batch.drop(columns=["text"])
        out["_embedding"] = list(pooled)
        return out


def pool_states(hidden, attention_mask, mode: str):
    """One vector per row from the token states: ``mean`` over real tokens, ``max``, or ``cls``
    (the first token). Tensors in, a ``(rows, dim)`` tensor out."""
    import torch

    if mode == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def encode_texts(texts: list[str], model: str, *, batch_size: int = 64,
                 threads: int | None = None, cache: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Embed texts with :class:`TextEncoder` actors (one per GPU on GPU clusters, else one
    CPU actor; see :func:`raydag.stages.map_with_model`); rows keep their order.

    Args:
        texts: The texts.
        model: Model reference of the encoder.
        batch_size: Texts per encoder call.
        threads: Torch threads of the encoder actor (default: this machine's cores).
        cache: Vectors by text from earlier calls of one run (same ``model``): only texts not
            in it are encoded (each once), and they are added to it. A run's quality passes
            and its diversity measure share one, so the encoder starts once.

    Returns:
        A float32 array of shape (len(texts), dim), rows L2-normalised.
    """
    from raydag.stages import map_with_model

    if not texts:
        return np.zeros((0, 0), dtype=np.float32)
    texts = [str(t) for t in texts]
    todo = texts if cache is None else list(dict.fromkeys(t for t in texts if t not in cache))
    vectors = np.zeros((0, 0), dtype=np.float32)
    if todo:
        # Texts of similar length share a batch, so batches pad little; order is restored.
        by_length = sorted(range(len(todo)), key=lambda i: len(todo[i]))
        out = map_with_model(pd.DataFrame({"text": [todo[i] for i in by_length]}), TextEncoder,
                               {"model": model}, batch_size=batch_size, threads=threads)
        vectors = np.empty((len(todo), len(out["_embedding"].iloc[0])), dtype=np.float32)
        vectors[by_length] = np.stack(out["_embedding"].to_numpy())
    if cache is None:
        return vectors
    cache.update(zip(todo, vectors))
    return np.stack([cache[t] for t in texts])


def max_similarity(queries: np.ndarray, keys: np.ndarray, *, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, the highest cosine similarity to any key row and that key's index
    (both arrays L2-normalised); computed in chunks so memory stays bounded."""
    if len(queries) == 0 or len(keys) == 0:
        return np.full(len(queries), -1.0, dtype=np.float32), np.full(len(queries), -1, dtype=np.int64)
    best = np.empty(len(queries), dtype=np.float32)
    where = np.empty(len(queries), dtype=np.int64)
    for start in range(0, len(queries), chunk):
        sims = queries[start:start + chunk] @ keys.T
        where[start:start + chunk] = sims.argmax(axis=1)
        best[start:start + chunk] = sims[np.arange(len(sims)), where[start:start + chunk]]
    return best, where


def embedding_near_duplicates(embeddings: np.ndarray, *, threshold: float,
                              reference: np.ndarray | None = None) -> dict[int, tuple[str, int]]:
    """Rows (in the given order, earliest first) whose embedding is at least ``threshold``
    cosine-similar to a reference row or to an earlier kept row.

    The greedy rule on one machine, kept as the reference that the quality pass in Ray
    (:func:`raydag.quality.mark_embedding_near_duplicates`: tiles, then the pairs visited in
    order) is tested against: a reference match wins (the most similar reference, then the
    earliest), else the most similar earlier kept row (then the earliest); a dropped row
    matches nothing later.

    Returns position -> (reason, matched position): ``embedding_duplicate_raw`` (matched is a
    reference index) or ``embedding_duplicate_synthetic``. O(n x kept) dot products.
    """
    found: dict[int, tuple[str, int]] = {}
    if reference is not None and len(reference):
        best, where = max_similarity(embeddings, reference)
        for i in np.flatnonzero(best >= threshold):
            found[int(i)] = ("embedding_duplicate_raw", int(where[i]))
    kept: list[int] = []
    for i in range(len(embeddings)):
        if i in found:
            continue
        if kept:
            sims = embeddings[kept] @ embeddings[i]
            j = int(sims.argmax())
            if sims[j] >= threshold:
                found[i] = ("embedding_duplicate_synthetic", kept[j])
                continue
        kept.append(i)
    return found


def tile_plan(blocks: int, references: bool) -> list[tuple[int, int]]:
    """The tiles of an all-pairs search over ``blocks`` blocks of rows: ``(i, j)`` for every
    ``j <= i`` (each pair of blocks once, and each block with itself), plus ``(i, -1)`` (block
    ``i`` against the reference rows) when there are references.

    Example:
        >>> tile_plan(2, references=True)
        [(0, 0), (1, 0), (1, 1), (0, -1), (1, -1)]
    """
    pairs = [(i, j) for i in range(blocks) for j in range(i + 1)]
    return pairs + ([(i, -1) for i in range(blocks)] if references else [])


def _pairs_out(a, b, similarity, a_id) -> dict[str, np.ndarray]:
    return {"a": np.asarray(a, np.int64), "b": np.asarray(b, np.int64),
            "similarity": np.asarray(similarity, np.float32),
            "a_id": np.asarray(a_id, dtype=object)}


def tile_pairs(orders: np.ndarray, vectors: np.ndarray, ids: np.ndarray,
               other: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None, *,
               threshold: float) -> dict[str, np.ndarray]:
    """The pairs of rows of one tile whose cosine similarity is at least ``threshold``.

    A tile is two blocks of rows (each pair one row from each), or one block with itself
    (``other`` None: each pair of its rows once). The similarities are one float32 matrix
    product, compared in float32 as :func:`embedding_near_duplicates` compares them. Cost: one
    ``len(orders) x len(other)`` product; memory: that matrix in float32.

    Args:
        orders: The block's rows' ``_order`` (unique, non-negative).
        vectors: Their embeddings, ``(rows, dim)``, L2-normalised.
        ids: Their ids.
        other: ``(orders, vectors, ids)`` of the second block, or None for the block itself.
        threshold: The cosine similarity at which two rows are near duplicates.

    Returns:
        Arrays ``a``, ``b`` (the two rows' orders, ``a < b``), ``similarity`` (float32) and
        ``a_id`` (the id of row ``a``), one entry per pair.

    Example:
        >>> v = np.array([[1, 0], [1, 0], [0, 1]], np.float32)
        >>> tile_pairs(np.array([5, 2, 7]), v, np.array(["x", "y", "z"]), threshold=0.9)["a_id"]
        array(['y'], dtype=object)
    """
    orders, ids = np.asarray(orders, np.int64), np.asarray(ids, dtype=object)
    right_orders, right_vectors, right_ids = (
        (orders, vectors, ids) if other is None
        else (np.asarray(other[0], np.int64), other[1], np.asarray(other[2], dtype=object)))
    if len(orders) == 0 or len(right_orders) == 0:
        return _pairs_out([], [], [], [])
    similarity = np.asarray(vectors, np.float32) @ np.asarray(right_vectors, np.float32).T
    close = similarity >= np.float32(threshold)
    if other is None:  # one block with itself: each pair once, a row never with itself
        close &= orders[:, None] < orders[None, :]
    left, right = np.nonzero(close)
    first = orders[left] < right_orders[right]  # which side holds the earlier row
    return _pairs_out(np.where(first, orders[left], right_orders[right]),
                      np.where(first, right_orders[right], orders[left]),
                      similarity[left, right], np.where(first, ids[left], right_ids[right]))


def reference_pairs(orders: np.ndarray, vectors: np.ndarray, reference: np.ndarray,
                    reference_ids: list[str], *, threshold: float) -> dict[str, np.ndarray]:
    """The pairs of a block's rows and reference rows whose cosine similarity is at least
    ``threshold``; reference ``k`` of ``m`` has the order ``k - m`` (negative, so it comes
    before every row, as in :func:`raydag.filters.near_dup.resolve_near_duplicates`).

    Args:
        orders: The block's rows' ``_order``.
        vectors: Their embeddings, ``(rows, dim)``.
        reference: The reference embeddings, ``(m, dim)``.
        reference_ids: The references' ids (``a_id`` of their pairs).
        threshold: The cosine similarity at which a row repeats a reference.

    Returns:
        Arrays ``a`` (the reference's negative order), ``b`` (the row's order), ``similarity``
        and ``a_id``, as :func:`tile_pairs` returns them.
    """
    orders = np.asarray(orders, np.int64)
    if len(orders) == 0 or len(reference) == 0:
        return _pairs_out([], [], [], [])
    similarity = np.asarray(vectors, np.float32) @ np.asarray(reference, np.float32).T
    row, k = np.nonzero(similarity >= np.float32(threshold))
    return _pairs_out(k - len(reference), orders[row], similarity[row, k],
                      np.asarray(reference_ids, dtype=object)[k])
