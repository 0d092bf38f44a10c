"""`jobs/quickstart.yaml` end to end (shrunk by overrides), and bad input through the CLI."""

import json
import time
from pathlib import Path

import pandas as pd
import pytest

from raydag.cli import main
from raydag.config import load_job
from raydag.data import LINEAGE_COLUMNS

from conftest import QUICKSTART, write_jsonl


@pytest.mark.slow
def test_quickstart_end_to_end_with_real_engine_and_deepspeed(ray_local, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".raydag-output").write_text("")  # a previous run's folder ...
    (out / "report.json").write_text('{"stale": true}')  # ... whose report must not survive
    overrides = [
        f"output_dir={out}", "raw_examples=30", "stages.0.num_examples=36",
        # 16 tokens cut many support messages short: the truncated ones must be quarantined.
        "stages.0.sampling.max_tokens=16", "teacher.batch_size=12",
        "student.epochs=4", "student.batch_size=4", "student.min_steps=30", "student.seeds=[0,1]",
        "teacher.gpu_memory_utilization=0.5",  # GPU hosts: the engine test's engine holds 0.3
    ]
    code = main(["run", str(QUICKSTART), *overrides])
    # Only raydag's own lines reach the terminal: Ray's, vLLM's, DeepSpeed's and transformers'
    # output goes to the log file; the report path is the last line, the table just before it.
    io = capsys.readouterr()
    printed = io.out.strip().splitlines()
    assert code == 0, io.err
    path = out / "report.json"
    assert printed[-1] == str(path)
    assert printed[-2].startswith("mixed ") and printed[-5].startswith("student ")
    assert len(printed) + len(io.err.splitlines()) < 60, printed
    assert all(line.startswith("raydag: ") for line in printed[:-5]), printed
    assert not any("pid=" in line or "Loading weights" in line for line in printed)
    job = load_job(QUICKSTART, overrides)
    report = json.loads(path.read_text())

    counts = report["counts"]
    assert counts["raw"] == 30 and counts["planned"] == 36 and counts["ran"] == 36
    quarantined = sum(counts["quarantined"].values())
    assert counts["accepted"] + quarantined + sum(counts["dropped"].values()) == 36
    assert counts["quarantined"].get("truncated_at_max_tokens", 0) > 0
    assert counts["accepted"] > 0
    assert report["shards"] == {"total": 3, "resumed": 0, "run": 3, "not_run": 0}
    run_dir = Path(report["run_dir"])
    assert run_dir.parent == out / "runs" and run_dir.name == report["signature"]
    teacher = report["teacher"]
    assert teacher["model"] == "embedded:smollm2-135m-instruct"
    assert teacher["tokens_in"] > 36 * 50 and teacher["tokens_out"] > 36 and teacher["tokens_per_s"] > 0
    assert {"read", "sample", "teacher", "write", "students"} <= set(report["stages"])
    assert teacher["engine_starts"] == 1 and teacher["engine_load_seconds"] > 0
    # Structured-output health: the create step's truncated rows are its unusable share.
    create = next(iter(teacher["generation_health"].values()))
    assert create["reasons"]["truncated_at_max_tokens"] == counts["quarantined"]["truncated_at_max_tokens"]
    assert create["share"] == round(create["unusable"] / create["rows"], 4) > 0
    assert create["warn"] == (create["share"] > job.teacher.warn_unusable_share)
    assert create["warn"] == any("were unusable" in line for line in printed + io.err.splitlines())
    log = Path(report["log"])  # the libraries' output, with raydag's own lines
    assert log.parent == out / "logs" and log.is_file()
    text = log.read_text()
    assert "RayTrainWorker" in text and "raydag: [teacher]" in text
    assert report["teacher"]["dtype"] in ("bfloat16", "float32")
    assert report["student_precision"]["precision"] in ("bf16", "fp32")
    raw_train = report["students"]["raw"]["train_examples"]
    assert raw_train + report["students"]["raw"]["dev_examples"] == 30  # dev held out of raw
    for name, train_examples in (("raw", raw_train), ("synthetic", counts["accepted"]),
                                 ("mixed", raw_train + counts["accepted"])):
        student = report["students"][name]
        assert student["train_examples"] == train_examples
        # Ray Train's dataset ingest: each of the 2 workers read a balanced share of the rows.
        shares = student["runs"]["0"]["train_rows_per_worker"]
        assert sum(shares) == train_examples and max(shares) - min(shares) <= 1, shares
        assert student["dev_examples"] == 6  # 20% of each label's 10 raw rows
        assert student["test_examples"] == 150
        assert student["seeds"] == [0, 1] and set(student["runs"]) == {"0", "1"}
        assert student["accuracy_std"] >= 0.0
        assert sum(student["predicted"].values()) == 2 * 150
        assert set(student["per_class_f1"]) == set(job.data.labels)
        assert 0.0 < student["probe"]["accuracy"] <= 1.0
        # Every student learns something real: the majority class gets 1/3 of this test split.
        assert student["majority"]["accuracy"] == pytest.approx(1 / 3)
        assert student["accuracy"] > student["majority"]["accuracy"] + 0.1, (name, student)
        assert "not_above_majority" not in student["flags"]
        assert (Path(student["checkpoint"]) / "model.safetensors").is_file()
    assert [(c["a"], c["b"]) for c in report["student_comparisons"]] == [
        ("synthetic", "raw"), ("mixed", "raw"), ("mixed", "synthetic")]
    card = json.loads((out / "datacard.json").read_text())
    assert card["students"]["raw"]["probe"] == report["students"]["raw"]["probe"]
    assert "linear probe" in (out / "report.md").read_text()

    synthetic = pd.read_parquet(run_dir / "synthetic")
    assert len(synthetic) == counts["accepted"]
    assert set(LINEAGE_COLUMNS) <= set(synthetic.columns)
    assert synthetic["id"].is_unique
    raw_ids = set(pd.read_parquet(run_dir / "raw")["id"])
    assert all(set(p) <= raw_ids and len(p) == 3 for p in synthetic["parent_ids"])
    assert (synthetic["method"] == "create.few_shot_3").all()
    assert synthetic["label"].isin(job.data.labels).all()
    assert all(json.loads(s)["max_tokens"] == 16 for s in synthetic["sampling"])
    quarantine = pd.read_parquet(run_dir / "quarantine")
    assert len(quarantine) == quarantined and (quarantine["_stage"] == "1:create.few_shot_3").all()
    assert (quarantine["_raw_generation"].str.len() > 0).any() and (quarantine["_reason"] != "").all()
    md = (out / "report.md").read_text()
    assert "| mixed |" in md


def run_cli(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr()


def test_cli_malformed_jsonl_names_file_and_line_and_writes_no_report(ray_local, tiny_job_files, capsys):
    out = tiny_job_files / "out"
    out.mkdir()
    (out / ".raydag-output").write_text("")  # an earlier run's folder, with its report
    (out / "report.json").write_text('{"counts": {}}')
    train = tiny_job_files / "train.jsonl"
    lines = train.read_text().splitlines()
    lines[4] = '{"text": "cut off'
    train.write_text("\n".join(lines) + "\n")
    code, io = run_cli(capsys, "run", str(tiny_job_files / "job.yaml"))
    assert code == 2
    assert f"{train}:5: not valid JSON" in io.err
    assert not (tiny_job_files / "out" / "report.json").exists()


def test_cli_missing_label_column(ray_local, tiny_job_files, capsys):
    write_jsonl(tiny_job_files / "test.jsonl", [{"text": "hello", "category": "billing"}])
    code, io = run_cli(capsys, "run", str(tiny_job_files / "job.yaml"))
    assert code == 2 and "missing column 'label'" in io.err and "test.jsonl" in io.err


def test_cli_unknown_label(ray_local, tiny_job_files, capsys):
    code, io = run_cli(capsys, "validate", str(tiny_job_files / "job.yaml"),
                       "data.labels=[billing, shipping]")
    assert code == 2 and "label 'technical' is not in the job's labels" in io.err


def test_cli_empty_input(ray_local, tiny_job_files, capsys):
    (tiny_job_files / "train.jsonl").write_text("")
    code, io = run_cli(capsys, "run", str(tiny_job_files / "job.yaml"))
    assert code == 2 and "train.jsonl: the file is empty" in io.err


def test_cli_unwritable_output_folder(ray_local, tiny_job_files, capsys):
    blocker = tiny_job_files / "a_file"
    blocker.write_text("not a folder")
    code, io = run_cli(capsys, "run", str(tiny_job_files / "job.yaml"), f"output_dir={blocker}/out")
    assert code == 2 and "not writable" in io.err and str(blocker) in io.err


def test_cli_more_raw_examples_than_the_pool_has(ray_local, tiny_job_files, capsys):
    code, io = run_cli(capsys, "validate", str(tiny_job_files / "job.yaml"), "raw_examples=31")
    assert code == 2 and "raw_examples=31 but the pool has 30 rows" in io.err


def test_cli_validate_ok_and_unknown_key(ray_local, tiny_job_files, capsys):
    code, io = run_cli(capsys, "validate", str(tiny_job_files / "job.yaml"))
    assert code == 0 and "ok" in io.out and "pool 30 rows" in io.out
    code, io = run_cli(capsys, "validate", str(tiny_job_files / "job.yaml"), "teacher.temprature=1")
    assert code == 2 and "unknown key 'teacher.temprature'" in io.err


def test_cli_refuses_a_non_empty_folder_it_did_not_make(ray_local, tiny_job_files, capsys):
    folder = tiny_job_files / "mine"
    folder.mkdir()
    (folder / "synthetic").mkdir()  # someone else's data must never be cleared
    code, io = run_cli(capsys, "run", str(tiny_job_files / "job.yaml"), f"output_dir={folder}")
    assert code == 2 and "not empty and not made by raydag" in io.err
    assert (folder / "synthetic").is_dir()


def test_cli_fp16_on_a_cpu_host_fails_before_any_generation(ray_local, tiny_job_files, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("fp16 is valid on GPU hosts")
    code, io = run_cli(capsys, "run", str(tiny_job_files / "job.yaml"), "student.precision=fp16")
    assert code == 2 and "fp16 needs GPUs" in io.err
    assert not (tiny_job_files / "out" / "runs").exists()  # only the log was written




# The engines in the stage's actors (the default of a one-pass job), or in a job's engine pool.
ENGINE_HOMES = pytest.mark.parametrize("home", [[], ["teacher.engine_pool=job"]],
                                       ids=["stage_actors", "job_engine_pool"])


@pytest.mark.slow
@ENGINE_HOMES
def test_cli_a_model_without_weights_fails_fast_with_the_engines_own_error(ray_local, tiny_job_files,
                                                                          capsys, home):
    """A model folder that passes the driver's check (it has a config.json) but whose weights
    are missing: the engine fails to start, and the job fails at once with vLLM's own cause
    (raised in the engine's thread or process), not a hang."""
    import shutil

    from raydag.models import resolve_model

    model = tiny_job_files / "model"
    source = Path(resolve_model("embedded:smollm2-135m-instruct"))
    shutil.copytree(source, model, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    started = time.monotonic()
    code, io = run_cli(capsys, "run", str(tiny_job_files / "job.yaml"), f"teacher.model={model}",
                       "student.train_sets=[]", "teacher.start_timeout_s=300", *home)
    assert code == 2, io.err
    assert "the teacher engine (vllm, model " in io.err and "could not start" in io.err
    assert "weights" in io.err.lower(), io.err  # vLLM's cause, from the engine core process
    assert time.monotonic() - started < 300


@pytest.mark.slow
@ENGINE_HOMES
def test_cli_an_engine_that_does_not_start_in_time_fails_the_job(ray_local, tiny_job_files, capsys,
                                                                 home):
    started = time.monotonic()
    code, io = run_cli(capsys, "run", str(tiny_job_files / "job.yaml"), "student.train_sets=[]",
                       "teacher.start_timeout_s=1", *home)
    assert code == 2, io.err
    assert "did not start within 1s (teacher.start_timeout_s)" in io.err
    assert time.monotonic() - started < 120


# Every row's id, status and reason of the fixed job below, hashed. Measured before the create
# plan moved into Ray Data tasks and shards began to carry their counters in the footer; a change
# that alters it changes which rows a job makes. Update it only for a deliberate change of the
# rows (a prompt, a filter), and say so in the commit.
FIXED_JOB_ROWS = "db6dd593fecbd55c21df456472df83f4aedc9cafd5bb3e5ae10a5f3f1accd297"


@pytest.mark.slow
def test_a_fixed_job_makes_the_same_rows(ray_local, tmp_path):
    """The quickstart's create job on the instant engine (deterministic on any host): the same
    ids, statuses and reasons as before, again when rerun from its shards, and with shards of
    several engine batches."""
    import hashlib

    from raydag.pipeline import run_job

    def fixed_job(output_dir, *more):
        return load_job(QUICKSTART, [
            f"output_dir={output_dir}", "teacher.engine=instant", "teacher.model=instant",
            "stages.0.num_examples=300", "teacher.batch_size=32", "student.train_sets=[]",
            "quality.diversity.embeddings=false", "quality.decontam.embedding_threshold=null", *more])

    def digest(job) -> tuple[str, dict]:
        report = json.loads(Path(run_job(job)).read_text())
        run_dir = Path(report["run_dir"])
        rows = pd.concat([pd.read_parquet(run_dir / folder) for folder in
                          ("synthetic", "dropped", "quarantine") if (run_dir / folder).exists()])
        key = sorted(f"{i}|{s}|{r}" for i, s, r in zip(rows["id"], rows["_status"],
                                                       rows["_reason"].fillna("")))
        return hashlib.sha256("\n".join(key).encode()).hexdigest(), report

    first, report = digest(fixed_job(tmp_path / "a"))
    assert report["counts"]["ran"] == 300 and report["shards"]["total"] == 10
    assert first == FIXED_JOB_ROWS
    again, report = digest(fixed_job(tmp_path / "a"))  # every shard resumed, nothing regenerated
    assert report["shards"]["resumed"] == 10 and again == FIXED_JOB_ROWS
    # Shards of three engine batches: the same rows, in 4 files.
    bigger, report = digest(fixed_job(tmp_path / "b", "teacher.rows_per_shard=96"))
    assert report["shards"]["total"] == 4 and bigger == FIXED_JOB_ROWS
    # A rerun with another shard size resumes with the folder's own (shards/layout.json).
    again, report = digest(fixed_job(tmp_path / "b", "teacher.rows_per_shard=160"))
    assert report["shards"]["resumed"] == 4 and again == FIXED_JOB_ROWS


def test_the_measures_read_every_accepted_row_up_to_a_cap_and_a_seeded_sample_beyond(ray_local, tmp_path):
    from raydag.outputs import accepted_for_measures

    folder = tmp_path / "synthetic"
    folder.mkdir()
    rows = ([{"method": "create.zero_shot", "n": i} for i in range(5)]
            + [{"method": "create.few_shot", "n": i} for i in range(50)]
            + [{"method": "raw", "n": i} for i in range(7)])
    frame = pd.DataFrame([{"id": f"{r['method']}-{r['n']}", "text": f"text {r['method']} {r['n']}",
                           "label": "a", **r} for r in rows]).drop(columns="n")
    frame["_order"] = list(range(len(frame)))[::-1]  # row order is not file order
    frame.iloc[:31].to_parquet(folder / "part-0.parquet")
    frame.iloc[31:].to_parquet(folder / "part-1.parquet")

    measured = accepted_for_measures(tmp_path, ["synthetic"], max_per_method=20, seed=0)
    assert list(measured.columns) == ["text", "label", "method"]
    assert measured["method"].value_counts().to_dict() == {"create.few_shot": 20, "create.zero_shot": 5}
    order = frame.set_index("text")["_order"]
    assert list(order[measured["text"]]) == sorted(order[measured["text"]])  # in row order
    again = accepted_for_measures(tmp_path, ["synthetic"], max_per_method=20, seed=0)
    other = accepted_for_measures(tmp_path, ["synthetic"], max_per_method=20, seed=1)
    assert measured.equals(again) and not measured.equals(other)
    everything = accepted_for_measures(tmp_path, ["synthetic"], max_per_method=50, seed=0)
    assert len(everything) == 55
    assert accepted_for_measures(tmp_path, ["dropped"], max_per_method=50, seed=0).empty
