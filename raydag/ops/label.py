"""Data labelling: the teacher annotates texts with a label from the job's label set.

Decoding is constrained to the label strings (vLLM structured outputs, ``choices``), so every
answer is a valid label. Confidence comes from the first generated token's log-probabilities:
the probabilities of the labels' first tokens, renormalised over the label set (see
:func:`raydag.ops.base.choice_distribution`); when labels share a first token, the confidence
is the probability of the whole chosen label (the product of its tokens' probabilities).

Few-shot: ``demonstrations`` (text, label) pairs, the same for every request (so the engine
can reuse the shared prompt prefix), come before the text as earlier turns of the chat, each
answered with its label.

Self-consistency: with ``votes=k`` each text gets k requests, either k prompt variants at
temperature 0 (``vote_by="prompts"``) or k seeded samples of one prompt (``vote_by="samples"``);
the row records the majority label, the agreement (share of votes for it) and every vote.

Modes:
    ``annotate``: write the label into ``output_column``.
    ``verify``: keep a row only when the teacher's label equals the row's ``expect_column``
        (for example the label a creation stage asked for); others are dropped with
        ``reject_reason``.

Example:
    >>> from raydag.engines.base import Completion
    >>> from raydag.ops.label import LabelOp
    >>> op = LabelOp(task="Route messages.", labels=["billing", "shipping"])
    >>> done = Completion("billing", 40, 1, "stop", top_logprobs=({"billing": -0.2, "ship": -1.8},))
    >>> out = op.parse({"text": "Refund my card"}, [done])[0]
    >>> out["label"], round(out["label_confidence"], 3)
    ('billing', 0.832)
"""

from __future__ import annotations

import json
import math
from collections import Counter

from raydag.data import stable_hash
from raydag.engines.base import ChatRequest, Completion
from raydag.ops.base import QUARANTINED, choice_distribution, reject

LABEL_SYSTEM = "You are a careful annotator. You answer with one label from the list, nothing else."

# Prompt variants for self-consistency over prompts; variant 0 is the default prompt.
PROMPT_VARIANTS = (
    "Task: {task}\nLabels: {labels}.\n\nText: {text}\n\nWhich label fits the text best?",
    "Read the text and classify it.\nText: \"{text}\"\nTask: {task}\nChoose one of: {labels}.",
    "{task}\nPossible answers: {labels}.\nWhat is the correct label of this text?\n{text}",
)


class LabelOp:
    """Annotate (or verify) the label of ``text_column`` with constrained decoding.

    Args:
        task: One-sentence task description.
        labels: The label set; the answer is always one of these.
        mode: ``annotate`` or ``verify`` (see the module docstring).
        text_column: Column with the text to label.
        output_column: Column that receives the label in ``annotate`` mode.
        expect_column: Column holding the expected label in ``verify`` mode.
        votes: Requests per text (self-consistency); 1 turns it off.
        vote_by: ``prompts`` (prompt variants, greedy) or ``samples`` (one prompt, seeded
            samples at ``temperature``).
        temperature: Sampling temperature when ``vote_by="samples"``.
        reject_reason: The drop reason in ``verify`` mode.
        applies_to_method: Only rows whose ``method`` equals this are labelled; other rows
            pass through untouched (used to verify only counterfactual edits).
        demonstrations: Labelled (text, label) examples shown before every text (few-shot
            labelling); empty: zero-shot.
        name: Lineage name of the stage.
    """

    creates_rows = False

    def __init__(
        self,
        task: str,
        labels: list[str],
        mode: str = "annotate",
        text_column: str = "text",
        output_column: str = "label",
        expect_column: str = "label",
        votes: int = 1,
        vote_by: str = "prompts",
        temperature: float = 0.7,
        reject_reason: str = "label_disagreement",
        applies_to_method: str | None = None,
        demonstrations: list[tuple[str, str]] = (),
        name: str | None = None,
    ) -> None:
        if mode not in ("annotate", "verify"):
            raise ValueError(f"unknown labelling mode '{mode}'")
        if vote_by not in ("prompts", "samples"):
            raise ValueError(f"vote_by must be 'prompts' or 'samples', got '{vote_by}'")
        self.task = task
        self.labels = list(labels)
        self.mode = mode
        self.text_column = text_column
        self.output_column = output_column
        self.expect_column = expect_column
        self.votes = votes
        self.vote_by = vote_by
        self.temperature = temperature
        self.reject_reason = reject_reason
        self.applies_to_method = applies_to_method
        unknown = sorted({label for _, label in demonstrations} - set(self.labels))
        if unknown:
            raise ValueError(f"demonstrations have labels outside the label set: {unknown}")
        self.demonstrations = [(" ".join(str(t).split()), label) for t, label in demonstrations]
        self.name = name or (f"label.{mode}" if not self.demonstrations
                             else f"label.{mode}_{len(self.demonstrations)}shot")
        self.requires = (text_column,) + ((expect_column,) if mode == "verify" else ())
        self.adds = (("teacher_label" if mode == "verify" else output_column), "label_confidence",
                     "label_margin", "label_agreement", "label_votes")
        self._max_tokens = 8 + max(len(label) for label in self.labels)

    def applies(self, row: dict) -> bool:
        """Whether this row is labelled (see ``applies_to_method``)."""
        return self.applies_to_method is None or row.get("method") == self.applies_to_method

    def build_requests(self, row: dict) -> list[ChatRequest]:
        """``votes`` constrained requests for the row's text."""
        text = " ".join(str(row[self.text_column]).split())
        requests = []
        for vote in range(self.votes):
            template = PROMPT_VARIANTS[vote % len(PROMPT_VARIANTS)] if self.vote_by == "prompts" \
                else PROMPT_VARIANTS[0]
            # Small teachers favour the first label listed: each prompt variant rotates the order.
            shift = vote % len(self.labels) if self.vote_by == "prompts" else 0
            order = self.labels[shift:] + self.labels[:shift]
            labels = ", ".join(order)
            shots = []
            for demo, label in self.demonstrations:
                shots += [{"role": "user", "content": template.format(
                              task=self.task, labels=labels, text=demo)},
                          {"role": "assistant", "content": label}]
            user = template.format(task=self.task, labels=labels, text=text)
            sampled = self.vote_by == "samples" and self.votes > 1
            requests.append(ChatRequest(
                messages=({"role": "system", "content": LABEL_SYSTEM}, *shots,
                          {"role": "user", "content": user}),
                max_tokens=self._max_tokens,
                temperature=self.temperature if sampled else 0.0,
                seed=int(stable_hash(text, vote, length=8), 16) if sampled else None,
                choices=tuple(self.labels),
                logprobs=20,
            ))
        return requests

    def _vote(self, completion: Completion) -> tuple[str | None, dict[str, float] | None]:
        label = completion.text.strip()
        if label not in self.labels:
            return None, None
        dist = choice_distribution(completion, self.labels)
        if dist is None and completion.token_logprobs:
            p = math.exp(sum(completion.token_logprobs))
            rest = (1 - p) / max(len(self.labels) - 1, 1)
            dist = {lab: (p if lab == label else rest) for lab in self.labels}
        return label, dist

    def parse(self, row: dict, completions: list[Completion]) -> list[dict]:
        """Majority label, confidence, margin, agreement and votes; verify mode may drop."""
        votes = [self._vote(c) for c in completions]
        valid = [(label, dist) for label, dist in votes if label is not None]
        if not valid:
            return [reject("label_not_in_label_set", QUARANTINED,
                           label_votes=json.dumps([c.text for c in completions]))]
        counts = Counter(label for label, _ in valid)
        dists = [d for _, d in valid if d is not None]
        mean = ({lab: sum(d[lab] for d in dists) / len(dists) for lab in self.labels}
                if dists else None)
        # Majority vote; ties go to the higher mean probability, then to label-set order.
        majority = max(counts, key=lambda lab: (counts[lab], (mean or {}).get(lab, 0.0),
                                                -self.labels.index(lab)))
        ranked = sorted(mean.values(), reverse=True) if mean else []
        out = {
            ("teacher_label" if self.mode == "verify" else self.output_column): majority,
            "label_confidence": mean[majority] if mean else float("nan"),
            "label_margin": ranked[0] - ranked[1] if len(ranked) > 1 else float("nan"),
            "label_agreement": counts[majority] / len(completions),
            "label_votes": json.dumps([label for label, _ in votes]),
        }
        if self.mode == "verify" and majority != row[self.expect_column]:
            return [reject(self.reject_reason, **out)]
        return [out]
