"""The job spec: strict pydantic models loaded from YAML, with ``key=value`` overrides.

A job YAML is the whole truth of a run. Unknown or mistyped keys are errors that name the key
and the file. Relative paths in the YAML are relative to the YAML file; relative paths given as
command-line overrides are relative to the current directory.

Example:
    >>> from raydag.config import load_job
    >>> job = load_job("jobs/quickstart.yaml", ["teacher.num_examples=30"])  # doctest: +SKIP
    >>> job.teacher.num_examples  # doctest: +SKIP
    30
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from raydag.errors import ConfigError

# Fields holding filesystem paths, resolved against the YAML file's folder.
_PATH_FIELDS = (("data", "train_path"), ("data", "test_path"), ("output_dir",))


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
    num_examples: int = Field(default=1000, ge=1, description="Synthetic examples to request (M).")
    shots: int = Field(default=3, ge=0, description="Demonstrations per request, from the target label.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Decoding.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="bfloat16", description="Weights dtype for the engine."
    )
    max_model_len: int = Field(default=2048, ge=128, description="Engine context length.")
    batch_size: int = Field(default=64, ge=1, description="Rows per batch sent to one engine.")
    concurrency: int = Field(default=1, ge=1, description="Engine actors in the pool.")
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
    cpu_threads: int | None = Field(
        default=None, ge=1,
        description="Threads of a CPU engine; None: as many as the driver's machine has cores "
        "(the teacher stage is the only heavy work while it runs).",
    )


class FilterConfig(StrictModel):
    """Rule-based filters applied to every synthetic row."""

    min_chars: int = Field(default=8, ge=0, description="Shorter normalised texts are dropped.")
    max_chars: int = Field(default=600, ge=1, description="Longer texts are dropped.")
    drop_raw_duplicates: bool = Field(default=True, description="Drop exact copies of raw rows.")
    drop_test_copies: bool = Field(default=True, description="Drop exact copies of test texts.")


TrainSet = Literal["raw", "synthetic", "mixed"]


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
    epochs: int = Field(default=3, ge=1, description="Passes over the training rows.")
    batch_size: int = Field(default=16, ge=1, description="Micro-batch size per worker.")
    learning_rate: float = Field(default=1e-4, gt=0, description="AdamW learning rate.")
    max_length: int = Field(default=128, ge=8, description="Tokens per text after truncation.")
    num_workers: int = Field(default=2, ge=1, description="Ray Train workers.")
    use_gpu: bool | None = Field(default=None, description="None: use GPUs when the cluster has them.")
    zero_stage: Literal[0, 1, 2] = Field(default=2, description="DeepSpeed ZeRO stage.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="bf16", description="DeepSpeed training precision (fp16 needs a GPU)."
    )


class JobConfig(StrictModel):
    """One augmentation job: sample raw rows, generate, filter, write, train, evaluate, report."""

    name: str = Field(min_length=1, description="Job name, shown in the report.")
    seed: int = Field(default=0, description="Seed for sampling, demonstrations and decoding.")
    output_dir: str = Field(description="Folder for shards, students and the report.")
    raw_examples: int = Field(default=100, ge=1, description="Raw examples drawn from the pool (N).")
    data: DataConfig = Field(description="Input data.")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="Teacher stage.")
    filters: FilterConfig = Field(default_factory=FilterConfig, description="Filters.")
    student: StudentConfig = Field(default_factory=StudentConfig, description="Students.")
    resource_timeout_s: float = Field(
        default=600, gt=0, description="On a cluster that may autoscale, fail when the resources a stage needs have "
        "not appeared after this many seconds (a local cluster fails at once)."
    )


def _set_dotted(tree: dict, dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: override '{dotted}': '{key}' is not a section")
        node = child
    node[keys[-1]] = value


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
        else:
            lines.append(f"  key '{where}': {item['msg']}")
    return "\n".join(lines)


def load_job(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Load a job YAML, apply ``key=value`` overrides, and validate it strictly.

    Args:
        path: The job YAML file.
        overrides: Dotted ``key=value`` strings, e.g. ``teacher.num_examples=50``.

    Returns:
        The validated job, with every path made absolute.

    Raises:
        ConfigError: The file is missing or not YAML, or a key is unknown or has a bad value.
    """
    path = Path(path)
    try:
        tree = _yaml(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: job file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a job file must be a mapping of keys to values")

    base = path.resolve().parent
    for keys in _PATH_FIELDS:
        value = _get_dotted(tree, keys)
        if isinstance(value, str):
            _set_dotted(tree, ".".join(keys), os.path.normpath(base / os.path.expanduser(value)),
                        str(path))
    for text in overrides:
        key, value = parse_override(text)
        if tuple(key.split(".")) in _PATH_FIELDS and isinstance(value, str):
            value = str(Path(value).expanduser().resolve())
        _set_dotted(tree, key, value, str(path))

    try:
        return JobConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, str(path))) from None
