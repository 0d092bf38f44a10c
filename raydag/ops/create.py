"""Data creation: the seed study's generation methods, class-conditioned on a target label.

Methods (``CreateOp(method=...)``): ``zero_shot`` (task description and target label),
``zero_shot_topic`` (as zero-shot, plus one topic sampled per request from a list the teacher
wrote first, see :class:`TopicsOp`), ``one_shot`` and ``few_shot`` (k demonstrations of the
target label, sampled per request with the request's own seed).

The operator is pure: it plans requests from raw rows, turns a request row into a
:class:`ChatRequest`, and parses a :class:`Completion` back into columns. It imports no Ray,
vLLM or transformers.

The prompt asks for texts of one target label and pre-fills the assistant's turn with a numbered
list of demonstrations of that label, ending at the next number; the teacher continues the list
with one new item and stops at the newline. Small teachers stay on task far better this way than
when asked to answer free-form.

Example:
    >>> from raydag.ops.create import CreateOp
    >>> op = CreateOp(task="Route support messages.", labels=["billing", "shipping"], method="one_shot")
    >>> plan = op.plan_requests([{"id": "r1", "text": "Refund me", "label": "billing"}], 2, seed=0)
    >>> [row["target_label"] for row in plan], op.name
    (['billing', 'shipping'], 'create.one_shot')
"""

from __future__ import annotations

import random

import numpy as np

from raydag.config import SamplingConfig
from raydag.data import stable_hash
from raydag.engines.base import ChatRequest, Completion
from raydag.ops.base import QUARANTINED, clean_line, reject, text_problem

# An item followed by another item was not cut off, whatever the request's finish reason.
_FINISHED = Completion(text="", prompt_tokens=0, completion_tokens=0, finish_reason="stop")
SYSTEM_PROMPT = "You write realistic, varied example texts for a text classification dataset."
METHODS = ("zero_shot", "zero_shot_topic", "one_shot", "few_shot")


def label_weights(labels: list[str], distribution: dict[str, float] | None = None) -> dict[str, float]:
    """Each label's weight in ``distribution`` (0 for a label it leaves out); 1 each when None."""
    return {label: float((distribution or {}).get(label, 0.0 if distribution else 1.0))
            for label in labels}


def label_counts(labels: list[str], num_examples: int,
                 distribution: dict[str, float] | None = None) -> dict[str, int]:
    """Requests per label: proportional to ``distribution`` (balanced when None), by largest
    remainder so the counts sum to ``num_examples``; ties go to the earlier label."""
    weights = label_weights(labels, distribution)
    total = sum(weights.values())
    exact = {label: num_examples * w / total for label, w in weights.items()}
    counts = {label: int(value) for label, value in exact.items()}
    left = num_examples - sum(counts.values())
    order = sorted(labels, key=lambda lab: (-(exact[lab] - counts[lab]), labels.index(lab)))
    for label in order[:left]:
        counts[label] += 1
    return counts


class TopicsOp:
    """The teacher writes a numbered list of topics for the task (zero-shot topic's first step).

    One request; ``parse`` returns the topics (deduplicated, in order). The list is a run
    artifact (``topics.json``) that every creation request then samples from. Decoding is
    constrained (:meth:`list_regex`) to ``num_topics`` numbered lines of a short phrase each, so
    even a small teacher cannot answer with a preamble ("Here is a list of topics:") instead.
    """

    name = "create.topics"
    creates_rows = False
    requires = ("request_seed",)
    adds = ("topics",)

    def __init__(self, task: str, num_topics: int = 20, max_tokens: int = 400) -> None:
        self.task = task
        self.num_topics = num_topics
        self.max_tokens = max_tokens

    def list_regex(self) -> str:
        """The shape of the answer after the pre-filled ``1.``: ``num_topics`` numbered lines,
        each a short phrase of letters, digits, spaces and light punctuation (no colon, so no
        preamble; no dash, so no "topic - explanation"), ending at a newline."""
        phrase = r" [A-Za-z][A-Za-z0-9 ,&'/()]{1,40}"
        return phrase + "".join(rf"\n{i}\.{phrase}" for i in range(2, self.num_topics + 1)) + r"\n"

    def build_requests(self, row: dict) -> list[ChatRequest]:
        user = (f"Task: {self.task}\nList {self.num_topics} different, specific topics that texts "
                "in this task could be about, one short phrase per line.")
        return [ChatRequest(
            messages=({"role": "system", "content": SYSTEM_PROMPT},
                      {"role": "user", "content": user},
                      {"role": "assistant", "content": "1."}),
            max_tokens=max(self.max_tokens, 24 * self.num_topics), temperature=0.7, top_p=0.95,
            seed=int(row["request_seed"]), continue_final_message=True,
            regex=self.list_regex())]

    def parse(self, row: dict, completions: list[Completion]) -> list[dict]:
        topics: list[str] = []
        for line in ("1." + completions[0].text).splitlines():
            topic = clean_line(line).rstrip(".")
            if 2 <= len(topic) <= 80 and topic.lower() not in {t.lower() for t in topics}:
                topics.append(topic)
        return [{"topics": topics[: self.num_topics], "_raw_generation": completions[0].text}]


class CreateOp:
    """Class-conditioned data creation by one of the seed study's methods.

    Args:
        task: One-sentence task description.
        labels: The label set.
        method: ``zero_shot``, ``zero_shot_topic``, ``one_shot`` or ``few_shot``.
        shots: Demonstrations per request for ``few_shot`` (k); ``one_shot`` uses 1 and the
            zero-shot methods 0 whatever this says.
        sampling: Decoding settings; defaults to temperature 0.9, top-p 0.95, 80 tokens.
        label_distribution: Share of requests per label; None is balanced.
        topics: The topic list for ``zero_shot_topic`` (see :class:`TopicsOp`).
        examples_per_request: New texts one request asks for (the teacher continues the list
            by this many items). Each is parsed, checked and given its own id and lineage;
            the request's prompt (and its demonstrations) is paid once for all of them.
        round: The closed loop's round (1, 2, ...; see :mod:`raydag.loop`): it enters every
            request's id and seed, and each row gets ``round`` and ``steer`` columns. 0 (not
            in a loop) leaves the plan and the rows as they were.
        steer: Why each label's requests were asked for (label -> reason, e.g.
            ``weak_class:billing``), copied into the rows' ``steer`` column.
        hard_examples: Rows (``id``, ``text``, ``label``) the student got wrong: a request of
            their label shows one of them as its first demonstration (few-shot and one-shot),
            and its rows' ``steer`` names it (``hard_example:<id>``).

    Columns:
        requires: ``request_id``, ``target_label``, ``demo_texts``, ``request_seed``.
        adds: ``id``, ``parent_ids``, ``text``, ``label`` (and ``topic``).
    """

    creates_rows = True
    requires = ("request_id", "target_label", "demo_ids", "demo_texts", "request_seed", "topic")
    adds = ("id", "parent_ids", "text", "label")

    def __init__(
        self,
        task: str,
        labels: list[str],
        method: str = "few_shot",
        shots: int = 3,
        sampling: SamplingConfig | None = None,
        label_distribution: dict[str, float] | None = None,
        topics: list[str] | None = None,
        examples_per_request: int = 1,
        round: int = 0,
        steer: dict[str, str] | None = None,
        hard_examples: list[dict] | None = None,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown creation method '{method}'; choose one of {METHODS}")
        if method == "zero_shot_topic" and not topics:
            raise ValueError("zero_shot_topic needs a non-empty topic list")
        self.task = task
        self.labels = list(labels)
        self.method = method
        self.shots = self.demonstrations(method, shots)
        self.sampling = sampling or SamplingConfig()
        self.label_distribution = label_distribution
        self.topics = list(topics or [])
        if examples_per_request < 1:
            raise ValueError(f"examples_per_request must be >= 1, got {examples_per_request}")
        self.examples_per_request = examples_per_request
        if round < 0:
            raise ValueError(f"round must be >= 0, got {round}")
        self.round = round
        self.steer = dict(steer or {})
        self.hard_examples = [dict(r) for r in hard_examples or []]

    @staticmethod
    def demonstrations(method: str, shots: int) -> int:
        """Raw demonstrations one request of ``method`` shows: ``shots`` for few-shot, 1 for
        one-shot, none for the zero-shot methods."""
        return {"few_shot": shots, "one_shot": 1}.get(method, 0)

    @property
    def name(self) -> str:
        """Lineage name of the method, e.g. ``create.few_shot_3`` or ``create.zero_shot``."""
        return f"create.few_shot_{self.shots}" if self.method == "few_shot" else f"create.{self.method}"

    def label_counts(self, num_examples: int) -> dict[str, int]:
        """Requests per label (see :func:`label_counts`)."""
        return label_counts(self.labels, num_examples, self.label_distribution)

    def request_count(self, num_examples: int) -> int:
        """Requests the plan of ``num_examples`` examples has: ceil(c / k) per label."""
        k = self.examples_per_request
        return sum(-(-count // k) for count in self.label_counts(num_examples).values())

    def plan_requests(self, raw_rows: list[dict], num_examples: int, seed: int) -> list[dict]:
        """Plan the request rows for ``num_examples`` examples, each request naming its target
        label, its demonstrations and how many new texts it asks for (``request_items``).

        Args:
            raw_rows: Raw examples with ``id``, ``text`` and ``label``.
            num_examples: Examples to ask for (M); with ``examples_per_request`` k, a label
                with c examples gets ceil(c / k) requests.
            seed: Seed; request ``i`` draws its demonstrations (and topic) with its own seed.

        Returns:
            Request rows in a fixed, interleaved label order.
        """
        return self.plan_range(raw_rows, num_examples, seed, 0, self.request_count(num_examples))

    def plan_range(self, raw_rows: list[dict], num_examples: int, seed: int, start: int,
                   stop: int) -> list[dict]:
        """Requests ``start`` to ``stop - 1`` of :meth:`plan_requests`'s plan, computed without
        the rest: planning tasks each make their own part of a large plan.

        The order interleaves the labels round by round (every label with requests left gets
        one per round, in label order), so every prefix of the run follows the distribution;
        a label's requests ask for k items each, its last one for the remainder.
        """
        by_label: dict[str, list[dict]] = {label: [] for label in self.labels}
        for row in raw_rows:
            by_label.setdefault(row["label"], []).append(row)
        plan = []
        in_round = (self.round,) if self.round else ()
        for index, label, items in self._order(num_examples, start, stop):
            request_seed = int(stable_hash(seed, index, label, *in_round, length=8), 16)
            rng = random.Random(request_seed)
            pool = by_label.get(label, [])
            hard = [r for r in self.hard_examples if r["label"] == label] if self.shots else []
            if hard:  # the student's mistake first, then raw demonstrations
                first = rng.choice(hard)
                rest = [r for r in pool if r["id"] != first["id"]]
                demos = [first] + rng.sample(rest, min(self.shots - 1, len(rest)))
                steer = f"hard_example:{first['id']}"
            else:
                demos = rng.sample(pool, min(self.shots, len(pool)))
                steer = self.steer.get(label, "")
            row = {
                "request_id": stable_hash(self.name, seed, index, label, *in_round),
                "request_index": index,
                "target_label": label,
                "demo_ids": [d["id"] for d in demos],
                "demo_texts": [d["text"] for d in demos],
                "request_seed": request_seed,
                "topic": rng.choice(self.topics) if self.topics else "",
            }
            if self.examples_per_request > 1:  # one-example plans keep their old rows (and ids)
                row["request_items"] = items
            if self.round:
                row["steer"] = steer
            plan.append(row)
        return plan

    def _order(self, num_examples: int, start: int, stop: int):
        """``(index, label, items)`` of the requests ``start <= index < stop``: round r holds
        the labels that have more than r requests, so its size and start come from the sorted
        request counts, without listing the earlier rounds."""
        k = self.examples_per_request
        counts = self.label_counts(num_examples)
        requests = {label: -(-counts[label] // k) for label in self.labels}
        sorted_requests = np.sort(np.array(list(requests.values()), dtype=np.int64))
        rounds = int(sorted_requests[-1]) if len(sorted_requests) else 0
        sizes = len(self.labels) - np.searchsorted(sorted_requests, np.arange(rounds), side="right")
        ends = np.cumsum(sizes)
        stop = min(stop, int(ends[-1]) if rounds else 0)
        index = start
        while index < stop:
            round_ = int(np.searchsorted(ends, index, side="right"))
            first = int(ends[round_] - sizes[round_])
            active = [label for label in self.labels if requests[label] > round_]
            for label in active[index - first : stop - first]:
                last = round_ == requests[label] - 1
                yield index, label, (counts[label] - k * round_) if last else k
                index += 1

    def build_requests(self, row: dict) -> list[ChatRequest]:
        """One chat request that continues a numbered list of texts of the target label."""
        label = row["target_label"]
        demos = list(row["demo_texts"])
        listing = "".join(f"{i + 1}. {' '.join(str(d).split())}\n" for i, d in enumerate(demos))
        topic = f'Every text is about this topic: "{row["topic"]}".\n' if row.get("topic") else ""
        user = (
            f"Task: {self.task}\n"
            f"Possible labels: {', '.join(self.labels)}.\n"
            f'Write realistic texts whose label is "{label}", one per line. {topic}'
            "Each must be different from the others in wording and topic."
        )
        items = int(row.get("request_items") or 1)
        return [ChatRequest(
            messages=(
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": user},
                {"role": "assistant", "content": f"{listing}{len(demos) + 1}."},
            ),
            max_tokens=self.sampling.max_tokens * items,
            temperature=self.sampling.temperature,
            top_p=self.sampling.top_p,
            seed=int(row["request_seed"]),
            # One item: stop at its newline; k items: stop where item k + 1 would begin.
            stop=("\n",) if items == 1 else (f"\n{len(demos) + items + 1}.",),
            continue_final_message=True,
        )]

    def parse(self, row: dict, completions: list[Completion]) -> list[dict]:
        """Parse the generation into one new row per asked-for item; an item that is missing
        or unusable is a quarantined row with the reason (so examples asked = rows out)."""
        label = row["target_label"]
        items = int(row.get("request_items") or 1)
        lineage = {"round": self.round, "steer": row.get("steer", "")} if self.round else {}
        completion = completions[0]
        if items == 1:
            texts = [clean_line(completion.text)]
        else:  # the items are the list's next lines: "<text>\n5. <text>\n6. <text>"
            texts = [clean_line(line) for line in completion.text.split("\n")]
            texts = [t for t in texts if t][:items]
            texts += [""] * (items - len(texts))
        out = []
        for item, text in enumerate(texts):
            suffix = () if items == 1 else (item,)
            last = item == items - 1 or not any(texts[item + 1:])
            problem = ("list_item_missing" if items > 1 and not text
                       else text_problem(text, completion if last else _FINISHED, self.labels))
            if problem:  # a row of its own, so the runner records its raw text and lineage
                out.append(reject(problem, QUARANTINED,
                                  id=stable_hash(self.name, "failed", row["request_id"], *suffix),
                                  parent_ids=list(row["demo_ids"]), text="", label=label,
                                  **lineage))
                continue
            out.append({
                "id": stable_hash(self.name, text, label, list(row["demo_ids"]), row["request_id"],
                                  *suffix),
                "parent_ids": list(row["demo_ids"]),
                "text": text,
                "label": label,
                **lineage,
            })
        return out
