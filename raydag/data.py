"""Reading labelled data, checking it row by row, and drawing the raw sample.

Files are read by extension (``.jsonl``/``.json`` line by line, ``.csv`` and ``.parquet`` with
Ray Data). Every problem names the file and the line, row or column: bytes that are not UTF-8
(with the byte offset), a malformed JSON line, a missing text or label column, an empty or
too long text, a label of the wrong type or outside the job's label set, an empty file. Bad rows
stop the run (:class:`DataError`) or, with ``data.on_bad_rows: skip``, are left out and counted
by :class:`BadRows`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from raydag.errors import DataError
from raydag.models import resolve_model
from raydag.storage import arrow, file_size, location, open_input

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
        self.rows: list[dict] = []  # the rows named one by one
        self.unlisted: dict[str, int] = {}  # more bad rows, counted by reason (a Ray Data read)

    @property
    def total(self) -> int:
        return len(self.rows) + sum(self.unlisted.values())

    def add(self, where: str, reason: str, message: str) -> None:
        """Record one bad row (``message`` says what is wrong, after ``where``)."""
        self.rows.append({"where": where, "reason": reason, "message": f"{where}: {message}"})

    def raise_if_any(self, shown: int = 5) -> None:
        """In ``error`` mode, raise the first ``shown`` problems (and how many more there are)."""
        if self.on_bad_rows != "error" or not self.total:
            return
        lines = [row["message"] for row in self.rows[:shown]]
        if self.total > len(lines):
            lines.append(f"... and {self.total - len(lines)} more bad row(s); fix them, or set "
                         "data.on_bad_rows=skip to leave bad rows out (counted in the report)")
        raise DataError("\n".join(lines))

    def summary(self, listed: int = 20) -> dict:
        """Counts by reason, and the first ``listed`` rows of each reason (``file:line``)."""
        by_reason: dict[str, list[str]] = {}
        for row in self.rows:
            by_reason.setdefault(row["reason"], []).append(row["where"])
        counts = {k: len(v) for k, v in by_reason.items()}
        for reason, count in self.unlisted.items():
            counts[reason] = counts.get(reason, 0) + count
        return {"total": self.total, "by_reason": dict(sorted(counts.items())),
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
    with open_input(path) as handle:
        for number, raw in enumerate(handle, start=1):
            value = _json_line(raw, offset)
            offset += len(raw)
            if isinstance(value, tuple):
                bad.add(f"{path}:{number}", *value)
                continue
            records.append(value)
            numbers.append(number)
    return records, numbers


def _json_line(raw: bytes, offset: int) -> dict | tuple[str, str]:
    """One JSONL line (``offset``: where it starts in the file): the object, or ``(reason,
    message)`` for a line that is not UTF-8, blank, not JSON or not an object."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return "not_utf8", _not_utf8(raw, err, offset)
    if not line.strip():
        return "blank_line", "blank line in a JSONL file"
    try:
        value = json.loads(line)
    except json.JSONDecodeError as err:
        return "not_json", f"not valid JSON ({err.msg} at column {err.colno})"
    if not isinstance(value, dict):
        return "not_an_object", f"expected a JSON object, got {type(value).__name__}"
    return value


def _check_csv_encoding(path: Path) -> None:
    offset = 0
    with open_input(path) as handle:
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
    path = location(path)
    bad = bad if bad is not None else BadRows()
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    kind = _READERS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unknown file type '{path.suffix}'; use .jsonl, .csv or .parquet")
    if file_size(path) == 0:
        raise DataError(f"{path}: the file is empty")
    if kind == "json":
        records, numbers = _jsonl_records(path, bad)
        bad.raise_if_any()
        frame = pd.DataFrame.from_records(records)
        where = [f"{path}:{n}" for n in numbers]
    else:

        if kind == "csv":
            _check_csv_encoding(path)
        with _reader_errors(path, kind):
            frame = _ray_reader(path, kind).to_pandas()
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
    """Read and check a small labelled file (an evaluation split) into a frame with columns
    ``id``, ``text``, ``label`` (and ``_deferred``), in file order: :func:`read_labelled_in_ray`,
    then collected on the driver.

    Args:
        path: The file (.jsonl, .csv or .parquet).
        text_column: Column of the text.
        label_column: Column of the class name (a string of ``labels``).
        labels: The job's label set.
        bad: Collects bad rows; None (or an ``error``-mode collector) raises on the first ones.
        max_text_chars: Longer texts are bad rows.
        check: Another check of each text: ``(reason, message)`` for a bad one, else None
            (e.g. :func:`context_check`).
        deferred_check: A check that does not make a row bad now (see :class:`RowCheck`).

    Raises:
        DataError: naming the file and line (or column) of the first problems found.
    """
    return read_labelled_in_ray(path, text_column, label_column, labels,
                                bad=bad if bad is not None else BadRows(),
                                max_text_chars=max_text_chars, check=check,
                                deferred_check=deferred_check).to_pandas()


def stratified_sample(frame: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """Draw ``n`` rows, each label getting its share of the pool (largest remainder): per
    label, in label order, ``k`` positions drawn without replacement from that label's rows
    sorted by id.

    The draw depends only on the seed and the pool's content, not on the file order.
    :func:`sample_in_ray` makes the same draw from rows in Ray Data.
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


def sample_in_ray(rows: InputRows, n: int, seed: int) -> pd.DataFrame:
    """:func:`stratified_sample` of rows read in Ray Data (:func:`read_labelled_in_ray`), the
    same draw for the same content, without the pool on the driver.

    One Ray task takes the pool's keys (``label``, ``id`` and ``_row``: about 40 bytes per
    row, never the texts) and draws from them with :func:`stratified_sample` itself; a filter
    then fetches the drawn rows. The driver holds the ``n`` drawn rows. (Ray Data's groupby
    and sort would spread the keys over the cluster, at about 4 s each however small the pool;
    a labelled pool is small next to a worker's memory: 10 million rows' keys are ~400 MB.)

    Returns:
        The drawn rows (``id``, ``text``, ``label`` and ``_deferred`` if read), sorted by id.
    """
    import ray
    from ray.data.expressions import col

    dataset = rows.dataset
    if n < rows.count:
        keys = dataset.select_columns(["label", "id", "_row"]).to_arrow_refs()
        drawn = ray.get(_drawn_rows_task().remote(n, seed, *keys))
        dataset = dataset.filter(expr=col("_row").is_in(drawn))
    frame = dataset.drop_columns(["_row"]).to_pandas()
    return _plain_strings(frame.sort_values("id", kind="stable").reset_index(drop=True))


def _drawn_rows(n: int, seed: int, *tables) -> list[int]:
    """The ``_row`` of each row :func:`stratified_sample` draws from the keys in ``tables``."""
    import pyarrow as pa

    keys = pa.concat_tables([t for t in tables if t.num_rows]).to_pandas()
    return sorted(int(r) for r in stratified_sample(keys, n, seed)["_row"])


def _drawn_rows_task():
    """The Ray task form of :func:`_drawn_rows`, made on first use."""
    import ray

    return ray.remote(num_cpus=1)(_drawn_rows)


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
    path = location(path)
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


READ_CHUNK_BYTES = 16 << 20  # a Ray Data read task's part of a JSONL file


@dataclass(frozen=True)
class RowCheck:
    """What a read in Ray Data takes from each row and how it checks it; it travels to the
    read tasks, so it holds only picklable settings.

    Attributes:
        text_column: The text's column.
        label_column: The label's column, for a labelled file (None: texts only).
        labels: The job's label set (labelled files).
        max_text_chars: Longer texts are bad rows.
        check: Another check of each text: ``(reason, message)`` for a bad one, else None.
        deferred_check: A check whose problem does not make the row bad now: it is kept as the
            row's ``_deferred`` (``"<file>:<line>: <message>"``) for the caller to raise only if
            the row is used (a pool text too long for the teacher matters only when sampled).
    """

    text_column: str
    label_column: str | None = None
    labels: tuple[str, ...] = ()
    max_text_chars: int = MAX_TEXT_CHARS
    check: Callable[[str], tuple[str, str] | None] | None = None
    deferred_check: Callable[[str], tuple[str, str] | None] | None = None

    @property
    def columns(self) -> list[str]:
        return [self.text_column] + ([self.label_column] if self.label_column else [])

    def problem(self, values: tuple) -> tuple[str, str] | None:
        """The row's ``(reason, message)``, or None for a good row (``values`` in
        :attr:`columns` order)."""
        problem = _text_problem(values[0], self.text_column, self.max_text_chars, self.check)
        if problem is None and self.label_column is not None:
            problem = _label_problem(values[1], self.label_column, list(self.labels))
        return problem

    def row_id(self, values: tuple) -> str:
        return raw_row_id(values[0], values[1]) if self.label_column else stable_hash(values[0])


def _label_problem(label, column: str, labels: list[str]) -> tuple[str, str] | None:
    if (label is None or (isinstance(label, float) and math.isnan(label))
            or (isinstance(label, str) and not label.strip())):  # a CSV's empty field is ""
        return "missing_label", f"missing '{column}'"
    if not isinstance(label, str):
        return "label_not_a_string", (
            f"label {label!r} is a {type(label).__name__}, not a string; labels are the "
            f"class names {labels} (write \"{label}\" if that is one)")
    if label not in labels:
        return "unknown_label", f"label '{label}' is not in the job's labels {labels}"
    return None


def _missing_columns(path, missing: list[str], found) -> DataError:
    names = ", ".join(f"'{c}'" for c in missing)
    return DataError(f"{path}: missing column{'s' if len(missing) > 1 else ''} {names} "
                     f"(columns found: {', '.join(map(str, found))})")


@dataclass
class InputRows:
    """A file of rows read and checked by Ray Data tasks, never held on the driver.

    Attributes:
        dataset: The good rows, materialised in the object store: ``id`` (a hash of the
            content), ``text``, ``label`` (labelled files), ``_row`` (the row's number among
            the good rows, in file order) and ``_deferred`` (with a ``deferred_check``).
        count: How many good rows.
    """

    dataset: Any
    count: int

    def __len__(self) -> int:
        return self.count

    def head(self, n: int) -> pd.DataFrame:
        """The first ``n`` rows (``id``, ``text``), in file order."""
        from ray.data.expressions import col

        frame = self.dataset.filter(expr=col("_row") < n).to_pandas()
        return frame.sort_values("_row")[["id", "text"]].reset_index(drop=True)

    def to_pandas(self) -> pd.DataFrame:
        """Every row, in file order, without ``_row``: for the small files (an evaluation
        split) that the driver keeps."""
        frame = self.dataset.to_pandas().sort_values("_row", kind="stable")
        return _plain_strings(frame.drop(columns="_row").reset_index(drop=True))


def _plain_strings(frame: pd.DataFrame) -> pd.DataFrame:
    """``id``, ``text`` and ``label`` as pandas' own string dtype and ``_deferred`` as
    Python objects, as a read on the driver gives them (Ray Data hands back Arrow-typed columns, whose comparisons return Arrow
    booleans)."""
    for column in ("id", "text", "label"):
        if column in frame.columns:
            frame[column] = frame[column].astype(str)
    if "_deferred" in frame.columns:  # None where the text passed
        frame["_deferred"] = pd.Series([None if pd.isna(v) else v for v in frame["_deferred"]],
                                       dtype=object, index=frame.index)
    return frame


def read_texts_in_ray(path: str | os.PathLike, column: str, *, bad: BadRows,
                      max_text_chars: int = MAX_TEXT_CHARS,
                      check: Callable[[str], tuple[str, str] | None] | None = None,
                      chunk_bytes: int = READ_CHUNK_BYTES) -> InputRows:
    """:func:`read_texts` of one text column of a file, in Ray Data tasks (see
    :func:`read_in_ray`).

    Raises:
        DataError: as :func:`read_texts`.
    """
    return read_in_ray(path, RowCheck(column, max_text_chars=max_text_chars, check=check),
                       bad=bad, chunk_bytes=chunk_bytes)


def read_labelled_in_ray(
    path: str | os.PathLike, text_column: str, label_column: str, labels: list[str], *,
    bad: BadRows, max_text_chars: int = MAX_TEXT_CHARS,
    check: Callable[[str], tuple[str, str] | None] | None = None,
    deferred_check: Callable[[str], tuple[str, str] | None] | None = None,
    chunk_bytes: int = READ_CHUNK_BYTES,
) -> InputRows:
    """:func:`read_labelled` in Ray Data tasks: the rows stay in the object store (see
    :func:`read_in_ray`); ``id`` is :func:`raw_row_id` of text and label."""
    return read_in_ray(path, RowCheck(text_column, label_column, tuple(labels), max_text_chars,
                                      check, deferred_check), bad=bad, chunk_bytes=chunk_bytes)


def read_in_ray(path: str | os.PathLike, rule: RowCheck, *, bad: BadRows,
                chunk_bytes: int = READ_CHUNK_BYTES) -> InputRows:
    """Read and check a JSONL, CSV or Parquet file in Ray Data tasks.

    A JSONL file is cut into byte ranges of ``chunk_bytes``; a first pass counts each range's
    lines (so every bad row is named by ``file:line``) and looks for the columns' names, a
    second parses and checks its lines. A Parquet file is read by row group, numbered from its
    footer. The driver holds one number per range or row group and the bad rows it reports
    (the first 20 of each reason; the rest counted). A CSV file (whose quoted fields may hold
    line breaks) is read by Ray Data's CSV reader and numbered by its blocks
    (:func:`_read_csv_in_ray`).

    Raises:
        DataError: a missing, empty or unreadable file, a missing column, no good rows, or
            (in ``error`` mode) bad rows, naming the file and line.
    """
    import ray

    path = location(path)
    kind = _READERS.get(path.suffix.lower())
    if kind is None or not path.is_file() or file_size(path) == 0:
        read_table(path)  # raises the right error: unknown type, missing or empty file
    if kind == "csv":
        return _read_csv_in_ray(path, rule, bad)
    settings = {"path": str(path), "rule": rule}
    if kind == "parquet":
        chunks, parse, where = _parquet_row_groups(path, rule.columns), _parse_parquet_group, "{path}: row {n}"
    else:
        size = file_size(path)
        starts = list(range(0, size, chunk_bytes))
        chunks = pd.DataFrame({"chunk": range(len(starts)), "start": starts,
                               "end": starts[1:] + [size]})
        newlines = ray.data.from_pandas(chunks).map_batches(
            _count_newlines, fn_kwargs={"path": str(path), "columns": rule.columns},
            batch_size=1, batch_format="pandas").to_pandas().sort_values("chunk")
        missing = [c for i, c in enumerate(rule.columns) if not newlines[f"has_{i}"].any()]
        if missing:  # the name is nowhere in the file: no line has the column
            raise _missing_columns(path, missing, _first_object_keys(path))
        chunks["first_line"] = np.cumsum([0] + newlines["newlines"].tolist()[:-1]) + 1
        parse, where = _parse_jsonl_chunk, "{path}:{n}"
    parsed = ray.data.from_pandas(chunks).map_batches(
        parse, batch_size=1, batch_format="pandas", fn_kwargs=settings).materialize()
    _collect_bad_rows(parsed, path, bad, where)
    good_per_chunk: dict[int, int] = {}
    for part in parsed.map_batches(_good_per_chunk, batch_size=None, batch_format="pandas").take_all():
        good_per_chunk[int(part["_chunk"])] = good_per_chunk.get(int(part["_chunk"]), 0) + int(part["rows"])
    count = sum(good_per_chunk.values())
    if not count:
        raise DataError(f"{path}: no usable rows ({bad.total} bad row(s) left out)")
    offsets, total = {}, 0
    for chunk in sorted(good_per_chunk):
        offsets[chunk], total = total, total + good_per_chunk[chunk]
    rows = parsed.map_batches(_numbered_good_rows, fn_kwargs={
        "offsets": offsets, "where": where.format(path=path, n="{n}")},
        batch_format="pandas").materialize()
    return InputRows(rows, count)


def _first_object_keys(path, lines: int = 20) -> list[str]:
    """The keys of the first JSON object among a JSONL file's first ``lines`` lines."""
    offset = 0
    with open_input(path) as handle:
        for _ in range(lines):
            raw = handle.readline()
            if not raw:
                break
            value = _json_line(raw, offset)
            offset += len(raw)
            if isinstance(value, dict):
                return list(value)
    return []


def _parquet_row_groups(path: Path, columns: list[str]) -> pd.DataFrame:
    """A Parquet file's row groups (``chunk``) and the number of each one's first row."""

    try:
        metadata = _parquet_file(path).metadata
    except Exception as err:  # pyarrow raises several types for a file that is not Parquet
        raise DataError(f"{path}: cannot be read as parquet: {str(err)[:300]}") from None
    names = metadata.schema.to_arrow_schema().names
    missing = [c for c in columns if c not in names]
    if missing:
        raise _missing_columns(path, missing, names)
    sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
    return pd.DataFrame({"chunk": range(len(sizes)),
                         "first_line": np.cumsum([0] + sizes[:-1], dtype=np.int64)})


def _ray_reader(path, kind: str):
    """Ray Data's reader of a ``csv`` or ``parquet`` file on disk or on a store. A CSV field in
    quotes may hold line breaks: without ``newlines_in_values`` a file of more than one read
    block fails wherever a block boundary falls inside such a field."""
    import pyarrow.csv
    import ray

    where, filesystem = arrow(path)
    options = ({"parse_options": pyarrow.csv.ParseOptions(newlines_in_values=True)}
               if kind == "csv" else {})
    return getattr(ray.data, f"read_{kind}")(where, filesystem=filesystem, **options)


@contextlib.contextmanager
def _reader_errors(path, kind: str):
    """A reader's failure as ``DataError`` naming the file (Ray wraps them in several types)."""
    try:
        yield
    except Exception as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise DataError(f"{path}: cannot be read as {kind}: {first[:300]}") from None


@contextlib.contextmanager
def preserving_order():
    """Ray Data keeps rows in order while inside (file order of a read, the input order of a
    map), whatever the context said before."""
    import ray

    options = ray.data.DataContext.get_current().execution_options
    kept, options.preserve_order = options.preserve_order, True
    try:
        yield
    finally:
        options.preserve_order = kept


def _read_csv_in_ray(path, rule: RowCheck, bad: BadRows) -> InputRows:
    """:func:`read_in_ray` of a CSV file. Its quoted fields may hold line breaks, so it
    cannot be cut by bytes: Ray Data's CSV reader reads it, each block is checked where it was
    read (rows numbered within the block, the block tagged), and the blocks' row counts, in
    file order, give each row its number (``file:line``, the header being line 1)."""
    _check_csv_encoding(path)
    with preserving_order():
        with _reader_errors(path, "csv"):
            rows = _ray_reader(path, "csv")
            found = rows.columns()
        missing = [c for c in rule.columns if c not in found]
        if missing:
            raise _missing_columns(path, missing, found)
        checked = rows.select_columns(rule.columns).map_batches(
            _check_csv_block, fn_kwargs={"rule": rule}, batch_size=None,
            batch_format="pandas").materialize()
        counts: dict[int, list[int]] = {}  # tag -> [rows, good rows], in file order
        for part in checked.map_batches(_rows_per_chunk, batch_size=None,
                                        batch_format="pandas").take_all():
            total = counts.setdefault(int(part["_chunk"]), [0, 0])
            total[0] += int(part["rows"])
            total[1] += int(part["good"])
    lines, offsets, line, good = {}, {}, 2, 0  # line 1 is the header
    for tag, (rows_in_block, good_in_block) in counts.items():
        lines[tag], offsets[tag] = line, good
        line, good = line + rows_in_block, good + good_in_block
    parsed = checked.map_batches(_numbered_lines, fn_kwargs={"lines": lines},
                                 batch_format="pandas").materialize()
    _collect_bad_rows(parsed, path, bad, "{path}:{n}")
    if not good:
        raise DataError(f"{path}: no usable rows ({bad.total} bad row(s) left out)")
    return InputRows(parsed.map_batches(_numbered_good_rows, fn_kwargs={
        "offsets": offsets, "where": f"{path}:{{n}}"}, batch_format="pandas").materialize(), good)


def _check_csv_block(batch: pd.DataFrame, rule: RowCheck) -> pd.DataFrame:
    """Ray Data task: one block of a CSV file checked as :func:`_parse_jsonl_chunk` checks a
    range, its rows numbered within the block (``_line``), the block tagged (``_chunk``)."""
    import uuid

    columns = [[None if isinstance(v, float) and math.isnan(v) else v for v in batch[c]]
               for c in rule.columns]
    return _checked_rows(((i, values, None) for i, values in enumerate(zip(*columns))),
                         uuid.uuid4().int >> 65, rule)


def _rows_per_chunk(batch: pd.DataFrame) -> pd.DataFrame:
    grouped = batch.groupby("_chunk", sort=False)["_bad_reason"]
    return pd.DataFrame({"_chunk": list(grouped.groups), "rows": grouped.size().to_numpy(),
                         "good": grouped.apply(lambda r: int((r == "").sum())).to_numpy()})


def _numbered_lines(batch: pd.DataFrame, lines: dict[int, int]) -> pd.DataFrame:
    return batch.assign(_line=batch["_chunk"].map(lines).astype("int64") + batch["_line"])


def _parquet_file(path):
    import pyarrow.parquet as pq

    where, filesystem = arrow(location(path))
    return pq.ParquetFile(where, filesystem=filesystem)


def _parse_parquet_group(batch: pd.DataFrame, path: str, rule: RowCheck) -> pd.DataFrame:
    """One row group of a Parquet file, checked and numbered as :func:`_parse_jsonl_chunk`."""

    chunk, first = int(batch["chunk"].iloc[0]), int(batch["first_line"].iloc[0])
    table = _parquet_file(path).read_row_group(chunk, columns=rule.columns)
    columns = [table.column(c).to_pylist() for c in rule.columns]
    return _checked_rows(((first + i, values, None) for i, values in enumerate(zip(*columns))),
                         chunk, rule)


def _checked_rows(numbered, chunk: int, rule: RowCheck) -> pd.DataFrame:
    """Rows of one read task from ``(number, values, problem)``: ``values`` in ``rule``'s
    column order, ``problem`` a ``(reason, message)`` found while parsing, else None. Good
    rows (``_bad_reason`` "") are numbered in the task (``_local``); bad ones keep their
    reason."""
    names = ["text"] + (["label"] if rule.label_column else [])
    rows = {c: [] for c in ["id", *names, "_chunk", "_local", "_line", "_bad_reason",
                            "_bad_message"]}
    if rule.deferred_check is not None:
        rows["_deferred_message"] = []
    local = 0
    for number, values, problem in numbered:
        problem = problem or rule.problem(values)
        rows["_line"].append(number)
        rows["_chunk"].append(chunk)
        if problem:
            rows["id"].append("")
            for name in names:
                rows[name].append("")
            rows["_local"].append(-1)
            rows["_bad_reason"].append(problem[0]), rows["_bad_message"].append(problem[1])
        else:
            rows["id"].append(rule.row_id(values))
            for name, value in zip(names, values):
                rows[name].append(value)
            rows["_local"].append(local)
            rows["_bad_reason"].append(""), rows["_bad_message"].append("")
            local += 1
        if rule.deferred_check is not None:
            later = None if problem else rule.deferred_check(values[0])
            rows["_deferred_message"].append(later[1] if later else "")
    return pd.DataFrame(rows)


def _count_newlines(batch: pd.DataFrame, path: str, columns: list[str]) -> pd.DataFrame:
    """One byte range's newlines, and whether each column's name (as a JSON string, with or
    without escapes) appears in it, or starts in it."""
    start, end = int(batch["start"].iloc[0]), int(batch["end"].iloc[0])
    names = [{json.dumps(c).encode(), json.dumps(c, ensure_ascii=False).encode()} for c in columns]
    longest = max(len(n) for forms in names for n in forms)
    with open_input(path) as handle:
        handle.seek(start)
        data = handle.read(end - start)
        tail = data + handle.read(longest - 1)  # a name that starts here and ends past ``end``
    found = {f"has_{i}": [any(n in tail for n in forms)] for i, forms in enumerate(names)}
    return pd.DataFrame({"chunk": batch["chunk"], "newlines": [data.count(b"\n")], **found})


def _parse_jsonl_chunk(batch: pd.DataFrame, path: str, rule: RowCheck) -> pd.DataFrame:
    """The lines that start in one byte range of a JSONL file, parsed and checked: good rows
    (``_bad_reason`` "") numbered in the range (``_local``), bad ones with their reason."""
    chunk, start, end = (int(batch[k].iloc[0]) for k in ("chunk", "start", "end"))
    line = int(batch["first_line"].iloc[0])  # the number of the line holding byte ``start``
    with open_input(path) as handle:
        handle.seek(start)
        data = handle.read(end - start)
        if data and not data.endswith(b"\n"):
            data += handle.readline()  # the line that starts here and ends past ``end``
        if start > 0:
            handle.seek(start - 1)
            if handle.read(1) != b"\n":  # byte ``start`` is inside a line of the range before
                skip = data.find(b"\n") + 1
                if not skip:
                    return _checked_rows((), chunk, rule)
                data, start, line = data[skip:], start + skip, line + 1
    def numbered():
        offset = start
        for number, raw in enumerate(_lines(data), start=line):
            value = _json_line(raw, offset)
            offset += len(raw)
            if isinstance(value, tuple):
                yield number, None, value
            else:
                yield number, tuple(value.get(c) for c in rule.columns), None

    return _checked_rows(numbered(), chunk, rule)


def _lines(data: bytes):
    """The lines of ``data``, each with its ``\\n``, as a file opened in binary mode yields them
    (``bytes.splitlines`` would also break at a lone ``\\r``)."""
    start = 0
    while start < len(data):
        end = data.find(b"\n", start) + 1 or len(data)
        yield data[start:end]
        start = end


def _collect_bad_rows(parsed, path: Path, bad: BadRows, where: str, listed: int = 20) -> None:
    """The bad rows of a Ray Data read into ``bad``: the first ``listed`` of each reason by
    line, the others counted; raised in error mode."""
    from ray.data.expressions import col

    bad_rows = parsed.filter(expr=col("_bad_reason") != "")
    if not bad_rows.count():
        return
    counts = {r["_bad_reason"]: int(r["count()"]) for r in bad_rows.groupby("_bad_reason").count().take_all()}
    named = []
    for reason, count in sorted(counts.items()):
        first = bad_rows.filter(expr=col("_bad_reason") == reason).select_columns(
            ["_line", "_bad_message"]).to_pandas().nsmallest(listed, "_line")
        named += [(int(line), reason, message) for line, message in zip(first["_line"], first["_bad_message"])]
        if count > len(first):
            bad.unlisted[reason] = bad.unlisted.get(reason, 0) + count - len(first)
    for line, reason, message in sorted(named):  # in file order, as a read on the driver
        bad.add(where.format(path=path, n=line), reason, message)
    bad.raise_if_any()


def _good_per_chunk(batch: pd.DataFrame) -> pd.DataFrame:
    good = batch[batch["_bad_reason"] == ""]
    counts = good.groupby("_chunk").size()
    return pd.DataFrame({"_chunk": counts.index.astype("int64"), "rows": counts.to_numpy()})


def _numbered_good_rows(batch: pd.DataFrame, offsets: dict[int, int], where: str) -> pd.DataFrame:
    """The good rows with their number among the file's good rows (``_row``), and a deferred
    problem (if any) as ``"<where>: <message>"``."""
    good = batch[batch["_bad_reason"] == ""]
    row = good["_chunk"].map(offsets).astype("int64") + good["_local"].astype("int64")
    out = {"id": good["id"].to_numpy(), "text": good["text"].to_numpy()}
    if "label" in good.columns:
        out["label"] = good["label"].to_numpy()
    out["_row"] = row.to_numpy()
    if "_deferred_message" in good.columns:
        out["_deferred"] = [f"{where.format(n=int(line))}: {message}" if message else None
                            for line, message in zip(good["_line"], good["_deferred_message"])]
    return pd.DataFrame(out)


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


def records(frame: pd.DataFrame) -> list[dict]:
    """The frame's rows as dicts of Python values: ``frame.to_dict("records")``, built from
    each column's ``tolist()`` (about 10x faster in pandas 3, where ``to_dict`` boxes every
    value on its own: 9 s per million input rows in the teacher stage's planning)."""
    def values(column: pd.Series) -> list:
        found = column.tolist()
        if pd.api.types.is_extension_array_dtype(column.dtype):  # to_dict's None for pd.NA
            found = [None if value is pd.NA else value for value in found]
        return found

    columns = list(frame.columns)
    return [dict(zip(columns, row)) for row in zip(*(values(frame[c]) for c in columns))]


def read_inputs(job: JobConfig) -> tuple[InputRows | None, pd.DataFrame | None,
                                         dict[str, Any], dict[str, Any]]:
    """Read and check the training pool, the test split and the stages' own inputs.

    The pool and the unlabelled texts, which grow with the job, are read in Ray Data and stay
    there (:class:`InputRows`); the evaluation splits (test, and dev drawn down to
    ``student.max_dev_examples``) come to the driver, which evaluates the students on them.

    Returns:
        The pool, the test split, the stages' inputs by name, and the bad rows left out
        (``data.on_bad_rows: skip``; see :meth:`raydag.data.BadRows.summary`).

    Raises:
        DataError: a bad file, or (with ``on_bad_rows: error``) bad rows, naming file and line.
    """
    inputs: dict[str, Any] = {}
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
    labelled = {"text_column": data.text_column, "label_column": data.label_column,
                "labels": data.labels, "bad": bad, "max_text_chars": limit}
    pool = read_labelled_in_ray(data.train_path, **labelled, check=None if deferred else fits,
                                deferred_check=fits if deferred else None)
    test = read_labelled(data.test_path, **labelled)
    if data.dev_path:
        dev = read_labelled_in_ray(data.dev_path, **labelled)
        inputs["dev"] = (sample_in_ray(dev, job.student.max_dev_examples, job.seed)
                         if len(dev) > job.student.max_dev_examples else dev.to_pandas())
    if data.unlabelled_path:  # the one input that grows with the job: read in Ray Data
        inputs["unlabelled"] = read_texts_in_ray(data.unlabelled_path, data.text_column, bad=bad,
                                                 max_text_chars=limit, check=fits)
    if job.raw_examples > len(pool):
        raise DataError(f"{data.train_path}: raw_examples={job.raw_examples} but the pool has "
                        f"{len(pool)} rows" + (" left after skipping bad rows" if bad.rows else ""))
    return pool, test, inputs, bad.summary()


def sample_raw(pool: InputRows, job: JobConfig) -> pd.DataFrame:
    """The job's raw examples: a stratified sample of the pool (see
    :func:`raydag.data.sample_in_ray`).

    Raises:
        DataError: A sampled text does not fit the teacher's context (``file:line: reason``).
    """
    raw = sample_in_ray(pool, job.raw_examples, job.seed)
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


def context_check(job: JobConfig) -> "ContextCheck":
    """A check of one input text against the teacher's context (see
    :func:`teacher_tokens_per_text` and :class:`ContextCheck`)."""
    return ContextCheck(teacher_tokens_per_text(job), job.teacher.model, job.teacher.max_model_len,
                        active=job.teacher.engine == "vllm")


class ContextCheck:
    """Called with a text: ``(reason, message)`` for one with more teacher tokens than
    ``limit``, else None. Only texts with more UTF-8 bytes than the limit can have more
    tokens, so most texts are never tokenised, and the tokenizer loads only when one is
    needed. Picklable, so Ray Data read tasks check texts where they read them."""

    def __init__(self, limit: int, model: str, max_model_len: int, active: bool = True) -> None:
        self.limit, self.model, self.max_model_len, self.active = limit, model, max_model_len, active
        self._tokenizer: Any = False  # False: not loaded yet; None: not available here

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokenizer": False}

    def tokenizer(self):
        if self._tokenizer is False:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(resolve_model(self.model),
                                                                local_files_only=True)
            except Exception:  # a hub id not downloaded here: the engine checks it on the cluster
                self._tokenizer = None
        return self._tokenizer

    def __call__(self, text: str) -> tuple[str, str] | None:
        if not self.active or len(text.encode("utf-8")) <= self.limit or self.tokenizer() is None:
            return None
        count = len(self.tokenizer()(text, add_special_tokens=False)["input_ids"])
        if count <= self.limit:
            return None
        return "text_over_context", (
            f"the text has {count:,} teacher tokens, more than the {self.limit:,} one text may "
            f"take in the teacher's context (teacher.max_model_len={self.max_model_len})")
