"""The chain runner and the chain's planning, with a scripted engine (no Ray, no vLLM).

The scripted engine answers every request deterministically from the request itself and a
global request counter, so counts, lineage and files can be checked exactly.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import re
import time
from pathlib import Path

import pandas as pd
import pytest
import ray

from raydag.chain import build_steps, check_contract, first_rows, run_signature, shard_rows
from raydag.config import load_job
from raydag.data import stable_hash
from raydag.engines.base import ChatRequest, Completion
from raydag.errors import ColumnContractError, ConfigError
from raydag.filters.exact import normalize_text
from raydag.ops.create import CreateOp, TopicsOp
from raydag.ops.judge import SCORES, JudgeOp
from raydag.ops.label import LabelOp
from raydag.ops.reform import CounterfactualOp, ParaphraseOp
from raydag.stages import (ChainRunner, Step, TokenLedger, empty_stats, merge_stats,
                           publish_shards, run_step, shard_stats, write_shard)

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "jobs" / "quickstart.yaml"
DATA = ROOT / "jobs" / "data" / "quickstart"
LABELS = ["billing", "shipping", "technical"]
TASK = "Route customer-support messages by topic."
RAW = [{"id": f"r{i}", "text": f"raw support message number {i} about {LABELS[i % 3]}",
        "label": LABELS[i % 3]} for i in range(18)]
NO_FILTERS = {"raw_norms": frozenset(), "test_norms": frozenset(), "min_chars": 8, "max_chars": 600}


def _user(request: ChatRequest) -> str:
    return next(m["content"] for m in request.messages if m["role"] == "user")


def echo_reply(request: ChatRequest, k: int) -> Completion:
    """Default script: a label for constrained requests, else a numbered message."""
    if request.choices:
        answer = request.choices[0]
        return Completion(answer, 30, 1, "stop", top_logprobs=({answer: -0.1},))
    return Completion(f" Generated support message number {k} about an order", 20, 5, "stop")


class ScriptedEngine:
    """A deterministic engine: ``reply(request, k)`` for the k-th request it ever got."""

    model_name = "scripted-teacher"

    def __init__(self, reply=echo_reply):
        self.reply = reply
        self.calls: list[list[ChatRequest]] = []
        self.counter = 0

    def generate(self, requests):
        self.calls.append(list(requests))
        out = []
        for request in requests:
            out.append(self.reply(request, self.counter))
            self.counter += 1
        return out


class AsyncScriptedEngine:
    """A deterministic engine with ``agenerate`` (the form of vLLM's async engine): the reply
    to a request depends on the request alone, and ``delay(request)`` seconds pass before it
    comes; ``events`` records each request's entry and answer in time order."""

    model_name = "scripted-teacher"

    def __init__(self, reply, delay=lambda request: 0.0):
        self.reply, self.delay, self.events = reply, delay, []

    async def agenerate(self, request):
        self.events.append(("in", _user(request), bool(request.choices)))
        await asyncio.sleep(self.delay(request))
        self.events.append(("out", _user(request), bool(request.choices)))
        return self.reply(request, keyed(request))


def keyed(request: ChatRequest) -> int:
    """A request's number from its content, so the script answers alike in any order."""
    return int(stable_hash(_user(request), request.seed), 16) % 997


def run_shards(runner, frame: pd.DataFrame) -> pd.DataFrame:
    """The runner's ``__call__`` (a coroutine: Ray Data runs it on the actor's event loop)."""
    return asyncio.run(runner(frame))


def with_status(rows):
    return [{**row, "_status": "accepted", "_reason": "", "_stage": ""} for row in rows]


def create_op(**kwargs):
    return CreateOp(task=TASK, labels=LABELS, method="few_shot", shots=2, **kwargs)


def plan(n, seed=0):
    return with_status(create_op().plan_requests(RAW, n, seed=seed))


def check_reconciles(rows_before, rows_after, stats):
    assert stats["rows_in"] + stats["passed_through"] == len(rows_before)
    assert stats["rows_in"] + stats["passed_through"] + stats["created"] == len(rows_after)


# --------------------------------------------------------------------------- run_step


def test_run_step_create_counts_lineage_and_pass_through():
    op = create_op()
    planned = plan(4)
    old = {"id": "old1", "text": "x", "label": "billing", "_status": "dropped",
           "_reason": "too_short", "_stage": "0:earlier"}
    rows = [planned[0], old, planned[1], planned[2], planned[3]]

    def reply(request, k):
        return Completion("" if k == 2 else f" Message number {k} about my order", 20, 5, "stop")

    engine = ScriptedEngine(reply)
    step = Step(name="1:create.few_shot_2", op=op)
    out, stats = run_step(step, rows, engine, carried=set())

    assert len(engine.calls) == 1 and len(engine.calls[0]) == 4  # only accepted rows, one call
    assert out[1] == old  # passed through unchanged, in place
    check_reconciles(rows, out, stats)
    assert stats["stage"] == "1:create.few_shot_2"
    assert (stats["rows_in"], stats["passed_through"], stats["created"], stats["requests"]) == (4, 1, 0, 4)
    assert (stats["tokens_in"], stats["tokens_out"]) == (80, 20)
    assert stats["accepted"] == 3
    assert stats["quarantined"] == {"empty_generation": 1} and stats["dropped"] == {}

    new = out[0]
    assert new["_status"] == "accepted" and new["_reason"] == "" and new["_stage"] == ""
    assert new["text"] == "Message number 0 about my order"
    assert new["label"] == planned[0]["target_label"]
    assert new["parent_ids"] == planned[0]["demo_ids"]
    assert new["method"] == "create.few_shot_2"
    assert new["teacher_model"] == "scripted-teacher"
    request = op.build_requests(planned[0])[0]
    assert new["prompt_hash"] == stable_hash([list(request.messages)])
    assert json.loads(new["sampling"]) == {"temperature": 0.9, "top_p": 0.95, "max_tokens": 80,
                                           "stop": ["\n"]}
    assert new["seed"] == planned[0]["request_seed"]
    assert new["_raw_generation"] == " Message number 0 about my order"
    assert (new["tokens_in"], new["tokens_out"], new["finish_reason"]) == (20, 5, "stop")
    assert len({out[i]["id"] for i in (0, 2, 4)}) == 3
    assert out[2]["seed"] == planned[1]["request_seed"] != new["seed"]

    bad = out[3]  # planned[2], the third request (k == 2)
    assert bad["_status"] == "quarantined" and bad["_reason"] == "empty_generation"
    assert bad["_stage"] == "1:create.few_shot_2"


def test_run_step_quarantined_creation_keeps_its_raw_generation_and_lineage():
    refusal = " I can't help with writing that."
    engine = ScriptedEngine(lambda request, k: Completion(refusal, 20, 7, "stop"))
    out, stats = run_step(Step(name="1:create.few_shot_2", op=create_op()), plan(1), engine, set())
    assert stats["quarantined"] == {"refusal": 1}
    row = out[0]
    assert row["_status"] == "quarantined" and row["_reason"] == "refusal"
    assert row.get("_raw_generation") == refusal
    assert row.get("method") == "create.few_shot_2"
    assert row.get("teacher_model") == "scripted-teacher"


def test_run_step_only_runs_rows_the_op_applies_to():
    op = LabelOp(task=TASK, labels=LABELS, mode="verify", expect_column="target_label",
                 reject_reason="counterfactual_not_flipped", applies_to_method="reform.counterfactual",
                 name="label.verify_counterfactual")
    rows = with_status([
        {"id": "e1", "text": "edit one", "label": "billing", "target_label": "billing",
         "method": "reform.counterfactual"},
        {"id": "o1", "text": "original", "label": "shipping", "target_label": "shipping",
         "method": "create.few_shot_2"},
        {"id": "e2", "text": "edit two", "label": "shipping", "target_label": "shipping",
         "method": "reform.counterfactual"},
    ]) + [{"id": "e3", "text": "edit three", "label": "billing", "target_label": "billing",
           "method": "reform.counterfactual", "_status": "dropped", "_reason": "too_short",
           "_stage": "4:reform.counterfactual"}]
    before = copy.deepcopy(rows)
    engine = ScriptedEngine()  # always answers the first choice: "billing"
    out, stats = run_step(Step(name="4:label.verify_counterfactual", op=op), rows, engine, set())

    assert len(engine.calls) == 1
    assert [re.search(r"Text: (.*)\n", _user(r)).group(1) for r in engine.calls[0]] == \
        ["edit one", "edit two"]
    assert rows == before  # inputs are not mutated
    check_reconciles(rows, out, stats)
    assert (stats["rows_in"], stats["passed_through"], stats["created"], stats["requests"]) == (2, 2, 0, 2)
    assert stats["accepted"] == 1 and stats["dropped"] == {"counterfactual_not_flipped": 1}
    assert out[1] == before[1] and out[3] == before[3]
    assert out[0]["_status"] == "accepted" and out[0]["teacher_label"] == "billing"
    assert out[0]["label_confidence"] == pytest.approx(1.0)
    assert out[2]["_status"] == "dropped" and out[2]["_reason"] == "counterfactual_not_flipped"
    assert out[2]["_stage"] == "4:label.verify_counterfactual"
    assert out[2]["label"] == "shipping"  # verify never rewrites the label


def test_run_step_without_active_rows_calls_no_engine():
    rows = [{"id": "a", "text": "t", "label": "billing", "_status": "dropped", "_reason": "x",
             "_stage": "1:s"}]
    engine = ScriptedEngine()
    out, stats = run_step(Step(name="2:judge.rubric", op=JudgeOp(rubric="r")), rows, engine, set())
    assert engine.calls == [] and out == rows
    assert stats == {**empty_stats("2:judge.rubric"), "passed_through": 1,
                     "engine_seconds": stats["engine_seconds"]}


def test_run_step_paraphrase_creates_rows_with_own_lineage_without_carried_columns():
    op = ParaphraseOp(n=2, labels=LABELS)
    rows = with_status([
        {"id": "a1", "text": "Where is my parcel?", "label": "shipping", "judge_score": 4.5,
         "method": "raw", "parent_ids": [], "keep_me": "yes"},
        {"id": "a2", "text": "Why was I charged twice?", "label": "billing", "judge_score": 2.0,
         "method": "raw", "parent_ids": [], "keep_me": "too"},
    ])
    texts = ["Has my package shipped yet?", " where is my parcel", "",
             "I see two charges for one order, why?"]
    engine = ScriptedEngine(lambda request, k: Completion(texts[k], 11 + k, 3, "stop"))
    out, stats = run_step(Step(name="3:reform.paraphrase", op=op), rows, engine, {"judge_score"})

    assert len(engine.calls) == 1 and len(engine.calls[0]) == 4
    check_reconciles(rows, out, stats)
    assert (stats["rows_in"], stats["created"], stats["requests"]) == (2, 4, 4)
    assert stats["accepted"] == 4  # two originals, two rewrites
    assert stats["dropped"] == {"unchanged_rewrite": 1}
    assert stats["quarantined"] == {"empty_generation": 1}
    assert stats["tokens_in"] == 11 + 12 + 13 + 14

    assert [r["id"] for r in out[:1]] == ["a1"] and out[3]["id"] == "a2"
    assert out[0] == rows[0]  # the original is kept as it was, its score included
    first, unchanged = out[1], out[2]
    requests = op.build_requests(rows[0])
    assert first["text"] == "Has my package shipped yet?" and first["label"] == "shipping"
    assert first["parent_ids"] == ["a1"] and first["method"] == "reform.paraphrase"
    assert first["seed"] == requests[0].seed and unchanged["seed"] == requests[1].seed
    assert first["_raw_generation"] == "Has my package shipped yet?"
    assert unchanged["_raw_generation"] == " where is my parcel"
    assert "judge_score" not in first and "judge_score" not in unchanged  # carried: not inherited
    assert first["keep_me"] == "yes"  # other columns are inherited
    assert unchanged["_status"] == "dropped" and unchanged["_stage"] == "3:reform.paraphrase"
    assert out[4]["_status"] == "quarantined" and out[4]["_stage"] == "3:reform.paraphrase"
    assert out[5]["text"] == "I see two charges for one order, why?" and out[5]["parent_ids"] == ["a2"]
    assert out[5]["seed"] == op.build_requests(rows[1])[1].seed


def test_run_step_text_filters_drop_created_rows():
    raw_text = "Refund my order from last week please"
    test_text = "My blender arrived with a cracked jar"
    filters = {"raw_norms": frozenset({normalize_text(raw_text)}),
               "test_norms": frozenset({normalize_text(test_text)}), "min_chars": 8, "max_chars": 600}
    texts = [" Hi", f' "{test_text.upper()}."', f" {raw_text}", " A perfectly fine new message"]
    engine = ScriptedEngine(lambda request, k: Completion(texts[k], 20, 5, "stop"))
    rows = plan(4)
    out, stats = run_step(Step(name="1:create.few_shot_2", op=create_op(), text_filters=filters),
                          rows, engine, set())
    assert [r["_reason"] for r in out] == ["too_short", "test_copy", "raw_duplicate", ""]
    assert [r["_status"] for r in out] == ["dropped", "dropped", "dropped", "accepted"]
    assert all(r["_stage"] == "1:create.few_shot_2" for r in out[:3]) and out[3]["_stage"] == ""
    assert stats["dropped"] == {"too_short": 1, "test_copy": 1, "raw_duplicate": 1}
    assert stats["accepted"] == 1
    # The filters only judge created rows: an annotating step's rows are never filtered.
    judged, judge_stats = run_step(Step(name="2:judge.rubric", op=JudgeOp(rubric="r"),
                                        text_filters=filters), out, ScriptedEngine(), set())
    assert judge_stats["rows_in"] == 1 and judged[3]["_status"] == "accepted"


# --------------------------------------------------------------------------- ChainRunner


def scripted_teacher(request: ChatRequest, k: int) -> Completion:
    """Answers every operator's requests of the job chain in a way that can be checked."""
    user = _user(request)
    if request.choices == SCORES:
        return Completion("4", 50, 1, "stop", top_logprobs=({"4": math.log(0.5), "5": math.log(0.5)},))
    if request.choices:  # labelling: the label word the text mentions, else the first label
        text = re.search(r"Text: (.*)\n", user).group(1)
        found = [label for label in request.choices if label in text]
        answer = found[0] if found else request.choices[0]
        return Completion(answer, 40, 1, "stop", top_logprobs=({answer: -0.05},))
    if request.continue_final_message:  # creation: mention the target label, or (every 3rd) the next
        label = re.search(r'whose label is "(\w+)"', user).group(1)
        if k % 3 == 2:
            label = LABELS[(LABELS.index(label) + 1) % 3]
        return Completion(f" A {label} question from customer number {k}", 60, 8, "stop")
    if "Change as few words" in user:  # counterfactual: flips, except every 5th request
        target = re.search(r'label becomes "(\w+)"', user).group(1)
        source = re.search(r'has the label "(\w+)"', user).group(1)
        return Completion(f"An edited {source if k % 5 == 0 else target} message {k}", 30, 6, "stop")
    if user.startswith("Rewrite the text"):
        return Completion(f"Reworded version {k} of: {user.split('Text: ')[1]}", 30, 9, "stop")
    raise AssertionError(f"unexpected request: {user}")


def test_chain_runner_starts_no_shard_once_the_token_ledger_is_spent(ray_local, tmp_path):
    steps = [Step(name="1:create.few_shot_2", op=create_op(), text_filters=NO_FILTERS)]
    engine = ScriptedEngine(scripted_teacher)
    ledger = TokenLedger.remote(0, 1)  # the first shard's tokens spend it
    runner = ChainRunner(steps, engine_spec={}, engine=engine, ledger=ledger)
    generated = run_shards(runner, pd.DataFrame(shard_rows(plan(6), 2)))
    assert list(generated["run"]) == [True, False, False]
    assert len(engine.calls) == 1
    spent = sum(s["tokens_in"] + s["tokens_out"] for s in json.loads(generated["stats"].iloc[0]))
    assert spent > 0 and ray.get(ledger.add.remote(0)) == spent
    summary = publish_shards(generated, str(tmp_path))
    assert list(summary["rows"]) == [2, -1, -1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.parquet"]


def test_chain_runner_writes_shards_and_summaries(tmp_path):
    steps = [Step(name="1:create.few_shot_2", op=create_op(), text_filters=NO_FILTERS),
             Step(name="2:label.verify", op=LabelOp(task=TASK, labels=LABELS, mode="verify"))]
    engine = ScriptedEngine(scripted_teacher)
    runner = ChainRunner(steps, engine_spec={}, engine=engine)
    rows = plan(7)
    generated = run_shards(runner, pd.DataFrame(shard_rows(rows, 4)))
    assert not (tmp_path / "shards").exists()  # the actor only generates
    summary = publish_shards(generated, str(tmp_path / "shards"))

    assert list(summary["shard"]) == [0, 1] and list(summary["rows"]) == [4, 3]
    assert len(engine.calls) == 4  # one call per step per shard
    folder = tmp_path / "shards"
    for shard, size in ((0, 4), (1, 3)):
        frame = pd.read_parquet(folder / f"shard-{shard:05d}.parquet")
        assert len(frame) == size
        assert list(frame["_order"]) == [shard * 10_000_000 + i for i in range(size)]
        on_disk = shard_stats(str(folder / f"shard-{shard:05d}.parquet"))  # in the file's footer
        assert on_disk == json.loads(summary["stats"].iloc[shard])
        assert [s["stage"] for s in on_disk] == ["1:create.few_shot_2", "2:label.verify"]
    assert not list(folder.glob("*.tmp*"))
    assert sorted(p.name for p in folder.iterdir()) == ["shard-00000.parquet", "shard-00001.parquet"]

    frame = pd.concat([pd.read_parquet(folder / f"shard-{s:05d}.parquet") for s in (0, 1)])
    # Creation request k mentions another label when k % 3 == 2: verify drops those. Shard 0's
    # creation requests are k = 0..3 (its labelling 4..7), shard 1's are k = 8..10.
    assert list(frame["_status"]) == ["accepted", "accepted", "dropped", "accepted",
                                      "dropped", "accepted", "accepted"]
    assert set(frame.loc[frame["_status"] == "dropped", "_reason"]) == {"label_disagreement"}
    assert set(frame.loc[frame["_status"] == "dropped", "_stage"]) == {"2:label.verify"}
    assert (frame["method"] == "create.few_shot_2").all()
    assert (frame["label"] == [r["target_label"] for r in rows]).all()
    total = []
    for shard in (0, 1):
        total = merge_stats(total, json.loads(summary["stats"].iloc[shard]))
    assert total[0]["rows_in"] == 7 and total[0]["accepted"] == 7
    assert total[1]["rows_in"] == 7 and total[1]["accepted"] == 5
    assert total[1]["dropped"] == {"label_disagreement": 2}


def test_a_shard_of_several_engine_batches_makes_the_rows_of_one_shard_per_batch(tmp_path):
    """The resume unit apart from the engine batch: one shard of 7 rows run in engine batches
    of 4 gives the engine the calls, and the rows, that shards of 4 gave it."""
    steps = [Step(name="1:create.few_shot_2", op=create_op(), text_filters=NO_FILTERS),
             Step(name="2:label.verify", op=LabelOp(task=TASK, labels=LABELS, mode="verify"))]
    frames, calls = {}, {}
    for name, shard_size, batch_size in (("one per batch", 4, None), ("one shard", 7, 4)):
        engine = ScriptedEngine(scripted_teacher)
        runner = ChainRunner(steps, engine_spec={}, engine=engine, batch_size=batch_size)
        summary = publish_shards(run_shards(runner, pd.DataFrame(shard_rows(plan(7), shard_size))),
                                 str(tmp_path / name))
        frames[name] = pd.concat([pd.read_parquet(p) for p in sorted((tmp_path / name).glob("*.parquet"))],
                                 ignore_index=True)
        calls[name] = [[r.messages for r in call] for call in engine.calls]
    assert len(summary) == 1 and summary["rows"].iloc[0] == 7
    assert calls["one shard"] == calls["one per batch"] and max(map(len, calls["one shard"])) == 4
    same = ["id", "_status", "_reason", "_stage", "text", "label"]
    pd.testing.assert_frame_equal(frames["one shard"][same], frames["one per batch"][same])
    assert list(frames["one shard"]["_order"]) == list(range(7))  # still the row order
    stats = json.loads(summary["stats"].iloc[0])
    assert (stats[0]["rows_in"], stats[1]["accepted"], stats[1]["dropped"]) == (7, 5, {"label_disagreement": 2})


def test_an_async_engine_gets_each_rows_next_step_without_waiting_for_the_shard(tmp_path):
    """Continuous batching through the chain: with an engine that has ``agenerate``, a row's
    verify request enters while a slower row of the shard is still being created, and the
    shard comes back whole, with the rows, counters and order the batch form gives."""
    steps = [Step(name="1:create.few_shot_2", op=create_op(), text_filters=NO_FILTERS),
             Step(name="2:label.verify", op=LabelOp(task=TASK, labels=LABELS, mode="verify"))]
    rows = plan(6)
    slow_text = _user(create_op().build_requests(rows[0])[0])

    def delay(request):
        return 0.5 if _user(request) == slow_text else 0.01

    fast = AsyncScriptedEngine(scripted_teacher, delay)
    frames = {}
    for name, engine in (("async", fast),
                         ("batches", ScriptedEngine(lambda r, k: scripted_teacher(r, keyed(r))))):
        runner = ChainRunner(steps, engine_spec={}, engine=engine)
        summary = publish_shards(run_shards(runner, pd.DataFrame(shard_rows(rows, 6))),
                                 str(tmp_path / name))
        frames[name] = (pd.read_parquet(tmp_path / name / "shard-00000.parquet"),
                        json.loads(summary["stats"].iloc[0]))
    slow_done = fast.events.index(("out", slow_text, False))
    verifies = [i for i, (kind, _, constrained) in enumerate(fast.events) if kind == "in" and constrained]
    assert len(verifies) == 6 and min(verifies) < slow_done  # no barrier between the steps
    assert max(verifies) > slow_done  # the slow row's verify came after its creation
    (got, got_stats), (want, want_stats) = frames["async"], frames["batches"]
    columns = ["id", "_status", "_reason", "_stage", "text", "label", "_order"]
    pd.testing.assert_frame_equal(got[columns], want[columns])
    for step_got, step_want in zip(got_stats, want_stats):
        assert {k: v for k, v in step_got.items() if k != "engine_seconds"} == \
            {k: v for k, v in step_want.items() if k != "engine_seconds"}
    assert got_stats[0]["engine_seconds"] >= 0.5  # the step's first request to its last answer


def test_a_stage_that_stops_making_progress_fails_with_a_diagnosis():
    """The watchdog: the verify step's requests never come back; after stall_timeout_s with
    rows in flight and none finishing, the shard fails naming the step and the rows waiting."""
    from raydag.errors import StageStalled

    steps = [Step(name="1:create.few_shot_2", op=create_op(), text_filters=NO_FILTERS),
             Step(name="2:label.verify", op=LabelOp(task=TASK, labels=LABELS, mode="verify"))]

    def delay(request):
        return 3600.0 if request.choices else 0.01  # verify hangs

    runner = ChainRunner(steps, engine_spec={}, engine=AsyncScriptedEngine(scripted_teacher, delay),
                         stall_timeout_s=1.0)
    started = time.perf_counter()
    with pytest.raises(StageStalled, match=r"no row finished a step for [12]s .*shard 0; rows "
                                           r"in flight by step: 2:label.verify: 3"):
        run_shards(runner, pd.DataFrame(shard_rows(plan(3), 3)))
    assert time.perf_counter() - started < 5
    # Without the watchdog's limit the same runner would wait; with rows answered it passes.
    quick = ChainRunner(steps, engine_spec={}, stall_timeout_s=1.0,
                        engine=AsyncScriptedEngine(scripted_teacher, lambda r: 0.3))
    out = run_shards(quick, pd.DataFrame(shard_rows(plan(6), 3)))
    assert list(out["run"]) == [True, True]


def test_an_async_runner_keeps_several_shards_in_flight_on_one_actor(ray_local, tmp_path):
    """Ray Data runs the async ChainRunner in the teacher's actor pool (resources.actor_pool,
    several calls per actor): shards overlap on one actor."""
    from raydag.resources import actor_pool

    steps = [Step(name="1:create.few_shot_2", op=create_op(), text_filters=NO_FILTERS)]
    spec = {"engine": "scripted-async"}

    class SlowRunner(ChainRunner):
        def __init__(self, **kwargs):
            super().__init__(engine=AsyncScriptedEngine(scripted_teacher, lambda r: 1.0), **kwargs)

    started = time.perf_counter()
    summary = ray.data.from_items(shard_rows(plan(8), 1)).map_batches(
        SlowRunner, fn_constructor_kwargs={"steps": steps, "engine_spec": spec}, batch_size=1,
        batch_format="pandas", compute=actor_pool((1, 1), 4), num_cpus=1,
        runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parent)}}).take_all()
    seconds = time.perf_counter() - started
    assert sorted(int(s["shard"]) for s in summary) == list(range(8))
    starts = sorted(float(s["started_at"]) for s in summary)
    # 8 one-row shards of 1 s each: one at a time they would start 1 s apart (7 s in all).
    assert starts[3] - starts[0] < 1.0, (starts, seconds)


def test_generation_health_gives_each_steps_unusable_share_and_warns_past_the_threshold(capsys):
    from raydag.teacher import generation_health, warn_unhealthy

    create = {**empty_stats("1:create"), "rows_in": 10, "requests": 10, "accepted": 7,
              "quarantined": {"truncated_at_max_tokens": 2, "empty_generation": 1}}
    para = {**empty_stats("2:reform.paraphrase"), "rows_in": 7, "created": 7, "requests": 7,
            "quarantined": {"unchanged_rewrite": 1}}
    dedup = {**empty_stats("dedup"), "rows_in": 14, "dropped": {"synthetic_duplicate": 3}}
    health = generation_health([create, para, dedup], warn_share=0.1)
    assert set(health) == {"1:create", "2:reform.paraphrase"}  # steps that generated
    assert health["1:create"] == {"requests": 10, "rows": 10, "unusable": 3, "share": 0.3,
                                  "reasons": {"truncated_at_max_tokens": 2, "empty_generation": 1},
                                  "warn": True}
    assert health["2:reform.paraphrase"]["share"] == round(1 / 14, 4)
    assert not health["2:reform.paraphrase"]["warn"]
    warn_unhealthy(health, 0.1)
    err = capsys.readouterr().err
    assert "[1:create] 3 of 10 generated rows (30%) were unusable (truncated_at_max_tokens 2" in err
    assert "paraphrase" not in err


def test_the_shard_size_grows_with_the_rows_and_a_run_folder_keeps_its_own(tmp_path):
    from raydag.stages import MAX_ROWS_PER_SHARD, rows_per_shard, shard_layout

    assert rows_per_shard(1000, 64) == 64  # a small job: one engine batch per shard
    assert rows_per_shard(64 * 64, 64) == 64 and rows_per_shard(64 * 64 + 1, 64) == 128
    big = rows_per_shard(1_000_000, 64)
    assert big % 64 == 0 and 60 <= -(-1_000_000 // big) <= 64
    assert rows_per_shard(100_000_000, 64) == MAX_ROWS_PER_SHARD  # files of tens of MB
    assert rows_per_shard(10, 100) == 100 and rows_per_shard(10**6, 64, setting=640) == 640

    folder = tmp_path / "shards"
    assert shard_layout(folder, "round-0", wanted=128, legacy=64) == 128  # recorded
    assert shard_layout(folder, "round-0", wanted=256, legacy=64) == 128  # the folder's own
    assert shard_layout(folder, "round-1", wanted=256, legacy=64) == 256
    old = tmp_path / "old"  # shards written before layout.json: one engine batch each
    old.mkdir()
    (old / "shard-00000.parquet").write_bytes(b"")
    assert shard_layout(old, "round-0", wanted=640, legacy=64) == 64
    assert shard_layout(old, "round-1", wanted=640, legacy=64) == 64
    with pytest.raises(ConfigError, match="multiple of teacher.batch_size"):
        load_job(QUICKSTART, ["teacher.rows_per_shard=100", "teacher.batch_size=64"])


def test_chain_runner_created_rows_do_not_inherit_annotations(tmp_path):
    steps = [Step(name="1:create.few_shot_2", op=create_op(), text_filters=NO_FILTERS),
             Step(name="2:judge.rubric", op=JudgeOp(rubric="r")),
             Step(name="3:reform.paraphrase", op=ParaphraseOp(n=1, labels=LABELS),
                  text_filters=NO_FILTERS)]
    runner = ChainRunner(steps, engine_spec={}, engine=ScriptedEngine(scripted_teacher))
    publish_shards(run_shards(runner, pd.DataFrame(shard_rows(plan(2), 10))), str(tmp_path))
    frame = pd.read_parquet(tmp_path / "shard-00000.parquet")
    assert list(frame["method"]) == ["create.few_shot_2", "reform.paraphrase"] * 2
    assert list(frame["judge_score"].round(6)[[0, 2]]) == [4.5, 4.5]
    assert frame["judge_score"][[1, 3]].isna().all()
    assert frame["judge_score_source"][[1, 3]].isna().all()
    assert list(frame["parent_ids"][1]) == [frame["id"][0]]


def test_topics_shard_keeps_the_raw_generation(tmp_path):
    seed_row = {"request_id": "topics", "request_seed": 0, "_status": "accepted", "_reason": "",
                "_stage": ""}
    engine = ScriptedEngine(lambda request, k: Completion(" Refunds\n", 30, 3, "stop"))
    runner = ChainRunner([Step(name="0:create.topics", op=TopicsOp(TASK))], engine_spec={},
                         engine=engine)
    publish_shards(run_shards(runner, pd.DataFrame(shard_rows([seed_row], 1))), str(tmp_path))
    frame = pd.read_parquet(tmp_path / "shard-00000.parquet")
    assert list(frame["topics"].iloc[0]) == ["Refunds"]
    assert frame["_raw_generation"].iloc[0] == " Refunds\n"


def test_write_shard_json_encodes_dicts_and_orders_rows(tmp_path):
    path = write_shard([{"id": "a", "extra": {"k": 1}}, {"id": "b", "extra": None}], str(tmp_path), 3)
    frame = pd.read_parquet(path)
    assert Path(path).name == "shard-00003.parquet"
    assert list(frame["_order"]) == [30_000_000, 30_000_001]
    assert json.loads(frame["extra"][0]) == {"k": 1}


def test_a_shard_is_one_file_with_its_counters_and_older_shards_still_resume(tmp_path):
    from raydag.stages import finished_shards

    stats = [{**empty_stats("1:a"), "rows_in": 2, "accepted": 2}]
    write_shard([{"id": "a"}, {"id": "b"}], str(tmp_path), 0, stats)
    # A shard written before the counters moved into the footer: counters in stats.json beside it.
    write_shard([{"id": "c"}], str(tmp_path), 1)
    legacy = [{**empty_stats("1:a"), "rows_in": 1, "accepted": 1}]
    (tmp_path / "shard-00001.stats.json").write_text(json.dumps(legacy))
    assert finished_shards(tmp_path, [0, 1, 2]) == {0: stats, 1: legacy}  # 2 was never written
    assert len(pd.read_parquet(tmp_path / "shard-00000.parquet")) == 2


# --------------------------------------------------------------------------- merge_stats


def test_merge_stats_adds_counters_and_reason_dicts():
    one = [{**empty_stats("1:a"), "rows_in": 3, "created": 2, "requests": 3, "tokens_in": 30,
            "tokens_out": 9, "engine_seconds": 0.5, "accepted": 4, "dropped": {"too_short": 1},
            "quarantined": {}}]
    two = [{**empty_stats("1:a"), "rows_in": 2, "passed_through": 1, "requests": 2, "tokens_in": 20,
            "tokens_out": 4, "engine_seconds": 0.25, "accepted": 1,
            "dropped": {"too_short": 2, "raw_duplicate": 1}, "quarantined": {"refusal": 1}}]
    snapshot = copy.deepcopy(one)
    total = merge_stats([], one)
    assert total == one and total[0] is not one[0]
    total = merge_stats(total, two)
    assert one == snapshot  # the first shard's counters are not mutated
    assert total == [{"stage": "1:a", "rows_in": 5, "passed_through": 1, "created": 2, "requests": 5,
                      "tokens_in": 50, "tokens_out": 13, "engine_seconds": 0.75, "accepted": 5,
                      "dropped": {"too_short": 3, "raw_duplicate": 1},
                      "quarantined": {"refusal": 1}}]


# --------------------------------------------------------------------------- run_signature


DIGESTS = {"train": "aaaa", "test": "bbbb"}


def signature(overrides=(), digests=DIGESTS):
    return run_signature(load_job(QUICKSTART, list(overrides)), digests)[0]


@pytest.mark.parametrize("override", [
    "teacher.concurrency=4", "teacher.cpu_threads=3", "student.epochs=7",
    "output_dir=/tmp/elsewhere", "budget.max_tokens=5000", "cost.usd_per_gpu_hour=2.5",
    "name=renamed", "teacher.num_gpus=0.5", "teacher.shards_in_flight=1",
    "teacher.stall_timeout_s=60", "teacher.engine_pool=job",
])
def test_run_signature_ignores_resource_settings(override):
    assert signature([override]) == signature()


@pytest.mark.parametrize("job, overrides, shared", [
    ("quickstart.yaml", [], False),  # one pass: the engines stay in the stage's actors
    ("quickstart.yaml", ["quality.bias.rephrase_flagged=true"], True),  # the rephrasing pass
    ("quickstart.yaml", ["teacher.engine_pool=job"], True),
    ("create_zero_shot_topic.yaml", [], True),  # the topic list, then the stage
    ("create_zero_shot_topic.yaml", ["teacher.engine_pool=stage"], False),
    ("self_instruct.yaml", [], True),  # rounds
    ("self_instruct.yaml", ["stages.0.rounds=1"], False),
    ("openai_teacher.yaml", ["teacher.engine_pool=job"], False),  # no engine of ours to share
])
def test_a_job_on_gpus_shares_its_engines_when_its_teacher_makes_several_passes(job, overrides,
                                                                               shared):
    from raydag.teacher import shares_engines

    loaded = load_job(QUICKSTART.parent / job, overrides)
    assert shares_engines(loaded, on_gpus=True) is shared
    # CPU hosts: only when asked for (Serve beside an engine on every core costs it more than
    # a small model's load per pass saves)
    assert shares_engines(loaded, on_gpus=False) is (shared and "teacher.engine_pool=job" in overrides)


@pytest.mark.parametrize("override", [
    "seed=1", "stages.0.num_examples=999", "teacher.model=org/another-model",
    "teacher.batch_size=50", "stages.0.shots=2", "filters.min_chars=3",
])
def test_run_signature_changes_with_what_changes_rows(override):
    assert signature([override]) != signature()


def test_run_signature_counts_inputs_by_content():
    assert signature(digests={"train": "aaaa", "test": "cccc"}) != signature()
    assert signature(digests={"test": "bbbb", "train": "aaaa"}) == signature()
    sig, settings = run_signature(load_job(QUICKSTART, []), DIGESTS)
    assert settings["inputs"] == DIGESTS
    assert "student" not in settings and "output_dir" not in settings
    assert "concurrency" not in settings["teacher"] and "model" in settings["teacher"]
    assert len(sig) == 12 and sig == signature()


def test_run_signature_holds_the_dtype_auto_chose():
    job = load_job(QUICKSTART, [])
    assert job.teacher.dtype == "auto"
    bf16, settings = run_signature(job, DIGESTS, teacher_dtype="bfloat16")
    fp32, _ = run_signature(job, DIGESTS, teacher_dtype="float32")
    assert bf16 != fp32 and settings["teacher"]["dtype"] == "bfloat16"  # never mixed in one run
    explicit = run_signature(load_job(QUICKSTART, ["teacher.dtype=bfloat16"]), DIGESTS,
                             teacher_dtype="bfloat16")[0]
    assert explicit == bf16  # the same dtype, chosen or set, is the same run


# --------------------------------------------------------------------------- build_steps, contract


CHAIN_YAML = f"""\
name: chain
seed: 0
output_dir: out
data:
  train_path: {DATA / "train.jsonl"}
  test_path: {DATA / "test.jsonl"}
  labels: [billing, shipping, technical]
  task: {TASK}
stages:
  - type: create
    method: few_shot
    shots: 2
    num_examples: 12
  - type: label
    mode: verify
  - type: paraphrase
    n: 2
  - type: counterfactual
  - type: judge
    rubric: Is it a realistic support message?
"""

STEP_NAMES = ["1:create.few_shot_2", "2:label.verify", "3:reform.paraphrase",
              "4:reform.counterfactual", "4:label.verify_counterfactual", "5:judge.rubric"]


@pytest.fixture
def chain_yaml(tmp_path):
    path = tmp_path / "chain.yaml"
    path.write_text(CHAIN_YAML)
    return path


def raw_frame():
    return pd.DataFrame(RAW)


def test_build_steps_and_contract_pass_for_a_full_chain(chain_yaml):
    job = load_job(chain_yaml)
    steps = build_steps(job, NO_FILTERS)
    assert [s.name for s in steps] == STEP_NAMES
    assert [type(s.op) for s in steps] == [CreateOp, LabelOp, ParaphraseOp, CounterfactualOp,
                                           LabelOp, JudgeOp]
    assert [s.text_filters is not None for s in steps] == [True, False, True, True, False, False]
    assert steps[1].op.mode == "verify" and steps[1].op.applies_to_method is None
    assert steps[4].op.applies_to_method == "reform.counterfactual"
    assert steps[4].op.expect_column == "target_label"
    assert steps[4].op.reject_reason == "counterfactual_not_flipped"
    assert steps[2].op.n == 2
    first = first_rows(job, raw_frame(), {})
    assert len(first) == 12
    check_contract(first, steps)  # raises on a broken chain
    # A judge may read a column an earlier stage adds.
    job = load_job(chain_yaml, ["stages.4.text_column=teacher_label"])
    check_contract(first_rows(job, raw_frame(), {}), build_steps(job, NO_FILTERS))


@pytest.mark.parametrize("override", ["stages.4.text_column=nope", "stages.4.target_column=nope"])
def test_contract_names_the_stage_and_the_missing_column(chain_yaml, override):
    job = load_job(chain_yaml, [override])
    steps = build_steps(job, NO_FILTERS)
    with pytest.raises(ColumnContractError) as err:
        check_contract(first_rows(job, raw_frame(), {}), steps)
    assert "5:judge.rubric" in str(err.value) or "5:judge.pair" in str(err.value)
    assert "'nope'" in str(err.value)


def test_first_rows_honours_max_requests(chain_yaml):
    job = load_job(chain_yaml)
    everything = first_rows(job, raw_frame(), {})
    capped = first_rows(load_job(chain_yaml, ["budget.max_requests=5"]), raw_frame(), {})
    assert len(capped) == 5 and capped == everything[:5]
    assert all((r["_status"], r["_reason"], r["_stage"]) == ("accepted", "", "") for r in capped)
    assert [r["target_label"] for r in capped] == ["billing", "shipping", "technical", "billing", "shipping"]
    by_id = {r["id"]: r for r in RAW}
    assert all(by_id[d]["label"] == r["target_label"] for r in capped for d in r["demo_ids"])
    # A first stage other than create consumes the raw rows themselves.
    job = load_job(chain_yaml, ["stages=[{type: paraphrase}]", "budget.max_requests=4"])
    rows = first_rows(job, raw_frame(), {})
    assert [r["id"] for r in rows] == ["r0", "r1", "r2", "r3"]
    assert all(r["method"] == "raw" and r["parent_ids"] == [] for r in rows)


@pytest.mark.slow
def test_a_create_plan_is_sized_on_the_driver_and_planned_by_shard(chain_yaml, ray_local, tmp_path):
    """The teacher's plan of a create round: shard sizes on the driver (with the budget's cap),
    the requests of each shard made by a planning task, equal to the pure plan's."""
    import ray

    from raydag.chain import create_op as make_create_op
    from raydag.teacher import _plan_create_shards, plan_round

    job = load_job(chain_yaml, ["budget.max_requests=11", "teacher.batch_size=4"])
    plan = plan_round(job, raw_frame(), {}, None, 0, [], 0, first_shard=3, shard_dir=tmp_path)
    assert plan.sizes == {3: 4, 4: 4, 5: 3}
    everything = first_rows(job, raw_frame(), {})
    assert plan.sample == everything[:8]
    op = make_create_op(job)  # the task's raw rows come from the object store
    settings = {"op": op, "raw_rows": [ray.put(raw_frame().to_dict("records"))],
                "num_examples": job.stages[0].num_examples, "seed": job.seed, "size": 4,
                "first_shard": 3, "total": 11}
    shards = _plan_create_shards(pd.DataFrame({"shard": [5, 3, 4]}), **settings)
    planned = {s: json.loads(r) for s, r in zip(shards["shard"], shards["rows"])}
    assert [row for s in (3, 4, 5) for row in planned[s]] == everything
    # The same through Ray Data, for any subset of the shards (a resumed run plans only those).
    through_ray = plan.dataset([5, 3]).take_all()
    assert {r["shard"]: json.loads(r["rows"]) for r in through_ray} == {5: planned[5], 3: planned[3]}


@pytest.mark.slow
def test_a_label_plan_over_the_unlabelled_input_is_made_in_ray_data(ray_local, tmp_path):
    """An annotate stage's shards: the unlabelled file read in Ray Data tasks and grouped into
    shards by Ray Data, equal to the driver's plan of the same rows (any subset of shards)."""
    from raydag.data import BadRows, read_texts, read_texts_in_ray, raw_lineage
    from raydag.teacher import plan_round

    path = tmp_path / "unlabelled.jsonl"
    path.write_text("".join(json.dumps({"text": f"message number {i}"}) + "\n" for i in range(23)))
    job = load_job(ROOT / "jobs" / "label_unlabelled.yaml", [
        "teacher.batch_size=4", "teacher.rows_per_shard=8", "budget.max_requests=21",
        f"data.unlabelled_path={path}"])
    inputs = {"unlabelled": read_texts_in_ray(path, "text", bad=BadRows(), chunk_bytes=100)}
    plan = plan_round(job, None, inputs, None, 0, [], 0, first_shard=2, shard_dir=tmp_path / "shards")
    assert (plan.size, plan.sizes) == (8, {2: 8, 3: 8, 4: 5})
    driver = raw_lineage(read_texts(path, ["text"]), job.seed, method="input").to_dict("records")
    expected = [{**row, "_status": "accepted", "_reason": "", "_stage": ""} for row in driver[:21]]
    assert plan.sample == expected[:8]
    shards = {r["shard"]: json.loads(r["rows"]) for r in plan.dataset([4, 2]).take_all()}
    assert shards == {2: expected[:8], 4: expected[16:21]}


def test_full_chain_runs_and_reconciles_with_a_scripted_teacher(chain_yaml, tmp_path):
    job = load_job(chain_yaml)
    steps = build_steps(job, NO_FILTERS)
    first = first_rows(job, raw_frame(), {})[:6]
    check_contract(first, steps)
    engine = ScriptedEngine(scripted_teacher)
    runner = ChainRunner(steps, engine_spec={}, engine=engine)
    summary = publish_shards(run_shards(runner, pd.DataFrame(shard_rows(first, 6))), str(tmp_path / "shards"))
    stats = json.loads(summary["stats"].iloc[0])
    frame = pd.read_parquet(tmp_path / "shards" / "shard-00000.parquet")

    assert len(engine.calls) == len(steps)
    assert [s["stage"] for s in stats] == STEP_NAMES
    # Rows in + created = rows out = accepted + dropped + quarantined.
    assert len(frame) == summary["rows"].iloc[0] == len(first) + sum(s["created"] for s in stats)
    statuses = frame["_status"].value_counts().to_dict()
    assert statuses.get("accepted", 0) == stats[-1]["accepted"]
    assert statuses.get("dropped", 0) == sum(sum(s["dropped"].values()) for s in stats)
    assert statuses.get("quarantined", 0) == sum(sum(s["quarantined"].values()) for s in stats)
    for before, after in zip(stats, stats[1:]):  # every step sees every row the previous one wrote
        assert after["rows_in"] + after["passed_through"] == \
            before["rows_in"] + before["passed_through"] + before["created"]

    create, verify, para, cf, verify_cf, judge = stats
    assert (create["rows_in"], create["accepted"]) == (6, 6)
    assert verify["dropped"] == {"label_disagreement": 2}  # creation requests 2 and 5
    assert (para["rows_in"], para["created"]) == (4, 8)
    assert (cf["rows_in"], cf["created"]) == (12, 12)
    assert (verify_cf["rows_in"], verify_cf["passed_through"]) == (12, len(first) + 8 + 12 - 12)
    assert sum(verify_cf["dropped"].values()) >= 1
    assert set(verify_cf["dropped"]) == {"counterfactual_not_flipped"}
    assert judge["rows_in"] == 12 + 12 - sum(verify_cf["dropped"].values())

    accepted = frame[frame["_status"] == "accepted"]
    assert accepted["judge_score"].round(6).eq(4.5).all()
    edits = frame[frame["method"] == "reform.counterfactual"]
    assert len(edits) == 12
    parents = frame.set_index("id")
    for _, edit in edits.iterrows():
        (parent,) = list(edit["parent_ids"])
        assert CounterfactualOp(TASK, LABELS).target_for(parents.loc[parent, "label"]) == edit["label"]
    paraphrases = frame[frame["method"] == "reform.paraphrase"]
    assert len(paraphrases) == 8
    assert all(parents.loc[list(p)[0], "label"] == label
               for p, label in zip(paraphrases["parent_ids"], paraphrases["label"]))


# --------------------------------------------------------------------------- label_distribution


def test_negative_label_shares_are_rejected():
    outcome = "accepted"
    try:
        job = load_job(QUICKSTART, ["stages.0.label_distribution={billing: -1, shipping: 2, technical: 1}"])
        counts = CreateOp(TASK, LABELS, label_distribution=job.stages[0].label_distribution).label_counts(40)
        outcome = "negative count" if min(counts.values()) < 0 else "accepted"
    except (ConfigError, ValueError):
        outcome = "rejected"
    assert outcome == "rejected"


def test_zero_sum_label_distribution_is_rejected():
    outcome = "accepted"
    try:
        job = load_job(QUICKSTART, ["stages.0.label_distribution={billing: 0, shipping: 0}"])
        CreateOp(TASK, LABELS, label_distribution=job.stages[0].label_distribution).label_counts(40)
    except (ConfigError, ValueError):
        outcome = "rejected"
    except ZeroDivisionError:
        outcome = "ZeroDivisionError"
    assert outcome == "rejected"


def test_publish_shards_redacts_pii_before_the_shard_is_written(tmp_path):
    """PII redaction runs in the publishing task, so no shard file ever holds the raw text."""
    import pickle
    import time

    rows = [{"id": "a", "text": "write to ann@example.com", "_raw_generation": "Mr Brown said hi"},
            {"id": "b", "text": "no personal data here", "_raw_generation": ""}]
    stats = [{**empty_stats("1:a"), "rows_in": 2, "accepted": 2}]
    generated = pd.DataFrame({"shard": [4], "rows": [pickle.dumps(rows)],
                              "stats": [json.dumps(stats)], "started_at": [time.time()], "run": [True]})
    summary = publish_shards(generated, str(tmp_path), pii_types=["email", "person"])
    frame = pd.read_parquet(tmp_path / "shard-00004.parquet")
    assert list(frame["text"]) == ["write to [EMAIL]", "no personal data here"]
    assert list(frame["_raw_generation"]) == ["[PERSON] said hi", ""]
    assert json.loads(frame["pii_redacted"][0]) == {"email": 1, "person": 1}
    assert list(summary["rows"]) == [2] and summary["seconds"].iloc[0] >= 0
    assert shard_stats(str(tmp_path / "shard-00004.parquet")) == stats
