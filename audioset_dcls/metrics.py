"""Multi-label tagging metrics as pure NumPy functions: per-class AP and ROC-AUC, mAP, d', and
per-class operating thresholds (the score cut-off that maximises each class's F1); for
single-label sets, top-1 and top-5 accuracy (:func:`classification_metrics`).

They compute what the reference computes with sklearn (``average_precision_score`` and
``roc_auc_score`` per class on sigmoid scores, ``d' = sqrt(2) * Phi^-1(mean AUC)``), without
sklearn's per-call overhead, and they are tested against sklearn.

Classes without a positive clip in the evaluated set have no defined AP (and no AUC; nor does a
class without a negative): their per-class value is NaN and they are left out of the means.
``num_classes_scored`` says how many classes a mean covers. On the full AudioSet eval set every
one of the 527 classes has positives, so this only matters for subsets.

:func:`calibrate_thresholds` picks, per class, the cut-off whose decisions ``score >= t`` give
the highest F1 on the evaluated clips; a class with fewer than ``min_positives`` positives gets
the global cut-off instead (the one that maximises the F1 of all classes' decisions pooled), since
a maximum over a handful of clips says little.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.special import ndtri
from scipy.stats import rankdata

__all__ = ["average_precision", "roc_auc", "d_prime", "per_class_ap", "per_class_auc", "tagging_metrics",
           "max_f1_threshold", "precision_recall_at", "calibrate_thresholds", "MIN_POSITIVES"]

# Below this many positive clips a class's own F1 maximum is mostly luck: it gets the global cut-off.
MIN_POSITIVES = 5


def average_precision(targets: np.ndarray, scores: np.ndarray) -> float:
    """AP of one class: targets (N,) in {0, 1}, scores (N,). NaN without positives.

    Same definition as sklearn: sum over distinct thresholds of (R_n - R_{n-1}) * P_n, where
    tied scores form one threshold.
    """
    y = np.asarray(targets).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    num_pos = int(y.sum())
    if num_pos == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    # Last index of each run of equal scores: precision/recall are only defined there.
    ends = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tp = np.cumsum(y)[ends]
    fp = (ends + 1) - tp
    precision = tp / (tp + fp)
    recall = tp / num_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_auc(targets: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC of one class via the rank-sum (Mann-Whitney U) statistic, ties counted half.

    targets (N,) in {0, 1}, scores (N,). NaN if the class has no positive or no negative.
    """
    y = np.asarray(targets).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    num_pos = int(y.sum())
    num_neg = y.size - num_pos
    if num_pos == 0 or num_neg == 0:
        return float("nan")
    ranks = rankdata(s)  # average ranks for ties
    return float((ranks[y].sum() - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))


def d_prime(auc: float) -> float:
    """Sensitivity index d' = sqrt(2) * Phi^-1(AUC) (inf at AUC 1)."""
    return float(math.sqrt(2.0) * ndtri(auc))


def per_class_ap(targets: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """targets (N, C), scores (N, C) -> AP per class (C,), NaN where a class has no positive."""
    return np.array([average_precision(targets[:, c], scores[:, c]) for c in range(targets.shape[1])])


def per_class_auc(targets: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """targets (N, C), scores (N, C) -> ROC-AUC per class (C,), NaN where undefined."""
    return np.array([roc_auc(targets[:, c], scores[:, c]) for c in range(targets.shape[1])])


def tagging_metrics(targets: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """All eval numbers of a multi-label set.

    Args:
        targets: (N, C) binary ground truth.
        scores: (N, C) scores (sigmoid probabilities or logits: AP and AUC only use the order).

    Returns:
        ``{"mAP", "mAUC", "d_prime", "num_classes_scored", "per_class_ap" (C,), "per_class_auc"
        (C,), "positives" (C,)}``; means skip NaN classes (see the module docstring).
    """
    targets = np.asarray(targets)
    scores = np.asarray(scores)
    if targets.shape != scores.shape or targets.ndim != 2:
        raise ValueError(f"targets {targets.shape} and scores {scores.shape} must both be (N, C)")
    ap = per_class_ap(targets, scores)
    auc = per_class_auc(targets, scores)
    scored = ~np.isnan(ap)
    m_ap = float(np.nanmean(ap)) if scored.any() else float("nan")
    m_auc = float(np.nanmean(auc)) if (~np.isnan(auc)).any() else float("nan")
    return {
        "mAP": m_ap,
        "mAUC": m_auc,
        "d_prime": d_prime(m_auc) if not math.isnan(m_auc) else float("nan"),
        "num_classes_scored": int(scored.sum()),
        "per_class_ap": ap,
        "per_class_auc": auc,
        "positives": targets.astype(bool).sum(axis=0),
    }


def classification_metrics(targets: np.ndarray, scores: np.ndarray, k: int = 5) -> dict[str, Any]:
    """Single-label numbers: each clip's true class is its one positive.

    Args:
        targets: (N, C) one-hot ground truth.
        scores: (N, C) scores (softmax probabilities or logits: only the order counts).
        k: the ``top5`` cut-off (at most C).

    Returns:
        ``{"accuracy" (top-1), "top5" (the true class among the k best), "per_class_accuracy"
        (C,): the top-1 accuracy of each class's clips (NaN without clips)}``. Ties count as
        misses unless the true class comes first in index order (``np.argsort`` is stable).
    """
    targets = np.asarray(targets)
    scores = np.asarray(scores)
    if targets.shape != scores.shape or targets.ndim != 2:
        raise ValueError(f"targets {targets.shape} and scores {scores.shape} must both be (N, C)")
    if (targets.astype(bool).sum(axis=1) != 1).any():
        raise ValueError("single-label metrics need exactly one positive per clip")
    truth = targets.argmax(axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")
    top1 = order[:, 0] == truth
    topk = (order[:, : min(k, scores.shape[1])] == truth[:, None]).any(axis=1)
    per_class = np.array([top1[truth == c].mean() if (truth == c).any() else np.nan
                          for c in range(scores.shape[1])])
    return {"accuracy": float(top1.mean()) if len(truth) else float("nan"),
            "top5": float(topk.mean()) if len(truth) else float("nan"),
            "per_class_accuracy": per_class}


def max_f1_threshold(targets: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """The cut-off ``t`` whose decisions ``scores >= t`` maximise F1, and that F1.

    targets (N,) in {0, 1} (any shape is flattened), scores (N,). Candidates are the distinct
    scores; among equal F1s the highest cut-off wins (fewer false alarms). The cut-off returned is
    half-way between the lowest score kept and the next lower score, so a score a little below a
    kept one still counts: the decisions on these clips are the same. ``(nan, nan)`` without positives.
    """
    y = np.asarray(targets).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    num_pos = int(y.sum())
    if num_pos == 0:
        return float("nan"), float("nan")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    ends = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # last index of each run of equal scores
    tp = np.cumsum(y)[ends]
    f1 = 2 * tp / ((ends + 1) + num_pos)  # 2TP / (2TP + FP + FN), predicted = ends + 1
    best = int(np.argmax(f1))  # first maximum: the highest cut-off
    kept = s[ends[best]]
    below = s[ends[best] + 1] if ends[best] + 1 < s.size else kept
    return float((kept + below) / 2), float(f1[best])


def precision_recall_at(targets: np.ndarray, scores: np.ndarray, thresholds: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall per class of the decisions ``scores >= thresholds``.

    targets (N, C), scores (N, C), thresholds (C,) -> (precision (C,), recall (C,)); precision
    is NaN where nothing is predicted, recall NaN where a class has no positive.
    """
    y = np.asarray(targets).astype(bool)
    pred = np.asarray(scores) >= np.asarray(thresholds)[None, :]
    tp = (pred & y).sum(0)
    predicted, positives = pred.sum(0), y.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, tp / np.maximum(predicted, 1), np.nan)
        recall = np.where(positives > 0, tp / np.maximum(positives, 1), np.nan)
    return precision.astype(np.float64), recall.astype(np.float64)


def calibrate_thresholds(targets: np.ndarray, scores: np.ndarray, min_positives: int = MIN_POSITIVES
                         ) -> dict[str, Any]:
    """One operating threshold per class: its max-F1 cut-off, or the global one when it has
    fewer than ``min_positives`` positives.

    Args:
        targets: (N, C) binary ground truth.
        scores: (N, C) sigmoid probabilities.

    Returns:
        ``{"thresholds" (C,), "precision" (C,), "recall" (C,), "f1" (C,) at those thresholds,
        "fallback" (C,) bool (True: the global value), "global_threshold", "min_positives"}``.
    """
    targets = np.asarray(targets)
    scores = np.asarray(scores, dtype=np.float64)
    if targets.shape != scores.shape or targets.ndim != 2:
        raise ValueError(f"targets {targets.shape} and scores {scores.shape} must both be (N, C)")
    global_t, _ = max_f1_threshold(targets, scores)
    if math.isnan(global_t):  # no positive at all: nothing to calibrate on
        global_t = 0.5
    positives = targets.astype(bool).sum(0)
    fallback = positives < max(1, min_positives)
    thresholds = np.array([global_t if fallback[c] else max_f1_threshold(targets[:, c], scores[:, c])[0]
                           for c in range(targets.shape[1])], dtype=np.float64)
    precision, recall = precision_recall_at(targets, scores, thresholds)
    with np.errstate(invalid="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    f1 = np.where(np.isnan(precision) | np.isnan(recall), np.where(positives > 0, 0.0, np.nan), f1)
    return {"thresholds": thresholds, "precision": precision, "recall": recall, "f1": f1, "fallback": fallback,
            "global_threshold": float(global_t), "min_positives": int(min_positives)}
