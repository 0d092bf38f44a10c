"""The teacher stage: shards of requests through the engine actors, resumable by shard.

:func:`run_teacher` plans the first stage's rows into shards, skips the shards a run with the
same settings already wrote, and streams the rest through :func:`generate` (Ray Data
``map_batches`` over :class:`raydag.stages.ChainRunner` actors, one engine each, then
:func:`raydag.stages.publish_shards` tasks that write the shards). The teacher's
other calls go through the same path: the topic list of ``zero_shot_topic``
(:func:`ensure_topics`), self-instruct growth between rounds (:func:`novel_tasks`) and the
rewrite of rows with shortcut words (:func:`rephrase_flagged`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from raydag import console
from raydag.chain import build_steps, check_contract, create_op, first_rows, shard_rows
from raydag.config import JobConfig
from raydag.data import InputRows, raw_lineage, records, stable_hash
from raydag.errors import RaydagError, raise_engine_failure
from raydag.filters.exact import normalize_text
from raydag.ops.create import TopicsOp
from raydag.report import StageTimer
from raydag.engines.served import EnginePool
from raydag.resources import actor_pool, engine_replica_options, teacher_runtime_env
from raydag.stages import (ChainRunner, Step, TokenLedger, finished_shards, merge_stats,
                           publish_shards, rows_per_shard, shard_layout, shard_path, shuffle_partitions,
                           total_stats, warm_publisher, with_status)
from raydag.storage import RunPath, read_dataset, read_frame


def engine_spec(job: JobConfig, placement: dict[str, Any]) -> dict[str, Any]:
    """Arguments of :func:`raydag.engines.make_engine` for the job's teacher."""
    teacher = job.teacher
    if teacher.engine == "openai":
        return {"engine": "openai", "model": teacher.model, "base_url": teacher.base_url,
                "api_key_env": teacher.api_key_env, "max_concurrency": teacher.max_concurrency,
                "timeout_s": teacher.request_timeout_s, "max_retries": teacher.max_retries}
    if teacher.engine == "instant":
        return {"engine": "instant", "model": teacher.model}
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


def shares_engines(job: JobConfig, on_gpus: bool) -> bool:
    """Whether the job's vLLM engines live in an :func:`engine_pool`, loaded once for the job:
    ``teacher.engine_pool`` ``job``; or ``auto`` where the engines run on GPUs (``on_gpus``)
    and the teacher makes more than one pass over them (the topic list and the zero-shot-topic
    stage, self-instruct rounds, the shortcut rephrasing after the stage). Otherwise the
    engines live in the stage's actors, with no Serve start.

    On CPU hosts ``auto`` keeps them in the stage's actors: there the engine computes on every
    core, and Serve's controller and the forwarding actors beside it took up to a tenth of its
    throughput on short requests (``python -m raydag.bench teacher --engine-pool``, 2 cores:
    quickstart 0.870 of plain vLLM against 0.972-0.993; long tail 0.968 against 0.864-0.963),
    more than a small model's load per pass (about 10 s) saves."""
    first, setting = job.stages[0], job.teacher.engine_pool
    if job.teacher.engine != "vllm" or setting == "stage":
        return False
    return setting == "job" or on_gpus and (
        (first.type == "create" and first.method == "zero_shot_topic")
        or (first.type == "self_instruct" and first.rounds > 1)
        or job.quality.bias.rephrase_flagged)


def engine_pool(job: JobConfig, placement: dict[str, Any]) -> EnginePool | None:
    """The job's engine pool (started on first use), or None when its engines live in the
    stage's actors (:func:`shares_engines`): ``teacher.pool_size`` replicas of the engine
    actor's resources, autoscaled on ``batch_size * shards_in_flight`` requests in flight per
    replica (what one actor of a stage keeps in flight)."""
    teacher = job.teacher
    if not shares_engines(job, on_gpus=placement["teacher_actor"]["num_gpus"] > 0):
        return None
    return EnginePool(engine_spec(job, placement), teacher.pool_size,
                      engine_replica_options(placement["teacher_actor"],
                                             placement["teacher_cpu_threads"]),
                      target_ongoing_requests=teacher.batch_size * teacher.shards_in_flight,
                      start_timeout_s=teacher.start_timeout_s)


def generate(shards, steps: list[Step], job: JobConfig, placement: dict[str, Any], shard_dir: RunPath,
             ledger: Any = None):
    """The teacher stage: shard rows -> ChainRunner engine actors -> publish_shards tasks
    (PII redaction and the shard file) -> one summary row per shard.

    The engine's actors only generate; redaction and the write run in CPU tasks beside them,
    on the next shard's time.

    Args:
        shards: A Ray Data dataset of shard rows (see :func:`raydag.chain.shard_rows`).
        steps: The operator chain (see :func:`raydag.chain.build_steps`).
        job: The job; its ``teacher`` section sets the engine and the actor pool.
        placement: From :func:`raydag.resources.plan_placement`; with an ``engine_pool``
            (:func:`engine_pool`), the actors send their requests to it.
        shard_dir: Where the shard files go.
        ledger: A :class:`raydag.stages.TokenLedger` when the job has a token budget; shards
            that find it spent do not start (their summary has ``rows`` -1).

    Returns:
        The lazy Ray Data dataset of shard summaries (``shard``, ``rows``, ``stats``,
        ``started_at``, ``seconds``).
    """
    import ray

    pool = placement.get("engine_pool")
    if pool is not None:  # the job's engines (started on first use); the actors only forward
        spec, actor, runtime_env = pool.spec(), {"num_cpus": 0.0, "num_gpus": 0.0}, None
    else:
        spec, actor = engine_spec(job, placement), placement["teacher_actor"]
        runtime_env = teacher_runtime_env(placement["teacher_cpu_threads"])
    ray.remote(warm_publisher).remote()  # runs while the engines load; nothing waits on it
    return shards.map_batches(
        ChainRunner,
        fn_constructor_kwargs={"steps": steps, "engine_spec": spec,
                               "batch_size": job.teacher.batch_size, "ledger": ledger,
                               "start_timeout_s": job.teacher.start_timeout_s,
                               "stall_timeout_s": job.teacher.stall_timeout_s},
        batch_size=1,
        batch_format="pandas",
        compute=actor_pool(job.teacher.pool_size, job.teacher.shards_in_flight),  # an async actor
        runtime_env=runtime_env,
        **actor,
    ).map_batches(
        publish_shards,
        fn_kwargs={"shard_dir": str(shard_dir),
                   "pii_types": job.quality.pii.types if job.quality.pii.enabled else []},
        batch_size=1,
        batch_format="pandas",
    )


def ensure_topics(job: JobConfig, placement: dict[str, Any], run_dir: RunPath,
                  progress: TeacherProgress) -> list[str] | None:
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
        summary = list(progress.summaries(generate(ray.data.from_items(shard_rows(
            with_status([{"request_id": "topics", "request_seed": seed}]), 1)),
            [Step(name="0:create.topics", op=op)], job, placement, shard_dir)))
        frame = read_frame(shard_path(shard_dir, 0))
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


@dataclass
class ShardPlan:
    """One round of the first stage's rows, cut into shards (see
    :func:`raydag.stages.rows_per_shard`).

    Attributes:
        size: Rows per shard (the last one may hold fewer).
        sizes: Rows per shard, by shard number.
        sample: The first rows, for the column contract.
        dataset: Shard numbers -> the Ray Data dataset of those shards (``shard``, ``rows``:
            a JSON list of row dicts).
    """

    size: int
    sizes: dict[int, int]
    sample: list[dict]
    dataset: Callable[[list[int]], Any]


def plan_round(job: JobConfig, raw: pd.DataFrame | None, inputs: dict[str, pd.DataFrame],
               topics: list[str] | None, round_index: int, grown: list[dict], planned: int,
               first_shard: int, shard_dir: RunPath) -> ShardPlan:
    """The shards of a round. A ``create`` stage's requests are planned by Ray Data tasks,
    each making the requests of its own shards (:meth:`CreateOp.plan_range`) from the raw
    rows in the object store, so the driver holds the shard sizes, not the requests; other
    first stages (row-in stages, self-instruct rounds) plan their rows here
    (:func:`raydag.chain.first_rows`)."""
    import ray

    first = job.stages[0]

    def layout(total: int) -> tuple[int, dict[int, int]]:
        size = shard_layout(shard_dir, f"round-{round_index}", legacy=job.teacher.batch_size,
                            wanted=rows_per_shard(total, job.teacher.batch_size,
                                                  job.teacher.rows_per_shard))
        return size, {first_shard + i: min(size, total - i * size) for i in range(-(-total // size))}

    if first.type == "label" and first.mode == "annotate":
        return _plan_input_rows(job, inputs["unlabelled"], planned, first_shard, layout)
    if first.type != "create":
        rows = first_rows(job, raw, inputs, topics, round_index, grown, planned)
        size, sizes = layout(len(rows))
        by_number = {s["shard"]: s for s in shard_rows(rows, size, first=first_shard)}
        return ShardPlan(size=size, sizes=sizes, sample=rows[:8],
                         dataset=lambda todo: ray.data.from_items([by_number[s] for s in todo]))
    op = create_op(job, topics)
    total = op.request_count(first.num_examples)
    if job.budget.max_requests is not None:
        total = min(total, max(job.budget.max_requests - planned, 0))
    size, sizes = layout(total)
    raw_rows = raw.to_dict("records")

    def dataset(todo: list[int]):
        settings = {"op": op, "raw_rows": [ray.put(raw_rows)], "num_examples": first.num_examples,
                    "seed": job.seed, "size": size, "first_shard": first_shard, "total": total}
        # One shard per planning task, so each shard reaches the engine actors as its own
        # block: a budget that runs out stops new shards (a block of many would run them all).
        return ray.data.from_items([{"shard": s} for s in todo]).map_batches(
            _plan_create_shards, fn_kwargs=settings, batch_size=1, batch_format="pandas")

    sample = with_status(op.plan_range(raw_rows, first.num_examples, job.seed, 0, min(total, 8)))
    return ShardPlan(size=size, sizes=sizes, sample=sample, dataset=dataset)


def _plan_input_rows(job: JobConfig, unlabelled: InputRows, planned: int, first_shard: int,
                     layout: Callable[[int], tuple[int, dict[int, int]]]) -> ShardPlan:
    """The shards of a label stage over the unlabelled input: its rows, read and numbered in
    Ray Data (:func:`raydag.data.read_texts_in_ray`), grouped into shards by Ray Data
    (``groupby`` on the shard number), so no row passes through the driver."""
    from ray.data.expressions import col

    total = unlabelled.count
    if job.budget.max_requests is not None:
        total = min(total, max(job.budget.max_requests - planned, 0))
    size, sizes = layout(total)
    sample = with_status(records(raw_lineage(unlabelled.head(8), job.seed, method="input")))

    def dataset(todo: list[int]):
        settings = {"size": size, "first_shard": first_shard, "todo": frozenset(todo)}
        shards = unlabelled.dataset.filter(expr=col("_row") < total).map_batches(
            _with_shard, fn_kwargs=settings, batch_format="pandas").groupby(
            "shard", num_partitions=shuffle_partitions(unlabelled.dataset.size_bytes())).map_groups(
            _input_shard, fn_kwargs={"seed": job.seed}, batch_format="pandas")
        # One shard per block, so a token budget that runs out stops new shards.
        return shards.repartition(len(todo))

    return ShardPlan(size=size, sizes=sizes, sample=sample, dataset=dataset)


def _with_shard(batch: pd.DataFrame, size: int, first_shard: int, todo: frozenset) -> pd.DataFrame:
    batch = batch.assign(shard=first_shard + batch["_row"] // size)
    return batch[batch["shard"].isin(todo)]


def _input_shard(group: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Ray Data task: one shard's rows of the unlabelled input, in file order, as the chain
    takes them (lineage and status columns)."""
    group = group.sort_values("_row")
    rows = with_status(records(raw_lineage(group[["id", "text"]], seed, method="input")))
    return pd.DataFrame({"shard": [int(group["shard"].iloc[0])], "rows": [json.dumps(rows)]})


def _plan_create_shards(batch: pd.DataFrame, *, op, raw_rows: list, num_examples: int, seed: int,
                        size: int, first_shard: int, total: int) -> pd.DataFrame:
    """Ray Data task: the request rows of these shards of a create plan."""
    from raydag.stages import shared_object

    raw = shared_object(raw_rows[0])
    out = []
    for shard in batch["shard"].tolist():
        start = (int(shard) - first_shard) * size
        rows = with_status(op.plan_range(raw, num_examples, seed, start, min(start + size, total)))
        out.append({"shard": int(shard), "rows": json.dumps(rows)})
    return pd.DataFrame(out)


@dataclass
class TeacherProgress:
    """The teacher's bookkeeping over a job: the stage's shards as they are planned, so that a
    job stopped part-way can still report what finished (:meth:`counts`), and the engine
    starts the shard summaries report (``starts``, ``seconds``: the report's
    ``teacher.engine_starts`` and ``engine_load_seconds``).

    Attributes:
        shard_dir: The stage's shard folder (None until the stage starts).
        shards: Rows per planned shard, every round's so far.
        engines: Seconds each engine that made shards took to start, by engine id; ``starts``
            (their number) and ``seconds`` (their sum) are the report's.
    """

    shard_dir: RunPath | None = None
    shards: dict[int, int] = field(default_factory=dict)
    engines: dict[str, float] = field(default_factory=dict)

    @property
    def starts(self) -> int:
        return len(self.engines)

    @property
    def seconds(self) -> float:
        return sum(self.engines.values())

    def summaries(self, stream):
        """The shard summaries of a :func:`generate` stream, counting the engines that made
        them (each shard names the engines that answered it); an engine that could not start, or a stalled
        stage, fails here with the actor's own message."""
        try:
            for summary in stream.iter_rows():
                self.engines.update(json.loads(summary["engines"]))
                yield summary
        except Exception as err:
            raise_engine_failure(err)
            raise

    def counts(self) -> dict[str, Any]:
        """Counts over the shards written so far, read from their files (a shard in flight
        when the job stopped is not written, and its rows count as not run): ``planned`` =
        ``ran`` + ``not_run``, and ``ran`` + ``created`` = ``accepted`` + dropped + quarantined."""
        finished = finished_shards(self.shard_dir, list(self.shards)) if self.shard_dir else {}
        stats = total_stats(finished)
        ran = stats[0]["rows_in"] + stats[0]["passed_through"] if stats else 0
        outcome: dict[str, Any] = {"accepted": 0, "dropped": {}, "quarantined": {}}
        for shard in finished:
            frame = read_frame(shard_path(self.shard_dir, shard), columns=["_status", "_reason"])
            for (status, reason), n in frame.value_counts(["_status", "_reason"]).items():
                if status == "accepted":
                    outcome["accepted"] += int(n)
                else:
                    outcome[status][reason] = outcome[status].get(reason, 0) + int(n)
        planned = sum(self.shards.values())
        return {"planned": planned, "ran": ran, "not_run": planned - ran,
                "created": sum(s["created"] for s in stats), **outcome,
                "shards": {"total": len(self.shards), "finished": len(finished)}}


def run_teacher(job: JobConfig, raw: pd.DataFrame | None, test: pd.DataFrame | None,
                inputs: dict[str, pd.DataFrame], run_dir: RunPath, placement: dict[str, Any],
                timer: StageTimer, progress: TeacherProgress) -> dict[str, Any]:
    """Run the chain over every unfinished shard (the outputs are written by finish_outputs).
    ``progress`` follows the planned shards and engine starts, for the report (a partial one
    if the job is stopped)."""
    def norms(frame, on: bool) -> frozenset:
        return frozenset(frame["text"].map(normalize_text)) if on and frame is not None else frozenset()

    text_filters = {"raw_norms": norms(raw, job.filters.drop_raw_duplicates),
                    "test_norms": norms(test, job.filters.drop_test_copies),
                    "min_chars": job.filters.min_chars, "max_chars": job.filters.max_chars}
    first = job.stages[0]
    topics = ensure_topics(job, placement, run_dir, progress)
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
    progress.shard_dir = shard_dir
    shards = progress.shards  # rows per shard, every round's
    resumed, planned, grown = 0, 0, []
    stats: list[dict] = []
    finished: dict[int, list[dict]] = {}  # shard -> step counters; each shard's read once

    def used() -> int:
        return sum(s["tokens_in"] + s["tokens_out"] for s in stats)

    with timer("teacher"):
        for round_index in range(rounds):
            plan = plan_round(job, raw, inputs, topics, round_index, grown, planned,
                              first_shard=len(shards), shard_dir=shard_dir)
            if round_index == 0:
                if not plan.sizes:
                    raise RaydagError(f"stage 1 ({first.type}) has no input rows")
                check_contract(plan.sample, steps)
            rows = sum(plan.sizes.values())
            shards.update(plan.sizes)
            planned += rows
            done = finished_shards(shard_dir, list(plan.sizes))
            resumed += len(done)
            finished.update(done)
            stats = total_stats(finished)
            todo = [s for s in plan.sizes if s not in done]
            label = f"teacher round {round_index + 1}" if rounds > 1 else "teacher"
            console.say(f"[{label}] {rows} rows in {len(plan.sizes)} shard(s) of {plan.size} "
                        f"(engine batches of {job.teacher.batch_size}); {len(done)} already "
                        f"done, {len(todo)} to run")
            if todo and not (max_tokens and used() >= max_tokens):
                bar = console.Progress(label, rows, done=rows - sum(plan.sizes[s] for s in todo))
                ledger = TokenLedger.remote(used(), max_tokens) if max_tokens else None
                stream = generate(plan.dataset(todo), steps, job, placement, shard_dir, ledger)
                # The stream runs to its end: once the ledger is spent, the remaining shards
                # come back unstarted at once, and the shards in flight still get written.
                warned = False
                for summary in progress.summaries(stream):
                    if summary["rows"] < 0:
                        continue
                    shard_stats = json.loads(summary["stats"])
                    finished[int(summary["shard"])] = shard_stats
                    stats = merge_stats(stats, shard_stats)
                    bar.update(bar.done + shard_stats[0]["rows_in"]
                               + shard_stats[0]["passed_through"])
                    if max_tokens and used() >= max_tokens and not warned:
                        warned = True
                        console.warn(f"[teacher] token budget reached ({used()} >= "
                                     f"{max_tokens}); no new shards start")
                bar.close()
            if max_tokens and used() >= max_tokens:
                break
            if round_index + 1 < rounds:
                grown = novel_tasks(job, inputs, shard_dir, list(shards))
    # Shards that were in flight when the budget stopped the stream may have finished since.
    finished.update(finished_shards(shard_dir, [s for s in shards if s not in finished]))
    unrun = [s for s in shards if s not in finished]
    budget_exhausted = bool(max_tokens and used() >= max_tokens)
    if unrun and not budget_exhausted:
        raise RaydagError(f"{len(unrun)} shard(s) did not finish: {unrun[:10]}")
    if not finished:
        raise RaydagError("no shard finished before the token budget ran out; raise budget.max_tokens")
    stats = total_stats(finished)
    not_run = sum(shards[s] for s in unrun)
    return {"stats": stats, "finished": sorted(finished), "shard_dir": shard_dir,
            "planned": planned, "not_run": not_run,
            "shards": {"total": len(shards), "resumed": resumed,
                       "run": len(finished) - resumed, "not_run": len(unrun)},
            "budget_exhausted": budget_exhausted, "steps": steps}


def novel_tasks(job: JobConfig, inputs: dict[str, pd.DataFrame], shard_dir: RunPath,
                shards: list[int]) -> list[dict]:
    """Self-instruct growth: the accepted tasks so far whose instruction passes the novelty
    filter against the seed tasks and the tasks kept before it (in row order)."""
    from raydag.ops.instruct import novelty_filter

    stage = job.stages[0]
    columns = ["id", "instruction", "input", "output", "_status", "_order"]
    frames = [read_frame(shard_path(shard_dir, i), columns=columns) for i in shards]
    tasks = pd.concat(frames, ignore_index=True)
    tasks = tasks[tasks["_status"] == "accepted"].sort_values("_order")
    verdicts = novelty_filter(tasks["instruction"].tolist(),
                              inputs["seed_tasks"]["instruction"].tolist(), stage.novelty_threshold)
    kept = tasks[[ok for ok, _, _ in verdicts]]
    return kept[["id", "instruction", "input", "output"]].to_dict("records")


REPHRASE_FIRST_SHARD = 10**6  # rephrase shards' numbers (and so their rows' _order) start here


def rephrase_flagged(rows, job: JobConfig, raw: pd.DataFrame, run_dir: RunPath,
                     placement: dict[str, Any], progress: TeacherProgress | None = None
                     ) -> tuple[Any, dict[str, Any], list[dict]]:
    """Rewrite accepted rows that contain a shortcut word of their label (see
    :func:`raydag.measures.bias.bias_report`) with :class:`raydag.ops.reform.RephraseOp`.

    Every step is a Ray Data pass; the driver holds word counts per label, never rows:

    1. each block counts its accepted teacher rows' words per label; the driver adds the
       counts and finds the shortcut words against the raw sample;
    2. each block flags its rows holding a shortcut word of their label; the flagged rows are
       grouped into shards by a hash of their id (``groupby``), each shard's rows in row order;
    3. the shards run through the same ChainRunner actors into their own resumable folder
       (``runs/<signature>/rephrase/<digest of the flagged ids and the words>/``);
    4. the rows minus the flagged ones, and the shard rows (the original dropped as
       ``rephrased`` or kept, plus the rewrite), are the result.

    Returns:
        The rows, a summary, and the rephrase step's counters (for the report and the counts).
    """
    from ray.data.expressions import col

    from raydag.measures.bias import add_counts, shortcut_words_from_counts
    from raydag.ops.reform import RephraseOp

    teacher_rows = rows.filter(expr=(col("_status") == "accepted") & (col("method") != "raw"))
    counts = add_counts([json.loads(part["counts"]) for part in teacher_rows.map_batches(
        _word_counts, batch_size=None, batch_format="pandas").take_all()])
    settings = job.quality.bias
    words = shortcut_words_from_counts(raw["text"].astype(str).tolist(),
                                       raw["label"].astype(str).tolist(), counts,
                                       z_min=settings.z_min, min_count=settings.min_count,
                                       margin=settings.margin)
    flagged = teacher_rows.map_batches(_flagged_rows, fn_kwargs={"words": words},
                                       batch_format="pandas").materialize()
    ids = flagged.map_batches(_id_digest, batch_size=None, batch_format="pandas").take_all()
    count = sum(int(part["rows"]) for part in ids)
    summary = {"shortcut_words": len(words), "flagged_rows": count}
    if not count:
        return rows, {**summary, "rephrased": 0, "kept_original": 0}, []
    op = RephraseOp(labels=job.data.labels)
    steps = [Step(name="rephrase", op=op)]
    digest = sum(int(part["digest"]) for part in ids) % (1 << 64)  # any order of blocks
    folder = run_dir / "rephrase" / stable_hash(count, digest, words, length=12)
    size = shard_layout(folder, "rephrase", legacy=job.teacher.batch_size,
                        wanted=rows_per_shard(count, job.teacher.batch_size,
                                              job.teacher.rows_per_shard))
    shards = [REPHRASE_FIRST_SHARD + i for i in range(-(-count // size))]
    done = finished_shards(folder, shards)
    todo = frozenset(s for s in shards if s not in done)
    console.say(f"[rephrase] {count} rows with shortcut words in {len(shards)} shard(s); "
                f"{len(done)} already done")
    finished = dict(done)
    if todo:
        payload = flagged.map_batches(_rephrase_shard_of, fn_kwargs={
            "shards": len(shards), "todo": todo}, batch_format="pandas").groupby(
            "shard", num_partitions=shuffle_partitions(flagged.size_bytes())).map_groups(
            _rephrase_shard, batch_format="pandas").repartition(len(todo))
        for done_shard in (progress or TeacherProgress()).summaries(
                generate(payload, steps, job, placement, folder)):
            finished[int(done_shard["shard"])] = json.loads(done_shard["stats"])
    if len(finished) != len(shards):
        raise RaydagError(f"rephrase: {len(shards) - len(finished)} shard(s) did not finish")
    new = read_dataset([shard_path(folder, s) for s in shards])
    base_columns = rows.columns()
    columns = base_columns + [c for c in new.columns() if c not in base_columns]
    kept = rows.map_batches(_without_flagged, fn_kwargs={"words": words, "columns": columns},
                            batch_format="pandas")
    rewritten = new.map_batches(_aligned, fn_kwargs={"columns": columns},
                                batch_format="pandas").materialize()
    outcome = {"rephrased": 0, "kept_original": 0}
    for part in rewritten.map_batches(_rephrase_outcome, fn_kwargs={"op": op.name}, batch_size=None,
                                      batch_format="pandas").take_all():
        for key in outcome:
            outcome[key] += int(part[key])
    return kept.union(rewritten).materialize(), {**summary, **outcome}, total_stats(finished)


def _word_counts(batch: pd.DataFrame) -> pd.DataFrame:
    """Ray Data task: a block's word counts per label (:func:`raydag.measures.bias.synthetic_counts`)."""
    from raydag.measures.bias import synthetic_counts

    counts = synthetic_counts(batch["text"].astype(str).tolist(), batch["label"].astype(str).tolist())
    return pd.DataFrame({"counts": [json.dumps(counts)]})


def _shortcuts_in(batch: pd.DataFrame, words: list[dict]) -> list[list[str]]:
    from raydag.measures.bias import flag_rows

    return flag_rows(batch["text"].astype(str).tolist(), batch["label"].astype(str).tolist(), words)


def _flagged_rows(batch: pd.DataFrame, words: list[dict]) -> pd.DataFrame:
    """Ray Data task: the rows holding a shortcut word of their label, with the words."""
    found = _shortcuts_in(batch, words)
    keep = [bool(found_words) for found_words in found]
    return batch[keep].assign(shortcut_words=[json.dumps(w) for w in found if w])


def _id_digest(batch: pd.DataFrame) -> pd.DataFrame:
    """Ray Data task: a block's flagged rows and the sum of their ids' hashes (the driver adds
    the sums: a digest of the flagged set whatever the blocks)."""
    total = sum(int(stable_hash(i), 16) for i in batch["id"].astype(str)) % (1 << 64)
    return pd.DataFrame({"rows": [len(batch)], "digest": [str(total)]})


def _rephrase_shard_of(batch: pd.DataFrame, shards: int, todo: frozenset) -> pd.DataFrame:
    shard = [REPHRASE_FIRST_SHARD + int(stable_hash(i), 16) % shards for i in batch["id"].astype(str)]
    batch = batch.assign(shard=shard)
    return batch[batch["shard"].isin(todo)]


def _rephrase_shard(group: pd.DataFrame) -> pd.DataFrame:
    """Ray Data task: one rephrase shard's rows, in row order, as the chain takes them."""
    group = group.sort_values("_order")
    rows = []
    for row in group.drop(columns=["shard", "_order"]).to_dict("records"):
        row = {k: v for k, v in row.items() if not (isinstance(v, float) and pd.isna(v))}
        row["shortcut_words"] = json.loads(row["shortcut_words"])
        rows.append({k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in row.items()})
    return pd.DataFrame({"shard": [int(group["shard"].iloc[0])], "rows": [json.dumps(rows)]})


def _without_flagged(batch: pd.DataFrame, words: list[dict],
                     columns: list[str]) -> pd.DataFrame:
    """Ray Data task: the rows that were not rephrased (every column of the result)."""
    teacher = (batch["_status"] == "accepted") & (batch["method"] != "raw")
    flagged = teacher & pd.Series([bool(w) for w in _shortcuts_in(batch, words)], index=batch.index)
    return _aligned(batch[~flagged], columns)


def _aligned(batch: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """The columns in this order, missing ones as None; ``shortcut_words`` as a JSON list."""
    batch = batch.copy()
    for column in columns:
        if column not in batch.columns:
            batch[column] = pd.Series([None] * len(batch), index=batch.index, dtype=object)
    if "shortcut_words" in batch.columns:
        batch["shortcut_words"] = [json.dumps(list(w)) if w is not None and not isinstance(w, str) else w
                                   for w in batch["shortcut_words"]]
    return batch[columns]


def _rephrase_outcome(batch: pd.DataFrame, op: str) -> pd.DataFrame:
    """Ray Data task: of a block's flagged originals, how many were replaced or kept."""
    original = batch["method"] != op
    return pd.DataFrame({"rephrased": [int((original & (batch["_reason"] == "rephrased")).sum())],
                         "kept_original": [int((original & (batch["_status"] == "accepted")).sum())]})


def teacher_totals(stats: list[dict]) -> dict[str, Any]:
    """Requests, tokens and throughput of the teacher over every step."""
    tokens_in = sum(s["tokens_in"] for s in stats)
    tokens_out = sum(s["tokens_out"] for s in stats)
    engine_seconds = max(sum(s["engine_seconds"] for s in stats), 1e-9)
    return {"requests": sum(s["requests"] for s in stats), "tokens_in": tokens_in,
            "tokens_out": tokens_out, "engine_seconds": round(engine_seconds, 2),
            # Output tokens per second of engine generate time (start-up excluded).
            "tokens_per_s": round(tokens_out / engine_seconds, 2)}


def generation_health(stats: list[dict], warn_share: float) -> dict[str, dict]:
    """Per step that called the engine: how many of its generated rows were quarantined as
    unusable, their share of the step's output rows, the reasons, and whether the share
    passes ``warn_share`` (a prompt or a constraint that the model does not follow; other
    tools drop such rows silently)."""
    health = {}
    for step in stats:
        if not step["requests"]:
            continue
        outputs = step["rows_in"] + step["created"]
        unusable = sum(step["quarantined"].values())
        share = unusable / outputs if outputs else 0.0
        health[step["stage"]] = {"requests": step["requests"], "rows": outputs,
                                 "unusable": unusable, "share": round(share, 4),
                                 "reasons": dict(step["quarantined"]), "warn": share > warn_share}
    return health


def warn_unhealthy(health: dict[str, dict], warn_share: float) -> None:
    """Say which steps passed the unusable share, with their top reasons."""
    for stage, h in health.items():
        if h["warn"]:
            reasons = ", ".join(f"{r} {n}" for r, n in sorted(h["reasons"].items(),
                                                               key=lambda kv: -kv[1])[:3])
            console.warn(f"[{stage}] {h['unusable']} of {h['rows']} generated rows "
                         f"({h['share']:.0%}) were unusable ({reasons}); above "
                         f"teacher.warn_unusable_share={warn_share:g}: check the prompt, "
                         "max_tokens or the model")


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
