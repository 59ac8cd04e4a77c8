"""Evaluation of the face-attribute models: metrics, FER2013 through the app's path, plots.

FER2013 faces are 48x48 tight crops, a framing the detector rarely finds a face in
(the face *is* the picture). To measure the emotion model as the app runs it, each FER
image goes through the app's own steps where it can: the detector (app defaults) on
the 48 px picture; where it finds no face near the centre, a fixed seed box (the
median box it finds on the select split) stands in; then dlib's 5 landmarks, our FER
framing of the aligned chip (``models.attributes.framing``), the network. Results are
reported for both groups (detector box / seed box) and against FER's own framing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from models.types import FaceBox


def central_box(boxes: Sequence[FaceBox], width: int, height: int) -> FaceBox | None:
    """The box whose centre is nearest the picture's centre, if inside its middle half."""
    best, best_d = None, np.inf
    for b in boxes:
        cx, cy = (b.x1 + b.x2) / 2, (b.y1 + b.y2) / 2
        d = np.hypot(cx - width / 2, cy - height / 2)
        if d < best_d and abs(cx - width / 2) < width / 4 and abs(cy - height / 2) < height / 4:
            best, best_d = b, d
    return best


def fer_app_boxes(images: np.ndarray, detector, landmarker,
                  seed_box: tuple[float, float, float, float] | None) -> tuple[list[FaceBox | None], np.ndarray]:
    """(N, 48, 48) grey FER faces -> per face a landmarked box (None when the detector
    found none and no ``seed_box`` is given) and whether the detector found it."""
    out: list[FaceBox | None] = []
    found = np.zeros(len(images), bool)
    for i, grey in enumerate(images):
        rgb = np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
        box = central_box(detector.detect(rgb), rgb.shape[1], rgb.shape[0])
        found[i] = box is not None
        if box is None and seed_box is not None:
            box = FaceBox(*seed_box, score=0.0)
        out.append(landmarker.predict(rgb, [box])[0] if box is not None else None)
    return out, found


def confusion(labels: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
    m = np.zeros((n, n), np.int64)
    np.add.at(m, (labels, pred), 1)
    return m


def classification_report(labels: np.ndarray, probs: np.ndarray, names: Sequence[str]) -> dict:
    pred = probs.argmax(1)
    cm = confusion(labels, pred, len(names))
    recall = cm.diagonal() / np.maximum(cm.sum(1), 1)
    precision = cm.diagonal() / np.maximum(cm.sum(0), 1)
    return {
        "n": int(len(labels)), "accuracy": float((pred == labels).mean()),
        "per_class_recall": {k: float(v) for k, v in zip(names, recall)},
        "per_class_precision": {k: float(v) for k, v in zip(names, precision)},
        "confusion": cm.tolist(), "labels": list(names),
    }


def age_gender_report(age_pred: np.ndarray, p_female: np.ndarray, age: np.ndarray, gender: np.ndarray) -> dict:
    err = age_pred - age
    groups = {"0-2": (0, 3), "3-12": (3, 13), "13-19": (13, 20), "20-39": (20, 40), "40-59": (40, 60),
              "60+": (60, 200)}
    by_age = {k: {"n": int(m.sum()), "mae": float(np.abs(err[m]).mean()) if m.any() else None}
              for k, (lo, hi) in groups.items() for m in [(age >= lo) & (age < hi)]}
    correct = (p_female >= 0.5).astype(int) == gender
    return {
        "n": int(len(age)), "age_mae": float(np.abs(err).mean()), "age_median_abs_error": float(np.median(np.abs(err))),
        "age_mean_error": float(err.mean()), "age_within_5y": float((np.abs(err) <= 5).mean()),
        "age_mae_by_true_age": by_age, "gender_accuracy": float(correct.mean()),
        "gender_accuracy_male": float(correct[gender == 0].mean()),
        "gender_accuracy_female": float(correct[gender == 1].mean()),
    }


# -- plots ----------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(cm: np.ndarray, names: Sequence[str], path: Path | str, title: str) -> Path:
    plt = _pyplot()
    cm = np.asarray(cm, dtype=np.float64)
    rows = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{rows[i, j]:.2f}\n({int(cm[i, j])})", ha="center", va="center", fontsize=7,
                    color="white" if rows[i, j] > 0.55 else "black")
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (row-normalised)")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_age_errors(age_pred: np.ndarray, age: np.ndarray, path: Path | str, title: str) -> Path:
    plt = _pyplot()
    err = np.asarray(age_pred) - np.asarray(age)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.hist(np.clip(err, -40, 40), bins=np.arange(-40, 41, 2), color="#1f77b4")
    a1.axvline(0, color="black", lw=0.8)
    a1.set_xlabel("predicted - true age (years, clipped to +-40)")
    a1.set_ylabel("faces")
    a1.set_title(f"MAE {np.abs(err).mean():.2f} y, median |error| {np.median(np.abs(err)):.1f} y", fontsize=10)
    a2.scatter(age, age_pred, s=3, alpha=0.3, color="#1f77b4")
    a2.plot([0, 100], [0, 100], color="black", lw=0.8)
    a2.set_xlabel("true age")
    a2.set_ylabel("predicted age")
    a2.set_xlim(0, 100)
    a2.set_ylim(0, 100)
    fig.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_training_curves(history: Sequence[dict], keys: Sequence[str], path: Path | str, title: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    epochs = [h["epoch"] for h in history]
    for k in keys:
        ax.plot(epochs, [h[k] for h in history], label=k)
    ax.set_xlabel("epoch")
    ax.legend()
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
