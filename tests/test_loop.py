"""The closed loop: the weakness analysis on planted predictions, the steering it gives, the
round jobs, the create operator's steered plans; (slow) two real rounds and their resume."""

import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from raydag.config import load_job
from raydag.engines.base import Completion
from raydag.errors import ConfigError
from raydag.evaluate import weaknesses
from raydag.loop import one_pass_job, round_job, round_sizes, steering, uncertain_job
from raydag.ops.create import CreateOp

from conftest import ROOT

LABELS = ["billing", "shipping", "technical"]
QUICKSTART = ROOT / "jobs" / "quickstart.yaml"
UNLABELLED = ROOT / "jobs" / "data" / "quickstart" / "unlabelled.jsonl"


def planted(matrix: list[list[int]], confidence: float = 0.8):
    """Rows whose gold and predicted labels follow ``matrix[true][predicted]``, each predicted
    with ``confidence`` (the rest spread evenly), ids ``t<true>p<pred>_<n>``."""
    y_true, probs, ids = [], [], []
    k = len(matrix)
    for t, row in enumerate(matrix):
        for p, count in enumerate(row):
            for n in range(count):
                y_true.append(t)
                probs.append([confidence if j == p else (1 - confidence) / (k - 1) for j in range(k)])
                ids.append(f"t{t}p{p}_{n}")
    return y_true, np.array(probs), ids


def test_weaknesses_find_the_planted_confusion():
    # billing is perfect; shipping is read as technical 6 times out of 10; technical twice as billing
    y_true, probs, ids = planted([[10, 0, 0], [0, 4, 6], [2, 0, 8]])
    weak = weaknesses(LABELS, y_true, probs, ids)
    assert weak["rows"] == 30 and weak["accuracy"] == pytest.approx(22 / 30)
    f1 = weak["per_class_f1"]
    assert f1["shipping"] == pytest.approx(2 * 4 / (2 * 4 + 6), abs=1e-4)  # tp 4, fn 6, fp 0
    assert f1["billing"] == pytest.approx(2 * 10 / (2 * 10 + 2), abs=1e-4)
    assert min(f1, key=f1.get) == "shipping"
    assert weak["confused_pairs"] == [{"true": "shipping", "predicted": "technical", "rows": 6},
                                      {"true": "technical", "predicted": "billing", "rows": 2}]
    assert sorted(weak["misclassified"]) == sorted([f"t1p2_{n}" for n in range(6)] + ["t2p0_0", "t2p0_1"])


def test_weaknesses_order_mistakes_by_confidence_and_rows_by_margin():
    probs = np.array([[0.2, 0.7, 0.1], [0.4, 0.35, 0.25], [0.05, 0.9, 0.05], [0.34, 0.33, 0.33]])
    weak = weaknesses(LABELS, [0, 0, 0, 0], probs, ["a", "b", "c", "d"])
    assert weak["misclassified"] == ["c", "a"]  # most confidently wrong first
    assert weak["least_confident"][:2] == ["d", "b"]  # smallest top-2 margin first
    assert "shipping" not in weak["per_class_f1"]  # no dev row of it: no F1 to speak of
    empty = weaknesses(LABELS, [], np.zeros((0, 3)), [])
    assert empty["rows"] == 0 and empty["misclassified"] == [] and empty["confused_pairs"] == []


def test_steering_moves_requests_to_the_weak_and_confused_classes():
    job = load_job(QUICKSTART, ["loop.rounds=3"])
    y_true, probs, ids = planted([[10, 0, 0], [0, 4, 6], [2, 0, 8]])
    weak = weaknesses(LABELS, y_true, probs, ids)
    rows = {i: {"id": i, "text": f"text {i}", "label": LABELS[int(i[1])]} for i in ids}
    steer = steering(job, weak, rows)
    shares = steer["label_distribution"]
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-3)
    assert shares["shipping"] > shares["technical"] > 1 / 3 > shares["billing"]
    assert steer["steer"] == {"shipping": "confused:shipping->technical",
                              "technical": "confused:shipping->technical"}
    hard = steer["hard_examples"]
    assert {h["id"] for h in hard} == set(weak["misclassified"])
    assert all(h["label"] == rows[h["id"]]["label"] for h in hard)
    # Round 1 is not steered; shift 0 and no strategies leave the plan as it was.
    assert steering(job, None, rows) == {"label_distribution": None, "steer": {}, "hard_examples": [], "uncertain": []}
    still = steering(load_job(QUICKSTART, ["loop.rounds=3", "loop.shift=0"]), weak, rows)
    assert still["label_distribution"] == pytest.approx({y: 1 / 3 for y in LABELS}, abs=1e-3)
    assert still["steer"] == {}
    none = steering(load_job(QUICKSTART, ["loop.rounds=3", "loop.strategies=[]"]), weak, rows)
    assert none == {"label_distribution": None, "steer": {}, "hard_examples": [], "uncertain": []}
    zero_shot = steering(load_job(QUICKSTART, ["loop.rounds=3", "stages.0.method=zero_shot"]), weak, rows)
    assert zero_shot["hard_examples"] == [] and zero_shot["steer"]  # no demonstrations to show


def test_rounds_split_the_budget_and_are_ordinary_jobs(tmp_path):
    job = load_job(QUICKSTART, [f"output_dir={tmp_path}", "loop.rounds=3", "stages.0.num_examples=100"])
    assert round_sizes(job) == [34, 33, 33]
    assert round_sizes(load_job(QUICKSTART, ["loop.rounds=2", "loop.per_round=40"])) == [40, 40]
    steer = {"label_distribution": {"billing": 0.2, "shipping": 0.5, "technical": 0.3},
             "steer": {"shipping": "weak_class:shipping"},
             "hard_examples": [{"id": "r1", "text": "Where is my parcel?", "label": "shipping"}]}
    second = round_job(job, 2, 33, steer)
    first = second.stages[0]
    assert second.loop is None and second.student.train_sets == []
    assert second.output_dir == str(tmp_path / "rounds" / "2")
    assert (first.round, first.num_examples, first.steer) == (2, 33, steer["steer"])
    assert first.hard_examples[0].id == "r1" and first.label_distribution == steer["label_distribution"]
    assert job.stages[0].round == 0  # the loop's own job is not changed
    pvi = load_job(QUICKSTART, ["loop.rounds=2", "quality.consistency.pvi_threshold=0.0"])
    assert round_job(pvi, 1, 50, steering(pvi, None, {})).student.train_sets == ["raw"]
    baseline = one_pass_job(job, 100, 5000)
    assert baseline.loop is None and baseline.output_dir == str(tmp_path / "one_pass")
    assert baseline.stages[0].num_examples == 100 and baseline.stages[0].round == 0
    assert baseline.budget.max_tokens == 5000 and baseline.student.train_sets == ["mixed"]
    capped = load_job(QUICKSTART, [f"output_dir={tmp_path}", "loop.rounds=2", "budget.max_tokens=3000"])
    assert one_pass_job(capped, 100, 5000).budget.max_tokens == 3000
    # Uncertainty sampling: the round creates fewer rows, and a label job labels the pool texts.
    pool = load_job(QUICKSTART, [f"output_dir={tmp_path}", "loop.rounds=3", "loop.label_shots=2",
                                 "loop.strategies=[uncertainty]", f"data.unlabelled_path={UNLABELLED}"])
    unsure = [{"id": "u1", "text": "Is it broken?", "margin": 0.01}] * 10
    assert round_job(pool, 2, 33, {**steer, "uncertain": unsure}).stages[0].num_examples == 23
    assert round_job(pool, 2, 33, steer).data.unlabelled_path is None  # the pool is the loop's
    labelling = uncertain_job(pool, 2)
    assert labelling.output_dir == str(tmp_path / "rounds" / "2" / "uncertain") and labelling.loop is None
    assert labelling.data.unlabelled_path == str(tmp_path / "rounds" / "2" / "uncertain.jsonl")
    assert [(s.type, s.mode, s.shots) for s in labelling.stages] == [("label", "annotate", 2)]
    assert labelling.student.train_sets == []
    assert one_pass_job(pool, 100, 5000).data.unlabelled_path is None


def test_loop_config_is_checked():
    with pytest.raises(ConfigError, match="stages.0 must be create"):
        load_job(ROOT / "jobs" / "reform_paraphrase.yaml", ["loop.rounds=2"])
    with pytest.raises(ConfigError, match="fewer than loop.rounds"):
        load_job(QUICKSTART, ["loop.rounds=5", "stages.0.num_examples=3"])
    with pytest.raises(ConfigError, match="strategies"):
        load_job(QUICKSTART, ["loop.strategies=[more_data]"])
    with pytest.raises(ConfigError, match="uncertainty, which has the teacher label texts of data.unlabelled_path"):
        load_job(QUICKSTART, ["loop.rounds=2", "loop.strategies=[uncertainty]"])
    with pytest.raises(ConfigError, match="uncertain_share"):
        load_job(QUICKSTART, ["loop.rounds=2", "loop.uncertain_share=1.0"])
    with pytest.raises(ConfigError, match="steers unknown labels"):
        load_job(QUICKSTART, ["stages.0.steer={refunds: weak_class:refunds}"])


RAW = [{"id": f"r{i}", "text": f"raw text {i}", "label": LABELS[i % 3]} for i in range(30)]


def test_a_steered_round_plans_new_ids_shows_hard_examples_and_keeps_lineage():
    plain = CreateOp(task="Route.", labels=LABELS, method="few_shot", shots=3)
    hard = [{"id": "dev7", "text": "My parcel never came but I was charged", "label": "shipping"}]
    steered = CreateOp(task="Route.", labels=LABELS, method="few_shot", shots=3, round=2,
                       label_distribution={"billing": 0.2, "shipping": 0.6, "technical": 0.2},
                       steer={"shipping": "confused:shipping->billing"}, hard_examples=hard)
    plan = steered.plan_requests(RAW, 50, seed=0)
    assert Counter(r["target_label"] for r in plan) == {"shipping": 30, "billing": 10, "technical": 10}
    assert not {r["request_id"] for r in plan} & {r["request_id"] for r in plain.plan_requests(RAW, 50, seed=0)}
    for row in plan:
        if row["target_label"] == "shipping":
            assert row["demo_ids"][0] == "dev7" and len(row["demo_ids"]) == 3
            assert row["steer"] == "hard_example:dev7"
            assert "My parcel never came" in steered.build_requests(row)[0].messages[-1]["content"]
        else:
            assert "dev7" not in row["demo_ids"] and row["steer"] == ""
    shipping = next(r for r in plan if r["target_label"] == "shipping")
    out = steered.parse(shipping, [Completion(text=" The box arrived crushed.", prompt_tokens=5,
                                              completion_tokens=5, finish_reason="stop")])
    assert out[0]["round"] == 2 and out[0]["steer"] == "hard_example:dev7"
    failed = steered.parse(shipping, [Completion(text="", prompt_tokens=5, completion_tokens=0,
                                                 finish_reason="stop")])
    assert failed[0]["_status"] == "quarantined" and failed[0]["round"] == 2
    # Round 0 (no loop): the plan and the rows are as they always were.
    again = CreateOp(task="Route.", labels=LABELS, method="few_shot", shots=3)
    assert again.plan_requests(RAW, 50, seed=0) == plain.plan_requests(RAW, 50, seed=0)
    assert "round" not in again.parse(again.plan_requests(RAW, 1, seed=0)[0], [Completion(
        text="Refund please.", prompt_tokens=1, completion_tokens=1, finish_reason="stop")])[0]


# --------------------------------------------------------------------------- real rounds

# Small rounds on the embedded teacher. The student starts from a random head and barely
# trains, so it gets dev rows wrong and the second round has something to steer by.
SMALL_LOOP = ["loop.per_round=12", "stages.0.sampling.max_tokens=40", "teacher.batch_size=12",
              "raw_examples=30", "student.seeds=[0]", "student.head_init=random",
              "student.learning_rate=1e-7", "student.min_steps=1", "student.epochs=1",
              "loop.strategies=[label_shift,hard_examples,uncertainty]", f"data.unlabelled_path={UNLABELLED}"]


def _round_rows(out, index):
    report = json.loads((out / "rounds" / str(index) / "report.json").read_text())
    return report, pd.read_parquet(report["outputs"]["synthetic"])


@pytest.mark.slow
def test_two_real_rounds_steer_the_second_by_the_students_mistakes_and_resume(ray_local, tmp_path):
    """One round; then a rerun with two rounds goes on from it (round 1 and its students reused
    untouched), steers round 2 by round 1's mistakes, and runs the one-pass baseline."""
    from raydag.cli import main
    from raydag.evaluate import margins
    from raydag.ops.create import label_counts
    from raydag.train import student_probs

    out = tmp_path / "out"
    args = ["run", str(QUICKSTART), f"output_dir={out}", *SMALL_LOOP]
    assert main([*args, "loop.rounds=1"]) == 0
    (first,) = json.loads((out / "report.json").read_text())["rounds"]
    assert first["round"] == 1 and first["teacher_tokens"] > 0
    assert first["steering"] == {"label_distribution": None, "steer": {}, "hard_examples": [], "uncertain": []}
    weak = first["weaknesses"]
    assert weak["rows"] == 6 and weak["misclassified"], weak  # 20% of 30 raw rows held out
    _, made1 = _round_rows(out, 1)
    assert (made1["round"] == 1).all() and (made1["steer"] == "").all()

    kept = {p: p.stat().st_mtime_ns for p in (out / "rounds" / "1" / name
                                              for name in ("report.json", "steer.json", "students.json"))}
    assert main([*args, "loop.rounds=2", "loop.compare_one_pass=true"]) == 0
    for path, mtime in kept.items():
        assert path.stat().st_mtime_ns == mtime, path
    report = json.loads((out / "report.json").read_text())
    assert report["rounds"][0] == json.loads(json.dumps(first))
    second = report["rounds"][1]
    assert second["round"] == 2 and second["teacher_tokens"] > first["teacher_tokens"]
    assert second["student"]["train_examples"] > first["student"]["train_examples"]

    # Round 2 was planned from round 1's mistakes, as steering() says.
    job = load_job(QUICKSTART, [f"output_dir={out}", *SMALL_LOOP, "loop.rounds=2"])
    raw = pd.read_parquet(json.loads((out / "rounds" / "1" / "report.json").read_text())["outputs"]["raw"])
    rows = {str(i): {"id": str(i), "text": str(t), "label": str(y)}
            for i, t, y in zip(raw["id"], raw["text"], raw["label"])}
    steer = steering(job, weak, rows)
    unsure = second["steering"].pop("uncertain")
    assert second["steering"] == json.loads(json.dumps({k: v for k, v in steer.items() if k != "uncertain"}))
    assert steer["hard_examples"], "the student's mistakes are shown to the teacher"
    round2, made = _round_rows(out, 2)
    assert round2["config"]["stages"][0]["round"] == 2
    assert round2["config"]["stages"][0]["label_distribution"] == steer["label_distribution"]
    assert round2["config"]["stages"][0]["num_examples"] == 12 - 4  # 30% of the round is labelling

    # Uncertainty sampling: the 4 pool texts round 1's students are least sure of (all 30 scored
    # here by the student itself), labelled by the teacher in their own job.
    pool = [json.loads(line)["text"] for line in UNLABELLED.read_text().splitlines()]
    mixed1 = json.loads((out / "rounds" / "1" / "students.json").read_text())["students"]["mixed"]
    probs = np.mean([student_probs(pool, LABELS, run["checkpoint"]) for run in mixed1["runs"].values()], axis=0)
    margin = margins(probs)
    assert {u["text"] for u in unsure} == {pool[i] for i in np.argsort(margin)[:4]}
    assert [u["margin"] for u in unsure] == sorted(u["margin"] for u in unsure)
    labelled = json.loads((out / "rounds" / "2" / "uncertain" / "report.json").read_text())
    assert labelled["config"]["stages"][0]["type"] == "label"
    assert second["labelled_accepted"] == labelled["counts"]["accepted"] > 0
    assert set(pd.read_parquet(labelled["outputs"]["synthetic"])["text"]) <= {u["text"] for u in unsure}
    assert second["teacher_tokens"] == first["teacher_tokens"] + sum(
        r["teacher"]["tokens_in"] + r["teacher"]["tokens_out"] for r in (round2, labelled))
    planned = label_counts(job.data.labels, 8, steer["label_distribution"])
    assert Counter(made["label"]) <= Counter(planned)  # accepted rows: at most what was asked
    # Lineage: every round-2 row says its round and why it was asked for.
    assert (made["round"] == 2).all()
    hard_ids = {h["id"] for h in steer["hard_examples"]}
    shown = made[made["steer"].str.startswith("hard_example:")]
    assert len(shown), made[["label", "steer"]]
    for _, row in shown.iterrows():
        source = row["steer"].split(":", 1)[1]
        assert source in hard_ids and row["parent_ids"][0] == source
        assert rows[source]["label"] == row["label"]
    assert not set(made1["id"]) & set(made["id"])

    # The one-pass baseline asked for the same 24 examples at once, within the loop's tokens
    # (a token budget stops new shards: at most one shard of 12 past it).
    one = report["one_pass"]
    assert one["asked"] == 24 and 0 < one["teacher_tokens"]
    assert one["student"]["train_examples"] > 0 and one["student"]["seeds"] == [0]
    assert report["comparison"]["a"] == "loop" and report["comparison"]["verdict"].startswith("unknown")
    text = (out / "report.md").read_text()
    assert "One pass (24 examples at once" in text and text.count("\n| ") == 3  # header, 2 rounds
