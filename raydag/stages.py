"""Ray Data glue: a callable class that owns an engine and runs a pure operator over batches."""

from __future__ import annotations

import json
import time
from typing import Any, Iterable

import pandas as pd

from raydag.errors import ColumnContractError
from raydag.filters.exact import apply_row_filters, drop_synthetic_duplicates


def check_columns(stage: str, required: Iterable[str], available: Iterable[str]) -> None:
    """Raise before any work runs when ``stage`` needs a column its input lacks."""
    available = set(available)
    missing = [c for c in required if c not in available]
    if missing:
        raise ColumnContractError(
            f"stage '{stage}' needs column(s) {missing}, but its input has {sorted(available)}"
        )


def check_chain(columns: Iterable[str], stages: list[tuple[str, Iterable[str], Iterable[str]]]) -> None:
    """Check a chain of ``(name, requires, adds)`` stages against the first stage's input columns.

    Raises:
        ColumnContractError: naming the first stage and column that would be missing.
    """
    available = set(columns)
    for name, requires, adds in stages:
        check_columns(name, requires, available)
        available |= set(adds)


# Declared columns of the stages below (see check_chain).
FILTER_REQUIRES = ("text", "_parse_error", "request_index")
FILTER_ADDS = ("_status", "_reason", "_norm")


class GenerateStage:
    """Ray Data actor: builds requests with ``op``, runs them on the engine, parses the results.

    Each output row is the input row plus the op's columns and ``prompt_hash``,
    ``_raw_generation``, ``tokens_in``, ``tokens_out``, ``finish_reason``, ``sampling``, ``_engine_seconds`` (this row's share
    of its batch's generate time) and ``_batch_started_at`` (wall clock).

    Args:
        op: A pure operator with ``build_request``, ``parse`` and ``prompt_hash``.
        engine_kwargs: Arguments for :class:`raydag.engines.VLLMEngine`.
        engine: An engine to use instead of building one (tests of the columns use this).
    """

    adds = ("prompt_hash", "sampling", "_raw_generation", "tokens_in", "tokens_out",
            "finish_reason", "_engine_seconds", "_batch_started_at")

    def __init__(self, op: Any, engine_kwargs: dict, engine: Any = None) -> None:
        from raydag.engines.vllm import VLLMEngine

        self.op = op
        self.engine = engine if engine is not None else VLLMEngine(**engine_kwargs)
        self._rows_done = 0

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = batch.to_dict("records")
        requests = [self.op.build_request(row) for row in rows]
        started_at = time.time()
        started = time.perf_counter()
        completions = self.engine.generate(requests)
        seconds = time.perf_counter() - started
        seconds_per_row = seconds / max(len(rows), 1)
        self._rows_done += len(rows)
        tokens = sum(c.completion_tokens for c in completions)
        print(f"raydag: [teacher] {self._rows_done} rows done by this engine; last batch "
              f"{len(rows)} rows in {seconds:.1f}s ({tokens / max(seconds, 1e-9):.0f} output tok/s)",
              flush=True)
        out = []
        for row, request, completion in zip(rows, requests, completions):
            sampling = {"temperature": request.temperature, "top_p": request.top_p,
                        "max_tokens": request.max_tokens, "stop": list(request.stop)}
            out.append(
                {
                    **row,
                    **self.op.parse(row, completion),
                    "prompt_hash": self.op.prompt_hash(request),
                    "sampling": json.dumps(sampling, sort_keys=True),
                    "_raw_generation": completion.text,
                    "tokens_in": completion.prompt_tokens,
                    "tokens_out": completion.completion_tokens,
                    "finish_reason": completion.finish_reason or "",
                    "_engine_seconds": seconds_per_row,
                    "_batch_started_at": started_at,
                }
            )
        return pd.DataFrame(out)


def filter_generations(generated, **filter_kwargs):
    """Per-row filters, then exact deduplication across all rows (a Ray Data groupby).

    Args:
        generated: A Ray Data dataset of parsed generations (``text``, ``_parse_error``,
            ``request_index``).
        **filter_kwargs: Arguments of :func:`raydag.filters.exact.apply_row_filters`.

    Returns:
        The dataset with ``_status``, ``_reason`` and ``_norm`` on every row; nothing removed.
    """
    checked = generated.map_batches(apply_row_filters, fn_kwargs=filter_kwargs,
                                    batch_format="pandas")
    return checked.groupby("_norm").map_groups(drop_synthetic_duplicates, batch_format="pandas")
