"""The seed study: its grid, the few-shot label operator it scores the teacher with, the
findings' verdicts on planted numbers, and (slow) the smoke study end to end with resume."""

import json
from pathlib import Path

import pandas as pd
import pytest

from raydag.chain import label_demonstrations
from raydag.cli import main
from raydag.config import load_study
from raydag.errors import ConfigError, DataError
from raydag.ops.label import LabelOp
from raydag.config import JobConfig
from raydag.study import (_cell_error, cell_job_tree, create_settings, findings, loop_record, plan_cells,
                          select_cells, spearman, study_markdown, write_plots)

from conftest import ROOT

STUDY = ROOT / "jobs" / "study.yaml"
SMOKE = ROOT / "jobs" / "study_smoke.yaml"
LOOP = ROOT / "jobs" / "study_loop.yaml"


# --------------------------------------------------------------------------- the grid

def test_study_files_load_and_start_with_their_launch_command():
    studies = sorted((ROOT / "jobs").glob("study*.yaml"))  # the files test_config/test_jobs leave out
    assert {STUDY, SMOKE, LOOP} <= set(studies)
    for path in studies:
        study = load_study(path)
        assert f"raydag study jobs/{path.name}" in path.read_text().splitlines()[0]
        assert Path(study.job).is_file()
    assert set(load_study(STUDY).datasets) == {"sst2", "agnews", "emotion", "rte"}


def test_study_config_is_strict():
    with pytest.raises(ConfigError, match="unknown key 'methodz'"):
        load_study(SMOKE, ["methodz=[zero_shot]"])
    with pytest.raises(ConfigError, match="methods"):
        load_study(SMOKE, ["methods=[two_shot]"])
    with pytest.raises(ConfigError, match="sweep sizes"):
        load_study(SMOKE, ["sweep.num_examples=[0]"])
    with pytest.raises(ConfigError, match="parallel_cells"):
        load_study(SMOKE, ["parallel_cells=0"])
    assert load_study(SMOKE).parallel_cells == 1  # in turn unless asked


def test_a_failed_cell_is_named_by_its_own_error():
    class TaskError(Exception):  # what ray.get raises: the cell's exception as its cause
        def __init__(self, cause):
            super().__init__("ray.exceptions.RayTaskError(...)\nTraceback ...")
            self.cause = cause

    assert _cell_error(DataError("train.jsonl:3: not valid JSON\nmore")) == "train.jsonl:3: not valid JSON"
    assert _cell_error(TaskError(DataError("no rows left"))) == "no rows left"
    assert _cell_error(TaskError(MemoryError("first\nout of memory"))) == "MemoryError: out of memory"
    assert _cell_error(RuntimeError("the worker died")) == "RuntimeError: the worker died"


def test_create_settings_of_the_five_methods():
    assert create_settings("zero_shot")[0] == "zero_shot"
    assert create_settings("zero_shot_topic")[0] == "zero_shot_topic"
    assert create_settings("one_shot") == ("one_shot", 1)
    assert create_settings("few_shot_3") == ("few_shot", 3)
    assert create_settings("few_shot_5") == ("few_shot", 5)


def test_plan_trains_raw_once_per_dataset_and_merges_sweeps_into_the_grid():
    study = load_study(STUDY)
    cells = plan_cells(study)
    names = [c.name for c in cells]
    assert len(names) == len(set(names))
    for dataset in study.datasets:
        mine = [c for c in cells if c.dataset == dataset]
        create = [c for c in mine if c.kind == "create"]
        # 5 methods + M sweep (100, 250, 500; 1000 is the grid's) + N sweep (50, 400)
        assert len(create) == 5 + 3 + 2
        main = [c for c in create if c.num_examples == 1000 and c.raw_examples == 100]
        assert sorted(c.method for c in main) == sorted(study.methods)
        assert sum("raw" in c.train_sets for c in main) == 1  # the raw student ignores the method
        swept = next(c for c in main if c.method == "few_shot_3")
        assert swept.train_sets == ("raw", "synthetic", "mixed")
        assert {c.shots for c in mine if c.kind == "teacher"} == {0, 1}
    # Datasets run one after the other, so a stopped study is whole per dataset.
    order = [c.dataset for c in cells]
    assert order == sorted(order, key=list(study.datasets).index)


def test_only_selects_cells_by_glob_and_names_a_glob_that_matches_nothing():
    cells = plan_cells(load_study(STUDY))
    agnews = select_cells(cells, ["agnews.*"])
    assert agnews and {c.dataset for c in agnews} == {"agnews"}
    both = select_cells(cells, ["sst2.teacher.*", "rte.zero_shot.*"])
    assert [c.name for c in both] == ["sst2.teacher.0shot", "sst2.teacher.1shot",
                                      "rte.zero_shot.m1000.n100"]
    assert select_cells(cells, []) == cells
    with pytest.raises(ConfigError, match="nope.* matches no cell.*sst2.zero_shot"):
        select_cells(cells, ["nope.*"])


def test_without_sweeps_raw_goes_to_the_first_method():
    study = load_study(SMOKE, ["sweep.raw_examples=[]", "sweep.num_examples=[]", "teacher_eval=null"])
    cells = plan_cells(study)
    assert [c.train_sets for c in cells] == [("raw", "synthetic", "mixed"), ("synthetic", "mixed")]


def test_cell_jobs_are_ordinary_jobs():
    study = load_study(SMOKE)
    base = json.loads(json.dumps({"student": {"train_sets": ["raw"], "seeds": [0]},
                                  "stages": [{"type": "create", "sampling": {"max_tokens": 7},
                                              "examples_per_request": 2}]}))
    data = {"files": {"train": "/d/train.jsonl", "test": "/d/test.jsonl", "teacher_eval": "/d/eval.jsonl"},
            "labels": ["a", "b"], "task": "t"}
    cells = {c.name: c for c in plan_cells(study)}
    teacher = cell_job_tree(study, base, cells["quickstart.teacher.1shot"], data)
    assert teacher["stages"] == [{"type": "label", "mode": "annotate", "shots": 1}]
    assert teacher["data"]["unlabelled_path"] == "/d/eval.jsonl"
    assert teacher["quality"]["decontam"]["enabled"] is False  # it labels test texts on purpose
    assert teacher["quality"]["pii"]["enabled"] is False  # redacted texts would not join their gold labels
    assert teacher["student"]["train_sets"] == []
    create = cell_job_tree(study, base, cells["quickstart.few_shot_3.m12.n30"], data)
    assert create["stages"] == [{"type": "create", "method": "few_shot", "shots": 3, "num_examples": 12,
                                 "sampling": {"max_tokens": 7}, "examples_per_request": 2}]
    assert create["raw_examples"] == 30 and create["student"]["train_sets"] == ["synthetic"]
    assert base["student"]["train_sets"] == ["raw"]  # the base is not changed


def test_loop_is_a_method_whose_cell_is_a_loop_job_training_mixed_students():
    study = load_study(SMOKE, ["methods=[few_shot_3,loop]", "sweep.raw_examples=[]", "sweep.num_examples=[]",
                               "teacher_eval=null", "loop.rounds=2", "loop.method=one_shot"])
    cells = plan_cells(study)
    assert [(c.method, c.train_sets) for c in cells] == [("few_shot_3", ("raw", "synthetic", "mixed")),
                                                         ("loop", ("mixed",))]  # raw never goes to the loop
    base = {"student": {"train_sets": ["raw"], "seeds": [0]}, "stages": [{"type": "create"}]}
    data = {"files": {"train": "/d/train.jsonl", "test": "/d/test.jsonl"}, "labels": ["a", "b"], "task": "t"}
    tree = cell_job_tree(study, base, cells[1], data)
    assert tree["stages"] == [{"type": "create", "method": "one_shot", "shots": 1, "num_examples": 24}]
    assert tree["loop"]["rounds"] == 2 and tree["loop"]["compare_one_pass"] is True
    assert "method" not in tree["loop"] and tree["student"]["train_sets"] == ["mixed"]
    assert JobConfig.model_validate(tree).loop.rounds == 2  # an ordinary job with a loop section
    assert tree["data"]["unlabelled_path"] is None
    unsure = load_study(SMOKE, ["methods=[loop]", "loop.strategies=[uncertainty]"])
    pool = {**data, "files": {**data["files"], "pool": "/d/pool.jsonl"}}
    tree = cell_job_tree(unsure, base, plan_cells(unsure)[0], pool)
    assert tree["data"]["unlabelled_path"] == "/d/pool.jsonl" and tree["loop"]["strategies"] == ["uncertainty"]
    acceptance = plan_cells(load_study(LOOP))
    assert [c.name for c in acceptance] == ["sst2.loop.m1000.n100", "emotion.loop.m1000.n100",
                                            "agnews.loop.m1000.n100"]


def test_a_loop_steered_by_uncertainty_gets_the_train_texts_without_labels_as_its_pool(tmp_path):
    from raydag.config import StudyConfig
    from raydag.study import prepare_data

    source = tmp_path / "ds"
    source.mkdir()
    rows = [{"text": f"text {i}", "label": "ab"[i % 2]} for i in range(6)]
    for split in ("train", "test"):
        (source / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = {"name": "s", "output_dir": str(tmp_path / "out"), "job": str(ROOT / "jobs" / "quickstart.yaml"),
                "datasets": {"d": {"path": str(source), "task": "t"}}, "teacher_eval": None}
    plain = prepare_data(StudyConfig.model_validate({**settings, "methods": ["loop"]}))
    assert "pool" not in plain["d"]["files"]
    data = prepare_data(StudyConfig.model_validate(
        {**settings, "methods": ["loop"], "loop": {"strategies": ["label_shift", "uncertainty"]}}))
    pool = Path(data["d"]["files"]["pool"]).read_text().splitlines()
    assert [json.loads(line) for line in pool] == [{"text": r["text"]} for r in rows]


def _loop_report(accuracies, one_pass, tokens=(1000, 2100, 3300)):
    student = {"accuracy_std": 0.01, "macro_f1": 0.5, "macro_f1_std": 0.01, "seeds": [0, 1, 2],
               "probe": {"accuracy": 0.6}, "majority": {"accuracy": 0.5}, "train_examples": 400, "flags": []}
    rounds = [{"round": k + 1, "teacher_tokens": t, "accepted": 300, "cross_round_duplicates": k,
               "student": {**student, "accuracy": a},
               "steering": {"steer": {"b": "confused:b->a"} if k else {}, "hard_examples": [{}] * k}}
              for k, (a, t) in enumerate(zip(accuracies, tokens))]
    return {"rounds": rounds, "teacher_tokens": tokens[-1], "loop": {"strategies": ["label_shift"]},
            "one_pass": {"teacher_tokens": tokens[-1] - 50, "accepted": 900,
                         "student": {**student, "accuracy": one_pass}},
            "comparison": {"difference": round(accuracies[-1] - one_pass, 4), "spread": 0.0141,
                           "verdict": "loop better" if accuracies[-1] - one_pass > 0.0141 else "no difference"}}


def test_a_loop_cells_time_adds_its_rounds_its_labelling_and_its_baseline(tmp_path):
    from raydag.study import _stage_seconds

    def job_report(folder, stages):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "report.json").write_text(json.dumps({"stages": stages}))
        return str(tmp_path / folder / "report.json")

    report = _loop_report((0.6, 0.7), 0.65, tokens=(10, 20))
    report["stages"] = {"student_mixed": 100.0}  # the loop's own: every round's students
    for r, folder in zip(report["rounds"], ("rounds/1", "rounds/2")):
        r["report"] = job_report(folder, {"teacher": 30.0, "write": 5.0})
    job_report("rounds/2/uncertain", {"teacher": 7.0})
    report["one_pass"]["report"] = job_report("one_pass", {"teacher": 50.0, "student_mixed": 40.0})
    assert _stage_seconds(report) == {"student_mixed": 140.0, "teacher": 117.0, "write": 10.0}
    assert _stage_seconds({"stages": {"teacher": 1.0}}) == {"teacher": 1.0}  # an ordinary cell


def test_loop_cells_are_tabled_and_plotted_against_teacher_tokens(tmp_path):
    summary = _summary(gains_small=0.08, gains_large=0.0, topic_d2=0.9, curve={1000: 0.7}, teacher=0.6)
    summary.update({"study": "s", "written_at": "now", "cells": [], "host": {"cpu": "x", "cores": 2, "avx512_bf16": False},
                    "settings": {"raw_examples": 100, "num_examples": 1000, "seeds": [0, 1, 2], "job": "j.yaml",
                                 "overrides": [], "max_test_examples": None, "sweep": {"method": "few_shot_3"}}})
    for name, (accs, one) in zip("abc", (((0.6, 0.7, 0.8), 0.7), ((0.6, 0.65, 0.7), 0.7), ((0.5, 0.5, 0.5), 0.45))):
        ds = summary["datasets"][name]
        ds["labels"], ds["teacher"] = ["a", "b"], {}
        ds["methods"]["few_shot_3"]["mixed"] = _student(0.72)
        ds["loop"] = loop_record(_loop_report(accs, one))
    loop = summary["datasets"]["a"]["loop"]
    assert [r["teacher_tokens"] for r in loop["rounds"]] == [1000, 2100, 3300]
    assert loop["mixed"]["accuracy"] == 0.8 and loop["one_pass"]["mixed"]["accuracy"] == 0.7
    assert loop["rounds"][1]["steered"] == {"b": "confused:b->a"} and loop["rounds"][2]["hard_examples"] == 2
    summary["findings"] = findings(summary)
    plots = write_plots(summary, tmp_path)
    assert "accuracy_vs_teacher_tokens.png" in plots and (tmp_path / "accuracy_vs_teacher_tokens.png").stat().st_size > 0
    text = study_markdown(summary)
    assert "on 2 of 3 dataset(s) (a, c)" in text  # c wins by 0.05 > 0.0141; b ties
    assert "| 2 | 2,100 | 300 | 0.650 ± 0.010 | b: confused:b->a; 1 hard examples |" in text


# --------------------------------------------------------------------------- few-shot labelling

def test_label_demonstrations_are_per_label_interleaved_and_seeded():
    raw = pd.DataFrame({"text": [f"t{i}" for i in range(12)], "label": ["a", "b", "c"] * 4})
    demos = label_demonstrations(raw, ["a", "b", "c"], 2, seed=0)
    assert [label for _, label in demos] == ["a", "b", "c", "a", "b", "c"]
    assert demos == label_demonstrations(raw, ["a", "b", "c"], 2, seed=0)
    assert demos != label_demonstrations(raw, ["a", "b", "c"], 2, seed=1)
    assert label_demonstrations(raw, ["a", "b", "c"], 0, seed=0) == []
    with pytest.raises(ConfigError, match="train_path"):
        label_demonstrations(None, ["a"], 1, seed=0)


def test_few_shot_label_requests_answer_each_demonstration_first():
    op = LabelOp(task="Sort.", labels=["a", "b"], demonstrations=[("first  text", "a"), ("second", "b")])
    messages = op.build_requests({"text": "new one"})[0].messages
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert "first text" in messages[1]["content"] and messages[2]["content"] == "a"
    assert messages[4]["content"] == "b" and "new one" in messages[5]["content"]
    assert op.name == "label.annotate_2shot"
    assert LabelOp(task="Sort.", labels=["a", "b"]).name == "label.annotate"
    with pytest.raises(ValueError, match="outside the label set"):
        LabelOp(task="Sort.", labels=["a", "b"], demonstrations=[("x", "z")])


# --------------------------------------------------------------------------- findings

def _student(acc, sd=0.01):
    return {"accuracy": acc, "accuracy_std": sd, "seeds": [0, 1, 2], "majority": 0.5, "probe": acc}


def _summary(*, gains_small, gains_large, topic_d2, curve, teacher):
    methods = {}
    for i, (method, d2) in enumerate((("zero_shot", 0.5), ("zero_shot_topic", topic_d2), ("few_shot_3", 0.6))):
        methods[method] = {"synthetic": _student(0.6 + 0.05 * i), "distinct_2": d2,
                           "embedding_distance": d2, "accepted": 900, "teacher_tokens": 1}
    ds = {"raw": _student(0.7), "methods": methods,
          "raw_examples": {"50": {"raw": _student(0.6), "mixed": _student(0.6 + gains_small)},
                           "400": {"raw": _student(0.8), "mixed": _student(0.8 + gains_large)}},
          "num_examples": {str(m): {"synthetic": _student(a)} for m, a in curve.items()},
          "teacher": {"0": {"accuracy": teacher, "majority": 0.5}}}
    return {"datasets": {"a": ds, "b": json.loads(json.dumps(ds)), "c": json.loads(json.dumps(ds))}}


def _verdicts(summary):
    return {item["id"]: item["overall"] for item in findings(summary)}


def test_findings_hold_on_planted_numbers_that_show_them():
    summary = _summary(gains_small=0.08, gains_large=0.0, topic_d2=0.9,
                       curve={100: 0.6, 250: 0.7, 500: 0.74, 1000: 0.745}, teacher=0.6)
    # The teacher's accuracy is the same on every dataset, so it cannot rank the students:
    # make it vary against the students instead.
    for name, teacher in zip("abc", (0.9, 0.5, 0.7)):
        summary["datasets"][name]["teacher"]["0"]["accuracy"] = teacher
        for i, m in enumerate(summary["datasets"][name]["methods"].values()):
            m["synthetic"]["accuracy"] = {"a": 0.6, "b": 0.8, "c": 0.7}[name] + 0.01 * i
    assert _verdicts(summary) == {
        "mixing_helps_most_with_little_raw": "held", "zero_shot_topic_most_diverse": "held",
        "diversity_goes_with_accuracy": "held", "teacher_accuracy_does_not_predict_student": "held",
        "diminishing_returns": "held"}


def test_findings_fail_on_planted_numbers_that_contradict_them():
    summary = _summary(gains_small=0.005, gains_large=0.05, topic_d2=0.4,
                       curve={100: 0.6, 250: 0.62, 500: 0.66, 1000: 0.75}, teacher=0.6)
    for name, teacher in zip("abc", (0.6, 0.7, 0.8)):  # teacher and students rank alike
        summary["datasets"][name]["teacher"]["0"]["accuracy"] = teacher
        for m in summary["datasets"][name]["methods"].values():  # less diverse, better
            m["synthetic"]["accuracy"] = teacher - 0.1 * m["distinct_2"]
    verdicts = _verdicts(summary)
    assert verdicts["mixing_helps_most_with_little_raw"] == "did not hold"  # gain within spread
    assert verdicts["zero_shot_topic_most_diverse"] == "did not hold"
    assert verdicts["diversity_goes_with_accuracy"] == "did not hold"
    assert verdicts["teacher_accuracy_does_not_predict_student"] == "did not hold"
    assert verdicts["diminishing_returns"] == "did not hold"


def test_findings_say_not_tested_without_the_cells_they_need():
    summary = _summary(gains_small=0.1, gains_large=0.0, topic_d2=0.9, curve={1000: 0.7}, teacher=0.6)
    for ds in summary["datasets"].values():
        ds["raw_examples"] = {}
        ds["teacher"] = {}
        del ds["methods"]["zero_shot_topic"]
    verdicts = _verdicts(summary)
    assert verdicts["mixing_helps_most_with_little_raw"] == "not tested"
    assert verdicts["zero_shot_topic_most_diverse"] == "not tested"
    assert verdicts["diversity_goes_with_accuracy"] == "not tested"  # 2 methods are too few
    assert verdicts["teacher_accuracy_does_not_predict_student"] == "not tested"
    assert verdicts["diminishing_returns"] == "not tested"


def test_spearman():
    assert spearman([1, 2, 3], [10, 20, 30]) == 1.0
    assert spearman([1, 2, 3], [3, 2, 1]) == -1.0
    assert spearman([1, 2], [1, 2]) is None
    assert spearman([1, 1, 1], [1, 2, 3]) is None


# --------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_smoke_study_runs_every_cell_writes_its_outputs_and_resumes(ray_local, tmp_path):
    out = tmp_path / "study"
    assert main(["study", str(SMOKE), f"output_dir={out}"]) == 0
    summary = json.loads((out / "study.json").read_text())
    assert [c["status"] for c in summary["cells"]] == ["done"] * 6
    ds = summary["datasets"]["quickstart"]
    assert ds["raw"]["accuracy"] > ds["raw"]["majority"] + 0.1
    assert set(ds["methods"]) == {"zero_shot_topic", "few_shot_3"}
    for method in ds["methods"].values():
        assert set(method) >= {"synthetic", "mixed", "distinct_2", "embedding_distance"}
        assert 0 < method["accepted"] <= 24
    assert set(ds["num_examples"]) == {"12", "24"} and set(ds["raw_examples"]) == {"15", "30"}
    for teacher in ds["teacher"].values():  # every test row labelled, scored against its gold label
        assert teacher["rows"] == 30 and teacher["labelled"] == 30 and 0 <= teacher["accuracy"] <= 1
    assert {f["id"] for f in summary["findings"]} == {
        "mixing_helps_most_with_little_raw", "zero_shot_topic_most_diverse", "diversity_goes_with_accuracy",
        "teacher_accuracy_does_not_predict_student", "diminishing_returns"}
    assert all(f["overall"] in ("held", "did not hold", "mixed", "not tested") for f in summary["findings"])
    for plot in ("accuracy_by_method.png", "diversity_vs_accuracy.png", "accuracy_vs_num_examples.png",
                 "accuracy_vs_raw_examples.png", "teacher_vs_student.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "study.md").read_text()
    assert "## Findings of the seed study" in text and "quickstart.teacher.1shot" in text
    # Each cell is an ordinary job, and its report lies beside its job.yaml.
    assert (out / "cells" / "quickstart.few_shot_3.m12.n30" / "job.yaml").is_file()

    # A stopped study goes on where it stopped: only the unfinished cell runs again.
    reports = {p: p.stat().st_mtime_ns for p in out.glob("cells/*/output/report.json")}
    assert len(reports) == 6
    stopped = out / "cells" / "quickstart.teacher.0shot" / "output" / "report.json"
    stopped.unlink()
    # --report runs no cell and reports the missing one as missing.
    assert main(["study", str(SMOKE), f"output_dir={out}", "--report"]) == 0
    partial = json.loads((out / "study.json").read_text())
    assert [c["status"] for c in partial["cells"]].count("missing") == 1 and not stopped.exists()
    assert "0" not in partial["datasets"]["quickstart"]["teacher"]
    assert main(["study", str(SMOKE), f"output_dir={out}"]) == 0
    assert stopped.is_file()
    for path, mtime in reports.items():
        if path != stopped:
            assert path.stat().st_mtime_ns == mtime, path
    again = json.loads((out / "study.json").read_text())
    assert again["datasets"]["quickstart"]["teacher"]["0"] == ds["teacher"]["0"]  # greedy labels

    # parallel_cells=2: the two teacher cells run again side by side, as Ray tasks.
    teacher_reports = sorted(out.glob("cells/*.teacher.*/output/report.json"))
    assert len(teacher_reports) == 2
    for path in teacher_reports:
        path.unlink()
    assert main(["study", str(SMOKE), f"output_dir={out}", "parallel_cells=2"]) == 0
    spans = [json.loads(p.read_text()) for p in teacher_reports]
    spans = [(pd.Timestamp(r["started_at"]), pd.Timestamp(r["finished_at"])) for r in spans]
    assert max(start for start, _ in spans) < min(end for _, end in spans), spans  # they overlapped
    for path in teacher_reports:  # each cell's library output went to its own log
        assert list((path.parent / "logs").glob("run-*.log"))
    for path, mtime in reports.items():
        if "teacher" not in path.parent.parent.name:
            assert path.stat().st_mtime_ns == mtime, path
    side_by_side = json.loads((out / "study.json").read_text())
    assert [c["status"] for c in side_by_side["cells"]] == ["done"] * 6
    assert side_by_side["datasets"]["quickstart"]["teacher"] == again["datasets"]["quickstart"]["teacher"]
