import json
from pathlib import Path

import pytest

from raydag.config import JobConfig, load_job, parse_override
from raydag.errors import ConfigError

from conftest import QUICKSTART, ROOT


@pytest.mark.parametrize("path", sorted(p for p in (ROOT / "jobs").glob("*.yaml")
                                         if not p.name.startswith("study")),  # studies: test_study.py
                         ids=lambda p: p.name)
def test_every_job_yaml_loads_and_starts_with_its_launch_command(path):
    job = load_job(path)
    assert isinstance(job, JobConfig)
    first = path.read_text().splitlines()[0]
    assert first.startswith("#") and f"raydag run jobs/{path.name}" in first
    inputs = [job.data.train_path, job.data.test_path, job.data.unlabelled_path] if job.data else []
    inputs += [getattr(stage, "seed_tasks_path", None) for stage in job.stages]
    assert any(inputs)
    for input_path in filter(None, inputs):
        if "/shared/data/" in input_path and not Path(input_path).parent.parent.is_dir():
            continue  # the shared benchmark data sits outside the project and may be absent
        assert Path(input_path).is_file(), input_path


def test_quickstart_defaults_follow_the_seed_study():
    job = load_job(QUICKSTART)
    assert job.raw_examples == 100
    assert job.stages[0].num_examples == 1000
    assert job.student.train_sets == ["raw", "synthetic", "mixed"]
    assert len(job.data.labels) >= 3


def test_yaml_paths_resolve_against_the_yaml_folder():
    job = load_job(QUICKSTART)
    assert job.data.train_path == str(ROOT / "jobs" / "data" / "quickstart" / "train.jsonl")
    assert job.output_dir == str(ROOT / "runs" / "quickstart")


def test_overrides_are_typed_and_relative_paths_follow_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = load_job(QUICKSTART, ["stages.0.num_examples=30", "student.train_sets=[raw]",
                                "stages.0.sampling.temperature=0.5", "output_dir=here"])
    assert job.stages[0].num_examples == 30
    assert job.student.train_sets == ["raw"]
    assert job.stages[0].sampling.temperature == 0.5
    assert job.output_dir == str(tmp_path / "here")


def test_unknown_key_in_file_is_named_with_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(QUICKSTART.read_text().replace("  concurrency: 1", "  concurrency: 1\n  concurrenzy: 4"))
    with pytest.raises(ConfigError) as err:
        load_job(bad)
    assert "teacher.concurrenzy" in str(err.value) and str(bad) in str(err.value)


def test_unknown_key_in_override_is_an_error():
    with pytest.raises(ConfigError, match="unknown key 'student.epoch'"):
        load_job(QUICKSTART, ["student.epoch=2"])


def test_mistyped_value_names_the_key():
    with pytest.raises(ConfigError, match="stages.0.create.num_examples"):
        load_job(QUICKSTART, ["stages.0.num_examples=many"])


def test_missing_required_key_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\noutput_dir: out\n")
    with pytest.raises(ConfigError, match="stages.0 \\(create\\) needs the job's data section"):
        load_job(bad)
    bad.write_text("name: x\n")
    with pytest.raises(ConfigError, match="missing key 'output_dir'"):
        load_job(bad)


def test_duplicate_labels_are_rejected():
    with pytest.raises(ConfigError, match="unique"):
        load_job(QUICKSTART, ["data.labels=[a, a]"])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("stages.0.num_examples")
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])


def test_missing_job_file():
    with pytest.raises(ConfigError, match="not found"):
        load_job("/nonexistent/job.yaml")


def test_home_in_yaml_paths_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    job_file = tmp_path / "job.yaml"
    job_file.write_text(QUICKSTART.read_text().replace("output_dir: ../runs/quickstart",
                                                       "output_dir: ~/runs/qs"))
    assert load_job(job_file).output_dir == str(tmp_path / "runs" / "qs")


def test_strict_types_reject_strings_for_numbers(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(QUICKSTART.read_text().replace("raw_examples: 100", 'raw_examples: "100"'))
    with pytest.raises(ConfigError, match="raw_examples"):
        load_job(bad)


def test_a_finished_run_stays_finished_when_a_setting_with_a_default_is_added():
    from raydag.config import ran_as

    job = load_job(QUICKSTART, ["loop.rounds=3"])
    before = json.loads(job.model_dump_json())
    del before["loop"]["uncertain_share"], before["loop"]["pool_sample"]  # as an older raydag wrote it
    assert ran_as(before, job) and ran_as(json.loads(job.model_dump_json()), job)
    assert not ran_as({**before, "seed": 1}, job)  # a setting that differs
    del before["teacher"]["batch_size"]  # 100 in the job; its default (another value) is not what ran
    assert not ran_as(before, job)
    assert not ran_as({**before, "retired_setting": 1}, job) and not ran_as(None, job)
