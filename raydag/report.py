"""The run report: ``report.json`` (machine-readable), ``report.md`` and a printed table."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


class StageTimer:
    """Collects wall seconds per named stage (summed over its runs) and announces each stage
    as it starts."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.current: str | None = None  # the stage running now

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        from raydag import console

        console.say(f"[{name}] ...")
        start, self.current = time.perf_counter(), name

        def spent() -> float:  # a stage that runs again (a loop's rounds) adds up
            elapsed = time.perf_counter() - start
            self.seconds[name] = round(self.seconds.get(name, 0.0) + elapsed, 2)
            return elapsed

        try:
            yield
        except BaseException:
            console.say(f"[{name}] stopped after {spent():.1f}s")
            raise
        console.say(f"[{name}] done in {spent():.1f}s")


def _plus_minus(mean: float, std: float, seeds: int) -> str:
    return f"{mean:.4f} ± {std:.4f}" if seeds > 1 else f"{mean:.4f}"


def students_table(students: dict[str, dict]) -> str:
    """A fixed-width table of the students' scores (mean ± standard deviation over seeds)
    next to their baselines, with their flags."""
    lines = [f"{'student':<10} {'train':>6} {'seeds':>5} {'accuracy':>17} {'macro_f1':>17} "
             f"{'probe':>7} {'majority':>8}  flags"]
    for name, m in students.items():
        n = len(m["seeds"])
        lines.append(
            f"{name:<10} {m['train_examples']:>6} {n:>5} "
            f"{_plus_minus(m['accuracy'], m['accuracy_std'], n):>17} "
            f"{_plus_minus(m['macro_f1'], m['macro_f1_std'], n):>17} "
            f"{m['probe']['accuracy']:>7.4f} {m['majority']['accuracy']:>8.4f}  "
            + (", ".join(m["flags"]) or "-"))
    return "\n".join(lines)


def _students_markdown(students: dict[str, dict], comparisons: list[dict]) -> list[str]:
    """The students' section: scores over seeds, baselines, flags, per-class F1, predicted
    labels, and the comparisons by more than the spread."""
    rows = ["| student | train / dev rows | seeds | accuracy | macro-F1 | linear probe | "
            "majority class | best epochs | flags |", "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for name, m in students.items():
        n = len(m["seeds"])
        rows.append(f"| {name} | {m['train_examples']} / {m['dev_examples']} | {n} | "
                    f"{_plus_minus(m['accuracy'], m['accuracy_std'], n)} | "
                    f"{_plus_minus(m['macro_f1'], m['macro_f1_std'], n)} | "
                    f"{_plus_minus(m['probe']['accuracy'], m['probe']['accuracy_std'], n)} | "
                    f"{m['majority']['accuracy']:.4f} ({m['majority']['label']}) | "
                    f"{', '.join(map(str, m['best_epochs']))} | {', '.join(m['flags']) or '-'} |")
    rows += ["", "Per-class F1 (mean over seeds) and predicted labels (summed over seeds):", ""]
    for name, m in students.items():
        rows.append(f"- {name}: F1 " + ", ".join(f"{y} {f:.3f}" for y, f in m["per_class_f1"].items())
                    + "; predicted " + ", ".join(f"{y} {c}" for y, c in m["predicted"].items()))
    if comparisons:
        rows += ["", "Comparisons (a difference within the spread over seeds is no difference):", ""]
        rows += [f"- {c['a']} - {c['b']}: {c['difference']:+.4f} (spread {c['spread']:.4f}): "
                 f"{c['verdict']}" for c in comparisons]
    return rows


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
        f"- bad input rows left out (data.on_bad_rows=skip): "
        f"{_bad_rows(report.get('input_bad_rows') or {})}",
        "",
        "## Teacher",
        f"- model: `{teacher['model']}` ({teacher['engine']}); steps: {', '.join(teacher['methods'])}",
        f"- dtype: {teacher.get('dtype') or '-'} ({teacher.get('dtype_reason', '-')}); student "
        f"precision: {(report.get('student_precision') or {}).get('precision', '-')} "
        f"({(report.get('student_precision') or {}).get('reason', '-')})",
        f"- requests {teacher['requests']}, tokens in {teacher['tokens_in']}, out "
        f"{teacher['tokens_out']}, {teacher['tokens_per_s']:.1f} output tokens/s",
        f"- engine starts: {teacher.get('engine_starts', '-')} "
        f"({teacher.get('engine_load_seconds', 0):.1f}s loading)",
        "- unusable generations (quarantined share of each step's generated rows): "
        + ("; ".join(f"{stage} {h['share']:.1%}" + (" **above the warning share**" if h["warn"] else "")
                     for stage, h in (teacher.get("generation_health") or {}).items()) or "-"),
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
    quality = report.get("quality") or {}
    if quality:
        near, decontam = quality.get("near_dup") or {}, quality.get("decontam") or {}
        rows += ["", "## Quality (details in datacard.md)",
                 f"- near-duplicates dropped: {near.get('near_duplicate_synthetic', 0)} within "
                 f"synthetic, {near.get('near_duplicate_raw', 0)} of raw rows",
                 f"- contaminated rows dropped: {decontam.get('matched', 0)} by "
                 f"{decontam.get('n', '-')}-grams, {decontam.get('embedding_matched', 0)} by embedding",
                 f"- PII redacted: teacher rows {_reasons(quality.get('pii_teacher_rows', {}))}; "
                 f"raw {_reasons(quality.get('pii_raw', {}))}"]
    if report["students"]:
        rows += ["", "## Students (test split)", ""]
        rows += _students_markdown(report["students"], report.get("student_comparisons", []))
    rows += ["", "## Stages (wall seconds)", ""]
    rows += [f"- {name}: {sec:.1f}" for name, sec in report["stages"].items()]
    return "\n".join(rows) + "\n"


def write_report(output_dir: Path, report: dict[str, Any]) -> Path:
    """Write ``report.json`` and ``report.md``; return the path of ``report.json``."""
    path = output_dir / "report.json"
    path.write_text(json.dumps(report, indent=2, sort_keys=False))
    (output_dir / "report.md").write_text(_markdown(report))
    return path


def write_partial_report(job, run_dir, counts: dict[str, Any], timer: StageTimer,
                         signal_name: str, started) -> Any:
    """The report of a job stopped by a signal, in the run folder and at the top of
    ``output_dir``: ``partial``, the stage it stopped in, and ``counts`` of the shards written
    so far (:meth:`raydag.teacher.TeacherProgress.counts`: they reconcile); a rerun resumes
    from those shards. Returns the top-level path."""
    from datetime import datetime, timezone

    from raydag import console
    from raydag.storage import copy_file, display, location

    report = {"job": job.name, "partial": True, "stopped_by": signal_name,
              "stopped_in": timer.current, "started_at": started.isoformat(timespec="seconds"),
              "stopped_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "output_dir": str(job.output_dir), "run_dir": str(run_dir),
              "counts": {k: v for k, v in counts.items() if k != "shards"},
              "shards": counts["shards"], "stages": timer.seconds, "log": console.log_path(),
              "resume": "rerun the same job: finished shards are kept"}
    report = json.loads(display(json.dumps(report)))  # no store credentials in a report
    path = run_dir / "report.json"
    path.write_text(json.dumps(report, indent=2))
    top = location(job.output_dir) / "report.json"
    copy_file(path, top)
    console.warn(f"stopped by {signal_name} in [{timer.current}]: {counts['shards']['finished']} "
                 f"of {counts['shards']['total']} shard(s) written ({counts['ran']} of "
                 f"{counts['planned']} rows); partial report {display(path)}")
    return top


def datacard(report: dict[str, Any]) -> dict[str, Any]:
    """The run's data card: where the data came from, how it was made, what every filter
    removed, and what the data looks like (diversity, shortcut risks, contamination, PII)."""
    config, counts, quality = report["config"], report["counts"], report.get("quality", {})
    data = config.get("data") or {}
    removed = {"dropped": counts["dropped"], "quarantined": counts["quarantined"]}
    filters = {
        "rules": config["filters"],
        "near_duplicates": quality.get("near_dup"),
        "decontamination": quality.get("decontam"),
        "label_consistency": quality.get("consistency"),
        "judge": [s for s in config["stages"] if s["type"] == "judge"],
        "coannotation": quality.get("coannotation"),
    }
    return {
        "name": report["job"],
        "run_dir": report["run_dir"],
        "signature": report["signature"],
        "created_at": report["finished_at"],
        "sources": {"train_path": data.get("train_path"), "test_path": data.get("test_path"),
                    "unlabelled_path": data.get("unlabelled_path"),
                    "eval_paths": config["quality"]["decontam"]["eval_paths"],
                    "labels": data.get("labels"), "task": data.get("task"),
                    "raw_examples": counts["raw"], "seed": config["seed"]},
        "input_bad_rows": report.get("input_bad_rows") or {"total": 0, "by_reason": {}, "rows": {}},
        "precision": {"teacher_dtype": report["teacher"].get("dtype"),
                      "teacher_dtype_reason": report["teacher"].get("dtype_reason"),
                      **{f"student_{k}": v for k, v in (report.get("student_precision") or {}).items()}},
        "teacher": {"model": report["teacher"]["model"], "engine": report["teacher"]["engine"],
                    "sampling": config["teacher"].get("sampling"),
                    "requests": report["teacher"]["requests"],
                    "tokens_in": report["teacher"]["tokens_in"],
                    "tokens_out": report["teacher"]["tokens_out"]},
        "methods": [s["type"] + (f":{s['method']}" if s.get("method") else "") for s in config["stages"]],
        "counts": {"planned": counts["planned"], "ran": counts["ran"], "created": counts["created"],
                   "accepted": counts["accepted"], **removed,
                   "per_stage": [{k: s[k] for k in ("stage", "rows_in", "created", "accepted",
                                                    "dropped", "quarantined")}
                                 for s in report["per_stage"]]},
        "filters": filters,
        "pii": {"teacher_rows": quality.get("pii_teacher_rows", {}), "raw": quality.get("pii_raw", {}),
                "types": config["quality"]["pii"]["types"] if config["quality"]["pii"]["enabled"] else []},
        "diversity": quality.get("diversity"),
        "bias": quality.get("bias"),
        "students": {name: {k: m[k] for k in ("accuracy", "accuracy_std", "macro_f1",
                                              "macro_f1_std", "seeds", "probe", "majority",
                                              "per_class_f1", "predicted", "flags",
                                              "train_examples", "dev_examples", "best_epochs")}
                     for name, m in report["students"].items()},
        "student_comparisons": report.get("student_comparisons", []),
    }


def _diversity_rows(diversity: dict[str, Any]) -> list[str]:
    rows = ["| group | rows | distinct-1 | distinct-2 | self-BLEU | embedding distance | labels |",
            "|---|---:|---:|---:|---:|---:|---|"]
    groups = {"all teacher rows": diversity["all"], **diversity.get("by_method", {})}
    if diversity.get("raw_examples"):
        groups["raw examples"] = diversity["raw_examples"]
    for name, d in groups.items():
        labels = ", ".join(f"{k} {v:.2f}" for k, v in d["label_distribution"].items())
        distance = "-" if d["embedding_cosine_distance"] is None else f"{d['embedding_cosine_distance']:.3f}"
        rows.append(f"| {name} | {d['rows']} | {d['distinct_1']:.3f} | {d['distinct_2']:.3f} | "
                    f"{d['self_bleu']:.3f} | {distance} | {labels} |")
    top = diversity["all"].get("top_ngrams") or []
    rows += ["", "Most repeated 3-grams (all rows): "
             + (", ".join(f"'{t['ngram']}' x{t['count']}" for t in top) or "none")]
    return rows


def _bad_rows(bad: dict[str, Any]) -> str:
    if not bad.get("total"):
        return "none"
    return "; ".join(f"{reason} {count} ({', '.join(bad['rows'].get(reason, [])[:5])}"
                     + (", ..." if count > 5 else "") + ")"
                     for reason, count in bad["by_reason"].items())


def _number(value: Any) -> str:
    return "-" if value is None else f"{float(value):.1f}"


def _datacard_markdown(card: dict[str, Any]) -> str:
    src, teacher, counts, filters = card["sources"], card["teacher"], card["counts"], card["filters"]
    rows = [f"# Data card: {card['name']}", "",
            f"Run `{card['run_dir']}` (signature `{card['signature']}`), {card['created_at']}.", "",
            "## Sources",
            f"- task: {src['task']}; labels: {src['labels']}",
            f"- raw examples: {src['raw_examples']} from `{src['train_path']}` (seed {src['seed']})",
            f"- evaluation splits: test `{src['test_path']}`"
            + "".join(f", {k} `{v}`" for k, v in (src["eval_paths"] or {}).items()),
            f"- bad input rows left out (data.on_bad_rows=skip): {_bad_rows(card['input_bad_rows'])}",
            "", "## Teacher and methods",
            f"- teacher `{teacher['model']}` ({teacher['engine']}); {teacher['requests']} requests, "
            f"{teacher['tokens_in']} tokens in, {teacher['tokens_out']} out",
            f"- stages: {', '.join(card['methods'])}",
            f"- precision: teacher {card['precision']['teacher_dtype'] or '-'} "
            f"({card['precision']['teacher_dtype_reason']}); students "
            f"{card['precision'].get('student_precision', '-')} "
            f"({card['precision'].get('student_reason', '-')})",
            "", "## Counts",
            f"- planned {counts['planned']}, ran {counts['ran']}, created {counts['created']}, "
            f"accepted {counts['accepted']}",
            f"- dropped: {_reasons(counts['dropped'])}",
            f"- quarantined: {_reasons(counts['quarantined'])}",
            "", "| stage | rows in | created | accepted | dropped | quarantined |",
            "|---|---:|---:|---:|---:|---:|"]
    for s in counts["per_stage"]:
        rows.append(f"| {s['stage']} | {s['rows_in']} | {s['created']} | {s['accepted']} | "
                    f"{_reasons(s['dropped'])} | {_reasons(s['quarantined'])} |")
    rows += ["", "## Filters", f"- rules: {filters['rules']}"]
    near = filters["near_duplicates"]
    if near:
        rows.append(f"- near-duplicates (MinHash, Jaccard >= {near.get('threshold')}): "
                    f"{near.get('near_duplicate_synthetic', 0)} within synthetic, "
                    f"{near.get('near_duplicate_raw', 0)} of raw rows"
                    + (f"; embedding (cosine >= {near['embedding_threshold']}): "
                       f"{near.get('embedding_duplicate_synthetic', 0)} within synthetic, "
                       f"{near.get('embedding_duplicate_raw', 0)} of raw rows"
                       if near.get("embedding_threshold") else ""))
    decontam = filters["decontamination"]
    if decontam:
        rows.append(f"- decontamination ({decontam.get('n')}-gram overlap with {decontam.get('splits')}): "
                    f"{decontam.get('matched', 0)} rows"
                    + (f"; embedding (cosine >= {decontam['embedding_threshold']}): "
                       f"{decontam.get('embedding_matched', 0)} rows"
                       if decontam.get("embedding_threshold") else ""))
        for ex in (decontam.get("examples") or []) + (decontam.get("embedding_examples") or []):
            rows.append(f"  - \"{ex['text']}\" ~ {ex['eval_split']}: \"{ex['eval_text']}\"")
    else:
        rows.append("- decontamination: off (no evaluation split)")
    if filters["label_consistency"]:
        c = filters["label_consistency"]
        rows.append(f"- label consistency (PVI under the raw student < {c['threshold']} bits): "
                    f"{c['dropped']} of {c['checked']} dropped; mean PVI {c['mean_pvi']}")
    for judge in filters["judge"]:
        rows.append(f"- judge filter: min_score {judge.get('min_score')}")
    if filters["coannotation"]:
        c = filters["coannotation"]
        rows.append(f"- co-annotation ({c['measure']}; accept < {c['accept_below']}, drop > "
                    f"{c['drop_above']}, human budget {c['human_budget']}): {c['routed']}; "
                    f"human labels merged {c['human_labels_merged']}; queue `{c['tasks_file']}`")
    pii = card["pii"]
    rows += ["", "## PII", f"- types redacted: {pii['types'] or 'none (off)'}",
             f"- in teacher rows: {_reasons(pii['teacher_rows'])}; in raw examples: {_reasons(pii['raw'])}"]
    if card["diversity"]:
        rows += ["", "## Diversity", ""] + _diversity_rows(card["diversity"])
    bias = card["bias"]
    if bias:
        rows += ["", "## Label shortcut risks",
                 f"- settings: {bias['settings']}; rows containing a flagged word of their label: "
                 f"{bias['flagged_rows']}"]
        for w in bias["shortcut_words"]:
            rows.append(f"  - '{w['word']}' -> {w['label']}: z {w['z_synthetic']:.1f} in synthetic "
                        f"vs {w['z_raw']:.1f} in raw; in {w['share_of_label_rows']:.0%} of the "
                        f"label's synthetic rows")
        for flag in bias["length"]["flags"]:
            rows.append(f"  - length shortcut: '{flag['label']}' rows average "
                        f"{float(flag['synthetic_mean']):.1f} words against {float(flag['others_mean']):.1f} "
                        f"for the other labels (gap {float(flag['synthetic_gap']):.2f} of the mean; "
                        f"raw {float(flag['raw_gap']):.2f})")
        rows.append("- text length by label (mean words, raw / synthetic): " + ", ".join(
            f"{label} {_number(v['raw_mean'])} / {_number(v['synthetic_mean'])}"
            for label, v in bias["length"]["by_label"].items()))
    if card["students"]:
        rows += ["", "## Students (test split)", ""]
        rows += _students_markdown(card["students"], card.get("student_comparisons", []))
    return "\n".join(rows) + "\n"


def write_datacard(output_dir: Path, report: dict[str, Any]) -> Path:
    """Write ``datacard.json`` and ``datacard.md``; return the path of ``datacard.json``."""
    card = datacard(report)
    path = output_dir / "datacard.json"
    path.write_text(json.dumps(card, indent=2, default=str))
    (output_dir / "datacard.md").write_text(_datacard_markdown(card))
    return path
