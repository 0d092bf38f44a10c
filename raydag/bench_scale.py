"""Scale benchmark of the data plane: a real job over 10,000, 100,000 and 1,000,000 rows.

``python -m raydag.bench scale`` (``make bench-scale``) runs, for each size, a real ``label``
job (annotate) through ``raydag.run_job``: the input read and checked, the request plan, the
teacher stage's shards, exact dedup, near-duplicates (MinHash), decontamination (n-grams), PII
redaction, co-annotation routing, the measures and the write. The teacher is the instant
benchmark engine (:mod:`raydag.engines.instant`), so the wall time is raydag's own, not a
model's. Beside it, the same rows go through a bare Ray Data pipeline (``read_json`` ->
``map_batches`` of the same operator and instant engine -> ``write_parquet``) as the
reference.

Every run is a fresh driver process (``python -m raydag.bench_scale --drive ...``) that
measures itself: wall seconds after Ray is up, and its own peak RSS from
``resource.getrusage``. Per size it prints::

    scale rows=<n> rows_per_s=<n> driver_peak_rss_mb=<n> ref_rows_per_s=<n> ref_driver_peak_rss_mb=<n>

then where the job's seconds went (``scale_stages rows=<n> read_s=<s> teacher_s=<s>
write_s=<s> ...``, from the report), and then the MinHash pass alone
(:mod:`raydag.bench_minhash`) at ``--minhash-rows`` rows.

The inputs (seeded, made in this process before any driver starts): texts of 8-40 words from a
3,000-word vocabulary with 10% planted near copies, 1% carrying an e-mail address, and 0.1%
copied from the test split; 300 labelled rows each for the pool and the test split. Passes that
run a model on every row (embedding near-duplicates and decontamination, PVI, the judge) are
off: they measure the encoder, not the data plane.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

SIZES = (10_000, 100_000, 1_000_000)
LABELS = ["alpha", "beta", "gamma"]
TASK = "Sort each note by its topic."
LABELLED_ROWS = 300  # the pool and the test split each


def write_inputs(folder: Path, rows: int, seed: int = 0) -> dict[str, str]:
    """The job's input files under ``folder``: ``unlabelled.jsonl`` (``rows`` texts) and
    small labelled ``train.jsonl`` and ``test.jsonl``."""
    from raydag.bench_minhash import synthetic_rows

    folder.mkdir(parents=True, exist_ok=True)
    labelled, _ = synthetic_rows(2 * LABELLED_ROWS, seed + 1)
    labelled["label"] = [LABELS[i % len(LABELS)] for i in range(len(labelled))]
    train, test = labelled.iloc[:LABELLED_ROWS], labelled.iloc[LABELLED_ROWS:]
    frame, _ = synthetic_rows(rows, seed)
    texts = frame["text"].to_numpy(dtype=object)
    rng = np.random.default_rng(seed)
    emails = rng.choice(rows, size=rows // 100, replace=False)
    texts[emails] = [f"{t} write to user{i}@example.com" for i, t in zip(emails, texts[emails])]
    copied = rng.choice(rows, size=max(1, rows // 1000), replace=False)
    texts[copied] = test["text"].to_numpy(dtype=object)[np.arange(len(copied)) % len(test)]
    paths = {"unlabelled": folder / "unlabelled.jsonl", "train": folder / "train.jsonl",
             "test": folder / "test.jsonl"}
    pd.DataFrame({"text": texts}).to_json(paths["unlabelled"], orient="records", lines=True)
    for name, part in (("train", train), ("test", test)):
        part[["text", "label"]].to_json(paths[name], orient="records", lines=True)
    return {name: str(path) for name, path in paths.items()}


def scale_job(folder: Path, paths: dict[str, str]) -> Path:
    """Write the benchmark's job (a label job on the instant engine, every data pass on)."""
    job = {
        "name": f"bench-scale-{folder.name}",
        "seed": 0,
        "output_dir": str(folder / "output"),
        "raw_examples": 100,
        "data": {"train_path": paths["train"], "test_path": paths["test"],
                 "unlabelled_path": paths["unlabelled"], "labels": LABELS, "task": TASK},
        "teacher": {"engine": "instant", "model": "instant"},
        "stages": [{"type": "label", "mode": "annotate"}],
        "quality": {"near_dup": {"enabled": True},
                    "decontam": {"enabled": True, "embedding_threshold": None},
                    "pii": {"enabled": True},
                    "diversity": {"embeddings": False},
                    "coannotation": {"enabled": True}},
        "student": {"train_sets": []},
    }
    path = folder / "job.yaml"
    path.write_text("# Written by python -m raydag.bench scale\n" + yaml.safe_dump(job, sort_keys=False))
    return path


def _drive(job_path: str, side: str, result: str) -> None:
    """One measured driver (run in its own process): ``ours``, the job, or ``reference``, the
    bare Ray Data pipeline over the job's unlabelled file."""
    from raydag import console
    from raydag.bench_minhash import driver_peak_rss_mb
    from raydag.config import load_job
    from raydag.resources import init_ray

    job = load_job(job_path)
    out = Path(job.output_dir)
    with console.capture(out.parent / f"{side}.log"):
        init_ray()
        started, stages = time.perf_counter(), {}
        if side == "reference":
            rows = _reference(job, str(out.parent / "reference"))
        else:
            from raydag.pipeline import run_job

            report = json.loads(Path(run_job(job)).read_text())
            rows, stages = report["counts"]["ran"], report["stages"]
        seconds = time.perf_counter() - started
    Path(result).write_text(json.dumps({"rows": rows, "seconds": seconds, "stages": stages,
                                        "driver_peak_rss_mb": driver_peak_rss_mb()}))


class _InstantLabeler:
    """The reference's map_batches callable: the job's label operator on the instant engine."""

    def __init__(self, labels: list[str], task: str) -> None:
        from raydag.engines.instant import InstantEngine
        from raydag.ops.label import LabelOp

        self.op, self.engine = LabelOp(task=task, labels=labels), InstantEngine()

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = batch.to_dict("records")
        requests = [self.op.build_requests(row) for row in rows]
        flat = self.engine.generate([r for group in requests for r in group])
        out, at = [], 0
        for row, group in zip(rows, requests):
            out.append({**row, **self.op.parse(row, flat[at : at + len(group)])[0]})
            at += len(group)
        return pd.DataFrame(out)


def _reference(job, folder: str) -> int:
    import ray

    dataset = ray.data.read_json(job.data.unlabelled_path).map_batches(
        _InstantLabeler, fn_constructor_kwargs={"labels": job.data.labels, "task": job.data.task},
        batch_size=job.teacher.batch_size, batch_format="pandas", concurrency=1, num_cpus=1)
    dataset.write_parquet(folder)
    return ray.data.read_parquet(folder).count()


def _measure(job_path: Path, which: str, timeout_s: float) -> dict:
    result = job_path.parent / f"{which}.json"
    result.unlink(missing_ok=True)
    subprocess.run([sys.executable, "-m", "raydag.bench_scale", "--drive", str(job_path),
                    "--side", which, "--result", str(result)], check=True, timeout=timeout_s)
    return json.loads(result.read_text())


def bench_scale(sizes: list[int], work: Path, minhash_rows: int, timeout_s: float) -> list[dict]:
    """Run every size (ours, then the reference), print one ``scale`` line per size, then the
    MinHash pass alone; return the measurements."""
    results = []
    for rows in sizes:
        folder = work / str(rows)
        made = time.perf_counter()
        # Written in a spawned process: Linux keeps a process's peak RSS across fork and exec
        # (getrusage's ru_maxrss), so a driver started from a bench process that had held the
        # inputs would report the bench's peak, not its own (1,608 MB for both sides at 1M rows)
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            paths = pool.apply(write_inputs, (folder, rows))
        job_path = scale_job(folder, paths)
        print(f"[bench scale] {rows} rows: inputs written in {time.perf_counter() - made:.0f}s; "
              f"logs in {folder}", flush=True)
        ours = _measure(job_path, "ours", timeout_s)
        ref = _measure(job_path, "reference", timeout_s)
        line = {"rows": rows, "rows_per_s": rows / ours["seconds"],
                "driver_peak_rss_mb": ours["driver_peak_rss_mb"],
                "ref_rows_per_s": ref["rows"] / ref["seconds"],
                "ref_driver_peak_rss_mb": ref["driver_peak_rss_mb"]}
        print(f"scale rows={rows} rows_per_s={line['rows_per_s']:.0f} "
              f"driver_peak_rss_mb={line['driver_peak_rss_mb']:.0f} "
              f"ref_rows_per_s={line['ref_rows_per_s']:.0f} "
              f"ref_driver_peak_rss_mb={line['ref_driver_peak_rss_mb']:.0f}", flush=True)
        # where our seconds went, by stage of the job (see the report's "stages")
        print(f"scale_stages rows={rows} " + " ".join(
            f"{stage}_s={seconds:.1f}" for stage, seconds in ours["stages"].items()), flush=True)
        results.append({**line, "stages": ours["stages"]})
    if len(results) > 1:
        first, last = results[0], results[-1]
        print(f"scale_rss_growth={last['driver_peak_rss_mb'] / first['driver_peak_rss_mb']:.2f} "
              f"({first['rows']} -> {last['rows']} rows) "
              f"scale_vs_ref={last['rows_per_s'] / last['ref_rows_per_s']:.2f} "
              f"(at {last['rows']} rows)", flush=True)
    if minhash_rows:
        subprocess.run([sys.executable, "-m", "raydag.bench_minhash", "--rows", str(minhash_rows)],
                       check=True, timeout=timeout_s)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raydag.bench scale",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)),
                        help="input rows per run, comma-separated (10000,100000,1000000)")
    parser.add_argument("--work", default=None, help="folder for inputs and outputs "
                        "(default: a fresh folder in the temp dir; several GB at 1M rows)")
    parser.add_argument("--minhash-rows", type=int, default=1_000_000,
                        help="rows of the MinHash pass alone (0: skip)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per driver run")
    parser.add_argument("--drive", help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=["ours", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.drive:
        _drive(args.drive, args.side, args.result)
        return 0
    import tempfile

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="raydag-bench-scale-"))
    sizes = [int(size) for size in args.sizes.split(",") if size]
    bench_scale(sizes, work, args.minhash_rows, args.timeout)
    print(f"[bench scale] inputs, outputs and logs in {work}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
