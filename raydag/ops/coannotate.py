"""Co-annotation: route teacher-labelled rows by uncertainty, and exchange them with Label Studio.

After the labelling stage (:mod:`raydag.ops.label`) every row has ``label``,
``label_confidence``, ``label_margin`` and, with self-consistency votes, ``label_votes``.
:func:`uncertainty` turns those into one number in [0, 1]; :func:`route` sends each row to
``auto`` (keep the teacher's label), ``human`` (a person decides) or ``drop``, with a budget
for the human queue. The human queue goes to Label Studio as a task file
(:func:`label_studio_tasks`, with the teacher's label as a pre-annotation) for a project set
up with :func:`label_studio_config`; the project's JSON export comes back through
:func:`read_label_studio_export`.

Label Studio formats followed (Label Studio 1.x documentation):
    * Import with pre-annotations, "Import pre-annotated data into Label Studio"
      (https://labelstud.io/guide/predictions): a list of tasks ``{"data": {...},
      "predictions": [{"model_version", "score", "result": [{"from_name", "to_name",
      "type": "choices", "value": {"choices": [...]}}]}]}``.
    * Export, "Label Studio JSON format of annotated tasks"
      (https://labelstud.io/guide/task_format): a list of tasks ``{"id", "data",
      "annotations": [{"id", "result": [...], "was_cancelled", "created_at", "updated_at",
      "completed_by", ...}], "predictions": [...]}``; ``completed_by`` is a user id (an object
      with ``id`` and ``email`` in some versions; both are read).
    * Labelling interface: the ``Text`` object tag and the ``Choices`` control tag
      (https://labelstud.io/tags/choices).

Example:
    >>> from raydag.ops.coannotate import route, uncertainty
    >>> rows = [{"label": "a", "label_margin": 0.9}, {"label": "b", "label_votes": '["b", "a"]'}]
    >>> [round(uncertainty(r), 2) for r in rows]
    [0.1, 1.0]
    >>> route([0.1, 1.0, 0.5], accept_below=0.3, drop_above=0.95, human_budget=5)
    ['auto', 'drop', 'human']
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from xml.sax.saxutils import quoteattr

from raydag.errors import DataError

MEASURES = ("auto", "entropy", "margin")
# The names that tie the tasks, the labelling interface and the export together.
LS_TEXT_NAME = "text"
LS_CHOICES_NAME = "label"


def _votes(row: dict) -> list | None:
    """The row's votes as a list (``label_votes`` holds a JSON list), or None when absent."""
    value = row.get("label_votes")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"label_votes is not a JSON list: {value[:80]!r} ({error})") from None
    if not isinstance(value, (list, tuple)) and not hasattr(value, "tolist"):
        raise ValueError(f"label_votes must be a list of labels, got {type(value).__name__}")
    return list(value.tolist() if hasattr(value, "tolist") else value)


def _vote_entropy(votes: list, num_labels: int | None) -> float:
    # An answer outside the label set (None in label_votes) is one more possible outcome.
    counts = Counter(vote if isinstance(vote, str) else None for vote in votes)
    outcomes = (num_labels + (None in counts)) if num_labels else len(counts)
    most_possible = min(len(votes), outcomes)
    if most_possible < 2:
        return 0.0
    entropy = -sum(n / len(votes) * math.log(n / len(votes)) for n in counts.values())
    return min(max(entropy / math.log(most_possible), 0.0), 1.0)


def uncertainty(row: dict, *, measure: str = "auto", num_labels: int | None = None) -> float:
    """How unsure the teacher was about a row's label, from 0 (sure) to 1.

    Measures:
        ``entropy``: the entropy of the vote distribution in ``label_votes`` (a JSON list,
            2+ votes), divided by its largest possible value, ``log(min(votes, outcomes))``.
            Outcomes are the ``num_labels`` labels when given, else the distinct votes seen
            (then any split among two labels scores 1 however many labels exist: pass
            ``num_labels`` for a stricter scale). A vote outside the label set (``null``)
            counts as one more outcome. Unanimous votes give 0, an even split gives 1.
        ``margin``: ``1 - label_margin``, the gap between the two most likely labels' renormalised
            probabilities, clipped to [0, 1].
        ``auto``: ``entropy`` when the row has 2+ votes, else ``margin``.

    Args:
        row: A labelled row.
        measure: ``auto``, ``entropy`` or ``margin``.
        num_labels: Size of the label set (for the entropy scale).

    Returns:
        The uncertainty in [0, 1].

    Raises:
        ValueError: an unknown measure, or the column the measure needs is missing, not a
            number (``label_margin`` is NaN when the engine gave no log-probabilities) or
            malformed; the message names the column.

    Example:
        >>> uncertainty({"label_votes": '["pos", "pos", "neg", "neg"]'}, measure="entropy")
        1.0
        >>> round(uncertainty({"label_margin": 0.75}, measure="margin"), 2)
        0.25
    """
    if measure not in MEASURES:
        raise ValueError(f"unknown uncertainty measure '{measure}'; "
                         f"use one of {', '.join(MEASURES)}")
    if num_labels is not None and num_labels < 1:
        raise ValueError(f"num_labels must be at least 1, got {num_labels}")
    votes = _votes(row) if measure != "margin" else None
    if measure == "entropy" or (measure == "auto" and votes is not None and len(votes) >= 2):
        if votes is None:
            raise ValueError("uncertainty measure 'entropy' needs the column label_votes "
                             "(label with votes > 1)")
        if len(votes) < 2:
            raise ValueError(f"uncertainty measure 'entropy' needs 2+ votes in label_votes, "
                             f"found {len(votes)}")
        return _vote_entropy(votes, num_labels)
    margin = row.get("label_margin")
    if margin is None:
        raise ValueError(
            "uncertainty needs the column label_margin (or label_votes with 2+ votes)"
            if measure == "auto" else "uncertainty measure 'margin' needs the column label_margin")
    margin = float(margin)
    if math.isnan(margin):
        raise ValueError("label_margin is NaN (the engine returned no log-probabilities); "
                         "label with votes > 1 and use measure 'entropy'")
    return min(max(1.0 - margin, 0.0), 1.0)


def route(uncertainties: list[float], *, accept_below: float, drop_above: float,
          human_budget: int, overflow: str = "accept") -> list[str]:
    """Send each item to ``auto``, ``human`` or ``drop`` by its uncertainty.

    An item is ``auto`` when ``u < accept_below``, ``drop`` when ``u > drop_above`` and
    ``human`` otherwise. When more than ``human_budget`` items are ``human``, the most uncertain
    ones stay (equal uncertainties: the earlier item first) and the rest go to ``overflow``.

    Args:
        uncertainties: One value in [0, 1] per item (see :func:`uncertainty`).
        accept_below: Items below this are accepted with the teacher's label.
        drop_above: Items above this are dropped.
        human_budget: The most items sent to people (0 sends none).
        overflow: Where human items beyond the budget go: ``accept`` (``auto``) or ``drop``.

    Returns:
        One of ``auto``, ``human``, ``drop`` per item, in input order.

    Raises:
        ValueError: thresholds outside ``0 <= accept_below <= drop_above <= 1``, a negative
            budget, an unknown overflow, or an uncertainty that is NaN or outside [0, 1].

    Example:
        >>> route([0.9, 0.5, 0.7, 0.05], accept_below=0.1, drop_above=1.0, human_budget=2,
        ...       overflow="drop")
        ['human', 'drop', 'human', 'auto']
    """
    if not 0.0 <= accept_below <= drop_above <= 1.0:
        raise ValueError(f"thresholds must satisfy 0 <= accept_below <= drop_above <= 1, got "
                         f"accept_below={accept_below}, drop_above={drop_above}")
    if isinstance(human_budget, bool) or not isinstance(human_budget, int) or human_budget < 0:
        raise ValueError(f"human_budget must be a whole number >= 0, got {human_budget!r}")
    if overflow not in ("accept", "drop"):
        raise ValueError(f"overflow must be 'accept' or 'drop', got '{overflow}'")
    for index, value in enumerate(uncertainties):
        if not 0.0 <= value <= 1.0:  # also false for NaN
            raise ValueError(f"uncertainty of item {index} must be in [0, 1], got {value}")
    routes = ["auto" if u < accept_below else "drop" if u > drop_above else "human"
              for u in uncertainties]
    human = [i for i, r in enumerate(routes) if r == "human"]
    if len(human) > human_budget:
        # sorted() is stable: equal uncertainties keep input order.
        for index in sorted(human, key=lambda i: -uncertainties[i])[human_budget:]:
            routes[index] = "auto" if overflow == "accept" else "drop"
    return routes


def _check_labels(labels: list[str]) -> list[str]:
    labels = list(labels)
    if not labels or not all(isinstance(x, str) and x for x in labels):
        raise ValueError(f"labels must be a non-empty list of non-empty strings, got {labels!r}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels must be unique, got {labels!r}")
    return labels


def label_studio_config(labels: list[str]) -> str:
    """The Label Studio labelling interface for choosing one label per text.

    Paste it into the project's Settings > Labeling Interface > Code. The names ``text`` and
    ``label`` match :func:`label_studio_tasks` and :func:`read_label_studio_export`.

    Args:
        labels: The label set, in display order.

    Returns:
        The interface XML.

    Raises:
        ValueError: an empty label set, an empty label or a repeated label.

    Example:
        >>> print(label_studio_config(["billing", "R&D"]))
        <View>
          <Text name="text" value="$text"/>
          <Choices name="label" toName="text" choice="single" showInLine="true" required="true">
            <Choice value="billing"/>
            <Choice value="R&amp;D"/>
          </Choices>
        </View>
    """
    choices = "".join(f"    <Choice value={quoteattr(label)}/>\n"
                      for label in _check_labels(labels))
    return (f'<View>\n  <Text name="{LS_TEXT_NAME}" value="${LS_TEXT_NAME}"/>\n'
            f'  <Choices name="{LS_CHOICES_NAME}" toName="{LS_TEXT_NAME}" choice="single" '
            f'showInLine="true" required="true">\n{choices}  </Choices>\n</View>')


def label_studio_tasks(rows: list[dict], *, model_version: str,
                       text_column: str = "text") -> list[dict]:
    """Label Studio import tasks for the human queue, the teacher's label pre-selected.

    Each task is ``{"data": {"text", "raydag_id"}, "predictions": [{"model_version", "score",
    "result": [<the teacher's choice>]}]}``; ``score`` (the label confidence, which Label
    Studio can sort tasks by) is left out when the row has none. Tasks carry no ``id``: Label
    Studio assigns its own, and ``raydag_id`` ties a task back to its row.

    Args:
        rows: Rows with ``id``, ``label``, the text column and optionally ``label_confidence``.
        model_version: Shown in Label Studio as the prediction's model (e.g. the teacher's name).
        text_column: Column holding the text to label.

    Returns:
        The tasks, ready for ``json.dump`` and Label Studio's import.

    Raises:
        DataError: a row without ``id``, ``label`` or text (the message names the row).

    Example:
        >>> task = label_studio_tasks([{"id": "r1", "text": "Where is my parcel?",
        ...                             "label": "shipping", "label_confidence": 0.61}],
        ...                            model_version="qwen")[0]
        >>> task["data"], task["predictions"][0]["result"][0]["value"]
        ({'text': 'Where is my parcel?', 'raydag_id': 'r1'}, {'choices': ['shipping']})
    """
    tasks = []
    for index, row in enumerate(rows):
        missing = [c for c in ("id", "label", text_column) if not isinstance(row.get(c), str)]
        if missing:
            raise DataError(f"row {index} (id {row.get('id')!r}) cannot become a Label Studio "
                            f"task: missing or non-string column(s) {missing}")
        prediction = {
            "model_version": model_version,
            "result": [{"from_name": LS_CHOICES_NAME, "to_name": LS_TEXT_NAME, "type": "choices",
                        "value": {"choices": [row["label"]]}}],
        }
        score = row.get("label_confidence")
        usable = isinstance(score, numbers.Real) and not isinstance(score, bool)
        if usable and not math.isnan(score):
            prediction["score"] = float(score)
        tasks.append({"data": {LS_TEXT_NAME: row[text_column], "raydag_id": row["id"]},
                      "predictions": [prediction]})
    return tasks


def _timestamp(annotation: dict, where: str) -> tuple[datetime, str | None]:
    raw = annotation.get("updated_at") or annotation.get("created_at")
    if not raw:
        return datetime.min.replace(tzinfo=timezone.utc), None
    try:
        when = datetime.fromisoformat(str(raw).replace("Z", "+00:00"))
    except ValueError:
        raise DataError(f"{where}: unreadable annotation time {raw!r}") from None
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)), str(raw)


def _annotator(annotation: dict) -> str | None:
    who = annotation.get("completed_by")
    if isinstance(who, dict):  # some versions export the user object
        who = who.get("email") or who.get("id")
    return None if who is None else str(who)


def _chosen_label(annotation: dict, labels: list[str], where: str) -> str:
    results = annotation.get("result") or []
    choices = [choice for item in results
               if item.get("type") == "choices" and item.get("from_name") == LS_CHOICES_NAME
               for choice in (item.get("value") or {}).get("choices") or []]
    if not choices:
        found = sorted({str(item.get("from_name")) for item in results})
        raise DataError(f"{where}: the annotation has no choice for '{LS_CHOICES_NAME}'"
                        + (f" (controls found: {', '.join(found)})" if found else ""))
    if len(choices) > 1:
        raise DataError(f"{where}: more than one choice {choices}; one label per text is expected")
    if choices[0] not in labels:
        raise DataError(f"{where}: unknown label '{choices[0]}'; "
                        f"allowed labels: {', '.join(labels)}")
    return choices[0]


def read_label_studio_export(data: list[dict] | str | os.PathLike,
                             labels: list[str]) -> tuple[list[dict], dict[str, int]]:
    """Read the human labels from a Label Studio JSON export.

    For each task, the latest annotation (by ``updated_at``, else ``created_at``; equal times:
    the later one in the list) among those not cancelled gives the label. Tasks without
    annotations (``annotations``, or ``completions`` in exports before Label Studio 1.0) are
    skipped, and so are tasks whose annotations were all cancelled (skipped); both are counted.

    Args:
        data: The parsed export (a list of tasks) or the path of the export file.
        labels: The job's label set; every human label must be one of these.

    Returns:
        The human labels, one record per labelled task in export order, each
        ``{"id": raydag_id, "label", "annotator": completed_by as text (the e-mail when
        exported), "annotated_at": the annotation's time as exported, "task_id": Label
        Studio's task id}``; and the counts ``{"tasks", "labelled", "skipped_unannotated",
        "cancelled"}``.

    Raises:
        DataError: an unreadable file, a malformed task, or a labelled task with no
            ``data.raydag_id``, no choice, more than one choice, an unknown label (the
            allowed ones are listed) or a ``raydag_id`` already labelled by another task; the
            message names the task by position and id.
        ValueError: an empty or repeated label set.

    Example:
        >>> export = [{"id": 7, "data": {"text": "hi", "raydag_id": "r1"}, "annotations": [
        ...     {"completed_by": 2, "was_cancelled": False, "updated_at": "2026-01-05T10:00:00Z",
        ...      "result": [{"from_name": "label", "to_name": "text", "type": "choices",
        ...                  "value": {"choices": ["billing"]}}]}]}]
        >>> records, counts = read_label_studio_export(export, ["billing", "shipping"])
        >>> records[0]["id"], records[0]["label"], records[0]["annotator"], counts["labelled"]
        ('r1', 'billing', '2', 1)
    """
    labels = _check_labels(labels)
    source = ""
    if isinstance(data, (str, os.PathLike)):
        source = f"{data}: "
        try:
            data = json.loads(Path(data).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DataError(f"{source}cannot read the Label Studio export ({error})") from None
    if not isinstance(data, list):
        raise DataError(f"{source}a Label Studio JSON export is a list of tasks, "
                        f"got {type(data).__name__}")
    records, counts = [], {"tasks": len(data), "labelled": 0, "skipped_unannotated": 0,
                           "cancelled": 0}
    labelled_by: dict[str, str] = {}
    for index, task in enumerate(data):
        if not isinstance(task, dict):
            raise DataError(f"{source}Label Studio task #{index}: expected an object, "
                            f"got {type(task).__name__}")
        where = f"{source}Label Studio task #{index} (id {task.get('id')})"
        annotations = task.get("annotations", task.get("completions")) or []
        if not isinstance(annotations, list) or not all(isinstance(a, dict) for a in annotations):
            raise DataError(f"{where}: 'annotations' must be a list of objects")
        if not annotations:
            counts["skipped_unannotated"] += 1
            continue
        live = [a for a in annotations if not a.get("was_cancelled")]
        if not live:
            counts["cancelled"] += 1
            continue
        raydag_id = (task.get("data") or {}).get("raydag_id")
        if not isinstance(raydag_id, str) or not raydag_id:
            raise DataError(f"{where}: missing data.raydag_id, so the label cannot be matched "
                            f"to a row (was the task file made by raydag?)")
        where = f"{where[:-1]}, raydag_id {raydag_id})"
        stamped = [(_timestamp(a, where), position, a) for position, a in enumerate(live)]
        (_, annotated_at), _, latest = max(stamped, key=lambda item: (item[0][0], item[1]))
        label = _chosen_label(latest, labels, where)
        if raydag_id in labelled_by:
            raise DataError(f"{where}: raydag_id already labelled by {labelled_by[raydag_id]} "
                            f"(was the task file imported twice?)")
        labelled_by[raydag_id] = f"task #{index} (id {task.get('id')})"
        records.append({"id": raydag_id, "label": label, "annotator": _annotator(latest),
                        "annotated_at": annotated_at, "task_id": task.get("id")})
        counts["labelled"] += 1
    return records, counts
