"""The quiet terminal: raydag's own lines on the terminal, every library's output in the log."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from raydag import console


def test_capture_sends_library_output_to_the_log_and_raydag_lines_to_the_terminal(tmp_path, capfd):
    log = tmp_path / "logs" / "run.log"
    with console.capture(log) as path:
        assert path == log and console.log_path() == str(log)
        console.say("[teacher] 10/100 rows")
        print("a library's print")
        sys.stderr.write("a library's warning\n")
        os.write(1, b"C-level output on fd 1\n")
        os.write(2, b"C-level output on fd 2\n")
        subprocess.run([sys.executable, "-c", "print('a child process')"], check=True)
        console.warn("label 'x' has 1 raw example")
        console.error("raydag: error: train.jsonl:3: not valid JSON")
    out, err = capfd.readouterr()
    assert out.splitlines() == ["raydag: [teacher] 10/100 rows"]
    assert err.splitlines() == ["raydag: warning: label 'x' has 1 raw example",
                                "raydag: error: train.jsonl:3: not valid JSON"]
    text = log.read_text()
    for line in ("a library's print", "a library's warning", "C-level output on fd 1",
                 "C-level output on fd 2", "a child process", "raydag: [teacher] 10/100 rows",
                 "raydag: warning: label 'x'", "not valid JSON"):
        assert line in text, line
    print("after")  # the terminal is back
    assert capfd.readouterr().out == "after\n" and console.log_path() is None


def test_verbose_shows_library_output_live_and_logs_it(tmp_path, capfd):
    log = tmp_path / "run.log"
    with console.capture(log, verbose=True):
        os.write(1, b"live library line\n")
        console.say("own line")
    out, _ = capfd.readouterr()
    assert "live library line" in out and "raydag: own line" in out
    assert "live library line" in log.read_text()


def test_progress_lines_off_a_terminal_are_rate_limited(capsys):
    progress = console.Progress("teacher", 300, every_s=3600)
    for done in (100, 200, 300):
        progress.update(done)
    progress.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1  # only the final line within the interval
    assert lines[0].startswith("raydag: [teacher] 300/300 rows (100%)") and "ETA 0s" in lines[0]
    resumed = console.Progress("teacher", 100, done=40, every_s=0)
    resumed.update(70)
    line = capsys.readouterr().out.strip()
    assert "70/100 rows (70%)" in line and "rows/s" in line and "ETA" in line


def test_a_stage_that_runs_again_adds_up_and_a_stopped_one_counts(capsys):
    from raydag.report import StageTimer

    timer = StageTimer()
    for _ in range(2):  # a loop's rounds run the same stage
        with timer("student_mixed"):
            time.sleep(0.05)
    with pytest.raises(KeyboardInterrupt), timer("teacher"):
        raise KeyboardInterrupt
    assert timer.seconds["student_mixed"] >= 0.1 and timer.seconds["teacher"] >= 0
    out = capsys.readouterr().out + capsys.readouterr().err
    assert out.count("[student_mixed] done in 0.") == 2 and "[teacher] stopped after" in out
