"""Reading labelled files with Ray Data: formats, clear errors, stratified sampling."""
import json

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


def _unlabelled_file(path):
    """A JSONL file of texts with every kind of bad line, some long lines, CRLF endings and
    no newline at the end."""
    lines = []
    for i in range(120):
        if i % 17 == 3:
            lines.append(b"not json")
        elif i % 29 == 5:
            lines.append(b"")
        elif i % 31 == 7:
            lines.append(b'{"text": "caf\xe9"}')  # Latin-1, not UTF-8
        elif i % 37 == 9:
            lines.append(b'{"text": ""}')
        elif i % 41 == 11:
            lines.append(b'{"other": "x"}')
        else:
            text = f"note {i} " + "word " * (i % 13)
            lines.append(json.dumps({"text": text}).encode() + (b"\r" if i % 7 == 0 else b"")
                         + (b" \r " if i % 11 == 0 else b""))  # a lone CR is not a line end
    path.write_bytes(b"\n".join(lines))  # no newline after the last line
    return path


@pytest.mark.parametrize("chunk_bytes", [37, 256, 1 << 20])
def test_a_text_file_read_in_ray_tasks_equals_the_driver_read(ray_local, tmp_path, chunk_bytes):
    """Cut into byte ranges that split lines anywhere, the Ray Data read gives the driver
    read's rows in file order, and names the same bad rows by file and line."""
    from raydag.data import BadRows, read_texts, read_texts_in_ray

    path = _unlabelled_file(tmp_path / "unlabelled.jsonl")
    driver_bad, ray_bad = BadRows("skip"), BadRows("skip")
    expected = read_texts(path, ["text"], bad=driver_bad)
    rows = read_texts_in_ray(path, "text", bad=ray_bad, chunk_bytes=chunk_bytes)
    got = rows.dataset.to_pandas().sort_values("_row")
    assert rows.count == len(expected) == len(got)
    assert list(got["_row"]) == list(range(len(expected)))
    assert list(got["id"]) == list(expected["id"]) and list(got["text"]) == list(expected["text"])
    assert rows.head(3)["text"].tolist() == expected["text"].head(3).tolist()
    assert ray_bad.summary() == driver_bad.summary()
    assert set(ray_bad.summary()["by_reason"]) == {"not_json", "blank_line", "not_utf8", "empty_text"}

    with pytest.raises(DataError, match=r"unlabelled.jsonl:4: not valid JSON") as err:
        read_texts_in_ray(path, "text", bad=BadRows("error"), chunk_bytes=chunk_bytes)
    assert "more bad row(s)" in str(err.value)


@pytest.mark.parametrize("rows", [300, 60_000])
def test_a_csv_text_file_read_in_ray_equals_the_driver_read(ray_local, tmp_path, rows):
    """A CSV file (quoted fields with line breaks and commas, empty and too long texts) read
    by Ray Data's reader and numbered by its blocks (60,000 rows, about 3 MB, make several read
    blocks, some boundaries inside quoted fields): the driver read's rows, in file order, and
    the same bad rows by line."""
    from raydag.data import BadRows, read_texts, read_texts_in_ray

    texts = []
    for i in range(rows):
        if i % 23 == 4:
            texts.append("")
        elif i % 41 == 9:
            texts.append("word " * 40)  # over max_text_chars below
        elif i % 7 == 0:
            texts.append(f"note {i}, with a comma\nand a line break")
        else:
            texts.append(f"note {i} of a file long enough for several read blocks")
    path = tmp_path / "texts.csv"
    pd.DataFrame({"other": range(rows), "text": texts}).to_csv(path, index=False)
    driver_bad, ray_bad = BadRows("skip"), BadRows("skip")
    expected = read_texts(path, ["text"], bad=driver_bad, max_text_chars=150)
    read = read_texts_in_ray(path, "text", bad=ray_bad, max_text_chars=150)
    got = read.dataset.to_pandas().sort_values("_row")
    assert read.count == len(expected) == len(got)
    assert list(got["_row"]) == list(range(len(expected)))
    assert list(got["id"]) == list(expected["id"]) and list(got["text"]) == list(expected["text"])
    assert ray_bad.summary() == driver_bad.summary()
    assert set(ray_bad.summary()["by_reason"]) == {"empty_text", "text_too_long"}
    with pytest.raises(DataError, match=r"texts.csv:6: empty"):
        read_texts_in_ray(path, "text", bad=BadRows("error"), max_text_chars=150)
    with pytest.raises(DataError, match="missing column 'body'"):
        read_texts_in_ray(path, "body", bad=BadRows("skip"))


def test_a_text_file_read_in_ray_names_an_unusable_file(ray_local, tmp_path):
    from raydag.data import BadRows, read_texts_in_ray

    path = tmp_path / "texts.jsonl"
    path.write_text('{"other": 1}\n{"other": 2}\n')
    # no line has the column: named as a missing column, with the columns the file has
    with pytest.raises(DataError, match=r"texts.jsonl: missing column 'text' \(columns found: other\)"):
        read_texts_in_ray(path, "text", bad=BadRows("skip"), chunk_bytes=8)
    path.write_text('{"text": " "}\n{"other": 2}\n')
    with pytest.raises(DataError, match="texts.jsonl: no usable rows"):
        read_texts_in_ray(path, "text", bad=BadRows("skip"), chunk_bytes=8)
    with pytest.raises(DataError, match="file not found"):
        read_texts_in_ray(tmp_path / "nope.jsonl", "text", bad=BadRows())


def test_a_parquet_text_file_read_in_ray_by_row_group_equals_the_driver_read(ray_local, tmp_path):
    from raydag.data import BadRows, read_texts, read_texts_in_ray

    texts = [f"note {i}" if i % 9 else ("" if i % 2 else None) for i in range(50)]
    path = tmp_path / "texts.parquet"
    pd.DataFrame({"text": texts, "other": range(50)}).to_parquet(path, row_group_size=7)
    driver_bad, ray_bad = BadRows("skip"), BadRows("skip")
    expected = read_texts(path, ["text"], bad=driver_bad)
    rows = read_texts_in_ray(path, "text", bad=ray_bad)
    got = rows.dataset.to_pandas().sort_values("_row")
    assert list(got["text"]) == list(expected["text"]) and list(got["id"]) == list(expected["id"])
    # a null is an empty text (the driver read's pandas calls it a non-string)
    assert ray_bad.total == driver_bad.total == 6
    assert ray_bad.summary()["by_reason"] == {"empty_text": 6}
    assert ray_bad.summary()["rows"]["empty_text"][0] == f"{path}: row 0"
    with pytest.raises(DataError, match="missing column 'body'"):
        read_texts_in_ray(path, "body", bad=BadRows())


def test_records_equal_pandas_to_dict_records():
    """The fast ``records`` gives what ``to_dict("records")`` gives, missing values included."""
    import numpy as np

    from raydag.data import records

    frame = pd.DataFrame({
        "int": [1, 2], "float": [1.5, np.nan], "object": ["x", None], "lists": [[1], []],
        "nullable_int": pd.array([1, None], dtype="Int64"),
        "string": pd.array(["x", None], dtype="string"),
        "boolean": pd.array([True, None], dtype="boolean")})
    expected = frame.to_dict("records")
    got = records(frame)
    assert got[0] == expected[0]
    assert got[1]["float"] != got[1]["float"] and got[1]["object"] != got[1]["object"]  # NaN
    assert {k: v for k, v in got[1].items() if k not in ("float", "object")} == \
        {k: v for k, v in expected[1].items() if k not in ("float", "object")}
    assert [type(v) for v in got[0].values()] == [type(v) for v in expected[0].values()]
    assert records(frame.iloc[:0]) == []


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_a_labelled_pool_read_in_ray_gives_the_same_rows_and_the_same_sample(ray_local, tmp_path,
                                                                            suffix):
    """The pool stays in Ray Data: read in several tasks, its bad rows named by line, and the
    raw sample drawn there is the driver's draw from the same rows, for every seed."""
    from raydag.data import BadRows, InputRows, read_labelled_in_ray, sample_in_ray

    rows = [{"text": f"row {i} " + "word " * (i % 7), "label": "abc"[(i * 7) % 10 % 3]}
            for i in range(400)]
    rows[17]["label"], rows[230]["text"], rows[301]["label"] = "zzz", "", None
    rows[5] = dict(rows[4])  # a repeated row: the same id twice
    frame = pd.DataFrame(rows)
    path = tmp_path / f"pool{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, rows)
    elif suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, row_group_size=50)
    bad = BadRows("skip")
    pool = read_labelled_in_ray(path, "text", "label", LABELS, bad=bad, chunk_bytes=2048)
    expected = frame.drop(index=[17, 230, 301]).reset_index(drop=True)
    got = pool.to_pandas()
    assert len(pool) == len(got) == len(expected) == 397
    assert got["text"].tolist() == expected["text"].tolist()
    assert got["label"].tolist() == expected["label"].tolist()
    line = 2 if suffix == ".csv" else (1 if suffix == ".jsonl" else 0)
    where = (lambda i: f"{path}: row {i}") if suffix == ".parquet" else (lambda i: f"{path}:{i + line}")
    assert bad.summary()["rows"] == {"empty_text": [where(230)], "missing_label": [where(301)],
                                     "unknown_label": [where(17)]}
    blocks = InputRows(pool.dataset.repartition(5).materialize(), pool.count)  # several blocks
    for seed in (0, 1, 7):
        for n in (10, 100, 397, 500):
            driver = stratified_sample(got, n, seed)[["id", "text", "label"]]
            assert sample_in_ray(pool, n, seed)[["id", "text", "label"]].equals(driver), (seed, n)
        assert sample_in_ray(blocks, 60, seed)[["id", "text", "label"]].equals(
            stratified_sample(got, 60, seed)[["id", "text", "label"]])


def test_a_pool_text_too_long_for_the_teacher_is_deferred_with_its_line(ray_local, tmp_path):
    from raydag.data import BadRows, read_labelled_in_ray

    def too_long(text):
        return ("too_long", "the text is too long for the teacher") if "long" in text else None

    rows = [{"text": f"row {i}", "label": "a"} for i in range(5)]
    rows[3]["text"] = "a long one"
    path = write_jsonl(tmp_path / "pool.jsonl", rows)
    pool = read_labelled_in_ray(path, "text", "label", LABELS, bad=BadRows(),
                                deferred_check=too_long).to_pandas()
    assert pool["_deferred"].tolist() == [None, None, None,
                                          f"{path}:4: the text is too long for the teacher", None]
