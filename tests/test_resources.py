import os
import time

import pytest

from raydag.errors import RaydagError
from raydag.resources import (
    actor_pool,
    bundle,
    engine_replica_options,
    student_workers,
    teacher_actor_resources,
    teacher_cpu_threads,
    teacher_gpu_memory_share,
    teacher_runtime_env,
    wait_for_resources,
)

from conftest import ROOT


def test_teacher_actor_resources_for_cpu_gpu_and_tensor_parallel():
    assert teacher_actor_resources(None, 1, cluster_gpus=0) == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert teacher_actor_resources(None, 1, cluster_gpus=8) == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert teacher_actor_resources(None, 4, cluster_gpus=8) == {"num_cpus": 1.0, "num_gpus": 4.0}
    assert teacher_actor_resources(0.5, 1, cluster_gpus=8)["num_gpus"] == 0.5
    with pytest.raises(RaydagError, match="tensor_parallel_size=4"):
        teacher_actor_resources(1, 4, cluster_gpus=8)


def test_student_workers_bundles_and_gpu_memory_shares():
    assert student_workers(2, None, cluster_gpus=0) == (2, False)
    assert student_workers(2, None, cluster_gpus=1) == (1, True)  # one GPU: one GPU worker
    assert student_workers(2, None, cluster_gpus=8) == (2, True)
    assert student_workers(4, False, cluster_gpus=8) == (4, False)
    assert bundle({"num_cpus": 1.0, "num_gpus": 0.0}) == {"CPU": 1.0}
    assert bundle({"num_cpus": 1.0, "num_gpus": 2.0}) == {"CPU": 1.0, "GPU": 2.0}
    assert teacher_gpu_memory_share(1.0, None) == 0.9
    assert teacher_gpu_memory_share(0.5, None) == 0.45  # two engines share one GPU
    assert teacher_gpu_memory_share(4.0, None) == 0.9
    assert teacher_gpu_memory_share(0.5, 0.3) == 0.3


def test_small_model_actors_take_a_gpu_each_where_the_cluster_has_them():
    from raydag.resources import model_actor_options

    assert model_actor_options(4, threads=2) == {"num_cpus": 1, "num_gpus": 1, "concurrency": (1, 4)}
    assert model_actor_options(0.5, threads=2)["num_gpus"] == 0  # a GPU share is the teacher's
    cpu = model_actor_options(0, threads=3)
    assert (cpu["num_gpus"], cpu["concurrency"]) == (0, 1)
    assert cpu["runtime_env"]["env_vars"]["OMP_NUM_THREADS"] == "3"


def test_cpu_engine_threads_are_set_before_the_actor_starts():
    cpu_actor, gpu_actor = {"num_cpus": 1.0, "num_gpus": 0.0}, {"num_cpus": 1.0, "num_gpus": 1.0}
    assert teacher_cpu_threads(cpu_actor, 3) == 3
    assert teacher_cpu_threads(cpu_actor, None) == os.cpu_count()
    assert teacher_cpu_threads(gpu_actor, 3) is None
    assert teacher_runtime_env(3) == {"env_vars": {"OMP_NUM_THREADS": "3"}}
    assert teacher_runtime_env(None) is None


def test_an_impossible_request_on_the_local_cluster_fails_at_once(ray_local):
    started = time.monotonic()
    with pytest.raises(RaydagError, match="the teacher needs .*GPU.* on one node, but the largest"):
        wait_for_resources({"CPU": 1, "GPU": 10**6}, 1, "the teacher", fixed_cluster=True,
                           timeout_s=600)
    assert time.monotonic() - started < 5
    wait_for_resources({"CPU": 1}, 2, "the teacher", fixed_cluster=True, timeout_s=1)
    with pytest.raises(RaydagError, match="1000 x .* but the cluster has CPU="):
        wait_for_resources({"CPU": 1}, 1000, "the pool", fixed_cluster=True, timeout_s=1)


def test_a_cluster_that_may_autoscale_gets_the_timeout(ray_local):
    started = time.monotonic()
    from raydag.resources import release_resource_requests

    with pytest.raises(RaydagError, match="still after waiting 1s"):
        wait_for_resources({"GPU": 10**6}, 1, "the teacher", fixed_cluster=False, timeout_s=1,
                           poll_s=0.2)
    release_resource_requests()
    assert time.monotonic() - started >= 1


def test_pool_ranges_custom_resources_and_judge_replicas():
    # CPU-only, 1 GPU and tensor-parallel actors with a custom resource, as bundles
    cpu = teacher_actor_resources(None, 1, cluster_gpus=0, custom={"fake_gpu": 1})
    assert cpu == {"num_cpus": 1.0, "num_gpus": 0.0, "resources": {"fake_gpu": 1.0}}
    assert bundle(cpu) == {"CPU": 1.0, "fake_gpu": 1.0}
    one = teacher_actor_resources(None, 1, cluster_gpus=4)
    assert bundle(one) == {"CPU": 1.0, "GPU": 1.0} and "resources" not in one
    tp = teacher_actor_resources(None, 8, cluster_gpus=8, custom={"accelerator_type:A100": 0.001})
    assert bundle(tp) == {"CPU": 1.0, "GPU": 8.0, "accelerator_type:A100": 0.001}
    fixed, growing = actor_pool((2, 2), 4), actor_pool((1, 4))
    assert (fixed.min_size, fixed.max_size, fixed.max_concurrent_calls_per_actor) == (2, 2, 4)
    assert (growing.min_size, growing.max_size, growing.max_concurrent_calls_per_actor) == (1, 4, 1)
    # a judge replica asks for what a teacher actor asks for, with the CPU engine's threads
    assert engine_replica_options(cpu, 2) == {**cpu, "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "2"}}}
    assert engine_replica_options(tp, None) == tp


def test_teacher_pool_range_in_the_job():
    from conftest import QUICKSTART

    from raydag.config import load_job

    job = load_job(QUICKSTART, ["teacher.concurrency=[1, 4]", "teacher.resources={fake_gpu: 1}"])
    assert job.teacher.pool_size == (1, 4) and job.teacher.resources == {"fake_gpu": 1.0}
    assert load_job(QUICKSTART, ["teacher.concurrency=3"]).teacher.pool_size == (3, 3)
    for bad, message in ((["teacher.concurrency=[4, 1]"], "1 <= min <= max"),
                         (["teacher.concurrency=[0, 2]"], "1 <= min <= max"),
                         (["teacher.resources={GPU: 1}"], "teacher.num_gpus"),
                         (["teacher.resources={fake_gpu: 0}"], "amounts > 0")):
        with pytest.raises(RaydagError, match=message.replace("[", r"\[")):
            load_job(QUICKSTART, bad)


def test_precision_auto_follows_the_cpu_flags():
    from raydag.resources import cpu_flags, native_bf16_cpu, student_precision, teacher_dtype

    amd_avx2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\nprocessor\t: 1\nflags\t\t: fpu avx2\n"
    sapphire = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd bf16\n"
    assert cpu_flags(amd_avx2) == {"fpu", "sse2", "avx", "avx2", "fma"}
    assert native_bf16_cpu(cpu_flags(amd_avx2))[0] is False
    assert native_bf16_cpu(cpu_flags(sapphire)) == (True, "CPU has avx512_bf16 (native bf16)")
    assert native_bf16_cpu(cpu_flags(arm))[0] is False  # no x86 bf16 flag: float32 is safe
    assert native_bf16_cpu({"amx_bf16"})[0] is True

    dtype, why = teacher_dtype("auto", on_gpu=False, flags=cpu_flags(amd_avx2))
    assert dtype == "float32" and "no avx512_bf16" in why
    assert teacher_dtype("auto", on_gpu=False, flags=cpu_flags(sapphire))[0] == "bfloat16"
    assert teacher_dtype("auto", on_gpu=True, flags=set())[0] == "auto"  # vLLM picks on GPUs
    assert teacher_dtype("bfloat16", on_gpu=False, flags=set()) == (
        "bfloat16", "set in the job (teacher.dtype)")  # an explicit setting wins

    assert student_precision("auto", use_gpu=False, flags=cpu_flags(amd_avx2))[0] == "fp32"
    assert student_precision("auto", use_gpu=False, flags=cpu_flags(sapphire))[0] == "bf16"
    assert student_precision("auto", use_gpu=True, flags=set())[0] == "bf16"
    assert student_precision("fp32", use_gpu=True, flags={"avx512_bf16"})[0] == "fp32"


def test_this_hosts_auto_choice_matches_its_cpuinfo(monkeypatch):
    from raydag.resources import student_precision, teacher_dtype

    monkeypatch.delenv("RAYDAG_NATIVE_BF16", raising=False)
    text = open("/proc/cpuinfo").read()
    native = "avx512_bf16" in text or "amx_bf16" in text
    assert teacher_dtype("auto", on_gpu=False)[0] == ("bfloat16" if native else "float32")
    assert student_precision("auto", use_gpu=False)[0] == ("bf16" if native else "fp32")


def test_native_bf16_can_be_overridden_for_this_host(monkeypatch):
    from raydag.resources import native_bf16_cpu, teacher_dtype

    monkeypatch.setenv("RAYDAG_NATIVE_BF16", "0")  # run an AVX2 host's defaults anywhere
    assert native_bf16_cpu() == (False, "RAYDAG_NATIVE_BF16=0")
    assert teacher_dtype("auto", on_gpu=False)[0] == "float32"
    assert native_bf16_cpu({"avx512_bf16"})[0] is True  # explicit flags are not overridden
    monkeypatch.setenv("RAYDAG_NATIVE_BF16", "1")
    assert teacher_dtype("auto", on_gpu=False)[0] == "bfloat16"


def test_small_jobs_shuffle_by_sort_and_large_ones_or_clusters_keep_rays(monkeypatch, tmp_path):
    import ray

    from raydag.config import load_job
    from raydag.resources import SORT_SHUFFLE_MAX_BYTES, data_shuffle, job_shuffle

    quickstart = ROOT / "jobs" / "quickstart.yaml"
    monkeypatch.delenv("RAY_DATA_DEFAULT_SHUFFLE_STRATEGY", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    default = ray.data.DataContext.get_current().shuffle_strategy.value
    assert job_shuffle(load_job(quickstart)) == "sort_shuffle_pull_based"
    assert job_shuffle(load_job(quickstart, ["stages.0.num_examples=1000000"])) == default
    big = tmp_path / "train.jsonl"
    line = '{"text": "a long enough message about a parcel", "label": "shipping"}\n'
    big.write_text(line * (SORT_SHUFFLE_MAX_BYTES // len(line) + 1))
    assert job_shuffle(load_job(quickstart, [f"data.train_path={big}"])) == default
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")  # a cluster keeps Ray's own
    assert job_shuffle(load_job(quickstart)) == default
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setenv("RAY_DATA_DEFAULT_SHUFFLE_STRATEGY", "hash_shuffle")
    assert job_shuffle(load_job(quickstart)) == default
    with data_shuffle("sort_shuffle_pull_based"):
        assert ray.data.DataContext.get_current().shuffle_strategy.value == "sort_shuffle_pull_based"
    assert ray.data.DataContext.get_current().shuffle_strategy.value == default
