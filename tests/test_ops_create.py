"""The create operator without an engine: planning, prompts and parsing (scripted completions)."""

from collections import Counter

from raydag.engines.base import Completion
from raydag.ops.create import CreateOp

LABELS = ["billing", "shipping", "technical"]
RAW = [{"id": f"r{i}", "text": f"raw text {i}", "label": LABELS[i % 3]} for i in range(30)]


def op(shots=3, method="few_shot"):
    return CreateOp(task="Route support messages.", labels=LABELS, method=method, shots=shots)


def test_plan_is_balanced_seeded_and_class_conditioned():
    plan = op().plan_requests(RAW, 100, seed=7)
    assert Counter(r["target_label"] for r in plan) == {"billing": 34, "shipping": 33, "technical": 33}
    by_id = {r["id"]: r for r in RAW}
    for row in plan:
        assert len(row["demo_ids"]) == 3
        assert all(by_id[d]["label"] == row["target_label"] for d in row["demo_ids"])
    assert plan == op().plan_requests(RAW, 100, seed=7)
    other = op().plan_requests(RAW, 100, seed=8)
    assert [r["demo_ids"] for r in plan] != [r["demo_ids"] for r in other]
    assert len({r["request_id"] for r in plan}) == 100


def test_demonstrations_vary_between_requests():
    plan = op().plan_requests(RAW, 60, seed=0)
    assert len({tuple(r["demo_ids"]) for r in plan}) > 10


def test_zero_shot_has_no_demonstrations_and_its_own_method():
    zero = op(method="zero_shot")
    plan = zero.plan_requests(RAW, 6, seed=0)
    assert all(r["demo_ids"] == [] for r in plan)
    assert zero.name == "create.zero_shot" and op().name == "create.few_shot_3"
    [request] = zero.build_requests(plan[0])
    assert request.messages[-1]["content"] == "1."


def test_request_continues_a_numbered_list_of_the_target_label():
    plan = op().plan_requests(RAW, 3, seed=0)
    [request] = op().build_requests(plan[1])
    assert request.continue_final_message and request.stop == ("\n",)
    assert request.seed == plan[1]["request_seed"]
    assistant = request.messages[-1]["content"]
    assert assistant.startswith("1. ") and assistant.endswith("\n4.")
    for text in plan[1]["demo_texts"]:
        assert text in assistant
    assert f'"{plan[1]["target_label"]}"' in request.messages[1]["content"]
    assert request == op().build_requests(plan[1])[0]


def parse(text, finish="stop", label="billing"):
    row = {"target_label": label, "demo_ids": ["r0"], "request_id": "q1"}
    [out] = op().parse(row, [Completion(text, 10, 5, finish)])
    return {**out, "_parse_error": out.get("_reason")}


def test_parse_cleans_numbering_prefixes_and_quotes():
    assert parse(' "My card was charged twice."')["text"] == "My card was charged twice."
    assert parse("5. Text: refund still missing")["text"] == "refund still missing"
    assert parse(" where is my refund?\nsecond line")["text"] == "where is my refund?"
    ok = parse(" I need a VAT invoice")
    assert ok["label"] == "billing" and ok["_parse_error"] is None


def test_parse_failures_become_quarantine_reasons():
    assert parse("   ")["_parse_error"] == "empty_generation"
    assert parse(" a long message that was cut", finish="length")["_parse_error"] == "truncated_at_max_tokens"
    assert parse(" I'm sorry, but I can't help with that.")["_parse_error"] == "refusal"
    assert parse(" As an AI, I do not shop.")["_parse_error"] == "refusal"
    # Customers write like this all the time; it is an example, not a refusal.
    assert parse(" I can't find my invoice anywhere")["_parse_error"] is None
    assert parse(" I'm sorry to bother you, the refund is late")["_parse_error"] is None
    assert parse(' "billing".')["_parse_error"] == "label_only"
    assert parse("   ")["text"] == ""


def test_several_examples_per_request_each_get_a_row_id_and_lineage():
    many = CreateOp(task="Route support messages.", labels=LABELS, shots=3, examples_per_request=4)
    plan = many.plan_requests(RAW, 30, seed=0)
    # 10 examples per label in requests of 4, 4, 2; labels interleaved
    assert [r["request_items"] for r in plan] == [4, 4, 4, 4, 4, 4, 2, 2, 2]
    assert [r["target_label"] for r in plan[:3]] == LABELS
    [request] = many.build_requests(plan[0])
    assert request.messages[-1]["content"].endswith("\n4.")  # 3 demonstrations, then item 4
    assert request.stop == ("\n8.",) and request.max_tokens == 4 * many.sampling.max_tokens
    text = "Refund my double charge\n5. Why was I billed twice?\n6. \"Card charged again\"\n7. Billing"
    rows = many.parse(plan[0], [Completion(text, 100, 30, "stop")])
    assert [r.get("text") for r in rows] == ["Refund my double charge", "Why was I billed twice?",
                                             "Card charged again", ""]
    assert [r.get("_reason") for r in rows] == [None, None, None, "label_only"]
    assert len({r["id"] for r in rows}) == 4
    assert all(r["parent_ids"] == plan[0]["demo_ids"] and r["label"] == "billing" for r in rows)
    # Items the teacher did not write are quarantined rows; only the last can be cut off.
    cut = many.parse(plan[0], [Completion("One\n5. Two", 100, 320, "length")])
    assert [r["_status"] if "_status" in r else "accepted" for r in cut] == [
        "accepted", "quarantined", "quarantined", "quarantined"]
    assert [r.get("_reason") for r in cut] == [None, "truncated_at_max_tokens",
                                               "list_item_missing", "list_item_missing"]


def test_one_example_per_request_keeps_its_plan_and_prompt():
    one = op()
    assert "request_items" not in one.plan_requests(RAW, 3, seed=0)[0]
    assert one.build_requests(one.plan_requests(RAW, 3, seed=0)[0])[0].stop == ("\n",)


def _interleaved_order(op: CreateOp, num_examples: int) -> list[tuple[str, int]]:
    """The plan's order as it was built before plan_range existed: every label's item counts
    listed, then taken round by round."""
    k = op.examples_per_request
    remaining = {label: [min(k, count - start) for start in range(0, count, k)]
                 for label, count in op.label_counts(num_examples).items()}
    order = []
    while any(remaining.values()):
        for label in op.labels:
            if remaining[label]:
                order.append((label, remaining[label].pop(0)))
    return order


def test_plan_range_cuts_the_same_plan_anywhere():
    labels = ["a", "b", "c", "d", "e"]
    raw = [{"id": f"r{i}", "text": f"text {i}", "label": labels[i % 4]} for i in range(40)]  # no "e"
    for k, distribution, m in ((1, None, 37), (3, {"a": 0.6, "b": 0.3, "c": 0.1}, 101),
                               (4, {"a": 0.05, "b": 0.05, "c": 0.1, "d": 0.4, "e": 0.4}, 250)):
        creator = CreateOp(task="t", labels=labels, method="few_shot", shots=2,
                           label_distribution=distribution, examples_per_request=k)
        plan = creator.plan_requests(raw, m, seed=3)
        assert [(r["target_label"], r.get("request_items", 1)) for r in plan] == _interleaved_order(creator, m)
        assert len(plan) == creator.request_count(m)
        assert sum(r.get("request_items", 1) for r in plan) == m
        for cuts in ((0, 7, 7, 50, len(plan)), (0, 1, 2, len(plan) + 5)):
            parts = [creator.plan_range(raw, m, 3, a, b) for a, b in zip(cuts, cuts[1:])]
            assert [row for part in parts for row in part] == plan
