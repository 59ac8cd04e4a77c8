"""models.evaluation.verification on synthetic scores, checked against brute force."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.evaluation.verification import (
    accuracy_at,
    auc,
    best_threshold,
    kfold_accuracy,
    lfw_image_path,
    parse_lfw_pairs,
    roc_auc,
    roc_curve,
    tar_at_far,
)

LFW = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lfw"


def _synthetic(n=600, seed=0, sep=1.5):
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.5
    scores = rng.normal(0, 1, n) + sep * labels
    return scores, labels


def test_parse_pairs(tmp_path):
    p = tmp_path / "pairs.txt"
    p.write_text("2\t2\nA\t1\t2\nB\t1\t3\nA\t1\tC\t4\nB\t2\tD\t1\nE\t1\t2\nF\t3\t4\nE\t1\tG\t2\nF\t1\tH\t1\n")
    pairs = parse_lfw_pairs(p)
    assert len(pairs) == 8
    assert [q.fold for q in pairs] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [q.same for q in pairs] == [True, True, False, False] * 2
    assert (pairs[2].name_a, pairs[2].index_a, pairs[2].name_b, pairs[2].index_b) == ("A", 1, "C", 4)
    assert lfw_image_path("/x", "A", 7) == Path("/x/A/A_0007.jpg")
    p.write_text("2\t2\nA\t1\t2\n")
    with pytest.raises(ValueError):
        parse_lfw_pairs(p)


@pytest.mark.data
@pytest.mark.skipif(not (LFW / "pairs.txt").is_file(), reason="needs ../shared/data/lfw")
def test_parse_real_lfw_pairs():
    pairs = parse_lfw_pairs(LFW / "pairs.txt")
    assert len(pairs) == 6000
    assert sum(p.same for p in pairs) == 3000
    assert {p.fold for p in pairs} == set(range(10))
    p = pairs[0]
    assert lfw_image_path(LFW / "lfw-deepfunneled", p.name_a, p.index_a).is_file()


def _brute_best_accuracy(scores, labels):
    cands = np.concatenate([[scores.max() + 1], np.unique(scores)])
    return max(np.mean((scores >= t) == labels) for t in cands)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_threshold_matches_brute_force(seed):
    s, y = _synthetic(seed=seed)
    s = np.round(s, 1)  # plenty of ties
    thr, acc = best_threshold(s, y)
    assert acc == pytest.approx(_brute_best_accuracy(s, y))
    assert accuracy_at(s, y, thr) == pytest.approx(acc)


def test_best_threshold_on_separable_scores():
    thr, acc = best_threshold([0.1, 0.2, 0.8, 0.9], [False, False, True, True])
    assert acc == 1.0 and 0.2 < thr < 0.8


def test_kfold_uses_other_folds_for_the_threshold():
    s, y = _synthetic(n=1000, seed=3)
    folds = np.arange(len(s)) % 10
    res = kfold_accuracy(s, y, folds)
    assert len(res.accuracies) == 10
    for k in range(10):
        train = folds != k
        thr, _ = best_threshold(s[train], y[train])
        assert res.thresholds[k] == pytest.approx(thr)
        assert res.accuracies[k] == pytest.approx(np.mean((s[~train] >= thr) == y[~train]))
    assert res.mean == pytest.approx(np.mean(res.accuracies))
    assert res.std == pytest.approx(np.std(res.accuracies))
    # a fold whose labels disagree with the rest is scored badly, not tuned on itself
    y2 = y.copy()
    y2[folds == 0] = ~y2[folds == 0]
    assert kfold_accuracy(s, y2, folds).accuracies[0] < 0.3


def test_auc_equals_the_pairwise_ranking_probability():
    s, y = _synthetic(n=400, seed=4, sep=1.0)
    s = np.round(s, 1)
    pos, neg = s[y], s[~y]
    diff = pos[:, None] - neg[None, :]
    brute = np.mean(diff > 0) + 0.5 * np.mean(diff == 0)
    assert roc_auc(s, y) == pytest.approx(brute, abs=1e-12)
    assert roc_auc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert roc_auc([0.1, 0.2, 0.8, 0.9], [True, True, False, False]) == 0.0
    fpr, tpr, thr = roc_curve(s, y)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0) and np.all(np.diff(thr) < 0)
    assert auc(np.array([0, 1.0]), np.array([0, 1.0])) == 0.5


def test_tar_at_far_brute_force():
    rng = np.random.default_rng(5)
    neg = rng.normal(0, 1, 3000)
    pos = rng.normal(3, 1, 3000)
    s = np.concatenate([pos, neg])
    y = np.r_[np.ones(3000, bool), np.zeros(3000, bool)]
    tar, thr = tar_at_far(s, y, 1e-3)
    # at most 3 of 3000 negatives accepted: the best such cut sits just above the
    # 4th-highest negative, accepting every positive above it
    assert np.sum(neg >= thr) == 3
    t4 = np.sort(neg)[-4]
    assert tar == pytest.approx(np.mean(pos > t4))
    with pytest.raises(ValueError):
        roc_curve([0.1, 0.2], [True, True])
