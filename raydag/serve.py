"""The scoring endpoint: a job's judge stage on Ray Serve (``raydag serve JOB.yaml``).

Routes (under ``serve.route_prefix``):

- ``POST /v1/score``: ``{"items": [{"text": ..., "target": ...}, ...]}`` (``target`` only for a
  pair judge; an item may also be a bare string) -> ``{"model", "scores": [{"score", "probs",
  "source"}, ...]}``. The numbers are :class:`raydag.ops.judge.JudgeOp`'s, the same code the
  batch ``judge`` stage runs: same prompt, same constrained one-token request, same
  calibration and scale.
- ``GET /healthz``: ``{"status": "ok", ...}`` once the engine is loaded (never needs a token).
- ``GET /metrics``: this replica's counters and latency histograms, Prometheus text format.

Items from concurrent requests are batched into one engine call (``@serve.batch``, up to
``serve.max_batch_size`` items). The engine is built and driven on one thread of its own, as in
:class:`raydag.stages.ChainRunner`, so the event loop stays free for I/O while it computes.

``build_app`` is also the import path for Serve config files and KubeRay's RayService
(``import_path: raydag.serve:build_app``, ``args: {job: jobs/judge.yaml}``).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

from raydag.config import JobConfig, JudgeStage, load_job
from raydag.errors import RaydagError
from raydag.ops.judge import SCORES, JudgeOp

APP_NAME = "raydag-judge"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def judge_stage(job: JobConfig) -> JudgeStage:
    """The judge stage the endpoint serves: ``serve.stage``, else the job's first judge stage."""
    if job.serve.stage is not None:
        return job.stages[job.serve.stage]
    for stage in job.stages:
        if stage.type == "judge":
            return stage
    raise RaydagError(f"job '{job.name}' has no judge stage to serve; add a stage with "
                      "type: judge (see jobs/judge.yaml)")


def token_digest(job: JobConfig) -> str | None:
    """SHA-256 of the bearer token named by ``serve.token_env`` (the token itself never
    leaves this process); None when no token is configured."""
    name = job.serve.token_env
    if name is None:
        return None
    token = os.environ.get(name, "")
    if not token:
        raise RaydagError(f"serve.token_env names {name}, which is not set or empty; export "
                          f"{name}=<token> or remove serve.token_env")
    return hashlib.sha256(token.encode()).hexdigest()


class _Rejected(Exception):
    """A request refused with an HTTP status and a JSON body naming why."""

    def __init__(self, status: int, error: str, **detail: Any) -> None:
        super().__init__(error)
        self.status, self.body = status, {"error": error, **detail}


def parse_items(body: bytes, limits: dict, pair: bool) -> list[tuple[str, str | None]]:
    """Validate a ``/v1/score`` body against the limits; ``(text, target)`` per item.

    Raises:
        _Rejected: 413 naming the limit (``max_body_bytes``, ``max_items``,
            ``max_text_chars``) or 400/422 naming what is malformed.
    """
    if len(body) > limits["max_body_bytes"]:
        raise _Rejected(413, f"request body is {len(body)} bytes, over the limit",
                        limit="max_body_bytes", value=limits["max_body_bytes"])
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _Rejected(400, f"request body is not JSON: {err}") from None
    items = payload.get("items") if isinstance(payload, dict) else None
    if not isinstance(items, list) or not items:
        raise _Rejected(422, 'expected {"items": [...]} with at least one item')
    if len(items) > limits["max_items"]:
        raise _Rejected(413, f"{len(items)} items in one request, over the limit",
                        limit="max_items", value=limits["max_items"])
    out = []
    for index, item in enumerate(items):
        if isinstance(item, str):
            item = {"text": item}
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            raise _Rejected(422, f"items[{index}]: expected a string or an object with a string 'text'")
        target = item.get("target")
        if pair and not isinstance(target, str):
            raise _Rejected(422, f"items[{index}]: this judge scores (text, target) pairs; "
                            "'target' (a string) is missing")
        if not pair and target is not None:
            raise _Rejected(422, f"items[{index}]: this judge scores single texts; drop 'target'")
        for field in ("text", "target"):
            value = item.get(field)
            if value is not None and len(value) > limits["max_text_chars"]:
                raise _Rejected(413, f"items[{index}].{field} has {len(value)} characters, over "
                                "the limit", limit="max_text_chars", value=limits["max_text_chars"])
        out.append((item["text"], target))
    return out


class _Metrics:
    """One replica's Prometheus metrics, in a registry of its own."""

    def __init__(self, replica: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        labels = {"labelnames": ("replica",), "registry": self.registry}
        self.requests = Counter("raydag_judge_requests", "Score requests (and refused "
                                "tokens on any route) by HTTP status.",
                                labelnames=("replica", "code"), registry=self.registry)
        self.items = Counter("raydag_judge_items", "Items scored.", **labels)
        self.unparseable = Counter("raydag_judge_unparseable_items",
                                   "Items whose completion gave no score.", **labels)
        self.latency = Histogram("raydag_judge_request_seconds", "Score request latency in the "
                                 "replica.", buckets=_LATENCY_BUCKETS, **labels)
        self.batch = Histogram("raydag_judge_batch_items", "Items per engine call (dynamic "
                               "batching).", buckets=_BATCH_BUCKETS, **labels)
        self.engine = Histogram("raydag_judge_engine_seconds", "Seconds per engine call.",
                                buckets=_LATENCY_BUCKETS, **labels)
        self.replica = replica

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


@serve.deployment(name="JudgeServer")
class JudgeServer:
    """One replica: the judge operator, one engine, dynamic batching, limits and a token.

    Args:
        op_kwargs: :class:`JudgeOp` arguments (see :func:`raydag.chain.judge_op_kwargs`).
        engine_spec: :func:`raydag.engines.make_engine` arguments.
        limits: ``max_body_bytes``, ``max_items``, ``max_text_chars``, ``max_batch_size``,
            ``batch_wait_timeout_s``.
        token_sha256: SHA-256 of the bearer token, or None for no token.
    """

    def __init__(self, op_kwargs: dict, engine_spec: dict, limits: dict,
                 token_sha256: str | None) -> None:
        from raydag.engines import make_engine

        self.op = JudgeOp(**op_kwargs)
        self.model = engine_spec["model"]
        self.limits = limits
        self.token_sha256 = token_sha256
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raydag-engine")
        self.engine = self._thread.submit(make_engine, engine_spec).result()
        self._score_items.set_max_batch_size(limits["max_batch_size"])
        self._score_items.set_batch_wait_timeout_s(limits["batch_wait_timeout_s"])
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside Serve (a direct test of the class)
            replica = "local"
        self.metrics = _Metrics(replica)

    def check_health(self) -> None:
        """Serve's health probe: the engine thread must be alive."""
        if self._thread._shutdown:  # noqa: SLF001
            raise RuntimeError("the engine thread has stopped")

    def score_items(self, items: list[tuple[str, str | None]]) -> list[dict]:
        """Score items in one engine call, outside Serve's batching (used by the offline
        benchmark: the same engine on the same items)."""
        requests = [self.op.score_request(text, target) for text, target in items]
        completions = self._thread.submit(self.engine.generate, requests).result()
        return [self._result(c) for c in completions]

    def _result(self, completion) -> dict:
        result = self.op.score(completion)
        if result is None:
            self.metrics.unparseable.labels(self.metrics.replica).inc()
            return {"score": None, "probs": None, "source": None, "error": "unparseable_score"}
        out = {"score": result["score"], "probs": [result["probs"][k] for k in SCORES],
               "source": result["source"]}
        if self.op.min_score is not None:
            out["passed"] = result["score"] >= self.op.min_score
        return out

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _score_items(self, items: list[tuple[str, str | None]]) -> list[dict]:
        requests = [self.op.score_request(text, target) for text, target in items]
        started = time.perf_counter()
        completions = await asyncio.get_running_loop().run_in_executor(
            self._thread, self.engine.generate, requests)
        self.metrics.engine.labels(self.metrics.replica).observe(time.perf_counter() - started)
        self.metrics.batch.labels(self.metrics.replica).observe(len(items))
        return [self._result(c) for c in completions]

    def _authorized(self, request) -> bool:
        if self.token_sha256 is None:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        digest = hashlib.sha256(token.strip().encode()).hexdigest()
        return scheme.lower() == "bearer" and hmac.compare_digest(digest, self.token_sha256)

    async def __call__(self, request):
        from starlette.responses import JSONResponse, Response

        path = request.url.path.rstrip("/")
        if path.endswith("/healthz") and request.method == "GET":
            return JSONResponse({"status": "ok", "model": self.model, "rubric": self.op.rubric,
                                 "pair": self.op.target_column is not None})
        if not self._authorized(request):
            self.metrics.requests.labels(self.metrics.replica, "401").inc()
            return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        if path.endswith("/metrics") and request.method == "GET":
            return Response(self.metrics.render(),
                            media_type="text/plain; version=0.0.4; charset=utf-8")
        if not path.endswith("/v1/score"):
            return JSONResponse({"error": f"no route {request.method} {request.url.path}; "
                                 "POST /v1/score, GET /healthz, GET /metrics"}, status_code=404)
        if request.method != "POST":
            return JSONResponse({"error": "use POST for /v1/score"}, status_code=405)
        started = time.perf_counter()
        status, body = await self._score_request(request)
        self.metrics.requests.labels(self.metrics.replica, str(status)).inc()
        self.metrics.latency.labels(self.metrics.replica).observe(time.perf_counter() - started)
        return JSONResponse(body, status_code=status)

    async def _score_request(self, request) -> tuple[int, dict]:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.limits["max_body_bytes"]:
            return 413, {"error": f"request body is {declared} bytes, over the limit",
                         "limit": "max_body_bytes", "value": self.limits["max_body_bytes"]}
        try:
            items = parse_items(await request.body(), self.limits,
                                pair=self.op.target_column is not None)
        except _Rejected as rejected:
            return rejected.status, rejected.body
        scores = await asyncio.gather(*(self._score_items(item) for item in items))
        self.metrics.items.labels(self.metrics.replica).inc(len(items))
        return 200, {"model": self.model, "scores": list(scores)}


def judge_deployment(job: JobConfig, cluster: dict[str, float]):
    """The bound Serve application for ``job``'s judge: replica resources, autoscaling and
    batching from the job (see :mod:`raydag.resources` for the placement math)."""
    from raydag.chain import judge_op_kwargs
    from raydag.resources import engine_replica_options, teacher_placement
    from raydag.teacher import engine_spec

    if job.teacher.engine != "vllm":
        raise RaydagError("raydag serve runs the judge on a vLLM engine (teacher.engine: vllm)")
    cfg = job.serve
    placement = teacher_placement(job.teacher, cluster.get("GPU", 0.0))
    limits = {key: getattr(cfg, key) for key in ("max_body_bytes", "max_items", "max_text_chars",
                                                 "max_batch_size", "batch_wait_timeout_s")}
    # The batch stage's operator, minus what only the batch stage does (the rationale).
    op_kwargs = {**judge_op_kwargs(judge_stage(job)), "rationale": False}
    scaling = cfg.autoscaling
    return JudgeServer.options(
        ray_actor_options=engine_replica_options(placement["teacher_actor"],
                                                placement["teacher_cpu_threads"]),
        max_ongoing_requests=cfg.max_ongoing_requests,
        autoscaling_config={
            "min_replicas": scaling.min_replicas, "max_replicas": scaling.max_replicas,
            "initial_replicas": scaling.min_replicas,
            "target_ongoing_requests": scaling.target_ongoing_requests,
            "upscale_delay_s": scaling.upscale_delay_s,
            "downscale_delay_s": scaling.downscale_delay_s,
        },
    ).bind(op_kwargs, engine_spec(job, placement), limits, token_digest(job))


def build_app(args: dict):
    """Application builder for Serve config files and KubeRay RayService.

    Args:
        args: ``{"job": "jobs/judge.yaml", "overrides": ["key=value", ...]}``.
    """
    import ray

    if "job" not in args:
        raise RaydagError("raydag.serve:build_app needs args: {job: <job YAML>}")
    job = load_job(args["job"], list(args.get("overrides", [])))
    cluster = ray.cluster_resources() if ray.is_initialized() else {}
    return judge_deployment(job, cluster)


def start(job: JobConfig, *, host: str | None = None, port: int | None = None) -> str:
    """Deploy the judge on the Ray this process is connected to; return the endpoint's URL.

    The HTTP proxy binds ``serve.host`` (127.0.0.1 unless configured otherwise).
    """
    import ray

    host = host or job.serve.host
    port = port or job.serve.port
    serve.start(http_options={"host": host, "port": port})
    app = judge_deployment(job, ray.cluster_resources())
    serve.run(app, name=APP_NAME, route_prefix=job.serve.route_prefix)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}{job.serve.route_prefix.rstrip('/')}"
