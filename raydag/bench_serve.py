"""Load benchmark of the scoring endpoint (``make bench-serve``).

Deploys ``jobs/judge.yaml``'s judge with ``raydag.serve`` on a local Ray (HTTP on 127.0.0.1),
drives ``POST /v1/score`` from N concurrent clients (threads, one keep-alive connection each)
for T seconds, and measures, side by side in the same run, the offline rate of the same
engine on the same items: the replica's engine scores the items in one call, outside Serve,
once before and once after the load (their mean is the offline rate). The last line is::

    serve_rps=<n> p50_ms=<n> p99_ms=<n> errors=<n> serve_vs_offline_ratio=<n>

``serve_vs_offline_ratio`` is served items/s over offline items/s.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JUDGE_JOB = ROOT / "jobs" / "judge.yaml"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _items(job, count: int) -> list[str]:
    rows = [json.loads(line) for line in Path(job.data.train_path).read_text().splitlines()]
    texts = [str(r["text"]) for r in rows]
    return [texts[i % len(texts)] for i in range(count)]


def _offline(handle, items: list[str]) -> float:
    """Items per second of the replica's engine on ``items`` in one engine call."""
    started = time.perf_counter()
    scores = handle.score_items.remote([(text, None) for text in items]).result()
    seconds = time.perf_counter() - started
    assert len(scores) == len(items) and all(s["score"] is not None for s in scores)
    return len(items) / seconds


def _load(url: str, items: list[str], clients: int, seconds: float, per_request: int) -> dict:
    from raydag.client import EndpointError, JudgeClient

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client_loop(index: int) -> None:
        mine, done, position = [], [], index * per_request
        with JudgeClient(url, timeout_s=120) as client:
            while time.perf_counter() < deadline:
                batch = [items[(position + k) % len(items)] for k in range(per_request)]
                position += clients * per_request
                started = time.perf_counter()
                try:
                    scores = client.score(batch)
                    if len(scores) != len(batch) or any(s["score"] is None for s in scores):
                        raise EndpointError(200, {"error": "missing scores"})
                    mine.append(time.perf_counter() - started)
                except Exception as err:  # noqa: BLE001 - every failure is counted
                    done.append(f"{type(err).__name__}: {err}")
        with lock:
            latencies.extend(mine)
            errors.extend(done)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else float("nan")

    return {"requests": len(latencies), "errors": len(errors), "error_examples": errors[:3],
            "wall_s": wall, "rps": len(latencies) / wall,
            "items_per_s": len(latencies) * per_request / wall, "p50_ms": pct(0.50),
            "p99_ms": pct(0.99)}


def bench_serve(clients: int = 32, seconds: float = 60.0, per_request: int = 1,
                offline_items: int = 256, overrides: list[str] | None = None) -> float:
    """Run the benchmark; print the figures; return ``serve_vs_offline_ratio``."""
    from ray import serve

    from raydag.config import load_job
    from raydag.resources import init_ray
    from raydag.serve import APP_NAME, start

    port = _free_port()
    job = load_job(JUDGE_JOB, [f"serve.port={port}", "serve.token_env=null", *(overrides or [])])
    init_ray()
    started = time.perf_counter()
    url = start(job)
    print(f"raydag: [bench-serve] judge of {job.name} up at {url} in "
          f"{time.perf_counter() - started:.1f}s (max_batch_size={job.serve.max_batch_size})",
          flush=True)
    try:
        handle = serve.get_app_handle(APP_NAME)
        items = _items(job, max(offline_items, clients * per_request))
        _load(url, items, clients, 3.0, per_request)  # warm-up: connections, first batches
        before = _offline(handle, items[:offline_items])
        print(f"raydag: [bench-serve] offline before: {before:.1f} items/s "
              f"({offline_items} items, one engine call)", flush=True)
        load = _load(url, items, clients, seconds, per_request)
        after = _offline(handle, items[:offline_items])
        from raydag.client import JudgeClient, metric_total

        with JudgeClient(url) as client:  # one replica: its metrics are the whole endpoint's
            metrics = client.metrics()
        batches = metric_total(metrics, "raydag_judge_batch_items_count")
        print(f"raydag: [bench-serve] engine calls: {batches:.0f}, mean "
              f"{metric_total(metrics, 'raydag_judge_batch_items_sum') / max(batches, 1):.1f} items "
              f"per call (max_batch_size={job.serve.max_batch_size}, batch_wait_timeout_s="
              f"{job.serve.batch_wait_timeout_s})", flush=True)
        offline = (before + after) / 2
        print(f"raydag: [bench-serve] offline after: {after:.1f} items/s; served: "
              f"{load['requests']} requests of {per_request} item(s) from {clients} clients in "
              f"{load['wall_s']:.1f}s = {load['items_per_s']:.1f} items/s", flush=True)
        if load["errors"]:
            print(f"raydag: [bench-serve] errors, e.g. {load['error_examples']}", flush=True)
        ratio = load["items_per_s"] / offline
        print(f"serve_rps={load['rps']:.1f} p50_ms={load['p50_ms']:.0f} p99_ms={load['p99_ms']:.0f} "
              f"errors={load['errors']} serve_vs_offline_ratio={ratio:.3f}", flush=True)
        return ratio
    finally:
        serve.shutdown()
