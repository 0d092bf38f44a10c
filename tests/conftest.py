"""Shared fixtures: one local Ray for the whole session (one Ray per machine is the safe rule)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Ray's servers bind the loopback address only (nothing in the tests listens on the network);
# read when ray is first imported, so it is set before any test imports it.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "jobs" / "quickstart.yaml"


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray started through raydag's own init (the way `raydag run` starts it)."""
    import ray

    from raydag.resources import init_ray

    resources = init_ray()
    yield resources
    ray.shutdown()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def tiny_job_files(tmp_path):
    """A small valid train/test pair and a job YAML pointing at them."""
    labels = ["billing", "shipping", "technical"]
    train = [{"text": f"message {i} about {labels[i % 3]}", "label": labels[i % 3]} for i in range(30)]
    test = [{"text": f"test message {i} on {labels[i % 3]}", "label": labels[i % 3]} for i in range(12)]
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "test.jsonl", test)
    job = tmp_path / "job.yaml"
    job.write_text(
        "name: tiny\noutput_dir: out\nraw_examples: 12\n"
        "data:\n  train_path: train.jsonl\n  test_path: test.jsonl\n"
        "  labels: [billing, shipping, technical]\n  task: Route support messages.\n"
    )
    return tmp_path
