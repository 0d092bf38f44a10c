"""The scale benchmark's engine (instant: answers without a model) and, slow, the benchmark
itself end to end on a small size: a real label job and the bare Ray Data reference."""

import json

import pytest

from raydag.config import load_job
from raydag.engines import make_engine
from raydag.engines.base import ChatRequest
from raydag.engines.instant import InstantEngine
from raydag.ops.label import LabelOp
from raydag.resources import teacher_placement

from conftest import QUICKSTART


def test_instant_engine_picks_a_choice_by_the_prompt_and_echoes_otherwise():
    engine = make_engine({"engine": "instant", "model": "instant"})
    assert isinstance(engine, InstantEngine)
    op = LabelOp(task="Sort notes.", labels=["a", "b", "c"])
    answers = [engine.generate(op.build_requests({"text": f"note number {i}"}))[0] for i in range(60)]
    assert {a.text for a in answers} == {"a", "b", "c"}  # spread over the choices
    again = engine.generate(op.build_requests({"text": "note number 7"}))[0]
    assert again == answers[7]  # a function of the prompt
    parsed = op.parse({"text": "note number 7"}, [again])[0]
    assert parsed["label"] == again.text and parsed["label_confidence"] == pytest.approx(0.9)
    echo = engine.generate([ChatRequest(messages=({"role": "user", "content": "one two three four"},),
                                        max_tokens=3)])[0]
    assert echo.text == "one two three" and echo.completion_tokens == 3 and echo.prompt_tokens == 4


def test_instant_engine_takes_no_gpu_and_no_dtype():
    job = load_job(QUICKSTART, ["teacher.engine=instant", "teacher.model=instant"])
    placement = teacher_placement(job.teacher, cluster_gpus=8)
    assert placement["teacher_actor"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert placement["teacher_dtype"]["dtype"] == "" and placement["teacher_cpu_threads"] is None


@pytest.mark.slow
def test_scale_bench_runs_a_real_label_job_beside_bare_ray_data(tmp_path, capsys):
    from raydag.bench_scale import bench_scale

    results = bench_scale([400], tmp_path, minhash_rows=0, timeout_s=900)
    line = capsys.readouterr().out
    assert "scale rows=400 rows_per_s=" in line and " ref_rows_per_s=" in line
    assert "scale_stages rows=400 read_s=" in line and " teacher_s=" in line and " write_s=" in line
    assert results[0]["rows"] == 400 and results[0]["rows_per_s"] > 0
    assert 0 < results[0]["driver_peak_rss_mb"] < 4000
    report = json.loads((tmp_path / "400" / "output" / "report.json").read_text())
    counts = report["counts"]
    assert counts["ran"] == 400
    assert counts["accepted"] + sum(counts["dropped"].values()) + sum(counts["quarantined"].values()) == 400
    assert report["quality"]["pii_teacher_rows"] == {"email": 4}  # 1% planted
    assert report["quality"]["decontam"]["matched"] >= 1  # a test text planted in the input
    routed = report["quality"]["coannotation"]["routed"]
    assert sum(routed.values()) == report["quality"]["coannotation"]["scored"] > 0
    reference = json.loads((tmp_path / "400" / "reference.json").read_text())
    assert reference["rows"] == 400
