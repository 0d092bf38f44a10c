"""The student recipe against its baselines on benchmark datasets, with no teacher involved.

``python -m raydag.bench students`` (``make bench-students``) draws the seed study's raw sample
from each dataset's ``train`` split (100 rows, seeded, stratified by label), trains the raw
student once per seed with the job recipe (Ray Train + DeepSpeed, dev rows held out of the
sample; the ``student:`` settings of ``jobs/quickstart.yaml``, with ``student.*`` overrides), and prints, per dataset, the student's test accuracy
(mean ± standard deviation over seeds) beside the linear probe (frozen encoder + logistic
regression on the same rows) and the majority class, then a last line
``students_vs_probe=<name>:<mean student - mean probe>,...``.

Datasets are folders ``<name>/{train,test}.jsonl`` with ``text`` and ``label`` (and
``text_pair`` for pair tasks, joined to the text by the tokenizer's separator) under ``--data``
(default ``$RAYDAG_BENCH_DATA`` or ``../shared/data``); their labels are read from the rows.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = Path(os.environ.get("RAYDAG_BENCH_DATA", ROOT.parent / "shared" / "data"))


def read_split(path: Path, separator: str) -> pd.DataFrame:
    """``id``, ``text`` and ``label`` of a benchmark split (pairs joined by ``separator``)."""
    from raydag.data import raw_row_id

    rows = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                row = json.loads(line)
                text = row["text"] + (f" {separator} {row['text_pair']}" if row.get("text_pair") else "")
                rows.append({"id": raw_row_id(text, str(row["label"])), "text": text,
                             "label": str(row["label"])})
    return pd.DataFrame(rows)


def bench_students(datasets: list[str], data: Path, raw_examples: int, seeds: list[int],
                   overrides: list[str], max_test: int | None) -> dict[str, dict]:
    """Train and score the raw students of each dataset; print and return the summaries."""
    import ray
    from transformers import AutoTokenizer

    from raydag.config import load_job
    from raydag.data import stratified_sample
    from raydag.evaluate import summarise_students
    from raydag.models import resolve_model
    from raydag.resources import init_ray
    from raydag.resources import student_precision
    from raydag.train import fit_students, student_runs

    student = load_job(ROOT / "jobs" / "quickstart.yaml",
                       [f"student.seeds={seeds}", "student.train_sets=[raw]", *overrides]).student
    init_ray()
    student = student.model_copy(update={"precision": student_precision(
        student.precision, use_gpu=False)[0], "use_gpu": False})
    separator = AutoTokenizer.from_pretrained(resolve_model(student.model)).sep_token or "|"
    results = {}
    for name in datasets:
        train = read_split(data / name / "train.jsonl", separator)
        test = read_split(data / name / "test.jsonl", separator)
        if max_test and len(test) > max_test:
            test = stratified_sample(test, max_test, 0)
        labels = sorted(train["label"].unique())
        raw = stratified_sample(train, raw_examples, 0)
        started = time.time()
        with tempfile.TemporaryDirectory() as storage:
            summary = summarise_students(fit_students(
                student_runs(["raw"], raw, None, None, student), test, label_set=labels,
                student=student, storage_dir=storage, run_name=f"bench_{name}"))["raw"]
        summary["seconds"] = round(time.time() - started, 1)
        results[name] = summary
        print(f"{name}: raw student {summary['accuracy']:.4f} ± {summary['accuracy_std']:.4f} "
              f"(macro-F1 {summary['macro_f1']:.4f}), linear probe {summary['probe']['accuracy']:.4f} "
              f"± {summary['probe']['accuracy_std']:.4f}, majority {summary['majority']['accuracy']:.4f}; "
              f"best epochs {summary['best_epochs']}; {len(test)} test rows; "
              f"{summary['seconds']:.0f}s; flags {summary['flags'] or '-'}", flush=True)
    ray.shutdown()
    print("| dataset | raw student (mean ± sd) | linear probe (mean ± sd) | majority | student - probe |")
    print("|---|---:|---:|---:|---:|")
    for name, s in results.items():
        print(f"| {name} | {s['accuracy']:.4f} ± {s['accuracy_std']:.4f} | {s['probe']['accuracy']:.4f} "
              f"± {s['probe']['accuracy_std']:.4f} | {s['majority']['accuracy']:.4f} | "
              f"{s['accuracy'] - s['probe']['accuracy']:+.4f} |")
    print("students_vs_probe=" + ",".join(f"{name}:{s['accuracy'] - s['probe']['accuracy']:+.4f}"
                                          for name, s in results.items()))
    return results
