"""Every job in jobs/ on the embedded teacher (shrunk by overrides), resume after a real
interruption, and the budgets. Real Ray, real vLLM; nothing is mocked."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from raydag.chain import build_steps
from raydag.cli import main
from raydag.config import load_job
from raydag.data import LINEAGE_COLUMNS

from conftest import QUICKSTART, ROOT

pytestmark = pytest.mark.slow

# Shrinks any job: few first-stage rows in small shards, no students.
SMALL = ["teacher.batch_size=4", "student.train_sets=[]", "budget.max_requests=8"]
EXTRA = {
    # the engines in one pool for the job (auto picks it on GPUs; on CPU hosts only when asked)
    "create_zero_shot_topic.yaml": ["stages.0.num_topics=6", "teacher.engine_pool=job"],
    "self_instruct.yaml": ["stages.0.num_instructions=8",  # 2 rounds of 4
                           "teacher.engine_pool=job"],
}
JOBS = sorted(p.name for p in (ROOT / "jobs").glob("*.yaml")
              if p.name not in ("quickstart.yaml", "openai_teacher.yaml",  # tested elsewhere
                                "sst2_quality.yaml")  # needs ../shared/data: test_quality.py
              and not p.name.startswith("study"))  # studies: test_study.py


def run_job_cli(job_path: Path, overrides: list[str]) -> dict:
    code = main(["run", str(job_path), *overrides])
    assert code == 0
    out = next(o.split("=", 1)[1] for o in overrides if o.startswith("output_dir="))
    return json.loads((Path(out) / "report.json").read_text())


def outputs(report: dict) -> pd.DataFrame:
    frames = [pd.read_parquet(report["outputs"][name])
              for name in ("synthetic", "dropped", "quarantine") if name in report["outputs"]]
    return pd.concat(frames, ignore_index=True)


def assert_reconciles(report: dict) -> None:
    counts = report["counts"]
    settled = counts["accepted"] + sum(counts["dropped"].values()) + sum(counts["quarantined"].values())
    assert settled == counts["ran"] + counts["created"]
    assert counts["ran"] + counts["not_run_budget"] == counts["planned"]


@pytest.mark.parametrize("name", JOBS)
def test_job_runs_on_the_embedded_teacher(ray_local, tmp_path, name):
    overrides = [f"output_dir={tmp_path / 'out'}", *SMALL, *EXTRA.get(name, [])]
    report = run_job_cli(ROOT / "jobs" / name, overrides)
    assert_reconciles(report)
    job = load_job(ROOT / "jobs" / name, overrides)
    rows = outputs(report)
    assert len(rows) == report["counts"]["ran"] + report["counts"]["created"]
    assert rows["_status"].isin(["accepted", "dropped", "quarantined"]).all()
    assert ((rows["_status"] == "accepted") == (rows["_reason"] == "")).all()
    assert set(LINEAGE_COLUMNS) <= set(rows.columns) and rows["id"].is_unique
    # Each stage that saw rows left its declared columns on them (its contract).
    steps = {step.name: step for step in build_steps(job, None, ["topic"])}
    for stats in report["per_stage"]:
        if stats["accepted"]:
            assert set(steps[stats["stage"]].op.adds) <= set(rows.columns), stats["stage"]
    assert report["teacher"]["tokens_in"] > 0 and report["teacher"]["requests"] > 0
    if name in ("self_instruct.yaml", "create_zero_shot_topic.yaml"):
        # two teacher passes (two rounds; the topic list, then the stage), one engine pool:
        # the model was loaded once
        assert report["teacher"]["engine_starts"] == 1
        assert report["teacher"]["engine_load_seconds"] > 0
    if name == "self_instruct.yaml":  # round 2 draws demonstrations from seeds + round 1's tasks
        assert report["shards"]["total"] == 2 and report["counts"]["planned"] == 8
        round1 = pd.read_parquet(Path(report["run_dir"]) / "shards" / "shard-00000.parquet")
        round2 = pd.read_parquet(Path(report["run_dir"]) / "shards" / "shard-00001.parquet")
        seeds = load_job(ROOT / "jobs" / name).stages[0].seed_tasks_path
        from raydag.data import read_texts

        known = set(read_texts(seeds, ["instruction", "output"], ["input"])["id"])
        known |= set(round1.loc[round1["_status"] == "accepted", "id"])
        assert all(set(d) <= known for d in round2["demo_ids"])
    if name == "create_zero_shot_topic.yaml":
        topics = json.loads((Path(report["run_dir"]) / "topics.json").read_text())
        assert len(topics) >= 2 and set(rows["topic"]) <= set(topics)


def start_run(out: Path, overrides: list[str], stderr=subprocess.DEVNULL,
              stdout=subprocess.DEVNULL, verbose: bool = False) -> subprocess.Popen:
    """``raydag run`` of the quickstart in a process of its own, on this test's Ray."""
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    return subprocess.Popen([sys.executable, "-m", "raydag.cli", "run", str(QUICKSTART),
                             f"output_dir={out}", *overrides, *(["--verbose"] if verbose else [])],
                            env=env, cwd=ROOT,
                            stdout=stdout, stderr=stderr, text=True, start_new_session=True)


# Ray prefixes what an actor prints with its class and pid (and colour codes): "(MapWorker(
# MapBatches(ChainRunner)) pid=123[, ip=...]) raydag: [teacher] shard 4: ..." once the actor
# has finished a shard. `raydag run --verbose` shows it live.
SHARD_OUT = re.compile(r"ChainRunner\)*\s+pid=(\d+)[^)]*\)\S*\s+raydag: \[teacher\] shard \d+:")


def engine_actor_with_shards_out(proc: subprocess.Popen, lines: list[str],
                                 count: int) -> tuple[int, threading.Thread]:
    """Collect the run's output (stdout with stderr) into ``lines`` on a thread; return the pid
    of the first engine actor to finish ``count`` shards, and the thread. Fail if the run ends
    or stalls first."""
    found = threading.Event()
    done: dict[int, int] = {}  # shards out, by actor pid
    chosen: list[int] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            match = SHARD_OUT.search(line)
            if match:
                pid = int(match.group(1))
                done[pid] = done.get(pid, 0) + 1
                if done[pid] == count and not chosen:
                    chosen.append(pid)
                    found.set()
        found.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert found.wait(300), f"no engine actor finished {count} shards in 300 s"
    assert chosen, (f"the run ended before an engine actor finished {count} shards:\n"
                    + "".join(lines[-40:]))
    return chosen[0], reader


def wait_for_shards(proc: subprocess.Popen, out: Path, count: int) -> None:
    """Return once ``count`` shards of the run are written; fail if it ends or stalls first."""
    deadline = time.monotonic() + 300
    while len(list(out.glob("runs/*/shards/shard-*.parquet"))) < count:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline, "no shard finished in 300 s"
        time.sleep(0.2)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_resume_after_killing_a_real_run_gives_the_same_rows(ray_local, tmp_path):
    """Kill the driver (SIGKILL) mid-run, rerun: finished shards are kept, the rest are made,
    and the rows equal those of an uninterrupted run, though the rerun's engine (in a job's
    engine pool) was killed mid-run too. Then stop a run with SIGTERM, and kill the engine
    actor of its rerun: the rows are still those of the uninterrupted run."""
    small = ["raw_examples=30", "stages.0.num_examples=40", "teacher.batch_size=4",
             "stages.0.sampling.max_tokens=24", "student.train_sets=[]",
             # float32: a resumed run meets a cold prefix cache, and bf16 kernels with AMX
             # (Xeon) then compute other logits; float32 gives the same tokens on both hosts
             "teacher.dtype=float32"]
    reference = run_job_cli(QUICKSTART, [f"output_dir={tmp_path / 'whole'}", *small])
    assert reference["shards"]["run"] == 10

    out = tmp_path / "interrupted"
    proc = start_run(out, small)
    try:
        wait_for_shards(proc, out, 3)
    finally:
        stop(proc)
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("runs/*/shards/shard-*.parquet")}
    assert 3 <= len(done) < 10, "the run was not interrupted mid-way"
    assert not (out / "report.json").exists()

    # The rerun keeps its engine in a job's engine pool (a Ray Serve replica; the default of a
    # job on GPUs whose teacher makes several passes), killed (SIGKILL) once two more shards
    # are written: Serve starts another, and the requests the dead one held are sent again.
    killer = threading.Thread(target=kill_engine_replica_after, args=(out, len(done) + 2),
                              daemon=True)
    killer.start()
    resumed = run_job_cli(QUICKSTART, [f"output_dir={out}", *small, "teacher.engine_pool=job"])
    killer.join(timeout=30)
    assert resumed["teacher"]["engine_starts"] >= 2  # the killed replica's engine and its successor
    assert resumed["signature"] == reference["signature"]  # output_dir is not a result setting
    assert resumed["shards"]["resumed"] >= len(done)
    assert resumed["shards"]["resumed"] + resumed["shards"]["run"] == 10
    shard_dir = Path(resumed["run_dir"]) / "shards"
    for name, mtime in done.items():  # finished shards were skipped, not redone
        assert (shard_dir / name).stat().st_mtime_ns == mtime
    assert_reconciles(resumed)
    assert resumed["counts"] == reference["counts"]
    for folder in ("synthetic", "dropped", "quarantine"):
        if folder in reference["outputs"]:
            ours = pd.read_parquet(resumed["outputs"][folder])
            theirs = pd.read_parquet(reference["outputs"][folder])
            assert sorted(ours["id"]) == sorted(theirs["id"])
    assert teacher_rows(resumed) == teacher_rows(reference)  # every planned row, once
    # A third run has nothing left to do.
    again = run_job_cli(QUICKSTART, [f"output_dir={out}", *small])
    assert again["shards"] == {"total": 10, "resumed": 10, "run": 0, "not_run": 0}

    # SIGTERM: the driver stops taking shards, writes a partial report whose counts reconcile
    # and exits 143; a rerun resumes and ends with the uninterrupted run's rows.
    stopped = tmp_path / "stopped"
    proc = start_run(stopped, small, stderr=subprocess.PIPE)
    try:
        wait_for_shards(proc, stopped, 2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=180)
    finally:
        stop(proc)
    assert proc.returncode == 143, err[-3000:]
    assert "stopped by SIGTERM" in err and "partial report" in err
    partial = json.loads((stopped / "report.json").read_text())
    assert partial["partial"] and partial["stopped_by"] == "SIGTERM"
    assert partial["stopped_in"] == "teacher"
    counts = partial["counts"]
    written = len(list(stopped.glob("runs/*/shards/shard-*.parquet")))
    assert 2 <= partial["shards"]["finished"] <= written < 10 and partial["shards"]["total"] == 10
    assert counts["planned"] == 40 and counts["ran"] == 4 * partial["shards"]["finished"]
    assert counts["ran"] + counts["not_run"] == counts["planned"]
    settled = counts["accepted"] + sum(counts["dropped"].values()) + sum(counts["quarantined"].values())
    assert settled == counts["ran"] + counts["created"]

    # The rerun loses its engine actor (SIGKILL) once the actor has finished two shards (the
    # first is surely delivered: the second started after it): Ray Data restarts the actor and
    # runs the shard it held again, and the rerun still ends with every planned row once. One
    # shard in flight, so shards are left to the actor's successor.
    lines: list[str] = []
    proc = start_run(stopped, [*small, "teacher.shards_in_flight=1"],
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, verbose=True)
    try:
        pid, reader = engine_actor_with_shards_out(proc, lines, 2)
        os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=600)
        reader.join(timeout=30)  # the run's last lines
    finally:
        stop(proc)
    assert proc.returncode == 0, "".join(lines[-60:])
    resumed = json.loads((stopped / "report.json").read_text())
    assert resumed["shards"]["resumed"] >= partial["shards"]["finished"]
    assert resumed["shards"]["resumed"] + resumed["shards"]["run"] == 10
    assert resumed["teacher"]["engine_starts"] >= 2  # the killed actor's engine and its successor
    assert_reconciles(resumed)
    assert resumed["counts"] == reference["counts"]
    for folder in ("synthetic", "dropped", "quarantine"):
        if folder in reference["outputs"]:
            assert sorted(pd.read_parquet(resumed["outputs"][folder])["id"]) == \
                sorted(pd.read_parquet(reference["outputs"][folder])["id"])


def kill_engine_replica_after(out: Path, shards: int) -> None:
    """SIGKILL the engine replica of the run writing to ``out`` once it has ``shards`` shards
    written (fail if that does not happen within 300 s, or no single replica is found)."""
    deadline = time.monotonic() + 300
    while len(list(out.glob("runs/*/shards/shard-*.parquet"))) < shards:
        assert time.monotonic() < deadline, f"the run did not write {shards} shards in 300 s"
        time.sleep(0.2)
    replicas = engine_replica_pids()
    assert len(replicas) == 1, replicas
    os.kill(replicas[0], signal.SIGKILL)


def engine_replica_pids() -> list[int]:
    """Pids of the live replicas of a job's engine pool (Ray titles a replica's process
    ``ray::ServeReplica:<app>:EngineHost``)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if proc.name.isdigit() and "ServeReplica:raydag-engines-" in command:
            pids.append(int(proc.name))
    return pids


def teacher_rows(report: dict) -> list[tuple]:
    """The teacher stage's rows of a run (its shard files): id, status and reason, sorted."""
    shards = sorted((Path(report["run_dir"]) / "shards").glob("shard-*.parquet"))
    frame = pd.concat([pd.read_parquet(p, columns=["id", "_status", "_reason"]) for p in shards])
    return sorted(frame.itertuples(index=False, name=None))


def test_budgets_cap_requests_and_tokens_and_the_report_prices_them(ray_local, tmp_path):
    settings = [f"output_dir={tmp_path / 'out'}", "raw_examples=30", "stages.0.num_examples=200",
                "budget.max_requests=40", "teacher.batch_size=4", "student.train_sets=[]",
                "teacher.shards_in_flight=2",
                "cost.usd_per_million_input_tokens=1.0", "cost.usd_per_million_output_tokens=4.0"]
    report = run_job_cli(QUICKSTART, [*settings, "budget.max_tokens=1500"])
    counts, budget, cost = report["counts"], report["budget"], report["cost"]
    assert counts["planned"] == 40  # max_requests cut the plan of 200
    assert budget["exhausted"] and budget["tokens_used"] >= 1500
    assert counts["not_run_budget"] > 0 and report["shards"]["not_run"] > 0
    # No shard starts once the cap is reached: at most the shards in flight (2) overshoot it,
    # beyond the one that reached it.
    per_shard = budget["tokens_used"] / (report["shards"]["run"])
    assert budget["tokens_used"] < 1500 + 3 * per_shard
    assert_reconciles(report)
    teacher = report["teacher"]
    expected = teacher["tokens_in"] / 1e6 * 1.0 + teacher["tokens_out"] / 1e6 * 4.0
    assert cost["total_usd"] == pytest.approx(expected, rel=1e-4)
    assert cost["usd_per_accepted_example"] == pytest.approx(expected / counts["accepted"], rel=1e-3)

    # A rerun with a larger cap keeps the shards done and goes on from there.
    again = run_job_cli(QUICKSTART, [*settings, "budget.max_tokens=100000"])
    assert again["shards"]["resumed"] == report["shards"]["run"]
    assert not again["budget"]["exhausted"] and again["counts"]["not_run_budget"] == 0
    assert again["counts"]["planned"] == 40 and again["shards"]["not_run"] == 0
    assert_reconciles(again)
