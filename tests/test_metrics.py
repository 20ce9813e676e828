"""The metrics agree with sklearn (the reference's implementation) on random data."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from audioset_dcls.metrics import average_precision, d_prime, roc_auc, tagging_metrics


@pytest.mark.parametrize("seed", range(5))
def test_ap_and_auc_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n, c = 300, 12
    targets = (rng.random((n, c)) < rng.uniform(0.02, 0.5, size=c)).astype(np.int64)
    targets[0] = 1  # every class has a positive
    targets[1] = 0  # ... and a negative
    scores = rng.random((n, c)) + 0.5 * targets  # informative but imperfect
    if seed % 2:  # ties: sklearn groups equal scores into one threshold
        scores = np.round(scores, 1)
    m = tagging_metrics(targets, scores)
    ref_ap = [average_precision_score(targets[:, k], scores[:, k]) for k in range(c)]
    ref_auc = [roc_auc_score(targets[:, k], scores[:, k]) for k in range(c)]
    np.testing.assert_allclose(m["per_class_ap"], ref_ap, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(m["per_class_auc"], ref_auc, rtol=1e-12, atol=1e-12)
    assert m["mAP"] == pytest.approx(np.mean(ref_ap), abs=1e-12)
    assert m["mAUC"] == pytest.approx(np.mean(ref_auc), abs=1e-12)
    assert m["num_classes_scored"] == c


def test_classes_without_positives_are_left_out():
    rng = np.random.default_rng(0)
    targets = (rng.random((50, 4)) < 0.3).astype(int)
    targets[:, 2] = 0
    targets[0, [0, 1, 3]] = 1
    scores = rng.random((50, 4))
    m = tagging_metrics(targets, scores)
    assert math.isnan(m["per_class_ap"][2]) and math.isnan(m["per_class_auc"][2])
    assert m["num_classes_scored"] == 3
    keep = [0, 1, 3]
    assert m["mAP"] == pytest.approx(np.mean([average_precision_score(targets[:, k], scores[:, k]) for k in keep]))


def test_perfect_and_chance_scores():
    y = np.array([0, 0, 1, 1, 0, 1])
    assert average_precision(y, y.astype(float)) == 1.0
    assert roc_auc(y, y.astype(float)) == 1.0
    # Constant scores: AP = prevalence, AUC = 0.5, d' = 0.
    assert average_precision(y, np.zeros(6)) == pytest.approx(0.5)
    assert roc_auc(y, np.zeros(6)) == 0.5
    assert d_prime(0.5) == 0.0


def test_d_prime_formula():
    from scipy.stats import norm

    for auc in (0.6, 0.9, 0.97):
        assert d_prime(auc) == pytest.approx(math.sqrt(2) * norm.ppf(auc), rel=1e-12)


# ---------------------------------------------------------------------------- thresholds


@pytest.mark.parametrize("seed", range(3))
def test_max_f1_threshold_matches_sklearns_best_f1(seed):
    from sklearn.metrics import f1_score, precision_recall_curve

    from audioset_dcls.metrics import max_f1_threshold

    rng = np.random.default_rng(seed)
    y = (rng.random(400) < 0.2).astype(int)
    s = rng.random(400) + 0.6 * y
    if seed == 2:
        s = np.round(s, 1)  # ties form one candidate
    t, f1 = max_f1_threshold(y, s)
    p, r, _ = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore"):
        best = np.nanmax(2 * p * r / (p + r))
    assert f1 == pytest.approx(best, abs=1e-12)
    assert f1_score(y, s >= t) == pytest.approx(best, abs=1e-12)  # the cut-off gives those decisions
    assert math.isnan(max_f1_threshold(np.zeros(5), np.arange(5.0))[0])


def test_calibrated_thresholds_fall_back_for_rare_classes():
    from audioset_dcls.metrics import calibrate_thresholds, max_f1_threshold

    rng = np.random.default_rng(0)
    n = 300
    targets = np.zeros((n, 3), int)
    targets[:60, 0] = 1
    targets[:3, 1] = 1  # 3 positives: below min_positives
    scores = rng.random((n, 3)) * 0.5
    scores[:60, 0] += 0.45  # class 0 separable near 0.5
    cal = calibrate_thresholds(targets, scores, min_positives=5)
    assert list(cal["fallback"]) == [False, True, True]
    assert cal["thresholds"][0] == pytest.approx(max_f1_threshold(targets[:, 0], scores[:, 0])[0])
    assert cal["thresholds"][1] == cal["thresholds"][2] == cal["global_threshold"]
    pred = scores[:, 0] >= cal["thresholds"][0]
    assert cal["precision"][0] == pytest.approx(pred[:60].sum() / pred.sum())
    assert cal["recall"][0] == pytest.approx(pred[:60].mean())
    assert math.isnan(cal["recall"][2]) and math.isnan(cal["f1"][2])  # no positive: no recall


@pytest.mark.parametrize("seed", range(3))
def test_single_label_accuracy_matches_sklearn(seed):
    from sklearn.metrics import accuracy_score, top_k_accuracy_score

    from audioset_dcls.metrics import classification_metrics

    rng = np.random.default_rng(seed)
    n, c = 200, 9
    truth = rng.integers(0, c, size=n)
    truth[:c] = np.arange(c)  # every class has clips
    targets = np.eye(c, dtype=np.uint8)[truth]
    scores = rng.random((n, c)) + 0.4 * targets  # informative but imperfect, no ties
    m = classification_metrics(targets, scores)
    assert m["accuracy"] == pytest.approx(accuracy_score(truth, scores.argmax(1)), abs=1e-12)
    assert m["top5"] == pytest.approx(top_k_accuracy_score(truth, scores, k=5, labels=range(c)), abs=1e-12)
    for k in range(c):
        assert m["per_class_accuracy"][k] == pytest.approx((scores.argmax(1) == k)[truth == k].mean())
    with pytest.raises(ValueError, match="exactly one positive"):
        classification_metrics(np.ones((2, 3)), np.zeros((2, 3)))
