"""Data creation: few-shot, class-conditioned generation of labelled examples.

The operator is pure: it plans requests from raw rows, turns a request row into a
:class:`ChatRequest`, and parses a :class:`Completion` back into columns. It imports no Ray,
vLLM or transformers.

The prompt asks for texts of one target label and pre-fills the assistant's turn with a numbered
list of demonstrations of that label, ending at the next number; the teacher continues the list
with one new item and stops at the newline. Small teachers stay on task far better this way than
when asked to answer free-form.

Example:
    >>> from raydag.ops.create import FewShotCreateOp
    >>> op = FewShotCreateOp(task="Route support messages.", labels=["billing", "shipping"])
    >>> plan = op.plan_requests([{"id": "r1", "text": "Refund me", "label": "billing"}], 2, seed=0)
    >>> [row["target_label"] for row in plan]
    ['billing', 'shipping']
"""

from __future__ import annotations

import random
import re
from raydag.config import SamplingConfig
from raydag.data import stable_hash
from raydag.engines.base import ChatRequest, Completion

SYSTEM_PROMPT = "You write realistic, varied example texts for a text classification dataset."

_NUMBERING = re.compile(r"^\s*(?:\d+\s*[.):-]|[-*•])\s*")
_PREFIX = re.compile(r"^\s*(?:text|message|example|new example|input)\s*:\s*", re.IGNORECASE)
_REFUSAL = re.compile(
    r"^\s*(?:as an ai\b|(?:i'?m sorry,? but )?i (?:can'?t|cannot|am unable to|'m unable to|won'?t) "
    r"(?:help|assist|provide|create|generate|write|comply)\b)",
    re.IGNORECASE,
)  # narrow on purpose: support messages often start with "I can't find..." or "I'm sorry to..."
_QUOTES = "\"'“”‘’`"


class FewShotCreateOp:
    """Few-shot (k demonstrations, k=0 for zero-shot) class-conditioned data creation.

    Args:
        task: One-sentence task description.
        labels: The label set.
        shots: Demonstrations per request, drawn from raw rows of the target label.
        sampling: Decoding settings; defaults to temperature 0.9, top-p 0.95, 80 tokens.

    Columns:
        requires: ``request_id``, ``target_label``, ``demo_texts``, ``request_seed``.
        adds: ``text``, ``label``, ``_parse_error``.
    """

    name = "create.few_shot"
    requires = ("request_id", "target_label", "demo_texts", "request_seed")
    adds = ("text", "label", "_parse_error")

    def __init__(
        self,
        task: str,
        labels: list[str],
        shots: int = 3,
        sampling: SamplingConfig | None = None,
    ) -> None:
        self.task = task
        self.labels = list(labels)
        self.shots = shots
        self.sampling = sampling or SamplingConfig()

    @property
    def method(self) -> str:
        """Lineage name of the method, e.g. ``create.few_shot_3`` or ``create.zero_shot``."""
        return "create.zero_shot" if self.shots == 0 else f"create.few_shot_{self.shots}"

    def label_counts(self, num_examples: int) -> dict[str, int]:
        """Requests per label: balanced, the remainder going to the first labels."""
        base, extra = divmod(num_examples, len(self.labels))
        return {label: base + (i < extra) for i, label in enumerate(self.labels)}

    def plan_requests(self, raw_rows: list[dict], num_examples: int, seed: int) -> list[dict]:
        """Plan ``num_examples`` request rows, each naming its target label and demonstrations.

        Args:
            raw_rows: Raw examples with ``id``, ``text`` and ``label``.
            num_examples: Requests to plan (M).
            seed: Seed; request ``i`` draws its demonstrations with its own derived seed.

        Returns:
            Request rows in a fixed, interleaved label order.
        """
        by_label: dict[str, list[dict]] = {label: [] for label in self.labels}
        for row in raw_rows:
            by_label.setdefault(row["label"], []).append(row)
        counts = self.label_counts(num_examples)
        # Interleave labels so every batch (and every prefix of the run) is balanced.
        order: list[str] = []
        remaining = dict(counts)
        while any(remaining.values()):
            for label in self.labels:
                if remaining[label]:
                    order.append(label)
                    remaining[label] -= 1
        plan = []
        for index, label in enumerate(order):
            request_seed = int(stable_hash(seed, index, label, length=8), 16)
            pool = by_label.get(label, [])
            demos = random.Random(request_seed).sample(pool, min(self.shots, len(pool)))
            plan.append(
                {
                    "request_id": stable_hash(self.method, seed, index, label),
                    "request_index": index,
                    "target_label": label,
                    "demo_ids": [d["id"] for d in demos],
                    "demo_texts": [d["text"] for d in demos],
                    "request_seed": request_seed,
                }
            )
        return plan

    def build_request(self, row: dict) -> ChatRequest:
        """Turn a request row into a chat request that continues a numbered list."""
        label = row["target_label"]
        demos = list(row["demo_texts"])
        listing = "".join(f"{i + 1}. {' '.join(str(d).split())}\n" for i, d in enumerate(demos))
        user = (
            f"Task: {self.task}\n"
            f"Possible labels: {', '.join(self.labels)}.\n"
            f'Write realistic texts whose label is "{label}", one per line. '
            "Each must be different from the others in wording and topic."
        )
        return ChatRequest(
            messages=(
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": user},
                {"role": "assistant", "content": f"{listing}{len(demos) + 1}."},
            ),
            max_tokens=self.sampling.max_tokens,
            temperature=self.sampling.temperature,
            top_p=self.sampling.top_p,
            seed=int(row["request_seed"]),
            stop=("\n",),
            continue_final_message=True,
        )

    def prompt_hash(self, request: ChatRequest) -> str:
        """Hash of the exact messages sent to the teacher."""
        return stable_hash(list(request.messages))

    def parse(self, row: dict, completion: Completion) -> dict:
        """Parse a generation into ``text`` and ``label``, or set ``_parse_error``.

        Returns:
            ``{"text", "label", "_parse_error"}``; ``_parse_error`` is None on success, else the
            reason the row goes to quarantine (its raw text is kept by the stage).
        """
        label = row["target_label"]
        lines = [ln for ln in completion.text.strip().splitlines() if ln.strip()]
        text = lines[0] if lines else ""
        text = _NUMBERING.sub("", text, count=1)
        text = _PREFIX.sub("", text, count=1).strip()
        if len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
            text = text[1:-1].strip()
        error = None
        if not text:
            error = "empty_generation"
        elif completion.finish_reason == "length":
            error = "truncated_at_max_tokens"
        elif _REFUSAL.match(text):
            error = "refusal"
        elif text.strip(" .:\"'").lower() in {lab.lower() for lab in self.labels}:
            error = "label_only"
        return {"text": text if error is None else "", "label": label, "_parse_error": error}
