"""Self-instruct and preference operators without an engine: ROUGE-L, novelty, prompts, parsing."""

from __future__ import annotations

import json
import math
import random

import pytest

from raydag.config import SamplingConfig
from raydag.engines.base import Completion
from raydag.ops import instruct
from raydag.ops.instruct import (
    PreferenceJudgeOp,
    ResponsePairOp,
    SelfInstructOp,
    format_task,
    novelty_filter,
    rouge_l,
)
from raydag.ops.judge import JudgeOp

SEEDS = [
    {"id": "s0", "instruction": "Give three tips for staying healthy.", "input": "",
     "output": "1. Eat well.\n2. Sleep enough.\n3. Exercise."},
    {"id": "s1", "instruction": "Translate the sentence into French.", "input": "Good morning.",
     "output": "Bonjour."},
    {"id": "s2", "instruction": "Sort the numbers in ascending order.", "input": "3, 1, 2",
     "output": "1, 2, 3"},
    {"id": "s3", "instruction": "Write a haiku about autumn.", "input": "",
     "output": "Leaves drift slowly down"},
    {"id": "s4", "instruction": "Classify the sentiment of the review.", "input": "I loved it!",
     "output": "positive"},
    {"id": "s5", "instruction": "Summarise the paragraph in one sentence.",
     "input": "Ray is a framework for scaling Python.", "output": "Ray scales Python."},
]


def done(text, finish="stop"):
    return Completion(text, 100, 20, finish)


# --- ROUGE-L ---------------------------------------------------------------------------------

def reference_rouge(a: str, b: str) -> float:
    """Plain full-table LCS, no shortcuts."""
    ta, tb = a.lower().split(), b.lower().split()
    if not ta or not tb:
        return 0.0
    table = [[0] * (len(tb) + 1) for _ in range(len(ta) + 1)]
    for i, x in enumerate(ta):
        for j, y in enumerate(tb):
            table[i + 1][j + 1] = (table[i][j] + 1 if x == y
                                   else max(table[i][j + 1], table[i + 1][j]))
    return 2 * table[-1][-1] / (len(ta) + len(tb))


def test_rouge_l_known_values():
    assert rouge_l("Write a poem about the sea", "write a poem about the sea") == 1.0
    assert rouge_l("Hello, world!", "hello world") == 1.0  # punctuation and case are ignored
    assert rouge_l("red green blue", "one two three") == 0.0
    assert rouge_l("", "anything") == 0.0 and rouge_l("...", "anything") == 0.0
    # LCS "the cat on mat" = 4 of 6 and 6 tokens: F = 2 * 4 / 12.
    assert rouge_l("the cat sat on the mat", "the cat lay on a mat") == pytest.approx(2 / 3)
    # Order matters (a subsequence, not a bag): LCS of "a b c" and "c b a" is 1.
    assert rouge_l("a b c", "c b a") == pytest.approx(1 / 3)
    # Different lengths: LCS 2 of 2 and 4 tokens.
    assert rouge_l("sort numbers", "sort these numbers please") == pytest.approx(2 * 2 / 6)
    assert rouge_l("x y z w", "y w") == rouge_l("y w", "x y z w")


def test_rouge_l_matches_a_plain_dynamic_programme_on_random_texts():
    rng = random.Random(11)
    vocab = "a b c d e f g h".split()
    for _ in range(400):
        a = " ".join(rng.choices(vocab, k=rng.randint(1, 15)))
        b = " ".join(rng.choices(vocab, k=rng.randint(1, 15)))
        assert rouge_l(a, b) == pytest.approx(reference_rouge(a, b))


# --- novelty filter --------------------------------------------------------------------------

def brute_novelty(candidates, existing, threshold):
    pool = list(existing)
    results = []
    for text in candidates:
        best, closest = 0.0, None
        for other in pool:
            score = rouge_l(text, other)
            if score > best:
                best, closest = score, other
        accepted = best < threshold
        results.append((accepted, best, closest))
        if accepted:
            pool.append(text)
    return results


def test_novelty_filter_keeps_new_rejects_near_copies_and_names_the_closest():
    existing = ["Write a short poem about the sea"]
    results = novelty_filter(
        ["Write a poem about the sea.", "Summarise this article.", "Summarise this article now!"],
        existing)
    assert [r[0] for r in results] == [False, True, False]
    assert results[0][1] == pytest.approx(12 / 13) and results[0][2] == existing[0]
    assert results[1] == (True, 0.0, None)  # shares no word with anything before it
    # The third is compared with the accepted second candidate too, not only with `existing`.
    assert results[2][2] == "Summarise this article." and results[2][1] == pytest.approx(6 / 7)


def test_novelty_filter_depends_on_candidate_order():
    long, short = "write a poem about the blue sea", "write a poem about the sea"
    forward = novelty_filter([long, short], [])
    backward = novelty_filter([short, long], [])
    assert [r[0] for r in forward] == [True, False] and forward[1][2] == long
    assert [r[0] for r in backward] == [True, False] and backward[1][2] == short


def test_novelty_threshold_is_strict():
    a, b = "the cat sat on the mat", "the cat lay on a mat"  # ROUGE-L exactly 2/3
    assert novelty_filter([b], [a], threshold=2 / 3)[0][0] is False
    assert novelty_filter([b], [a], threshold=0.67)[0][0] is True
    assert novelty_filter([b], [a], threshold=0.5)[0][0] is False
    assert novelty_filter([a], [a], threshold=1.0)[0] == (False, 1.0, a)  # exact copy never passes
    assert [r[0] for r in novelty_filter([a, a, b], [])] == [True, False, True]


@pytest.mark.parametrize("threshold", [0.4, 0.7, 0.9])
def test_novelty_bound_never_changes_the_result(threshold, monkeypatch):
    rng = random.Random(1234)
    vocab = "write a poem about the sea list three tips sort these numbers explain why".split()

    def text():
        return " ".join(rng.choices(vocab, k=rng.randint(1, 10)))

    existing = [text() for _ in range(40)]
    candidates = [text() for _ in range(300)] + existing[:5]  # some exact copies and ties
    expected = brute_novelty(candidates, existing, threshold)
    calls = []
    real = instruct._lcs_length
    monkeypatch.setattr(instruct, "_lcs_length", lambda a, b: calls.append(1) or real(a, b))
    got = novelty_filter(candidates, existing, threshold)
    assert got == expected  # same decisions, same scores, same closest text (ties included)
    assert any(r[0] for r in got) and not all(r[0] for r in got)
    pairs = sum(len(existing) + sum(r[0] for r in expected[:i]) for i in range(len(candidates)))
    assert len(calls) < pairs / 5  # the bound skipped most exact LCS computations


# --- self-instruct ---------------------------------------------------------------------------

def test_plan_is_seeded_deterministic_and_json_serialisable():
    op = SelfInstructOp(demos_per_request=3)
    plan = op.plan_requests(SEEDS, 40, seed=7)
    assert plan == SelfInstructOp(demos_per_request=3).plan_requests(SEEDS, 40, seed=7)
    assert json.loads(json.dumps(plan)) == plan
    assert [r["request_index"] for r in plan] == list(range(40))
    assert len({r["request_id"] for r in plan}) == 40
    assert len({r["request_seed"] for r in plan}) == 40
    assert all(isinstance(r["request_seed"], int) and 0 <= r["request_seed"] < 2**32 for r in plan)
    by_id = {s["id"]: s for s in SEEDS}
    for row in plan:
        assert len(row["demo_ids"]) == 3 == len(set(row["demo_ids"]))
        assert row["demo_texts"] == [
            format_task(by_id[d]["instruction"], by_id[d]["input"], by_id[d]["output"])
            for d in row["demo_ids"]]
    assert len({tuple(r["demo_ids"]) for r in plan}) > 10  # demonstrations vary per request
    other = op.plan_requests(SEEDS, 40, seed=8)
    assert [r["request_seed"] for r in other] != [r["request_seed"] for r in plan]
    assert [r["demo_ids"] for r in other] != [r["demo_ids"] for r in plan]
    assert op.plan_requests(SEEDS, 10, seed=7) == plan[:10]  # a prefix of a longer plan


def test_plan_clips_demos_to_the_seed_count_and_checks_seed_tasks():
    plan = SelfInstructOp(demos_per_request=10).plan_requests(SEEDS[:2], 3, seed=0)
    assert all(sorted(r["demo_ids"]) == ["s0", "s1"] for r in plan)
    with pytest.raises(ValueError, match="output"):
        SelfInstructOp().plan_requests([{"id": "x", "instruction": "Do it."}], 1, seed=0)


def test_request_continues_numbered_task_blocks():
    sampling = SamplingConfig(temperature=0.7, top_p=0.9, max_tokens=123)
    op = SelfInstructOp(task_hint="customer-support tasks for an online shop", sampling=sampling)
    row = op.plan_requests(SEEDS, 5, seed=3)[2]
    (request,) = op.build_requests(row)
    system, user, assistant = request.messages
    assert [m["role"] for m in request.messages] == ["system", "user", "assistant"]
    assert request.continue_final_message and request.stop == ("\nTask ",)
    assert request.seed == row["request_seed"]
    assert (request.temperature, request.top_p, request.max_tokens) == (0.7, 0.9, 123)
    assert "customer-support tasks for an online shop" in user["content"]
    text = assistant["content"]
    assert text.startswith("Task 1\nInstruction: ") and text.endswith("\n\nTask 4\nInstruction:")
    assert "Task 2\nInstruction: " in text and "Task 3\nInstruction: " in text
    for demo in row["demo_texts"]:
        assert demo in text
    assert op.build_requests(row) == [request]
    assert "The tasks are" not in SelfInstructOp().user_message()


def test_empty_input_is_shown_as_noinput():
    block = format_task("Write  a\nhaiku.", "", "Leaves fall")
    assert block == "Instruction: Write a haiku.\nInput: <noinput>\nOutput: Leaves fall"


def parse(text, finish="stop", op=None):
    op = op or SelfInstructOp()
    row = op.plan_requests(SEEDS, 1, seed=0)[0]
    return row, op.parse(row, [done(text, finish)])


def test_parse_a_good_continuation():
    row, (out,) = parse(" Convert the temperature to Celsius.\nInput: 212 F\nOutput: 100 C\n")
    assert "_status" not in out
    assert (out["instruction"], out["input"], out["output"]) == (
        "Convert the temperature to Celsius.", "212 F", "100 C")
    assert out["text"] == "Convert the temperature to Celsius.\n\n212 F"
    assert out["parent_ids"] == row["demo_ids"]
    again = parse(" Convert the temperature to Celsius.\nInput: 212 F\nOutput: 100 C")[1][0]
    other = parse(" Convert the temperature to Celsius.\nInput: 32 F\nOutput: 0 C")[1][0]
    assert out["id"] == again["id"] and out["id"] != other["id"]
    assert set(out) == set(SelfInstructOp.adds)


def test_parse_is_tolerant():
    # No input line, a multi-line output, a repeated label and a next block the stop missed.
    _, (out,) = parse(" Instruction: List two primary colours.\nOutput: - red\n- blue\n\nTask 5\n")
    assert (out["instruction"], out["input"], out["output"]) == (
        "List two primary colours.", "", "- red\n- blue")
    assert out["text"] == "List two primary colours."
    _, (out,) = parse(' "Name a planet."\nInput: <noinput>\nOutput: Mars\nInstruction: other')
    assert (out["instruction"], out["input"], out["output"]) == ("Name a planet.", "", "Mars")
    _, (out,) = parse(" **Instruction:** Add the numbers.\n**Input:** 2, 3\n**Output:** 5")
    assert (out["instruction"], out["input"], out["output"]) == ("Add the numbers.", "2, 3", "5")


def test_parse_recovers_what_the_prompt_format_writes():
    for seed in SEEDS:
        block = format_task(seed["instruction"], seed["input"], seed["output"])
        continuation = block.removeprefix("Instruction:")  # what follows the pre-filled header
        _, (out,) = parse(continuation)
        assert (out["instruction"], out["input"], out["output"]) == (
            seed["instruction"], seed["input"], seed["output"])


@pytest.mark.parametrize("text,finish,reason", [
    ("   \n ", "stop", "empty_generation"),
    (" Write a story about a dragon.\nInput: <noinput>\nOutput: Once upon", "length",
     "truncated_at_max_tokens"),
    ("\nInput: 3, 1\nOutput: 1, 3", "stop", "unparseable_instruction"),
    (" ### \nOutput: x", "stop", "unparseable_instruction"),
    (" Write a haiku about winter.\nInput: <noinput>\n", "stop", "missing_output"),
    (" Write a haiku about winter.\nOutput:   \n", "stop", "missing_output"),
    (" Explain photosynthesis.\nOutput: I'm sorry, but I can't help with that.", "stop", "refusal"),
])
def test_parse_failures_are_quarantined_with_a_reason(text, finish, reason):
    _, (out,) = parse(text, finish)
    assert (out["_status"], out["_reason"]) == ("quarantined", reason)
    assert out["instruction"] == "" and out["text"] == ""


# --- response pairs --------------------------------------------------------------------------

ROW = {"id": "q1", "instruction": "Sort the numbers.", "input": "3, 1, 2"}


def test_response_pair_requests_differ_only_in_seed():
    op = ResponsePairOp()
    first, second = op.build_requests(ROW)
    assert first.messages == second.messages and first.seed != second.seed
    assert "Sort the numbers." in first.messages[-1]["content"]
    assert "3, 1, 2" in first.messages[-1]["content"]
    assert [r.seed for r in op.build_requests(ROW)] == [first.seed, second.seed]
    other = op.build_requests({**ROW, "id": "q2"})
    assert {r.seed for r in other}.isdisjoint({first.seed, second.seed})
    no_input = op.build_requests({**ROW, "input": ""})[0].messages[-1]["content"]
    assert no_input == "Sort the numbers."


def test_response_pair_parse():
    op = ResponsePairOp()
    (out,) = op.parse(ROW, [done(" 1, 2, 3 "), done("The sorted list is 1, 2, 3.")])
    assert out == {"response_a": "1, 2, 3", "response_b": "The sorted list is 1, 2, 3."}
    (same,) = op.parse(ROW, [done("1, 2,\n 3"), done("1,  2, 3")])
    assert (same["_status"], same["_reason"]) == ("dropped", "identical_responses")
    (empty,) = op.parse(ROW, [done("1, 2, 3"), done("  ")])
    assert (empty["_status"], empty["_reason"]) == ("quarantined", "empty_generation")
    (cut,) = op.parse(ROW, [done("1, 2, 3", "length"), done("1 2 3")])
    assert (cut["_status"], cut["_reason"]) == ("quarantined", "truncated_at_max_tokens")
    # Case differences are real differences, not whitespace.
    assert "_status" not in op.parse(ROW, [done("Yes"), done("yes")])[0]


# --- preference judge ------------------------------------------------------------------------

PAIR = {"instruction": "Sort the numbers.", "input": "3, 1, 2",
        "response_a": "1, 2, 3", "response_b": "3, 2, 1"}


def scored(logprobs: dict[str, float], text: str | None = None) -> Completion:
    best = max(logprobs, key=logprobs.get) if logprobs else "?"
    return Completion(text or best, 50, 1, "stop", top_logprobs=(logprobs,) if logprobs else ())


def test_preference_requests_score_each_response_with_the_judge():
    op = PreferenceJudgeOp(rubric="Is the response correct and helpful?")
    first, second = op.build_requests(PAIR)
    assert first.choices == ("1", "2", "3", "4", "5") and first.logprobs > 0
    a_text, b_text = first.messages[-1]["content"], second.messages[-1]["content"]
    for text in (a_text, b_text):
        assert "Is the response correct and helpful?" in text
        assert "Instruction: Sort the numbers." in text and "Input: 3, 1, 2" in text
    assert "Response: 1, 2, 3" in a_text and "Response: 3, 2, 1" in b_text
    assert first == JudgeOp(rubric="Is the response correct and helpful?").score_request(
        op.judged_text(PAIR["instruction"], PAIR["input"], PAIR["response_a"]))
    assert "Input:" not in op.build_requests({**PAIR, "input": ""})[0].messages[-1]["content"]


def test_preference_orders_by_expected_score_not_by_the_top_digit():
    op = PreferenceJudgeOp(rubric="Correct?")
    # Both responses' most likely digit is 4, but b's expected value is higher.
    a = scored({"4": math.log(0.6), "3": math.log(0.4)})
    b = scored({"4": math.log(0.6), "5": math.log(0.4)})
    (out,) = op.parse(PAIR, [a, b])
    assert out["chosen"] == "3, 2, 1" and out["rejected"] == "1, 2, 3"
    assert out["chosen_score"] == pytest.approx(4.4) and out["rejected_score"] == pytest.approx(3.6)
    assert out["score_margin"] == pytest.approx(0.8)
    (flipped,) = op.parse(PAIR, [b, a])
    assert flipped["chosen"] == "1, 2, 3" and flipped["chosen_score"] == pytest.approx(4.4)
    assert set(out) == set(PreferenceJudgeOp.adds)


def test_preference_drops_ties_and_quarantines_unreadable_scores():
    a = scored({"4": math.log(0.52), "3": math.log(0.48)})  # 3.52
    b = scored({"4": math.log(0.55), "3": math.log(0.45)})  # 3.55
    (tie,) = PreferenceJudgeOp(rubric="Correct?").parse(PAIR, [a, b])
    assert (tie["_status"], tie["_reason"]) == ("dropped", "tie")
    assert tie["score_margin"] == pytest.approx(0.03)
    (kept,) = PreferenceJudgeOp(rubric="Correct?", min_margin=0.01).parse(PAIR, [a, b])
    assert "_status" not in kept and kept["chosen"] == PAIR["response_b"]
    # No log-probabilities: the constrained digit is the score.
    (digits,) = PreferenceJudgeOp(rubric="Correct?").parse(PAIR, [scored({}, "2"), scored({}, "5")])
    assert (digits["chosen_score"], digits["rejected_score"]) == (5.0, 2.0)
    (bad,) = PreferenceJudgeOp(rubric="Correct?").parse(PAIR, [a, scored({}, "great")])
    assert (bad["_status"], bad["_reason"]) == ("quarantined", "unparseable_score")
    with pytest.raises(ValueError):
        PreferenceJudgeOp(rubric="Correct?", min_margin=-1)
