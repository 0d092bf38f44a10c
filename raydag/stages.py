"""Ray Data glue: the actor that owns an engine and runs a job's chain of pure operators.

Rows stream through every stage of a job inside one actor per engine: a shard goes in, every
operator of the chain runs on its accepted rows in turn, and the shard's rows (accepted,
dropped and quarantined alike) go on to a CPU task (:func:`publish_shards`) that redacts PII
and writes them as one Parquet file. Nothing is collected on the driver between stages, and a
model is loaded once per actor rather than once per stage.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import pickle
import socket
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from raydag.data import stable_hash
from raydag.engines.base import ChatRequest
from raydag.errors import ColumnContractError, EngineStartError, StageStalled
from raydag.filters.exact import later_copies, row_filter_reason, text_key
from raydag.storage import RunPath, location, read_schema, write_atomically, write_table


def check_columns(stage: str, required: Iterable[str], available: Iterable[str]) -> None:
    """Raise before any work runs when ``stage`` needs a column its input lacks."""
    available = set(available)
    missing = [c for c in required if c not in available]
    if missing:
        raise ColumnContractError(
            f"stage '{stage}' needs column(s) {missing}, but its input has {sorted(available)}"
        )


def check_dataset_columns(stage: str, required: Iterable[str], rows: Any) -> None:
    """:func:`check_columns` for a Ray Data dataset; skipped when its schema is not known
    without executing it."""
    schema = rows.schema(fetch_if_missing=False)
    if schema is not None:
        check_columns(stage, required, schema.names)


def check_chain(columns: Iterable[str], stages: list[tuple[str, Iterable[str], Iterable[str]]]) -> None:
    """Check a chain of ``(name, requires, adds)`` stages against the first stage's input columns.

    Raises:
        ColumnContractError: naming the first stage and column that would be missing.
    """
    available = set(columns)
    for name, requires, adds in stages:
        check_columns(name, requires, available)
        available |= set(adds)


# Columns every row carries through the chain: where it stands, and why.
STATUS_COLUMNS = ("_status", "_reason", "_stage")
_ACCEPTED = {"_status": "accepted", "_reason": "", "_stage": ""}


def with_status(rows: Iterable[dict]) -> list[dict]:
    """Rows entering the chain: every one accepted until a stage says otherwise."""
    return [{**row, **_ACCEPTED} for row in rows]


def shard_path(folder: str | os.PathLike, shard: int, suffix: str = "parquet") -> RunPath:
    """Where shard ``shard`` keeps its rows and step counters (``parquet``); ``stats.json``
    held the counters of shards written before they moved into the Parquet footer. ``folder``
    may be a path or a store's URI (:func:`raydag.storage.location`)."""
    return location(folder) / f"shard-{int(shard):05d}.{suffix}"
# Columns the runner adds to every row an operator creates.
RUNNER_ADDS = ("method", "teacher_model", "prompt_hash", "sampling", "seed", "_raw_generation",
               "finish_reason", "tokens_in", "tokens_out")


@dataclass
class Step:
    """One operator of the chain, with the rule filters for the texts it creates.

    Attributes:
        name: Stage name in counts and errors, e.g. ``1:create.few_shot_3``.
        op: The pure operator (see :mod:`raydag.ops.base`).
        text_filters: Arguments of :func:`raydag.filters.exact.row_filter_reason` for rows the
            operator creates (None: no filter).
    """

    name: str
    op: Any
    text_filters: dict | None = None


def empty_stats(name: str) -> dict:
    """Counters of one step (summed over shards by :func:`merge_stats`)."""
    return {"stage": name, "rows_in": 0, "passed_through": 0, "created": 0, "requests": 0,
            "tokens_in": 0, "tokens_out": 0, "engine_seconds": 0.0, "accepted": 0,
            "dropped": {}, "quarantined": {}}


def merge_stats(total: list[dict], more: list[dict]) -> list[dict]:
    """Add one shard's step counters to the running totals (same steps, same order)."""
    if not total:
        return json.loads(json.dumps(more))
    for into, add in zip(total, more):
        for key, value in add.items():
            if isinstance(value, dict):
                for reason, count in value.items():
                    into[key][reason] = into[key].get(reason, 0) + count
            elif key != "stage":
                into[key] += value
    return total


def _request_lineage(request: ChatRequest) -> dict:
    sampling = {"temperature": request.temperature, "top_p": request.top_p,
                "max_tokens": request.max_tokens, "stop": list(request.stop)}
    return {"sampling": json.dumps(sampling, sort_keys=True),
            "seed": -1 if request.seed is None else int(request.seed)}


def run_step(step: Step, rows: list[dict], engine: Any, carried: set[str]) -> tuple[list[dict], dict]:
    """Run one operator over the accepted rows of a shard in one engine call; others pass
    through unchanged. The form for engines without :meth:`agenerate` (the HTTP and benchmark
    engines); :func:`run_row_step` is the per-row form of the vLLM engine.

    Every input row leaves as one or more output rows (none is lost): the operator's rows,
    merged onto the input row, or the input row itself with a quarantine reason when the
    operator returned nothing.

    Args:
        step: The step to run.
        rows: Rows of one shard, each with the status columns.
        engine: Anything with ``generate(requests) -> completions`` (see :mod:`raydag.engines`).
        carried: Columns earlier annotating steps added; a created row does not inherit them
            from its parent (a paraphrase is not scored by its parent's judge score).

    Returns:
        The output rows and this step's counters.
    """
    stats = empty_stats(step.name)
    active = [i for i, row in enumerate(rows) if _applies(step, row)]
    per_row = [step.op.build_requests(rows[i]) for i in active]
    flat = [request for requests in per_row for request in requests]
    started = time.perf_counter()
    completions = engine.generate(flat) if flat else []
    stats["engine_seconds"] = time.perf_counter() - started
    stats.update(rows_in=len(active), passed_through=len(rows) - len(active), requests=len(flat))
    results: dict[int, list[dict]] = {}
    offset = 0
    for index, requests in zip(active, per_row):
        done = completions[offset: offset + len(requests)]
        offset += len(requests)
        results[index] = merge_outputs(step, rows[index], requests, done, carried,
                                       engine.model_name, stats)
    out_rows: list[dict] = []
    for index, row in enumerate(rows):
        out_rows.extend(results.get(index, [row]))
    return out_rows, stats


async def run_row_step(step: Step, row: dict, engine: Any, carried: set[str],
                       stats: dict) -> list[dict]:
    """:func:`run_step` for one row on an engine with ``agenerate``: the row's requests enter
    the engine as soon as this is called, whatever the other rows are doing. Adds to
    ``stats`` (``engine_seconds`` is left to the caller: requests of many rows overlap)."""
    if not _applies(step, row):
        stats["passed_through"] += 1
        return [row]
    requests = step.op.build_requests(row)
    stats["rows_in"] += 1
    stats["requests"] += len(requests)
    done = list(await asyncio.gather(*(engine.agenerate(r) for r in requests)))
    return merge_outputs(step, row, requests, done, carried, engine.model_name, stats)


def _applies(step: Step, row: dict) -> bool:
    return row["_status"] == "accepted" and getattr(step.op, "applies", lambda r: True)(row)


def merge_outputs(step: Step, row: dict, requests: list[ChatRequest], done: list,
                  carried: set[str], model_name: str, stats: dict) -> list[dict]:
    """One row's outputs of a step from its completions (``done``, one per request): the
    operator's rows merged onto ``row``, with lineage on the rows it created, the rule
    filters applied, and the step's counters (``stats``) updated."""
    op = step.op
    stats["tokens_in"] += sum(c.prompt_tokens for c in done)
    stats["tokens_out"] += sum(c.completion_tokens for c in done)
    outputs = op.parse(row, done) or [{"_status": "quarantined", "_reason": "no_output"}]
    is_new = ["id" in out and out["id"] != row.get("id") for out in outputs]
    # With one request (or completion) per new row, new row k came from request k.
    one_each = sum(is_new) == len(requests)
    stats["created"] += len(outputs) - 1
    merged, made = [], 0
    for out, new_row in zip(outputs, is_new):
        if new_row:
            base = {k: v for k, v in row.items() if k not in carried}
            source, completion = (requests[made], done[made]) if one_each else (requests[0], done[0])
            made += 1
            new = {"label": "", **base, "method": op.name, "teacher_model": model_name,
                   "prompt_hash": stable_hash([list(r.messages) for r in requests]),
                   **_request_lineage(source), "_raw_generation": completion.text,
                   "finish_reason": completion.finish_reason or "",
                   "tokens_in": sum(c.prompt_tokens for c in done),
                   "tokens_out": sum(c.completion_tokens for c in done),
                   **_ACCEPTED, **out}
            if new["_status"] == "accepted" and step.text_filters is not None:
                reason = row_filter_reason(new.get("text", ""), **step.text_filters)
                if reason:
                    new.update(_status="dropped", _reason=reason)
        else:
            new = {**row, **out}
        if new["_status"] != "accepted":
            new["_stage"] = step.name
            bucket = stats[new["_status"]]
            bucket[new["_reason"]] = bucket.get(new["_reason"], 0) + 1
        else:
            stats["accepted"] += 1
        merged.append(new)
    return merged


_INTEGER_COLUMNS = frozenset({"seed", "tokens_in", "tokens_out"})


SHARD_STATS_KEY = b"raydag.stats"  # the step counters, in the shard file's Parquet metadata


def write_shard(rows: list[dict], folder: str, shard: int, stats: list[dict] | None = None) -> RunPath:
    """Write one shard's rows as ``shard-<n>.parquet``, atomically (a rerun trusts what exists).

    The shard's step counters (``stats``) go into the file's own Parquet metadata, so a
    finished shard is one file, published by one rename (one upload on an object store).
    """
    import pyarrow as pa

    path = shard_path(folder, shard)
    frame = pd.DataFrame(rows)
    frame["_order"] = [shard * 10_000_000 + position for position in range(len(frame))]
    for column in frame.columns:  # one type per column, whatever a shard happens to hold
        if pd.api.types.infer_dtype(frame[column], skipna=True) == "mixed" and \
                frame[column].map(lambda v: isinstance(v, (dict, tuple))).any():
            frame[column] = frame[column].map(json.dumps)
    for column in _INTEGER_COLUMNS.intersection(frame.columns):
        # a row without a value (e.g. one a stage quarantined before generating) would make
        # pandas store the column as double in this shard and int64 in the next
        frame[column] = pd.array(frame[column].astype(object).where(frame[column].notna(), None),
                                 dtype="Int64")
    table = pa.Table.from_pandas(frame, preserve_index=False)
    if stats is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               SHARD_STATS_KEY: json.dumps(stats).encode()})
    write_table(table, path)
    return path


def shard_stats(path: RunPath) -> list[dict]:
    """A written shard's step counters: from its Parquet footer (only the footer is read), or
    from the ``stats.json`` beside it that shards written before raydag kept them inside had."""
    metadata = read_schema(path).metadata or {}
    if SHARD_STATS_KEY in metadata:
        return json.loads(metadata[SHARD_STATS_KEY])
    return json.loads((path.parent / path.name.replace(".parquet", ".stats.json")).read_text())


# Free-text columns that operators and the runner write; PII redaction looks at these.
PII_COLUMNS = ("text", "instruction", "input", "output", "response_a", "response_b", "chosen",
               "rejected", "_raw_generation")


def redact_row(row: dict, types: tuple[str, ...]) -> dict:
    """The row with PII redacted in its free-text columns (and ``*_rationale`` columns), and
    ``pii_redacted``: a JSON object of counts by type ("" when nothing was found)."""
    from raydag.filters.pii import redact_columns

    columns = [c for c in row if c in PII_COLUMNS or c.endswith("_rationale")]
    row, counts = redact_columns(row, columns, types)
    return {**row, "pii_redacted": json.dumps(counts, sort_keys=True) if counts else ""}


class ChainRunner:
    """Ray Data actor: runs every step of the chain over shards with one engine.

    Input rows are shards (``shard``: number, ``rows``: JSON list of row dicts). For each shard
    the runner runs the steps and returns one row: ``shard``, ``rows`` (the output rows, every
    status, pickled), ``stats`` (JSON list of step counters) and ``started_at`` (wall clock).
    :func:`publish_shards`, a Ray Data task after the actors, redacts and writes them, so the
    engine's actor (a GPU's, on a cluster) only generates.

    ``__call__`` is a coroutine, so Ray Data runs it as an async actor: with the actor's
    ``max_concurrency`` at ``teacher.shards_in_flight``, that many shards are in flight at once.
    On an engine with ``agenerate`` (vLLM's async engine) every row runs its own chain: its
    next step's requests enter the engine as soon as its previous step is done, with no
    barrier between steps or shards, and the engine's running batch mixes the rows of every
    shard in flight. Engines with only ``generate`` (the HTTP and benchmark engines) run each
    shard's chain step by step on the actor's engine thread, ``batch_size`` rows per call.
    A shard is returned whole once all its rows are done.

    With a ``ledger`` (a :class:`TokenLedger` actor), a shard starts only while the job's
    token budget is not spent, and its tokens are added once it is done: the budget overshoots
    by at most the shards in flight when it runs out. A shard that does not start comes back
    with ``rows`` empty and ``run`` false.

    Args:
        steps: The chain.
        engine_spec: Arguments of :func:`raydag.engines.make_engine`.
        engine: An engine to use instead of building one (tests of the runner use this).
        batch_size: Rows per engine call for engines without ``agenerate``; default the shard.
        ledger: The job's :class:`TokenLedger` handle, when it has a token budget.
    """

    def __init__(self, steps: list[Step], engine_spec: dict, engine: Any = None,
                 batch_size: int | None = None, ledger: Any = None,
                 start_timeout_s: float | None = None, stall_timeout_s: float | None = None) -> None:
        self.steps = steps
        self.batch_size = batch_size
        self.ledger = ledger
        # The watchdog's view: rows in flight per step, and when a row last finished a step.
        self.stall_timeout_s = stall_timeout_s
        self._in_flight = {step.name: 0 for step in steps}
        self._last_progress, self._shards_running = time.monotonic(), 0
        # One thread builds a synchronous engine and runs every call to it. Ray Data calls
        # __init__ and __call__ on different threads; a CPU engine driven from two threads gets
        # two OpenMP thread teams, more OpenMP threads than cores, and libgomp then stops
        # spinning between parallel regions: measured ~10 % fewer tokens/s than the same
        # engine on one thread. (vLLM's async engine computes in a process of its own.)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raydag-engine")
        self.start_seconds = 0.0
        self.engine = engine if engine is not None else self._start_engine(engine_spec,
                                                                           start_timeout_s)
        # Every shard out names the engines that served it, with their start seconds: this
        # actor's own, or those of the job's engine pool that answered (a ServedEngine's
        # ``engines``). The driver counts the distinct names (raydag.teacher.TeacherProgress).
        # A flag on each actor's first shard out was seen to count 1 where a killed actor and
        # its successor had both made shards.
        own = engine is None and not hasattr(self.engine, "engines")
        self._own_engine = {uuid.uuid4().hex: self.start_seconds} if own else {}
        self._async = hasattr(self.engine, "agenerate")
        # Per step: the columns earlier annotating steps added (see run_step's ``carried``).
        self._carried, carried = [], set()
        for step in steps:
            self._carried.append(set(carried))
            if not step.op.creates_rows:
                carried |= set(step.op.adds)

    def _start_engine(self, spec: dict, timeout_s: float | None):
        """The engine, built on the engine thread; an :class:`EngineStartError` with the
        engine's own message when it fails, or when it has not started after ``timeout_s``
        (a model that does not load, a GPU that is not there: fail, do not hang)."""
        from concurrent.futures import TimeoutError as Timeout

        from raydag.engines import make_engine

        started = time.perf_counter()
        try:
            engine = self._thread.submit(make_engine, spec, asynchronous=True).result(timeout_s)
        except Timeout:
            raise EngineStartError.timed_out(spec, timeout_s) from None
        except Exception as err:
            cause = (str(err).strip().splitlines() or [""])[-1][:400]
            raise EngineStartError.failed(spec, f"{type(err).__name__}: {cause}") from err
        self.start_seconds = time.perf_counter() - started
        return engine

    async def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        out = []
        for shard, payload in zip(batch["shard"], batch["rows"]):
            started_at = time.time()
            if self.ledger is not None and await self.ledger.spent.remote():
                out.append({"shard": int(shard), "rows": b"", "stats": "[]",
                            "started_at": started_at, "run": False, "engines": self._engines()})
                continue
            started = time.perf_counter()
            rows, stats = await self._watched(self.run_chain(json.loads(payload)), int(shard))
            seconds = time.perf_counter() - started
            tokens = sum(s["tokens_out"] for s in stats)
            if self.ledger is not None:
                await self.ledger.add.remote(sum(s["tokens_in"] + s["tokens_out"] for s in stats))
            print(f"raydag: [teacher] shard {int(shard)}: {len(rows)} rows in {seconds:.1f}s "
                  f"({tokens / max(seconds, 1e-9):.0f} output tok/s)", flush=True)
            out.append({"shard": int(shard), "rows": pickle.dumps(rows, protocol=5),
                        "stats": json.dumps(stats), "started_at": started_at, "run": True,
                        "engines": self._engines()})
        return pd.DataFrame(out)

    def _engines(self) -> str:
        """The engines that served this actor so far, by id: their start seconds (JSON)."""
        return json.dumps({**self._own_engine, **getattr(self.engine, "engines", {})})

    async def _watched(self, chain, shard: int):
        """Await a shard's chain; raise :class:`StageStalled` with a diagnosis when no row has
        finished a step on this actor for ``stall_timeout_s`` while rows are in flight."""
        if not self._shards_running:  # an idle actor's wait for work is not a stall
            self._last_progress = time.monotonic()
        self._shards_running += 1
        task = asyncio.ensure_future(chain)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=min(self.stall_timeout_s or 10.0, 10.0))
                if done:
                    return task.result()
                idle = time.monotonic() - self._last_progress
                if self.stall_timeout_s and idle >= self.stall_timeout_s:
                    task.cancel()
                    waiting = ", ".join(f"{name}: {n}" for name, n in self._in_flight.items() if n)
                    raise StageStalled(
                        f"no row finished a step for {idle:.0f}s (teacher.stall_timeout_s="
                        f"{self.stall_timeout_s:g}) on the engine actor pid {os.getpid()} at "
                        f"{socket.gethostname()}, shard {shard}; rows in flight by step: "
                        f"{waiting or 'none counted (a synchronous engine call)'}")
        finally:
            self._shards_running -= 1

    async def run_chain(self, rows: list[dict]) -> tuple[list[dict], list[dict]]:
        """Every step over a shard's rows; the output rows in input order (a row's outputs
        where the row was) and each step's counters."""
        if not self._async:
            return await asyncio.get_running_loop().run_in_executor(
                self._thread, self._run_chain_in_batches, rows)
        stats = [empty_stats(step.name) for step in self.steps]
        spans: list[list[float]] = [[] for _ in self.steps]
        outputs = await asyncio.gather(*(self._run_row(row, stats, spans) for row in rows))
        for step_stats, span in zip(stats, spans):
            # Seconds from the step's first request to its last answer in this shard.
            step_stats["engine_seconds"] = max(span) - min(span) if span else 0.0
        return [row for out in outputs for row in out], stats

    async def _run_row(self, row: dict, stats: list[dict], spans: list[list[float]]) -> list[dict]:
        current = [row]
        for step, carried, step_stats, span in zip(self.steps, self._carried, stats, spans):
            timed = any(_applies(step, r) for r in current)
            started = time.perf_counter()
            self._in_flight[step.name] += len(current)
            try:
                parts = await asyncio.gather(*(run_row_step(step, r, self.engine, carried,
                                                            step_stats) for r in current))
            finally:
                self._in_flight[step.name] -= len(current)
            self._last_progress = time.monotonic()
            if timed:
                span += [started, time.perf_counter()]
            current = [r for part in parts for r in part]
        return current

    def _run_chain_in_batches(self, rows: list[dict]) -> tuple[list[dict], list[dict]]:
        """Every step over the shard's rows, one engine batch (``batch_size`` rows) at a time:
        each batch runs the whole chain, as a shard of that size would on its own."""
        size = self.batch_size or max(len(rows), 1)
        out, stats = [], []
        for start in range(0, len(rows), size):
            batch, batch_stats = rows[start:start + size], []
            for step, carried in zip(self.steps, self._carried):
                batch, step_stats = run_step(step, batch, self.engine, carried)
                self._last_progress = time.monotonic()
                batch_stats.append(step_stats)
            out.extend(batch)
            stats = merge_stats(stats, batch_stats)
        return out, stats


class TokenLedger:
    """The tokens a job's teacher has spent against its budget, shared by the engine actors
    (a Ray actor; see :meth:`TokenLedger.remote`)."""

    def __init__(self, used: int, limit: int) -> None:
        self.used, self.limit = used, limit

    def spent(self) -> bool:
        return self.used >= self.limit

    def add(self, tokens: int) -> int:
        self.used += tokens
        return self.used

    @classmethod
    def remote(cls, used: int, limit: int):
        """A new ledger actor (no CPU of its own) that starts at ``used`` tokens."""
        import ray

        return ray.remote(num_cpus=0)(cls).remote(used, limit)


def warm_publisher() -> None:
    """Ray task started beside the engine actors as they load, so the first shard's write
    finds a CPU worker that has imported what :func:`publish_shards` needs (this module, by
    running a function of it, and the Parquet writer) instead of starting a Python process
    (~2 s of CPU) beside a running engine. Measured on 2 cores, 96 quickstart requests in 2
    shards: 65.6 and 62.0 output tok/s with a cold worker, 68.1 and 68.5 with a warm one
    (AMD EPYC, no native bf16 (AVX2-only), float32)."""
    import pyarrow.parquet  # noqa: F401


def publish_shards(batch: pd.DataFrame, shard_dir: str,
                   pii_types: tuple[str, ...] | list[str] = ()) -> pd.DataFrame:
    """Ray Data task after the :class:`ChainRunner` actors: redact PII (``pii_types``) in the
    free-text columns (:data:`PII_COLUMNS`) of each shard's rows, write the shard with
    :func:`write_shard` (its file marks the shard done) and return its summary: ``shard``,
    ``rows``, ``stats``, ``started_at``, ``seconds`` (from the chain's start to the file) and
    ``engines`` (the engines that answered it, as :class:`ChainRunner` names them).
    A shard the runner did not start (its token budget was spent) is passed on with ``rows``
    -1 and no file.
    """
    location(shard_dir).mkdir(parents=True, exist_ok=True)
    summaries = []
    # the engines the runner names (absent from a frame not made by ChainRunner)
    engines = batch["engines"] if "engines" in batch else ["{}"] * len(batch)
    for shard, payload, stats, started_at, run, served_by in zip(
            batch["shard"], batch["rows"], batch["stats"], batch["started_at"], batch["run"],
            engines):
        if not run:
            summaries.append({"shard": int(shard), "rows": -1, "stats": stats,
                              "started_at": float(started_at), "seconds": 0.0, "engines": served_by})
            continue
        rows = pickle.loads(payload)
        if pii_types:
            rows = [redact_row(row, tuple(pii_types)) for row in rows]
        write_shard(rows, shard_dir, int(shard), json.loads(stats))
        summaries.append({"shard": int(shard), "rows": len(rows), "stats": stats,
                          "started_at": float(started_at),
                          "seconds": time.time() - float(started_at), "engines": served_by})
    return pd.DataFrame(summaries)


# Frames up to this many rows run their small model in this process, on its CPU: starting a
# Ray actor and loading the model in it costs 7-9 s on a CPU host, more than encoding a couple
# of thousand short texts here.
LOCAL_MODEL_ROWS = 2048


@functools.lru_cache(maxsize=2)
def _shared_local_model(actor: type, constructor_kwargs: tuple):
    """One instance per model for the process, for classes whose weights never change
    (``shareable``: the encoder); a student checkpoint is loaded each time."""
    return actor(**dict(constructor_kwargs))


def map_with_model(frame: pd.DataFrame, actor: type, constructor_kwargs: dict, *,
                   batch_size: int = 64, threads: int | None = None) -> pd.DataFrame:
    """Run a Ray Data actor class that holds a small model (the encoder, a student) over a
    frame: one actor per GPU on a cluster with GPUs, else one actor with ``threads`` torch
    threads (default: this machine's cores; see :func:`raydag.resources.model_actor_options`).
    A frame of at most :data:`LOCAL_MODEL_ROWS` rows runs through the same class in this
    process instead, in the same batches. Rows come back in order."""
    import ray

    from raydag.resources import model_actor_options

    if len(frame) <= LOCAL_MODEL_ROWS:
        kwargs = {**constructor_kwargs, "device": "cpu"}  # a GPU here may be an engine's
        model = (_shared_local_model(actor, tuple(sorted(kwargs.items())))
                 if getattr(actor, "shareable", False) else actor(**kwargs))
        return pd.concat([model(frame.iloc[start:start + batch_size].reset_index(drop=True))
                          for start in range(0, len(frame), batch_size)], ignore_index=True)
    threads = threads or len(os.sched_getaffinity(0))
    frame = frame.assign(_position=range(len(frame)))
    options = model_actor_options(ray.cluster_resources().get("GPU", 0.0), threads)
    out = ray.data.from_pandas(frame).map_batches(
        actor, fn_constructor_kwargs=constructor_kwargs, batch_size=batch_size,
        batch_format="pandas", **options).to_pandas()
    return out.sort_values("_position").drop(columns="_position").reset_index(drop=True)


def shuffle_partitions(size_bytes: int | None = None) -> int:
    """Partitions for a hash shuffle: two per CPU of the cluster, more when a partition of
    ``size_bytes`` would pass 64 MB."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(2 * cpus, -(-(size_bytes or 0) // (64 << 20)))


def colocate(dataset, key: str, partitions: int):
    """The dataset with the rows of equal ``key`` in one block (a hash shuffle, or a sort under
    a sort-based shuffle strategy), as ``GroupedData.map_groups`` arranges them: a following
    ``map_batches(..., batch_size=None)`` sees every group whole, in one call per block rather
    than one per group."""
    from ray.data.context import ShuffleStrategy

    if dataset.context.shuffle_strategy in (ShuffleStrategy.HASH_SHUFFLE,
                                            ShuffleStrategy.SHUFFLE_V2):
        return dataset.repartition(partitions, keys=[key])  # one block per partition
    return dataset.sort(key)


_SHARED: dict[str, Any] = {}


def shared_object(reference):
    """``ray.get`` of an object-store reference, once per worker process (the latest one is
    kept): how the marks of a pass reach every task without travelling in each."""
    import ray

    key = reference.hex()
    if key not in _SHARED:
        _SHARED.clear()
        _SHARED[key] = ray.get(reference)
    return _SHARED[key]


def deduplicate(rows):
    """Exact deduplication of accepted texts across all shards: the earliest row (by
    ``_order``) is kept, later copies are dropped as ``synthetic_duplicate``.

    All in Ray Data: an 8-byte key per accepted row, hash-shuffled so equal keys share a
    block, where the later copies are found; their orders (one int64 per copy) are gathered
    by one Ray task into the object store and marked in ``map_batches``. The driver holds
    nothing per row.

    Args:
        rows: A Ray Data dataset of chain output rows with ``text``, ``_status`` and ``_order``.
    """
    keys = rows.select_columns(["text", "_status", "_order"]).map_batches(
        _accepted_keys, batch_format="pandas")  # only these columns are read from the shards
    copies = colocate(keys, "_key", shuffle_partitions()).map_batches(
        _later_copies_in_block, batch_size=None, batch_format="pandas")
    # Materialised first: to_arrow_refs of the lazy dataset ran the shuffle a second time to
    # learn its schema (measured: 11 s more at 10,000 rows)
    orders = sorted_orders_task().remote(*copies.materialize().to_arrow_refs())
    return rows.map_batches(_mark_copies, fn_kwargs={"copies": [orders]}, batch_format="pyarrow")


def _accepted_keys(batch: pd.DataFrame) -> pd.DataFrame:
    accepted = batch[batch["_status"] == "accepted"]
    return pd.DataFrame({"_key": [text_key(t) for t in accepted["text"]],
                         "_order": accepted["_order"].astype("int64")})


def _later_copies_in_block(batch: pd.DataFrame) -> pd.DataFrame:
    if not len(batch):
        return pd.DataFrame({"_order": np.empty(0, np.int64)})
    return pd.DataFrame({"_order": np.array(sorted(later_copies(batch)), dtype=np.int64)})


def _sorted_orders(*tables, columns: tuple[str, ...] = ("_order",)) -> np.ndarray:
    """The orders in ``columns`` of every table, sorted (repeats kept)."""
    parts = [t.column(c).to_numpy() for t in tables if t.num_rows for c in columns]
    return np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.empty(0, np.int64)


def sorted_orders_task():
    """The Ray task form of :func:`_sorted_orders`, made on first use."""
    import ray

    return ray.remote(num_cpus=1)(_sorted_orders)


def _mark_copies(batch, copies: list):
    hit, _ = orders_in(batch["_order"].to_numpy(), shared_object(copies[0]))
    return set_where(batch, hit, _status="dropped", _reason="synthetic_duplicate", _stage="dedup")


def orders_in(orders: np.ndarray, sorted_orders: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which ``orders`` are in ``sorted_orders`` (a sorted int64 array), and where: a binary
    search per row, with no hash set built per batch."""
    at = np.searchsorted(sorted_orders, orders)
    at = np.minimum(at, max(len(sorted_orders) - 1, 0))
    hit = sorted_orders[at] == orders if len(sorted_orders) else np.zeros(len(orders), bool)
    return hit, at


def set_where(table, hit: np.ndarray, **values):
    """An Arrow table with string columns set where ``hit`` is true: each value is one string
    for every hit row, or an array of one value per row (only the hit rows' are used). A
    column the table lacks is added (null elsewhere). Marking in Arrow saves each pass over
    the full rows a conversion to pandas and back."""
    import pyarrow as pa
    import pyarrow.compute as pc

    mask = pa.array(np.asarray(hit, dtype=bool))
    for name, value in values.items():
        present = name in table.column_names
        column = table[name] if present else pa.nulls(table.num_rows, pa.large_string())
        if not pa.types.is_large_string(column.type):
            column = column.cast(pa.large_string())
        value = (pa.scalar(value, pa.large_string()) if isinstance(value, str)
                 else pa.array(value, pa.large_string()))
        column = pc.if_else(mask, value, column)
        table = (table.set_column(table.column_names.index(name), name, column) if present
                 else table.append_column(name, column))
    return table


# The automatic shard size: engine batches per shard grow once a stage has more than this many
# batches, so a stage makes about this many shards, up to MAX_ROWS_PER_SHARD rows each.
SHARDS_PER_STAGE = 64
MAX_ROWS_PER_SHARD = 16_384


def rows_per_shard(total: int, batch_size: int, setting: int | None = None) -> int:
    """Rows per shard for a stage of ``total`` rows: ``setting`` when given, else a whole
    number of engine batches (see ``teacher.rows_per_shard``)."""
    if setting is not None:
        return setting
    batches = max(1, -(-total // SHARDS_PER_STAGE // batch_size))
    return batch_size * min(batches, max(1, MAX_ROWS_PER_SHARD // batch_size))


def shard_layout(shard_dir: RunPath, key: str, wanted: int, legacy: int) -> int:
    """The rows per shard of part ``key`` (a round) of a shard folder: the size recorded in
    its ``layout.json`` when the part was started, else ``wanted`` (now recorded). A folder
    with shards and no layout file was written when a shard was one engine batch: ``legacy``.
    A rerun thus resumes with the shards it finds, whatever the size setting is now."""
    folder = location(shard_dir)
    path = folder / "layout.json"
    if path.exists():
        layout = json.loads(path.read_text())
    else:
        started = any(folder.glob("shard-*.parquet"))
        layout = {"rows_per_shard": {}, "legacy": legacy if started else None}
    sizes = layout["rows_per_shard"]
    if key not in sizes:
        sizes[key] = layout["legacy"] or wanted
        folder.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps(layout, indent=2, sort_keys=True))
    return int(sizes[key])


def finished_shards(shard_dir: RunPath, shards: list[int]) -> dict[int, list[dict]]:
    """Those of ``shards`` already written, with their step counters (one listing of the
    folder, then one footer read each)."""
    present = {p.name: p for p in location(shard_dir).glob("shard-*.parquet")}
    paths = {index: present.get(shard_path(shard_dir, index).name) for index in shards}
    return {index: shard_stats(path) for index, path in paths.items() if path is not None}


def total_stats(finished: dict[int, list[dict]]) -> list[dict]:
    stats: list[dict] = []
    for shard_stats in finished.values():
        stats = merge_stats(stats, shard_stats)
    return stats
