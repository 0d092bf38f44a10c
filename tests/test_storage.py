"""Runs on an object store: ``output_dir`` and the data files as ``s3://`` URIs, against a real
S3-compatible server (moto's server mode, started here on 127.0.0.1; nothing leaves the
machine).

The store's endpoint and credentials ride in the URI, so every Ray worker resolves the same
store; messages and reports mask the credentials.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import QUICKSTART, free_port
from raydag.config import load_job
from raydag.errors import DataError
from raydag.storage import (StorePath, display, location, read_dataset, read_frame, remove_tree,
                            write_table)

BUCKET = "raydag-test"


@pytest.fixture(scope="module")
def s3_store(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with one bucket; yields a function giving a fresh URI."""
    import pyarrow.fs

    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                               str(port)], stdout=log, stderr=subprocess.STDOUT)
    options = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    try:
        deadline = time.time() + 60
        while True:
            try:
                filesystem, _ = pyarrow.fs.FileSystem.from_uri(
                    f"s3://testing:testing@{BUCKET}?{options}&allow_bucket_creation=true")
                filesystem.create_dir(BUCKET)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.5)
        names = iter(range(1000))
        yield lambda: f"s3://testing:testing@{BUCKET}/run-{next(names)}?{options}"
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_store_paths_read_write_list_and_hide_credentials(s3_store):
    import pyarrow as pa

    root = location(s3_store())
    assert isinstance(root, StorePath) and not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    assert root.is_dir() and list(root.iterdir()) == []
    (root / "note.txt").write_text("hello")
    assert (root / "note.txt").read_text() == "hello" and (root / "note.txt").is_file()
    write_table(pa.table({"x": [1, 2, 3]}), root / "shards" / "shard-00001.parquet")
    write_table(pa.table({"x": [4]}), root / "shards" / "other.parquet")
    assert [p.name for p in (root / "shards").glob("shard-*.parquet")] == ["shard-00001.parquet"]
    assert read_frame(root / "shards" / "shard-00001.parquet")["x"].tolist() == [1, 2, 3]
    remove_tree(root / "shards")
    assert not (root / "shards").exists()
    (root / "note.txt").unlink()
    assert list(root.iterdir()) == []
    assert "testing:testing" not in display(root) and display(root).startswith("s3://***@")
    assert "testing:testing" not in repr(root)


def test_datasets_are_read_in_blocks_sized_by_bytes_on_disk_and_on_a_store(
        ray_local, s3_store, tmp_path, monkeypatch):
    """Ray's default would cut these files into many small blocks, each a task in every pass."""
    import pyarrow as pa

    from raydag import storage

    for root in (tmp_path, location(s3_store())):
        folder = root / "synthetic"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(3):
            write_table(pa.table({"x": list(range(i * 1000, (i + 1) * 1000))}),
                        folder / f"part-{i}.parquet")
        whole = read_dataset(folder).materialize()  # three small files: one block
        assert whole.num_blocks() == 1 and whole.count() == 3000
        size = storage.file_size(folder / "part-0.parquet")
        monkeypatch.setattr(storage, "BLOCK_FILE_BYTES", size)  # one file's bytes per block
        assert read_dataset(folder).materialize().num_blocks() == 3
        two = read_dataset([folder / "part-0.parquet", folder / "part-2.parquet"]).materialize()
        assert two.num_blocks() == 2
        assert sorted(two.to_pandas()["x"])[::1000] == [0, 2000]
        monkeypatch.setattr(storage, "BLOCK_FILE_BYTES", 2 * size + 1)
        assert read_dataset(folder).materialize().num_blocks() == 2
        assert read_dataset(folder, override_num_blocks=6).materialize().num_blocks() == 6
        monkeypatch.undo()


def _fixed_job(output_dir, *more):
    return load_job(QUICKSTART, [
        f"output_dir={output_dir}", "teacher.engine=instant", "teacher.model=instant",
        "stages.0.num_examples=300", "teacher.batch_size=32", "student.train_sets=[]",
        "quality.diversity.embeddings=false", "quality.decontam.embedding_threshold=null", *more])


@pytest.mark.slow
def test_a_job_on_s3_makes_the_same_rows_as_on_disk_and_resumes_from_the_store(ray_local, s3_store):
    """The fixed job of test_pipeline (instant engine: the same rows on any host), with every
    shard, output folder and report on the S3 server: the same rows as on a local disk, and a
    rerun resumes every shard from the store."""
    from test_pipeline import FIXED_JOB_ROWS

    from raydag.pipeline import run_job

    uri = s3_store()

    def digest() -> tuple[str, dict]:
        report = json.loads(run_job(_fixed_job(uri, "teacher.rows_per_shard=96")).read_text())
        run_dir = location(uri) / "runs" / report["signature"]
        rows = pd.concat([read_frame(run_dir / folder) for folder in
                          ("synthetic", "dropped", "quarantine") if (run_dir / folder).exists()])
        key = sorted(f"{i}|{s}|{r}" for i, s, r in zip(rows["id"], rows["_status"],
                                                       rows["_reason"].fillna("")))
        return hashlib.sha256("\n".join(key).encode()).hexdigest(), report

    first, report = digest()
    assert first == FIXED_JOB_ROWS
    assert report["shards"] == {"total": 4, "resumed": 0, "run": 4, "not_run": 0}
    assert "testing:testing" not in json.dumps(report)  # credentials never reach the report
    run_dir = location(uri) / "runs" / report["signature"]
    shards = sorted(p.name for p in (run_dir / "shards").iterdir())
    assert shards == ["layout.json"] + [f"shard-{i:05d}.parquet" for i in range(4)]
    assert (location(uri) / "report.md").is_file() and (location(uri) / ".raydag-output").is_file()
    again, report = digest()
    assert again == FIXED_JOB_ROWS and report["shards"]["resumed"] == 4
    assert not Path("s3:").exists()  # no local folder named after the URI (the actors' cwd)


@pytest.mark.slow
def test_real_engine_and_students_write_to_s3(ray_local, s3_store):
    """The quickstart on the real engine with a raw and a synthetic student, output_dir on the
    S3 server: shards, outputs, Ray Train's checkpoints and the report all land in the store,
    and a student's checkpoint there loads (copied down) with the scores it reported."""
    from raydag.pipeline import run_job
    from raydag.train import StudentScorer

    uri = s3_store()
    job = load_job(QUICKSTART, [
        f"output_dir={uri}", "raw_examples=30", "stages.0.num_examples=12",
        "stages.0.sampling.max_tokens=24", "teacher.batch_size=12",
        "student.train_sets=[raw,synthetic]", "student.seeds=[0]", "student.epochs=1",
        "student.min_steps=4", "teacher.gpu_memory_utilization=0.5"])
    report = json.loads(run_job(job).read_text())
    counts = report["counts"]
    assert counts["ran"] == 12
    assert counts["accepted"] + sum(counts["dropped"].values()) + sum(counts["quarantined"].values()) == 12
    run_dir = location(uri) / "runs" / report["signature"]
    assert len(read_frame(run_dir / "raw")) == 30
    if counts["accepted"]:
        assert len(read_frame(run_dir / "synthetic")) == counts["accepted"]
    raw = report["students"]["raw"]
    assert raw["train_examples"] == 24 and raw["checkpoint"].startswith("s3://")
    # the report shows the store's address without credentials; the path itself carries them
    assert report["run_dir"].startswith("s3://***@")
    assert "testing:testing" not in json.dumps(report)
    relative = raw["checkpoint"].split("?")[0].split(f"{BUCKET}/", 1)[1].split("/", 1)[1]
    checkpoint = location(uri) / relative  # runs/<signature>/students/.../checkpoint_...
    assert (checkpoint / "model.safetensors").is_file()
    scored = StudentScorer(str(checkpoint))(pd.DataFrame({"text": ["my parcel never came"],
                                                          "label": ["shipping"]}))
    assert scored["log2_p_label"].iloc[0] < 0.0


def _upload(local, target) -> str:
    """Copy a local file to the store; returns the target's URI."""
    target.write_bytes(local.read_bytes())
    return str(target)


def test_inputs_on_s3_read_like_local_files_and_name_bad_lines_without_credentials(
        ray_local, s3_store, tmp_path):
    """A JSONL file of the test_data kind (bad lines of every reason, CRLF, no final newline)
    and a Parquet file read from the store, in Ray tasks by byte range and row group and on
    the driver: the same rows and bad-row summary as the local copy, with the store's address
    (credentials masked) in place of the local path."""
    from test_data import _unlabelled_file

    from raydag.data import BadRows, read_texts, read_texts_in_ray

    root = location(s3_store())
    local = _unlabelled_file(tmp_path / "unlabelled.jsonl")
    remote = _upload(local, root / "unlabelled.jsonl")
    expected_bad = BadRows("skip")
    expected = read_texts(local, ["text"], bad=expected_bad)
    for chunk_bytes in (37, 1 << 20):
        bad = BadRows("skip")
        rows = read_texts_in_ray(remote, "text", bad=bad, chunk_bytes=chunk_bytes)
        got = rows.dataset.to_pandas().sort_values("_row")
        assert list(got["id"]) == list(expected["id"]) and rows.count == len(expected)
        summary = json.dumps(bad.summary())
        shown = f"{location(remote)}"  # how messages name it: no credentials, no options
        assert shown.startswith("s3://***@") and "?" not in shown
        assert summary.replace(shown, str(local)) == json.dumps(expected_bad.summary())
        assert "testing:testing" not in summary
    driver_bad = BadRows("skip")
    assert list(read_texts(remote, ["text"], bad=driver_bad)["id"]) == list(expected["id"])
    with pytest.raises(DataError, match=r"s3://\*\*\*@raydag-test/\S+/unlabelled.jsonl:4: not valid JSON"):
        read_texts(remote, ["text"], bad=BadRows("error"))

    frame = pd.DataFrame({"text": [f"note {i}" if i % 9 else "" for i in range(50)]})
    frame.to_parquet(tmp_path / "texts.parquet", row_group_size=7)
    parquet = _upload(tmp_path / "texts.parquet", root / "texts.parquet")
    bad = BadRows("skip")
    rows = read_texts_in_ray(parquet, "text", bad=bad)
    assert rows.count == 44 and bad.summary()["by_reason"] == {"empty_text": 6}


@pytest.mark.slow
def test_a_job_reading_its_data_from_s3_makes_the_same_rows(ray_local, s3_store):
    """The fixed job with its train and test files on the store (and output_dir too): the
    same rows as from the local files."""
    from test_pipeline import FIXED_JOB_ROWS

    from raydag.pipeline import run_job

    base = load_job(QUICKSTART)
    data = location(s3_store())
    train = _upload(location(base.data.train_path), data / "train.jsonl")
    test = _upload(location(base.data.test_path), data / "test.jsonl")
    uri = s3_store()
    report = json.loads(run_job(_fixed_job(uri, f"data.train_path={train}",
                                           f"data.test_path={test}")).read_text())
    run_dir = location(uri) / "runs" / report["signature"]
    rows = pd.concat([read_frame(run_dir / folder) for folder in
                      ("synthetic", "dropped", "quarantine") if (run_dir / folder).exists()])
    key = sorted(f"{i}|{s}|{r}" for i, s, r in zip(rows["id"], rows["_status"],
                                                   rows["_reason"].fillna("")))
    assert hashlib.sha256("\n".join(key).encode()).hexdigest() == FIXED_JOB_ROWS
    assert report["counts"]["pool"] > 0 and "testing:testing" not in json.dumps(report)
