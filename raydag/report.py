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


def _reasons(reasons: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in reasons.items()) or "none"


def _markdown(report: dict[str, Any]) -> str:
    counts, teacher, shards = report["counts"], report["teacher"], report["shards"]
    rows = [
        f"# raydag report: {report['job']}",
        "",
        f"Run folder `{report['run_dir']}` (signature `{report['signature']}`).",
        "",
        "## Counts",
        f"- raw examples: {counts['raw']} (from a pool of {counts['pool']}; test split {counts['test']})",
        f"- first stage rows: planned {counts['planned']}, ran {counts['ran']}, left unrun by the "
        f"token budget {counts['not_run_budget']}; rows created by stages {counts['created']}",
        f"- accepted {counts['accepted']}, dropped {sum(counts['dropped'].values())}, "
        f"quarantined {sum(counts['quarantined'].values())}",
        f"- dropped by reason: {_reasons(counts['dropped'])}",
        f"- quarantined by reason: {_reasons(counts['quarantined'])}",
        f"- shards: {shards['total']} ({shards['resumed']} reused from an earlier run, "
        f"{shards['run']} run now, {shards['not_run']} not run)",
        "",
        "## Teacher",
        f"- model: `{teacher['model']}` ({teacher['engine']}); steps: {', '.join(teacher['methods'])}",
        f"- requests {teacher['requests']}, tokens in {teacher['tokens_in']}, out "
        f"{teacher['tokens_out']}, {teacher['tokens_per_s']:.1f} output tokens/s",
        "",
        "| stage | rows in | created | requests | tokens in | tokens out | accepted | dropped | quarantined |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in report["per_stage"]:
        rows.append(f"| {s['stage']} | {s['rows_in']} | {s['created']} | {s['requests']} | "
                    f"{s['tokens_in']} | {s['tokens_out']} | {s['accepted']} | "
                    f"{_reasons(s['dropped'])} | {_reasons(s['quarantined'])} |")
    budget, cost = report["budget"], report["cost"]
    rows += ["", "## Budget and cost",
             f"- budget: max_requests {budget['max_requests']}, max_tokens {budget['max_tokens']}; "
             f"tokens used {budget['tokens_used']}; exhausted: {budget['exhausted']}",
             f"- cost: {', '.join(f'{k} {v}' for k, v in cost.items())}"]
    if report["students"]:
        rows += ["", "## Students (test split)", "",
                 "| student | train examples | accuracy | macro-F1 |", "|---|---:|---:|---:|"]
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
