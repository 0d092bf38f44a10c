"""The engine seam: what an operator asks of an LLM, and what it gets back.

Operators build :class:`ChatRequest` objects and parse :class:`Completion` objects; they never
know which engine ran them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class ChatRequest:
    """One chat generation.

    Attributes:
        messages: Chat messages (``{"role": ..., "content": ...}``).
        max_tokens: Most new tokens.
        temperature: Sampling temperature.
        top_p: Nucleus sampling mass.
        seed: Per-request seed, so a request gives the same text in any batch.
        stop: Strings that end the generation (not included in the text).
        continue_final_message: The last message is a partial assistant turn to continue.
        choices: When set, decoding is constrained to exactly one of these strings (vLLM
            structured outputs), so the answer is always one of them.
        logprobs: Top log-probabilities to return per generated token (0: none). They are the
            model's raw distribution, before sampling settings or constraints.
        regex: When set, decoding is constrained to text that matches this regular expression
            (vLLM structured outputs), so an answer always has the asked-for shape.
    """

    messages: tuple[dict, ...]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    continue_final_message: bool = False
    choices: tuple[str, ...] = field(default_factory=tuple)
    logprobs: int = 0
    regex: str | None = None


@dataclass(frozen=True)
class Completion:
    """The engine's answer to one :class:`ChatRequest`.

    Attributes:
        text: Generated text (stop strings excluded).
        prompt_tokens: Tokens in the prompt.
        completion_tokens: Tokens generated.
        finish_reason: ``stop``, ``length`` or None.
        top_logprobs: When the request asked for log-probabilities, one mapping per generated
            token from token text to log-probability (the sampled token included).
        token_logprobs: Log-probability of each generated token.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    top_logprobs: tuple[dict[str, float], ...] = field(default_factory=tuple)
    token_logprobs: tuple[float, ...] = field(default_factory=tuple)


class Engine(Protocol):
    """Anything that turns a batch of chat requests into completions, in order."""

    model_name: str

    def generate(self, requests: list[ChatRequest]) -> list[Completion]:
        """Run every request and return one completion per request, in the same order."""
        ...
