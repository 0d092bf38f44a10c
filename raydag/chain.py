"""A job's stages as a chain of operators: the first rows, the steps, the contract, the signature.

Pure planning, no Ray: :func:`first_rows` makes the rows the first stage consumes,
:func:`build_steps` turns the job's stage configs into operator steps,
:func:`check_contract` proves before any work runs that every stage gets the columns it needs,
and :func:`run_signature` names the folder where the run's shards live.

Example:
    >>> from raydag.chain import shard_rows
    >>> [s["shard"] for s in shard_rows([{"id": str(i)} for i in range(5)], 2)]
    [0, 1, 2]
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from raydag.config import JobConfig
from raydag.data import LINEAGE_COLUMNS, raw_lineage, records, stable_hash
from raydag.errors import ConfigError
from raydag.ops.create import CreateOp
from raydag.ops.judge import JudgeOp
from raydag.ops.label import LabelOp
from raydag.ops.reform import CounterfactualOp, ParaphraseOp
from raydag.stages import RUNNER_ADDS, STATUS_COLUMNS, Step, check_chain, with_status

# Job fields that do not change what a run produces: they stay out of the signature.
_RESOURCE_FIELDS = {
    "name": None, "output_dir": None, "student": None, "serve": None, "resource_timeout_s": None, "cost": None,
    "budget": {"max_tokens"},  # a token cap stops a run early; a rerun with more goes on
    # Quality passes run over the finished shards on every run; only PII redaction is applied
    # as the shards are written.
    "quality": {"near_dup", "decontam", "consistency", "diversity", "bias", "coannotation"},
    "teacher": {"concurrency", "resources", "num_gpus", "tensor_parallel_size", "cpu_kv_cache_gib",
                "gpu_memory_utilization", "cpu_threads", "max_concurrency", "request_timeout_s",
                "max_retries", "api_key_env", "start_timeout_s", "stall_timeout_s", "engine_pool",
                # how many shards an actor runs at once: each row keeps its own seed
                "shards_in_flight",
                "rows_per_shard"},  # the resume unit: the rows do not depend on it (layout.json)
}


def judge_op_kwargs(stage) -> dict:
    """:class:`JudgeOp` arguments of a judge stage: the batch stage and the scoring endpoint
    (:mod:`raydag.serve`) build the same operator from them."""
    return {"rubric": stage.rubric, "text_column": stage.text_column,
            "target_column": stage.target_column, "score_column": stage.score_column,
            "rationale": stage.rationale, "temperature": stage.temperature,
            "scale": stage.scale, "min_score": stage.min_score}


def run_signature(job: JobConfig, input_digests: dict[str, str],
                  teacher_dtype: str | None = None) -> tuple[str, dict]:
    """The signature of the settings that change a run's rows, and those settings.

    Resource settings (actors, GPUs, threads, timeouts), the students and prices are left out,
    so a rerun on another cluster shape reuses finished shards. The input files count by
    content (``input_digests``), not by name. ``teacher_dtype`` is the dtype ``auto`` chose
    on this host (see :func:`raydag.resources.teacher_dtype`): bf16 and float32 runs write
    different rows, so they never share shards.
    """
    settings = json.loads(job.model_dump_json())
    if teacher_dtype:
        settings["teacher"]["dtype"] = teacher_dtype
    for key, fields in _RESOURCE_FIELDS.items():
        if fields is None:
            settings.pop(key, None)
        else:
            for field in fields:
                settings.get(key, {}).pop(field, None)
    settings["inputs"] = dict(sorted(input_digests.items()))
    return stable_hash(settings, length=12), settings


def shard_rows(rows: list[dict], size: int, first: int = 0) -> list[dict]:
    """Cut rows into shards numbered from ``first``: ``{"shard": n, "rows": <JSON list>}``."""
    return [{"shard": first + index, "rows": json.dumps(rows[start:start + size])}
            for index, start in enumerate(range(0, len(rows), size))]


def first_rows(job: JobConfig, raw: pd.DataFrame | None, inputs: dict[str, pd.DataFrame],
               topics: list[str] | None = None, round_index: int = 0,
               grown: list[dict] = (), planned: int = 0) -> list[dict]:
    """The rows the first stage consumes, with status columns, in a fixed order.

    - ``create``: planned requests (target label, demonstrations, seed) from the raw rows.
    - ``self_instruct``: round ``round_index``'s planned requests, demonstrations drawn from the
      seed tasks (``inputs["seed_tasks"]``) plus the tasks earlier rounds ``grown``.
    - ``label`` in annotate mode: the unlabelled texts (``inputs["unlabelled"]``, a frame; the
      teacher stage plans a job's :class:`raydag.data.InputRows` in Ray Data instead).
    - any other stage: the raw rows themselves (for example, paraphrasing the raw examples).
    """
    first = job.stages[0]
    if first.type == "create":
        op = create_op(job, topics)
        rows = op.plan_requests(raw.to_dict("records"), first.num_examples, job.seed)
    elif first.type == "self_instruct":
        op = _self_instruct_op(first)
        base, extra = divmod(first.num_instructions, first.rounds)
        seed = job.seed if round_index == 0 else int(stable_hash(job.seed, round_index, length=8), 16)
        pool = inputs["seed_tasks"].to_dict("records") + list(grown)
        rows = op.plan_requests(pool, base + (round_index < extra), seed)
    elif first.type == "label" and first.mode == "annotate":
        rows = records(raw_lineage(inputs["unlabelled"], job.seed, method="input"))
    else:
        rows = records(raw_lineage(raw, job.seed))
    if job.budget.max_requests is not None:
        rows = rows[: max(job.budget.max_requests - planned, 0)]
    return with_status(rows)


def create_op(job: JobConfig, topics: list[str] | None = None) -> CreateOp:
    """The creation operator of a job whose first stage is ``create``."""
    stage = job.stages[0]
    return CreateOp(task=job.data.task, labels=job.data.labels, method=stage.method,
                    shots=stage.shots, sampling=stage.sampling,
                    label_distribution=stage.label_distribution, topics=topics,
                    examples_per_request=stage.examples_per_request, round=stage.round,
                    steer=stage.steer, hard_examples=[e.model_dump() for e in stage.hard_examples])


def _self_instruct_op(stage):
    from raydag.ops.instruct import SelfInstructOp

    return SelfInstructOp(demos_per_request=stage.demos_per_request, sampling=stage.sampling)


def label_demonstrations(raw: pd.DataFrame | None, labels: list[str], shots: int,
                         seed: int) -> list[tuple[str, str]]:
    """``shots`` raw examples per label for few-shot labelling, drawn with ``seed`` and
    interleaved by label (so no label always comes last, next to the text)."""
    if not shots:
        return []
    if raw is None:
        raise ConfigError("a label stage with shots > 0 draws its demonstrations from the raw "
                          "sample: set data.train_path")
    per_label = [raw[raw["label"] == label].sample(frac=1.0, random_state=seed).head(shots)
                 for label in labels]
    return [(row.text, row.label) for rank in range(shots) for frame in per_label
            for row in frame.iloc[rank:rank + 1].itertuples()]


def build_steps(job: JobConfig, text_filters: dict | None, topics: list[str] | None = None,
                raw: pd.DataFrame | None = None) -> list[Step]:
    """The job's stages as operator steps, in order (some stages are two steps).

    Args:
        job: The job.
        text_filters: Rule filters for every text a stage creates (see
            :func:`raydag.filters.exact.row_filter_reason`).
        topics: The topic list of a ``zero_shot_topic`` creation stage.
        raw: The raw sample (demonstrations of few-shot label stages).
    """
    data = job.data
    steps: list[Step] = []
    for index, stage in enumerate(job.stages, start=1):
        def add(op: Any, filters: dict | None = None) -> None:
            steps.append(Step(name=f"{index}:{op.name}", op=op, text_filters=filters))

        if stage.type == "create":
            add(create_op(job, topics), text_filters)
        elif stage.type == "label":
            add(LabelOp(task=data.task, labels=data.labels, mode=stage.mode, votes=stage.votes,
                        vote_by=stage.vote_by, temperature=stage.temperature,
                        demonstrations=label_demonstrations(raw, data.labels, stage.shots,
                                                            job.seed)))
        elif stage.type == "paraphrase":
            add(ParaphraseOp(n=stage.n, sampling=stage.sampling, labels=data.labels), text_filters)
        elif stage.type == "counterfactual":
            edit = CounterfactualOp(task=data.task, labels=data.labels, sampling=stage.sampling)
            add(edit, text_filters)
            add(LabelOp(task=data.task, labels=data.labels, mode="verify",
                        expect_column="target_label", reject_reason="counterfactual_not_flipped",
                        applies_to_method=edit.name, name="label.verify_counterfactual"))
        elif stage.type == "judge":
            add(JudgeOp(**judge_op_kwargs(stage)))
        elif stage.type == "self_instruct":
            add(_self_instruct_op(stage), text_filters)
        elif stage.type == "preference":
            from raydag.ops.instruct import PreferenceJudgeOp, ResponsePairOp

            add(ResponsePairOp(sampling=stage.sampling))
            add(PreferenceJudgeOp(rubric=stage.rubric, min_margin=stage.min_margin))
        else:  # pragma: no cover - the config's discriminated union rules this out
            raise ConfigError(f"stages.{index - 1}: unknown stage type '{stage.type}'")
    return steps


def check_contract(first: list[dict], steps: list[Step]) -> None:
    """Check every step's required columns against what the rows will have by then.

    Raises:
        ColumnContractError: naming the stage and the missing column, before any work runs.
    """
    columns = set(first[0]) if first else set()
    chain = [(step.name, step.op.requires,
              tuple(step.op.adds) + (RUNNER_ADDS + tuple(LINEAGE_COLUMNS) if step.op.creates_rows else ()))
             for step in steps]
    check_chain(columns | set(STATUS_COLUMNS), chain)
