"""Reading labelled files with Ray Data: formats, clear errors, stratified sampling."""

import pandas as pd
import pytest

from raydag.data import read_labelled, stratified_sample
from raydag.errors import DataError

from conftest import write_jsonl

LABELS = ["a", "b", "c"]
ROWS = [{"text": f"text number {i}", "label": LABELS[i % 3]} for i in range(9)]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_reads_every_format_in_file_order(ray_local, tmp_path, suffix):
    path = tmp_path / f"rows{suffix}"
    frame = pd.DataFrame(ROWS)
    if suffix == ".jsonl":
        write_jsonl(path, ROWS)
    elif suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    out = read_labelled(path, "text", "label", LABELS)
    assert out["text"].tolist() == frame["text"].tolist()
    assert out["id"].is_unique and list(out.columns) == ["id", "text", "label"]


def test_malformed_jsonl_line_is_named(ray_local, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine", "label": "a"}\n{"text": "broken", "label": \n')
    with pytest.raises(DataError, match=rf"{path}:2: not valid JSON"):
        read_labelled(path, "text", "label", LABELS)


def test_missing_column_is_named(ray_local, tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"sentence": "x", "label": "a"}])
    with pytest.raises(DataError, match="missing column 'text'"):
        read_labelled(path, "text", "label", LABELS)


def test_unknown_label_names_file_and_line(ray_local, tmp_path):
    rows = ROWS[:3] + [{"text": "odd one", "label": "zzz"}]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(DataError, match=rf"{path}:4: label 'zzz' is not in the job's labels"):
        read_labelled(path, "text", "label", LABELS)


def test_empty_text_and_empty_file(ray_local, tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": " ", "label": "a"}])
    with pytest.raises(DataError, match=rf"{path}:1: empty or missing 'text'"):
        read_labelled(path, "text", "label", LABELS)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        read_labelled(empty, "text", "label", LABELS)


def test_unknown_extension_and_missing_file(tmp_path):
    (tmp_path / "rows.txt").write_text("x")
    with pytest.raises(DataError, match="unknown file type"):
        read_labelled(tmp_path / "rows.txt", "text", "label", LABELS)
    with pytest.raises(DataError, match="not found"):
        read_labelled(tmp_path / "nope.jsonl", "text", "label", LABELS)


def test_stratified_sample_keeps_label_shares_and_is_seeded():
    labels = ["a"] * 60 + ["b"] * 30 + ["c"] * 10
    pool = pd.DataFrame({"id": [f"{i:03d}" for i in range(100)], "text": [str(i) for i in range(100)],
                         "label": labels})
    sample = stratified_sample(pool, 20, seed=1)
    assert sample["label"].value_counts().to_dict() == {"a": 12, "b": 6, "c": 2}
    assert sample.equals(stratified_sample(pool.sample(frac=1, random_state=3), 20, seed=1))
    assert not sample.equals(stratified_sample(pool, 20, seed=2))
    assert len(stratified_sample(pool, 500, seed=1)) == 100


def test_blank_and_non_object_jsonl_lines_are_named(ray_local, tmp_path):
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": "a", "label": "a"}\n\n{"text": "b", "label": "b"}\n')
    with pytest.raises(DataError, match=rf"{blank}:2: blank line"):
        read_labelled(blank, "text", "label", LABELS)
    listed = tmp_path / "list.jsonl"
    listed.write_text('{"text": "a", "label": "a"}\n["b", "b"]\n')
    with pytest.raises(DataError, match=rf"{listed}:2: expected a JSON object"):
        read_labelled(listed, "text", "label", LABELS)


def test_csv_rows_are_named_by_their_line(ray_local, tmp_path):
    path = tmp_path / "rows.csv"
    pd.DataFrame([{"text": "fine", "label": "a"}, {"text": "odd", "label": "q"}]).to_csv(path, index=False)
    with pytest.raises(DataError, match=rf"{path}:3: label 'q'"):
        read_labelled(path, "text", "label", LABELS)
