"""What every teacher operator is: a pure mapping from rows to chat requests and back.

An operator imports no Ray, vLLM or HTTP client. The stage runner (:mod:`raydag.stages`) sends
the requests to whichever engine the job names and hands the completions back to ``parse``.

``parse`` returns a list of output rows for one input row: none (the row is consumed), one
(the usual case) or several (for example ``n`` paraphrases). Each output row holds only the
columns the operator sets; the runner merges it onto the input row. An output row may set
``_status`` (``accepted`` when absent, ``dropped`` or ``quarantined``) and ``_reason``.
Operators that make new rows (``creates_rows = True``) give each one an ``id`` and
``parent_ids`` (see :func:`derived_id`); the runner adds ``method``, ``prompt_hash``,
``sampling`` and ``seed`` lineage from the request that produced the row.

Example:
    >>> from raydag.ops.base import reject
    >>> reject("empty_generation", status="quarantined")
    {'_status': 'quarantined', '_reason': 'empty_generation'}
"""

from __future__ import annotations

import math
import re
from typing import Protocol

from raydag.data import stable_hash
from raydag.engines.base import ChatRequest, Completion

DROPPED, QUARANTINED = "dropped", "quarantined"

_NUMBERING = re.compile(r"^\s*(?:\d+\s*[.):-]|[-*•])\s*")
_PREFIX = re.compile(
    r"^\s*(?:text|message|example|new example|input|rewrite|rewritten|paraphrase|edited|edit)"
    r"\s*(?:text|message)?\s*:\s*", re.IGNORECASE)
_REFUSAL = re.compile(
    r"^\s*(?:as an ai\b|(?:i'?m sorry,? but )?i (?:can'?t|cannot|am unable to|'m unable to|won'?t) "
    r"(?:help|assist|provide|create|generate|write|comply)\b)",
    re.IGNORECASE,
)  # narrow on purpose: support messages often start with "I can't find..." or "I'm sorry to..."
_QUOTES = "\"'“”‘’`"


class Operator(Protocol):
    """A pure teacher operator (see the module docstring)."""

    name: str  # lineage method name, e.g. "create.few_shot_3"
    requires: tuple[str, ...]  # columns the input rows must have
    adds: tuple[str, ...]  # columns the output rows gain
    creates_rows: bool  # output rows are new examples with their own ids

    def build_requests(self, row: dict) -> list[ChatRequest]:
        """The chat requests for one input row (one or more)."""
        ...

    def parse(self, row: dict, completions: list[Completion]) -> list[dict]:
        """Output rows for one input row, from its completions in request order."""
        ...


def reject(reason: str, status: str = DROPPED, **columns) -> dict:
    """An output row that leaves the chain: ``dropped`` or ``quarantined`` with a reason."""
    return {**columns, "_status": status, "_reason": reason}


def derived_id(method: str, parent: str, index: int, *content: object) -> str:
    """Stable id of a row made by ``method`` from ``parent``: same inputs, same id."""
    return stable_hash(method, parent, index, *content)


def clean_line(text: str) -> str:
    """First non-empty line of a generation without list numbering, a label prefix or quotes."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    line = _NUMBERING.sub("", line, count=1)
    line = _PREFIX.sub("", line, count=1).strip()
    if len(line) >= 2 and line[0] in _QUOTES and line[-1] in _QUOTES:
        line = line[1:-1].strip()
    return line


def text_problem(text: str, completion: Completion, labels: list[str] = ()) -> str | None:
    """Why a generated text cannot be used (a quarantine reason), or None."""
    if not text:
        return "empty_generation"
    if completion.finish_reason == "length":
        return "truncated_at_max_tokens"
    if _REFUSAL.match(text):
        return "refusal"
    if text.strip(" .:\"'").lower() in {label.lower() for label in labels}:
        return "label_only"
    return None


def choice_distribution(completion: Completion, choices: list[str]) -> dict[str, float] | None:
    """Probabilities of each choice, read from the first generated token's log-probabilities.

    Each choice is identified by its first token; the probabilities of the choices seen among
    the top tokens are renormalised to sum to 1 (choices not seen get 0). Returns None when two
    choices cannot be told apart by their first token or no choice is among the top tokens.
    """
    if not completion.top_logprobs:
        return None
    probs = {choice: 0.0 for choice in choices}
    for token, logprob in completion.top_logprobs[0].items():
        piece = token.strip().lower()
        if not piece:
            continue
        matches = [c for c in choices if c.lower().startswith(piece)]
        if len(matches) > 1:
            return None  # ambiguous first token (for example "neg" of "negative"/"neutral")
        if matches:
            probs[matches[0]] += math.exp(logprob)
    total = sum(probs.values())
    if total <= 0:
        return None
    return {choice: p / total for choice, p in probs.items()}
