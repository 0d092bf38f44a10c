"""Data-quality passes over a run's rows, and the measures that go into its report and data card.

The passes run in Ray Data over the rows of the finished shards, after exact deduplication and
before the output folders are written; each one only changes the status of accepted rows
(``dropped`` or ``quarantined`` with a reason and its stage), so no row is lost and the counts
reconcile. In order:

1. near-duplicates: MinHash LSH within the synthetic rows and against the raw rows
   (:mod:`raydag.filters.near_dup`), optionally embedding near-duplicates (exact, a tiled
   all-pairs search in Ray: :func:`raydag.filters.embedding.mark_embedding_near_duplicates`);
2. decontamination against every evaluation split: n-gram overlap
   (:mod:`raydag.filters.decontam`) and embedding similarity
   (:func:`raydag.filters.embedding.mark_embedding_contaminated`). The embedding passes run
   after the n-gram one; rows dropped by embedding decontamination are not embedding
   near-duplicate candidates. The rows' vectors are computed in Ray Data
   (:func:`raydag.filters.embedding.embed_accepted`) and stay in the object store;
3. label consistency by the raw-trained student: pointwise V-information below a threshold;
4. co-annotation: rows a label stage labelled are routed by uncertainty to auto-accept, the
   human queue (quarantined as ``human_review``, exported for Label Studio) or drop; labels a
   human returned (``raydag import-labels``) are merged back.

PII is redacted earlier, as the shards are written (see :func:`raydag.stages.publish_shards`).
The measures (:func:`measure`) are diversity per generation method and the label shortcut report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from raydag.config import JobConfig
from raydag.storage import RunPath, read_frame, write_table

HUMAN_LABELS = "human_labels.parquet"  # in the run folder; written by `raydag import-labels`
HUMAN_QUEUE = "human_queue"  # folder with tasks.json and label_config.xml for Label Studio


def eval_splits(job: JobConfig, test: pd.DataFrame | None,
                dev: pd.DataFrame | None = None) -> dict[str, list[str]]:
    """The evaluation texts by split: the job's test split as ``test``, its dev split (which
    chooses the students' epoch) as ``dev``, plus ``eval_paths``."""
    from raydag.data import read_texts

    splits = {} if test is None else {"test": test["text"].astype(str).tolist()}
    if dev is not None:
        splits["dev"] = dev["text"].astype(str).tolist()
    column = job.data.text_column if job.data else "text"
    for name, path in job.quality.decontam.eval_paths.items():
        splits[name] = read_texts(path, [column])[column].astype(str).tolist()
    return splits


def apply_quality(rows, job: JobConfig, *, raw: pd.DataFrame | None,
                  evals: dict[str, list[str]], raw_student: str | None,
                  run_dir: RunPath, embeddings: dict | None = None) -> tuple[Any, dict[str, Any]]:
    """Run the quality passes over the rows (see the module docstring).

    Args:
        rows: Dataset of every row of the run (all statuses), with ``_order``.
        job: The job (its ``quality`` section).
        raw: The raw examples (``id``, ``text``, ``label``), or None.
        evals: Evaluation texts by split (see :func:`eval_splits`).
        raw_student: Checkpoint folder of the raw-trained student, for the PVI filter.
        run_dir: The run folder (human labels in, the Label Studio export out).
        embeddings: A run's cache of vectors by text (see :func:`raydag.embed.encode_texts`).

    Returns:
        The marked dataset and a summary per pass.
    """
    quality, summary = job.quality, {}
    raw_texts = raw["text"].astype(str).tolist() if raw is not None else []
    raw_ids = raw["id"].astype(str).tolist() if raw is not None else []
    decontam = quality.decontam.enabled and bool(evals)
    if quality.near_dup.enabled:
        from raydag.filters.near_dup import mark_near_duplicates

        near = quality.near_dup
        rows, summary["near_dup"] = mark_near_duplicates(
            rows, reference_texts=raw_texts if near.against_raw else None,
            reference_ids=raw_ids if near.against_raw else None, threshold=near.threshold,
            num_perm=near.num_perm, shingle_size=near.shingle_size, seed=job.seed)
        if not decontam:  # else Ray Data fuses this marking into decontamination's pass
            rows = rows.materialize()
    if decontam:
        from raydag.filters.decontam import mark_contaminated

        rows, summary["decontam"] = mark_contaminated(rows, eval_texts=evals, n=quality.decontam.ngram)
        summary["decontam"]["embedding_threshold"] = quality.decontam.embedding_threshold
    embed_dups = quality.near_dup.enabled and quality.near_dup.embedding_threshold is not None
    embed_decontam = decontam and quality.decontam.embedding_threshold is not None
    if embed_dups or embed_decontam:
        rows = _embedding_passes(rows, job, summary, evals=evals if embed_decontam else {},
                                 raw_texts=raw_texts, raw_ids=raw_ids, near_dups=embed_dups,
                                 embeddings=embeddings)
    if quality.consistency.pvi_threshold is not None:
        rows, summary["consistency"] = _pvi_filter(rows, job, raw, raw_student)
    if quality.coannotation.enabled:
        rows, summary["coannotation"] = _coannotate(rows, job, run_dir)
    return rows, summary


def _embedding_passes(rows, job: JobConfig, summary: dict[str, Any], *,
                      evals: dict[str, list[str]], raw_texts: list[str], raw_ids: list[str],
                      near_dups: bool, embeddings: dict | None):
    """Embedding decontamination (when ``evals``) then embedding near-duplicates (when
    ``near_dups``), in Ray Data; their summaries go into ``summary``. The accepted rows are
    embedded once by encoder actors (:func:`raydag.filters.embedding.embed_accepted`); the evaluation and raw texts,
    small, by :func:`raydag.embed.encode_texts` (in the run's cache, which the diversity
    measure shares). Returns the marked rows, materialized."""
    import ray

    from raydag.embed import encode_texts
    from raydag.filters.embedding import (embed_accepted, mark_embedding_contaminated,
                                          mark_embedding_near_duplicates)

    quality, model = job.quality, job.student.model
    rows = rows.materialize()  # read by the encoder, the examples' look-up and the marking
    eval_texts = [text for texts in evals.values() for text in texts]
    references = raw_texts if near_dups and quality.near_dup.against_raw else []
    # The diversity measure embeds the raw texts too: encode them now, in the same actor.
    extra = raw_texts if quality.diversity.embeddings and not references else []
    small = encode_texts(eval_texts + references + extra, model, cache=embeddings)
    # With decontamination every accepted row is embedded; near-duplicates alone skip the
    # raw rows a stage passed on (they are the references, never candidates).
    vectors = embed_accepted(rows, model, exclude_ids=raw_ids if not evals else None)
    contaminated = None
    if evals:
        rows, summary["decontam"]["embedding_matched"], examples, contaminated = (
            mark_embedding_contaminated(rows, vectors, ray.put(small[:len(eval_texts)]), evals,
                                        threshold=quality.decontam.embedding_threshold,
                                        examples=quality.decontam.examples))
        summary["decontam"]["embedding_examples"] = examples
    if near_dups:
        reference = (small[len(eval_texts):len(eval_texts) + len(references)] if references
                     else np.zeros((0, 0), np.float32))
        rows, counts = mark_embedding_near_duplicates(
            rows, vectors, reference=reference,
            reference_ids=raw_ids if references else [], exclude_ids=raw_ids,
            exclude_orders=contaminated, threshold=quality.near_dup.embedding_threshold)
        summary.setdefault("near_dup", {}).update(
            embedding_threshold=quality.near_dup.embedding_threshold, **counts)
    return rows.materialize()


def _pvi_filter(rows, job: JobConfig, raw: pd.DataFrame | None, raw_student: str | None):
    """The PVI filter in Ray Data: actors holding the raw student (one per GPU where the
    cluster has GPUs, else one CPU actor) score the accepted teacher rows of each batch and
    mark those below the threshold; the driver gets per-block counts."""
    import os

    import ray

    from raydag.errors import RaydagError
    from raydag.resources import model_actor_options

    if raw is None or raw_student is None:
        raise RaydagError("quality.consistency.pvi_threshold needs the raw student "
                          "(student.train_sets must include 'raw')")
    threshold = job.quality.consistency.pvi_threshold
    prior = raw["label"].astype(str).value_counts(normalize=True).to_dict()
    prior = {label: prior.get(label, 1e-6) for label in job.data.labels}
    options = model_actor_options(ray.cluster_resources().get("GPU", 0.0),
                                  len(os.sched_getaffinity(0)))
    marked = rows.map_batches(PVIMarker, fn_constructor_kwargs={
        "checkpoint": raw_student, "prior": prior, "threshold": threshold},
        batch_size=64, batch_format="pandas", **options).materialize()
    parts = marked.map_batches(_pvi_summary, batch_size=None, batch_format="pandas").take_all()
    checked = sum(int(p["checked"]) for p in parts)
    return marked.drop_columns(["_pvi"]).materialize(), {
        "method": "pvi", "threshold": threshold, "checked": checked,
        "dropped": sum(int(p["dropped"]) for p in parts),
        "mean_pvi": round(sum(float(p["pvi_sum"]) for p in parts) / checked, 4) if checked else None}


class PVIMarker:
    """Ray Data actor: the PVI (:func:`raydag.train.pointwise_v_information`) of each accepted
    teacher row of a batch under the raw student, in ``pvi``; a row below ``threshold`` is
    dropped as ``low_pvi``. Other rows pass unchanged (``pvi`` empty)."""

    def __init__(self, checkpoint: str, prior: dict[str, float], threshold: float) -> None:
        from raydag.train import StudentScorer

        self.scorer, self.prior, self.threshold = StudentScorer(checkpoint), prior, threshold

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from raydag.train import pointwise_v_information

        batch = batch.copy()
        todo = ((batch["_status"] == "accepted") & (batch["method"] != "raw")).to_numpy()
        pvi = np.full(len(batch), np.nan)
        if todo.any():
            part = batch.loc[todo, ["text", "label"]].astype(str)
            logp = self.scorer(part)["log2_p_label"].to_numpy(dtype=float)
            pvi[todo] = pointwise_v_information(logp, part["label"].tolist(), self.prior)
        low = todo & (pvi < self.threshold)
        batch["pvi"] = np.round(pvi, 4)
        batch["_pvi"] = pvi  # unrounded, for the summary's mean (then dropped)
        for column, value in (("_status", "dropped"), ("_reason", "low_pvi"), ("_stage", "consistency")):
            batch[column] = batch[column].astype(object)
            batch.loc[low, column] = value
        return batch


def _pvi_summary(batch: pd.DataFrame) -> pd.DataFrame:
    scored = batch["_pvi"].notna()
    return pd.DataFrame({"checked": [int(scored.sum())],
                         "dropped": [int((batch["_reason"] == "low_pvi").sum())],
                         "pvi_sum": [float(batch.loc[scored, "_pvi"].sum())]})


def _coannotate(rows, job: JobConfig, run_dir: RunPath):
    """Co-annotation routing in Ray Data: each labelled accepted row's uncertainty is scored in
    ``map_batches`` over four columns; each block sends the driver its route counts and its
    ``human_budget`` most uncertain candidates for people, of which the driver keeps the most
    uncertain; a second ``map_batches`` scores again and marks every row by its route. The
    driver holds O(blocks x human_budget) numbers and the human queue, nothing per row."""
    import ray

    from raydag.errors import RaydagError
    from raydag.ops.coannotate import label_studio_config, label_studio_tasks

    config = job.quality.coannotation
    if not {"label_margin", "label_votes"} & set(rows.columns()):
        raise RaydagError("quality.coannotation needs a label stage (label_margin or label_votes "
                          "columns); add one to stages or switch coannotation off")
    if not 0.0 <= config.accept_below <= config.drop_above <= 1.0:
        raise RaydagError(f"quality.coannotation: thresholds must satisfy 0 <= accept_below <= "
                          f"drop_above <= 1, got {config.accept_below} and {config.drop_above}")
    scoring = {"measure": config.measure, "num_labels": len(job.data.labels)}
    settings = {"accept_below": config.accept_below, "drop_above": config.drop_above}
    # A first read of four columns scores the rows and sums the routes per block; the marking
    # pass scores them again (arrays: cheaper than keeping every row between the passes).
    read = [c for c in ("_status", "_order", "label_margin", "label_votes") if c in rows.columns()]
    parts = rows.select_columns(read).map_batches(
        _score_uncertainty, fn_kwargs=scoring, batch_format="pyarrow").map_batches(
        _route_summary, fn_kwargs={**settings, "budget": config.human_budget},
        batch_size=None, batch_format="pandas").take_all()
    errors = [p["error"] for p in parts if p["error"]]
    if errors:
        raise RaydagError(f"quality.coannotation (measure {config.measure}): {errors[0]}")
    totals = {key: sum(int(p[key]) for p in parts) for key in ("accepted", "auto", "human", "drop")}
    # the most uncertain candidates for people; equal uncertainties: the earlier row first
    candidates = sorted(((-p["score"], p["order"]) for part in parts
                         for p in json.loads(part["candidates"])))
    chosen = frozenset(int(order) for _, order in candidates[:config.human_budget])
    overflow = totals["human"] - len(chosen)
    counts = {"auto": totals["auto"], "human": len(chosen), "drop": totals["drop"]}
    counts["auto" if config.overflow == "accept" else "drop"] += overflow
    queued = _chosen_rows(rows, chosen)
    human = _human_labels(run_dir)
    answered = {row["id"]: human[row["id"]] for row in queued if row["id"] in human}
    queue = [row for row in queued if row["id"] not in answered]
    marked = rows.map_batches(_route_rows, fn_kwargs={
        **scoring, **settings, "chosen": [ray.put(chosen)], "overflow": config.overflow,
        "answers": answered, "answer_columns": bool(answered)}, batch_format="pyarrow")
    folder = run_dir / HUMAN_QUEUE
    folder.mkdir(parents=True, exist_ok=True)
    tasks = label_studio_tasks(queue, model_version=job.teacher.model)
    (folder / "tasks.json").write_text(json.dumps(tasks, indent=1, default=str))
    (folder / "label_config.xml").write_text(label_studio_config(job.data.labels))
    scored_rows = totals["auto"] + totals["human"] + totals["drop"]
    return marked.materialize(), {
        "scored": scored_rows, "not_scored": totals["accepted"] - scored_rows,
        "measure": config.measure, "accept_below": config.accept_below,
        "drop_above": config.drop_above, "human_budget": config.human_budget,
        "overflow": config.overflow, "routed": counts, "human_labels_merged": len(answered),
        "human_queue": len(queue), "tasks_file": str(folder / "tasks.json")}


_QUEUE_COLUMNS = ["id", "text", "label", "label_confidence", "label_margin", "label_agreement",
                  "label_votes", "_order"]


def _score_uncertainty(batch, measure: str, num_labels: int):
    """Ray Data task (Arrow batches): ``label_uncertainty`` of each accepted row a label stage
    scored (null for the others); a row whose columns cannot be scored leaves the reason in
    ``_uncertainty_error``. A margin with no votes is scored with array operations (``1 -
    label_margin``, clipped, as :func:`raydag.ops.coannotate.uncertainty` does); any other row
    goes through that function."""
    import pyarrow as pa

    from raydag.ops.coannotate import uncertainty

    batch = batch.drop_columns([c for c in ("label_uncertainty", "_uncertainty_error")
                                if c in batch.column_names])
    size = batch.num_rows
    accepted = batch["_status"].to_numpy(zero_copy_only=False) == "accepted"
    margin = (batch["label_margin"].to_numpy(zero_copy_only=False).astype(float)
              if "label_margin" in batch.column_names else np.full(size, np.nan))
    votes = (np.asarray(batch["label_votes"].is_valid()) if "label_votes" in batch.column_names
             else np.zeros(size, dtype=bool))
    has_margin = ~np.isnan(margin)
    scored = accepted & (has_margin | votes)
    fast = scored & ~votes if measure != "entropy" else np.zeros(size, dtype=bool)
    scores = np.full(size, np.nan)
    scores[fast] = np.clip(1.0 - margin[fast], 0.0, 1.0)
    errors = [""] * size
    slow = np.flatnonzero(scored & ~fast)
    if len(slow):
        present = [c for c in ("label_margin", "label_votes") if c in batch.column_names]
        part = batch.select(present).take(slow).to_pylist()
        for position, row in zip(slow, part):
            if "label_margin" in row and row["label_margin"] is None:
                row["label_margin"] = np.nan  # as pandas held it: "label_margin is NaN"
            try:
                score = uncertainty(row, measure=measure, num_labels=num_labels)
                if not 0.0 <= score <= 1.0:
                    raise ValueError(f"uncertainty must be in [0, 1], got {score}")
                scores[position] = score
            except ValueError as err:
                errors[position] = str(err)
    return (batch.append_column("label_uncertainty", pa.array(scores, mask=np.isnan(scores)))
            .append_column("_uncertainty_error", pa.array(errors, pa.string())))


def _route_of(uncertainty: np.ndarray, accept_below: float, drop_above: float) -> np.ndarray:
    """Each row's route by its uncertainty: ``auto``, ``human``, ``drop``, "" when unscored."""
    route = np.full(len(uncertainty), "human", dtype=object)
    route[uncertainty < accept_below] = "auto"
    route[uncertainty > drop_above] = "drop"
    route[np.isnan(uncertainty)] = ""
    return route


def _route_summary(batch: pd.DataFrame, accept_below: float, drop_above: float,
                   budget: int) -> pd.DataFrame:
    """Ray Data task: a block's accepted rows, rows per route, its ``budget`` most uncertain
    candidates for people (JSON) and the first scoring error."""
    route = _route_of(batch["label_uncertainty"].to_numpy(dtype=float), accept_below, drop_above)
    human = batch[route == "human"]
    top = human.assign(_neg=-human["label_uncertainty"]).sort_values(["_neg", "_order"]).head(budget)
    errors = [e for e in batch["_uncertainty_error"] if e]
    return pd.DataFrame({"accepted": [int((batch["_status"] == "accepted").sum())],
                         "auto": [int((route == "auto").sum())], "human": [len(human)],
                         "drop": [int((route == "drop").sum())],
                         "candidates": [json.dumps([{"score": float(u), "order": int(o)} for u, o in
                                                    zip(top["label_uncertainty"], top["_order"])])],
                         "error": [errors[0] if errors else ""]})


def _chosen_rows(rows, chosen: frozenset) -> list[dict]:
    """The rows chosen for people (at most ``human_budget``), in row order."""
    import ray

    if not chosen:
        return []
    present = [c for c in _QUEUE_COLUMNS if c in rows.columns()]
    frame = rows.select_columns(present).map_batches(
        _rows_in, fn_kwargs={"orders": [ray.put(chosen)]}, batch_format="pandas").to_pandas()
    return frame.sort_values("_order").to_dict("records")


def _rows_in(batch: pd.DataFrame, orders: list) -> pd.DataFrame:
    from raydag.stages import shared_object

    return batch[batch["_order"].isin(shared_object(orders[0]))]


def _route_rows(batch, measure: str, num_labels: int, accept_below: float, drop_above: float,
                chosen: list, overflow: str, answers: dict[str, dict], answer_columns: bool):
    """Ray Data task (Arrow batches): each row scored (:func:`_score_uncertainty`), its
    ``route``, and what the route means for the row (a people's label merged, quarantined for
    people, dropped as uncertain)."""
    import pyarrow as pa

    from raydag.stages import set_where, shared_object

    batch = _score_uncertainty(batch, measure, num_labels).drop_columns(["_uncertainty_error"])
    uncertainty = batch["label_uncertainty"].to_numpy(zero_copy_only=False).astype(float)
    route = _route_of(uncertainty, accept_below, drop_above)
    orders = batch["_order"].to_numpy(zero_copy_only=False)
    over = (route == "human") & ~np.isin(orders, np.fromiter(shared_object(chosen[0]), np.int64))
    route[over] = "auto" if overflow == "accept" else "drop"
    human = route == "human"
    answered = np.zeros(len(route), dtype=bool)
    if answer_columns:
        ids = batch["id"].to_pylist()
        answered = human & np.array([i in answers for i in ids], dtype=bool)
        found = [answers.get(i) if hit else None for i, hit in zip(ids, answered)]
        batch = set_where(batch, answered,
                          teacher_label=batch["label"].to_pylist(),
                          label=[a and a["label"] for a in found],
                          label_source="human",
                          annotator=[a and str(a["annotator"]) for a in found],
                          annotated_at=[a and str(a["annotated_at"]) for a in found])
    batch = set_where(batch, human & ~answered, _status="quarantined", _reason="human_review",
                      _stage="coannotation")
    batch = set_where(batch, route == "drop", _status="dropped", _reason="uncertain_label",
                      _stage="coannotation")
    rounded = np.round(uncertainty, 4)
    columns = {"label_uncertainty": pa.array(rounded, mask=np.isnan(rounded)),
               "route": pa.array(np.where(route == "", None, route), pa.string())}
    for name, column in columns.items():
        at = batch.column_names.index(name) if name in batch.column_names else -1
        batch = (batch.set_column(at, name, column) if at >= 0
                 else batch.append_column(name, column))
    return batch


def _human_labels(run_dir: RunPath) -> dict[str, dict]:
    path = run_dir / HUMAN_LABELS
    if not path.exists():
        return {}
    frame = read_frame(path)
    return {row["id"]: row for row in frame.to_dict("records")}


def import_labels(run_dir: RunPath, export: Path, labels: list[str]) -> dict[str, int]:
    """Merge a Label Studio export into the run's human labels (``human_labels.parquet``);
    the next ``raydag run`` of the job applies them (the shards are reused).

    Returns:
        Counts: tasks read, labelled, skipped, and human labels stored in total.
    """
    import pyarrow as pa

    from raydag.errors import DataError
    from raydag.ops.coannotate import read_label_studio_export

    queue = run_dir / HUMAN_QUEUE / "tasks.json"
    if not queue.exists():
        raise DataError(f"{run_dir}: no human queue here ({queue} is missing); run the job with "
                        "quality.coannotation.enabled=true first")
    queued = {task["data"]["raydag_id"] for task in json.loads(queue.read_text())}
    answers, counts = read_label_studio_export(export, labels)
    unknown = [a["id"] for a in answers if a["id"] not in queued]
    if unknown:
        raise DataError(f"{export}: {len(unknown)} task(s) name rows that are not in this run's "
                        f"human queue, e.g. {unknown[:3]}")
    stored = _human_labels(run_dir)
    for answer in answers:
        stored[answer["id"]] = {**answer, "source": str(export)}
    frame = pd.DataFrame(list(stored.values()))
    for column in frame.columns:
        frame[column] = frame[column].astype(str)
    write_table(pa.Table.from_pandas(frame, preserve_index=False), run_dir / HUMAN_LABELS)
    return {**counts, "stored": len(stored)}


def measure(job: JobConfig, synthetic: pd.DataFrame, raw: pd.DataFrame | None,
            embeddings: dict | None = None) -> dict[str, Any]:
    """Diversity per generation method (raw rows as their own group) and the shortcut report.

    Args:
        job: The job.
        synthetic: Accepted teacher rows (``text``, ``label``, ``method``).
        raw: The raw examples, or None.
        embeddings: A run's cache of vectors by text (see :func:`raydag.embed.encode_texts`).
    """
    from raydag.measures.bias import bias_report
    from raydag.measures.diversity import diversity_by_group, diversity_report

    frame = synthetic[["text", "label", "method"]].copy().reset_index(drop=True)
    frame["text"] = frame["text"].astype(str)
    frame["label"] = frame["label"].fillna("").astype(str)
    raw_texts = raw["text"].astype(str).tolist() if raw is not None else []
    vectors = None
    if job.quality.diversity.embeddings and (len(frame) or raw_texts):
        from raydag.embed import encode_texts

        vectors = encode_texts(frame["text"].tolist() + raw_texts, job.student.model,
                               cache=embeddings)
    size, seed = job.quality.diversity.sample_size, job.seed
    diversity = diversity_by_group(frame, group_column="method", sample_size=size, seed=seed,
                                   embeddings=None if vectors is None else vectors[:len(frame)])
    if raw is not None:
        diversity["raw_examples"] = diversity_report(
            raw_texts, raw["label"].astype(str).tolist(), sample_size=size, seed=seed,
            embeddings=None if vectors is None else vectors[len(frame):])
    result: dict[str, Any] = {"diversity": diversity}
    if raw is not None and len(synthetic) and job.data is not None:
        settings = job.quality.bias
        result["bias"] = bias_report(
            raw["text"].astype(str).tolist(), raw["label"].astype(str).tolist(),
            frame["text"].tolist(), frame["label"].tolist(),
            z_min=settings.z_min, min_count=settings.min_count, margin=settings.margin)
    return result
