"""A benchmark engine that answers every request at once, without a model.

``teacher.engine: instant`` exists for ``make bench-scale`` (:mod:`raydag.bench_scale`): with
the model's time taken out, a job's wall time is raydag's data plane (reading, planning,
shards, the quality passes, the write). It is never a teacher, and never stands in for the real
engine in a feature's test.

Answers are deterministic functions of the request: a constrained request (``choices``) gets
one of its choices, picked by a hash of the prompt, with probability 0.9 in its
log-probabilities; any other request gets its last message's words back, cut to
``max_tokens`` words. Token counts are word counts.

Example:
    >>> from raydag.engines.base import ChatRequest
    >>> engine = InstantEngine()
    >>> engine.generate([ChatRequest(messages=({"role": "user", "content": "a b c"},),
    ...                              max_tokens=2)])[0].text
    'a b'
"""

from __future__ import annotations

import hashlib
import math

from raydag.engines.base import ChatRequest, Completion

_CHOSEN_LOGPROB = math.log(0.9)


class InstantEngine:
    """The benchmark engine (see the module docstring)."""

    def __init__(self, model: str = "instant") -> None:
        self.model_name = model

    def generate(self, requests: list[ChatRequest]) -> list[Completion]:
        return [self._answer(request) for request in requests]

    @staticmethod
    def _answer(request: ChatRequest) -> Completion:
        prompt = "\n".join(str(m.get("content", "")) for m in request.messages)
        prompt_tokens = len(prompt.split())
        if request.choices:
            digest = hashlib.blake2b(prompt.encode("utf-8", "replace"), digest_size=8).digest()
            text = request.choices[int.from_bytes(digest, "little") % len(request.choices)]
            logprobs = (_CHOSEN_LOGPROB,) if request.logprobs else ()
            return Completion(text=text, prompt_tokens=prompt_tokens, completion_tokens=1,
                              finish_reason="stop", token_logprobs=logprobs)
        words = str(request.messages[-1].get("content", "")).split()[: request.max_tokens]
        return Completion(text=" ".join(words), prompt_tokens=prompt_tokens,
                          completion_tokens=len(words), finish_reason="stop")
