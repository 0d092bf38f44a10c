"""Classification metrics from a confusion matrix (accuracy, macro- and per-class F1), and
students summarised over seeds next to their baselines, compared by more than their spread."""

from __future__ import annotations

from typing import Any

import numpy as np


def confusion_matrix(y_true: list[int], y_pred: list[int], num_labels: int) -> np.ndarray:
    """Counts ``[true, predicted]`` as an integer matrix."""
    matrix = np.zeros((num_labels, num_labels), dtype=np.int64)
    for t, p in zip(y_true, y_pred):
        matrix[t, p] += 1
    return matrix


def accuracy(matrix: np.ndarray) -> float:
    """Share of correct predictions."""
    total = matrix.sum()
    return float(np.trace(matrix) / total) if total else 0.0


def macro_f1(matrix: np.ndarray) -> float:
    """Unweighted mean of per-class F1; a class never predicted nor present scores 0."""
    return float(per_class_f1(matrix).mean())


def per_class_f1(matrix: np.ndarray) -> np.ndarray:
    """F1 of each class, in label order (0 for a class never predicted nor present)."""
    tp = np.diag(matrix).astype(float)
    denom = (matrix.sum(axis=0) + matrix.sum(axis=1)).astype(float)
    return np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


# What each flag of :func:`summarise_students` means (the run's warnings say it).
STUDENT_FLAGS = {
    "below_probe": "scores below its linear probe (frozen encoder + logistic regression): "
                   "fine-tuning hurt; check the data and the recipe",
    "not_above_majority": "does not beat the majority class: it learned nothing usable",
    "single_class": "predicts a single class for every test row (in at least one seed)",
}


def summarise_students(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One summary per student name over its seeds: mean and standard deviation of the
    student, of its linear probe and of the majority class; per-class F1 (mean); predicted
    labels (summed); and flags: ``below_probe`` (mean accuracy under the probe's),
    ``not_above_majority`` and ``single_class`` (a seed predicted one label for every row).

    Args:
        runs: Per-seed metrics as :func:`raydag.train.fit_students` returns them.

    Returns:
        By name, in the order first seen: ``accuracy`` / ``macro_f1`` (means), ``*_std``,
        ``seeds``, ``probe``, ``majority``, ``per_class_f1``, ``predicted``, ``flags``,
        ``train_examples``, ``checkpoint`` (the first seed's) and ``runs`` (per seed).
    """
    by_name: dict[str, list[dict]] = {}
    for run in runs:
        by_name.setdefault(run["name"], []).append(run)
    out = {}
    for name, group in by_name.items():
        acc, acc_std = mean_std([r["accuracy"] for r in group])
        f1, f1_std = mean_std([r["macro_f1"] for r in group])
        probe_acc, probe_std = mean_std([r["probe"]["accuracy"] for r in group])
        probe_f1, _ = mean_std([r["probe"]["macro_f1"] for r in group])
        majority, _ = mean_std([r["majority"]["accuracy"] for r in group])
        labels = list(group[0]["per_class_f1"])
        predicted = {y: int(sum(r["predicted"][y] for r in group)) for y in labels}
        flags = []
        if acc < probe_acc:
            flags.append("below_probe")
        if acc <= majority:
            flags.append("not_above_majority")
        if any(sum(1 for c in r["predicted"].values() if c) <= 1 for r in group):
            flags.append("single_class")
        out[name] = {
            "accuracy": acc, "accuracy_std": acc_std, "macro_f1": f1, "macro_f1_std": f1_std,
            "seeds": [r["seed"] for r in group],
            "probe": {"accuracy": probe_acc, "accuracy_std": probe_std, "macro_f1": probe_f1},
            "majority": {"accuracy": majority, "label": group[0]["majority"]["label"]},
            "per_class_f1": {y: round(float(np.mean([r["per_class_f1"][y] for r in group])), 4)
                             for y in labels},
            "predicted": predicted,
            "flags": flags,
            "train_examples": group[0]["train_examples"],
            "dev_examples": group[0]["dev_examples"],
            "test_examples": group[0]["test_examples"],
            "best_epochs": [r["best_epoch"] for r in group],
            "train_seconds": round(sum(r["train_seconds"] for r in group), 2),
            "precision": group[0]["precision"],
            "pooling": group[0]["pooling"],
            "checkpoint": group[0]["checkpoint"],
            "runs": {str(r["seed"]): {k: v for k, v in r.items() if k != "name"} for r in group},
        }
    return out


def compare(a: dict[str, Any], b: dict[str, Any], name_a: str, name_b: str) -> dict[str, Any]:
    """Whether student ``a`` beat ``b`` by more than the spread over seeds: the difference of
    mean accuracies against the standard deviation of that difference (``sqrt(sa^2 + sb^2)``).
    A difference within it is ``no difference``; with one seed the spread is unknown.

    Example:
        >>> compare({"accuracy": 0.8, "accuracy_std": 0.01, "seeds": [0, 1]},
        ...         {"accuracy": 0.7, "accuracy_std": 0.02, "seeds": [0, 1]}, "mixed", "raw")["verdict"]
        'mixed better'
    """
    diff = a["accuracy"] - b["accuracy"]
    spread = float(np.hypot(a["accuracy_std"], b["accuracy_std"]))
    if min(len(a["seeds"]), len(b["seeds"])) < 2:
        verdict = "unknown (one seed: no spread to compare with)"
    elif abs(diff) <= spread:
        verdict = "no difference"
    else:
        verdict = f"{name_a} better" if diff > 0 else f"{name_b} better"
    return {"a": name_a, "b": name_b, "difference": round(diff, 4), "spread": round(spread, 4),
            "verdict": verdict}


def student_comparisons(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The seed study's comparisons among the students a run trained: synthetic and mixed
    against raw, and mixed against synthetic."""
    pairs = [("synthetic", "raw"), ("mixed", "raw"), ("mixed", "synthetic")]
    return [compare(summary[a], summary[b], a, b) for a, b in pairs if a in summary and b in summary]


def margins(probs: np.ndarray) -> np.ndarray:
    """Per row, the probability of the top label minus that of the second (1 with one label):
    how sure a classifier is. Uncertainty sampling takes the smallest first.

    Example:
        >>> margins(np.array([[0.5, 0.3, 0.2], [0.9, 0.05, 0.05]])).round(2)
        array([0.2 , 0.85])
    """
    probs = np.asarray(probs, dtype=float)
    if probs.shape[1] < 2:
        return np.ones(len(probs))
    top2 = np.sort(probs, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def weaknesses(labels: list[str], y_true: list[int], probs: np.ndarray, ids: list[str], *,
               max_pairs: int = 3, max_examples: int = 20) -> dict[str, Any]:
    """Where a student is weak on labelled rows it did not train on (a dev split): per-class
    F1, the most confused (true, predicted) pairs, the misclassified rows (most confidently
    wrong first) and the least confident rows (smallest margin between the top two labels).

    Args:
        labels: The label set; ``y_true`` and the columns of ``probs`` follow its order.
        y_true: Gold label ids, one per row.
        probs: The student's label probabilities, one row per row (rows x labels).
        ids: Each row's id, so the caller can find the rows again.
        max_pairs: Confused pairs to keep.
        max_examples: Rows to keep in each list.

    Example:
        >>> import numpy as np
        >>> w = weaknesses(["a", "b"], [0, 0, 1], np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6]]),
        ...                ["r1", "r2", "r3"])
        >>> w["confused_pairs"], w["misclassified"], w["least_confident"][0]
        ([{'true': 'a', 'predicted': 'b', 'rows': 1}], ['r2'], 'r3')
    """
    probs = np.asarray(probs, dtype=float).reshape(len(y_true), len(labels))
    truth = np.asarray(y_true, dtype=np.int64)
    predicted = probs.argmax(axis=1) if len(truth) else truth
    matrix = confusion_matrix(truth.tolist(), predicted.tolist(), len(labels))
    f1 = per_class_f1(matrix)
    present = matrix.sum(axis=1) > 0
    errors = [(int(matrix[t, p]), t, p) for t in range(len(labels)) for p in range(len(labels))
              if t != p and matrix[t, p] > 0]
    errors.sort(key=lambda e: (-e[0], e[1], e[2]))
    wrong = np.flatnonzero(predicted != truth)
    wrong = wrong[np.argsort(-probs[wrong, predicted[wrong]], kind="stable")]
    unsure = np.argsort(margins(probs), kind="stable")
    return {
        "rows": int(len(truth)),
        "accuracy": accuracy(matrix),
        "per_class_f1": {label: round(float(f1[i]), 4) for i, label in enumerate(labels) if present[i]},
        "confused_pairs": [{"true": labels[t], "predicted": labels[p], "rows": n}
                           for n, t, p in errors[:max_pairs]],
        "misclassified": [ids[i] for i in wrong[:max_examples]],
        "least_confident": [ids[i] for i in unsure[:max_examples]],
    }
