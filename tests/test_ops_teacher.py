"""Teacher operators without an engine: plans, requests and parsing of hand-built completions.

Pure tests: no Ray, no vLLM. Every probability below is computed by hand from the
log-probabilities the test puts in the completion.
"""

from __future__ import annotations

import doctest
import importlib
import json
import math
from collections import Counter

import pytest

from raydag.engines.base import Completion
from raydag.ops.create import CreateOp, TopicsOp, label_counts
from raydag.ops.judge import SCORES, JudgeOp
from raydag.ops.label import PROMPT_VARIANTS, LabelOp
from raydag.ops.reform import CounterfactualOp, ParaphraseOp

LABELS = ["billing", "shipping", "technical"]
TASK = "Route customer-support messages by topic."
RAW = [{"id": f"r{i}", "text": f"raw support message number {i}", "label": LABELS[i % 3]}
       for i in range(30)]
TOPICS = ["refunds", "late parcels", "broken blenders", "warranty", "password reset", "invoices"]


def done(text: str, finish: str = "stop", top=(), token_logprobs=()) -> Completion:
    return Completion(text, 40, 5, finish, top_logprobs=tuple(top), token_logprobs=tuple(token_logprobs))


def logs(probs: dict[str, float]) -> dict[str, float]:
    return {token: math.log(p) for token, p in probs.items()}


def user_of(request) -> str:
    return next(m["content"] for m in request.messages if m["role"] == "user")


# --------------------------------------------------------------------------- CreateOp: planning


def test_label_counts_balanced_by_default_with_ties_to_earlier_labels():
    assert label_counts(LABELS, 30) == {"billing": 10, "shipping": 10, "technical": 10}
    assert label_counts(LABELS, 31) == {"billing": 11, "shipping": 10, "technical": 10}
    assert label_counts(LABELS, 32) == {"billing": 11, "shipping": 11, "technical": 10}
    assert label_counts(LABELS, 100, {"billing": 1, "shipping": 1, "technical": 1}) == \
        label_counts(LABELS, 100)


def test_label_counts_follow_the_distribution():
    assert label_counts(["a", "b"], 40, {"a": 3, "b": 1}) == {"a": 30, "b": 10}
    # A label the distribution leaves out gets no requests.
    assert label_counts(LABELS, 40, {"billing": 3, "shipping": 1}) == \
        {"billing": 30, "shipping": 10, "technical": 0}


@pytest.mark.parametrize("distribution", [None, {"billing": 3, "shipping": 1},
                                          {"billing": 0.2, "shipping": 0.5, "technical": 0.3},
                                          {"billing": 1, "shipping": 1, "technical": 5}])
def test_label_counts_always_sum_to_num_examples(distribution):
    for num in range(1, 60):
        counts = label_counts(LABELS, num, distribution)
        assert sum(counts.values()) == num, (num, counts)
        assert all(c >= 0 for c in counts.values())
        assert set(counts) == set(LABELS)


def test_plan_is_balanced_by_default():
    plan = CreateOp(TASK, LABELS).plan_requests(RAW, 31, seed=0)
    assert len(plan) == 31
    assert Counter(r["target_label"] for r in plan) == {"billing": 11, "shipping": 10, "technical": 10}
    # Interleaved: every prefix follows the distribution.
    assert [r["target_label"] for r in plan[:6]] == LABELS + LABELS


def test_plan_follows_label_distribution():
    op = CreateOp(TASK, LABELS, label_distribution={"billing": 3, "shipping": 1})
    plan = op.plan_requests(RAW, 40, seed=3)
    assert Counter(r["target_label"] for r in plan) == {"billing": 30, "shipping": 10}
    assert op.label_counts(40) == {"billing": 30, "shipping": 10, "technical": 0}


def test_few_shot_demos_are_of_the_target_label():
    op = CreateOp(TASK, LABELS, method="few_shot", shots=3)
    by_id = {r["id"]: r for r in RAW}
    plan = op.plan_requests(RAW, 12, seed=0)
    for row in plan:
        assert len(row["demo_ids"]) == 3 and len(set(row["demo_ids"])) == 3
        assert all(by_id[d]["label"] == row["target_label"] for d in row["demo_ids"])
        assert row["demo_texts"] == [by_id[d]["text"] for d in row["demo_ids"]]
    request = op.build_requests(plan[0])[0]
    assistant = request.messages[-1]["content"]
    assert assistant.startswith("1. ") and assistant.endswith("\n4.")
    assert all(t in assistant for t in plan[0]["demo_texts"])


def test_one_shot_has_exactly_one_demo_of_the_target_label():
    op = CreateOp(TASK, LABELS, method="one_shot", shots=5)  # shots is ignored by one_shot
    by_id = {r["id"]: r for r in RAW}
    plan = op.plan_requests(RAW, 9, seed=1)
    for row in plan:
        assert len(row["demo_ids"]) == 1
        assert by_id[row["demo_ids"][0]]["label"] == row["target_label"]
    request = op.build_requests(plan[0])[0]
    assert request.messages[-1]["content"] == f"1. {plan[0]['demo_texts'][0]}\n2."


@pytest.mark.parametrize("method", ["zero_shot", "zero_shot_topic"])
def test_zero_shot_methods_have_no_demos(method):
    op = CreateOp(TASK, LABELS, method=method, shots=3, topics=TOPICS)
    plan = op.plan_requests(RAW, 9, seed=0)
    assert all(r["demo_ids"] == [] and r["demo_texts"] == [] for r in plan)
    request = op.build_requests(plan[0])[0]
    assert request.messages[-1]["content"] == "1."
    assert request.continue_final_message and request.stop == ("\n",)
    assert request.seed == plan[0]["request_seed"]


def test_zero_shot_topic_puts_the_topic_in_the_prompt_and_topics_vary():
    op = CreateOp(TASK, LABELS, method="zero_shot_topic", topics=TOPICS)
    plan = op.plan_requests(RAW, 30, seed=5)
    assert all(r["topic"] in TOPICS for r in plan)
    assert len({r["topic"] for r in plan}) > 2
    for row in plan[:5]:
        user = user_of(op.build_requests(row)[0])
        assert f'"{row["topic"]}"' in user
        assert f'whose label is "{row["target_label"]}"' in user
    assert [r["topic"] for r in plan] == [r["topic"] for r in op.plan_requests(RAW, 30, seed=5)]
    # zero_shot has no topic at all.
    plain = CreateOp(TASK, LABELS, method="zero_shot").plan_requests(RAW, 3, seed=5)
    assert all(r["topic"] == "" for r in plain)
    assert "topic:" not in user_of(CreateOp(TASK, LABELS, method="zero_shot").build_requests(plain[0])[0])


def test_zero_shot_topic_needs_topics_and_methods_are_checked():
    with pytest.raises(ValueError, match="topic"):
        CreateOp(TASK, LABELS, method="zero_shot_topic", topics=[])
    with pytest.raises(ValueError, match="unknown creation method"):
        CreateOp(TASK, LABELS, method="two_shot")


def test_plans_are_deterministic_per_seed_and_differ_across_seeds():
    op = CreateOp(TASK, LABELS, method="few_shot", shots=2)
    plan = op.plan_requests(RAW, 24, seed=11)
    assert plan == CreateOp(TASK, LABELS, method="few_shot", shots=2).plan_requests(RAW, 24, seed=11)
    other = op.plan_requests(RAW, 24, seed=12)
    assert [r["request_seed"] for r in plan] != [r["request_seed"] for r in other]
    assert [r["demo_ids"] for r in plan] != [r["demo_ids"] for r in other]
    assert len({r["request_id"] for r in plan}) == 24
    assert len({r["request_seed"] for r in plan}) == 24


def test_method_names():
    assert CreateOp(TASK, LABELS, method="few_shot", shots=3).name == "create.few_shot_3"
    assert CreateOp(TASK, LABELS, method="few_shot", shots=5).name == "create.few_shot_5"
    assert CreateOp(TASK, LABELS, method="one_shot", shots=3).name == "create.one_shot"
    assert CreateOp(TASK, LABELS, method="zero_shot", shots=3).name == "create.zero_shot"
    assert CreateOp(TASK, LABELS, method="zero_shot_topic", topics=TOPICS).name == "create.zero_shot_topic"


# --------------------------------------------------------------------------- CreateOp: parsing


def _plan_row(seed=0, index=0, method="few_shot"):
    return CreateOp(TASK, LABELS, method=method, shots=2).plan_requests(RAW, 6, seed=seed)[index]


@pytest.mark.parametrize("text, finish, reason", [
    ("", "stop", "empty_generation"),
    ("   \n  ", "stop", "empty_generation"),
    (" My invoice shows a charge that I do not recogn", "length", "truncated_at_max_tokens"),
    (" I can't help with that request.", "stop", "refusal"),
    (" As an AI language model, I will not do this.", "stop", "refusal"),
    (' "Billing."', "stop", "label_only"),
    (" shipping", "stop", "label_only"),
])
def test_create_parse_quarantines_unusable_generations(text, finish, reason):
    op = CreateOp(TASK, LABELS, method="few_shot", shots=2)
    row = _plan_row()
    out = op.parse(row, [done(text, finish)])
    assert len(out) == 1
    assert out[0]["_status"] == "quarantined" and out[0]["_reason"] == reason
    assert out[0]["text"] == "" and out[0]["label"] == row["target_label"]


def test_create_parse_keeps_support_messages_that_look_like_refusals():
    op = CreateOp(TASK, LABELS)
    out = op.parse(_plan_row(), [done(" I can't find my tracking number anywhere.")])
    assert "_status" not in out[0] and out[0]["text"] == "I can't find my tracking number anywhere."


def test_create_parse_accepts_with_lineage_and_stable_ids():
    op = CreateOp(TASK, LABELS, method="few_shot", shots=2)
    row = _plan_row(index=1)
    out = op.parse(row, [done(' "My parcel has been stuck in customs for two weeks."')])
    assert len(out) == 1
    new = out[0]
    assert set(new) == {"id", "parent_ids", "text", "label"}
    assert new["text"] == "My parcel has been stuck in customs for two weeks."
    assert new["label"] == row["target_label"]
    assert new["parent_ids"] == row["demo_ids"] and len(new["parent_ids"]) == 2
    # Stable: same inputs, same id; another request or another text gives another id.
    again = op.parse(row, [done(' "My parcel has been stuck in customs for two weeks."')])[0]
    assert again["id"] == new["id"]
    other_request = op.parse(_plan_row(index=4), [done("My parcel has been stuck in customs for two weeks.")])[0]
    assert other_request["id"] != new["id"]
    other_text = op.parse(row, [done("Where is the parcel I ordered on Monday?")])[0]
    assert other_text["id"] != new["id"]


def test_topics_op_parses_a_numbered_list_into_deduplicated_topics():
    op = TopicsOp(TASK, num_topics=10)
    request = op.build_requests({"request_seed": 42})[0]
    assert request.seed == 42 and request.continue_final_message
    assert request.messages[-1]["content"] == "1."
    text = (" Refunds and returns\n2. Delivery delays\n3. refunds and returns\n"
            '4. "Warranty claims"\n5. X\n\n6. Delivery delays.\n7. Password resets')
    assert op.parse({}, [done(text)]) == [{"topics": ["Refunds and returns", "Delivery delays",
                                                       "Warranty claims", "Password resets"],
                                           "_raw_generation": text}]
    assert TopicsOp(TASK, num_topics=2).parse({}, [done(text)]) == \
        [{"topics": ["Refunds and returns", "Delivery delays"], "_raw_generation": text}]


# --------------------------------------------------------------------------- LabelOp: requests


def test_label_requests_are_constrained_to_the_label_set_with_logprobs():
    op = LabelOp(TASK, LABELS)
    requests = op.build_requests({"text": "Refund   my\ncard"})
    assert len(requests) == 1
    assert requests[0].choices == tuple(LABELS) and requests[0].logprobs > 0
    assert requests[0].temperature == 0.0 and requests[0].seed is None
    assert "Text: Refund my card" in user_of(requests[0])


def test_label_votes_by_prompts_are_three_greedy_prompt_variants():
    op = LabelOp(TASK, LABELS, votes=3, vote_by="prompts")
    requests = op.build_requests({"text": "Where is my parcel?"})
    assert len(requests) == 3
    users = [user_of(r) for r in requests]
    assert len(set(users)) == 3
    assert users[0] == PROMPT_VARIANTS[0].format(task=TASK, labels=", ".join(LABELS), text="Where is my parcel?")
    assert all(r.temperature == 0.0 and r.seed is None for r in requests)
    assert all(r.choices == tuple(LABELS) and r.logprobs > 0 for r in requests)


def test_label_votes_by_samples_are_seeded_samples_of_one_prompt():
    op = LabelOp(TASK, LABELS, votes=3, vote_by="samples", temperature=0.7)
    requests = op.build_requests({"text": "Where is my parcel?"})
    assert len(requests) == 3
    assert len({user_of(r) for r in requests}) == 1
    assert all(r.temperature == 0.7 for r in requests)
    seeds = [r.seed for r in requests]
    assert all(isinstance(s, int) for s in seeds) and len(set(seeds)) == 3
    assert seeds == [r.seed for r in op.build_requests({"text": "Where is my parcel?"})]
    assert all(r.choices == tuple(LABELS) and r.logprobs > 0 for r in requests)


def test_label_op_rejects_unknown_modes():
    with pytest.raises(ValueError):
        LabelOp(TASK, LABELS, mode="guess")
    with pytest.raises(ValueError):
        LabelOp(TASK, LABELS, vote_by="coin")


# --------------------------------------------------------------------------- LabelOp: parsing


def test_label_confidence_is_the_renormalised_first_token_probability():
    op = LabelOp(TASK, LABELS)
    completion = done("billing", top=[{"billing": -0.2, "ship": -1.8, "Hello": -0.5}])
    out = op.parse({"text": "Refund my card"}, [completion])
    assert len(out) == 1 and "_status" not in out[0]
    billing, shipping = math.exp(-0.2), math.exp(-1.8)  # "Hello" is no label: left out
    assert out[0]["label"] == "billing"
    assert out[0]["label_confidence"] == pytest.approx(billing / (billing + shipping))
    assert out[0]["label_confidence"] == pytest.approx(0.8320, abs=1e-4)
    assert out[0]["label_margin"] == pytest.approx((billing - shipping) / (billing + shipping))
    assert out[0]["label_agreement"] == 1.0
    assert json.loads(out[0]["label_votes"]) == ["billing"]


def test_label_votes_mean_confidence_margin_and_agreement():
    op = LabelOp(TASK, LABELS, votes=3)
    completions = [
        done("billing", top=[logs({"billing": 0.7, "shipping": 0.2, "technical": 0.1})]),
        done("billing", top=[logs({"billing": 0.5, "shipping": 0.4, "technical": 0.1})]),
        done("shipping", top=[logs({"billing": 0.3, "shipping": 0.6, "technical": 0.1})]),
    ]
    out = op.parse({"text": "x"}, completions)[0]
    # Mean distribution: billing 0.5, shipping 0.4, technical 0.1.
    assert out["label"] == "billing"
    assert out["label_confidence"] == pytest.approx(0.5)
    assert out["label_margin"] == pytest.approx(0.1)
    assert out["label_agreement"] == pytest.approx(2 / 3)
    assert json.loads(out["label_votes"]) == ["billing", "billing", "shipping"]


def test_label_majority_tie_goes_to_the_higher_mean_probability():
    op = LabelOp(TASK, LABELS, votes=2)
    completions = [done("billing", top=[logs({"billing": 0.4, "shipping": 0.6})]),
                   done("shipping", top=[logs({"billing": 0.3, "shipping": 0.7})])]
    out = op.parse({"text": "x"}, completions)[0]
    assert out["label"] == "shipping"
    assert out["label_confidence"] == pytest.approx(0.65)
    assert out["label_agreement"] == pytest.approx(0.5)


def test_label_majority_tie_without_logprobs_goes_to_label_set_order():
    op = LabelOp(TASK, LABELS, votes=2)
    out = op.parse({"text": "x"}, [done("technical"), done("shipping")])[0]
    assert out["label"] == "shipping"
    assert math.isnan(out["label_confidence"]) and math.isnan(out["label_margin"])
    assert out["label_agreement"] == pytest.approx(0.5)


def test_label_invalid_votes_count_against_agreement():
    op = LabelOp(TASK, LABELS, votes=3)
    out = op.parse({"text": "x"}, [done("billing"), done("refund"), done("billing")])[0]
    assert out["label"] == "billing"
    assert out["label_agreement"] == pytest.approx(2 / 3)
    assert json.loads(out["label_votes"]) == ["billing", None, "billing"]


def test_label_not_in_label_set_is_quarantined_when_every_vote_is_invalid():
    op = LabelOp(TASK, LABELS, votes=2)
    out = op.parse({"text": "x"}, [done("Billing department"), done("")])
    assert len(out) == 1
    assert out[0]["_status"] == "quarantined" and out[0]["_reason"] == "label_not_in_label_set"
    assert json.loads(out[0]["label_votes"]) == ["Billing department", ""]


def test_verify_mode_keeps_agreeing_rows_and_drops_disagreeing_ones():
    op = LabelOp(TASK, LABELS, mode="verify")
    assert op.name == "label.verify"
    assert op.requires == ("text", "label") and op.adds[0] == "teacher_label"
    agree = op.parse({"text": "x", "label": "billing"}, [done("billing")])
    assert "_status" not in agree[0] and agree[0]["teacher_label"] == "billing"
    assert "label" not in agree[0]  # verify never rewrites the label
    disagree = op.parse({"text": "x", "label": "shipping"}, [done("billing")])
    assert disagree[0]["_status"] == "dropped" and disagree[0]["_reason"] == "label_disagreement"
    assert disagree[0]["teacher_label"] == "billing"


def test_verify_mode_uses_expect_column_and_custom_reject_reason():
    op = LabelOp(TASK, LABELS, mode="verify", expect_column="target_label",
                 reject_reason="counterfactual_not_flipped")
    assert op.requires == ("text", "target_label")
    row = {"text": "x", "label": "billing", "target_label": "shipping"}
    out = op.parse(row, [done("billing")])
    assert out[0]["_status"] == "dropped" and out[0]["_reason"] == "counterfactual_not_flipped"
    assert "_status" not in op.parse(row, [done("shipping")])[0]


def test_labels_sharing_a_first_token_fall_back_to_the_token_logprob_product():
    labels = ["negative", "neutral", "positive"]
    op = LabelOp("Sentiment.", labels)
    completion = done("neutral", top=[{"ne": -0.1, "pos": -2.5}], token_logprobs=[-0.1, -0.2])
    out = op.parse({"text": "x"}, [completion])[0]
    p = math.exp(-0.3)
    rest = (1 - p) / 2
    assert out["label"] == "neutral"
    assert out["label_confidence"] == pytest.approx(p)
    assert out["label_margin"] == pytest.approx(p - rest)
    # Without token log-probabilities there is no confidence at all.
    bare = op.parse({"text": "x"}, [done("neutral", top=[{"ne": -0.1}])])[0]
    assert bare["label"] == "neutral" and math.isnan(bare["label_confidence"])


def test_applies_to_method():
    every = LabelOp(TASK, LABELS, mode="verify")
    assert every.applies({"method": "create.few_shot_3"}) and every.applies({})
    only = LabelOp(TASK, LABELS, mode="verify", applies_to_method="reform.counterfactual")
    assert only.applies({"method": "reform.counterfactual"})
    assert not only.applies({"method": "reform.paraphrase"})
    assert not only.applies({})


# --------------------------------------------------------------------------- reformation


ROW = {"id": "a1", "text": "Where is my parcel?", "label": "shipping"}


def test_paraphrase_requests_are_seeded_with_distinct_seeds():
    op = ParaphraseOp(n=3)
    requests = op.build_requests(ROW)
    assert len(requests) == 3
    seeds = [r.seed for r in requests]
    assert all(isinstance(s, int) for s in seeds) and len(set(seeds)) == 3
    assert seeds == [r.seed for r in ParaphraseOp(n=3).build_requests(ROW)]
    assert all(r.temperature == 0.8 and r.stop == ("\n",) for r in requests)
    assert "Text: Where is my parcel?" in user_of(requests[0])


def test_paraphrase_keeps_the_original_first_and_adds_rewrites():
    op = ParaphraseOp(n=4, labels=LABELS)
    completions = [done("Has my package shipped yet?"), done(" where is my parcel"),
                   done(""), done("Rewrite: Could you tell me where my order is?")]
    out = op.parse(ROW, completions)
    assert len(out) == 5
    assert out[0] == {}
    kept = out[1]
    assert "_status" not in kept
    assert kept["text"] == "Has my package shipped yet?" and kept["label"] == "shipping"
    assert kept["parent_ids"] == ["a1"] and kept["method"] == "reform.paraphrase"
    assert out[2]["_status"] == "dropped" and out[2]["_reason"] == "unchanged_rewrite"
    assert out[2]["parent_ids"] == ["a1"]
    assert out[3]["_status"] == "quarantined" and out[3]["_reason"] == "empty_generation"
    assert out[4]["text"] == "Could you tell me where my order is?" and "_status" not in out[4]
    ids = [o["id"] for o in out[1:]]
    assert len(set(ids)) == 4 and "a1" not in ids
    assert [o["id"] for o in op.parse(ROW, completions)[1:]] == ids


def test_counterfactual_targets_the_next_label_wrapping_around():
    op = CounterfactualOp(TASK, LABELS)
    assert [op.target_for(label) for label in LABELS] == ["shipping", "technical", "billing"]
    row = {"id": "t1", "text": "The app crashes when I open it.", "label": "technical"}
    requests = op.build_requests(row)
    assert len(requests) == 1 and isinstance(requests[0].seed, int)
    assert requests[0].seed != op.build_requests({**row, "id": "t2"})[0].seed
    assert 'its label becomes "billing"' in user_of(requests[0])
    out = op.parse(row, [done("I was charged twice when I opened the app.")])
    assert out[0] == {} and len(out) == 2
    edit = out[1]
    assert "_status" not in edit
    assert edit["label"] == "billing" and edit["target_label"] == "billing"
    assert edit["parent_ids"] == ["t1"] and edit["method"] == "reform.counterfactual"
    assert edit["text"] == "I was charged twice when I opened the app."


def test_counterfactual_drops_unchanged_and_quarantines_empty_edits():
    op = CounterfactualOp(TASK, LABELS)
    row = {"id": "b1", "text": "Why was I charged twice?", "label": "billing"}
    unchanged = op.parse(row, [done('"why was I charged twice"')])[1]
    assert unchanged["_status"] == "dropped" and unchanged["_reason"] == "unchanged_rewrite"
    assert unchanged["target_label"] == "shipping"
    empty = op.parse(row, [done("  ")])[1]
    assert empty["_status"] == "quarantined" and empty["_reason"] == "empty_generation"
    assert empty["parent_ids"] == ["b1"]


# --------------------------------------------------------------------------- JudgeOp


def judged(op: JudgeOp, probs: dict[str, float], row=None, extra=()):
    return op.parse(row or {"text": "x"}, [done(max(probs, key=probs.get), top=[logs(probs)]), *extra])


def test_judge_score_is_the_expected_value_over_digit_probabilities():
    op = JudgeOp(rubric="Realistic?")
    out = judged(op, {"4": 0.6, "5": 0.3, "3": 0.1})[0]
    assert out["judge_score"] == pytest.approx(4 * 0.6 + 5 * 0.3 + 3 * 0.1)  # 4.2
    assert out["judge_score_probs"] == pytest.approx([0.0, 0.0, 0.1, 0.6, 0.3])
    assert out["judge_score_source"] == "logprobs"
    # Non-digit tokens are ignored and the digits renormalised.
    other = op.parse({"text": "x"}, [done("2", top=[{"2": math.log(0.3), " 1": math.log(0.3),
                                                      "Two": math.log(0.4)}])])[0]
    assert other["judge_score"] == pytest.approx(1.5)


def test_judge_expected_value_of_the_docstring_completion():
    op = JudgeOp(rubric="Is it a realistic support message?")
    w = {4: math.exp(-0.1), 5: math.exp(-2.4), 3: math.exp(-3.0)}
    expected = sum(k * v for k, v in w.items()) / sum(w.values())  # 4.0392
    result = op.score(done("4", top=[{"4": -0.1, "5": -2.4, "3": -3.0}]))
    assert result["score"] == pytest.approx(expected)
    assert result["score"] == pytest.approx(4.0392, abs=1e-4)


def test_judge_temperature_calibration_moves_the_score_toward_the_middle():
    probs = {"1": 0.02, "2": 0.03, "3": 0.05, "4": 0.3, "5": 0.6}

    def at(t):
        return judged(JudgeOp(rubric="r", temperature=t), probs)[0]["judge_score"]

    def by_hand(t):
        w = {int(k): p ** (1 / t) for k, p in probs.items()}
        return sum(k * v for k, v in w.items()) / sum(w.values())

    assert at(1.0) == pytest.approx(4.43)
    assert at(2.0) == pytest.approx(by_hand(2.0))
    assert at(0.5) == pytest.approx(by_hand(0.5))
    assert 3 < at(2.0) < at(1.0) < at(0.5) < 5
    low = {"1": 0.6, "2": 0.3, "3": 0.1}
    cold = judged(JudgeOp(rubric="r"), low)[0]["judge_score"]
    warm = judged(JudgeOp(rubric="r", temperature=3.0), low)[0]["judge_score"]
    assert cold < warm < 3


def test_judge_scale_maps_one_to_five_onto_the_range():
    op = JudgeOp(rubric="r", scale=(0.0, 1.0))
    assert judged(op, {"1": 1.0})[0]["judge_score"] == pytest.approx(0.0)
    assert judged(op, {"5": 1.0})[0]["judge_score"] == pytest.approx(1.0)
    assert judged(op, {"3": 1.0})[0]["judge_score"] == pytest.approx(0.5)
    assert judged(op, {"4": 0.6, "5": 0.3, "3": 0.1})[0]["judge_score"] == pytest.approx(0.8)
    assert judged(JudgeOp(rubric="r", scale=(-1.0, 1.0)), {"2": 1.0})[0]["judge_score"] == \
        pytest.approx(-0.5)


def test_judge_without_logprobs_falls_back_to_the_chosen_digit():
    op = JudgeOp(rubric="r")
    out = op.parse({"text": "x"}, [done("4")])[0]
    assert out["judge_score"] == 4.0 and out["judge_score_source"] == "choice"
    assert out["judge_score_probs"] == [0.0, 0.0, 0.0, 1.0, 0.0]
    scaled = JudgeOp(rubric="r", scale=(0.0, 1.0)).parse({"text": "x"}, [done("4")])[0]
    assert scaled["judge_score"] == pytest.approx(0.75)


def test_judge_garbage_is_quarantined():
    op = JudgeOp(rubric="r")
    for completion in (done("maybe"), done("maybe", top=[{"maybe": -0.1}]), done("")):
        out = op.parse({"text": "x"}, [completion])
        assert out == [{"_status": "quarantined", "_reason": "unparseable_score"}]


def test_judge_min_score_drops_low_rows():
    probs = {"4": 0.6, "5": 0.3, "3": 0.1}  # 4.2
    kept = judged(JudgeOp(rubric="r", min_score=4.0), probs)[0]
    assert "_status" not in kept
    dropped = judged(JudgeOp(rubric="r", min_score=4.5), probs)[0]
    assert dropped["_status"] == "dropped" and dropped["_reason"] == "judge_below_threshold"
    assert dropped["judge_score"] == pytest.approx(4.2)
    # min_score compares the scaled score.
    scaled = judged(JudgeOp(rubric="r", scale=(0.0, 1.0), min_score=0.9), probs)[0]
    assert scaled["_reason"] == "judge_below_threshold"


def test_judge_requests_and_rationale():
    op = JudgeOp(rubric="Realistic?", score_column="quality")
    requests = op.build_requests({"text": "Where is my parcel?"})
    assert len(requests) == 1
    assert requests[0].choices == SCORES and requests[0].logprobs > 0 and requests[0].max_tokens == 1
    assert op.adds == ("quality", "quality_probs", "quality_source")
    with_reason = JudgeOp(rubric="Realistic?", score_column="quality", rationale=True)
    assert with_reason.adds[-1] == "quality_rationale"
    requests = with_reason.build_requests({"text": "Where is my parcel?"})
    assert len(requests) == 2
    assert requests[1].choices == () and "Explain your rating" in user_of(requests[1])
    out = judged(with_reason, {"5": 1.0}, extra=[done(" Clear, specific and realistic.\n")])[0]
    assert out["quality"] == 5.0 and out["quality_rationale"] == "Clear, specific and realistic."
    assert "quality_rationale" not in judged(op, {"5": 1.0})[0]


def test_judge_pair_mode_shows_both_texts():
    op = JudgeOp(rubric="Same meaning?", target_column="reference")
    assert op.name == "judge.pair" and JudgeOp(rubric="r").name == "judge.rubric"
    assert op.requires == ("text", "reference")
    row = {"text": "Where is my parcel?", "reference": "Has my package shipped?"}
    user = user_of(op.build_requests(row)[0])
    assert "Text A: Where is my parcel?" in user and "Text B: Has my package shipped?" in user
    assert "Rubric: Same meaning?" in user


# --------------------------------------------------------------------------- docstring examples


@pytest.mark.parametrize("module", [
    "raydag.ops.base",
    "raydag.ops.create",
    "raydag.ops.label",
    "raydag.ops.reform",
    "raydag.ops.judge",
    "raydag.chain",
    "raydag.filters.exact",
])
def test_docstring_examples_hold(module):
    result = doctest.testmod(importlib.import_module(module), verbose=False, report=False)
    assert result.attempted > 0
    assert result.failed == 0
