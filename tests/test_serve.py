"""The scoring endpoint: the judge stage on Ray Serve over real HTTP on 127.0.0.1, with the
real vLLM engine; scores compared with the batch judge stage on the same items."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest

from raydag.client import EndpointError, JudgeClient, metric_total
from raydag.config import load_job
from raydag.errors import RaydagError
from raydag.serve import _Rejected, judge_stage, parse_items

from conftest import free_port, write_jsonl

TOKEN = "s3cret-test-token"
TEXTS = [
    "My new kettle stopped heating after two days; can I get a replacement?",
    "Where is my parcel? The tracking page has said 'in transit' since Monday.",
    "The blender's lid cracked the first time I used it.",
    "I was charged twice for the same order, please refund one payment.",
    "How do I update the firmware on the smart TV I bought from you?",
    "asdf qwerty zxcv",
    "Lovely weather today, isn't it?",
    "Can I change the delivery address of order 4412 before it ships?",
    "The microwave display shows error E3 and it won't start.",
    "Do you deliver to the Channel Islands, and how long does it take?",
    "I'd like to return the toaster, the box is unopened.",
    "Your website logs me out every time I open the basket.",
]
LIMITS = {"max_body_bytes": 4000, "max_items": 8, "max_text_chars": 300}


def test_parse_items_names_each_limit_and_malformed_input():
    limits = {**LIMITS}
    assert parse_items(json.dumps({"items": ["a", {"text": "b"}]}).encode(), limits, pair=False) == [
        ("a", None), ("b", None)]
    assert parse_items(json.dumps({"items": [{"text": "a", "target": "t"}]}).encode(), limits,
                       pair=True) == [("a", "t")]
    cases = [
        (b"x" * 4001, 413, "max_body_bytes"),
        (json.dumps({"items": ["a"] * 9}).encode(), 413, "max_items"),
        (json.dumps({"items": ["a" * 301]}).encode(), 413, "max_text_chars"),
        (b"{not json", 400, None),
        (json.dumps({"items": []}).encode(), 422, None),
        (json.dumps({"texts": ["a"]}).encode(), 422, None),
        (json.dumps({"items": [{"txt": "a"}]}).encode(), 422, None),
    ]
    for body, status, limit in cases:
        with pytest.raises(_Rejected) as caught:
            parse_items(body, limits, pair=False)
        assert caught.value.status == status, body[:40]
        assert caught.value.body.get("limit") == limit
    with pytest.raises(_Rejected, match="'target'"):
        parse_items(json.dumps({"items": ["a"]}).encode(), limits, pair=True)


@pytest.fixture(scope="module")
def judge_job(tmp_path_factory):
    """A judge-only job over TEXTS, with a token, small limits and autoscaling settings."""
    folder = tmp_path_factory.mktemp("serve")
    labels = ["billing", "shipping", "technical"]
    write_jsonl(folder / "train.jsonl", [{"text": t, "label": labels[i % 3]} for i, t in enumerate(TEXTS)])
    write_jsonl(folder / "test.jsonl", [{"text": "test message", "label": "billing"}] * 3)
    port = free_port()
    (folder / "judge.yaml").write_text(f"""
name: serve-test
output_dir: out
raw_examples: {len(TEXTS)}
data:
  train_path: train.jsonl
  test_path: test.jsonl
  labels: [billing, shipping, technical]
  task: Route customer-support messages to an electronics shop.
teacher:
  batch_size: {len(TEXTS)}
  # float32: the served replica batches the texts differently from the batch stage, and bf16
  # kernels with AMX (Xeon) give scores that depend on the batch (measured: 2.018 vs 1.960);
  # float32 is batch-invariant to 1e-4 on both host kinds.
  dtype: float32
stages:
  - type: judge
    rubric: "5: a realistic, clear customer-support message to an electronics shop; 1: not a support message."
student:
  train_sets: []
serve:
  port: {port}
  token_env: RAYDAG_TEST_SERVE_TOKEN
  max_body_bytes: {LIMITS['max_body_bytes']}
  max_items: {LIMITS['max_items']}
  max_text_chars: {LIMITS['max_text_chars']}
  max_batch_size: 8
  batch_wait_timeout_s: 0.05
  max_ongoing_requests: 64
  autoscaling:
    min_replicas: 1
    max_replicas: 3
    target_ongoing_requests: 6
    upscale_delay_s: 900
    downscale_delay_s: 30
""")
    return folder / "judge.yaml"


@pytest.fixture(scope="module")
def endpoint(ray_local, judge_job, monkeypatch_module):
    """`raydag serve JOB --detach` in this process (Ray is already up): the endpoint's URL."""
    from ray import serve

    from raydag.cli import main

    monkeypatch_module.setenv("RAYDAG_TEST_SERVE_TOKEN", TOKEN)
    assert main(["serve", str(judge_job), "--detach"]) == 0
    job = load_job(str(judge_job))
    yield f"http://127.0.0.1:{job.serve.port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patcher:
        yield patcher


@pytest.mark.slow
def test_served_scores_equal_the_batch_judge_stage(endpoint, judge_job, ray_local):
    from raydag.pipeline import run_job

    job = load_job(str(judge_job))
    run_job(job)
    (folder,) = Path(job.output_dir).glob("runs/*/synthetic")
    batch = pd.read_parquet(folder).set_index("text")
    assert len(batch) == len(TEXTS)
    with JudgeClient(endpoint, token=TOKEN) as client:
        served = client.score(TEXTS[:8]) + client.score(TEXTS[8:])
    for text, result in zip(TEXTS, served):
        row = batch.loc[text]
        assert result["source"] == row["judge_score_source"] == "logprobs"
        assert 1.0 <= result["score"] <= 5.0
        assert result["score"] == pytest.approx(row["judge_score"], abs=1e-4), text  # measured: equal
        assert result["probs"] == pytest.approx(list(row["judge_score_probs"]), abs=1e-4)
    assert max(r["score"] for r in served) - min(r["score"] for r in served) > 0.05  # not constant


@pytest.mark.slow
def test_token_limits_health_and_errors_over_http(endpoint):
    import urllib.request

    with JudgeClient(endpoint) as anonymous:
        health = anonymous.health()  # open without a token
        assert health["status"] == "ok" and health["model"] == "embedded:smollm2-135m-instruct"
        with pytest.raises(EndpointError) as caught:
            anonymous.score(["hello"])
        assert caught.value.status == 401
    with JudgeClient(endpoint, token="wrong") as wrong:
        with pytest.raises(EndpointError) as caught:
            wrong.score(["hello"])
        assert caught.value.status == 401
        with pytest.raises(EndpointError) as caught:
            wrong.metrics()
        assert caught.value.status == 401
    with JudgeClient(endpoint, token=TOKEN) as client:
        for items, limit in ((["x"] * 9, "max_items"), (["x" * 301], "max_text_chars")):
            with pytest.raises(EndpointError) as caught:
                client.score(items)
            assert caught.value.status == 413
            assert caught.value.body["limit"] == limit
            assert caught.value.body["value"] == LIMITS[limit]
        status, body = client.request("POST", "/v1/score",
                                      json.dumps({"items": ["x"], "pad": "y" * 5000}).encode())
        assert status == 413 and json.loads(body)["limit"] == "max_body_bytes"
        with pytest.raises(EndpointError) as caught:
            client.score([{"text": 3}])
        assert caught.value.status == 422 and "items[0]" in caught.value.body["error"]
        status, body = client.request("GET", "/v1/nothing")
        assert status == 404 and b"/v1/score" in body
    request = urllib.request.Request(endpoint + "/v1/score", data=b"{", method="POST",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request)
    assert caught.value.code == 400 and "not JSON" in json.loads(caught.value.read())["error"]


@pytest.mark.slow
def test_concurrent_requests_are_batched_and_counted_in_metrics(endpoint):
    def one(text: str) -> float:
        with JudgeClient(endpoint, token=TOKEN) as client:
            return client.score([text])[0]["score"]

    with JudgeClient(endpoint, token=TOKEN) as client:
        before = metric_total(client.metrics(), "raydag_judge_batch_items_count")
        items_before = metric_total(client.metrics(), "raydag_judge_items_total")
    with ThreadPoolExecutor(16) as pool:
        scores = list(pool.map(one, TEXTS + TEXTS[:4]))
    assert len(scores) == 16 and all(1.0 <= s <= 5.0 for s in scores)
    with JudgeClient(endpoint, token=TOKEN) as client:
        text = client.metrics()
    engine_calls = metric_total(text, "raydag_judge_batch_items_count") - before
    assert metric_total(text, "raydag_judge_items_total") - items_before == 16
    assert 1 <= engine_calls < 16  # items of concurrent requests shared engine calls
    assert 'raydag_judge_requests_total{code="401"' in text  # from the token test
    assert "raydag_judge_request_seconds_bucket" in text


@pytest.mark.slow
def test_replica_settings_come_from_the_job(endpoint):
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    from raydag.serve import APP_NAME

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    details = ray.get(controller.get_serve_instance_details.remote())
    app = details["applications"][APP_NAME]
    config = app["deployments"]["JudgeServer"]["deployment_config"]
    scaling = config["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["max_replicas"]) == (1, 3)
    assert scaling["target_ongoing_requests"] == 6
    assert config["max_ongoing_requests"] == 64
    assert config["ray_actor_options"]["num_cpus"] == 1.0
    assert details["http_options"]["host"] == "127.0.0.1"


def test_a_job_without_a_judge_stage_cannot_be_served(tiny_job_files):
    job = load_job(str(tiny_job_files / "job.yaml"))
    with pytest.raises(RaydagError, match="no judge stage"):
        judge_stage(job)
    with pytest.raises(RaydagError, match="serve.stage=0 is not a judge stage"):
        load_job(str(tiny_job_files / "job.yaml"), ["serve.stage=0"])


def test_a_configured_token_must_be_set(judge_job, monkeypatch):
    from raydag.serve import token_digest

    monkeypatch.delenv("RAYDAG_TEST_SERVE_TOKEN", raising=False)
    with pytest.raises(RaydagError, match="RAYDAG_TEST_SERVE_TOKEN"):
        token_digest(load_job(str(judge_job)))
