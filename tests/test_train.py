"""The student recipe's parts: pooling read from the encoder's own config, the schedule (warmup,
decay, minimum steps), random batches, the workers' shares of tokenised rows (local Ray), the
dev split, the linear probe, the saved student, and the summary over seeds with its baselines
and flags (a planted constant predictor, a student below its probe) and the comparisons by
more than the spread."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from raydag.config import StudentConfig
from raydag.evaluate import compare, per_class_f1, student_comparisons, summarise_students
from raydag.models import resolve_model
from raydag.train import (StudentClassifier, StudentScorer, dev_split, fit_probe, load_student, lr_factor,
                          pool_states, pooling_of, save_student, schedule_plan, share_batches,
                          tokenised, worker_shares, _tokenizer)

STUDENT = "embedded:all-minilm-l6-v2"


def test_pooling_is_read_from_the_sentence_encoders_own_config(tmp_path):
    assert pooling_of(resolve_model(STUDENT)) == ("mean", True)  # modules.json: mean + Normalize
    assert pooling_of(resolve_model(STUDENT), "cls") == ("cls", True)  # an explicit mode wins
    cls_model = tmp_path / "cls"
    (cls_model / "1_Pooling").mkdir(parents=True)
    (cls_model / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (cls_model / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    assert pooling_of(str(cls_model)) == ("cls", False)
    plain = tmp_path / "plain"
    plain.mkdir()
    assert pooling_of(str(plain)) == ("mean", False)  # no sentence-transformers files


def test_pool_states_mean_ignores_padding_and_cls_takes_the_first_token():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert pool_states(hidden, mask, "mean").tolist() == [[2.0, 3.0]]
    assert pool_states(hidden, mask, "cls").tolist() == [[1.0, 2.0]]
    assert pool_states(hidden, mask, "max").tolist() == [[3.0, 4.0]]


def test_schedule_gives_small_sets_the_minimum_steps_and_large_sets_their_epochs():
    student = StudentConfig(batch_size=16, epochs=3, min_steps=100, warmup_ratio=0.1)
    small = schedule_plan(80, 2, student)  # 40 rows per worker: 3 steps per epoch
    assert small["steps_per_epoch"] == 3 and small["epochs"] == 34 and small["total_steps"] >= 100
    large = schedule_plan(100_000, 2, student)
    assert large["epochs"] == 3 and large["steps_per_epoch"] == 3125
    assert large["warmup_steps"] == round(0.1 * 3 * 3125)


def test_learning_rate_warms_up_then_decays_to_zero():
    total, warmup = 100, 10
    linear = [lr_factor(s, total, warmup, "linear") for s in range(total + 1)]
    assert all(a < b for a, b in zip(linear[:warmup], linear[1:warmup + 1]))  # rising
    assert max(linear) == 1.0 and linear[warmup] == 1.0
    assert all(a >= b for a, b in zip(linear[warmup:], linear[warmup + 1:]))  # falling
    assert linear[-1] == 0.0
    assert lr_factor(55, total, warmup, "cosine") == pytest.approx(0.5)
    assert lr_factor(90, total, warmup, "constant") == 1.0


def test_batches_are_random_not_grouped_by_length_or_label():
    # A planted length shortcut: the first half of a worker's share is one label and short.
    # Batches sorted by length would be nearly single-label; random ones are mixed.
    share, per_worker, batch = 128, 129, 16  # this worker is a row short: it wraps around
    labels = np.array([0] * 64 + [1] * 64)
    rng = np.random.default_rng(0)
    epoch = share_batches(share, per_worker, batch, rng)
    assert len(epoch) == -(-per_worker // batch)  # the same steps as a worker with 129 rows
    seen = [i for b in epoch for i in b]
    assert len(seen) == per_worker and set(seen) == set(range(share))
    purity = [max(np.mean(labels[b]), 1 - np.mean(labels[b])) for b in epoch]
    assert np.mean(purity) < 0.8
    assert share_batches(share, per_worker, batch, rng) != epoch  # reshuffled every epoch


def test_each_worker_gets_a_balanced_share_of_tokenised_rows_in_order(ray_local):
    import ray

    student = StudentConfig()
    frame = pd.DataFrame({"text": [f"row number {i} " + "word " * (i % 7) for i in range(11)],
                          "label": ["a", "b"] * 5 + ["a"]})
    rows = tokenised(ray.data.from_pandas(frame), student)
    got = rows.take_all()
    assert [r["label"] for r in got] == frame["label"].tolist()  # tokenised in Ray Data, in order
    expected = _tokenizer(student.model)(frame["text"].tolist(), truncation=True,
                                         max_length=student.max_length)["input_ids"]
    assert [list(r["input_ids"]) for r in got] == expected  # not padded: padded per batch
    assert len({r["key"] for r in got}) == 11
    shares = [share.take_all() for share in worker_shares(rows, 11, 3)]
    assert [len(s) for s in shares] == [4, 4, 3]
    assert [r["key"] for s in shares for r in s] == [r["key"] for r in got]
    again = [share.take_all() for share in worker_shares(rows, 11, 3)]
    assert [[r["key"] for r in s] for s in again] == [[r["key"] for r in s] for s in shares]
    few = [share.count() for share in worker_shares(rows.limit(1).materialize(), 1, 2)]
    assert few == [1, 1]  # a single row is repeated: no worker is left without rows


def test_dev_split_is_stratified_seeded_and_keeps_every_label_in_training():
    labels = ["a"] * 50 + ["b"] * 30 + ["c"] * 2 + ["d"]
    train, dev = dev_split(labels, 0.2, seed=0)
    assert sorted(train + dev) == list(range(len(labels))) and not set(train) & set(dev)
    got = {y: sum(labels[i] == y for i in dev) for y in "abcd"}
    assert len(dev) == round(0.2 * len(labels))  # 17: a and b give 10 + 6, one more is spare
    assert got["a"] >= 10 and got["b"] >= 6 and got["d"] == 0  # never a label's only row
    assert {labels[i] for i in train} == {"a", "b", "c", "d"}
    # 77 labels, 23 of them with two rows (an intent task's 100-row sample): shares round to
    # nothing, so the dev rows come one each from labels with a row to spare.
    many = [f"c{i}" for i in range(77)] + [f"c{i}" for i in range(23)]
    many_train, many_dev = dev_split(many, 0.2, seed=0)
    assert len(many_dev) == 20 and len({many[i] for i in many_dev}) == 20
    assert {many[i] for i in many_train} == set(many)
    assert dev_split(labels, 0.2, seed=0) == (train, dev)
    assert dev_split(labels, 0.2, seed=1)[1] != dev


def test_linear_probe_fits_separable_rows_and_chooses_l2_on_dev():
    rng = np.random.default_rng(0)
    centres = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]])
    y = torch.tensor(rng.integers(0, 3, 120))
    x = centres[y] + torch.tensor(rng.normal(0, 0.5, (120, 3)), dtype=torch.float32)
    weight, bias, l2 = fit_probe(x[:90], y[:90], x[90:], y[90:], 3)
    assert weight.shape == (3, 3) and bias.shape == (3,)
    assert ((x[90:] @ weight.T + bias).argmax(-1) == y[90:]).float().mean() > 0.95
    assert l2 in (1e-4, 1e-3, 1e-2, 1e-1)


def test_saved_student_loads_with_the_same_outputs(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model(STUDENT)
    model = StudentClassifier(AutoModel.from_pretrained(path), 3, "mean", True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    enc = tokenizer(["my parcel is late", "refund please"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc)
        embedded = model.embed(**enc)
    assert logits.shape == (2, 3)
    assert torch.allclose(embedded.norm(dim=-1), torch.ones(2), atol=1e-5)  # normalised
    save_student(model, tokenizer, ["billing", "shipping", "technical"], str(tmp_path))
    assert (tmp_path / "model.safetensors").is_file()
    loaded_tokenizer, loaded, labels = load_student(str(tmp_path))
    assert labels == ["billing", "shipping", "technical"]
    with torch.no_grad():
        again = loaded(**loaded_tokenizer(["my parcel is late", "refund please"], padding=True,
                                          return_tensors="pt"))
    assert torch.allclose(logits, again, atol=1e-5)
    # The PVI scorer reads the same folder: log2 p(label | text) under the saved student.
    scored = StudentScorer(str(tmp_path))(pd.DataFrame({"text": ["my parcel is late"],
                                                         "label": ["shipping"]}))
    expected = torch.log_softmax(logits[0], -1)[1].item() / np.log(2)
    assert scored["log2_p_label"].iloc[0] == pytest.approx(expected, abs=1e-4)


def _run(name: str, seed: int, matrix: list[list[int]], probe_matrix: list[list[int]],
         majority: float) -> dict:
    labels = ["neg", "pos"]
    m, p = np.array(matrix), np.array(probe_matrix)
    return {"name": name, "seed": seed, "accuracy": float(np.trace(m) / m.sum()),
            "macro_f1": float(per_class_f1(m).mean()),
            "per_class_f1": dict(zip(labels, per_class_f1(m).tolist())),
            "predicted": dict(zip(labels, m.sum(axis=0).tolist())),
            "probe": {"accuracy": float(np.trace(p) / p.sum()), "macro_f1": 0.0},
            "majority": {"label": "neg", "accuracy": majority},
            "train_examples": 80, "dev_examples": 20, "test_examples": int(m.sum()),
            "best_epoch": 3, "train_seconds": 1.0, "precision": "fp32", "pooling": "mean",
            "checkpoint": f"/ckpt/{name}/{seed}"}


def test_summary_flags_a_constant_predictor_and_a_student_below_its_probe():
    good = [[40, 10], [12, 38]]
    constant = [[50, 0], [50, 0]]  # says "neg" for every row: majority-class accuracy
    runs = [_run("raw", 0, good, [[35, 15], [15, 35]], 0.5),
            _run("raw", 1, [[38, 12], [10, 40]], [[35, 15], [15, 35]], 0.5),
            _run("synthetic", 0, constant, [[35, 15], [15, 35]], 0.5),
            _run("synthetic", 1, good, [[35, 15], [15, 35]], 0.5)]
    summary = summarise_students(runs)
    raw, synthetic = summary["raw"], summary["synthetic"]
    assert raw["accuracy"] == pytest.approx(0.78) and raw["accuracy_std"] == pytest.approx(0.0)
    assert raw["flags"] == [] and raw["seeds"] == [0, 1] and raw["checkpoint"] == "/ckpt/raw/0"
    assert raw["probe"]["accuracy"] == pytest.approx(0.7)
    assert synthetic["accuracy"] == pytest.approx((0.5 + 0.78) / 2)
    assert synthetic["accuracy_std"] == pytest.approx(np.std([0.5, 0.78], ddof=1))
    assert "single_class" in synthetic["flags"] and "below_probe" in synthetic["flags"]
    assert synthetic["predicted"] == {"neg": 100 + 52, "pos": 48}
    below = summarise_students([_run("mixed", 0, [[30, 20], [20, 30]], [[45, 5], [5, 45]], 0.5)])
    assert below["mixed"]["flags"] == ["below_probe"]
    constant_only = summarise_students([_run("raw", 0, constant, constant, 0.5)])["raw"]
    assert constant_only["flags"] == ["not_above_majority", "single_class"]


def test_differences_within_the_spread_over_seeds_are_no_difference():
    a = {"accuracy": 0.80, "accuracy_std": 0.03, "seeds": [0, 1, 2]}
    b = {"accuracy": 0.78, "accuracy_std": 0.02, "seeds": [0, 1, 2]}
    assert compare(a, b, "mixed", "raw")["verdict"] == "no difference"
    c = {"accuracy": 0.70, "accuracy_std": 0.01, "seeds": [0, 1, 2]}
    assert compare(c, a, "synthetic", "mixed")["verdict"] == "mixed better"
    one = {"accuracy": 0.9, "accuracy_std": 0.0, "seeds": [0]}
    assert compare(one, c, "mixed", "raw")["verdict"].startswith("unknown")
    pairs = student_comparisons({"raw": b, "synthetic": c, "mixed": a})
    assert [(p["a"], p["b"]) for p in pairs] == [("synthetic", "raw"), ("mixed", "raw"),
                                                 ("mixed", "synthetic")]
