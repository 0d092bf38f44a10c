"""A job, start to end: read -> sample -> teacher stages -> dedup -> write -> students -> report.

Example:
    >>> from raydag import load_job, run_job
    >>> report_path = run_job(load_job("jobs/quickstart.yaml", ["stages.0.num_examples=30"]))  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from raydag import console
from raydag.chain import build_steps, check_contract, create_op, first_rows, run_signature, shard_rows
from raydag.config import JobConfig, StudentConfig
from raydag.data import MAX_TEXT_CHARS, BadRows, raw_lineage, read_labelled, read_texts, stable_hash, stratified_sample
from raydag.errors import DataError, RaydagError
from raydag.evaluate import student_comparisons
from raydag.filters.exact import normalize_text
from raydag.models import cache_dir, check_model, resolve_model
from raydag.ops.create import CreateOp, TopicsOp
from raydag.filters.pii import redact
from raydag.quality import eval_splits, measure
from raydag.report import StageTimer, students_table, write_datacard, write_report
from raydag.resources import (
    actor_pool,
    bundle,
    release_resource_requests,
    student_precision,
    student_workers,
    teacher_actor_resources,
    teacher_dtype,
    teacher_cpu_threads,
    teacher_gpu_memory_share,
    teacher_runtime_env,
    wait_for_resources,
)
from raydag.stages import ChainRunner, Step, deduplicate, merge_stats, shard_path, with_status

_OUTPUT_FOLDERS = ("raw", "synthetic", "dropped", "quarantine", "students", "topics_shard")
ROWS_PER_SHARD = 50_000
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
    # Per process, so also where Ray was started elsewhere (a study cell in a Ray task).
    ctx = ray.data.DataContext.get_current()
    ctx.enable_operator_progress_bars = False  # one overall bar is enough on a terminal
    # Ray 2.60's V2 Parquet reader lists footers in actors placed SPREAD, with no restarts:
    # on an autoscaling cluster one landed on a teacher node that the autoscaler then
    # released as idle, and the read failed ("The actor died because its node has
    # died"). The V1 reader's tasks are retried on another node when theirs goes away.
    ctx.use_datasource_v2 = False
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


def claim_output_dir(path: str) -> Path:
    """:func:`check_output_dir`, then mark the folder as raydag's (its logs may go there)."""
    out = check_output_dir(path)
    (out / _OUTPUT_MARKER).write_text("raydag output folder; raydag may clear what it wrote here\n")
    return out


def discard_stale_report(path: str) -> None:
    """Remove the report of an earlier run in a raydag output folder, before anything can fail."""
    out = Path(path)
    if (out / _OUTPUT_MARKER).exists():
        for name in ("report.json", "report.md"):
            (out / name).unlink(missing_ok=True)


def prepare_run_dir(path: str, signature: str, settings: dict) -> Path:
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
        if (run_dir / name).exists():
            try:
                shutil.rmtree(run_dir / name)  # rebuilt from the shards every run
            except OSError as err:
                raise RaydagError(f"output_dir {out}: cannot clear {name}/ ({err})") from None
    return run_dir


def plan_placement(job: JobConfig, cluster: dict[str, float]) -> dict[str, Any]:
    """Decide and check every resource request before any work runs.

    Raises:
        RaydagError: a request the cluster cannot grant (at once on the local cluster, after
            ``resource_timeout_s`` on one that may autoscale), or fp16 without GPUs.
    """
    teacher, student = job.teacher, job.student
    gpus = cluster.get("GPU", 0.0)
    engine = teacher_placement(teacher, gpus)
    per_actor = engine["teacher_actor"]
    workers, use_gpu = student_workers(student.num_workers, student.use_gpu, gpus)
    if workers != student.num_workers:
        console.say(f"the cluster has {gpus:g} GPU(s): training students on {workers} GPU "
                    f"worker(s) instead of student.num_workers={student.num_workers}")
    precision, precision_reason = student_precision(student.precision, use_gpu)
    if precision == "fp16" and not use_gpu:
        raise RaydagError("student.precision=fp16 needs GPUs; use auto, bf16 or fp32 on CPU hosts")
    fixed = not may_autoscale()
    low = teacher.pool_size[0]  # a pool that may grow needs its minimum to start
    wait_for_resources(bundle(per_actor), low, f"the teacher pool ({low} engine actor(s))",
                       fixed_cluster=fixed, timeout_s=job.resource_timeout_s)
    wait_for_resources(bundle({"num_cpus": 1.0, "num_gpus": 1.0 if use_gpu else 0.0}), workers,
                       f"the students ({workers} Ray Train worker(s))",
                       fixed_cluster=fixed, timeout_s=job.resource_timeout_s)
    return {**engine,
            "student": student.model_copy(update={"num_workers": workers, "use_gpu": use_gpu,
                                                  "precision": precision}),
            "student_precision": {"precision": precision, "reason": precision_reason}}


def teacher_placement(teacher, cluster_gpus: float) -> dict[str, Any]:
    """One engine actor's resources, CPU threads and GPU memory share (the batch stage's
    actors and the scoring endpoint's replicas alike)."""
    if teacher.engine == "openai":  # the model runs elsewhere: an actor is an HTTP client
        per_actor = {"num_cpus": 1.0, "num_gpus": 0.0}
    else:
        per_actor = teacher_actor_resources(teacher.num_gpus, teacher.tensor_parallel_size,
                                            cluster_gpus, teacher.resources)
    dtype, dtype_reason = (("", "the model runs behind teacher.base_url") if teacher.engine == "openai"
                           else teacher_dtype(teacher.dtype, per_actor["num_gpus"] > 0))
    return {"teacher_actor": per_actor,
            "teacher_dtype": {"dtype": dtype, "reason": dtype_reason},
            "teacher_cpu_threads": (None if teacher.engine == "openai"
                                    else teacher_cpu_threads(per_actor, teacher.cpu_threads)),
            "teacher_gpu_memory": teacher_gpu_memory_share(per_actor["num_gpus"],
                                                           teacher.gpu_memory_utilization)}


def engine_spec(job: JobConfig, placement: dict[str, Any]) -> dict[str, Any]:
    """Arguments of :func:`raydag.engines.make_engine` for the job's teacher."""
    teacher = job.teacher
    if teacher.engine == "openai":
        return {"engine": "openai", "model": teacher.model, "base_url": teacher.base_url,
                "api_key_env": teacher.api_key_env, "max_concurrency": teacher.max_concurrency,
                "timeout_s": teacher.request_timeout_s, "max_retries": teacher.max_retries}
    return {
        "engine": "vllm",
        "model": teacher.model,
        "dtype": placement["teacher_dtype"]["dtype"],
        "max_model_len": teacher.max_model_len,
        "seed": job.seed,
        "tensor_parallel_size": teacher.tensor_parallel_size,
        "cpu_kv_cache_gib": teacher.cpu_kv_cache_gib,
        "cpu_threads": placement["teacher_cpu_threads"],
        "gpu_memory_utilization": placement["teacher_gpu_memory"],
    }


def generate(shards, steps: list[Step], job: JobConfig, placement: dict[str, Any], shard_dir: Path):
    """The teacher stage: shard rows -> ChainRunner engine actors -> one summary row per shard.

    Args:
        shards: A Ray Data dataset of shard rows (see :func:`raydag.chain.shard_rows`).
        steps: The operator chain (see :func:`raydag.chain.build_steps`).
        job: The job; its ``teacher`` section sets the engine and the actor pool.
        placement: From :func:`plan_placement`.
        shard_dir: Where the actors write the shard files.

    Returns:
        The lazy Ray Data dataset of shard summaries (``shard``, ``rows``, ``stats``, ``seconds``).
    """
    return shards.map_batches(
        ChainRunner,
        fn_constructor_kwargs={"steps": steps, "engine_spec": engine_spec(job, placement),
                               "shard_dir": str(shard_dir),
                               "pii_types": job.quality.pii.types if job.quality.pii.enabled else []},
        batch_size=1,
        batch_format="pandas",
        concurrency=actor_pool(job.teacher.pool_size),
        runtime_env=teacher_runtime_env(placement["teacher_cpu_threads"]),
        **placement["teacher_actor"],
    )


def ensure_topics(job: JobConfig, placement: dict[str, Any], run_dir: Path) -> list[str] | None:
    """For ``zero_shot_topic``: the teacher's topic list, written once as ``topics.json``."""
    import ray

    stage = job.stages[0]
    if stage.type != "create" or stage.method != "zero_shot_topic":
        return None
    path = run_dir / "topics.json"
    if path.exists():
        return json.loads(path.read_text())
    op = TopicsOp(task=job.data.task, num_topics=stage.num_topics)
    # A small teacher sometimes repeats itself; a list with fewer than half the topics asked
    # for is tried again with a new seed (3 tries), and the longest list is kept.
    attempts, wanted = 3, max(2, -(-stage.num_topics // 2))
    best: list[str] = []
    for attempt in range(attempts):
        seed = job.seed if attempt == 0 else int(stable_hash(job.seed, "topics", attempt, length=8), 16)
        shard_dir = run_dir / "topics_shard" / str(attempt)
        summary = generate(ray.data.from_items(shard_rows(
            with_status([{"request_id": "topics", "request_seed": seed}]), 1)),
            [Step(name="0:create.topics", op=op)], job, placement, shard_dir).take_all()
        frame = pd.read_parquet(shard_path(shard_dir, 0))
        topics = [str(t) for t in frame["topics"].iloc[0]] if "topics" in frame else []
        best = max(best, topics, key=len)
        if len(topics) >= wanted:
            break
        raw_text = frame["_raw_generation"].iloc[0] if "_raw_generation" in frame else ""
        console.warn(f"[topics] try {attempt + 1}/{attempts}: the teacher wrote {len(topics)} "
                     f"distinct topic(s) of {stage.num_topics} (raw: {str(raw_text)[:100]!r}); "
                     + ("trying a new seed" if attempt + 1 < attempts
                        else f"keeping the longest list ({len(best)})"))
    topics = best
    if len(topics) < 2:
        raise RaydagError(f"the teacher wrote fewer than 2 usable topics for zero_shot_topic in "
                          f"{attempts} tries; try another method or teacher")
    path.write_text(json.dumps(topics, indent=2))
    console.say(f"[topics] {len(topics)} topics ({summary[0]['seconds']:.1f}s): "
                f"{'; '.join(topics[:5])}...")
    return topics


def _finished_shards(shard_dir: Path, shards: list[int]) -> dict[int, list[dict]]:
    """Those of ``shards`` already written (the Parquet file is renamed into place last)."""
    done = {}
    for index in shards:
        if os.path.exists(shard_path(shard_dir, index)):
            done[index] = json.loads(Path(shard_path(shard_dir, index, "stats.json")).read_text())
    return done


def run_teacher(job: JobConfig, raw: pd.DataFrame | None, test: pd.DataFrame | None,
                inputs: dict[str, pd.DataFrame], run_dir: Path, placement: dict[str, Any],
                timer: StageTimer) -> dict[str, Any]:
    """Run the chain over every unfinished shard (the outputs are written by finish_outputs)."""
    import ray

    def norms(frame, on: bool) -> frozenset:
        return frozenset(frame["text"].map(normalize_text)) if on and frame is not None else frozenset()

    text_filters = {"raw_norms": norms(raw, job.filters.drop_raw_duplicates),
                    "test_norms": norms(test, job.filters.drop_test_copies),
                    "min_chars": job.filters.min_chars, "max_chars": job.filters.max_chars}
    first = job.stages[0]
    topics = ensure_topics(job, placement, run_dir)
    shots = create_op(job, topics).shots if first.type == "create" else 0
    if shots and raw is not None:
        per_label = raw["label"].value_counts()
        for label in job.data.labels:
            if int(per_label.get(label, 0)) < shots:
                console.warn(f"label '{label}' has {int(per_label.get(label, 0))} raw "
                             f"example(s), fewer than {shots} shot(s); its requests get fewer "
                             "demonstrations")
    steps = build_steps(job, text_filters, topics, raw)
    rounds = first.rounds if first.type == "self_instruct" else 1
    shard_dir = run_dir / "shards"
    max_tokens = job.budget.max_tokens
    shards: list[dict] = []
    resumed, planned, grown = 0, 0, []
    stats: list[dict] = []

    def used() -> int:
        return sum(s["tokens_in"] + s["tokens_out"] for s in stats)

    with timer("teacher"):
        for round_index in range(rounds):
            rows = first_rows(job, raw, inputs, topics, round_index, grown, planned)
            if round_index == 0:
                if not rows:
                    raise RaydagError(f"stage 1 ({first.type}) has no input rows")
                check_contract(rows, steps)
            new = shard_rows(rows, job.teacher.batch_size, first=len(shards))
            shards += new
            planned += len(rows)
            done = _finished_shards(shard_dir, [s["shard"] for s in new])
            resumed += len(done)
            stats = _total_stats(_finished_shards(shard_dir, [s["shard"] for s in shards]))
            todo = [s for s in new if s["shard"] not in done]
            label = f"teacher round {round_index + 1}" if rounds > 1 else "teacher"
            console.say(f"[{label}] {len(rows)} rows in {len(new)} shard(s) of "
                        f"{job.teacher.batch_size}; {len(done)} already done, {len(todo)} to run")
            if todo and not (max_tokens and used() >= max_tokens):
                progress = console.Progress(label, len(rows), done=len(rows) - sum(
                    len(json.loads(s["rows"])) for s in todo))
                stream = generate(ray.data.from_items(todo), steps, job, placement, shard_dir)
                for summary in stream.iter_rows():
                    shard_stats = json.loads(summary["stats"])
                    stats = merge_stats(stats, shard_stats)
                    progress.update(progress.done + shard_stats[0]["rows_in"]
                                    + shard_stats[0]["passed_through"])
                    if max_tokens and used() >= max_tokens:
                        console.warn(f"[teacher] token budget reached ({used()} >= "
                                     f"{max_tokens}); no new shards start")
                        break
                progress.close()
            if max_tokens and used() >= max_tokens:
                break
            if round_index + 1 < rounds:
                grown = novel_tasks(job, inputs, shard_dir, [s["shard"] for s in shards])
    finished = _finished_shards(shard_dir, [s["shard"] for s in shards])
    unrun = [s for s in shards if s["shard"] not in finished]
    budget_exhausted = bool(max_tokens and used() >= max_tokens)
    if unrun and not budget_exhausted:
        raise RaydagError(f"{len(unrun)} shard(s) did not finish: {[s['shard'] for s in unrun][:10]}")
    if not finished:
        raise RaydagError("no shard finished before the token budget ran out; raise budget.max_tokens")
    stats = _total_stats(finished)
    not_run = sum(len(json.loads(s["rows"])) for s in unrun)
    return {"stats": stats, "finished": sorted(finished), "shard_dir": shard_dir,
            "planned": planned, "not_run": not_run,
            "shards": {"total": len(shards), "resumed": resumed,
                       "run": len(finished) - resumed, "not_run": len(unrun)},
            "budget_exhausted": budget_exhausted, "steps": steps}


def _total_stats(finished: dict[int, list[dict]]) -> list[dict]:
    stats: list[dict] = []
    for shard_stats in finished.values():
        stats = merge_stats(stats, shard_stats)
    return stats


def novel_tasks(job: JobConfig, inputs: dict[str, pd.DataFrame], shard_dir: Path,
                shards: list[int]) -> list[dict]:
    """Self-instruct growth: the accepted tasks so far whose instruction passes the novelty
    filter against the seed tasks and the tasks kept before it (in row order)."""
    from raydag.ops.instruct import novelty_filter

    stage = job.stages[0]
    columns = ["id", "instruction", "input", "output", "_status", "_order"]
    frames = [pd.read_parquet(shard_path(shard_dir, i), columns=columns) for i in shards]
    tasks = pd.concat(frames, ignore_index=True)
    tasks = tasks[tasks["_status"] == "accepted"].sort_values("_order")
    verdicts = novelty_filter(tasks["instruction"].tolist(),
                              inputs["seed_tasks"]["instruction"].tolist(), stage.novelty_threshold)
    kept = tasks[[ok for ok, _, _ in verdicts]]
    return kept[["id", "instruction", "input", "output"]].to_dict("records")


def finish_outputs(job: JobConfig, shards: list[int], shard_dir: Path,
                   run_dir: Path, inputs: dict[str, pd.DataFrame], *, raw: pd.DataFrame | None = None,
                   evals: dict[str, list[str]] | None = None,
                   raw_student: str | None = None,
                   placement: dict[str, Any] | None = None,
                   embeddings: dict | None = None) -> dict[str, Any]:
    """Deduplicate across shards, apply the novelty filter and the quality passes
    (:func:`raydag.quality.apply_quality`), and write the output folders."""
    import ray
    from ray.data.expressions import col

    from raydag.quality import apply_quality

    rows = ray.data.read_parquet([shard_path(shard_dir, i) for i in shards])
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
                                                                 run_dir, placement)
    rows = rows.materialize()
    columns = ["_status", "_reason"] + (["pii_redacted"] if "pii_redacted" in rows.columns() else [])
    # counts per block, summed here: O(blocks x reasons) on the driver, nothing per row
    counts = pd.DataFrame(rows.select_columns(columns).map_batches(
        _status_counts, batch_size=None, batch_format="pandas").take_all())
    if counts.empty:
        counts = pd.DataFrame({"_status": [], "_reason": [], "rows": [], "pii": []})
    totals = counts.groupby(["_status", "_reason"], dropna=False)["rows"].sum()
    written = []
    for status, folder in (("accepted", "synthetic"), ("dropped", "dropped"),
                           ("quarantined", "quarantine")):
        if status in totals.index.get_level_values(0):
            rows.filter(expr=col("_status") == status).write_parquet(
                str(run_dir / folder), min_rows_per_file=ROWS_PER_SHARD)
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


def _status_counts(batch: pd.DataFrame) -> pd.DataFrame:
    """Rows of one block by (status, reason), and its PII redactions summed (JSON, on the
    block's first line)."""
    counts = batch.groupby(["_status", "_reason"], dropna=False).size().rename("rows").reset_index()
    pii = _pii_totals(batch.get("pii_redacted", pd.Series(dtype=object)).dropna())
    counts["pii"] = [json.dumps(pii)] + [""] * (len(counts) - 1) if len(counts) else []
    return counts


REPHRASE_FIRST_SHARD = 10**6  # rephrase shards' numbers (and so their rows' _order) start here


def rephrase_flagged(rows, job: JobConfig, raw: pd.DataFrame, run_dir: Path,
                     placement: dict[str, Any]) -> tuple[Any, dict[str, Any], list[dict]]:
    """Rewrite accepted rows that contain a shortcut word of their label (see
    :func:`raydag.measures.bias.bias_report`) with :class:`raydag.ops.reform.RephraseOp`.

    The rewrites run through the same ChainRunner actors into their own resumable shards
    (``runs/<signature>/rephrase/<digest>/``); the flagged rows are replaced by the shard rows
    (the original dropped as ``rephrased`` or kept, plus the rewrite).

    Returns:
        The rows, a summary, and the rephrase step's counters (for the report and the counts).
    """
    import ray
    from ray.data.expressions import col

    from raydag.data import stable_hash
    from raydag.measures.bias import bias_report, flag_rows
    from raydag.ops.reform import RephraseOp

    accepted = rows.filter(expr=col("_status") == "accepted").to_pandas()
    teacher_rows = accepted[accepted["method"] != "raw"]
    settings = job.quality.bias
    report = bias_report(raw["text"].astype(str).tolist(), raw["label"].astype(str).tolist(),
                         teacher_rows["text"].astype(str).tolist(),
                         teacher_rows["label"].astype(str).tolist(),
                         z_min=settings.z_min, min_count=settings.min_count, margin=settings.margin)
    words = flag_rows(teacher_rows["text"].astype(str).tolist(),
                      teacher_rows["label"].astype(str).tolist(), report["shortcut_words"])
    flagged = teacher_rows.assign(shortcut_words=words)
    flagged = flagged[flagged["shortcut_words"].map(len) > 0]
    summary = {"shortcut_words": len(report["shortcut_words"]), "flagged_rows": len(flagged)}
    if flagged.empty:
        return rows, {**summary, "rephrased": 0, "kept_original": 0}, []
    first = [{k: v for k, v in row.items() if k != "_order" and not (
        isinstance(v, float) and pd.isna(v))} for row in flagged.to_dict("records")]
    for row in first:
        row["shortcut_words"] = list(row["shortcut_words"])
    op = RephraseOp(labels=job.data.labels)
    steps = [Step(name="rephrase", op=op)]
    folder = run_dir / "rephrase" / stable_hash(sorted(flagged["id"]), report["shortcut_words"], length=12)
    shards = shard_rows(first, job.teacher.batch_size, first=REPHRASE_FIRST_SHARD)
    done = _finished_shards(folder, [s["shard"] for s in shards])
    todo = [s for s in shards if s["shard"] not in done]
    console.say(f"[rephrase] {len(first)} rows with shortcut words in {len(shards)} shard(s); "
                f"{len(done)} already done")
    if todo:
        for _ in generate(ray.data.from_items(todo), steps, job, placement, folder).iter_rows():
            pass
    finished = _finished_shards(folder, [s["shard"] for s in shards])
    if len(finished) != len(shards):
        raise RaydagError(f"rephrase: {len(shards) - len(finished)} shard(s) did not finish")
    new = pd.concat([pd.read_parquet(shard_path(folder, i)) for i in sorted(finished)],
                    ignore_index=True)
    new["shortcut_words"] = new["shortcut_words"].map(  # one type per column: a JSON list
        lambda words: json.dumps(list(words)) if words is not None and not isinstance(words, str) else words)
    base_columns = rows.columns()
    for column in base_columns:
        if column not in new.columns:
            new[column] = None
    extra = [c for c in new.columns if c not in base_columns]
    orders = frozenset(int(o) for o in flagged["_order"])

    def without_flagged(batch: pd.DataFrame) -> pd.DataFrame:
        batch = batch[~batch["_order"].isin(orders)].copy()
        for column in extra:
            batch[column] = None
        return batch[base_columns + extra]

    new = new[base_columns + extra]
    for column in new.columns:
        new[column] = new[column].astype(object)
    merged = rows.map_batches(without_flagged, batch_format="pandas").union(
        ray.data.from_pandas(new)).materialize()
    stats = _total_stats(finished)
    originals = new[new["id"].isin(flagged["id"])]
    return merged, {**summary, "rephrased": int((originals["_reason"] == "rephrased").sum()),
                    "kept_original": int((originals["_status"] == "accepted").sum())}, stats


def read_accepted(run_dir: Path, written: list[str]) -> pd.DataFrame:
    """The accepted teacher rows (``text``, ``label``, ``method``), without raw rows a stage
    passed on; an empty frame when none was accepted."""
    columns = ["text", "label", "method"]
    if "synthetic" not in written:
        return pd.DataFrame(columns=columns)
    frame = pd.read_parquet(run_dir / "synthetic")
    for column in columns:
        if column not in frame.columns:
            frame[column] = ""
    return frame.loc[frame["method"] != "raw", columns].reset_index(drop=True)


def redact_frame(frame: pd.DataFrame, types: list[str]) -> tuple[pd.DataFrame, dict[str, int]]:
    """The rows with PII redacted in ``text``, and the counts by type."""
    frame, total = frame.copy(), {}
    texts = []
    for text in frame["text"].astype(str):
        text, counts = redact(text, tuple(types))
        texts.append(text)
        for kind, count in counts.items():
            total[kind] = total.get(kind, 0) + count
    frame["text"] = texts
    return frame, dict(sorted(total.items()))


def _mark_not_novel(batch: pd.DataFrame, ids: frozenset) -> pd.DataFrame:
    batch = batch.copy()
    hit = batch["id"].isin(ids) & (batch["_status"] == "accepted")
    batch.loc[hit, "_status"] = "dropped"
    batch.loc[hit, "_reason"] = "not_novel"
    batch.loc[hit, "_stage"] = "novelty"
    return batch


def run_students(job: JobConfig, raw: pd.DataFrame, synthetic: pd.DataFrame | None,
                 test: pd.DataFrame, dev: pd.DataFrame | None, out: Path, student: StudentConfig,
                 timer: StageTimer, only: list[str] | None = None) -> dict[str, dict]:
    """Fine-tune and evaluate one student per requested training set (``only``: these) and
    seed, each next to its baselines, all in one Ray Train run (one worker group and DeepSpeed
    start-up for every student), and summarise them over seeds.

    The dev split is ``dev`` (the job's ``data.dev_path``) or, per seed, a held-out share of
    the raw sample; raw and mixed students then train on the rest of the raw sample.
    """
    from raydag.evaluate import STUDENT_FLAGS, summarise_students
    from raydag.train import fit_students, student_runs

    names = list(only if only is not None else student.train_sets)
    runs = student_runs(names, raw, synthetic, dev, student)
    stage = "students" if only is None or len(names) > 1 else f"student_{names[0]}"
    sizes = {run["name"]: len(run["train"][0]) for run in runs}
    console.say(f"[{stage}] training " + ", ".join(f"{n} ({k} rows)" for n, k in sizes.items())
                + f" x seeds {student.seeds} on {student.num_workers} Ray Train worker(s), "
                f"{student.precision}; dev {len(runs[0]['dev'][0])} rows "
                f"({'data.dev_path' if dev is not None else 'held out from the raw sample'})")
    with timer(stage):
        results = summarise_students(fit_students(
            runs, test["text"].tolist(), test["label"].tolist(), label_set=job.data.labels,
            student=student, storage_dir=str(out / "students"), run_name="_".join(names)))
    for name, m in results.items():
        spread = f" ± {m['accuracy_std']:.4f}" if len(m["seeds"]) > 1 else ""
        console.say(f"[student {name}] accuracy {m['accuracy']:.4f}{spread}, macro-F1 "
                    f"{m['macro_f1']:.4f}; linear probe {m['probe']['accuracy']:.4f}, majority "
                    f"class {m['majority']['accuracy']:.4f} ({m['train_seconds']:.0f}s of training)")
        for flag in m["flags"]:
            console.warn(f"student {name}: {STUDENT_FLAGS[flag]}")
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
    check_job_models(job)
    cluster = init_ray()
    import ray

    with timer("read"):
        pool, test, inputs, bad_rows = read_inputs(job)
    if bad_rows["total"]:
        console.warn(f"left out {bad_rows['total']} bad input row(s) (data.on_bad_rows=skip): "
                     + ", ".join(f"{k} {v}" for k, v in bad_rows["by_reason"].items())
                     + "; the report lists them")
    autoscaling = may_autoscale()
    try:
        placement = plan_placement(job, cluster)
        console.say(f"teacher dtype {placement['teacher_dtype']['dtype'] or '-'} "
                    f"({placement['teacher_dtype']['reason']}); student precision "
                    f"{placement['student_precision']['precision']} "
                    f"({placement['student_precision']['reason']})")
        signature, settings = run_signature(job, input_digests(job),
                                            teacher_dtype=placement["teacher_dtype"]["dtype"])
        run_dir = prepare_run_dir(job.output_dir, signature, settings)
        console.say(f"run folder {run_dir} (finished shards there are reused)")
        raw, raw_pii = None, {}
        if pool is not None:
            with timer("sample"):
                raw = sample_raw(pool, job)
                if job.quality.pii.enabled:  # before the teacher sees them as demonstrations
                    raw, raw_pii = redact_frame(raw, job.quality.pii.types)
                ray.data.from_pandas(raw_lineage(raw, job.seed)).write_parquet(str(run_dir / "raw"))
        teacher = run_teacher(job, raw, test, inputs, run_dir, placement, timer)
        embeddings: dict = {}  # vectors by text: the quality passes and the measures share them
        students, raw_student = {}, None
        dev = inputs.get("dev")
        if job.quality.consistency.pvi_threshold is not None and "raw" in job.student.train_sets:
            students = run_students(job, raw, None, test, dev, run_dir, placement["student"],
                                    timer, only=["raw"])
            raw_student = students["raw"]["checkpoint"]
        with timer("write"):  # dedup, quality passes, output folders
            teacher["outputs"] = finish_outputs(
                job, teacher["finished"], teacher["shard_dir"], run_dir, inputs,
                raw=raw, evals=eval_splits(job, test, dev), raw_student=raw_student,
                placement=placement, embeddings=embeddings)
        teacher["stats"] = teacher["stats"] + teacher["outputs"]["extra_stats"]
        counts = reconcile(teacher, pool, test, raw)
        synthetic = read_accepted(run_dir, teacher["outputs"]["written"])
        quality = {**teacher["outputs"]["quality"], "pii_raw": raw_pii}
        with timer("measures"):
            quality.update(measure(job, synthetic, raw, embeddings=embeddings))
        if job.student.train_sets:
            students.update(run_students(job, raw, synthetic, test, dev, run_dir,
                                         placement["student"], timer,
                                         only=[s for s in job.student.train_sets
                                               if s not in students]))
    finally:
        if autoscaling:
            release_resource_requests()

    totals = teacher_totals(teacher["stats"])
    report = {
        "job": job.name,
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "output_dir": str(Path(job.output_dir)),
        "run_dir": str(run_dir),
        "signature": signature,
        "counts": counts,
        "shards": teacher["shards"],
        "teacher": {"model": job.teacher.model, "engine": job.teacher.engine,
                    "dtype": placement["teacher_dtype"]["dtype"],
                    "dtype_reason": placement["teacher_dtype"]["reason"],
                    "methods": [step.op.name for step in teacher["steps"]], **totals,
                    "stage_seconds": timer.seconds.get("teacher", 0.0)},
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
    write_report(run_dir, report)
    write_datacard(run_dir, report)
    out = Path(job.output_dir)
    for name in ("report.json", "report.md", "datacard.json", "datacard.md"):  # the latest run's report, at the top
        shutil.copyfile(run_dir / name, out / name)
    if students:
        console.show(students_table(students))
    return out / "report.json"


def teacher_totals(stats: list[dict]) -> dict[str, Any]:
    """Requests, tokens and throughput of the teacher over every step."""
    tokens_in = sum(s["tokens_in"] for s in stats)
    tokens_out = sum(s["tokens_out"] for s in stats)
    engine_seconds = max(sum(s["engine_seconds"] for s in stats), 1e-9)
    return {"requests": sum(s["requests"] for s in stats), "tokens_in": tokens_in,
            "tokens_out": tokens_out, "engine_seconds": round(engine_seconds, 2),
            # Output tokens per second of engine generate time (start-up excluded).
            "tokens_per_s": round(tokens_out / engine_seconds, 2)}


def cost_report(job: JobConfig, totals: dict, accepted: int, placement: dict[str, Any],
                teacher_seconds: float) -> dict[str, Any]:
    """Cost of the teacher from the job's prices: GPU-hours (the whole actor pool for the
    stage's wall time) and tokens; and per accepted example. Unpriced parts are left out."""
    prices = job.cost
    # A pool that autoscales is priced at its largest size: an upper bound.
    gpus = placement["teacher_actor"]["num_gpus"] * job.teacher.pool_size[1]
    gpu_hours = gpus * teacher_seconds / 3600
    parts = {}
    if prices.usd_per_gpu_hour is not None:
        parts["gpu_usd"] = gpu_hours * prices.usd_per_gpu_hour
    if prices.usd_per_million_input_tokens is not None:
        parts["input_tokens_usd"] = totals["tokens_in"] / 1e6 * prices.usd_per_million_input_tokens
    if prices.usd_per_million_output_tokens is not None:
        parts["output_tokens_usd"] = totals["tokens_out"] / 1e6 * prices.usd_per_million_output_tokens
    report: dict[str, Any] = {"gpu_hours": round(gpu_hours, 6), **{k: round(v, 6) for k, v in parts.items()}}
    if parts:
        total = sum(parts.values())
        report["total_usd"] = round(total, 6)
        report["usd_per_accepted_example"] = round(total / accepted, 8) if accepted else None
    return report


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
        if path and Path(path).is_file():
            with open(path, "rb") as handle:  # streamed in chunks: files may be large
                digests[name] = hashlib.file_digest(handle, "sha256").hexdigest()
    return digests


def read_inputs(job: JobConfig) -> tuple[pd.DataFrame | None, pd.DataFrame | None,
                                         dict[str, pd.DataFrame], dict[str, Any]]:
    """Read and check the training pool, the test split and the stages' own inputs.

    Returns:
        The pool, the test split, the stages' inputs by name, and the bad rows left out
        (``data.on_bad_rows: skip``; see :meth:`raydag.data.BadRows.summary`).

    Raises:
        DataError: a bad file, or (with ``on_bad_rows: error``) bad rows, naming file and line.
    """
    inputs: dict[str, pd.DataFrame] = {}
    data = job.data
    bad = BadRows(data.on_bad_rows if data is not None else "error")
    limit = data.max_text_chars if data is not None else MAX_TEXT_CHARS
    for stage in job.stages:
        if stage.type == "self_instruct":
            inputs["seed_tasks"] = read_texts(stage.seed_tasks_path, ["instruction", "output"],
                                              ["input"], bad=bad, max_text_chars=limit)
    if data is None:
        return None, None, inputs, bad.summary()
    fits = context_check(job)  # unlabelled texts are all labelled: each must fit
    # Pool texts reach the teacher only when sampled (demonstrations, rows a stage takes in):
    # in error mode a pool text that does not fit fails the job only if it is sampled
    # (sample_raw); skip mode leaves every such row out of the pool, as other bad rows.
    deferred = data.on_bad_rows == "error"
    pool = read_labelled(data.train_path, data.text_column, data.label_column, data.labels,
                         bad=bad, max_text_chars=limit, check=None if deferred else fits,
                         deferred_check=fits if deferred else None)
    test = read_labelled(data.test_path, data.text_column, data.label_column, data.labels,
                         bad=bad, max_text_chars=limit)
    if data.dev_path:
        inputs["dev"] = read_labelled(data.dev_path, data.text_column, data.label_column,
                                      data.labels, bad=bad, max_text_chars=limit)
        if len(inputs["dev"]) > job.student.max_dev_examples:
            inputs["dev"] = stratified_sample(inputs["dev"], job.student.max_dev_examples, job.seed)
    if data.unlabelled_path:
        inputs["unlabelled"] = read_texts(data.unlabelled_path, [data.text_column], bad=bad,
                                          max_text_chars=limit, check=fits).rename(
            columns={data.text_column: "text"})
    if job.raw_examples > len(pool):
        raise DataError(f"{data.train_path}: raw_examples={job.raw_examples} but the pool has "
                        f"{len(pool)} rows" + (" left after skipping bad rows" if bad.rows else ""))
    return pool, test, inputs, bad.summary()


def sample_raw(pool: pd.DataFrame, job: JobConfig) -> pd.DataFrame:
    """The job's raw examples: a stratified sample of the pool (see
    :func:`raydag.data.stratified_sample`).

    Raises:
        DataError: A sampled text does not fit the teacher's context (``file:line: reason``).
    """
    raw = stratified_sample(pool, job.raw_examples, job.seed)
    if "_deferred" not in raw.columns:
        return raw
    problems = raw["_deferred"].dropna().tolist()
    if problems:
        raise DataError(f"{problems[0]} (a sampled raw example"
                        + (f"; {len(problems) - 1} more sampled ones do not fit either"
                           if len(problems) > 1 else "") + ")")
    return raw.drop(columns="_deferred")


def teacher_tokens_per_text(job: JobConfig) -> int:
    """Most teacher tokens one input text may have: the context (``teacher.max_model_len``)
    less room for instructions and output, shared by the texts one request shows (the
    demonstrations of a few-shot request)."""
    first = job.stages[0]
    texts = CreateOp.demonstrations(first.method, first.shots) if first.type == "create" else 1
    output = max((s.sampling.max_tokens for s in job.stages if hasattr(s, "sampling")), default=80)
    return max(16, (job.teacher.max_model_len - 256 - output) // max(texts, 1))


def context_check(job: JobConfig):
    """A check of one input text against the teacher's context (see
    :func:`teacher_tokens_per_text`): returns ``(reason, message)`` for a text that is too
    long, else None. Only texts with more UTF-8 bytes than the limit can have more tokens, so
    most texts are never tokenised, and the tokenizer loads only when one is needed."""
    limit = teacher_tokens_per_text(job)

    @functools.cache
    def tokenizer():
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(resolve_model(job.teacher.model),
                                                 local_files_only=True)
        except Exception:  # a hub id not downloaded here: the engine checks it on the cluster
            return None

    def check(text: str):
        if job.teacher.engine != "vllm" or len(text.encode("utf-8")) <= limit:
            return None
        if tokenizer() is None:
            return None
        count = len(tokenizer()(text, add_special_tokens=False)["input_ids"])
        if count <= limit:
            return None
        return "text_over_context", (
            f"the text has {count:,} teacher tokens, more than the {limit:,} one text may take "
            f"in the teacher's context (teacher.max_model_len={job.teacher.max_model_len})")

    return check


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


def existing_run_dir(job: JobConfig) -> Path:
    """The run folder of an earlier ``raydag run`` of this job (same result settings).

    The folder's signature includes the teacher dtype that ``auto`` chose on the host that
    ran it, so each dtype is tried.

    Raises:
        RaydagError: when no run of these settings exists under ``output_dir``.
    """
    digests = input_digests(job)
    for dtype in dict.fromkeys((job.teacher.dtype, "bfloat16", "float32", "float16")):
        signature, _ = run_signature(job, digests, teacher_dtype=dtype)
        run_dir = Path(job.output_dir) / "runs" / signature
        if run_dir.is_dir():
            return run_dir
    raise RaydagError(f"{job.output_dir}: no run of this job with these settings; run it first")


def check_job_models(job: JobConfig) -> None:
    """Check the teacher and student model references before Ray starts any engine.

    Raises:
        ConfigError: naming the key and why the model cannot be loaded.
    """
    if job.teacher.engine == "vllm":
        check_model(job.teacher.model, "teacher.model")
    if job.student.train_sets:
        check_model(job.student.model, "student.model")
