"""The run report: ``report.json`` (machine-readable), ``report.md`` and a printed table."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


class StageTimer:
    """Collects wall seconds per named stage and announces each stage as it starts."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        print(f"raydag: [{name}] ...", flush=True)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 2)
            print(f"raydag: [{name}] done in {self.seconds[name]:.1f}s", flush=True)


def students_table(students: dict[str, dict]) -> str:
    """A fixed-width table of the students' scores."""
    lines = [f"{'student':<10} {'train_examples':>14} {'accuracy':>9} {'macro_f1':>9}"]
    for name, m in students.items():
        lines.append(
            f"{name:<10} {m['train_examples']:>14} {m['accuracy']:>9.4f} {m['macro_f1']:>9.4f}"
        )
    return "\n".join(lines)


def _markdown(report: dict[str, Any]) -> str:
    counts, teacher = report["counts"], report["teacher"]
    dropped = ", ".join(f"{k}: {v}" for k, v in counts["dropped"].items()) or "none"
    quarantined = ", ".join(f"{k}: {v}" for k, v in counts["quarantined_by_reason"].items()) or "none"
    rows = [
        f"# raydag report: {report['job']}",
        "",
        "## Counts",
        f"- raw examples: {counts['raw']} (from a pool of {counts['pool']}; test split {counts['test']})",
        f"- requested {counts['requested']}, generated {counts['generated']}, "
        f"accepted {counts['accepted']}, quarantined {counts['quarantined']}, "
        f"dropped {sum(counts['dropped'].values())}",
        f"- dropped by reason: {dropped}",
        f"- quarantined by reason: {quarantined}",
        "",
        "## Teacher",
        f"- model: `{teacher['model']}` ({teacher['method']})",
        f"- tokens in {teacher['tokens_in']}, out {teacher['tokens_out']}, "
        f"{teacher['tokens_per_s']:.1f} output tokens/s",
        "",
        "## Students (test split)",
        "",
        "| student | train examples | accuracy | macro-F1 |",
        "|---|---:|---:|---:|",
    ]
    for name, m in report["students"].items():
        rows.append(f"| {name} | {m['train_examples']} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} |")
    rows += ["", "## Stages (wall seconds)", ""]
    rows += [f"- {name}: {sec:.1f}" for name, sec in report["stages"].items()]
    return "\n".join(rows) + "\n"


def write_report(output_dir: Path, report: dict[str, Any]) -> Path:
    """Write ``report.json`` and ``report.md``; return the path of ``report.json``."""
    path = output_dir / "report.json"
    path.write_text(json.dumps(report, indent=2, sort_keys=False))
    (output_dir / "report.md").write_text(_markdown(report))
    return path
