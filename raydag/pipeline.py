"""A job, start to end: read -> sample -> teacher -> filters -> write -> students -> report.

Example:
    >>> from raydag import load_job, run_job
    >>> report_path = run_job(load_job("jobs/quickstart.yaml", ["teacher.num_examples=30"]))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from raydag.config import JobConfig, StudentConfig
from raydag.data import (
    LINEAGE_ADDS,
    LINEAGE_COLUMNS,
    LINEAGE_REQUIRES,
    add_lineage,
    raw_lineage,
    read_labelled,
    stratified_sample,
)
from raydag.errors import DataError, RaydagError
from raydag.filters.exact import normalize_text
from raydag.models import cache_dir
from raydag.ops.create import FewShotCreateOp
from raydag.report import StageTimer, students_table, write_report
from raydag.resources import (
    bundle,
    release_resource_requests,
    student_workers,
    teacher_actor_resources,
    teacher_cpu_threads,
    teacher_gpu_memory_share,
    teacher_runtime_env,
    wait_for_resources,
)
from raydag.stages import FILTER_ADDS, FILTER_REQUIRES, GenerateStage, check_chain, filter_generations

_OUTPUT_FOLDERS = ("raw", "synthetic", "dropped", "quarantine", "students")
ROWS_PER_SHARD = 50_000
# Columns kept for rows that were dropped or quarantined, so each can be audited later.
_AUDIT_COLUMNS = ["request_id", "target_label", "text", "_raw_generation", "finish_reason",
                  "_status", "_reason", "parent_ids", "prompt_hash", "seed"]
_SYNTHETIC_COLUMNS = LINEAGE_COLUMNS + ["request_id", "target_label"]
# Marks a folder as a raydag output folder, which a new run may clear.
_OUTPUT_MARKER = ".raydag-output"


def init_ray() -> dict[str, float]:
    """Start Ray in-process, or join the cluster in ``RAY_ADDRESS``; return its resources."""
    import ray

    if not ray.is_initialized():
        cache = cache_dir()
        env = {
            "RAYDAG_CACHE": str(cache),
            "TORCH_EXTENSIONS_DIR": os.environ.get(
                "TORCH_EXTENSIONS_DIR", str(cache / "torch_extensions")),
            "TOKENIZERS_PARALLELISM": "false",
            "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # otherwise every worker print shows twice
            "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
        }
        kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}, "log_to_driver": True}
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(include_dashboard=False, **kwargs)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_operator_progress_bars = False  # one overall bar is enough on a terminal
    return ray.cluster_resources()


def may_autoscale() -> bool:
    """A cluster named by ``RAY_ADDRESS`` may grow; the local one started here cannot."""
    return bool(os.environ.get("RAY_ADDRESS"))


def check_output_dir(path: str) -> Path:
    """Create the output folder if needed and check it is writable and ours to use.

    A non-empty folder without raydag's marker file is refused rather than touched.
    """
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".raydag-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise RaydagError(f"output_dir {out}: not writable ({err.strerror or err})") from None
    if any(out.iterdir()) and not (out / _OUTPUT_MARKER).exists():
        raise RaydagError(f"output_dir {out}: not empty and not made by raydag (no "
                          f"{_OUTPUT_MARKER} file); choose a new or empty folder")
    return out


def discard_stale_report(path: str) -> None:
    """Remove the report of an earlier run in a raydag output folder, before anything can fail."""
    out = Path(path)
    if (out / _OUTPUT_MARKER).exists():
        for name in ("report.json", "report.md"):
            (out / name).unlink(missing_ok=True)


def prepare_output_dir(path: str) -> Path:
    """Check the output folder (see :func:`check_output_dir`), then clear what a run replaces."""
    out = check_output_dir(path)
    (out / _OUTPUT_MARKER).write_text("raydag output folder; a new run clears it\n")
    discard_stale_report(path)
    for name in _OUTPUT_FOLDERS:
        if (out / name).exists():
            try:
                shutil.rmtree(out / name)  # old shards must never mix with new ones
            except OSError as err:
                raise RaydagError(f"output_dir {out}: cannot clear {name}/ ({err})") from None
    return out


def plan_placement(job: JobConfig, cluster: dict[str, float]) -> dict[str, Any]:
    """Decide and check every resource request before any work runs.

    Raises:
        RaydagError: a request the cluster cannot grant (at once on the local cluster, after
            ``resource_timeout_s`` on one that may autoscale), or fp16 without GPUs.
    """
    teacher, student = job.teacher, job.student
    gpus = cluster.get("GPU", 0.0)
    per_actor = teacher_actor_resources(teacher.num_gpus, teacher.tensor_parallel_size, gpus)
    workers, use_gpu = student_workers(student.num_workers, student.use_gpu, gpus)
    if workers != student.num_workers:
        print(f"raydag: the cluster has {gpus:g} GPU(s): training students on {workers} GPU "
              f"worker(s) instead of student.num_workers={student.num_workers}", flush=True)
    if student.precision == "fp16" and not use_gpu:
        raise RaydagError("student.precision=fp16 needs GPUs; use bf16 or fp32 on CPU hosts")
    fixed = not may_autoscale()
    wait_for_resources(bundle(per_actor), teacher.concurrency,
                       f"the teacher pool ({teacher.concurrency} engine actor(s))",
                       fixed_cluster=fixed, timeout_s=job.resource_timeout_s)
    wait_for_resources(bundle({"num_cpus": 1.0, "num_gpus": 1.0 if use_gpu else 0.0}), workers,
                       f"the students ({workers} Ray Train worker(s))",
                       fixed_cluster=fixed, timeout_s=job.resource_timeout_s)
    return {"teacher_actor": per_actor,
            "teacher_cpu_threads": teacher_cpu_threads(per_actor, teacher.cpu_threads),
            "teacher_gpu_memory": teacher_gpu_memory_share(per_actor["num_gpus"],
                                                           teacher.gpu_memory_utilization),
            "student": student.model_copy(update={"num_workers": workers, "use_gpu": use_gpu})}


def generate(requests, op: Any, job: JobConfig, placement: dict[str, Any]):
    """The teacher stage: request rows -> GenerateStage engine actors -> parsed generations.

    Args:
        requests: A Ray Data dataset of request rows (see ``op.plan_requests``).
        op: The pure operator that builds prompts and parses generations.
        job: The job; its ``teacher`` section sets the engine and the actor pool.
        placement: From :func:`plan_placement`.

    Returns:
        The lazy Ray Data dataset of generated rows.
    """
    teacher = job.teacher
    engine_kwargs = {
        "model": teacher.model,
        "dtype": teacher.dtype,
        "max_model_len": teacher.max_model_len,
        "seed": job.seed,
        "tensor_parallel_size": teacher.tensor_parallel_size,
        "cpu_kv_cache_gib": teacher.cpu_kv_cache_gib,
        "cpu_threads": placement["teacher_cpu_threads"],
        "gpu_memory_utilization": placement["teacher_gpu_memory"],
    }
    return requests.map_batches(
        GenerateStage,
        fn_constructor_kwargs={"op": op, "engine_kwargs": engine_kwargs},
        batch_size=teacher.batch_size,
        batch_format="pandas",
        concurrency=teacher.concurrency,
        runtime_env=teacher_runtime_env(placement["teacher_cpu_threads"]),
        **placement["teacher_actor"],
    )


def run_teacher(job: JobConfig, raw: pd.DataFrame, test: pd.DataFrame, out: Path,
                placement: dict[str, Any], timer: StageTimer) -> dict[str, Any]:
    """Generate, parse, filter and write the synthetic rows; return counts and token totals."""
    import ray

    teacher = job.teacher
    op = FewShotCreateOp(task=job.data.task, labels=job.data.labels, shots=teacher.shots,
                         sampling=teacher.sampling)
    per_label = raw["label"].value_counts()
    for label in job.data.labels:
        if int(per_label.get(label, 0)) < teacher.shots:
            print(f"raydag: warning: label '{label}' has {int(per_label.get(label, 0))} raw "
                  f"example(s), fewer than teacher.shots={teacher.shots}; its requests get fewer "
                  "demonstrations", file=sys.stderr, flush=True)
    plan = op.plan_requests(raw.to_dict("records"), teacher.num_examples, job.seed)
    check_chain(plan[0].keys(), [
        (f"teacher ({op.method})", op.requires, tuple(op.adds) + GenerateStage.adds),
        ("filters", FILTER_REQUIRES, FILTER_ADDS),
        ("lineage", LINEAGE_REQUIRES, LINEAGE_ADDS),
        ("write", _SYNTHETIC_COLUMNS + _AUDIT_COLUMNS, ()),
    ])
    filter_kwargs = {
        "raw_norms": frozenset(raw["text"].map(normalize_text)) if job.filters.drop_raw_duplicates else frozenset(),
        "test_norms": frozenset(test["text"].map(normalize_text)) if job.filters.drop_test_copies else frozenset(),
        "min_chars": job.filters.min_chars,
        "max_chars": job.filters.max_chars,
    }
    with timer("teacher"):
        generated = generate(ray.data.from_items(plan), op, job, placement)
        finished = filter_generations(generated, **filter_kwargs).map_batches(
            add_lineage,
            fn_kwargs={"method": op.method, "teacher_model": teacher.model},
            batch_format="pandas",
        ).materialize()

    with timer("write"):
        from ray.data.expressions import col

        summary = finished.select_columns(
            ["_status", "_reason", "tokens_in", "tokens_out", "_engine_seconds"]).to_pandas()
        present = set(summary["_status"])
        outputs = (("accepted", "synthetic", _SYNTHETIC_COLUMNS),
                   ("dropped", "dropped", _AUDIT_COLUMNS), ("quarantined", "quarantine", _AUDIT_COLUMNS))
        for status, folder, columns in outputs:
            if status in present:
                finished.filter(expr=col("_status") == status).select_columns(columns).write_parquet(
                    str(out / folder), min_rows_per_file=ROWS_PER_SHARD)

    def by_reason(status: str) -> dict[str, int]:
        rows = summary[summary["_status"] == status]
        return {k: int(v) for k, v in rows["_reason"].value_counts().sort_index().items()}

    stage_seconds = max(timer.seconds["teacher"], 1e-9)
    engine_seconds = max(float(summary["_engine_seconds"].sum()), 1e-9)
    tokens_in, tokens_out = int(summary["tokens_in"].sum()), int(summary["tokens_out"].sum())
    return {
        "counts": {
            "requested": len(plan),
            "generated": len(summary),
            "accepted": int((summary["_status"] == "accepted").sum()),
            "quarantined": int((summary["_status"] == "quarantined").sum()),
            "dropped": by_reason("dropped"),
            "quarantined_by_reason": by_reason("quarantined"),
        },
        "written": sorted(folder for status, folder, _ in outputs if status in present),
        "teacher": {
            "model": teacher.model,
            "method": op.method,
            "requests": len(plan),
            "tokens_in": tokens_in,
            "tokens_out": tokens_out,
            # Output tokens per second of engine generate time (one engine; start-up excluded).
            "tokens_per_s": round(tokens_out / engine_seconds, 2),
            "prompt_and_output_tokens_per_s": round((tokens_in + tokens_out) / engine_seconds, 2),
            "engine_seconds": round(engine_seconds, 2),
            # Output tokens per wall second of the whole stage, engine start-up included.
            "stage_tokens_per_s": round(tokens_out / stage_seconds, 2),
        },
    }


def run_students(job: JobConfig, raw: pd.DataFrame, synthetic: pd.DataFrame, test: pd.DataFrame,
                 out: Path, student: StudentConfig, timer: StageTimer) -> dict[str, dict]:
    """Fine-tune and evaluate one student per requested training set."""
    from raydag.train import fit_student

    train_sets = {
        "raw": raw,
        "synthetic": synthetic,
        "mixed": pd.concat([raw[["text", "label"]], synthetic[["text", "label"]]], ignore_index=True),
    }
    results = {}
    for name in student.train_sets:
        rows = train_sets[name]
        if rows.empty:
            raise RaydagError(f"student '{name}': no training rows (did every generation fail?)")
        with timer(f"student_{name}"):
            results[name] = fit_student(
                name, rows["text"].tolist(), rows["label"].tolist(),
                test["text"].tolist(), test["label"].tolist(),
                label_set=job.data.labels, student=student,
                storage_dir=str(out / "students"), seed=job.seed,
            )
    return results


def run_job(job: JobConfig) -> Path:
    """Run a job end to end and return the path of its ``report.json``.

    Raises:
        RaydagError: For bad input, unwritable output, unsatisfiable resources or failed stages;
            no report is written then.
    """
    started = datetime.now(timezone.utc)
    timer = StageTimer()
    discard_stale_report(job.output_dir)  # never leave a report that claims success
    cluster = init_ray()
    import ray

    with timer("read"):
        pool, test = read_inputs(job)
    autoscaling = may_autoscale()
    try:
        placement = plan_placement(job, cluster)
        out = prepare_output_dir(job.output_dir)
        with timer("sample"):
            raw = stratified_sample(pool, job.raw_examples, job.seed)
            ray.data.from_pandas(raw_lineage(raw, job.seed)).write_parquet(str(out / "raw"))
        teacher = run_teacher(job, raw, test, out, placement, timer)
        counts = {"pool": len(pool), "test": len(test), "raw": len(raw), **teacher["counts"]}
        check_counts(counts)
        synthetic = (pd.read_parquet(out / "synthetic") if "synthetic" in teacher["written"]
                     else pd.DataFrame(columns=_SYNTHETIC_COLUMNS))
        students = run_students(job, raw, synthetic, test, out, placement["student"], timer)
    finally:
        if autoscaling:
            release_resource_requests()

    report = {
        "job": job.name,
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "output_dir": str(out),
        "counts": counts,
        "teacher": teacher["teacher"],
        "stages": timer.seconds,
        "students": students,
        "outputs": {name: str(out / name) for name in ["raw", *teacher["written"]]},
        "config": json.loads(job.model_dump_json()),
    }
    path = write_report(out, report)
    print(students_table(students), flush=True)
    return path


def check_counts(counts: dict[str, Any]) -> None:
    """Every requested row came back, and each one is accepted, dropped or quarantined."""
    if counts["generated"] != counts["requested"]:
        raise RaydagError(f"rows lost: requested {counts['requested']}, "
                          f"generated {counts['generated']}")
    settled = counts["accepted"] + counts["quarantined"] + sum(counts["dropped"].values())
    if settled != counts["generated"]:
        raise RaydagError(f"counts do not reconcile: generated {counts['generated']} != "
                          f"accepted + dropped + quarantined = {settled}")


def read_inputs(job: JobConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read and check the training pool and the test split."""
    data = job.data
    pool = read_labelled(data.train_path, data.text_column, data.label_column, data.labels)
    test = read_labelled(data.test_path, data.text_column, data.label_column, data.labels)
    if job.raw_examples > len(pool):
        raise DataError(f"{data.train_path}: raw_examples={job.raw_examples} but the pool has "
                        f"{len(pool)} rows")
    return pool, test


def validate_job(job: JobConfig) -> dict[str, int]:
    """Check a job's data and output folder without generating or training; return row counts."""
    init_ray()
    pool, test = read_inputs(job)
    check_output_dir(job.output_dir)
    return {"pool": len(pool), "test": len(test)}
