"""Face verification metrics, numpy only: LFW pairs, k-fold accuracy, ROC, TAR@FAR.

Scores are similarities: higher means "more likely the same person" (use cosine
similarity, or a negated distance). Labels are booleans: True for same-person pairs.
A pair is accepted as "same" when its score is >= the threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------------------- pairs


@dataclass(frozen=True)
class Pair:
    fold: int  # 0-based fold index (LFW View 2: 0..9)
    name_a: str
    index_a: int  # LFW's 1-based image number
    name_b: str
    index_b: int
    same: bool


def parse_lfw_pairs(path: Path | str) -> list[Pair]:
    """Read LFW's ``pairs.txt`` (View 2): header ``folds n``, then per fold ``n`` same
    pairs (``name i j``) followed by ``n`` different pairs (``name1 i name2 j``)."""
    lines = [ln.split() for ln in Path(path).read_text().splitlines() if ln.strip()]
    if not lines or len(lines[0]) != 2:
        raise ValueError(f"{path}: expected a 'folds pairs_per_fold' header")
    n_folds, per = int(lines[0][0]), int(lines[0][1])
    body = lines[1:]
    if len(body) != n_folds * 2 * per:
        raise ValueError(f"{path}: expected {n_folds * 2 * per} pairs, found {len(body)}")
    pairs: list[Pair] = []
    for i, f in enumerate(body):
        fold = i // (2 * per)
        if len(f) == 3:
            pairs.append(Pair(fold, f[0], int(f[1]), f[0], int(f[2]), True))
        elif len(f) == 4:
            pairs.append(Pair(fold, f[0], int(f[1]), f[2], int(f[3]), False))
        else:
            raise ValueError(f"{path}: bad pair line {i + 2}: {' '.join(f)}")
    return pairs


def lfw_image_path(root: Path | str, name: str, index: int) -> Path:
    """``root/<name>/<name>_<NNNN>.jpg`` as LFW names its files."""
    return Path(root) / name / f"{name}_{index:04d}.jpg"


# ---------------------------------------------------------------------- thresholds


def _as_arrays(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=bool).reshape(-1)
    if len(s) != len(y):
        raise ValueError(f"{len(s)} scores but {len(y)} labels")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    return s, y


def best_threshold(scores, labels) -> tuple[float, float]:
    """The threshold with the highest accuracy on these pairs, and that accuracy.

    Cuts are only placed between distinct scores (the midpoint), or above/below all
    of them, so ties are never split. Among equally accurate cuts the middle one wins.
    """
    s, y = _as_arrays(scores, labels)
    n = len(s)
    if n == 0:
        raise ValueError("no pairs")
    order = np.argsort(-s, kind="stable")
    ss, yy = s[order], y[order]
    # accepting the top k pairs: correct = positives among them + negatives outside
    tp = np.concatenate([[0], np.cumsum(yy)])
    k = np.arange(n + 1)
    correct = tp + ((~yy).sum() - (k - tp))
    valid = np.ones(n + 1, dtype=bool)
    valid[1:n] = ss[:-1] != ss[1:]  # no cut inside a run of equal scores
    correct = np.where(valid, correct, -1)
    best = np.flatnonzero(correct == correct.max())
    kb = int(best[len(best) // 2])
    if kb == 0:
        thr = ss[0] + 1.0
    elif kb == n:
        thr = ss[-1] - 1.0
    else:
        thr = (ss[kb - 1] + ss[kb]) / 2.0
    return float(thr), float(correct[kb] / n)


def accuracy_at(scores, labels, threshold: float) -> float:
    s, y = _as_arrays(scores, labels)
    return float(np.mean((s >= threshold) == y))


@dataclass(frozen=True)
class KFoldResult:
    accuracies: list[float]  # one per held-out fold, in fold order
    thresholds: list[float]  # chosen on the other folds

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracies))

    @property
    def std(self) -> float:
        return float(np.std(self.accuracies))


def kfold_accuracy(scores, labels, folds) -> KFoldResult:
    """Accuracy on each fold with the threshold chosen on all the other folds."""
    s, y = _as_arrays(scores, labels)
    f = np.asarray(folds).reshape(-1)
    if len(f) != len(s):
        raise ValueError(f"{len(f)} fold ids for {len(s)} scores")
    ids = np.unique(f)
    if len(ids) < 2:
        raise ValueError("k-fold needs at least 2 folds")
    accs, thrs = [], []
    for k in ids:
        test = f == k
        thr, _ = best_threshold(s[~test], y[~test])
        accs.append(accuracy_at(s[test], y[test], thr))
        thrs.append(thr)
    return KFoldResult(accs, thrs)


# ----------------------------------------------------------------------------- ROC


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), from (0, 0) at +inf down to (1, 1), one point per
    distinct score (accept when score >= threshold)."""
    s, y = _as_arrays(scores, labels)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC needs both same and different pairs")
    order = np.argsort(-s, kind="stable")
    ss, yy = s[order], y[order]
    last_of_run = np.r_[ss[:-1] != ss[1:], True]
    tp = np.cumsum(yy)[last_of_run]
    fp = np.cumsum(~yy)[last_of_run]
    tpr = np.r_[0.0, tp / n_pos]
    fpr = np.r_[0.0, fp / n_neg]
    thr = np.r_[np.inf, ss[last_of_run]]
    return fpr, tpr, thr


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under a curve given by increasing ``fpr`` (trapezoid rule)."""
    fpr = np.asarray(fpr, dtype=np.float64)
    tpr = np.asarray(tpr, dtype=np.float64)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def roc_auc(scores, labels) -> float:
    fpr, tpr, _ = roc_curve(scores, labels)
    return auc(fpr, tpr)


def tar_at_far(scores, labels, far: float = 1e-3) -> tuple[float, float]:
    """Highest true-accept rate whose false-accept rate is <= ``far``, and its threshold.

    With few different pairs this is coarse: LFW's 3,000 allow at most 3 false accepts
    at FAR 1e-3.
    """
    fpr, tpr, thr = roc_curve(scores, labels)
    ok = np.flatnonzero(fpr <= far + 1e-12)
    i = int(ok[np.argmax(tpr[ok])])
    return float(tpr[i]), float(thr[i])
