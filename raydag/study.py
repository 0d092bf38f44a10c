"""The seed study as one command: a grid of ordinary jobs, then tables, plots and findings.

``raydag study jobs/study.yaml`` expands datasets x creation methods (zero-shot, zero-shot
topic, one-shot, few-shot k) into cells, adds the sweeps of one method over the number of
synthetic (M) and raw (N) examples, and the teacher as a classifier on the test split (the
label operator, zero- and few-shot). Each cell is an ordinary job: its ``job.yaml`` is written
under ``output_dir/cells/<cell>/`` (``raydag run`` reruns it by hand) and its report lies
beside it. A cell whose report matches its job is skipped, so a stopped study goes on where it
stopped; the teacher's shards of a half-done cell are reused too. Cells run in turn in this
process, or with ``parallel_cells: K`` up to K side by side as Ray tasks on the study driver's
node (on a cluster, each cell's engines and students spread over the nodes as usual).

The raw student does not depend on the creation method: it is trained once per dataset and
raw size (in the first method's cell), so the other cells train only synthetic and mixed.

Then ``study.json`` (every number), ``study.md`` (tables, time per cell, and a verdict with
the numbers for each finding of the seed study) and PNG plots are written to ``output_dir``.

Example:
    >>> from raydag.config import load_study
    >>> from raydag.study import plan_cells
    >>> cells = plan_cells(load_study("jobs/study.yaml"))  # doctest: +SKIP
"""

from __future__ import annotations

import fnmatch
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from raydag import console
from raydag.config import StudyConfig, load_job
from raydag.errors import ConfigError, DataError, RaydagError

TRAIN_ORDER = ("raw", "synthetic", "mixed")


@dataclass(frozen=True)
class Cell:
    """One job of the grid: a creation method at a size (``kind="create"``), or the teacher
    labelling the test sample with ``shots`` demonstrations per label (``kind="teacher"``)."""

    name: str
    dataset: str
    kind: str
    method: str = ""
    num_examples: int = 0
    raw_examples: int = 0
    train_sets: tuple[str, ...] = ()
    shots: int = 0


def create_settings(method: str) -> tuple[str, int]:
    """The create stage's ``method`` and ``shots`` of a study method name (``few_shot_5``)."""
    if method.startswith("few_shot_"):
        return "few_shot", int(method.removeprefix("few_shot_"))
    return method, 1 if method == "one_shot" else 3


def _cell_name(dataset: str, method: str, num_examples: int, raw_examples: int) -> str:
    return f"{dataset}.{method}.m{num_examples}.n{raw_examples}"


def plan_cells(study: StudyConfig) -> list[Cell]:
    """Every cell of the study, in the order they run; equal cells of the grid and the sweeps
    are one cell that trains the union of their students."""
    wanted: dict[str, dict[str, Any]] = {}

    def want(dataset: str, method: str, m: int, n: int, train_sets) -> None:
        name = _cell_name(dataset, method, m, n)
        cell = wanted.setdefault(name, {"dataset": dataset, "method": method, "m": m, "n": n,
                                        "train": set()})
        cell["train"].update(train_sets)

    main_sets = [s for s in study.train_sets if s != "raw"]
    creation = [m for m in study.methods if m != "loop"]
    for dataset in study.datasets:
        for method in study.methods:  # the loop trains its mixed students (and its baseline's)
            want(dataset, method, study.num_examples, study.raw_examples,
                 ["mixed"] if method == "loop" else main_sets)
        for m in study.sweep.num_examples:
            want(dataset, study.sweep.method, m, study.raw_examples, study.sweep.num_examples_train_sets)
        for n in study.sweep.raw_examples:
            want(dataset, study.sweep.method, study.num_examples, n, study.sweep.raw_examples_train_sets)
        if "raw" in study.train_sets and creation:  # once per dataset: it ignores the method
            main = [_cell_name(dataset, m, study.num_examples, study.raw_examples) for m in creation]
            if not any("raw" in wanted[name]["train"] for name in main):
                wanted[main[0]]["train"].add("raw")
    cells = [Cell(name=name, dataset=c["dataset"], kind="create", method=c["method"],
                  num_examples=c["m"], raw_examples=c["n"],
                  train_sets=tuple(s for s in TRAIN_ORDER if s in c["train"]))
             for name, c in wanted.items()]
    if study.teacher_eval is not None:
        cells += [Cell(name=f"{dataset}.teacher.{k}shot", dataset=dataset, kind="teacher",
                       raw_examples=study.raw_examples, shots=k)
                  for dataset in study.datasets for k in study.teacher_eval.shots]
    order = list(study.datasets)  # one dataset after the other, so a partial study is whole per dataset
    return sorted(cells, key=lambda cell: order.index(cell.dataset))


# --------------------------------------------------------------------------- data and jobs

def _read_rows(path: Path, separator: str) -> list[dict]:
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: not found (a study dataset folder needs train.jsonl and test.jsonl)") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text = str(row["text"]) + (f" {separator} {row['text_pair']}" if row.get("text_pair") else "")
            rows.append({"text": text, "label": str(row["label"])})
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataError(f"{path}:{number}: not a row with 'text' and 'label' ({err})") from None
    return rows


def _write_if_changed(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")


def _stratified(rows: list[dict], n: int | None, seed: int) -> list[dict]:
    from raydag.data import stratified_sample

    if n is None or n >= len(rows):
        return rows
    frame = pd.DataFrame(rows)
    frame["id"] = [f"{i:08d}" for i in range(len(frame))]
    sample = stratified_sample(frame, n, seed).sort_values("id")
    return sample[["text", "label"]].to_dict("records")


def prepare_data(study: StudyConfig) -> dict[str, dict[str, Any]]:
    """Per dataset: the files the cells read (pairs joined into one text, the capped test
    split, the teacher's test sample, and for a loop steered by uncertainty the train split's
    texts, without labels, as its unlabelled pool), written under ``output_dir/data/<name>/`` only when
    their content changes (so the cells' input digests, and their resume, hold), and the labels."""
    prepared = {}
    for name, spec in study.datasets.items():
        source = Path(spec.path)
        train = _read_rows(source / "train.jsonl", spec.pair_separator)
        test = _read_rows(source / "test.jsonl", spec.pair_separator)
        labels = list(spec.labels) if spec.labels else sorted({r["label"] for r in train})
        folder = Path(study.output_dir) / "data" / name
        folder.mkdir(parents=True, exist_ok=True)
        test = _stratified(test, study.max_test_examples, study.seed)
        files = {"train": folder / "train.jsonl", "test": folder / "test.jsonl"}
        _write_if_changed(files["train"], train)
        _write_if_changed(files["test"], test)
        if "loop" in study.methods and "uncertainty" in study.loop.strategies:
            files["pool"] = folder / "pool.jsonl"  # the train split's texts, never its labels
            _write_if_changed(files["pool"], [{"text": row["text"]} for row in train])
        if study.teacher_eval is not None:
            files["teacher_eval"] = folder / "teacher_eval.jsonl"
            _write_if_changed(files["teacher_eval"],
                              _stratified(test, study.teacher_eval.max_examples, study.seed))
        prepared[name] = {"files": {k: str(v) for k, v in files.items()}, "labels": labels,
                          "task": spec.task, "train_rows": len(train), "test_rows": len(test)}
    return prepared


def cell_job_tree(study: StudyConfig, base: dict[str, Any], cell: Cell,
                  data: dict[str, Any]) -> dict[str, Any]:
    """The job of one cell: the base job with this cell's data, stage, sizes and students."""
    tree = json.loads(json.dumps(base))
    tree["name"] = f"{study.name}:{cell.name}"
    tree["output_dir"] = "output"
    tree["seed"] = study.seed
    tree["raw_examples"] = cell.raw_examples
    tree["data"] = {**tree.get("data", {}), "train_path": data["files"]["train"],
                    "test_path": data["files"]["test"], "labels": data["labels"],
                    "task": data["task"], "text_column": "text", "label_column": "label",
                    "dev_path": None, "unlabelled_path": None}
    first = next((s for s in base.get("stages", []) if s.get("type") == "create"), {})
    if cell.kind == "teacher":
        tree["stages"] = [{"type": "label", "mode": "annotate", "shots": cell.shots}]
        tree["data"]["unlabelled_path"] = data["files"]["teacher_eval"]
        tree.setdefault("quality", {}).setdefault("decontam", {})["enabled"] = False  # it labels test texts
        # Scored by joining its rows to the gold labels by text: redacting a name in a row
        # would lose that row from the score (98 of 500 AG News rows were lost so).
        tree["quality"].setdefault("pii", {})["enabled"] = False
        tree["student"]["train_sets"] = []
    else:
        loop = cell.method == "loop"
        method, shots = create_settings(study.loop.method if loop else cell.method)
        stage = {"type": "create", "method": method, "shots": shots,
                 "num_examples": cell.num_examples}
        for key in ("sampling", "examples_per_request", "num_topics"):
            if key in first:
                stage[key] = first[key]
        tree["stages"] = [stage]
        tree["student"]["train_sets"] = list(cell.train_sets)
        tree["student"]["seeds"] = list(study.seeds)
        if loop:
            tree["loop"] = json.loads(study.loop.model_dump_json(exclude={"method"}))
            if "pool" in data["files"]:  # uncertainty's unlabelled pool: the train split's texts
                tree["data"]["unlabelled_path"] = data["files"]["pool"]
    return tree


def _base_tree(study: StudyConfig) -> dict[str, Any]:
    """The base job with the study's overrides, as a tree the cells start from."""
    base = json.loads(load_job(study.job, study.overrides).model_dump_json())
    base.pop("name", None)
    return base


def cell_job(study: StudyConfig, cell: Cell, base: dict, data: dict):
    """Write the cell's ``job.yaml`` and load it as an ordinary job."""
    folder = Path(study.output_dir) / "cells" / cell.name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.yaml"
    text = (f"# Cell {cell.name} of study '{study.name}', written by `raydag study`; "
            f"`raydag run {path}` reruns it.\n"
            + yaml.safe_dump(cell_job_tree(study, base, cell, data), sort_keys=False))
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return load_job(path)


def finished_report(job) -> dict | None:
    """The cell's report if it ran with this job (:func:`raydag.config.ran_as`), else None."""
    from raydag.config import ran_as

    path = Path(job.output_dir) / "report.json"
    try:
        report = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return report if ran_as(report.get("config"), job) else None


# --------------------------------------------------------------------------- running

def select_cells(cells: list[Cell], only: list[str] | tuple[str, ...] = ()) -> list[Cell]:
    """The cells whose names match one of the ``only`` globs (all cells when none is given).

    Raises:
        ConfigError: A glob matches no cell (the message lists the cell names).
    """
    if not only:
        return cells
    unmatched = [g for g in only if not any(fnmatch.fnmatchcase(c.name, g) for c in cells)]
    if unmatched:
        raise ConfigError(f"--only {', '.join(unmatched)} matches no cell of the study; cells: "
                          + ", ".join(c.name for c in cells))
    return [c for c in cells if any(fnmatch.fnmatchcase(c.name, g) for g in only)]


def run_study(study: StudyConfig, run: bool = True, only: list[str] | tuple[str, ...] = ()) -> Path:
    """Run every cell not yet finished, in turn, writing study.json, study.md and the plots
    after each one (so a stopped study's outputs cover the cells it finished).

    A failed cell is recorded (with its error) and the study goes on with the others.

    Args:
        study: The study.
        run: False: run nothing, only write the outputs from the cells finished so far.
        only: Globs over cell names (e.g. ``agnews.*``): run only the matching cells. The
            outputs still cover every finished cell of the study.

    Returns:
        The path of ``study.json``.
    """
    from raydag.outputs import claim_output_dir
    from raydag.pipeline import run_job

    out = claim_output_dir(study.output_dir)
    cells = plan_cells(study)
    data = prepare_data(study)
    base = _base_tree(study)
    jobs = {cell.name: cell_job(study, cell, base, data[cell.dataset]) for cell in cells}
    todo = ([c for c in select_cells(cells, only) if finished_report(jobs[c.name]) is None]
            if run else [])
    console.say(f"study '{study.name}': {len(cells)} cells, "
                f"{sum(finished_report(j) is not None for j in jobs.values())} finished, "
                f"{len(todo)} to run; cells in {out / 'cells'}")
    failed: dict[str, str] = {}
    started = time.time()
    position = {cell.name: index for index, cell in enumerate(todo, start=1)}

    def starting(cell: Cell) -> None:
        console.say(f"[study {position[cell.name]}/{len(todo)}] {cell.name}: "
                    + (f"teacher labels the test sample, {cell.shots} shot(s) per label"
                       if cell.kind == "teacher" else
                       f"{cell.method}, M={cell.num_examples}, N={cell.raw_examples}, students "
                       f"{', '.join(cell.train_sets) or '-'} x seeds {study.seeds}"))

    def finished(cell: Cell, error: str | None) -> None:
        if error is not None:
            failed[cell.name] = error
            console.warn(f"study cell {cell.name} failed: {error} (the study goes on)")
        write_outputs(study, cells, jobs, data, failed, out)
        console.say(f"[study {position[cell.name]}/{len(todo)}] {cell.name} "
                    f"{'failed' if error is not None else 'done'}; "
                    f"{(time.time() - started) / 60:.1f} min so far; "
                    f"{out / 'study.md'} covers the finished cells")

    if study.parallel_cells > 1 and len(todo) > 1:
        run_cells_side_by_side(todo, jobs, study.parallel_cells, starting, finished)
    else:
        for cell in todo:
            starting(cell)
            try:
                run_job(jobs[cell.name])
            except RaydagError as err:
                finished(cell, str(err).splitlines()[0])
            else:
                finished(cell, None)
    path = write_outputs(study, cells, jobs, data, failed, out)
    if failed:
        raise RaydagError(f"{len(failed)} of {len(cells)} study cell(s) failed: "
                          + "; ".join(f"{k}: {v}" for k, v in failed.items())
                          + ". study.json and study.md cover the others; rerun to retry them")
    return path


def _cell_error(err: BaseException) -> str:
    """The first line of a cell's failure: raydag's own message, else the exception's type and
    its last line (the traceback is in the cell's log)."""
    cause = getattr(err, "cause", None) or err  # a Ray task error carries the cell's exception
    if isinstance(cause, RaydagError):
        return (str(cause).splitlines() or [type(cause).__name__])[0]
    last = (str(cause).strip().splitlines() or [""])[-1][:300]
    return f"{type(cause).__name__}: {last}"


def run_cells_side_by_side(todo: list[Cell], jobs: dict, parallel: int, starting, finished) -> None:
    """Run the cells as Ray tasks, at most ``parallel`` at a time, calling ``starting(cell)``
    as each is submitted and ``finished(cell, error_or_None)`` as each ends.

    A cell task is the driver of an ordinary job (:func:`raydag.pipeline.run_job`): it asks for
    no CPU of its own (its engines and training workers ask for theirs) and is pinned to this
    node, where the study's output folder is; its library output goes to the cell's
    ``output/logs/``. A failed cell does not stop the others; a cell is never retried (a rerun
    of the study resumes it from its finished shards). On Ctrl-C the cells in flight are
    cancelled and their finished shards kept.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from raydag.resources import init_ray

    init_ray()
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    run_cell = ray.remote(num_cpus=0, max_retries=0)(_run_cell)
    queue, running = list(todo), {}
    try:
        while queue or running:
            while queue and len(running) < parallel:
                cell = queue.pop(0)
                starting(cell)
                task = run_cell.options(name=f"study-cell:{cell.name}", scheduling_strategy=here)
                running[task.remote(jobs[cell.name])] = cell
            ready, _ = ray.wait(list(running), num_returns=1)
            cell = running.pop(ready[0])
            try:
                ray.get(ready[0])
            except Exception as err:  # the cell's own error, or its worker's death
                finished(cell, _cell_error(err))
            else:
                finished(cell, None)
    finally:
        for ref in running:  # interrupted: stop the cells in flight (their shards are kept)
            ray.cancel(ref, force=True)


def _run_cell(job) -> str:
    """One cell in a Ray task: the job's library output goes to its own log, as with ``raydag run``."""
    from raydag.outputs import claim_output_dir
    from raydag.pipeline import run_job

    with console.capture(console.new_log_file(claim_output_dir(job.output_dir), "run")):
        return str(run_job(job))


def write_outputs(study: StudyConfig, cells: list[Cell], jobs: dict, data: dict,
                  failed: dict[str, str], out: Path) -> Path:
    """study.json, the plots and study.md from the cells finished so far."""
    summary = collect(study, cells, jobs, data, failed)
    summary["plots"] = write_plots(summary, out)
    path = out / "study.json"
    path.write_text(json.dumps(summary, indent=2, sort_keys=False))
    (out / "study.md").write_text(study_markdown(summary))
    return path


# --------------------------------------------------------------------------- collecting

def _student(summary: dict) -> dict:
    return {"accuracy": summary["accuracy"], "accuracy_std": summary["accuracy_std"],
            "macro_f1": summary["macro_f1"], "macro_f1_std": summary["macro_f1_std"],
            "probe": summary["probe"]["accuracy"], "probe_std": summary["probe"].get("accuracy_std", 0.0),
            "majority": summary["majority"]["accuracy"], "seeds": summary["seeds"],
            "train_examples": summary["train_examples"], "flags": summary["flags"]}


def teacher_accuracy(report: dict, eval_path: str, labels: list[str]) -> dict[str, Any]:
    """Accuracy and macro-F1 of the teacher's labels (the cell's accepted rows) against the
    gold labels of the test sample, joined by text."""
    from raydag.evaluate import accuracy, confusion_matrix, macro_f1

    gold = pd.read_json(eval_path, lines=True, dtype=False)
    gold_by_text = dict(zip(gold["text"], gold["label"]))
    path = report["outputs"].get("synthetic")
    rows = pd.read_parquet(path, columns=["text", "label"]) if path and Path(path).exists() \
        else pd.DataFrame(columns=["text", "label"])
    rows = rows[rows["text"].isin(gold_by_text)]
    index = {label: i for i, label in enumerate(labels)}
    matrix = confusion_matrix([index[gold_by_text[t]] for t in rows["text"]],
                              [index[p] for p in rows["label"]], len(labels))
    majority = float(gold["label"].value_counts(normalize=True).max())
    return {"accuracy": round(accuracy(matrix), 4), "macro_f1": round(macro_f1(matrix), 4),
            "rows": len(gold), "labelled": int(matrix.sum()), "majority": round(majority, 4)}


def loop_record(report: dict) -> dict[str, Any]:
    """A loop cell's numbers: per round the teacher tokens so far and the mixed student, the
    one-pass baseline and the verdict (see :mod:`raydag.loop`)."""
    rounds = [{"round": r["round"], "teacher_tokens": r["teacher_tokens"], "accepted": r["accepted"],
               "cross_round_duplicates": r["cross_round_duplicates"], "mixed": _student(r["student"]),
               "steered": r["steering"]["steer"], "hard_examples": len(r["steering"]["hard_examples"]),
               "uncertain": len(r["steering"].get("uncertain", []))}
              for r in report["rounds"]]
    record = {"rounds": rounds, "mixed": rounds[-1]["mixed"], "teacher_tokens": report["teacher_tokens"],
              "accepted": sum(r["accepted"] for r in rounds), "strategies": report["loop"]["strategies"]}
    if "one_pass" in report:
        one = report["one_pass"]
        record["one_pass"] = {"teacher_tokens": one["teacher_tokens"], "accepted": one["accepted"],
                              "mixed": _student(one["student"])}
        record["comparison"] = report["comparison"]
    return record


def _cell_record(cell: Cell, report: dict | None, error: str | None) -> dict:
    record = {**asdict(cell), "train_sets": list(cell.train_sets)}
    if report is None:
        return {**record, "status": "failed" if error else "missing", "error": error}
    seconds = (pd.Timestamp(report["finished_at"]) - pd.Timestamp(report["started_at"])).total_seconds()
    return {**record, "status": "done", "seconds": seconds, "stages": _stage_seconds(report),
            "report": str(Path(report["output_dir"]) / "report.json")}


def _stage_seconds(report: dict) -> dict[str, float]:
    """Seconds per stage of a cell: a job's own; for a loop, its own stages (the students of
    every round) plus those of its round jobs and its one-pass baseline."""
    from raydag.loop import UNCERTAIN

    if "rounds" not in report:
        return report["stages"]
    total: dict[str, float] = dict(report["stages"])
    paths = [r["report"] for r in report["rounds"]] + ([report["one_pass"]["report"]] if "one_pass" in report else [])
    paths += [str(Path(p).parent / UNCERTAIN / "report.json") for p in paths[:len(report["rounds"])]]
    for path in map(Path, paths):
        if path.exists():
            for stage, value in json.loads(path.read_text())["stages"].items():
                total[stage] = round(total.get(stage, 0.0) + value, 2)
    return total


def collect(study: StudyConfig, cells: list[Cell], jobs: dict, data: dict,
            failed: dict[str, str]) -> dict[str, Any]:
    """Every cell's numbers, by dataset: the main grid, the sweeps and the teacher; plus the
    findings (see :func:`findings`)."""
    reports = {c.name: finished_report(jobs[c.name]) for c in cells}
    datasets: dict[str, dict] = {}
    for name in study.datasets:
        datasets[name] = {"labels": data[name]["labels"], "train_rows": data[name]["train_rows"],
                          "test_rows": data[name]["test_rows"], "raw": None, "methods": {}, "loop": None,
                          "num_examples": {}, "raw_examples": {}, "teacher": {}}
    for cell in cells:
        report, ds = reports[cell.name], datasets[cell.dataset]
        if report is None:
            continue
        if cell.kind == "teacher":
            ds["teacher"][str(cell.shots)] = teacher_accuracy(
                report, data[cell.dataset]["files"]["teacher_eval"], data[cell.dataset]["labels"])
            continue
        if cell.method == "loop":
            ds["loop"] = loop_record(report)
            ds["methods"]["loop"] = {"mixed": ds["loop"]["mixed"], "accepted": ds["loop"]["accepted"],
                                     "teacher_tokens": ds["loop"]["teacher_tokens"], "distinct_2": None,
                                     "embedding_distance": None, "self_bleu": None}
            continue
        students = {k: _student(v) for k, v in report["students"].items()}
        main_size = cell.num_examples == study.num_examples and cell.raw_examples == study.raw_examples
        if main_size and "raw" in students:
            ds["raw"] = students["raw"]
        if main_size and cell.method in study.methods:
            diversity = report["quality"].get("diversity", {}).get("all", {})
            ds["methods"][cell.method] = {
                **{k: students[k] for k in students if k != "raw"},
                "accepted": report["counts"]["accepted"],
                "teacher_tokens": report["teacher"]["tokens_in"] + report["teacher"]["tokens_out"],
                "distinct_2": diversity.get("distinct_2"),
                "embedding_distance": diversity.get("embedding_cosine_distance"),
                "self_bleu": diversity.get("self_bleu")}
        if cell.method == study.sweep.method:
            if cell.raw_examples == study.raw_examples and cell.num_examples in study.sweep.num_examples:
                ds["num_examples"][str(cell.num_examples)] = {
                    **{k: students[k] for k in study.sweep.num_examples_train_sets if k in students},
                    "accepted": report["counts"]["accepted"]}
            if cell.num_examples == study.num_examples and cell.raw_examples in study.sweep.raw_examples:
                ds["raw_examples"][str(cell.raw_examples)] = {
                    k: students[k] for k in study.sweep.raw_examples_train_sets if k in students}
    summary = {"study": study.name, "written_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "host": _host(), "settings": json.loads(study.model_dump_json()),
               "cells": [_cell_record(c, reports[c.name], failed.get(c.name)) for c in cells],
               "datasets": datasets}
    summary["findings"] = findings(summary)
    return summary


def _host() -> dict[str, Any]:
    import os
    import platform

    model = platform.processor()
    flags = ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), model)
        flags = next((l for l in info.splitlines() if l.startswith("flags")), "")
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags.split(),
            "amx_bf16": "amx_bf16" in flags.split()}


# --------------------------------------------------------------------------- findings

FINDINGS = {
    "mixing_helps_most_with_little_raw":
        "Mixing raw and synthetic data helps most when there is little raw data.",
    "zero_shot_topic_most_diverse": "Zero-shot topic generation gives the most diverse data.",
    "diversity_goes_with_accuracy": "More diverse synthetic data goes with better students.",
    "teacher_accuracy_does_not_predict_student":
        "The teacher's own accuracy does not predict the student's accuracy.",
    "diminishing_returns": "Returns diminish as the number of synthetic examples grows (the "
                           "seed study: beyond ~1000).",
}


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None with < 3 points or no spread."""
    if len(x) < 3:
        return None
    rx, ry = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return None
    return round(float(np.corrcoef(rx, ry)[0, 1]), 3)


def _spread(a: dict, b: dict) -> float:
    return float(math.hypot(a["accuracy_std"], b["accuracy_std"]))


def _overall(verdicts: list[str]) -> str:
    tested = [v for v in verdicts if v != "not tested"]
    if not tested:
        return "not tested"
    if all(v == "held" for v in tested):
        return "held"
    if not any(v == "held" for v in tested):
        return "did not hold"
    return "mixed"


def findings(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """For each finding of the seed study: per dataset the numbers and a verdict (``held``,
    ``did not hold``, ``not tested``), and an overall verdict (``mixed`` when datasets disagree).
    A difference within the spread over seeds never counts as a gain."""
    datasets = summary["datasets"]
    out = []

    # 1. Mixing helps most with little raw data: mixed - raw at the smallest N beats the spread
    #    and is larger than at the largest N.
    per = {}
    for name, ds in datasets.items():
        sizes = sorted((int(n), v) for n, v in ds["raw_examples"].items() if "raw" in v and "mixed" in v)
        gains = [{"raw_examples": n, "raw": v["raw"]["accuracy"], "mixed": v["mixed"]["accuracy"],
                  "gain": round(v["mixed"]["accuracy"] - v["raw"]["accuracy"], 4),
                  "spread": round(_spread(v["mixed"], v["raw"]), 4)} for n, v in sizes]
        if len(gains) < 2:
            per[name] = {"verdict": "not tested", "why": "needs sweep.raw_examples with 2+ sizes", "gains": gains}
            continue
        small, large = gains[0], gains[-1]
        held = small["gain"] > small["spread"] and small["gain"] > large["gain"]
        per[name] = {"verdict": "held" if held else "did not hold", "gains": gains}
    out.append({"id": "mixing_helps_most_with_little_raw", "per_dataset": per})

    # 2. Zero-shot topic is the most diverse method (distinct-2 and embedding distance).
    per = {}
    for name, ds in datasets.items():
        methods = {m: v for m, v in ds["methods"].items() if v.get("distinct_2") is not None}
        if "zero_shot_topic" not in methods or len(methods) < 2:
            per[name] = {"verdict": "not tested", "why": "needs zero_shot_topic and another method"}
            continue
        top = {measure: max(methods, key=lambda m: methods[m][measure])
               for measure in ("distinct_2", "embedding_distance")}
        hits = [m == "zero_shot_topic" for m in top.values()]
        per[name] = {"verdict": "held" if all(hits) else "did not hold", "most_diverse": top,
                     "partly": any(hits) and not all(hits),
                     "values": {m: {"distinct_2": v["distinct_2"], "embedding_distance": v["embedding_distance"]}
                                for m, v in methods.items()}}
    out.append({"id": "zero_shot_topic_most_diverse", "per_dataset": per})

    # 3. More diversity goes with better synthetic students: Spearman over methods > 0 on both measures.
    per = {}
    for name, ds in datasets.items():
        methods = {m: v for m, v in ds["methods"].items()
                   if v.get("distinct_2") is not None and "synthetic" in v}
        accs = [v["synthetic"]["accuracy"] for v in methods.values()]
        rho = {measure: spearman([v[measure] for v in methods.values()], accs)
               for measure in ("distinct_2", "embedding_distance")}
        if any(r is None for r in rho.values()):
            per[name] = {"verdict": "not tested", "why": "needs 3+ methods with synthetic students", "spearman": rho}
            continue
        per[name] = {"verdict": "held" if all(r > 0 for r in rho.values()) else "did not hold",
                     "spearman": rho, "methods": len(methods)}
    out.append({"id": "diversity_goes_with_accuracy", "per_dataset": per})

    # 4. Teacher accuracy does not predict student accuracy: across datasets, the teacher's
    #    accuracy above the majority class against the synthetic students' (mean over methods).
    points = {}
    for name, ds in datasets.items():
        synthetic = [v["synthetic"]["accuracy"] for v in ds["methods"].values() if "synthetic" in v]
        if ds["teacher"] and synthetic:
            best = max(ds["teacher"].values(), key=lambda t: t["accuracy"])
            majority = (ds["raw"] or {}).get("majority", best["majority"])
            points[name] = {"teacher": best["accuracy"], "teacher_over_majority": round(best["accuracy"] - best["majority"], 4),
                            "student": round(float(np.mean(synthetic)), 4),
                            "student_over_majority": round(float(np.mean(synthetic)) - majority, 4),
                            "student_beats_teacher": float(np.mean(synthetic)) > best["accuracy"]}
    rho = spearman([p["teacher_over_majority"] for p in points.values()],
                   [p["student_over_majority"] for p in points.values()])
    verdict = "not tested" if rho is None else ("held" if rho < 0.5 else "did not hold")
    out.append({"id": "teacher_accuracy_does_not_predict_student", "points": points, "spearman": rho,
                "overall": verdict, "why": "needs the teacher and synthetic students on 3+ datasets"
                if rho is None else "held when Spearman(teacher, student) over datasets < 0.5"})

    # 5. Diminishing returns: the gain per doubling of M in the last interval of the sweep is
    #    smaller than in the first, and the last one is within the spread.
    per = {}
    for name, ds in datasets.items():
        curve = sorted((int(m), v["synthetic"]) for m, v in ds["num_examples"].items() if "synthetic" in v)
        if len(curve) < 3:
            per[name] = {"verdict": "not tested", "why": "needs sweep.num_examples with 3+ sizes"}
            continue
        def slope(a, b):
            return (b[1]["accuracy"] - a[1]["accuracy"]) / math.log2(b[0] / a[0])
        first, last = slope(curve[0], curve[1]), slope(curve[-2], curve[-1])
        last_gain = curve[-1][1]["accuracy"] - curve[-2][1]["accuracy"]
        held = last < first and abs(last_gain) <= _spread(curve[-1][1], curve[-2][1])
        per[name] = {"verdict": "held" if held else "did not hold",
                     "curve": {m: round(v["accuracy"], 4) for m, v in curve},
                     "gain_per_doubling_first": round(first, 4), "gain_per_doubling_last": round(last, 4),
                     "last_gain": round(last_gain, 4), "last_spread": round(_spread(curve[-1][1], curve[-2][1]), 4),
                     "largest_m": curve[-1][0]}
    out.append({"id": "diminishing_returns", "per_dataset": per})

    for item in out:
        item["finding"] = FINDINGS[item["id"]]
        if "per_dataset" in item:
            item["overall"] = _overall([v["verdict"] for v in item["per_dataset"].values()])
    return out


# --------------------------------------------------------------------------- plots and markdown

def write_plots(summary: dict[str, Any], out: Path) -> list[str]:
    """The study's PNG plots; returns their file names (a plot without data is not drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = summary["datasets"]
    names = list(datasets)
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)

    with_methods = [n for n in names if datasets[n]["methods"]]
    if with_methods:
        fig, axes = plt.subplots(1, len(with_methods), figsize=(5.5 * len(with_methods), 4), squeeze=False)
        for ax, name in zip(axes[0], with_methods):
            ds = datasets[name]
            methods = list(ds["methods"])
            x = np.arange(len(methods))
            for offset, (train_set, color) in zip((-0.2, 0.2), (("synthetic", "tab:orange"), ("mixed", "tab:green"))):
                values = [ds["methods"][m].get(train_set) for m in methods]
                ax.bar(x + offset, [v["accuracy"] if v else 0 for v in values], 0.4,
                       yerr=[v["accuracy_std"] if v else 0 for v in values], capsize=3,
                       color=color, label=train_set)
            if ds["raw"]:
                raw = ds["raw"]
                ax.axhline(raw["accuracy"], color="tab:blue", label="raw")
                ax.axhspan(raw["accuracy"] - raw["accuracy_std"], raw["accuracy"] + raw["accuracy_std"],
                           color="tab:blue", alpha=0.15)
                ax.axhline(raw["probe"], color="gray", ls="--", label="probe (raw)")
                ax.axhline(raw["majority"], color="black", ls=":", label="majority")
            ax.set_xticks(x, [m.replace("_", " ") for m in methods], rotation=20)
            ax.set_title(name)
            ax.set_ylabel("test accuracy (mean ± sd over seeds)")
            ax.legend(fontsize=7)
        save(fig, "accuracy_by_method.png")

    points = [(n, m, v) for n in names for m, v in datasets[n]["methods"].items()
              if "synthetic" in v and v.get("distinct_2") is not None]
    if points:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, measure, label in ((axes[0], "distinct_2", "distinct-2"),
                                   (axes[1], "embedding_distance", "mean embedding cosine distance")):
            for name in names:
                mine = [(m, v) for n, m, v in points if n == name]
                if mine:
                    ax.errorbar([v[measure] for _, v in mine], [v["synthetic"]["accuracy"] for _, v in mine],
                                yerr=[v["synthetic"]["accuracy_std"] for _, v in mine], fmt="o", capsize=3, label=name)
                    for m, v in mine:
                        ax.annotate(m.replace("_", " "), (v[measure], v["synthetic"]["accuracy"]), fontsize=7)
            ax.set_xlabel(label)
            ax.set_ylabel("synthetic student accuracy")
            ax.legend(fontsize=7)
        save(fig, "diversity_vs_accuracy.png")

    for key, file, xlabel in (("num_examples", "accuracy_vs_num_examples.png", "synthetic examples requested (M)"),
                              ("raw_examples", "accuracy_vs_raw_examples.png", "raw examples (N)")):
        if not any(len(datasets[n][key]) > 1 for n in names):
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in names:
            curve = sorted((int(k), v) for k, v in datasets[name][key].items())
            for train_set in TRAIN_ORDER:
                pts = [(k, v[train_set]) for k, v in curve if train_set in v]
                if len(pts) > 1:
                    ax.errorbar([k for k, _ in pts], [s["accuracy"] for _, s in pts],
                                yerr=[s["accuracy_std"] for _, s in pts], marker="o", capsize=3,
                                label=f"{name} {train_set}")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (mean ± sd)")
        ax.legend(fontsize=7)
        save(fig, file)

    with_loop = [n for n in names if datasets[n].get("loop")]
    if with_loop:
        fig, axes = plt.subplots(1, len(with_loop), figsize=(5.5 * len(with_loop), 4), squeeze=False)
        for ax, name in zip(axes[0], with_loop):
            ds = datasets[name]
            rounds = ds["loop"]["rounds"]
            ax.errorbar([r["teacher_tokens"] for r in rounds], [r["mixed"]["accuracy"] for r in rounds],
                        yerr=[r["mixed"]["accuracy_std"] for r in rounds], marker="o", capsize=3,
                        color="tab:red", label="loop (after each round)")
            one = ds["loop"].get("one_pass")
            if one:
                ax.errorbar([one["teacher_tokens"]], [one["mixed"]["accuracy"]], yerr=[one["mixed"]["accuracy_std"]],
                            marker="s", capsize=3, color="tab:green", ls="none", label="one pass, same budget")
            others = [(m, v) for m, v in ds["methods"].items() if m != "loop" and v.get("mixed")]
            for m, v in others:
                ax.errorbar([v["teacher_tokens"]], [v["mixed"]["accuracy"]], yerr=[v["mixed"]["accuracy_std"]],
                            marker="^", capsize=3, color="gray", ls="none")
                ax.annotate(m.replace("_", " "), (v["teacher_tokens"], v["mixed"]["accuracy"]), fontsize=7)
            ax.set_title(name)
            ax.set_xlabel("teacher tokens (prompt + output)")
            ax.set_ylabel("mixed student test accuracy (mean ± sd)")
            ax.legend(fontsize=7)
        save(fig, "accuracy_vs_teacher_tokens.png")

    teacher = next(item for item in summary["findings"] if item["id"] == "teacher_accuracy_does_not_predict_student")
    if teacher["points"]:
        fig, ax = plt.subplots(figsize=(5, 4))
        for name, p in teacher["points"].items():
            ax.scatter(p["teacher"], p["student"])
            ax.annotate(name, (p["teacher"], p["student"]), fontsize=8)
        low = min(min(p["teacher"], p["student"]) for p in teacher["points"].values())
        ax.plot([low, 1], [low, 1], color="gray", ls=":", lw=1)
        ax.set_xlabel("teacher as classifier (best shots), test accuracy")
        ax.set_ylabel("synthetic student (mean over methods)")
        save(fig, "teacher_vs_student.png")
    return written


def _pm(student: dict | None) -> str:
    if not student:
        return "-"
    spread = f" ± {student['accuracy_std']:.3f}" if len(student["seeds"]) > 1 else ""
    return f"{student['accuracy']:.3f}{spread}"


def loop_lines(loop: dict[str, Any]) -> list[str]:
    """A dataset's closed loop in study.md: a row per round, then its one-pass baseline."""
    lines = [f"Closed loop ({', '.join(loop['strategies']) or 'unsteered'}):", "",
             "| round | teacher tokens so far | accepted | mixed | steered |", "|---:|---:|---:|---:|---|"]
    for r in loop["rounds"]:
        steered = ", ".join(f"{y}: {why}" for y, why in r["steered"].items())
        extra = [f"{r[k]} {k.replace('_', ' ')}" for k in ("hard_examples", "uncertain") if r[k]]
        steered = "; ".join(x for x in [steered, *extra] if x) or "-"
        lines.append(f"| {r['round']} | {r['teacher_tokens']:,} | {r['accepted']} | {_pm(r['mixed'])} | {steered} |")
    one = loop.get("one_pass")
    if one:
        c = loop["comparison"]
        lines += ["", f"One pass at the same budget: {one['teacher_tokens']:,} teacher tokens, "
                  f"{one['accepted']} accepted, mixed {_pm(one['mixed'])}. Loop - one pass "
                  f"{c['difference']:+.3f} (spread {c['spread']:.3f}): **{c['verdict']}**."]
    return lines + [""]


def study_markdown(summary: dict[str, Any]) -> str:
    """study.md: setup, per-dataset tables, the teacher, the sweeps, the findings with their
    numbers and verdicts, and the time of every cell."""
    s = summary["settings"]
    host = summary["host"]
    lines = [f"# Study {summary['study']}", "",
             f"Written {summary['written_at']} on {host['cpu']} ({host['cores']} cores, "
             f"avx512_bf16 {'yes' if host['avx512_bf16'] else 'no'}). N={s['raw_examples']} raw "
             f"examples, M={s['num_examples']} synthetic requested, student seeds {s['seeds']}, "
             f"base job `{Path(s['job']).name}`" + (f", overrides {s['overrides']}" if s["overrides"] else "")
             + ". Accuracy on the test split"
             + (f" (at most {s['max_test_examples']} rows, stratified)" if s["max_test_examples"] else "")
             + ", mean ± sd over seeds.", ""]
    for name, ds in summary["datasets"].items():
        lines += [f"## {name}", "", f"{len(ds['labels'])} labels; raw student {_pm(ds['raw'])}"
                  + (f", its linear probe {ds['raw']['probe']:.3f}, majority class {ds['raw']['majority']:.3f}"
                     if ds["raw"] else "") + ".", ""]
        if ds["methods"]:
            lines += ["| method | synthetic | mixed | accepted | distinct-2 | embedding distance | teacher tokens |",
                      "|---|---:|---:|---:|---:|---:|---:|"]
            for method, v in ds["methods"].items():
                lines.append(f"| {method} | {_pm(v.get('synthetic'))} | {_pm(v.get('mixed'))} | {v['accepted']} | "
                             f"{v['distinct_2'] if v['distinct_2'] is not None else '-'} | "
                             f"{v['embedding_distance'] if v['embedding_distance'] is not None else '-'} | "
                             f"{v['teacher_tokens']} |")
            lines.append("")
        if ds.get("loop"):
            lines += loop_lines(ds["loop"])
        if ds["teacher"]:
            lines += ["Teacher as a classifier (label operator) on " + str(next(iter(ds["teacher"].values()))["rows"])
                      + " test rows: " + "; ".join(f"{k} shot(s) per label {t['accuracy']:.3f} (macro-F1 "
                                                   f"{t['macro_f1']:.3f}, {t['labelled']} labelled)"
                                                   for k, t in ds["teacher"].items()) + ".", ""]
        for key, title in (("num_examples", f"Synthetic size sweep ({s['sweep']['method']}, N={s['raw_examples']})"),
                           ("raw_examples", f"Raw size sweep ({s['sweep']['method']}, M={s['num_examples']})")):
            if ds[key]:
                sets = [t for t in TRAIN_ORDER if any(t in v for v in ds[key].values())]
                lines += [f"{title}:", "", "| size | " + " | ".join(sets) + " |", "|---:|" + "---:|" * len(sets)]
                for size, v in sorted(ds[key].items(), key=lambda kv: int(kv[0])):
                    lines.append(f"| {size} | " + " | ".join(_pm(v.get(t)) for t in sets) + " |")
                lines.append("")
    loops = {name: ds["loop"] for name, ds in summary["datasets"].items() if ds.get("loop")
             and "comparison" in ds["loop"]}
    if loops:
        won = [name for name, loop in loops.items() if loop["comparison"]["verdict"] == "loop better"]
        lines += ["## The closed loop against one pass", "",
                  f"The loop's mixed student beat the one-pass one by more than the spread over seeds "
                  f"on {len(won)} of {len(loops)} dataset(s)" + (f" ({', '.join(won)})" if won else "") + ": "
                  + "; ".join(f"{name} {loop['comparison']['difference']:+.3f} (spread "
                              f"{loop['comparison']['spread']:.3f}, {loop['comparison']['verdict']})"
                              for name, loop in loops.items()) + ".", ""]
    lines += ["## Findings of the seed study, checked here", ""]
    tested = any(item["overall"] != "not tested" for item in summary["findings"])
    if not tested:
        lines += ["None could be checked: they need the creation methods' grid, the sweeps and the "
                  "teacher cells (study.json has each finding's reason).", ""]
    for item in summary["findings"] if tested else []:
        lines.append(f"- **{item['finding']}** Overall: **{item['overall']}**.")
        for name, v in (item.get("per_dataset") or {}).items():
            detail = {k: val for k, val in v.items() if k not in ("verdict",)}
            lines.append(f"  - {name}: {v['verdict']}; {json.dumps(detail)}")
        if "points" in item:
            lines.append(f"  - Spearman over datasets: {item['spearman']} ({item['why']}); points: "
                         f"{json.dumps(item['points'])}")
    lines += ["", "## Cells", "", "| cell | status | minutes | teacher s | students s |", "|---|---|---:|---:|---:|"]
    for cell in summary["cells"]:
        stages = cell.get("stages") or {}
        lines.append(f"| {cell['name']} | {cell['status']}{(': ' + cell['error']) if cell.get('error') else ''} | "
                     f"{cell['seconds'] / 60:.1f} | {stages.get('teacher', 0):.0f} | "
                     f"{sum(v for k, v in stages.items() if k.startswith('student')):.0f} |"
                     if cell["status"] == "done" else f"| {cell['name']} | {cell['status']} | - | - | - |")
    done = [c["seconds"] for c in summary["cells"] if c["status"] == "done"]
    if done:
        lines += ["", f"{len(done)} cell(s), {sum(done) / 60:.1f} min in all (cells run in turn)."]
    lines += ["", "Plots: " + ", ".join(f"![{p}]({p})" for p in summary.get("plots", [])), ""]
    return "\n".join(lines)
