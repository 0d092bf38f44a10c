"""Scoring: an LLM-as-judge on a 1-5 rubric, and pseudo-scoring of (text, target) pairs.

The score is the expected value of the score under the teacher's probabilities of the five
score tokens (read from the first generated token's log-probabilities), never a number parsed
from free text. Decoding is constrained to ``1``..``5`` as well, so an engine that returns no
log-probabilities still gives a valid (integer) score, recorded with ``score_source=choice``.

One :class:`JudgeOp` serves the batch ``judge`` stage and the scoring endpoint alike: prompt,
parser and calibration live here only.

Example:
    >>> from raydag.engines.base import Completion
    >>> from raydag.ops.judge import JudgeOp
    >>> op = JudgeOp(rubric="Is it a realistic support message?")
    >>> done = Completion("4", 50, 1, "stop", top_logprobs=({"4": -0.1, "5": -2.4, "3": -3.0},))
    >>> round(op.score(done)["score"], 2)
    4.04
"""

from __future__ import annotations

import math

from raydag.engines.base import ChatRequest, Completion
from raydag.ops.base import QUARANTINED, reject

SCORES = ("1", "2", "3", "4", "5")
JUDGE_SYSTEM = "You are a strict, consistent data-quality judge. You answer with one digit."


class JudgeOp:
    """Score ``text_column`` (or a pair of columns) on a 1-5 rubric.

    Args:
        rubric: What a 5 means and what a 1 means, in a sentence or two.
        text_column: Column to judge.
        target_column: For pseudo-scoring pairs: the second text (for example a reference or
            a target); the prompt then shows both.
        score_column: Column that receives the score.
        rationale: Also ask for a one-sentence rationale (one more request per row).
        temperature: Calibration: the score-token log-probabilities are divided by this before
            normalising (above 1 flattens, below 1 sharpens).
        scale: Map the 1-5 expected value linearly onto ``(low, high)``, e.g. ``(0, 1)`` for
            regression targets; None keeps 1-5.
        min_score: Rows scoring below this are dropped (``judge_below_threshold``).
    """

    creates_rows = False

    def __init__(
        self,
        rubric: str,
        text_column: str = "text",
        target_column: str | None = None,
        score_column: str = "judge_score",
        rationale: bool = False,
        temperature: float = 1.0,
        scale: tuple[float, float] | None = None,
        min_score: float | None = None,
    ) -> None:
        self.rubric = rubric
        self.text_column = text_column
        self.target_column = target_column
        self.score_column = score_column
        self.rationale = rationale
        self.temperature = temperature
        self.scale = scale
        self.min_score = min_score
        self.name = "judge.pair" if target_column else "judge.rubric"
        self.requires = (text_column,) + ((target_column,) if target_column else ())
        self.adds = (score_column, f"{score_column}_probs", f"{score_column}_source") + (
            (f"{score_column}_rationale",) if rationale else ())

    def messages(self, text: str, target: str | None = None) -> tuple[dict, ...]:
        """The judge's chat messages for one item."""
        if target is None:
            item = f"Text: {text}"
        else:
            item = f"Text A: {text}\nText B: {target}"
        user = (f"Rubric: {self.rubric}\n\n{item}\n\n"
                "Rate it from 1 (worst) to 5 (best) by the rubric. Answer with one digit.")
        return ({"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user})

    def score_request(self, text: str, target: str | None = None) -> ChatRequest:
        """The constrained one-token scoring request for one item."""
        return ChatRequest(messages=self.messages(text, target), max_tokens=1, temperature=0.0,
                           choices=SCORES, logprobs=20)

    def rationale_request(self, text: str, target: str | None = None) -> ChatRequest:
        """A short free-text explanation of the rating (never used for the score)."""
        messages = self.messages(text, target)
        user = messages[1]["content"].replace("Answer with one digit.",
                                              "Explain your rating in one sentence.")
        return ChatRequest(messages=(messages[0], {"role": "user", "content": user}),
                           max_tokens=60, temperature=0.0, stop=("\n",))

    def _item(self, row: dict) -> tuple[str, str | None]:
        target = str(row[self.target_column]) if self.target_column else None
        return str(row[self.text_column]), target

    def build_requests(self, row: dict) -> list[ChatRequest]:
        """One scoring request, plus a rationale request when asked for."""
        text, target = self._item(row)
        requests = [self.score_request(text, target)]
        if self.rationale:
            requests.append(self.rationale_request(text, target))
        return requests

    def score(self, completion: Completion) -> dict | None:
        """Score, probabilities and source from one scoring completion; None if unusable.

        Returns:
            ``{"score", "probs", "source"}``: ``source`` is ``logprobs`` (expected value over
            the calibrated score-token probabilities) or ``choice`` (the constrained digit,
            when the engine gave no log-probabilities).
        """
        weights = dict.fromkeys(SCORES, 0.0)
        if completion.top_logprobs:
            for token, logprob in completion.top_logprobs[0].items():
                digit = token.strip()
                if digit in weights:
                    weights[digit] += math.exp(logprob / self.temperature)
        total = sum(weights.values())
        if total > 0:
            probs = {k: v / total for k, v in weights.items()}
            raw = sum(int(k) * p for k, p in probs.items())
            source = "logprobs"
        elif completion.text.strip() in SCORES:
            probs = {k: float(k == completion.text.strip()) for k in SCORES}
            raw = float(completion.text.strip())
            source = "choice"
        else:
            return None
        if self.scale is not None:
            low, high = self.scale
            raw = low + (raw - 1.0) / 4.0 * (high - low)
        return {"score": raw, "probs": probs, "source": source}

    def parse(self, row: dict, completions: list[Completion]) -> list[dict]:
        """One output row with the score columns, or a quarantine when no score can be read."""
        result = self.score(completions[0])
        if result is None:
            return [reject("unparseable_score", QUARANTINED)]
        out = {
            self.score_column: result["score"],
            f"{self.score_column}_probs": [result["probs"][k] for k in SCORES],
            f"{self.score_column}_source": result["source"],
        }
        if self.rationale:
            out[f"{self.score_column}_rationale"] = completions[1].text.strip()
        if self.min_score is not None and result["score"] < self.min_score:
            return [reject("judge_below_threshold", **out)]
        return [out]
