"""`raydag submit|status|logs|stop` through the Ray Jobs API, against a real head node that
the test starts on 127.0.0.1 (its dashboard on loopback), running the real teacher."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import free_port

from raydag.cli import main
from raydag.submit import submission

BIN = Path(sys.executable).parent


def _loopback(address: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(address)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback  # ::ffff:127.0.0.1 is loopback


def _listening() -> set[tuple[str, int, int]]:
    """(address, port, pid) of every listening TCP socket of this user's processes."""
    import psutil

    out = set()
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.pid is not None:
            out.add((conn.laddr.ip, conn.laddr.port, conn.pid))
    return out


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """`ray start --head` bound to loopback; its dashboard URL. Stopped afterwards.

    One Ray per machine: this process's own Ray (from earlier tests) is shut down first, since
    the head and `ray stop --force` afterwards must not share the machine with it (a driver
    whose raylet is killed exits at once). Later tests that need Ray start a fresh one."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    before = _listening()
    temp = tmp_path_factory.mktemp("head")
    port, dashboard = free_port(), free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # Ray's servers bind 127.0.0.1 only
    env.pop("RAY_ADDRESS", None)
    started = subprocess.run(
        [str(BIN / "ray"), "start", "--head", f"--port={port}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", "--include-dashboard=true", "--num-cpus=2",
         "--disable-usage-stats", f"--temp-dir={temp}"],
        env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr[-2000:]
    url = f"http://127.0.0.1:{dashboard}"
    try:
        yield {"url": url, "before": before}
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True,
                       timeout=120)


def _wait(job_id: str, url: str, want: set[str], timeout_s: float = 420) -> str:
    from raydag.submit import status

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = status(job_id, url)["status"]
        if now in want:
            return now
        time.sleep(2)
    raise AssertionError(f"{job_id} not in {want} after {timeout_s}s (last: {now})")


def test_submission_checks_the_job_before_anything_is_sent(tiny_job_files, tmp_path_factory):
    spec = submission(str(tiny_job_files / "job.yaml"), ["stages.0.num_examples=8"],
                      str(tiny_job_files))
    assert spec["entrypoint"] == "python -m raydag.cli run job.yaml stages.0.num_examples=8"
    assert spec["runtime_env"]["working_dir"] == str(tiny_job_files)
    assert ".venv" in spec["runtime_env"]["excludes"]
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    from raydag.errors import RaydagError

    with pytest.raises(RaydagError, match="outside the working directory"):
        submission(str(tiny_job_files / "job.yaml"), [], str(elsewhere))


def test_submit_with_a_bad_job_or_no_head_fails_clearly(tiny_job_files, capsys):
    assert main(["submit", str(tiny_job_files / "job.yaml"), "stages.0.nope=1",
                 "--working-dir", str(tiny_job_files), "--address", "http://127.0.0.1:9"]) == 2
    assert "nope" in capsys.readouterr().err  # refused before any upload
    assert main(["status", "raysubmit_x", "--address", "http://127.0.0.1:9"]) == 2
    assert "no Ray Jobs API at http://127.0.0.1:9" in capsys.readouterr().err
    assert main(["submit", str(tiny_job_files / "job.yaml"), "--address", "127.0.0.1:8265"]) == 2
    assert "dashboard's URL" in capsys.readouterr().err


@pytest.mark.slow
def test_submit_status_logs_and_stop_on_a_real_head(head, tiny_job_files, capsys):
    url, out = head["url"], tiny_job_files / "submitted_out"
    code = main(["submit", str(tiny_job_files / "job.yaml"), "stages.0.num_examples=8",
                 "teacher.batch_size=8", "student.train_sets=[]", f"output_dir={out}",
                 "--working-dir", str(tiny_job_files), "--env", "RAYDAG_MARK=1",
                 # installed already: Ray's pip environment (a virtualenv over this one's
                 # packages) is built and checked without downloading anything
                 "--pip", "datasketch>=1.6", "--address", url])
    assert code == 0
    captured = capsys.readouterr()
    job_id = captured.out.strip().splitlines()[-1]
    assert job_id.startswith("raysubmit_") and f"raydag logs {job_id}" in captured.err
    assert _wait(job_id, url, {"SUCCEEDED", "FAILED", "STOPPED"}) == "SUCCEEDED"
    assert main(["status", job_id, "--address", url]) == 0
    assert capsys.readouterr().out.strip().startswith(f"{job_id}: SUCCEEDED")
    assert main(["logs", job_id, "--address", url]) == 0
    logs = capsys.readouterr().out
    assert logs.strip().endswith(str(out / "report.json"))  # `raydag run` prints it last
    from raydag.submit import client

    env = client(url).get_job_info(job_id).runtime_env
    assert env["pip"]["packages"] == ["datasketch>=1.6"] and env["env_vars"] == {"RAYDAG_MARK": "1"}
    # (a pip environment that fails to build fails the job: it SUCCEEDED inside one)
    (accepted,) = out.glob("runs/*/synthetic")
    assert len(pd.read_parquet(accepted)) >= 1  # the job ran on the head and wrote its rows

    # A longer job, stopped while it runs.
    assert main(["submit", str(tiny_job_files / "job.yaml"), "stages.0.num_examples=2000",
                 f"output_dir={tiny_job_files / 'stopped_out'}", "--working-dir",
                 str(tiny_job_files), "--address", url]) == 0
    long_id = capsys.readouterr().out.strip().splitlines()[-1]
    _wait(long_id, url, {"RUNNING"}, timeout_s=120)
    assert main(["stop", long_id, "--address", url]) == 0
    assert "stop requested" in capsys.readouterr().out
    assert _wait(long_id, url, {"STOPPED", "FAILED", "SUCCEEDED"}, timeout_s=120) == "STOPPED"
    assert main(["stop", long_id, "--address", url]) == 0
    assert "already finished" in capsys.readouterr().out
    assert main(["logs", "raysubmit_nosuchjob", "--address", url]) == 2
    assert "no job raysubmit_nosuchjob" in capsys.readouterr().err


@pytest.mark.slow
def test_nothing_listens_beyond_loopback(head):
    """Every socket opened since the head started (head, dashboard, workers, and whatever
    earlier tests left running in this process) listens on loopback only."""
    new = _listening() - head["before"]
    assert new, "the head should have opened listening sockets"
    exposed = sorted(s for s in new if not _loopback(s[0]))
    assert not exposed, f"listening beyond loopback: {exposed}"
