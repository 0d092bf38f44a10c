"""Every bad input is one clear line: ``raydag: error: <file>[:<line>]: <reason>``, exit code 2,
a short output and no generation; with ``data.on_bad_rows: skip`` bad rows are left out and
counted by reason and file:line, and the counts reconcile."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raydag.cli import main
from raydag.config import load_job
from raydag.data import BadRows, read_labelled
from raydag.errors import DataError

from conftest import write_jsonl

LABELS = ["billing", "shipping", "technical"]


def _rows(n: int = 30) -> list[dict]:
    return [{"text": f"message {i} about {LABELS[i % 3]}", "label": LABELS[i % 3]} for i in range(n)]


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    io = capsys.readouterr()
    return code, io.out, io.err


def _one_clear_error(code: int, out: str, err: str, expected: str) -> str:
    """The run failed with exit code 2, before any generation, with a short message whose
    first error line names the problem; returns that line."""
    assert code == 2, (out, err)
    lines = (out + err).strip().splitlines()
    assert len(lines) < 20, lines
    errors = [line for line in lines if line.startswith("raydag: error: ")]
    assert errors and expected in errors[0], lines
    assert "Traceback" not in out + err
    return errors[0]


def test_latin1_byte_is_named_with_line_and_offset(ray_local, tiny_job_files, capsys):
    train = tiny_job_files / "train.jsonl"
    lines = train.read_bytes().splitlines(keepends=True)
    lines[6] = '{"text": "caf\u00e9 order", "label": "billing"}\n'.encode("latin-1")
    train.write_bytes(b"".join(lines))
    offset = sum(len(line) for line in lines[:6]) + lines[6].index(b"\xe9")
    code, out, err = _cli(capsys, "validate", str(tiny_job_files / "job.yaml"))
    line = _one_clear_error(code, out, err, f"{train}:7: byte 0xe9 at byte offset {offset}")
    assert "not UTF-8" in line


def test_a_label_that_is_a_number(ray_local, tiny_job_files, capsys):
    rows = _rows()
    rows[3]["label"] = 3
    write_jsonl(tiny_job_files / "train.jsonl", rows)
    code, out, err = _cli(capsys, "run", str(tiny_job_files / "job.yaml"))
    line = _one_clear_error(code, out, err, f"{tiny_job_files / 'train.jsonl'}:4: label 3 is a int")
    assert "not a string" in line
    assert not list((tiny_job_files / "out").glob("runs/*/shards/*.parquet"))


def test_a_text_that_is_not_a_string(ray_local, tiny_job_files, capsys):
    rows = _rows()
    rows[1]["text"] = {"nested": "object"}
    write_jsonl(tiny_job_files / "train.jsonl", rows)
    code, out, err = _cli(capsys, "validate", str(tiny_job_files / "job.yaml"))
    _one_clear_error(code, out, err, f"{tiny_job_files / 'train.jsonl'}:2: 'text' is dict")


def test_a_teacher_model_that_does_not_exist(ray_local, tiny_job_files, capsys):
    for model, reason in (("/nonexistent/model", "no such model folder"),
                          ("nonexistent-model", "not an embedded:<name> model"),
                          ("embedded:nope", "unknown embedded model 'nope'")):
        code, out, err = _cli(capsys, "run", str(tiny_job_files / "job.yaml"),
                              f"teacher.model={model}")
        _one_clear_error(code, out, err, f"teacher.model={model}: ")
        assert reason in err
    empty = tiny_job_files / "empty_model"
    empty.mkdir()
    code, out, err = _cli(capsys, "validate", str(tiny_job_files / "job.yaml"),
                          f"student.model={empty}")
    _one_clear_error(code, out, err, "the folder has no config.json")


def test_a_malformed_line_is_the_only_thing_shown(ray_local, tiny_job_files, capsys):
    train = tiny_job_files / "train.jsonl"
    lines = train.read_text().splitlines()
    lines[10] = '{"text": "cut off'
    train.write_text("\n".join(lines) + "\n")
    code, out, err = _cli(capsys, "run", str(tiny_job_files / "job.yaml"))
    _one_clear_error(code, out, err, f"{train}:11: not valid JSON")
    assert "full log" in err  # the libraries' output went to the log, not the terminal
    log = next((tiny_job_files / "out" / "logs").glob("run-*.log"))
    assert f"{train}:11: not valid JSON" in log.read_text()


def test_a_text_over_the_configured_limit_and_over_the_teachers_context(ray_local, tiny_job_files,
                                                                        capsys):
    rows = _rows()
    rows[5]["text"] = "x" * 5_000_000
    write_jsonl(tiny_job_files / "train.jsonl", rows)
    code, out, err = _cli(capsys, "validate", str(tiny_job_files / "job.yaml"))
    _one_clear_error(code, out, err, f"{tiny_job_files / 'train.jsonl'}:6: 'text' has 5,000,000 "
                     "characters, more than data.max_text_chars=20,000")
    long_text = " ".join(f"word{i}" for i in range(2000))  # ~17k chars: under the limit
    rows[5]["text"] = long_text
    write_jsonl(tiny_job_files / "train.jsonl", rows)
    # sampled (the whole pool is the raw sample): the teacher would see it
    code, out, err = _cli(capsys, "validate", str(tiny_job_files / "job.yaml"), "raw_examples=30")
    line = _one_clear_error(code, out, err, f"{tiny_job_files / 'train.jsonl'}:6: the text has ")
    assert "teacher tokens" in line and "teacher.max_model_len=2048" in line
    assert "a sampled raw example" in line

    # not sampled: the teacher never sees it, so it does not stop the job
    from raydag.data import stratified_sample

    for index in range(30):
        rows = _rows()
        rows[index]["text"] = long_text
        pool = read_labelled(write_jsonl(tiny_job_files / "train.jsonl", rows), "text", "label",
                             LABELS)
        if long_text not in set(stratified_sample(pool, 12, 0)["text"]):
            break
    code, out, err = _cli(capsys, "validate", str(tiny_job_files / "job.yaml"))
    assert code == 0, err


def test_errors_list_the_first_problems_and_count_the_rest(ray_local, tmp_path):
    rows = _rows()
    for index in range(0, 30, 3):
        rows[index]["label"] = "zzz"
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(DataError) as err:
        read_labelled(path, "text", "label", LABELS)
    lines = str(err.value).splitlines()
    assert lines[0].startswith(f"{path}:1: label 'zzz'") and len(lines) == 6
    assert "and 5 more bad row(s)" in lines[-1] and "on_bad_rows=skip" in lines[-1]


def test_skip_leaves_bad_rows_out_and_counts_them_by_reason_and_line(ray_local, tmp_path):
    path = tmp_path / "rows.jsonl"
    good = [json.dumps(r) for r in _rows(10)]
    lines = [good[0], '{"text": "broken', good[1], json.dumps({"text": "", "label": "billing"}),
             json.dumps({"text": "odd", "label": 7}), good[2], json.dumps(["a", "list"]),
             json.dumps({"text": "who", "label": "zzz"})]
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "\xff", "label": "billing"}\n')
    bad = BadRows("skip")
    frame = read_labelled(path, "text", "label", LABELS, bad=bad)
    assert frame["text"].tolist() == [json.loads(g)["text"] for g in good[:3]]
    summary = bad.summary()
    assert summary["by_reason"] == {"empty_text": 1, "label_not_a_string": 1, "not_an_object": 1,
                                    "not_json": 1, "not_utf8": 1, "unknown_label": 1}
    assert summary["rows"]["not_json"] == [f"{path}:2"] and summary["rows"]["not_utf8"] == [f"{path}:9"]
    assert len(frame) + summary["total"] == 9  # lines in = rows kept + bad rows


def test_cli_validate_reports_what_skip_would_leave_out(ray_local, tiny_job_files, capsys):
    rows = _rows()
    rows[4]["text"] = "   "
    write_jsonl(tiny_job_files / "train.jsonl", rows)
    code, out, err = _cli(capsys, "validate", str(tiny_job_files / "job.yaml"), "data.on_bad_rows=skip")
    assert code == 0 and "pool 29 rows" in out and "1 bad row(s)" in out, (out, err)


@pytest.mark.slow
def test_a_run_with_skipped_rows_reports_them_and_reconciles(ray_local, tiny_job_files, capsys):
    rows = _rows()
    rows[2]["label"] = "zzz"
    rows[7]["text"] = ""
    write_jsonl(tiny_job_files / "train.jsonl", rows)
    overrides = ["data.on_bad_rows=skip", "stages.0.method=zero_shot", "stages.0.num_examples=6",
                 "teacher.batch_size=6", "student.train_sets=[]", "stages.0.sampling.max_tokens=24"]
    code, out, err = _cli(capsys, "run", str(tiny_job_files / "job.yaml"), *overrides)
    assert code == 0, (out, err)
    report = json.loads(Path(out.strip().splitlines()[-1]).read_text())
    bad = report["input_bad_rows"]
    train = tiny_job_files / "train.jsonl"
    assert bad["by_reason"] == {"empty_text": 1, "unknown_label": 1}
    assert bad["rows"] == {"empty_text": [f"{train}:8"], "unknown_label": [f"{train}:3"]}
    assert report["counts"]["pool"] + bad["total"] == 30  # lines in = pool + left out
    assert "left out 2 bad input row(s)" in err
    card = json.loads((Path(report["run_dir"]) / "datacard.json").read_text())
    assert card["input_bad_rows"]["total"] == 2
    assert "unknown_label" in (Path(report["run_dir"]) / "datacard.md").read_text()
    # The precision chosen and why, and the log of the libraries' output
    assert report["teacher"]["dtype"] in ("bfloat16", "float32") and report["teacher"]["dtype_reason"]
    log = Path(report["log"])
    assert log.parent == tiny_job_files / "out" / "logs" and "raydag: [teacher]" in log.read_text()
    job = load_job(tiny_job_files / "job.yaml", overrides)
    assert job.data.on_bad_rows == "skip"
