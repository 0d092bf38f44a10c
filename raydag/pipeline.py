"""The recipe of a job, start to end: read -> sample -> teacher -> write (dedup, quality passes)
-> measures -> students -> report.

Each step lives in its own module; this one only calls them in order and writes the report:
reading and sampling in :mod:`raydag.data`, placement in :mod:`raydag.resources`, the teacher
stage in :mod:`raydag.teacher`, the output folders, resume and the final write in
:mod:`raydag.outputs`, the students in :mod:`raydag.train`.

Example:
    >>> from raydag import load_job, run_job
    >>> report_path = run_job(load_job("jobs/quickstart.yaml", ["stages.0.num_examples=30"]))  # doctest: +SKIP
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

import pandas as pd

from raydag import console
from raydag.chain import run_signature
from raydag.config import JobConfig, StudentConfig
from raydag.data import raw_lineage, read_inputs, sample_raw
from raydag.errors import JobInterrupted, RaydagError
from raydag.evaluate import student_comparisons
from raydag.filters.pii import redact_frame
from raydag.models import check_model
from raydag.outputs import (accepted_for_measures, accepted_rows, check_output_dir,
                            discard_stale_report, finish_outputs, input_digests, prepare_run_dir)
from raydag.quality import eval_splits, measure
from raydag.report import (StageTimer, students_table, write_datacard, write_partial_report,
                           write_report)
from raydag.resources import (data_shuffle, init_ray, job_shuffle, may_autoscale, plan_placement,
                              release_resource_requests)
from raydag.storage import RunPath, copy_file, display, location, write_dataset
from raydag.teacher import (TeacherProgress, cost_report, engine_pool, generation_health, run_teacher,
                            teacher_totals, warn_unhealthy)


def run_job(job: JobConfig) -> RunPath:
    """Run a job end to end and return the path of its ``report.json``.

    Raises:
        RaydagError: For bad input, unwritable output, unsatisfiable resources or failed stages;
            no report is written then.
    """
    started = datetime.now(timezone.utc)
    discard_stale_report(job.output_dir)  # never leave a report that claims success
    check_job_models(job)
    cluster = init_ray()
    # after init_ray, whose own handler only exits; a small job's shuffles as tasks
    with sigterm_raises(), data_shuffle(job_shuffle(job)):
        if job.loop is not None:  # rounds of this function, steered by the student
            from raydag.loop import run_loop

            return run_loop(job, cluster)
        return _run(job, started, StageTimer(), cluster)


def _run(job: JobConfig, started: datetime, timer: StageTimer, cluster: dict) -> RunPath:
    import ray

    with timer("read"):
        pool, test, inputs, bad_rows = read_inputs(job)
    if bad_rows["total"]:
        console.warn(f"left out {bad_rows['total']} bad input row(s) (data.on_bad_rows=skip): "
                     + ", ".join(f"{k} {v}" for k, v in bad_rows["by_reason"].items())
                     + "; the report lists them")
    autoscaling = may_autoscale()
    run_dir, progress, placement = None, TeacherProgress(), None
    try:
        placement = plan_placement(job, cluster)
        placement["engine_pool"] = engine_pool(job, placement)  # None: in the stage's actors
        console.say(f"teacher dtype {placement['teacher_dtype']['dtype'] or '-'} "
                    f"({placement['teacher_dtype']['reason']}); student precision "
                    f"{placement['student_precision']['precision']} "
                    f"({placement['student_precision']['reason']})")
        signature, settings = run_signature(job, input_digests(job),
                                            teacher_dtype=placement["teacher_dtype"]["dtype"])
        run_dir = prepare_run_dir(job.output_dir, signature, settings)
        console.say(f"run folder {display(run_dir)} (finished shards there are reused)")
        raw, raw_pii = None, {}
        if pool is not None:
            with timer("sample"):
                raw = sample_raw(pool, job)
                if job.quality.pii.enabled:  # before the teacher sees them as demonstrations
                    raw, raw_pii = redact_frame(raw, job.quality.pii.types)
                write_dataset(ray.data.from_pandas(raw_lineage(raw, job.seed)), run_dir / "raw")
        teacher = run_teacher(job, raw, test, inputs, run_dir, placement, timer, progress)
        embeddings: dict = {}  # vectors by text: the quality passes and the measures share them
        students, raw_student = {}, None
        dev = inputs.get("dev")
        if job.quality.consistency.pvi_threshold is not None and "raw" in job.student.train_sets:
            stop_engine_pool(placement)  # the student's workers need the engines' CPUs or GPUs
            students = run_students(job, raw, None, test, dev, run_dir, placement["student"],
                                    timer, only=["raw"])
            raw_student = students["raw"]["checkpoint"]
        with timer("write"):  # dedup, quality passes, output folders
            teacher["outputs"] = finish_outputs(
                job, teacher["finished"], teacher["shard_dir"], run_dir, inputs,
                raw=raw, evals=eval_splits(job, test, dev), raw_student=raw_student,
                placement=placement, embeddings=embeddings, progress=progress)
        stop_engine_pool(placement)  # the teacher's last pass (the rephrasing) is done
        teacher["stats"] = teacher["stats"] + teacher["outputs"]["extra_stats"]
        counts = reconcile(teacher, pool, test, raw)
        quality = {**teacher["outputs"]["quality"], "pii_raw": raw_pii}
        with timer("measures"):
            quality.update(measure(job, accepted_for_measures(
                run_dir, teacher["outputs"]["written"], job.quality.diversity.max_rows, job.seed),
                raw, embeddings=embeddings))
        if job.student.train_sets:
            synthetic = accepted_rows(run_dir, teacher["outputs"]["written"])
            students.update(run_students(job, raw, synthetic, test, dev, run_dir,
                                         placement["student"], timer,
                                         only=[s for s in job.student.train_sets
                                               if s not in students]))
    except (KeyboardInterrupt, JobInterrupted) as err:
        name = getattr(err, "signal_name", "SIGINT")
        report = (write_partial_report(job, run_dir, progress.counts(), timer, name, started)
                  if run_dir is not None else None)
        raise JobInterrupted(name, report) from None
    finally:
        stop_engine_pool(placement)
        if autoscaling:
            release_resource_requests()

    totals = teacher_totals(teacher["stats"])
    health = generation_health(teacher["stats"], job.teacher.warn_unusable_share)
    warn_unhealthy(health, job.teacher.warn_unusable_share)
    report = {
        "job": job.name,
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "output_dir": str(job.output_dir),
        "run_dir": str(run_dir),
        "signature": signature,
        "counts": counts,
        "shards": teacher["shards"],
        "teacher": {"model": job.teacher.model, "engine": job.teacher.engine,
                    "dtype": placement["teacher_dtype"]["dtype"],
                    "dtype_reason": placement["teacher_dtype"]["reason"],
                    "methods": [step.op.name for step in teacher["steps"]], **totals,
                    "stage_seconds": timer.seconds.get("teacher", 0.0),
                    "generation_health": health,
                    # engine actors started over the job, and the seconds their engines took
                    "engine_starts": progress.starts,
                    "engine_load_seconds": round(progress.seconds, 2)},
        "per_stage": teacher["stats"],
        "budget": {**json.loads(job.budget.model_dump_json()),
                   "tokens_used": totals["tokens_in"] + totals["tokens_out"],
                   "exhausted": teacher["budget_exhausted"]},
        "cost": cost_report(job, totals, counts["accepted"], placement,
                            timer.seconds.get("teacher", 0.0)),
        "stages": timer.seconds,
        "students": students,
        "student_comparisons": student_comparisons(students),
        "student_precision": placement["student_precision"],
        "input_bad_rows": bad_rows,
        "log": console.log_path(),
        "quality": quality,
        "outputs": {name: str(run_dir / name)
                    for name in (["raw"] if raw is not None else []) + teacher["outputs"]["written"]},
        "config": json.loads(job.model_dump_json()),
    }
    report = json.loads(display(json.dumps(report)))  # no store credentials in a report
    write_report(run_dir, report)
    write_datacard(run_dir, report)
    out = location(job.output_dir)
    for name in ("report.json", "report.md", "datacard.json", "datacard.md"):  # the latest run's report, at the top
        copy_file(run_dir / name, out / name)
    if students:
        console.show(students_table(students))
    return out / "report.json"


def stop_engine_pool(placement: dict | None) -> None:
    """Stop the job's engine pool, if it has one (a later teacher pass starts it again)."""
    pool = (placement or {}).get("engine_pool")
    if pool is not None:
        pool.stop()


@contextmanager
def sigterm_raises():
    """SIGTERM raises :class:`JobInterrupted` in the main thread while the block runs (as
    SIGINT raises KeyboardInterrupt), so a stopped job writes its partial report."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise JobInterrupted("SIGTERM")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_students(job: JobConfig, raw: pd.DataFrame, synthetic,
                 test: pd.DataFrame, dev: pd.DataFrame | None, out: RunPath, student: StudentConfig,
                 timer: StageTimer, only: list[str] | None = None) -> dict[str, dict]:
    """Fine-tune and evaluate one student per requested training set (``only``: these) and
    seed, each next to its baselines, all in one Ray Train run (one worker group and DeepSpeed
    start-up for every student), and summarise them over seeds.

    ``synthetic`` is the run's accepted rows as a Ray Dataset (:func:`accepted_rows`) or
    ``None``. The dev split is ``dev`` (the job's ``data.dev_path``) or, per seed, a held-out
    share of the raw sample; raw and mixed students then train on the rest of the raw sample.
    """
    from raydag.evaluate import STUDENT_FLAGS, summarise_students
    from raydag.train import fit_students, student_runs

    names = list(only if only is not None else student.train_sets)
    runs = student_runs(names, raw, synthetic, dev, student)
    stage = "students" if only is None or len(names) > 1 else f"student_{names[0]}"
    sizes = {run["name"]: run["train_rows"] for run in runs}
    console.say(f"[{stage}] training " + ", ".join(f"{n} ({k} rows)" for n, k in sizes.items())
                + f" x seeds {student.seeds} on {student.num_workers} Ray Train worker(s), "
                f"{student.precision}; dev {runs[0]['dev_rows']} rows "
                f"({'data.dev_path' if dev is not None else 'held out from the raw sample'})")
    with timer(stage):
        results = summarise_students(fit_students(
            runs, test, label_set=job.data.labels, student=student,
            storage_dir=out / "students", run_name="_".join(names)))
    for name, m in results.items():
        spread = f" ± {m['accuracy_std']:.4f}" if len(m["seeds"]) > 1 else ""
        console.say(f"[student {name}] accuracy {m['accuracy']:.4f}{spread}, macro-F1 "
                    f"{m['macro_f1']:.4f}; linear probe {m['probe']['accuracy']:.4f}, majority "
                    f"class {m['majority']['accuracy']:.4f} ({m['train_seconds']:.0f}s of training)")
        for flag in m["flags"]:
            console.warn(f"student {name}: {STUDENT_FLAGS[flag]}")
    return results


def reconcile(teacher: dict[str, Any], pool, test, raw) -> dict[str, Any]:
    """The run's counts; raise unless rows in = rows out + dropped + quarantined.

    Rows in are the first stage's rows that ran plus the rows stages created; rows the token
    budget left unrun are counted apart.
    """
    stats, outputs = teacher["stats"], teacher["outputs"]
    ran = stats[0]["rows_in"] + stats[0]["passed_through"]
    created = sum(s["created"] for s in stats)
    counts = {
        "pool": len(pool) if pool is not None else 0,
        "test": len(test) if test is not None else 0,
        "raw": len(raw) if raw is not None else 0,
        "planned": teacher["planned"],
        "not_run_budget": teacher["not_run"],
        "ran": ran,
        "created": created,
        "accepted": outputs["accepted"],
        "dropped": outputs["dropped"],
        "quarantined": outputs["quarantined"],
    }
    if ran + teacher["not_run"] != teacher["planned"]:
        raise RaydagError(f"rows lost: planned {teacher['planned']}, ran {ran}, "
                          f"not run {teacher['not_run']}")
    settled = outputs["accepted"] + sum(outputs["dropped"].values()) + sum(outputs["quarantined"].values())
    if settled != ran + created or outputs["rows"] != ran + created:
        raise RaydagError(f"counts do not reconcile: rows in {ran} + created {created} != "
                          f"accepted + dropped + quarantined = {settled}")
    return counts


def validate_job(job: JobConfig) -> dict[str, int]:
    """Check a job's models, data and output folder without generating or training; return
    row counts (``bad_rows``: rows ``data.on_bad_rows: skip`` would leave out)."""
    check_job_models(job)
    init_ray()
    pool, test, inputs, bad_rows = read_inputs(job)
    if pool is not None:
        sample_raw(pool, job)  # the texts the teacher will see must fit its context
    check_output_dir(job.output_dir)
    counts = {"pool": len(pool), "test": len(test)} if pool is not None else {}
    return {**counts, **{name: len(frame) for name, frame in inputs.items()},
            "bad_rows": bad_rows["total"]}


def check_job_models(job: JobConfig) -> None:
    """Check the teacher and student model references before Ray starts any engine.

    Raises:
        ConfigError: naming the key and why the model cannot be loaded.
    """
    if job.teacher.engine == "vllm":
        check_model(job.teacher.model, "teacher.model")
    if job.student.train_sets:
        check_model(job.student.model, "student.model")
