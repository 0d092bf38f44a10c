"""Data-quality passes end to end through `raydag run` on the embedded teacher (real Ray, real
vLLM, the real MiniLM encoder): planted duplicates, test copies and PII are caught and counted;
co-annotation exports a Label Studio queue and `raydag import-labels` merges labels back; and
the SST-2 acceptance run (skipped without ../shared/data)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raydag.cli import main
from raydag.config import load_job

from conftest import ROOT, write_jsonl

pytestmark = pytest.mark.slow

QUICK = ROOT / "jobs" / "data" / "quickstart"
BENCH_DATA = Path(os.environ.get("RAYDAG_BENCH_DATA", ROOT.parent / "shared" / "data"))

LONG = ("I ordered the stainless steel kettle three weeks ago and the tracking page still says "
        "the parcel is waiting at the regional depot, nobody answers the phone line and the chat "
        "bot keeps sending me the same useless link, so please tell me where it actually is")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run(job: Path, overrides: list[str]) -> dict:
    assert main(["run", str(job), *overrides]) == 0
    out = next(o.split("=", 1)[1] for o in overrides if o.startswith("output_dir="))
    return json.loads((Path(out) / "report.json").read_text())


def all_rows(report: dict) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(report["outputs"][name])
                      for name in ("synthetic", "dropped", "quarantine") if name in report["outputs"]],
                     ignore_index=True)


def test_planted_duplicates_test_copies_and_pii_are_caught_and_counted(ray_local, tmp_path):
    base = [r["text"] for r in read_jsonl(QUICK / "unlabelled.jsonl")][:20]
    train = [r["text"] for r in read_jsonl(QUICK / "train.jsonl")]
    test = [r["text"] for r in read_jsonl(QUICK / "test.jsonl")]
    long_test = next(t for t in test if len(t.split()) >= 13)
    planted = {
        "exact": base[3],
        "long": LONG,
        "near": LONG.rsplit(" ", 1)[0] + " now",  # last word changed
        "raw_copy": train[5],
        "test_copy": test[7],
        "test_13gram": "Hello support team, " + long_test + " Thanks in advance.",
        "email_phone": "Please email me at jane.doe@example.com or call +1 415 555 0137 about my refund.",
        "card": "My card 4111 1111 1111 1111 was charged twice for the same toaster.",
        "ip_person": "The app says login from 192.168.10.24 failed; Dr. Maria Lopez set up the account.",
    }
    texts = base + list(planted.values())
    unlabelled = write_jsonl(tmp_path / "unlabelled.jsonl", [{"text": t} for t in texts])
    report = run(ROOT / "jobs" / "label_unlabelled.yaml", [
        f"output_dir={tmp_path / 'out'}", f"data.unlabelled_path={unlabelled}", "raw_examples=150",
        "stages.0.votes=1", "student.train_sets=[]", "quality.decontam.embedding_threshold=0.97"])
    counts = report["counts"]
    assert counts["ran"] == len(texts)
    settled = counts["accepted"] + sum(counts["dropped"].values()) + sum(counts["quarantined"].values())
    assert settled == counts["ran"] + counts["created"]

    rows = all_rows(report).set_index("id")
    by_text = {}
    for row_id, row in rows.iterrows():
        by_text.setdefault(row["text"], []).append((row_id, row))

    def status_of(text: str) -> tuple[str, str]:
        (_, row), *_ = by_text[text]
        return row["_status"], row["_reason"]

    # exact copy: the later one is dropped, the first kept
    copies = sorted(by_text[planted["exact"]], key=lambda item: item[1]["_order"])
    assert [r["_status"] for _, r in copies] == ["accepted", "dropped"]
    assert copies[1][1]["_reason"] == "synthetic_duplicate"
    # near duplicate of an earlier row, and of a raw row
    assert status_of(planted["long"]) == ("accepted", "")
    assert status_of(planted["near"]) == ("dropped", "near_duplicate_synthetic")
    (_, near_row), = by_text[planted["near"]]
    assert near_row["near_dup_of"] == by_text[planted["long"]][0][0]
    assert status_of(planted["raw_copy"]) == ("dropped", "near_duplicate_raw")
    # test-set copies: a whole short test sentence, and a 13-gram inside a longer text
    assert status_of(planted["test_copy"]) == ("dropped", "contaminated")
    assert status_of(planted["test_13gram"]) == ("dropped", "contaminated")
    (_, copy_row), = by_text[planted["test_copy"]]
    assert copy_row["contaminated_by"] == f"test:{test.index(planted['test_copy'])}"

    quality = report["quality"]
    assert quality["near_dup"]["near_duplicate_synthetic"] >= 1
    assert quality["near_dup"]["near_duplicate_raw"] >= 1
    assert quality["decontam"]["matched"] >= 2 and quality["decontam"]["examples"]
    assert counts["dropped"]["synthetic_duplicate"] >= 1 and counts["dropped"]["contaminated"] >= 2

    # PII: redacted in the written rows and counted by type
    pii = quality["pii_teacher_rows"]
    for kind in ("email", "phone", "card", "ip", "person"):
        assert pii.get(kind, 0) >= 1, (kind, pii)
    written = " ".join(rows["text"])
    for secret in ("jane.doe@example.com", "415 555 0137", "4111 1111 1111 1111", "192.168.10.24",
                   "Maria Lopez"):
        assert secret not in written
    assert "[EMAIL]" in written and "[CARD]" in written and "[IP]" in written

    card = json.loads((tmp_path / "out" / "datacard.json").read_text())
    assert card["filters"]["decontamination"]["matched"] == quality["decontam"]["matched"]
    assert card["pii"]["teacher_rows"] == pii
    assert "## Filters" in (tmp_path / "out" / "datacard.md").read_text()


def test_coannotation_queue_round_trips_through_label_studio_format(ray_local, tmp_path):
    job = ROOT / "jobs" / "coannotate.yaml"
    overrides = [f"output_dir={tmp_path / 'out'}", "student.train_sets=[]",
                 # every item is uncertain enough for the queue; 5 fit the budget, the rest pass
                 "quality.coannotation.accept_below=0.0", "quality.coannotation.drop_above=1.0",
                 "quality.coannotation.human_budget=5", "quality.coannotation.overflow=accept"]
    report = run(job, overrides)
    co = report["quality"]["coannotation"]
    assert co["routed"]["human"] == 5 and co["human_queue"] == 5
    assert report["counts"]["quarantined"]["human_review"] == 5
    tasks = json.loads(Path(co["tasks_file"]).read_text())
    assert len(tasks) == 5
    labels = ["billing", "shipping", "technical"]
    for task in tasks:
        prediction = task["predictions"][0]["result"][0]["value"]["choices"][0]
        assert prediction in labels and task["data"]["text"]
    # A Label Studio export: the same tasks with one human annotation each.
    export = []
    for index, task in enumerate(tasks):
        export.append({**task, "id": index + 1, "annotations": [{
            "id": 100 + index, "completed_by": 7, "was_cancelled": False,
            "created_at": "2026-11-21T10:00:00Z", "updated_at": "2026-11-21T10:00:00Z",
            "result": [{"from_name": "label", "to_name": "text", "type": "choices",
                        "value": {"choices": ["shipping"]}}]}]})
    export_path = tmp_path / "export.json"
    export_path.write_text(json.dumps(export))
    assert main(["import-labels", str(job), str(export_path), *overrides]) == 0

    again = run(job, overrides)
    assert again["shards"]["resumed"] == again["shards"]["total"]  # no teacher work redone
    assert again["quality"]["coannotation"]["human_labels_merged"] == 5
    assert "human_review" not in again["counts"]["quarantined"]
    rows = pd.read_parquet(again["outputs"]["synthetic"])
    human = rows[rows["label_source"] == "human"]
    assert sorted(human["id"]) == sorted(t["data"]["raydag_id"] for t in tasks)
    assert (human["label"] == "shipping").all() and human["teacher_label"].isin(labels).all()
    assert (human["annotator"] == "7").all()

    bad = tmp_path / "bad.json"
    export[0]["annotations"][0]["result"][0]["value"]["choices"] = ["refunds"]
    bad.write_text(json.dumps(export))
    assert main(["import-labels", str(job), str(bad), *overrides]) == 2


@pytest.mark.skipif(not (BENCH_DATA / "sst2" / "train.jsonl").exists(),
                    reason=f"the shared benchmark data is not at {BENCH_DATA} (set RAYDAG_BENCH_DATA)")
def test_sst2_100_raw_1000_synthetic_gets_card_decontamination_diversity_and_bias(ray_local, tmp_path):
    sst2 = BENCH_DATA / "sst2"
    # CI time: four new sentences per request (the same 1000 rows from a quarter of the
    # prompts; `raydag run jobs/sst2_quality.yaml` asks one per request, as the seed study
    # does) and the raw and mixed students only (the quickstart test trains all three).
    report = run(ROOT / "jobs" / "sst2_quality.yaml", [
        f"output_dir={tmp_path / 'out'}", f"data.train_path={sst2 / 'train.jsonl'}",
        f"data.test_path={sst2 / 'test.jsonl'}", f"quality.decontam.eval_paths.dev={sst2 / 'dev.jsonl'}",
        "student.seeds=[0]", "stages.0.examples_per_request=4", "student.train_sets=[raw,mixed]"])
    counts = report["counts"]
    # The students learn: the raw one beats the majority class (0.5 on this test split) clearly.
    students = report["students"]
    assert set(students) == {"raw", "mixed"}
    assert students["raw"]["majority"]["accuracy"] == pytest.approx(0.5, abs=0.01)
    assert students["raw"]["accuracy"] > students["raw"]["majority"]["accuracy"] + 0.1, students["raw"]
    for student in students.values():
        assert "single_class" not in student["flags"], student
        assert student["test_examples"] == 1821
    assert counts["raw"] == 100 and counts["planned"] == 250  # requests, of 4 sentences each
    assert counts["ran"] + counts["created"] == 1000, counts
    quality = report["quality"]
    assert quality["decontam"]["splits"] == {"test": 1821, "dev": 872}
    assert quality["decontam"]["checked"] > 0
    diversity = quality["diversity"]
    assert set(diversity["by_method"]) == {"create.few_shot_3"}
    few = diversity["by_method"]["create.few_shot_3"]
    assert 0 < few["distinct_1"] <= 1 and 0 < few["distinct_2"] <= 1 and 0 <= few["self_bleu"] <= 1
    assert few["embedding_cosine_distance"] is not None
    assert set(few["label_distribution"]) <= {"negative", "positive"}
    bias = quality["bias"]
    assert set(bias["length"]["by_label"]) == {"negative", "positive"}
    assert isinstance(bias["shortcut_words"], list)
    card = json.loads((tmp_path / "out" / "datacard.json").read_text())
    assert card["counts"]["accepted"] == counts["accepted"]
    assert card["diversity"] == diversity and card["bias"] == bias
    text = (tmp_path / "out" / "datacard.md").read_text()
    for section in ("## Sources", "## Filters", "## Diversity", "## Label shortcut risks", "## PII"):
        assert section in text


def test_rephrase_rewrites_rows_that_carry_a_planted_shortcut_word(ray_local, tmp_path):
    import ray

    from raydag.config import load_job
    from raydag.resources import plan_placement
    from raydag.teacher import rephrase_flagged

    job = load_job(ROOT / "jobs" / "quickstart.yaml", [f"output_dir={tmp_path}", "teacher.batch_size=8"])
    raw_rows = read_jsonl(QUICK / "train.jsonl")[:60]
    raw = pd.DataFrame([{"id": f"raw{i}", **r} for i, r in enumerate(raw_rows)])
    # Teacher rows: every 'shipping' row says "parcelbox", a word the raw rows never use.
    synthetic = []
    for i, r in enumerate(raw_rows):
        text = r["text"] + (" Sent via parcelbox." if r["label"] == "shipping" else "")
        synthetic.append({"id": f"s{i}", "text": text, "label": r["label"], "method": "create.x",
                          "parent_ids": [], "_status": "accepted", "_reason": "", "_stage": "",
                          "_order": i})
    rows = ray.data.from_pandas(pd.DataFrame(synthetic))
    placement = plan_placement(job, ray_local)
    merged, summary, stats = rephrase_flagged(rows, job, raw, tmp_path, placement)
    flagged = [s for s in synthetic if "parcelbox" in s["text"]]
    assert summary["shortcut_words"] >= 1 and summary["flagged_rows"] == len(flagged)
    out = merged.to_pandas()
    # Every input row is still there; each flagged one was either replaced or kept.
    assert set(s["id"] for s in synthetic) <= set(out["id"])
    originals = out[out["id"].isin([s["id"] for s in flagged])]
    rewrites = out[out["parent_ids"].map(lambda p: p is not None and len(p) > 0 and str(p[0]).startswith("s"))]
    assert len(rewrites) == len(flagged)
    assert summary["rephrased"] + summary["kept_original"] == len(flagged)
    replaced = originals[originals["_reason"] == "rephrased"]
    assert len(replaced) == summary["rephrased"]
    accepted_rewrites = rewrites[rewrites["_status"] == "accepted"]
    assert len(accepted_rewrites) == summary["rephrased"]
    assert not accepted_rewrites["text"].str.lower().str.contains("parcelbox").any()
    assert (accepted_rewrites["label"] == "shipping").all()
    (step,) = stats
    assert step["rows_in"] == len(flagged) and step["created"] == len(flagged)
    assert step["accepted"] + sum(step["dropped"].values()) + sum(step["quarantined"].values()) \
        == 2 * len(flagged)
    merged.write_parquet(str(tmp_path / "written"))  # one schema for kept and rewritten rows
    assert len(pd.read_parquet(tmp_path / "written")) == len(out)
    # A rerun finds the same flagged rows, so the same shard folder: the same rows.
    again, summary_again, _ = rephrase_flagged(rows, job, raw, tmp_path, placement)
    assert summary_again == summary
    assert sorted(again.to_pandas()["text"]) == sorted(out["text"])


@pytest.mark.parametrize("measure", ["auto", "margin", "entropy"])
def test_coannotation_scores_a_block_as_the_pure_uncertainty_does(measure):
    """The block scorer's array path (margins) and per-row path (votes, errors) against
    raydag.ops.coannotate.uncertainty row by row."""
    import pyarrow as pa

    from raydag.ops.coannotate import uncertainty
    from raydag.quality import _score_uncertainty

    margins = [0.9, -0.2, 1.4, None, 0.5, None, 0.25, None, 0.7]
    votes = [None, None, None, '["a", "b"]', '["a", "a", "b"]', '["a"]', "not json", None, None]
    statuses = ["accepted"] * 8 + ["dropped"]
    block = pa.table({"_status": statuses, "label_margin": pa.array(margins, pa.float64()),
                      "label_votes": pa.array(votes, pa.string())})
    out = _score_uncertainty(block, measure=measure, num_labels=3).to_pydict()
    for i, (margin, vote, status) in enumerate(zip(margins, votes, statuses)):
        row = {"label_margin": float("nan") if margin is None else margin, "label_votes": vote}
        if status != "accepted" or (margin is None and vote is None):
            assert out["label_uncertainty"][i] is None and out["_uncertainty_error"][i] == ""
            continue
        try:
            expected, error = uncertainty(row, measure=measure, num_labels=3), ""
        except ValueError as err:
            expected, error = None, str(err)
        assert out["_uncertainty_error"][i] == error, i
        if expected is None:
            assert out["label_uncertainty"][i] is None
        else:
            assert out["label_uncertainty"][i] == pytest.approx(expected)
    assert sum(e != "" for e in out["_uncertainty_error"]) >= 1  # the errors are exercised


@pytest.mark.parametrize("overflow", ["accept", "drop"])
def test_coannotation_routing_in_ray_data_equals_the_pure_router(ray_local, tmp_path, overflow):
    """Blocks of planted rows: the same routes as raydag.ops.coannotate.route over all rows
    at once (the budget's most uncertain rows, ties by row order), and people's labels merged."""
    import ray

    from raydag.ops.coannotate import route
    from raydag.quality import HUMAN_LABELS, _coannotate

    margins = [0.95, 0.5, 0.3, 0.3, 0.05, 0.6, 0.3, None, 0.99, 0.45, 0.3, 0.2]
    statuses = ["accepted"] * 10 + ["dropped", "accepted"]
    frame = pd.DataFrame({"id": [f"r{i}" for i in range(12)], "text": [f"text {i}" for i in range(12)],
                          "label": "billing", "label_margin": margins, "label_confidence": 0.5,
                          "_status": statuses, "_reason": "", "_stage": "",
                          "_order": [10 * i for i in range(12)]})
    frame.loc[10, "_reason"] = "near_duplicate"
    rows = ray.data.from_pandas([frame.iloc[:5], frame.iloc[5:9], frame.iloc[9:]])
    job = load_job(ROOT / "jobs" / "coannotate.yaml", [
        f"output_dir={tmp_path}", "quality.coannotation.accept_below=0.1",
        "quality.coannotation.drop_above=0.9", "quality.coannotation.human_budget=3",
        f"quality.coannotation.overflow={overflow}", "quality.coannotation.measure=margin"])
    pd.DataFrame([{"id": "r3", "label": "shipping", "annotator": "7",
                   "annotated_at": "2026-12-06"}]).to_parquet(tmp_path / HUMAN_LABELS)

    marked, summary = _coannotate(rows, job, tmp_path)
    import pyarrow as pa

    for block in marked.to_arrow_refs():  # a people's label column is text, not pickled objects
        kind = ray.get(block).schema.field("label_source").type
        assert pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)
    out = marked.to_pandas().sort_values("_order").set_index("id")
    scored = [i for i in range(12) if statuses[i] == "accepted" and margins[i] is not None]
    expected = route([1 - margins[i] for i in scored], accept_below=0.1, drop_above=0.9,
                     human_budget=3, overflow=overflow)
    assert [out.loc[f"r{i}", "route"] for i in scored] == expected
    assert pd.isna(out.loc["r7", "route"]) and out.loc["r10", "_reason"] == "near_duplicate"
    # the three most uncertain of the band: r11 (0.8), then the first two of the 0.7s (r2, r3)
    assert [i for i, r in zip(scored, expected) if r == "human"] == [2, 3, 11]
    assert summary["routed"] == {r: expected.count(r) for r in ("auto", "human", "drop")}
    assert summary["scored"] == len(scored) == 10 and summary["not_scored"] == 1
    assert set(out.index[out["_reason"] == "human_review"]) == {"r2", "r11"}
    assert summary["human_queue"] == 2 and summary["human_labels_merged"] == 1
    assert (out.loc["r3", "label"], out.loc["r3", "teacher_label"], out.loc["r3", "label_source"],
            out.loc["r3", "_status"]) == ("shipping", "billing", "human", "accepted")
    tasks = json.loads(Path(summary["tasks_file"]).read_text())
    assert [t["data"]["raydag_id"] for t in tasks] == ["r2", "r11"]
    dropped = set(out.index[out["_reason"] == "uncertain_label"])
    assert dropped == ({"r4", "r1", "r5", "r6", "r9"} if overflow == "drop" else {"r4"})
    assert out.loc["r0", "label_uncertainty"] == 0.05 and out.loc["r0", "_status"] == "accepted"


def test_the_pvi_filter_in_ray_data_scores_teacher_rows_and_drops_the_low_ones(ray_local, tmp_path):
    """The raw student (here an untrained head on the embedded encoder) scores the accepted
    teacher rows in Ray Data actors: the same PVI as scoring them on their own, rows below the
    threshold dropped as low_pvi, raw and dropped rows untouched."""
    import ray
    import torch
    from transformers import AutoModel, AutoTokenizer

    from raydag.models import resolve_model
    from raydag.quality import _pvi_filter
    from raydag.train import StudentClassifier, pointwise_v_information, save_student, student_log2_probs

    labels = ["billing", "shipping", "technical"]
    path = resolve_model("embedded:all-minilm-l6-v2")
    torch.manual_seed(0)
    model = StudentClassifier(AutoModel.from_pretrained(path), len(labels), "mean", True)
    save_student(model, AutoTokenizer.from_pretrained(path), labels, str(tmp_path / "student"))
    texts = [f"my order {i} {'was charged twice' if i % 2 else 'never arrived'}" for i in range(12)]
    frame = pd.DataFrame({"id": [f"r{i}" for i in range(12)], "text": texts,
                          "label": [labels[i % 3] for i in range(12)],
                          "method": ["raw"] * 2 + ["create.few_shot"] * 10,
                          "_status": ["accepted"] * 11 + ["dropped"], "_reason": [""] * 11 + ["near_duplicate"],
                          "_stage": "", "_order": range(12)})
    raw = pd.DataFrame({"text": texts[:6], "label": ["billing", "billing", "shipping", "shipping",
                                                     "shipping", "technical"]})
    prior = {"billing": 1 / 3, "shipping": 1 / 2, "technical": 1 / 6}
    teacher = frame.iloc[2:11]
    expected = pointwise_v_information(student_log2_probs(teacher["text"].tolist(), teacher["label"].tolist(),
                                                          str(tmp_path / "student")),
                                       teacher["label"].tolist(), prior)
    threshold = float(np.median(expected))
    job = load_job(ROOT / "jobs" / "quickstart.yaml", [f"quality.consistency.pvi_threshold={threshold}"])

    marked, summary = _pvi_filter(ray.data.from_pandas([frame.iloc[:5], frame.iloc[5:]]), job, raw,
                                  str(tmp_path / "student"))
    out = marked.to_pandas().sort_values("_order").reset_index(drop=True)
    assert "_pvi" not in out.columns
    assert out.loc[2:10, "pvi"].tolist() == pytest.approx(np.round(expected, 4).tolist(), abs=2e-4)
    assert out.loc[[0, 1, 11], "pvi"].isna().all() and out.loc[11, "_reason"] == "near_duplicate"
    low = [i + 2 for i, v in enumerate(expected) if v < threshold]
    assert out.index[out["_reason"] == "low_pvi"].tolist() == low and len(low) == 4
    assert (out.loc[low, "_status"] == "dropped").all() and (out.loc[low, "_stage"] == "consistency").all()
    assert summary["checked"] == 9 and summary["dropped"] == 4
    assert summary["mean_pvi"] == pytest.approx(float(np.mean(expected)), abs=1e-4)
