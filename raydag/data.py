"""Reading labelled data with Ray Data, checking it, and drawing the raw sample.

Files are read by extension (``.jsonl``/``.json``, ``.csv``, ``.parquet``). Every problem is a
:class:`DataError` naming the file and the line, row or column: a malformed JSON line, a missing
text or label column, an empty text, a label outside the job's label set, an empty file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from raydag.errors import DataError

_READERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def stable_hash(*parts: object, length: int = 16) -> str:
    """A short hex digest of the JSON form of ``parts``; equal inputs give equal ids."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:length]


def raw_row_id(text: str, label: str) -> str:
    """Stable id of a human-labelled row: it depends on its content only."""
    return stable_hash("raw", text, label)


def _find_bad_json_line(path: Path) -> str | None:
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                return f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})"
            if not isinstance(value, dict):
                return f"{path}:{number}: expected a JSON object, got {type(value).__name__}"
    return None


def _where(path: Path, index: int) -> str:
    # JSONL rows are lines (blank lines are rejected upstream); CSV has a header line.
    kind = _READERS[path.suffix.lower()]
    if kind == "json":
        return f"{path}:{index + 1}"
    if kind == "csv":
        return f"{path}:{index + 2}"
    return f"{path}: row {index}"


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read one data file with Ray Data, in file order.

    Raises:
        DataError: The file is missing, has an unknown extension, cannot be parsed, or is empty.
    """
    import ray

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    kind = _READERS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unknown file type '{path.suffix}'; use .jsonl, .csv or .parquet")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    if kind == "json":
        # pyarrow's reader rejects blank lines with an unhelpful message; name the line instead.
        with open(path, encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    raise DataError(f"{path}:{number}: blank line in a JSONL file")
    try:
        reader = getattr(ray.data, f"read_{kind}")
        frame = reader(str(path)).to_pandas()
    except Exception as err:  # Ray wraps reader errors in several types
        detail = _find_bad_json_line(path) if kind == "json" else None
        raise DataError(detail or f"{path}: cannot be read as {kind}: {err}") from None
    if frame.empty:
        raise DataError(f"{path}: no rows")
    return frame


def read_labelled(
    path: str | os.PathLike,
    text_column: str,
    label_column: str,
    labels: list[str],
) -> pd.DataFrame:
    """Read and check a labelled file; return columns ``id``, ``text``, ``label``.

    Raises:
        DataError: naming the file and line (or column) of the first problems found.
    """
    path = Path(path)
    frame = read_table(path)
    for column in (text_column, label_column):
        if column not in frame.columns:
            raise DataError(
                f"{path}: missing column '{column}' (columns found: {', '.join(map(str, frame.columns))})"
            )
    texts, raw_labels = frame[text_column], frame[label_column]
    problems = []
    known = set(labels)
    for index, (text, label) in enumerate(zip(texts, raw_labels)):
        if not isinstance(text, str) or not text.strip():
            problems.append(f"{_where(path, index)}: empty or missing '{text_column}'")
        if label is None or (isinstance(label, float) and math.isnan(label)):
            problems.append(f"{_where(path, index)}: missing '{label_column}'")
        elif str(label) not in known:
            problems.append(
                f"{_where(path, index)}: label '{label}' is not in the job's labels {labels}"
            )
        if len(problems) >= 5:
            break
    if problems:
        raise DataError("\n".join(problems))
    out = pd.DataFrame({"text": texts.astype(str), "label": raw_labels.astype(str)})
    out.insert(0, "id", [raw_row_id(t, lab) for t, lab in zip(out["text"], out["label"])])
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


def read_texts(path: str | os.PathLike, required: list[str], optional: list[str] = ()) -> pd.DataFrame:
    """Read a file of texts (unlabelled texts, seed tasks) and check its string columns.

    Returns:
        The ``required`` and ``optional`` columns (missing optional ones as ""), plus ``id``:
        a hash of the row's content.

    Raises:
        DataError: a missing column, or an empty or non-string required value (``file:line``).
    """
    path = Path(path)
    frame = read_table(path)
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing} (columns found: "
                        f"{', '.join(map(str, frame.columns))})")
    problems = []
    for column in required:
        for index, value in enumerate(frame[column]):
            if not isinstance(value, str) or not value.strip():
                problems.append(f"{_where(path, index)}: empty or missing '{column}'")
                if len(problems) >= 5:
                    raise DataError("\n".join(problems))
    if problems:
        raise DataError("\n".join(problems))
    out = pd.DataFrame({c: frame[c].astype(str) for c in required})
    for column in optional:
        out[column] = frame[column].fillna("").astype(str) if column in frame.columns else ""
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
