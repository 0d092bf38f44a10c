"""raydag: LLM data augmentation on Ray.

A teacher LLM (vLLM) creates labelled examples from a few raw ones; students fine-tune on raw,
synthetic and mixed data with Ray Train + DeepSpeed.

Example:
    >>> import raydag
    >>> job = raydag.load_job("jobs/quickstart.yaml", ["stages.0.num_examples=30"])  # doctest: +SKIP
    >>> report_path = raydag.run_job(job)  # doctest: +SKIP
"""

from raydag.config import JobConfig, load_job
from raydag.engines import ChatRequest, Completion, Engine, VLLMEngine
from raydag.errors import ConfigError, DataError, RaydagError
from raydag.ops.create import CreateOp


def run_job(job: JobConfig):
    """Run a job end to end; return the path of its ``report.json`` (see :mod:`raydag.pipeline`)."""
    from raydag.pipeline import run_job as _run_job

    return _run_job(job)


__all__ = [
    "ChatRequest",
    "Completion",
    "ConfigError",
    "DataError",
    "Engine",
    "CreateOp",
    "JobConfig",
    "RaydagError",
    "VLLMEngine",
    "load_job",
    "run_job",
]
__version__ = "0.1.0"
