"""A small Python client of the scoring endpoint (``raydag serve``); standard library only.

Example:
    >>> from raydag.client import JudgeClient
    >>> client = JudgeClient("http://127.0.0.1:8000", token=None)  # doctest: +SKIP
    >>> client.score(["Where is my parcel? It was due Monday."])  # doctest: +SKIP
    [{'score': 4.1, 'probs': [...], 'source': 'logprobs'}]

One client holds one keep-alive connection: use one per thread.
"""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit


def metric_total(text: str, name: str) -> float:
    """Sum of a metric's samples over its label sets, from Prometheus text (``/metrics``)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


class EndpointError(RuntimeError):
    """The endpoint answered with an error status.

    Attributes:
        status: HTTP status.
        body: The JSON error body (``error``, and ``limit`` / ``value`` for a limit).
    """

    def __init__(self, status: int, body: dict) -> None:
        super().__init__(f"HTTP {status}: {body.get('error', body)}")
        self.status, self.body = status, body


class JudgeClient:
    """Calls ``POST /v1/score``, ``GET /healthz`` and ``GET /metrics``.

    Args:
        url: The endpoint's base URL, e.g. ``http://127.0.0.1:8000`` (plus the route prefix).
        token: Bearer token, when the endpoint has one.
        timeout_s: Socket timeout per request.
    """

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 60.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http(s) URL such as http://127.0.0.1:8000, got {url!r}")
        self._parts, self._prefix = parts, parts.path.rstrip("/")
        self._headers = {"Content-Type": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self.timeout_s = timeout_s
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            kind = (http.client.HTTPSConnection if self._parts.scheme == "https"
                    else http.client.HTTPConnection)
            self._conn = kind(self._parts.hostname, self._parts.port, timeout=self.timeout_s)
        return self._conn

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """One request on the kept-alive connection (reconnecting once if the server closed
        it); returns the status and the body."""
        for attempt in (0, 1):
            conn = self._connection()
            try:
                conn.request(method, self._prefix + path, body=body, headers=self._headers)
                response = conn.getresponse()
                return response.status, response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def score_raw(self, items: list) -> dict:
        """POST the items; the whole JSON answer (``model``, ``scores``).

        Raises:
            EndpointError: on any status but 200, with the endpoint's JSON error.
        """
        status, body = self.request("POST", "/v1/score", json.dumps({"items": items}).encode())
        try:
            payload = json.loads(body)
        except json.JSONDecodeError:
            payload = {"error": body.decode(errors="replace")[:500]}
        if status != 200:
            raise EndpointError(status, payload)
        return payload

    def score(self, items: list) -> list[dict]:
        """Scores for texts (strings) or ``{"text", "target"}`` items, in order."""
        return self.score_raw(items)["scores"]

    def health(self) -> dict:
        """``GET /healthz``."""
        status, body = self.request("GET", "/healthz")
        if status != 200:
            raise EndpointError(status, {"error": body.decode(errors="replace")[:500]})
        return json.loads(body)

    def metrics(self) -> str:
        """``GET /metrics``: Prometheus text of the replica that answered."""
        status, body = self.request("GET", "/metrics")
        if status != 200:
            raise EndpointError(status, {"error": body.decode(errors="replace")[:500]})
        return body.decode()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "JudgeClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
