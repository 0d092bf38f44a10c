"""Outputs and resume: the output folder, the run folder named by the run's signature, and the
final write of the teacher's shards into ``synthetic/``, ``dropped/`` and ``quarantine/``.

A run's shards live in ``output_dir/runs/<signature>/shards/``; a rerun with the same
settings (and the same input files: :func:`input_digests`) finds them there and skips them.
:func:`finish_outputs` reads the finished shards back as one Ray Data dataset, deduplicates
them, runs the quality passes and writes the output folders, counting rows by status and
reason per block.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pandas as pd

from raydag.chain import run_signature
from raydag.config import JobConfig
from raydag.errors import RaydagError
from raydag.stages import deduplicate, shard_path
from raydag.storage import (RunPath, display, location, open_input, read_dataset, remove_tree,
                            write_dataset)
from raydag.teacher import rephrase_flagged


# Folders a run rebuilds from its shards every time.
_OUTPUT_FOLDERS = ("raw", "synthetic", "dropped", "quarantine", "students", "topics_shard")
ROWS_PER_SHARD = 50_000  # rows per file of the output folders
# Marks a folder as a raydag output folder, which a new run may clear.
_OUTPUT_MARKER = ".raydag-output"


def check_output_dir(path: str) -> RunPath:
    """Create the output folder if needed and check it is writable and ours to use.

    ``path`` is a local (or NFS) folder or a store's URI (``s3://bucket/out``: see
    :mod:`raydag.storage`). A non-empty folder without raydag's marker file is refused rather
    than touched.
    """
    out = location(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".raydag-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise RaydagError(f"output_dir {display(out)}: not writable ({err.strerror or err})") from None
    if any(out.iterdir()) and not (out / _OUTPUT_MARKER).exists():
        raise RaydagError(f"output_dir {display(out)}: not empty and not made by raydag (no "
                          f"{_OUTPUT_MARKER} file); choose a new or empty folder")
    return out


def claim_output_dir(path: str) -> RunPath:
    """:func:`check_output_dir`, then mark the folder as raydag's (its logs may go there)."""
    out = check_output_dir(path)
    (out / _OUTPUT_MARKER).write_text("raydag output folder; raydag may clear what it wrote here\n")
    return out


def discard_stale_report(path: str) -> None:
    """Remove the report of an earlier run in a raydag output folder, before anything can fail."""
    out = location(path)
    if (out / _OUTPUT_MARKER).exists():
        for name in ("report.json", "report.md"):
            (out / name).unlink(missing_ok=True)


def prepare_run_dir(path: str, signature: str, settings: dict) -> RunPath:
    """Check the output folder, then make (or reuse) the run folder ``runs/<signature>``.

    Finished shards in the run folder are kept, so a rerun of the same settings resumes; what
    a run rebuilds from them (``raw/``, ``synthetic/``, ``dropped/``, ``quarantine/``,
    ``students/``) is cleared.
    """
    out = claim_output_dir(path)
    discard_stale_report(path)
    run_dir = out / "runs" / signature
    (run_dir / "shards").mkdir(parents=True, exist_ok=True)
    (run_dir / "settings.json").write_text(json.dumps(settings, indent=2, sort_keys=True))
    for name in _OUTPUT_FOLDERS:
        try:
            remove_tree(run_dir / name)  # rebuilt from the shards every run
        except OSError as err:
            raise RaydagError(f"output_dir {display(out)}: cannot clear {name}/ ({err})") from None
    return run_dir


def existing_run_dir(job: JobConfig) -> RunPath:
    """The run folder of an earlier ``raydag run`` of this job (same result settings).

    The folder's signature includes the teacher dtype that ``auto`` chose on the host that
    ran it, so each dtype is tried.

    Raises:
        RaydagError: when no run of these settings exists under ``output_dir``.
    """
    digests = input_digests(job)
    for dtype in dict.fromkeys((job.teacher.dtype, "bfloat16", "float32", "float16")):
        signature, _ = run_signature(job, digests, teacher_dtype=dtype)
        run_dir = location(job.output_dir) / "runs" / signature
        if run_dir.is_dir():
            return run_dir
    raise RaydagError(f"{display(job.output_dir)}: no run of this job with these settings; run it first")


def input_digests(job: JobConfig) -> dict[str, str]:
    """SHA-256 of every input file, so the run signature changes when their content does."""
    paths = {}
    if job.data is not None:
        paths.update(train=job.data.train_path, test=job.data.test_path,
                     dev=job.data.dev_path, unlabelled=job.data.unlabelled_path)
    for index, stage in enumerate(job.stages):
        if stage.type == "self_instruct":
            paths[f"stages.{index}.seed_tasks"] = stage.seed_tasks_path
    digests = {}
    for name, path in paths.items():
        if path and location(path).is_file():
            with open_input(path) as handle:  # streamed in chunks: files may be large
                digests[name] = hashlib.file_digest(handle, "sha256").hexdigest()
    return digests


def finish_outputs(job: JobConfig, shards: list[int], shard_dir: RunPath,
                   run_dir: RunPath, inputs: dict[str, pd.DataFrame], *, raw: pd.DataFrame | None = None,
                   evals: dict[str, list[str]] | None = None,
                   raw_student: str | None = None,
                   placement: dict[str, Any] | None = None,
                   embeddings: dict | None = None, progress=None) -> dict[str, Any]:
    """Deduplicate across shards, apply the novelty filter and the quality passes
    (:func:`raydag.quality.apply_quality`), and write the output folders."""
    from ray.data.expressions import col

    from raydag.quality import apply_quality

    rows = read_dataset([shard_path(shard_dir, i) for i in shards])
    rows = deduplicate(rows)  # also texts a label or judge stage took in as they were
    novelty = next((s for s in job.stages if s.type == "self_instruct"), None)
    if novelty is not None:
        from raydag.ops.instruct import novelty_filter

        kept = rows.filter(expr=col("_status") == "accepted").select_columns(
            ["id", "instruction", "_order"]).to_pandas().sort_values("_order")
        verdicts = novelty_filter(kept["instruction"].tolist(),
                                  inputs["seed_tasks"]["instruction"].tolist(),
                                  novelty.novelty_threshold)
        too_close = frozenset(i for i, (ok, _, _) in zip(kept["id"], verdicts) if not ok)
        rows = rows.map_batches(_mark_not_novel, fn_kwargs={"ids": too_close}, batch_format="pandas")
    rows, quality = apply_quality(rows.materialize(), job, raw=raw, evals=evals or {},
                                  raw_student=raw_student, run_dir=run_dir, embeddings=embeddings)
    extra_stats: list[dict] = []
    if job.quality.bias.rephrase_flagged and raw is not None:
        rows, quality["rephrase"], extra_stats = rephrase_flagged(rows.materialize(), job, raw,
                                                                 run_dir, placement, progress)
    rows = rows.materialize()
    columns = ["_status", "_reason"] + (["pii_redacted"] if "pii_redacted" in rows.columns() else [])
    # counts per block, summed here: O(blocks x reasons) on the driver, nothing per row
    counts = pd.DataFrame(rows.select_columns(columns).map_batches(
        _status_counts, batch_size=None, batch_format="pyarrow").take_all())
    if counts.empty:
        counts = pd.DataFrame({"_status": [], "_reason": [], "rows": [], "pii": []})
    totals = counts.groupby(["_status", "_reason"], dropna=False)["rows"].sum()
    written = []
    for status, folder in (("accepted", "synthetic"), ("dropped", "dropped"),
                           ("quarantined", "quarantine")):
        if status in totals.index.get_level_values(0):
            write_dataset(rows.filter(expr=col("_status") == status), run_dir / folder,
                          min_rows_per_file=ROWS_PER_SHARD)
            written.append(folder)

    def by_reason(status: str) -> dict[str, int]:
        part = totals[totals.index.get_level_values(0) == status]
        return {str(reason): int(n) for (_, reason), n in sorted(
            part.items(), key=lambda item: str(item[0][1])) if pd.notna(reason)}

    quality["pii_teacher_rows"] = dict(sorted(_pii_totals(counts["pii"]).items()))
    accepted = int(totals[totals.index.get_level_values(0) == "accepted"].sum())
    return {"rows": int(totals.sum()), "accepted": accepted,
            "dropped": by_reason("dropped"), "quarantined": by_reason("quarantined"),
            "written": written, "quality": quality, "extra_stats": extra_stats}


def _pii_totals(found) -> dict[str, int]:
    """Redactions by kind, summed over JSON objects such as ``{"EMAIL": 2}`` ("" for none)."""
    pii: dict[str, int] = {}
    for text in found:
        for kind, count in (json.loads(text) if text else {}).items():
            pii[kind] = pii.get(kind, 0) + int(count)
    return pii


def _status_counts(batch) -> pd.DataFrame:
    """Rows of one block (Arrow) by (status, reason), and its PII redactions summed (JSON, on
    the block's first line); grouped by Arrow, so no text becomes a Python string."""
    import pyarrow.compute as pc

    keys = batch.select(["_status", "_reason"])
    counts = keys.group_by(["_status", "_reason"]).aggregate([([], "count_all")]).to_pandas()
    counts = counts.rename(columns={"count_all": "rows"})[["_status", "_reason", "rows"]]
    found = (pc.drop_null(batch["pii_redacted"]).to_pylist()
             if "pii_redacted" in batch.column_names else [])
    pii = _pii_totals(found)
    counts["pii"] = [json.dumps(pii)] + [""] * (len(counts) - 1) if len(counts) else []
    return counts


def _mark_not_novel(batch: pd.DataFrame, ids: frozenset) -> pd.DataFrame:
    batch = batch.copy()
    hit = batch["id"].isin(ids) & (batch["_status"] == "accepted")
    batch.loc[hit, "_status"] = "dropped"
    batch.loc[hit, "_reason"] = "not_novel"
    batch.loc[hit, "_stage"] = "novelty"
    return batch


def accepted_for_measures(run_dir: RunPath, written: list[str], max_per_method: int,
                          seed: int) -> pd.DataFrame:
    """The accepted teacher rows the measures read (``text``, ``label``, ``method``): every
    row of a method with at most ``max_per_method`` rows, a seeded sample of that many
    beyond; in row order (``_order``).

    Ray Data tasks count the rows per method and keep each row with the chance its method's
    sample needs (a seeded hash of its id), so the driver holds about ``max_per_method`` rows
    per method, whatever the run's size.
    """

    columns = ["text", "label", "method"]
    if "synthetic" not in written:
        return pd.DataFrame(columns=columns)
    rows = read_dataset(run_dir / "synthetic", columns=["id", "_order", *columns]).materialize()
    counts: dict[str, int] = {}
    for part in rows.map_batches(_method_counts, batch_size=None, batch_format="pandas").take_all():
        counts[part["method"]] = counts.get(part["method"], 0) + int(part["rows"])
    # 1.2x the sample's share and 50 rows of slack: a method comes back short with a
    # vanishing chance; the exact sample is then cut on the driver
    rates = {m: 1.0 if n <= max_per_method else min(1.0, (1.2 * max_per_method + 50) / n)
             for m, n in counts.items()}
    kept = rows.map_batches(_keep_by_rate, fn_kwargs={"rates": rates, "seed": seed},
                            batch_format="pandas").to_pandas()
    if kept.empty:
        return pd.DataFrame(columns=columns)
    kept = kept.sort_values("_u").groupby("method", group_keys=False).head(max_per_method)
    for column in columns:
        kept[column] = kept[column].fillna("")
    return kept.sort_values("_order")[columns].reset_index(drop=True)


def _method_counts(batch: pd.DataFrame) -> pd.DataFrame:
    counts = batch.loc[batch["method"] != "raw", "method"].value_counts()
    return pd.DataFrame({"method": counts.index.astype(str), "rows": counts.to_numpy()})


def _keep_by_rate(batch: pd.DataFrame, rates: dict[str, float], seed: int) -> pd.DataFrame:
    batch = batch[batch["method"] != "raw"]
    key = f"{seed:016d}"[-16:]  # the hash's 16-character key: one sample per seed
    uniform = pd.util.hash_pandas_object(batch["id"].astype(str), index=False,
                                         hash_key=key).to_numpy() / 2.0**64
    batch = batch.assign(_u=uniform)
    return batch[batch["_u"] < batch["method"].map(rates).astype(float)]


def accepted_rows(run_dir: RunPath, written: list[str]):
    """The accepted teacher rows (``text``, ``label``) as a Ray Dataset read from the run's
    ``synthetic/`` shards, without raw rows a stage passed on (the students' synthetic
    rows: they never pass through the driver); ``None`` when no shard was written."""
    if "synthetic" not in written:
        return None
    return read_dataset(run_dir / "synthetic").map_batches(_teacher_rows, batch_format="pandas")


def _teacher_rows(batch: pd.DataFrame) -> pd.DataFrame:
    kept = batch[batch["method"] != "raw"] if "method" in batch.columns else batch
    return pd.DataFrame({column: (kept[column].fillna("").astype(str) if column in kept.columns
                                  else [""] * len(kept)) for column in ("text", "label")})
