import time

import pytest

from raydag.errors import RaydagError
from raydag.resources import (
    student_resources,
    teacher_actor_resources,
    teacher_pool_resources,
    teacher_runtime_env,
    wait_for_resources,
)


def test_teacher_actor_resources_for_cpu_gpu_and_tensor_parallel():
    assert teacher_actor_resources(None, 1, cluster_gpus=0) == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert teacher_actor_resources(None, 1, cluster_gpus=8) == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert teacher_actor_resources(None, 4, cluster_gpus=8) == {"num_cpus": 1.0, "num_gpus": 4.0}
    assert teacher_actor_resources(0.5, 1, cluster_gpus=8)["num_gpus"] == 0.5
    with pytest.raises(RaydagError, match="tensor_parallel_size=4"):
        teacher_actor_resources(1, 4, cluster_gpus=8)


def test_pool_student_and_thread_settings():
    per_actor = {"num_cpus": 1.0, "num_gpus": 2.0}
    assert teacher_pool_resources(per_actor, 3) == {"num_cpus": 3.0, "num_gpus": 6.0}
    assert student_resources(2, use_gpu=False) == {"num_cpus": 2.0, "num_gpus": 0.0}
    assert student_resources(4, use_gpu=True) == {"num_cpus": 4.0, "num_gpus": 4.0}
    assert teacher_runtime_env(per_actor, None) == {}
    assert teacher_runtime_env({"num_cpus": 1.0, "num_gpus": 0.0}, 3) == {
        "env_vars": {"OMP_NUM_THREADS": "3"}}


def test_an_impossible_request_on_the_local_cluster_fails_at_once(ray_local):
    started = time.monotonic()
    with pytest.raises(RaydagError, match="num_gpus=1e\\+06 but the cluster has"):
        wait_for_resources({"num_cpus": 1, "num_gpus": 10**6}, "the teacher", fixed_cluster=True,
                           timeout_s=600)
    assert time.monotonic() - started < 5
    wait_for_resources({"num_cpus": 1, "num_gpus": 0}, "the teacher", fixed_cluster=True,
                       timeout_s=1)


def test_a_cluster_that_may_autoscale_gets_the_timeout(ray_local):
    started = time.monotonic()
    with pytest.raises(RaydagError, match="after waiting 1s"):
        wait_for_resources({"num_gpus": 10**6}, "the teacher", fixed_cluster=False, timeout_s=1,
                           poll_s=0.2)
    assert time.monotonic() - started >= 1
