"""Self-instruct data creation and preference pairs: instructions, two responses, a judge.

Three pure operators make an instruction-tuning / preference data set from a handful of seed
tasks, after the self-instruct method (Wang et al., 2023):

* :class:`SelfInstructOp` (``create.self_instruct``) shows a few sampled seed tasks as
  numbered "Instruction / Input / Output" blocks in a pre-filled assistant turn that ends at the
  next block's header, so even a small teacher continues the pattern with one new task.
* :func:`novelty_filter` keeps a new instruction only when its ROUGE-L (:func:`rouge_l`)
  against every existing instruction, and every instruction it already kept, is below 0.7.
* :class:`ResponsePairOp` (``preference.respond``) samples two responses per instruction with
  different seeds; :class:`PreferenceJudgeOp` (``preference.judge``) scores each one with a
  :class:`~raydag.ops.judge.JudgeOp` (the expected value of the 1-5 score) and orders them into
  ``chosen`` / ``rejected``, dropping ties. Each response is scored on its own (pointwise), so
  the judge has no position bias between the two.

The prompt of :class:`SelfInstructOp` (``k`` demonstrations; ``<noinput>`` marks an empty
input, as in the paper)::

    system:    You write diverse, self-contained tasks for training an AI assistant ...
    user:      Come up with a new task ... (plus the task hint, when given)
    assistant: Task 1
               Instruction: Give three tips for staying healthy.
               Input: <noinput>
               Output: 1. Eat a balanced diet. ...

               Task 2
               ...

               Task k+1
               Instruction:

The teacher continues the assistant turn (``continue_final_message``) and stops at the next
``Task`` header.

Example:
    >>> from raydag.ops.instruct import novelty_filter, rouge_l
    >>> round(rouge_l("Write a poem about the sea", "Write a short poem about the sea"), 3)
    0.923
    >>> results = novelty_filter(["Write a poem about the sea.", "Summarise this article."],
    ...                          ["Write a short poem about the sea"])
    >>> [(accepted, round(score, 2)) for accepted, score, _ in results]
    [(False, 0.92), (True, 0.0)]
"""

from __future__ import annotations

import random
import re
from collections import Counter

from raydag.config import SamplingConfig
from raydag.data import stable_hash
from raydag.engines.base import ChatRequest, Completion
from raydag.ops.base import QUARANTINED, derived_id, reject, text_problem
from raydag.ops.judge import JudgeOp

SYSTEM_PROMPT = ("You write diverse, self-contained tasks for training an AI assistant, each "
                 "with a correct, helpful output.")
RESPONSE_SYSTEM_PROMPT = "You are a helpful assistant. Follow the user's instruction."
NO_INPUT = "<noinput>"
NOVELTY_THRESHOLD = 0.7

_WORD = re.compile(r"\w+")
_LABEL = r"^[ \t]*(?:#+[ \t]*)?\**[ \t]*{}[ \t]*\**[ \t]*:[ \t]*(?:\*\*(?!\S))?[ \t]*"
_INPUT_MARK = re.compile(_LABEL.format("input"), re.IGNORECASE | re.MULTILINE)
_OUTPUT_MARK = re.compile(_LABEL.format("output"), re.IGNORECASE | re.MULTILINE)
_INSTRUCTION_LABEL = re.compile(_LABEL.format("instruction"), re.IGNORECASE)
# Where a next block starts when the stop string did not end the generation.
_NEXT_BLOCK = re.compile(
    r"^[ \t]*(?:#+[ \t]*)?\**[ \t]*"
    r"(?:task[ \t]*\d*[ \t]*\**[ \t]*:?[ \t]*\**[ \t]*$|instruction[ \t]*\**[ \t]*:)",
    re.IGNORECASE | re.MULTILINE)
_NO_INPUT_WORDS = {"<noinput>", "<no input>", "noinput", "no input", "none", "(none)", "<none>",
                   "n/a", "-"}
_QUOTES = "\"'“”‘’`"


# --- ROUGE-L and the novelty filter ---------------------------------------------------------

def _tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (dynamic programming)."""
    shared = set(a) & set(b)
    a = [t for t in a if t in shared]  # tokens in only one list are never part of the LCS
    b = [t for t in b if t in shared]
    if not a or not b:
        return 0
    if len(a) < len(b):
        a, b = b, a  # b, the inner loop, is the shorter
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            if token == other:
                current.append(previous[j] + 1)
            else:
                current.append(max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def _f_measure(lcs: int, len_a: int, len_b: int) -> float:
    # F1 of LCS precision (lcs / len_a) and recall (lcs / len_b) is 2 * lcs / (len_a + len_b).
    return 2.0 * lcs / (len_a + len_b) if lcs else 0.0


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F-measure of two texts over lowercase word tokens.

    Tokens are ``re.findall(r"\\w+", text.lower())``; the score is the F1 of the longest common
    subsequence's precision and recall, ``2 * LCS / (len(a) + len(b))``. Symmetric.

    Args:
        a: One text.
        b: The other text.

    Returns:
        A score in ``[0, 1]``: 1.0 for the same tokens in the same order, 0.0 when either text
        has no tokens or they share none.
    """
    ta, tb = _tokens(a), _tokens(b)
    if not ta or not tb:
        return 0.0
    return _f_measure(_lcs_length(ta, tb), len(ta), len(tb))


def _occurrences(tokens: list[str]) -> list[tuple[str, int]]:
    """``(token, k)`` for the k-th copy of each token: two texts share ``min(count_a, count_b)``
    such keys per token, so counting shared keys gives their multiset overlap."""
    return [(token, k) for token, count in Counter(tokens).items() for k in range(1, count + 1)]


class _Pool:
    """Texts under comparison, with an inverted index from token occurrence to texts."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.tokens: list[list[str]] = []
        self.index: dict[tuple[str, int], list[int]] = {}

    def add(self, text: str, tokens: list[str] | None = None) -> None:
        tokens = _tokens(text) if tokens is None else tokens
        position = len(self.texts)
        self.texts.append(text)
        self.tokens.append(tokens)
        for key in _occurrences(tokens):
            self.index.setdefault(key, []).append(position)

    def closest(self, tokens: list[str]) -> tuple[float, int | None]:
        """Exact highest ROUGE-L against the pool, and the first text that reaches it.

        The same result as scoring every text in order and keeping the first strictly higher
        score, but the exact LCS runs only for texts whose bound can still reach the best.
        """
        if not tokens:
            return 0.0, None
        overlap: Counter[int] = Counter()
        for key in _occurrences(tokens):
            overlap.update(self.index.get(key, ()))
        size = len(tokens)
        best, best_at = 0.0, None
        scored: set[int] = set()

        def consider(position: int) -> None:
            nonlocal best, best_at
            scored.add(position)
            other = self.tokens[position]
            score = _f_measure(_lcs_length(tokens, other), size, len(other))
            if score > best or (score == best and score > 0 and position < best_at):
                best, best_at = score, position

        for position, _ in overlap.most_common(4):  # a good first best, cheaply
            consider(position)
        # ROUGE-L <= 2 * overlap / (len_a + len_b) since LCS <= overlap, and that is at most
        # 2 * overlap / (len_a + overlap) since overlap <= len_b: texts whose overlap is below
        # best * len_a / (2 - best) cannot reach the best score (the margin guards rounding).
        least = best * size / (2.0 - best) - 1e-9
        bounds = [(bound, p) for p, shared in overlap.items() if shared >= least and p not in scored
                  and (bound := _f_measure(shared, size, len(self.tokens[p]))) >= best]
        bounds.sort(key=lambda item: (-item[0], item[1]))
        for bound, position in bounds:
            if bound < best:
                break  # sorted: no later text can reach the best score
            if bound == best and best_at is not None and position > best_at:
                continue  # at most a tie, and the earlier text already wins ties
            consider(position)
        return best, best_at


def novelty_filter(
    candidates: list[str], existing: list[str], threshold: float = NOVELTY_THRESHOLD
) -> list[tuple[bool, float, str | None]]:
    """Keep the candidates that are new: ROUGE-L below ``threshold`` against all that came before.

    Candidates are taken in the given order (so the result depends on it): a candidate is
    accepted when its highest :func:`rouge_l` against ``existing`` and the candidates accepted
    before it is below ``threshold``; an accepted candidate then counts as existing for the
    ones after it. The result equals comparing every pair with :func:`rouge_l`, but an
    inverted index and the bound ``2 * |multiset overlap| / (len_a + len_b)`` skip the exact
    LCS for every text that cannot beat the best score found so far, which keeps a few
    thousand candidates fast. A candidate without word tokens scores 0.0 and is accepted
    (filter empty texts before).

    Args:
        candidates: New texts (e.g. generated instructions), in the order they are judged.
        existing: Texts the candidates must differ from (e.g. the seed instructions).
        threshold: A candidate needs a highest ROUGE-L strictly below this.

    Returns:
        One ``(accepted, max_rouge, closest)`` per candidate: ``closest`` is the first text
        (``existing`` first, then accepted candidates in order) with the highest score, or
        None when no text shares a token with the candidate.
    """
    pool = _Pool()
    for text in existing:
        pool.add(text)
    results: list[tuple[bool, float, str | None]] = []
    for text in candidates:
        tokens = _tokens(text)
        score, position = pool.closest(tokens)
        accepted = score < threshold
        results.append((accepted, score, None if position is None else pool.texts[position]))
        if accepted:
            pool.add(text, tokens)
    return results


# --- Self-instruct creation -----------------------------------------------------------------

def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def format_task(instruction: str, input: str, output: str) -> str:  # noqa: A002 - column name
    """One task block without its header: ``Instruction: ...``, ``Input: ...``, ``Output: ...``.

    The instruction goes on one line; an empty input is written ``<noinput>``.
    """
    shown_input = str(input).strip() or NO_INPUT
    return (f"Instruction: {_one_line(instruction)}\nInput: {shown_input}\n"
            f"Output: {str(output).strip()}")


def parse_task(text: str) -> tuple[str, str, str | None]:
    """Split a continuation (what follows ``Instruction:``) into instruction, input and output.

    Tolerant: a repeated ``Instruction:`` label is removed, a missing ``Input:`` line means an
    empty input, ``<noinput>`` (and similar: ``none``, ``n/a``) becomes ``""``, and a next
    block the stop string did not catch (a ``Task n`` line or an ``Instruction:`` line) is cut.

    Returns:
        ``(instruction, input, output)``: the instruction on one line; ``output`` is None when
        there is no ``Output:`` line (``""`` when the line is empty).
    """
    text = text.strip()
    instruction_label = _INSTRUCTION_LABEL.match(text)
    if instruction_label:
        text = text[instruction_label.end():]
    next_block = _NEXT_BLOCK.search(text)
    if next_block:
        text = text[: next_block.start()]
    output_mark = _OUTPUT_MARK.search(text)
    head = text[: output_mark.start()] if output_mark else text
    output = text[output_mark.end():].strip() if output_mark else None
    input_mark = _INPUT_MARK.search(head)
    instruction = head[: input_mark.start()] if input_mark else head
    task_input = head[input_mark.end():].strip() if input_mark else ""
    instruction = _one_line(instruction)
    if len(instruction) >= 2 and instruction[0] in _QUOTES and instruction[-1] in _QUOTES:
        instruction = instruction[1:-1].strip()
    if task_input.strip(" .").lower() in _NO_INPUT_WORDS:
        task_input = ""
    return instruction, task_input, output


class SelfInstructOp:
    """Self-instruct: the teacher writes one new task after a few sampled seed tasks.

    Each planned request shows ``demos_per_request`` seed tasks, drawn with the request's own
    seed, as numbered blocks and asks for the next one (see the module docstring for the
    prompt). New instructions should then go through :func:`novelty_filter` against the seed
    instructions (the paper's ROUGE-L < 0.7 rule). Unlike the paper's iterative bootstrap, the
    demonstrations are seed tasks only, so the whole plan is known (and seeded) up front.

    Args:
        task_hint: What the tasks should be about (e.g. "customer-support tasks for an online
            shop"); None asks for diverse general tasks.
        demos_per_request: Seed tasks shown per request (fewer when there are fewer seeds).
        sampling: Decoding settings; defaults to temperature 0.9, top-p 0.95, 256 tokens.

    Columns:
        requires: ``request_id``, ``request_seed``, ``demo_ids``, ``demo_texts`` (see
            :meth:`plan_requests`).
        adds: ``id``, ``parent_ids`` (the demonstrations' ids), ``instruction``, ``input``,
            ``output``, ``text`` (the instruction, plus a blank line and the input when there
            is one: what deduplication and filters downstream look at).
    """

    name = "create.self_instruct"
    creates_rows = True
    requires = ("request_id", "request_seed", "demo_ids", "demo_texts")
    adds = ("id", "parent_ids", "instruction", "input", "output", "text")

    def __init__(
        self,
        task_hint: str | None = None,
        demos_per_request: int = 3,
        sampling: SamplingConfig | None = None,
    ) -> None:
        if demos_per_request < 0:
            raise ValueError(f"demos_per_request must be >= 0, got {demos_per_request}")
        self.task_hint = task_hint
        self.demos_per_request = demos_per_request
        self.sampling = sampling or SamplingConfig(temperature=0.9, top_p=0.95, max_tokens=256)

    def plan_requests(self, seed_tasks: list[dict], num_instructions: int, seed: int) -> list[dict]:
        """Plan ``num_instructions`` request rows, each with its own seed and demonstrations.

        Args:
            seed_tasks: Seed tasks with ``id``, ``instruction``, ``input`` (may be ``""``) and
                ``output``.
            num_instructions: Requests to plan (one new task each, at most).
            seed: Seed; request ``i`` gets ``request_seed`` derived from it and ``i``, and draws
                its demonstrations (in shown order) with that seed.

        Returns:
            Rows with ``request_id``, ``request_index``, ``request_seed`` (a 32-bit int),
            ``demo_ids`` (list of seed task ids) and ``demo_texts`` (list of strings: each demo
            as its :func:`format_task` block, without the ``Task n`` header).
        """
        if num_instructions < 0:
            raise ValueError(f"num_instructions must be >= 0, got {num_instructions}")
        for task in seed_tasks:
            missing = [k for k in ("id", "instruction", "output") if k not in task]
            if missing:
                raise ValueError(f"seed task {task.get('id', task)!r} lacks {missing}")
        shots = min(self.demos_per_request, len(seed_tasks))
        plan = []
        for index in range(num_instructions):
            request_seed = int(stable_hash(self.name, seed, index, length=8), 16)
            demos = random.Random(request_seed).sample(seed_tasks, shots)
            plan.append({
                "request_id": stable_hash(self.name, seed, index),
                "request_index": index,
                "request_seed": request_seed,
                "demo_ids": [str(d["id"]) for d in demos],
                "demo_texts": [format_task(d["instruction"], d.get("input") or "", d["output"])
                               for d in demos],
            })
        return plan

    def user_message(self) -> str:
        """The request's user turn (the same for every request)."""
        hint = f"The tasks are {self.task_hint.strip().rstrip('.')}. " if self.task_hint else ""
        return (
            "Come up with a new task for an instruction-following dataset. "
            f"{hint}Each task has an instruction, an input ({NO_INPUT} when the instruction "
            "needs none) and a correct output. The new task must differ from the listed ones "
            "in topic and wording, and be doable by a text-only assistant."
        )

    def build_requests(self, row: dict) -> list[ChatRequest]:
        """One request whose assistant turn lists the demos and ends at the next header."""
        demos = [str(d) for d in row["demo_texts"]]
        listing = "".join(f"Task {i + 1}\n{d.strip()}\n\n" for i, d in enumerate(demos))
        return [ChatRequest(
            messages=(
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": self.user_message()},
                {"role": "assistant", "content": f"{listing}Task {len(demos) + 1}\nInstruction:"},
            ),
            max_tokens=self.sampling.max_tokens,
            temperature=self.sampling.temperature,
            top_p=self.sampling.top_p,
            seed=int(row["request_seed"]),
            stop=("\nTask ",),
            continue_final_message=True,
        )]

    def parse(self, row: dict, completions: list[Completion]) -> list[dict]:
        """The new task as a row, or a quarantine with the reason.

        Reasons: ``empty_generation``, ``truncated_at_max_tokens``, ``unparseable_instruction``
        (no instruction text, or one that does not start with a letter, digit or quote),
        ``missing_output`` (no ``Output:`` line, or an empty one) and ``refusal``.
        """
        completion = completions[0]
        empty = {"instruction": "", "input": "", "output": "", "text": ""}
        if not completion.text.strip():
            return [reject("empty_generation", QUARANTINED, **empty)]
        if completion.finish_reason == "length":
            return [reject("truncated_at_max_tokens", QUARANTINED, **empty)]
        instruction, task_input, output = parse_task(completion.text)
        if not instruction or not (instruction[0].isalnum() or instruction[0] in _QUOTES):
            return [reject("unparseable_instruction", QUARANTINED, **empty)]
        if not output:
            return [reject("missing_output", QUARANTINED, **empty)]
        for part in (instruction, output):
            problem = text_problem(part, completion)
            if problem:
                return [reject(problem, QUARANTINED, **empty)]
        demo_ids = [str(d) for d in row["demo_ids"]]
        return [{
            "id": derived_id(self.name, str(row["request_id"]), 0, instruction, task_input, output),
            "parent_ids": demo_ids,
            "instruction": instruction,
            "input": task_input,
            "output": output,
            "text": f"{instruction}\n\n{task_input}" if task_input else instruction,
        }]


# --- Preference pairs -----------------------------------------------------------------------

def _prompt(instruction: object, task_input: object) -> str:
    instruction, task_input = str(instruction).strip(), str(task_input or "").strip()
    return f"{instruction}\n\nInput:\n{task_input}" if task_input else instruction


class ResponsePairOp:
    """Two sampled responses per instruction, for preference data.

    Both requests send the same prompt (the instruction, then the input when there is one)
    with two different seeds derived from the row id, so each row's pair is reproducible.

    Args:
        sampling: Decoding settings; defaults to temperature 1.0, top-p 0.95, 256 tokens
            (a high temperature so the two responses differ).
        system_prompt: The system turn of both requests.

    Columns:
        requires: ``id``, ``instruction``, ``input``.
        adds: ``response_a``, ``response_b``.

    A row is quarantined when either response is empty (``empty_generation``) or cut at the
    token limit (``truncated_at_max_tokens``), and dropped (``identical_responses``) when both
    are equal after whitespace normalisation. Refusals are kept: a judge scores them.
    """

    name = "preference.respond"
    creates_rows = False
    requires = ("id", "instruction", "input")
    adds = ("response_a", "response_b")

    def __init__(self, sampling: SamplingConfig | None = None,
                 system_prompt: str = RESPONSE_SYSTEM_PROMPT) -> None:
        self.sampling = sampling or SamplingConfig(temperature=1.0, top_p=0.95, max_tokens=256)
        self.system_prompt = system_prompt

    def request_seeds(self, row: dict) -> tuple[int, int]:
        """The two per-request seeds of a row (32-bit ints, different from each other)."""
        first, second = (int(stable_hash(self.name, str(row["id"]), k, length=8), 16)
                         for k in range(2))
        return first, second if second != first else (first + 1) % 2**32

    def build_requests(self, row: dict) -> list[ChatRequest]:
        """Two requests with the same prompt and different seeds."""
        messages = ({"role": "system", "content": self.system_prompt},
                    {"role": "user", "content": _prompt(row["instruction"], row.get("input"))})
        return [ChatRequest(messages=messages, max_tokens=self.sampling.max_tokens,
                            temperature=self.sampling.temperature, top_p=self.sampling.top_p,
                            seed=seed)
                for seed in self.request_seeds(row)]

    def parse(self, row: dict, completions: list[Completion]) -> list[dict]:
        """``response_a`` and ``response_b``, or a drop / quarantine with the reason."""
        responses = [c.text.strip() for c in completions[:2]]
        out = {"response_a": responses[0], "response_b": responses[1]}
        for text, completion in zip(responses, completions):
            if not text:
                return [reject("empty_generation", QUARANTINED, **out)]
            if completion.finish_reason == "length":
                return [reject("truncated_at_max_tokens", QUARANTINED, **out)]
        if _one_line(responses[0]) == _one_line(responses[1]):
            return [reject("identical_responses", **out)]
        return [out]


class PreferenceJudgeOp:
    """Order a response pair into ``chosen`` and ``rejected`` by a 1-5 judge's scores.

    Each response is scored on its own by a :class:`~raydag.ops.judge.JudgeOp` (the expected
    value over the score-token probabilities), with the instruction, input and response shown
    as labelled parts of the judged text.

    Args:
        rubric: What a 5 and a 1 mean, e.g. "Does the response follow the instruction
            correctly and helpfully?".
        min_margin: Pairs whose scores differ by less are dropped as ``tie``.
        temperature: The judge's calibration temperature (see :class:`JudgeOp`).

    Columns:
        requires: ``instruction``, ``input``, ``response_a``, ``response_b``.
        adds: ``chosen``, ``rejected``, ``chosen_score``, ``rejected_score``, ``score_margin``
            (``chosen_score - rejected_score``).

    A row is quarantined (``unparseable_score``) when either score cannot be read. On equal
    scores (only possible with ``min_margin`` 0) ``response_a`` is chosen.
    """

    name = "preference.judge"
    creates_rows = False
    requires = ("instruction", "input", "response_a", "response_b")
    adds = ("chosen", "rejected", "chosen_score", "rejected_score", "score_margin")

    def __init__(self, rubric: str, min_margin: float = 0.1, temperature: float = 1.0) -> None:
        if min_margin < 0:
            raise ValueError(f"min_margin must be >= 0, got {min_margin}")
        self.judge = JudgeOp(rubric=rubric, temperature=temperature)
        self.min_margin = min_margin

    @staticmethod
    def judged_text(instruction: object, task_input: object, response: object) -> str:
        """The text the judge scores: labelled instruction, input (when any) and response."""
        parts = [f"Instruction: {str(instruction).strip()}"]
        if str(task_input or "").strip():
            parts.append(f"Input: {str(task_input).strip()}")
        parts.append(f"Response: {str(response).strip()}")
        return "\n" + "\n".join(parts)

    def build_requests(self, row: dict) -> list[ChatRequest]:
        """Two scoring requests: ``response_a``'s, then ``response_b``'s."""
        return [self.judge.score_request(
                    self.judged_text(row["instruction"], row.get("input"), row[column]))
                for column in ("response_a", "response_b")]

    def parse(self, row: dict, completions: list[Completion]) -> list[dict]:
        """The ordered pair with its scores, or a drop (``tie``) / quarantine."""
        scores = [self.judge.score(c) for c in completions[:2]]
        if len(scores) < 2 or any(s is None for s in scores):
            return [reject("unparseable_score", QUARANTINED)]
        score_a, score_b = scores[0]["score"], scores[1]["score"]
        a_wins = score_a >= score_b
        chosen, rejected = ("response_a", "response_b") if a_wins else ("response_b", "response_a")
        high, low = (score_a, score_b) if a_wins else (score_b, score_a)
        out = {
            "chosen": str(row[chosen]),
            "rejected": str(row[rejected]),
            "chosen_score": high,
            "rejected_score": low,
            "score_margin": high - low,
        }
        if high - low < self.min_margin:
            return [reject("tie", **out)]
        return [out]
