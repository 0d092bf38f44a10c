"""Data reformation: paraphrases that keep the label, counterfactual edits that flip it.

Both keep the original row and add new rows whose ``parent_ids`` name it. A counterfactual
edit is only a candidate: the job's counterfactual stage runs :class:`raydag.ops.label.LabelOp`
in ``verify`` mode on the edits right after, keeping an edit only when the teacher labels it
with the target label (the rest are dropped as ``counterfactual_not_flipped``).

Example:
    >>> from raydag.engines.base import Completion
    >>> from raydag.ops.reform import ParaphraseOp
    >>> op = ParaphraseOp(n=1)
    >>> row = {"id": "a1", "text": "Where is my parcel?", "label": "shipping"}
    >>> [r.get("text") for r in op.parse(row, [Completion("Has my package shipped yet?", 9, 7, "stop")])]
    [None, 'Has my package shipped yet?']
"""

from __future__ import annotations

import re

from raydag.config import SamplingConfig
from raydag.data import stable_hash
from raydag.engines.base import ChatRequest, Completion
from raydag.filters.exact import normalize_text
from raydag.ops.base import QUARANTINED, clean_line, derived_id, reject, text_problem

REWRITE_SYSTEM = "You rewrite texts. You answer with the rewritten text only, on one line."


def _rewrite_request(user: str, seed: int, sampling: SamplingConfig) -> ChatRequest:
    return ChatRequest(
        messages=({"role": "system", "content": REWRITE_SYSTEM}, {"role": "user", "content": user}),
        max_tokens=sampling.max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
        seed=seed, stop=("\n",))


def _rewritten_row(method: str, row: dict, index: int, completion: Completion, label: str,
                   labels: list[str]) -> dict:
    text = clean_line(completion.text)
    problem = text_problem(text, completion, labels)
    if problem:
        return reject(problem, QUARANTINED, id=derived_id(method, row["id"], index, "failed"),
                      parent_ids=[row["id"]], text="", label=label, method=method)
    if normalize_text(text) == normalize_text(row["text"]):
        return reject("unchanged_rewrite", id=derived_id(method, row["id"], index, text),
                      parent_ids=[row["id"]], text=text, label=label, method=method)
    return {"id": derived_id(method, row["id"], index, text), "parent_ids": [row["id"]],
            "text": text, "label": label, "method": method}


class ParaphraseOp:
    """``n`` rewrites of each text, label kept; the original row is kept as well.

    Args:
        n: Rewrites per row, each with its own seed.
        sampling: Decoding settings.
        labels: The label set (a rewrite that is only a label is quarantined).
    """

    name = "reform.paraphrase"
    creates_rows = True
    requires = ("id", "text", "label")
    adds = ("parent_ids",)

    def __init__(self, n: int = 1, sampling: SamplingConfig | None = None,
                 labels: list[str] = ()) -> None:
        self.n = n
        self.sampling = sampling or SamplingConfig(temperature=0.8)
        self.labels = list(labels)

    def build_requests(self, row: dict) -> list[ChatRequest]:
        """``n`` seeded rewrite requests."""
        text = " ".join(str(row["text"]).split())
        user = ("Rewrite the text below in different words. Keep its meaning, its intent and "
                f"its language; change the wording and sentence structure.\nText: {text}")
        return [_rewrite_request(user, int(stable_hash(row["id"], i, length=8), 16), self.sampling)
                for i in range(self.n)]

    def parse(self, row: dict, completions: list[Completion]) -> list[dict]:
        """The original row (unchanged) followed by one row per rewrite."""
        return [{}] + [_rewritten_row(self.name, row, i, c, row["label"], self.labels)
                       for i, c in enumerate(completions)]


class CounterfactualOp:
    """A minimal edit of each text that should make it belong to another label.

    The target label is the next label in the label set after the row's own (so every label
    gets counterfactuals); the edit row carries ``label`` = ``target_label`` and must pass the
    labelling check that follows it in the stage.

    Args:
        task: One-sentence task description.
        labels: The label set.
        sampling: Decoding settings.
    """

    name = "reform.counterfactual"
    creates_rows = True
    requires = ("id", "text", "label")
    adds = ("parent_ids", "target_label")

    def __init__(self, task: str, labels: list[str], sampling: SamplingConfig | None = None) -> None:
        self.task = task
        self.labels = list(labels)
        self.sampling = sampling or SamplingConfig(temperature=0.7)

    def target_for(self, label: str) -> str:
        """The label an edit of a ``label`` row aims at."""
        return self.labels[(self.labels.index(label) + 1) % len(self.labels)]

    def build_requests(self, row: dict) -> list[ChatRequest]:
        """One seeded edit request."""
        text = " ".join(str(row["text"]).split())
        target = self.target_for(row["label"])
        user = (f"Task: {self.task}\nLabels: {', '.join(self.labels)}.\n"
                f'This text has the label "{row["label"]}":\n{text}\n\n'
                f'Change as few words as possible so that its label becomes "{target}". '
                "Write only the edited text.")
        return [_rewrite_request(user, int(stable_hash(row["id"], "cf", length=8), 16),
                                 self.sampling)]

    def parse(self, row: dict, completions: list[Completion]) -> list[dict]:
        """The original row (unchanged) and the candidate edit labelled with its target."""
        target = self.target_for(row["label"])
        edit = _rewritten_row(self.name, row, 0, completions[0], target, self.labels)
        return [{}, {**edit, "target_label": target}]


class RephraseOp:
    """Rewrite a row that carries label shortcut words so that the words are gone.

    Used by the bias pass (``quality.bias.rephrase_flagged``): ``shortcut_words`` holds the words
    that give the row's label away more in the synthetic data than in the raw data. A good
    rewrite replaces the row (the original is dropped as ``rephrased``); when the rewrite fails
    or still contains one of the words, the original is kept and the rewrite is dropped or
    quarantined with its reason.

    Example:
        >>> from raydag.engines.base import Completion
        >>> op = RephraseOp()
        >>> row = {"id": "a1", "text": "A delightful, delightful film.", "label": "positive",
        ...        "shortcut_words": ["delightful"]}
        >>> [(r.get("_reason"), r.get("text")) for r in op.parse(row, [Completion("A lovely film.", 9, 4, "stop")])]
        [('rephrased', None), (None, 'A lovely film.')]
    """

    name = "reform.rephrase"
    creates_rows = True
    requires = ("id", "text", "label", "shortcut_words")
    adds = ("parent_ids",)

    def __init__(self, sampling: SamplingConfig | None = None, labels: list[str] = ()) -> None:
        self.sampling = sampling or SamplingConfig(temperature=0.7)
        self.labels = list(labels)

    def build_requests(self, row: dict) -> list[ChatRequest]:
        """One seeded rewrite request naming the words to avoid."""
        text = " ".join(str(row["text"]).split())
        words = ", ".join(f'"{w}"' for w in row["shortcut_words"])
        user = ("Rewrite the text below in different words. Keep its meaning and its language, "
                f"and do not use these words: {words}.\nText: {text}")
        return [_rewrite_request(user, int(stable_hash(row["id"], "rephrase", length=8), 16),
                                 self.sampling)]

    def parse(self, row: dict, completions: list[Completion]) -> list[dict]:
        """The original (dropped as ``rephrased``, or kept when the rewrite fails) and the rewrite."""
        new = _rewritten_row(self.name, row, 0, completions[0], row["label"], self.labels)
        if new.get("_status") is None:
            tokens = set(re.findall(r"[\w']+", normalize_text(new["text"])))
            if tokens & {normalize_text(w) for w in row["shortcut_words"]}:
                new = reject("rephrase_kept_shortcut", **new)
        if new.get("_status") is not None:
            return [{}, new]
        return [reject("rephrased"), new]
