"""Autoscaled batch augmentation on Ray's autoscaling test cluster: fake worker nodes that
advertise a custom resource (``fake_gpu``) in place of GPUs are launched while the teacher
pool needs them and released when idle; the job's output is complete.

``AutoscalingCluster.start`` runs ``ray stop --force``, so this test stops this process's Ray
first; the next test that needs Ray starts a fresh one.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import write_jsonl

# The fake provider's base config (ray/autoscaler/_private/fake_multi_node/example.yaml in
# Ray's source; the wheel leaves the file out, and AutoscalingCluster reads it from disk).
FAKE_MULTINODE_BASE = {
    "cluster_name": "fake_multinode", "max_workers": 8,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                 "disable_node_updaters": True, "disable_launch_config_check": True},
    "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0,
    "idle_timeout_minutes": 0.1, "docker": {}, "initialization_commands": [],
    "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
    "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {},
    "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [],
    "rsync_filter": [],
}


def _cluster(worker_types: dict, idle_timeout_minutes: float):
    from ray.cluster_utils import AutoscalingCluster

    class Cluster(AutoscalingCluster):
        def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False,
                             **config_kwargs):
            config = json.loads(json.dumps(FAKE_MULTINODE_BASE))
            config["available_node_types"] = {
                **worker_node_types,
                "ray.head.default": {"resources": dict(head_resources), "node_config": {},
                                     "max_workers": 0}}
            config.update(config_kwargs)
            return config

    return Cluster(head_resources={"CPU": 2}, worker_node_types=worker_types,
                   idle_timeout_minutes=idle_timeout_minutes)


def _workers_alive() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n["Alive"] and "fake_gpu" in n["Resources"])


@pytest.mark.slow
def test_teacher_pool_launches_fake_gpu_nodes_and_releases_them(tmp_path, monkeypatch):
    import ray

    from raydag.config import load_job
    from raydag.pipeline import run_job

    labels = ["billing", "shipping", "technical"]
    write_jsonl(tmp_path / "train.jsonl", [{"text": f"message {i} about {labels[i % 3]}",
                                            "label": labels[i % 3]} for i in range(30)])
    write_jsonl(tmp_path / "test.jsonl", [{"text": f"test {i}", "label": labels[i % 3]}
                                          for i in range(6)])
    (tmp_path / "job.yaml").write_text(
        "name: autoscale\noutput_dir: out\nraw_examples: 12\n"
        "data:\n  train_path: train.jsonl\n  test_path: test.jsonl\n"
        "  labels: [billing, shipping, technical]\n  task: Route support messages.\n"
        "teacher:\n  batch_size: 4\n  concurrency: [1, 2]\n  resources: {fake_gpu: 1}\n"
        "  cpu_threads: 1\n"
        "stages:\n  - type: create\n    method: zero_shot\n    num_examples: 16\n"
        "student:\n  train_sets: []\nresource_timeout_s: 300\n")
    job = load_job(str(tmp_path / "job.yaml"))

    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    cluster = _cluster({"teacher_node": {"resources": {"CPU": 1, "fake_gpu": 1},
                                         "node_config": {}, "min_workers": 0,
                                         "max_workers": 2}}, idle_timeout_minutes=0.1)
    cluster.start()
    try:
        monkeypatch.setenv("RAY_ADDRESS", "auto")  # raydag joins it and may ask it to grow
        from raydag.resources import init_ray

        resources = init_ray()
        assert resources.get("fake_gpu", 0) == 0  # no worker yet: the job must make them
        peak, stop = [0], threading.Event()

        def watch() -> None:
            from ray.autoscaler.sdk import request_resources

            ticks = 0
            while not stop.is_set():
                peak[0] = max(peak[0], _workers_alive())
                time.sleep(0.5)
                ticks += 1
                if ticks % 6 == 0:
                    # Another requester replacing the autoscaler's request every 3 s, as Ray
                    # Data's autoscaling coordinator does every 20 s once a dataset has run:
                    # the teacher pool's request must survive it.
                    request_resources(bundles=[])

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        report_path = run_job(job)
        stop.set()
        watcher.join()
        assert peak[0] >= 1, "no fake-GPU worker was launched for the teacher pool"

        report = json.loads(Path(report_path).read_text())
        counts = report["counts"]
        assert counts["planned"] == counts["ran"] == 16
        settled = (counts["accepted"] + sum(counts["dropped"].values())
                   + sum(counts["quarantined"].values()))
        assert settled == counts["ran"] + counts["created"] and counts["accepted"] >= 1
        shards = sorted((Path(job.output_dir) / "runs").glob("*/shards/*.parquet"))
        assert len(shards) == 4  # 16 rows in shards of 4: every shard written

        deadline = time.monotonic() + 120
        while _workers_alive() and time.monotonic() < deadline:
            time.sleep(1)
        assert _workers_alive() == 0, "idle fake-GPU workers were not released"
        print(f"autoscaling: peak {peak[0]} fake-GPU worker(s), all released")
    finally:
        ray.shutdown()
        cluster.shutdown()
