"""Evaluation metrics, written out from their definitions (no scikit-learn dependency).

* accuracy; F1 (binary: of class 1; more classes: macro average);
* Matthews correlation (Matthews 1975; the multiclass form of Gorodkin 2004):
  ``MCC = (c·s − Σ_k p_k t_k) / sqrt((s² − Σ_k p_k²)(s² − Σ_k t_k²))`` with ``c`` correct predictions,
  ``s`` samples, ``p_k`` / ``t_k`` the times class ``k`` was predicted / true;
* Pearson and Spearman correlation for regression (Spearman = Pearson of average ranks);
* language modelling: the mean loss per predicted token and ``perplexity = exp(loss)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    return sum(int(p == t) for p, t in zip(predictions, labels, strict=True)) / len(labels)


def f1_score(predictions: Sequence[int], labels: Sequence[int], num_classes: int) -> float:
    def f1_of(k: int) -> float:
        tp = sum(1 for p, t in zip(predictions, labels, strict=True) if p == k and t == k)
        fp = sum(1 for p, t in zip(predictions, labels, strict=True) if p == k and t != k)
        fn = sum(1 for p, t in zip(predictions, labels, strict=True) if p != k and t == k)
        return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)

    if num_classes == 2:
        return f1_of(1)
    return sum(f1_of(k) for k in range(num_classes)) / num_classes


def matthews_corrcoef(predictions: Sequence[int], labels: Sequence[int], num_classes: int) -> float:
    s = len(labels)
    c = sum(int(p == t) for p, t in zip(predictions, labels, strict=True))
    p_counts = [sum(1 for p in predictions if p == k) for k in range(num_classes)]
    t_counts = [sum(1 for t in labels if t == k) for k in range(num_classes)]
    numerator = c * s - sum(p * t for p, t in zip(p_counts, t_counts, strict=True))
    denominator = math.sqrt((s * s - sum(p * p for p in p_counts)) * (s * s - sum(t * t for t in t_counts)))
    return 0.0 if denominator == 0 else numerator / denominator


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    n = len(x)
    mean_x, mean_y = sum(x) / n, sum(y) / n
    cov = sum((a - mean_x) * (b - mean_y) for a, b in zip(x, y, strict=True))
    var_x = sum((a - mean_x) ** 2 for a in x)
    var_y = sum((b - mean_y) ** 2 for b in y)
    return 0.0 if var_x == 0 or var_y == 0 else cov / math.sqrt(var_x * var_y)


def _average_ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    return pearson(_average_ranks(x), _average_ranks(y))


def classification_metrics(
    predictions: Sequence[int], labels: Sequence[int], num_classes: int
) -> dict[str, float]:
    return {
        "accuracy": accuracy(predictions, labels),
        "f1": f1_score(predictions, labels, num_classes),
        "mcc": matthews_corrcoef(predictions, labels, num_classes),
    }


def regression_metrics(predictions: Sequence[float], labels: Sequence[float]) -> dict[str, float]:
    return {"pearson": pearson(predictions, labels), "spearman": spearman(predictions, labels)}


def lm_metrics(loss_sum: float, tokens: int) -> dict[str, float]:
    loss = loss_sum / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
