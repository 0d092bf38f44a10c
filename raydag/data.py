"""Reading labelled data, checking it row by row, and drawing the raw sample.

Files are read by extension (``.jsonl``/``.json`` line by line, ``.csv`` and ``.parquet`` with
Ray Data). Every problem names the file and the line, row or column: bytes that are not UTF-8
(with the byte offset), a malformed JSON line, a missing text or label column, an empty or
too long text, a label of the wrong type or outside the job's label set, an empty file. Bad rows
stop the run (:class:`DataError`) or, with ``data.on_bad_rows: skip``, are left out and counted
by :class:`BadRows`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from raydag.errors import DataError
from raydag.models import resolve_model

if TYPE_CHECKING:  # config imports this module
    from raydag.config import JobConfig

MAX_TEXT_CHARS = 20_000  # default of data.max_text_chars
_READERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def stable_hash(*parts: object, length: int = 16) -> str:
    """A short hex digest of the JSON form of ``parts``; equal inputs give equal ids."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:length]


def raw_row_id(text: str, label: str) -> str:
    """Stable id of a human-labelled row: it depends on its content only."""
    return stable_hash("raw", text, label)


class BadRows:
    """Bad input rows of one read: ``file:line``, a reason code and a message for each.

    With ``on_bad_rows="error"`` the first problems are raised as one :class:`DataError`; with
    ``"skip"`` the rows are left out and :meth:`summary` counts them by reason (with their
    ``file:line``) for the report and the data card.
    """

    def __init__(self, on_bad_rows: str = "error") -> None:
        if on_bad_rows not in ("error", "skip"):
            raise ValueError(f"on_bad_rows must be 'error' or 'skip', got {on_bad_rows!r}")
        self.on_bad_rows = on_bad_rows
        self.rows: list[dict] = []

    def add(self, where: str, reason: str, message: str) -> None:
        """Record one bad row (``message`` says what is wrong, after ``where``)."""
        self.rows.append({"where": where, "reason": reason, "message": f"{where}: {message}"})

    def raise_if_any(self, shown: int = 5) -> None:
        """In ``error`` mode, raise the first ``shown`` problems (and how many more there are)."""
        if self.on_bad_rows != "error" or not self.rows:
            return
        lines = [row["message"] for row in self.rows[:shown]]
        if len(self.rows) > shown:
            lines.append(f"... and {len(self.rows) - shown} more bad row(s); fix them, or set "
                         "data.on_bad_rows=skip to leave bad rows out (counted in the report)")
        raise DataError("\n".join(lines))

    def summary(self, listed: int = 20) -> dict:
        """Counts by reason, and the first ``listed`` rows of each reason (``file:line``)."""
        by_reason: dict[str, list[str]] = {}
        for row in self.rows:
            by_reason.setdefault(row["reason"], []).append(row["where"])
        return {"total": len(self.rows),
                "by_reason": {k: len(v) for k, v in sorted(by_reason.items())},
                "rows": {k: v[:listed] for k, v in sorted(by_reason.items())}}


def _not_utf8(line: bytes, err: UnicodeDecodeError, offset: int) -> str:
    """Where a line's first non-UTF-8 byte is (``offset``: the line's start in the file)."""
    return (f"byte 0x{line[err.start]:02x} at byte offset {offset + err.start} of the file "
            f"(column {err.start + 1}) is not UTF-8; re-encode the file as UTF-8")


def _jsonl_records(path: Path, bad: BadRows) -> tuple[list[dict], list[int]]:
    """Every JSON object line of a JSONL file and its line number; bad lines go to ``bad``.

    Lines are read as bytes and decoded one by one, so bytes that are not UTF-8 are named by
    line and byte offset instead of failing the whole file.
    """
    records, numbers = [], []
    offset = 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                bad.add(where, "not_utf8", _not_utf8(raw, err, offset))
                offset += len(raw)
                continue
            offset += len(raw)
            if not line.strip():
                bad.add(where, "blank_line", "blank line in a JSONL file")
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                bad.add(where, "not_json", f"not valid JSON ({err.msg} at column {err.colno})")
                continue
            if not isinstance(value, dict):
                bad.add(where, "not_an_object", f"expected a JSON object, got {type(value).__name__}")
                continue
            records.append(value)
            numbers.append(number)
    return records, numbers


def _check_csv_encoding(path: Path) -> None:
    offset = 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{number}: {_not_utf8(raw, err, offset)}") from None
            offset += len(raw)


def read_table(path: str | os.PathLike, bad: BadRows | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Read one data file, in file order, with where each row came from.

    JSONL is parsed line by line (so a bad line is named, or skipped, not fatal to the whole
    file); CSV and Parquet are read with Ray Data.

    Args:
        path: The file.
        bad: Where bad lines are recorded (a JSONL line that is not UTF-8, not JSON or not an
            object); None raises at the first problems.

    Returns:
        The rows and, per row, ``file:line`` (``file: row n`` for Parquet).

    Raises:
        DataError: The file is missing, has an unknown extension, cannot be parsed, is empty,
            or (in ``error`` mode) has bad lines.
    """
    path = Path(path)
    bad = bad if bad is not None else BadRows()
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    kind = _READERS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unknown file type '{path.suffix}'; use .jsonl, .csv or .parquet")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    if kind == "json":
        records, numbers = _jsonl_records(path, bad)
        bad.raise_if_any()
        frame = pd.DataFrame.from_records(records)
        where = [f"{path}:{n}" for n in numbers]
    else:
        import ray

        if kind == "csv":
            _check_csv_encoding(path)
        try:
            frame = getattr(ray.data, f"read_{kind}")(str(path)).to_pandas()
        except Exception as err:  # Ray wraps reader errors in several types
            first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise DataError(f"{path}: cannot be read as {kind}: {first[:300]}") from None
        offset = 2 if kind == "csv" else 0  # CSV rows start after the header line
        where = ([f"{path}:{i + offset}" for i in range(len(frame))] if kind == "csv"
                 else [f"{path}: row {i}" for i in range(len(frame))])
    if frame.empty:
        raise DataError(f"{path}: no rows" + (f" ({len(bad.rows)} bad row(s) skipped)" if bad.rows else ""))
    return frame, where


def _text_problem(value, column: str, max_chars: int, check=None) -> tuple[str, str] | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "empty_text", f"empty or missing '{column}'"
    if not isinstance(value, str):
        return "text_not_a_string", f"'{column}' is {type(value).__name__} {value!r:.40}, not a string"
    if not value.strip():
        return "empty_text", f"empty or missing '{column}'"
    if len(value) > max_chars:
        return "text_too_long", (f"'{column}' has {len(value):,} characters, more than "
                                 f"data.max_text_chars={max_chars:,}")
    return check(value) if check is not None else None


def _good_rows(frame: pd.DataFrame, where: list[str], bad: BadRows,
               problem_of: Callable[[int], tuple[str, str] | None], path: Path) -> pd.DataFrame:
    """The rows without a problem; the others are recorded in ``bad`` (raised in error mode)."""
    keep = []
    for index in range(len(frame)):
        problem = problem_of(index)
        if problem:
            bad.add(where[index], *problem)
        keep.append(problem is None)
    bad.raise_if_any()
    kept = frame[keep]
    if kept.empty:
        raise DataError(f"{path}: no usable rows ({len(frame)} bad row(s) left out)")
    return kept


def read_labelled(
    path: str | os.PathLike,
    text_column: str,
    label_column: str,
    labels: list[str],
    *,
    bad: BadRows | None = None,
    max_text_chars: int = MAX_TEXT_CHARS,
    check: Callable[[str], tuple[str, str] | None] | None = None,
    deferred_check: Callable[[str], tuple[str, str] | None] | None = None,
) -> pd.DataFrame:
    """Read and check a labelled file; return columns ``id``, ``text``, ``label``.

    Args:
        path: The file (.jsonl, .csv or .parquet).
        text_column: Column of the text.
        label_column: Column of the class name (a string of ``labels``).
        labels: The job's label set.
        bad: Collects bad rows; None (or an ``error``-mode collector) raises on the first ones.
        max_text_chars: Longer texts are bad rows.
        check: Another check of each text: ``(reason, message)`` for a bad one, else None
            (e.g. :func:`context_check`).
        deferred_check: A check that does not make a row bad now: its problem, as
            ``"<file>:<line>: <message>"``, goes into a ``_deferred`` column (None when the
            text passes), for the caller to raise only if the row is used (e.g. a pool text
            that is too long for the teacher matters only when it is sampled).

    Raises:
        DataError: naming the file and line (or column) of the first problems found.
    """
    path = Path(path)
    bad = bad if bad is not None else BadRows()
    frame, where = read_table(path, bad)
    for column in (text_column, label_column):
        if column not in frame.columns:
            raise DataError(
                f"{path}: missing column '{column}' (columns found: {', '.join(map(str, frame.columns))})"
            )
    known = set(labels)
    texts, row_labels = frame[text_column].tolist(), frame[label_column].tolist()

    def problem_of(index: int) -> tuple[str, str] | None:
        label = row_labels[index]
        problem = _text_problem(texts[index], text_column, max_text_chars, check)
        if problem is None:
            if label is None or (isinstance(label, float) and math.isnan(label)):
                problem = "missing_label", f"missing '{label_column}'"
            elif not isinstance(label, str):
                problem = "label_not_a_string", (
                    f"label {label!r} is a {type(label).__name__}, not a string; labels are the "
                    f"class names {labels} (write \"{label}\" if that is one)")
            elif label not in known:
                problem = "unknown_label", f"label '{label}' is not in the job's labels {labels}"
        return problem

    kept = _good_rows(frame, where, bad, problem_of, path)
    out = pd.DataFrame({"text": kept[text_column].astype(str).to_numpy(),
                        "label": kept[label_column].astype(str).to_numpy()})
    out.insert(0, "id", [raw_row_id(t, lab) for t, lab in zip(out["text"], out["label"])])
    if deferred_check is not None:
        lines = [where[i] for i in frame.index.get_indexer(kept.index)]
        out["_deferred"] = [None if problem is None else f"{line}: {problem[1]}"
                            for line, problem in zip(lines, map(deferred_check, out["text"]))]
    return out


def stratified_sample(frame: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """Draw ``n`` rows, each label getting its share of the pool (largest remainder).

    The draw depends only on the seed and the pool's content, not on the file order.
    """
    if n >= len(frame):
        return frame.sort_values("id").reset_index(drop=True)
    counts = frame["label"].value_counts().sort_index()
    quota = counts / counts.sum() * n
    take = np.floor(quota).astype(int)
    order = (quota - take).sort_values(ascending=False, kind="stable").index
    for label in order[: n - int(take.sum())]:
        take[label] += 1
    rng = np.random.default_rng(seed)
    parts = []
    for label, k in take.items():
        pool = frame[frame["label"] == label].sort_values("id")
        picks = rng.choice(len(pool), size=int(k), replace=False)
        parts.append(pool.iloc[np.sort(picks)])
    return pd.concat(parts).sort_values("id").reset_index(drop=True)


# Columns every written row carries (lineage first).
LINEAGE_COLUMNS = ["id", "text", "label", "parent_ids", "method", "teacher_model",
                   "prompt_hash", "sampling", "seed"]


def read_texts(path: str | os.PathLike, required: list[str], optional: list[str] = (), *,
               bad: BadRows | None = None, max_text_chars: int = MAX_TEXT_CHARS,
               check: Callable[[str], tuple[str, str] | None] | None = None) -> pd.DataFrame:
    """Read a file of texts (unlabelled texts, seed tasks, evaluation splits) and check its
    string columns.

    Returns:
        The ``required`` and ``optional`` columns (missing optional ones as ""), plus ``id``:
        a hash of the row's content.

    Raises:
        DataError: a missing column, or (unless ``bad`` skips them) an empty, non-string or
            too long required value (``file:line``).
    """
    path = Path(path)
    bad = bad if bad is not None else BadRows()
    frame, where = read_table(path, bad)
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing} (columns found: "
                        f"{', '.join(map(str, frame.columns))})")
    def problem_of(index: int) -> tuple[str, str] | None:
        for column in required:
            problem = _text_problem(frame[column].iloc[index], column, max_text_chars, check)
            if problem:
                return problem
        return None

    frame = _good_rows(frame, where, bad, problem_of, path)
    out = pd.DataFrame({c: frame[c].astype(str).to_numpy() for c in required})
    for column in optional:
        out[column] = frame[column].fillna("").astype(str).to_numpy() if column in frame.columns else ""
    out.insert(0, "id", [stable_hash(*values) for values in out.itertuples(index=False)])
    return out


def raw_lineage(raw: pd.DataFrame, seed: int, method: str = "raw") -> pd.DataFrame:
    """Lineage columns for rows that come from input files (``method=raw``, no parents)."""
    frame = raw.copy()
    if "label" not in frame:
        frame["label"] = ""
    frame["parent_ids"] = [[] for _ in range(len(frame))]
    frame["method"] = method
    frame["teacher_model"] = ""
    frame["prompt_hash"] = ""
    frame["sampling"] = ""
    frame["seed"] = seed
    return frame[LINEAGE_COLUMNS + [c for c in frame.columns if c not in LINEAGE_COLUMNS]]


def read_inputs(job: JobConfig) -> tuple[pd.DataFrame | None, pd.DataFrame | None,
                                         dict[str, pd.DataFrame], dict[str, Any]]:
    """Read and check the training pool, the test split and the stages' own inputs.

    Returns:
        The pool, the test split, the stages' inputs by name, and the bad rows left out
        (``data.on_bad_rows: skip``; see :meth:`raydag.data.BadRows.summary`).

    Raises:
        DataError: a bad file, or (with ``on_bad_rows: error``) bad rows, naming file and line.
    """
    inputs: dict[str, pd.DataFrame] = {}
    data = job.data
    bad = BadRows(data.on_bad_rows if data is not None else "error")
    limit = data.max_text_chars if data is not None else MAX_TEXT_CHARS
    for stage in job.stages:
        if stage.type == "self_instruct":
            inputs["seed_tasks"] = read_texts(stage.seed_tasks_path, ["instruction", "output"],
                                              ["input"], bad=bad, max_text_chars=limit)
    if data is None:
        return None, None, inputs, bad.summary()
    fits = context_check(job)  # unlabelled texts are all labelled: each must fit
    # Pool texts reach the teacher only when sampled (demonstrations, rows a stage takes in):
    # in error mode a pool text that does not fit fails the job only if it is sampled
    # (sample_raw); skip mode leaves every such row out of the pool, as other bad rows.
    deferred = data.on_bad_rows == "error"
    pool = read_labelled(data.train_path, data.text_column, data.label_column, data.labels,
                         bad=bad, max_text_chars=limit, check=None if deferred else fits,
                         deferred_check=fits if deferred else None)
    test = read_labelled(data.test_path, data.text_column, data.label_column, data.labels,
                         bad=bad, max_text_chars=limit)
    if data.dev_path:
        inputs["dev"] = read_labelled(data.dev_path, data.text_column, data.label_column,
                                      data.labels, bad=bad, max_text_chars=limit)
        if len(inputs["dev"]) > job.student.max_dev_examples:
            inputs["dev"] = stratified_sample(inputs["dev"], job.student.max_dev_examples, job.seed)
    if data.unlabelled_path:
        inputs["unlabelled"] = read_texts(data.unlabelled_path, [data.text_column], bad=bad,
                                          max_text_chars=limit, check=fits).rename(
            columns={data.text_column: "text"})
    if job.raw_examples > len(pool):
        raise DataError(f"{data.train_path}: raw_examples={job.raw_examples} but the pool has "
                        f"{len(pool)} rows" + (" left after skipping bad rows" if bad.rows else ""))
    return pool, test, inputs, bad.summary()


def sample_raw(pool: pd.DataFrame, job: JobConfig) -> pd.DataFrame:
    """The job's raw examples: a stratified sample of the pool (see
    :func:`raydag.data.stratified_sample`).

    Raises:
        DataError: A sampled text does not fit the teacher's context (``file:line: reason``).
    """
    raw = stratified_sample(pool, job.raw_examples, job.seed)
    if "_deferred" not in raw.columns:
        return raw
    problems = raw["_deferred"].dropna().tolist()
    if problems:
        raise DataError(f"{problems[0]} (a sampled raw example"
                        + (f"; {len(problems) - 1} more sampled ones do not fit either"
                           if len(problems) > 1 else "") + ")")
    return raw.drop(columns="_deferred")


def teacher_tokens_per_text(job: JobConfig) -> int:
    """Most teacher tokens one input text may have: the context (``teacher.max_model_len``)
    less room for instructions and output, shared by the texts one request shows (the
    demonstrations of a few-shot request)."""
    from raydag.ops.create import CreateOp  # it imports this module

    first = job.stages[0]
    texts = CreateOp.demonstrations(first.method, first.shots) if first.type == "create" else 1
    output = max((s.sampling.max_tokens for s in job.stages if hasattr(s, "sampling")), default=80)
    return max(16, (job.teacher.max_model_len - 256 - output) // max(texts, 1))


def context_check(job: JobConfig):
    """A check of one input text against the teacher's context (see
    :func:`teacher_tokens_per_text`): returns ``(reason, message)`` for a text that is too
    long, else None. Only texts with more UTF-8 bytes than the limit can have more tokens, so
    most texts are never tokenised, and the tokenizer loads only when one is needed."""
    limit = teacher_tokens_per_text(job)

    @functools.cache
    def tokenizer():
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(resolve_model(job.teacher.model),
                                                 local_files_only=True)
        except Exception:  # a hub id not downloaded here: the engine checks it on the cluster
            return None

    def check(text: str):
        if job.teacher.engine != "vllm" or len(text.encode("utf-8")) <= limit:
            return None
        if tokenizer() is None:
            return None
        count = len(tokenizer()(text, add_special_tokens=False)["input_ids"])
        if count <= limit:
            return None
        return "text_over_context", (
            f"the text has {count:,} teacher tokens, more than the {limit:,} one text may take "
            f"in the teacher's context (teacher.max_model_len={job.teacher.max_model_len})")

    return check
