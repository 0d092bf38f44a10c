"""One engine pool for a whole job: the teacher's engines in a Ray Serve application.

A Ray Data actor pool lives as long as its dataset, so a job whose teacher runs several passes
(the zero-shot-topic list, then the stage; self-instruct rounds; the shortcut rephrasing)
would load the model once per pass. :class:`EnginePool` deploys the engines once, as the
replicas of a Serve application (:class:`EngineHost`), for as long as the job needs them; each
pass's :class:`raydag.stages.ChainRunner` actors then hold a :class:`ServedEngine`, which sends
every request to the pool through a Serve deployment handle. Serve routes the requests and
scales the replicas; this is the pattern of ``ray.data.llm``'s ``ServeDeploymentProcessorConfig``.

Every completion names the replica's engine (an id made when it started, and its start
seconds), so the report counts the engines that served a job, whichever pass used them.
Which jobs use a pool: :func:`raydag.teacher.shares_engines` (``teacher.engine_pool``).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from raydag.engines.base import ChatRequest, Completion
from raydag.errors import EngineStartError, last_exception_line

# Requests a replica accepts at once. vLLM batches and queues them itself; Serve's default (5)
# would starve a batch engine.
MAX_ONGOING_REQUESTS = 4096
# A request whose replica died is sent again (to a new replica once Serve has started one)
# this many times.
RETRIES = 3


class EngineHost:
    """A Serve replica holding one engine (:func:`raydag.engines.make_engine`, asynchronous
    form) that requests from every pass of a job share.

    Args:
        engine_spec: Arguments of :func:`raydag.engines.make_engine` (``engine``: ``vllm``).
    """

    def __init__(self, engine_spec: dict) -> None:
        from raydag.engines import make_engine

        started = time.perf_counter()
        self.engine = make_engine(engine_spec, asynchronous=True)
        self.engine_id = uuid.uuid4().hex
        self.start_seconds = time.perf_counter() - started
        print(f"raydag: [engines] engine {self.engine_id[:8]} ({engine_spec.get('model')}) "
              f"started in {self.start_seconds:.1f}s", flush=True)

    async def agenerate(self, request: ChatRequest) -> tuple[str, float, Completion]:
        """One request; with the engine's id and start seconds."""
        return self.engine_id, self.start_seconds, await self.engine.agenerate(request)


class ServedEngine:
    """The engine seam's form of an :class:`EnginePool`: ``agenerate`` sends one request to the
    job's Serve application. ``engines`` holds the start seconds of each engine that answered,
    by engine id.

    Args:
        app: The Serve application's name.
        model: The model the pool serves (for lineage).
    """

    def __init__(self, app: str, model: str) -> None:
        from ray import serve

        self.model_name = model
        self.engines: dict[str, float] = {}
        self._handle = serve.get_deployment_handle(EngineHost.__name__, app)

    async def agenerate(self, request: ChatRequest) -> Completion:
        """One request, run by whichever replica Serve routes it to; sent again (up to
        :data:`RETRIES` times) when that replica dies before it answers."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        for attempt in range(RETRIES + 1):
            try:
                engine_id, seconds, completion = await self._handle.agenerate.remote(request)
                break
            except (ActorDiedError, ActorUnavailableError, RayActorError):
                if attempt == RETRIES:
                    raise
                await asyncio.sleep(1.0 + attempt)  # Serve replaces the dead replica
        self.engines[engine_id] = seconds
        return completion


class EnginePool:
    """A job's engine pool: a Serve application of :class:`EngineHost` replicas, deployed on
    first use (:meth:`spec`, :meth:`start`) and deleted by :meth:`stop`.

    Args:
        engine_spec: Arguments of :func:`raydag.engines.make_engine`.
        pool_size: ``(min, max)`` replicas (equal: a fixed pool; else Serve autoscales on the
            requests in flight, ``target_ongoing_requests`` per replica).
        actor_options: Each replica's Ray actor options (``num_cpus``, ``num_gpus``,
            ``resources``, ``runtime_env``).
        target_ongoing_requests: Requests in flight per replica the autoscaler aims at.
        start_timeout_s: Seconds the engines may take to start (None: no limit).
    """

    def __init__(self, engine_spec: dict, pool_size: tuple[int, int], actor_options: dict,
                 target_ongoing_requests: int = 64, start_timeout_s: float | None = None) -> None:
        self.engine_spec = engine_spec
        self.pool_size = pool_size
        self.actor_options = actor_options
        self.target_ongoing_requests = target_ongoing_requests
        self.start_timeout_s = start_timeout_s
        self.app: str | None = None  # the running application's name
        self._started_serve = False

    def spec(self) -> dict:
        """Arguments of :func:`raydag.engines.make_engine` for an engine that uses this pool;
        the pool starts on first use (and again after :meth:`stop`)."""
        if self.app is None:
            self.start()
        return {"engine": "served", "app": self.app, "model": self.engine_spec.get("model", "")}

    def start(self) -> "EnginePool":
        """Deploy the replicas and wait until their engines run; :class:`EngineStartError` with
        the engine's own error when they cannot start, or have not after ``start_timeout_s``."""
        from ray import serve
        from ray.serve.schema import ApplicationStatus

        self.app = f"raydag-engines-{uuid.uuid4().hex[:12]}"
        self._started_serve = not _serve_running()
        if self._started_serve:  # no HTTP proxy: the pool is reached through handles only
            serve.start(proxy_location="Disabled")
        low, high = self.pool_size
        scaling: dict[str, Any] = (
            {"num_replicas": low} if low == high else
            {"autoscaling_config": {"min_replicas": low, "max_replicas": high,
                                    "target_ongoing_requests": self.target_ongoing_requests}})
        app = serve.deployment(EngineHost).options(
            ray_actor_options=self.actor_options, max_ongoing_requests=MAX_ONGOING_REQUESTS,
            # an engine that cannot start fails the job at once (Serve's default: 20 tries)
            max_constructor_retry_count=1, **scaling).bind(self.engine_spec)
        serve._run(app, name=self.app, route_prefix=None, _blocking=False)
        deadline = None if self.start_timeout_s is None else time.monotonic() + self.start_timeout_s
        while True:
            state = serve.status().applications.get(self.app)
            status = state.status if state is not None else None
            if status == ApplicationStatus.RUNNING:
                return self
            if status in (ApplicationStatus.DEPLOY_FAILED, ApplicationStatus.UNHEALTHY):
                self.stop()
                raise EngineStartError.failed(self.engine_spec, _cause(state))
            if deadline is not None and time.monotonic() > deadline:
                self.stop()
                raise EngineStartError.timed_out(self.engine_spec, self.start_timeout_s)
            time.sleep(0.5)

    def stop(self) -> None:
        """Delete the application (and Serve, when this pool started it and nothing else runs
        there)."""
        from ray import serve

        if self.app is None:
            return
        app, self.app = self.app, None
        try:
            serve.delete(app)
            if self._started_serve and not serve.status().applications:
                serve.shutdown()
        except Exception:  # noqa: BLE001 - a pool that is already gone is stopped
            pass


def _serve_running() -> bool:
    from ray import serve

    return serve.context._get_global_client(raise_if_no_controller_running=False) is not None


def _cause(state) -> str:
    """The engine's own error from a failed application's messages: the last line that names
    an exception, else the first line of the message."""
    text = "\n".join([state.message or ""] + [d.message or "" for d in state.deployments.values()])
    found = last_exception_line(text.splitlines())
    return (found or (text.strip().splitlines() or ["unknown"])[0])[:400]
