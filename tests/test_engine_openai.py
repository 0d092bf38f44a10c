"""OpenAIEngine against a scripted HTTP server (fast) and a real vLLM OpenAI server (slow)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from raydag.engines.base import ChatRequest
from raydag.engines.openai import OpenAIEngine
from raydag.errors import RaydagError

USER = ({"role": "user", "content": "Hi"},)


def ok(text="hello", prompt_tokens=7, completion_tokens=2, finish="stop", logprobs=None):
    """A valid /chat/completions answer."""
    choice = {"index": 0, "message": {"role": "assistant", "content": text},
              "finish_reason": finish, "logprobs": logprobs}
    return {"status": 200, "json": {
        "id": "cmpl-1", "object": "chat.completion", "model": "m", "choices": [choice],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens}}}


def fail(status, message="boom", headers=None):
    return {"status": status, "headers": headers or {},
            "json": {"error": {"message": message, "type": "Error", "code": status}}}


class ScriptedServer:
    """A local HTTP server that answers POSTs from a script and records what it received.

    Each script entry is a dict (``status``, ``json`` or ``raw``, ``headers``, ``delay``) or a
    callable taking the request body and returning one; with the script empty, ``default`` is
    used.
    """

    def __init__(self):
        self.script: deque = deque()
        self.default = None
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.paths: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = json.loads(raw)
                with server.lock:
                    server.bodies.append(body)
                    server.headers.append(dict(self.headers))
                    server.paths.append(self.path)
                    entry = server.script.popleft() if server.script else server.default
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    if callable(entry):
                        entry = entry(body)
                    time.sleep(entry.get("delay", 0))
                    payload = entry["raw"] if "raw" in entry else json.dumps(entry["json"]).encode()
                    self.send_response(entry["status"])
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for key, value in entry.get("headers", {}).items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)
                finally:
                    with server.lock:
                        server.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = ScriptedServer()
    yield srv
    srv.close()


def engine_for(srv, **options):
    options = {"backoff_s": 0.001, "timeout_s": 5.0, **options}
    return OpenAIEngine("m", srv.base_url, **options)


# --------------------------------------------------------------------------- retries


def test_retries_server_errors_then_succeeds(server):
    server.script.extend([fail(500, "overloaded"), {"status": 503, "raw": b"busy"}, ok("fine")])
    out = engine_for(server).generate([ChatRequest(USER, max_tokens=4)])
    assert [c.text for c in out] == ["fine"]
    assert (out[0].prompt_tokens, out[0].completion_tokens, out[0].finish_reason) == (7, 2, "stop")
    assert len(server.bodies) == 3
    assert server.paths == ["/v1/chat/completions"] * 3


@pytest.mark.parametrize("status", [408, 409, 429, 502])
def test_retryable_statuses_are_retried(server, status):
    server.script.extend([fail(status), ok("after retry")])
    assert engine_for(server).generate([ChatRequest(USER, max_tokens=4)])[0].text == "after retry"
    assert len(server.bodies) == 2


def test_gives_up_after_last_try_with_url_status_and_server_message(server):
    server.default = fail(500, "the GPU is on fire")
    engine = engine_for(server, max_retries=2)
    with pytest.raises(RaydagError) as info:
        engine.generate([ChatRequest(USER, max_tokens=4)])
    message = str(info.value)
    assert f"{server.base_url}/chat/completions" in message
    assert "500" in message and "the GPU is on fire" in message and "3 tries" in message
    assert len(server.bodies) == 3


def test_429_honours_retry_after(server):
    server.script.extend([fail(429, "slow down", headers={"Retry-After": "0.4"}), ok("ok")])
    engine = engine_for(server, backoff_s=0.0)
    start = time.monotonic()
    assert engine.generate([ChatRequest(USER, max_tokens=4)])[0].text == "ok"
    assert time.monotonic() - start >= 0.4
    assert len(server.bodies) == 2


def test_backoff_grows_between_tries(server):
    server.default = fail(503)
    engine = engine_for(server, max_retries=3, backoff_s=0.05)  # >= 0.025 + 0.05 + 0.1 s
    start = time.monotonic()
    with pytest.raises(RaydagError):
        engine.generate([ChatRequest(USER, max_tokens=4)])
    assert time.monotonic() - start >= 0.17
    assert len(server.bodies) == 4


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_client_errors_are_not_retried(server, status):
    server.script.extend([fail(status, "max_tokens is too large for this model"), ok()])
    with pytest.raises(RaydagError) as info:
        engine_for(server).generate([ChatRequest(USER, max_tokens=99999)])
    assert str(status) in str(info.value)
    assert "max_tokens is too large for this model" in str(info.value)
    assert server.base_url in str(info.value)
    assert len(server.bodies) == 1


def test_timeout_is_retried_then_succeeds(server):
    server.script.extend([{**ok("late"), "delay": 1.0}, ok("on time")])
    engine = engine_for(server, timeout_s=0.2)
    start = time.monotonic()
    assert engine.generate([ChatRequest(USER, max_tokens=4)])[0].text == "on time"
    assert time.monotonic() - start < 0.9


def test_timeout_on_every_try_raises(server):
    server.default = {**ok("late"), "delay": 1.0}
    engine = engine_for(server, timeout_s=0.2, max_retries=1)
    with pytest.raises(RaydagError, match="(?i)timeout") as info:
        engine.generate([ChatRequest(USER, max_tokens=4)])
    assert "2 tries" in str(info.value)
    assert len(server.bodies) == 2


def test_connection_refused_raises_after_retries():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    engine = OpenAIEngine("m", f"http://127.0.0.1:{port}/v1", max_retries=2, backoff_s=0.001)
    with pytest.raises(RaydagError, match="ConnectError") as info:
        engine.generate([ChatRequest(USER, max_tokens=4)])
    assert f"127.0.0.1:{port}/v1/chat/completions" in str(info.value)
    assert "3 tries" in str(info.value)


# --------------------------------------------------------------------------- key


def test_bearer_header_carries_the_key_from_the_environment(server, monkeypatch):
    monkeypatch.setenv("RAYDAG_TEST_API_KEY", "sk-test-secret-123")
    server.default = ok()
    engine = engine_for(server, api_key_env="RAYDAG_TEST_API_KEY")
    engine.generate([ChatRequest(USER, max_tokens=4)])
    assert server.headers[0]["Authorization"] == "Bearer sk-test-secret-123"
    assert "sk-test-secret-123" not in repr(engine)


def test_no_key_variable_sends_no_authorization(server):
    server.default = ok()
    engine_for(server).generate([ChatRequest(USER, max_tokens=4)])
    assert "Authorization" not in server.headers[0]


def test_unset_key_variable_raises_naming_it(monkeypatch):
    monkeypatch.delenv("RAYDAG_TEST_API_KEY", raising=False)
    with pytest.raises(RaydagError, match="RAYDAG_TEST_API_KEY"):
        OpenAIEngine("m", "http://127.0.0.1:1/v1", api_key_env="RAYDAG_TEST_API_KEY")


# --------------------------------------------------------------------------- order


def _echo_slow_first(body):
    # Early requests answer last, so completion order is the reverse of request order.
    n = int(body["messages"][-1]["content"])
    return {**ok(f"answer {n}", completion_tokens=n + 1), "delay": 0.05 * (8 - n)}


@pytest.mark.parametrize("concurrency", [8, 3])
def test_results_come_back_in_request_order_under_bounded_concurrency(server, concurrency):
    server.default = _echo_slow_first
    requests = [ChatRequest(({"role": "user", "content": str(n)},), max_tokens=4) for n in range(8)]
    out = engine_for(server, max_concurrency=concurrency).generate(requests)
    assert [c.text for c in out] == [f"answer {n}" for n in range(8)]
    assert [c.completion_tokens for c in out] == list(range(1, 9))
    assert 1 < server.max_in_flight <= concurrency


def test_empty_batch_sends_nothing(server):
    assert engine_for(server).generate([]) == []
    assert server.bodies == []


def test_one_refused_request_fails_the_batch(server):
    server.default = lambda body: (fail(400, "bad seed") if body.get("seed") == 3
                                   else {**ok(), "delay": 0.05})
    requests = [ChatRequest(USER, max_tokens=4, seed=s) for s in range(6)]
    with pytest.raises(RaydagError, match="bad seed"):
        engine_for(server, max_concurrency=2).generate(requests)


# --------------------------------------------------------------------------- mapping


def test_request_fields_are_mapped_into_the_body(server):
    server.default = lambda body: ok(logprobs={"content": []} if body.get("logprobs") else None)
    messages = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "List:"},
                {"role": "assistant", "content": "1."})
    full = ChatRequest(messages, max_tokens=12, temperature=0.7, top_p=0.9, seed=42,
                       stop=("\n", "END"), continue_final_message=True,
                       choices=("billing", "shipping"), logprobs=3)
    plain = ChatRequest(USER, max_tokens=5)
    engine = engine_for(server, max_concurrency=1)
    engine.generate([full, plain])
    assert server.bodies[0] == {
        "model": "m", "messages": list(messages), "max_tokens": 12, "temperature": 0.7,
        "top_p": 0.9, "n": 1, "seed": 42, "stop": ["\n", "END"],
        "continue_final_message": True, "add_generation_prompt": False,
        "structured_outputs": {"choice": ["billing", "shipping"]},
        "logprobs": True, "top_logprobs": 3,
    }
    assert server.bodies[1] == {"model": "m", "messages": list(USER), "max_tokens": 5,
                                "temperature": 1.0, "top_p": 1.0, "n": 1}


def test_logprobs_are_parsed_with_the_sampled_token_included(server):
    content = [
        {"token": "ship", "logprob": -0.1, "bytes": [115],
         "top_logprobs": [{"token": "ship", "logprob": -0.1}, {"token": "bill", "logprob": -2.5}]},
        # The sampled token is not among the top ones (temperature sampling can do that).
        {"token": "ping", "logprob": -4.0,
         "top_logprobs": [{"token": "ment", "logprob": -0.2}, {"token": "ped", "logprob": -1.9}]},
    ]
    server.default = ok("shipping", completion_tokens=2, logprobs={"content": content})
    out = engine_for(server).generate([ChatRequest(USER, max_tokens=4, logprobs=2)])[0]
    assert out.top_logprobs == ({"ship": -0.1, "bill": -2.5},
                                {"ment": -0.2, "ped": -1.9, "ping": -4.0})
    assert out.token_logprobs == (-0.1, -4.0)


def test_no_logprobs_unless_asked(server):
    server.default = ok("x")
    out = engine_for(server).generate([ChatRequest(USER, max_tokens=4)])[0]
    assert out.top_logprobs == () and out.token_logprobs == ()


def test_null_content_becomes_empty_text(server):
    response = ok(completion_tokens=0, finish="length")
    response["json"]["choices"][0]["message"]["content"] = None
    server.default = response
    out = engine_for(server).generate([ChatRequest(USER, max_tokens=1)])[0]
    assert (out.text, out.completion_tokens, out.finish_reason) == ("", 0, "length")


@pytest.mark.parametrize("response, problem", [
    ({"status": 200, "raw": b"<html>gateway</html>"}, "not JSON"),
    ({"status": 200, "json": {"object": "chat.completion", "choices": []}}, "no choices"),
    ({"status": 200, "json": {"error": {"message": "quota"}}}, "no choices"),
    ({"status": 200, "json": {"choices": [{"index": 0, "finish_reason": "stop"}]}}, "no message"),
    ({**ok(), "json": {**ok()["json"], "usage": None}}, "prompt_tokens"),
    (ok(logprobs=None), "logprobs"),
])
def test_malformed_responses_raise_naming_url_and_problem(server, response, problem):
    server.default = response
    logprobs = 2 if problem == "logprobs" else 0
    with pytest.raises(RaydagError, match=problem) as info:
        engine_for(server).generate([ChatRequest(USER, max_tokens=4, logprobs=logprobs)])
    assert f"{server.base_url}/chat/completions" in str(info.value)
    assert len(server.bodies) == 1


def test_engine_survives_pickling(server):
    import pickle

    server.default = ok("again")
    engine = engine_for(server)
    engine.generate([ChatRequest(USER, max_tokens=4)])
    clone = pickle.loads(pickle.dumps(engine))
    assert clone.generate([ChatRequest(USER, max_tokens=4)])[0].text == "again"
    engine.close()


# --------------------------------------------------------------------------- real vLLM server

SERVED_NAME = "smollm2"
STARTUP_S = 180


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:  # fields after the name: state, ppid, pgrp
                pids.append(int(entry.name))
    return pids


def _listening_addresses(pids: list[int]) -> list[str]:
    """Local addresses of the TCP sockets in LISTEN state that these processes hold."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                address = cols[1].split(":")[0]
                if len(address) == 8:
                    ip = ".".join(str(b) for b in reversed(bytes.fromhex(address)))
                else:
                    ip = address.upper()
                found.append(ip)
    return found


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    """A real OpenAI-compatible vLLM server on the embedded teacher, on 127.0.0.1 only."""
    from raydag.models import resolve_model

    from raydag.resources import teacher_dtype

    model = str(resolve_model("embedded:smollm2-135m-instruct"))
    dtype = teacher_dtype("auto", on_gpu=False)[0]  # what this host runs fast
    port = _free_port()
    workdir = tmp_path_factory.mktemp("vllm-serve")
    log = workdir / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "2",
           "VLLM_HOST_IP": "127.0.0.1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "TMPDIR": str(workdir)}  # its ZMQ/IPC files go under pytest's temp folder
    # Not `vllm serve`: in vllm-cpu that CLI dies at start (it asks the package metadata for
    # "vllm", but the distribution is "vllm-cpu"). The api_server module is the same server.
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
        "--host", "127.0.0.1", "--port", str(port), "--served-model-name", SERVED_NAME,
        "--dtype", dtype, "--max-model-len", "2048", "--enforce-eager",
        "--no-enable-chunked-prefill", "--max-num-batched-tokens", "8192", "--seed", "0",
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=workdir, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM server exited with {proc.returncode}:\n{_tail(log)}")
            try:
                if httpx.get(f"{base}/health", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM server not healthy after {STARTUP_S} s:\n{_tail(log)}")
            time.sleep(1.0)
        yield {"base_url": f"{base}/v1", "proc": proc, "log": log}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _group_pids(proc.pid) and time.monotonic() < deadline:  # engine core, workers
            time.sleep(0.2)
        for pid in _group_pids(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for entry in workdir.iterdir():  # IPC sockets, an inductor cache: keep only the log
            if entry != log:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def served(vllm_server):
    engine = OpenAIEngine(SERVED_NAME, vllm_server["base_url"], max_concurrency=4, timeout_s=120.0,
                          max_retries=1)
    yield engine
    engine.close()


@pytest.mark.slow
def test_server_listens_only_on_loopback(vllm_server):
    addresses = _listening_addresses(_group_pids(vllm_server["proc"].pid))
    assert addresses, "found no listening socket of the server"
    loopback = {"127.0.0.1", "00000000000000000000000001000000",  # ::1
                "0000000000000000FFFF00000100007F"}  # ::ffff:127.0.0.1
    assert set(addresses) <= loopback, addresses


@pytest.mark.slow
def test_real_server_plain_chat(served):
    requests = [ChatRequest(({"role": "user", "content": q},), max_tokens=24, temperature=0.0)
                for q in ("Say hello in one short sentence.", "Name a colour.", "What is 2+2?")]
    out = served.generate(requests)
    assert len(out) == 3
    for completion in out:
        assert completion.text.strip()
        assert completion.prompt_tokens > 5
        assert 1 <= completion.completion_tokens <= 24
        assert completion.finish_reason in {"stop", "length"}
    assert out[0].text != out[1].text


@pytest.mark.slow
def test_real_server_continues_the_final_message(served):
    messages = ({"role": "user", "content": "List five fruits as a numbered list."},
                {"role": "assistant", "content": "1. Apple\n2. Banana\n3."})
    out = served.generate([ChatRequest(messages, max_tokens=24, temperature=0.0,
                                       continue_final_message=True)])[0]
    assert out.text.strip() and not out.text.lstrip().startswith("1.")
    assert "assistant" not in out.text and "<|im_" not in out.text
    assert "4." in out.text, out.text  # the list goes on from item 3


@pytest.mark.slow
def test_real_server_choices_with_logprobs(served):
    choices = ("billing", "shipping", "technical")
    request = ChatRequest(
        ({"role": "user", "content": "Which team handles this message: 'My parcel has been stuck "
                                     "in the depot for a week.' Answer billing, shipping or "
                                     "technical."},),
        max_tokens=8, temperature=0.0, choices=choices, logprobs=5)
    out = served.generate([request])[0]
    assert out.text in choices
    assert out.top_logprobs and len(out.top_logprobs) == out.completion_tokens
    assert len(out.token_logprobs) == len(out.top_logprobs)
    for top, sampled in zip(out.top_logprobs, out.token_logprobs):
        assert 1 <= len(top) <= 6 and sampled in top.values()
        assert all(v <= 0.0 for v in top.values())


@pytest.mark.slow
def test_real_server_seed_repeats_the_same_text(served):
    request = ChatRequest(({"role": "user", "content": "Write a short story opening."},),
                          max_tokens=32, temperature=1.0, seed=1234)
    first = served.generate([request])[0].text
    second = served.generate([request])[0].text
    other = served.generate([ChatRequest(request.messages, max_tokens=32, temperature=1.0,
                                         seed=99)])[0].text
    assert first and first == second
    assert other != first


@pytest.mark.slow
def test_openai_teacher_job_runs_through_the_http_engine(vllm_server, ray_local, tmp_path):
    """jobs/openai_teacher.yaml, shrunk, against the real server: the multi-stage chain and the
    report work the same behind HTTP as with the in-process engine."""
    import json

    from raydag.cli import main
    from conftest import ROOT

    out = tmp_path / "out"
    code = main(["run", str(ROOT / "jobs" / "openai_teacher.yaml"), f"output_dir={out}",
                 f"teacher.base_url={vllm_server['base_url']}", f"teacher.model={SERVED_NAME}",
                 "stages.0.num_examples=8", "teacher.batch_size=4", "student.train_sets=[]",
                 "raw_examples=30"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["teacher"]["engine"] == "openai" and report["teacher"]["requests"] == 8
    counts = report["counts"]
    assert counts["ran"] == 8 and counts["accepted"] > 0
    assert counts["accepted"] + sum(counts["dropped"].values()) + sum(counts["quarantined"].values()) == 8
    assert report["cost"]["total_usd"] > 0 and report["cost"]["usd_per_accepted_example"] > 0
