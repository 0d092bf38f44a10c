"""Classification metrics from a confusion matrix: accuracy and macro-F1."""

from __future__ import annotations

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
    tp = np.diag(matrix).astype(float)
    predicted = matrix.sum(axis=0)
    actual = matrix.sum(axis=1)
    denom = predicted + actual
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(f1.mean())
