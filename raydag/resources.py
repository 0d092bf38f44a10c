"""Ray resource requests for engine actors and training workers: all placement math lives here."""

from __future__ import annotations

import os
import time

from raydag.errors import RaydagError


def teacher_actor_resources(
    num_gpus: float | None, tensor_parallel_size: int, cluster_gpus: float
) -> dict[str, float]:
    """Resources one teacher engine actor asks Ray for.

    Args:
        num_gpus: GPUs per actor from the job; None picks 1 on GPU clusters, 0 on CPU hosts.
        tensor_parallel_size: vLLM tensor parallelism; an actor needs at least that many GPUs.
        cluster_gpus: GPUs the cluster has now.

    Returns:
        ``{"num_cpus": ..., "num_gpus": ...}`` for ``map_batches``.
    """
    if num_gpus is None:
        num_gpus = float(tensor_parallel_size) if cluster_gpus > 0 else 0.0
    if tensor_parallel_size > 1 and num_gpus < tensor_parallel_size:
        raise RaydagError(
            f"teacher.tensor_parallel_size={tensor_parallel_size} needs "
            f"teacher.num_gpus >= {tensor_parallel_size}, got {num_gpus}"
        )
    return {"num_cpus": 1.0, "num_gpus": float(num_gpus)}


def teacher_pool_resources(per_actor: dict[str, float], concurrency: int) -> dict[str, float]:
    """What the whole teacher actor pool needs at once."""
    return {key: amount * concurrency for key, amount in per_actor.items()}


def teacher_runtime_env(per_actor: dict[str, float], cpu_threads: int | None) -> dict:
    """Environment for a teacher actor: on CPU, OpenMP may use ``cpu_threads`` (default all cores).

    Ray sets ``OMP_NUM_THREADS`` to the CPUs an actor requests (1); the CPU engine is the only
    heavy work while the teacher stage runs, so it gets the cores.
    """
    if per_actor.get("num_gpus", 0.0) > 0:
        return {}
    return {"env_vars": {"OMP_NUM_THREADS": str(cpu_threads or os.cpu_count() or 1)}}


def student_resources(num_workers: int, use_gpu: bool) -> dict[str, float]:
    """What Ray Train's student workers need at once (one CPU, and one GPU if used, each)."""
    return {"num_cpus": float(num_workers), "num_gpus": float(num_workers if use_gpu else 0)}


def _missing(request: dict[str, float], cluster: dict[str, float]) -> str | None:
    have = {"num_cpus": cluster.get("CPU", 0.0), "num_gpus": cluster.get("GPU", 0.0)}
    for key, amount in request.items():
        if amount > have.get(key, 0.0):
            return f"{key}={amount:g} but the cluster has {have.get(key, 0.0):g}"
    return None


def wait_for_resources(request: dict[str, float], what: str, *, fixed_cluster: bool,
                       timeout_s: float, poll_s: float = 2.0) -> None:
    """Return once the cluster could grant ``request``; fail loudly otherwise.

    Ray itself would wait forever, only logging that no node can fulfil the request. A fixed
    cluster (the local one) fails at once; a cluster that may autoscale gets ``timeout_s``.

    Raises:
        RaydagError: naming what asked, for what, and what the cluster has.
    """
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        problem = _missing(request, ray.cluster_resources())
        if problem is None:
            return
        if fixed_cluster or time.monotonic() >= deadline:
            waited = "" if fixed_cluster else f" after waiting {timeout_s:g}s"
            raise RaydagError(
                f"{what} asks for {problem}{waited}; change the job's resources or run on a "
                "cluster that has them"
            )
        time.sleep(poll_s)
