"""An engine for any OpenAI-compatible chat endpoint: a hosted API or a ``vllm serve`` server.

Requests go to ``POST {base_url}/chat/completions``, several at a time, each with its own
timeout; connection errors, timeouts, 408, 409, 429 and 5xx answers are retried with
exponential backoff and jitter (a ``Retry-After`` header is honoured). The vLLM-only features
of :class:`~raydag.engines.base.ChatRequest` (``continue_final_message`` and ``choices``) are
sent as vLLM's request extensions, which hosted APIs may reject.

Example:
    >>> from raydag.engines.base import ChatRequest
    >>> from raydag.engines.openai import OpenAIEngine
    >>> engine = OpenAIEngine("smollm2", "http://127.0.0.1:8000/v1")  # doctest: +SKIP
    >>> request = ChatRequest(({"role": "user", "content": "Hi"},), max_tokens=8, seed=1)
    >>> engine.generate([request])[0].text  # doctest: +SKIP
    'Hello! How can I help'
"""

from __future__ import annotations

import email.utils
import logging
import math
import os
import random
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any

import httpx

from raydag.engines.base import ChatRequest, Completion
from raydag.errors import ConfigError, RaydagError

logger = logging.getLogger(__name__)

_RETRY_STATUS = frozenset({408, 409, 429})
_RETRY_EXCEPTIONS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
_MAX_RETRY_AFTER_S = 60.0  # a longer Retry-After is cut to this
_MAX_ERROR_CHARS = 500


def request_body(model: str, request: ChatRequest) -> dict[str, Any]:
    """The JSON body of ``POST /chat/completions`` for one request.

    Args:
        model: Model name the server serves.
        request: The chat request.

    Returns:
        The body; vLLM extensions appear only when the request uses them.
    """
    body: dict[str, Any] = {
        "model": model,
        "messages": [dict(m) for m in request.messages],
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "n": 1,
    }
    if request.seed is not None:
        body["seed"] = request.seed
    if request.stop:
        body["stop"] = list(request.stop)
    if request.continue_final_message:
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False
    if request.choices:
        body["structured_outputs"] = {"choice": list(request.choices)}
    elif request.regex:
        body["structured_outputs"] = {"regex": request.regex}
    if request.logprobs > 0:
        body["logprobs"] = True
        body["top_logprobs"] = request.logprobs
    return body


def _error_text(response: httpx.Response) -> str:
    """The server's own error message (OpenAI's ``{"error": {"message": ...}}`` or raw text)."""
    try:
        data = response.json()
    except ValueError:
        data = None
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"][:_MAX_ERROR_CHARS]
        if isinstance(error, str):
            return error[:_MAX_ERROR_CHARS]
    text = response.text.strip()
    return text[:_MAX_ERROR_CHARS] if text else "(empty body)"


def _retry_after_s(response: httpx.Response) -> float | None:
    """Seconds asked for by a ``Retry-After`` header (seconds or an HTTP date), if any."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), _MAX_RETRY_AFTER_S)


def _int_field(usage: Any, name: str, url: str) -> int:
    value = usage.get(name) if isinstance(usage, dict) else None
    if not isinstance(value, int) or isinstance(value, bool):
        raise RaydagError(f"malformed response from {url}: usage.{name} is missing or not an integer")
    return value


def parse_completion(data: Any, url: str, want_logprobs: bool) -> Completion:
    """Turn a decoded ``/chat/completions`` answer into a :class:`Completion`.

    Args:
        data: The decoded JSON body.
        url: The endpoint, for error messages.
        want_logprobs: The request asked for log-probabilities, so the answer must carry them.

    Returns:
        The completion of the first (only) choice.

    Raises:
        RaydagError: The answer lacks choices, a message, usage counts or asked-for logprobs.
    """
    if not isinstance(data, dict):
        raise RaydagError(f"malformed response from {url}: expected a JSON object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        detail = f" (error: {data['error']})" if "error" in data else ""
        raise RaydagError(f"malformed response from {url}: no choices{detail}")
    choice = choices[0]
    message = choice.get("message")
    if not isinstance(message, dict):
        raise RaydagError(f"malformed response from {url}: choices[0] has no message")
    text = message.get("content")
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise RaydagError(f"malformed response from {url}: message content is not a string")
    usage = data.get("usage")
    prompt_tokens = _int_field(usage, "prompt_tokens", url)
    completion_tokens = _int_field(usage, "completion_tokens", url)
    top: list[dict[str, float]] = []
    sampled: list[float] = []
    if want_logprobs:
        content = (choice.get("logprobs") or {}).get("content")
        if content is None and completion_tokens > 0:
            raise RaydagError(
                f"malformed response from {url}: log-probabilities were requested but "
                "choices[0].logprobs.content is missing"
            )
        try:
            for entry in content or []:
                token, logprob = str(entry["token"]), float(entry["logprob"])
                alternatives: dict[str, float] = {}
                for alt in entry.get("top_logprobs") or []:
                    # Several token ids may decode to one string: keep the likeliest.
                    alternatives.setdefault(str(alt["token"]), float(alt["logprob"]))
                alternatives.setdefault(token, logprob)
                top.append(alternatives)
                sampled.append(logprob)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise RaydagError(
                f"malformed response from {url}: bad logprobs entry ({type(exc).__name__}: {exc})"
            ) from None
    return Completion(
        text=text,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        finish_reason=choice.get("finish_reason"),
        top_logprobs=tuple(top),
        token_logprobs=tuple(sampled),
    )


class _Cancelled(Exception):
    """Another request of the batch failed; this one stops retrying."""


class OpenAIEngine:
    """Runs chat requests against an OpenAI-compatible ``/chat/completions`` endpoint.

    Args:
        model: Model name as the server knows it (``--served-model-name`` for ``vllm serve``).
        base_url: API root, e.g. ``http://127.0.0.1:8000/v1`` or ``https://api.openai.com/v1``.
        api_key_env: Name of the environment variable that holds the API key, sent as
            ``Authorization: Bearer ...``; None sends no key.
        max_concurrency: Requests in flight at once.
        timeout_s: Timeout of each try (connect, and each wait for data from the server).
        max_retries: Retries after the first try, so ``max_retries + 1`` tries in all.
        backoff_s: First backoff; it doubles every retry, with jitter of +-50%.

    Raises:
        ConfigError: ``api_key_env`` names an unset variable, or an argument is out of range.
    """

    def __init__(
        self,
        model: str,
        base_url: str,
        api_key_env: str | None = None,
        max_concurrency: int = 8,
        timeout_s: float = 60.0,
        max_retries: int = 4,
        backoff_s: float = 0.5,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"base_url must start with http:// or https://, got {base_url!r}")
        if max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be at least 1, got {max_concurrency}")
        if not timeout_s > 0:
            raise ConfigError(f"timeout_s must be positive, got {timeout_s}")
        if max_retries < 0:
            raise ConfigError(f"max_retries must be 0 or more, got {max_retries}")
        if backoff_s < 0:
            raise ConfigError(f"backoff_s must be 0 or more, got {backoff_s}")
        self._headers = {"Content-Type": "application/json"}
        if api_key_env is not None:
            key = os.environ.get(api_key_env)
            if not key:
                raise ConfigError(
                    f"the API key variable {api_key_env} is not set in the environment"
                )
            self._headers["Authorization"] = f"Bearer {key}"
        self.model_name = model
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.api_key_env = api_key_env
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self._client: httpx.Client | None = None
        self._lock = threading.Lock()
        # Jitter from a private generator: the pipeline's global random state stays untouched.
        self._random = random.Random()

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAIEngine(model={self.model_name!r}, base_url={self.base_url!r})"

    def __getstate__(self) -> dict[str, Any]:
        # Picklable (e.g. for Ray): the client and lock are rebuilt on the other side.
        state = self.__dict__.copy()
        state["_client"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _http(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                self._client = httpx.Client(
                    headers=self._headers,
                    timeout=httpx.Timeout(self.timeout_s),
                    limits=httpx.Limits(max_connections=self.max_concurrency,
                                        max_keepalive_connections=self.max_concurrency),
                )
            return self._client

    def close(self) -> None:
        """Close the HTTP connections (the engine reopens them if used again)."""
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def __enter__(self) -> OpenAIEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _backoff(self, retry: int) -> float:
        return self.backoff_s * (2**retry) * (0.5 + self._random.random())

    def _post(self, request: ChatRequest, stop: threading.Event) -> Completion:
        """One request with retries; raises RaydagError after the last try."""
        body = request_body(self.model_name, request)
        client = self._http()
        tries = self.max_retries + 1
        problem = ""
        for attempt in range(tries):
            if stop.is_set():
                raise _Cancelled()
            retry_after = None
            try:
                response = client.post(self.url, json=body)
            except _RETRY_EXCEPTIONS as exc:
                problem = f"{type(exc).__name__}: {exc or 'no detail'} (timeout {self.timeout_s} s)"
            except httpx.HTTPError as exc:
                raise RaydagError(f"POST {self.url} failed: {type(exc).__name__}: {exc}") from None
            else:
                status = response.status_code
                if 200 <= status < 300:
                    try:
                        data = response.json()
                    except ValueError:
                        raise RaydagError(
                            f"malformed response from {self.url}: body is not JSON: "
                            f"{response.text[:200]!r}"
                        ) from None
                    return parse_completion(data, self.url, request.logprobs > 0)
                problem = f"HTTP {status}: {_error_text(response)}"
                if status not in _RETRY_STATUS and status < 500:
                    raise RaydagError(f"POST {self.url} failed: {problem}")
                retry_after = _retry_after_s(response)
            if attempt + 1 < tries:
                delay = retry_after if retry_after is not None else self._backoff(attempt)
                logger.warning("POST %s: %s; retry %d/%d in %.2f s", self.url, problem,
                               attempt + 1, self.max_retries, delay)
                if stop.wait(delay):
                    raise _Cancelled()
        raise RaydagError(f"POST {self.url} failed after {tries} tries: {problem}")

    def generate(self, requests: list[ChatRequest]) -> list[Completion]:
        """Run the requests, at most ``max_concurrency`` at once.

        Args:
            requests: Chat requests.

        Returns:
            One completion per request, in request order.

        Raises:
            RaydagError: A request failed after its last try, was refused (a 4xx other than
                408, 409 and 429), or got a malformed answer. The other requests stop
                retrying and the first failure is raised.
        """
        if not requests:
            return []
        stop = threading.Event()
        workers = min(self.max_concurrency, len(requests))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="raydag-openai") as pool:
            futures = [pool.submit(self._post, r, stop) for r in requests]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in futures if f in done and f.exception() is not None]
            if failed:
                stop.set()  # the others stop retrying; queued ones never start
                for future in futures:
                    future.cancel()
                raise failed[0].exception()  # type: ignore[misc]
        return [f.result() for f in futures]

