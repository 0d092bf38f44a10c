"""Engines behind one seam: :class:`Engine` turns chat requests into completions."""

from raydag.engines.base import ChatRequest, Completion, Engine
from raydag.engines.vllm import VLLMEngine

__all__ = ["ChatRequest", "Completion", "Engine", "VLLMEngine"]
