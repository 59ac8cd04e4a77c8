"""Training-curve figure of a distillation run, drawn from its ``metrics.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path | str) -> tuple[list[dict], list[dict]]:
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in rows if r.get("kind") == "train"], [r for r in rows if r.get("kind") == "eval"]


def plot_run(metrics: Path | str, out: Path | str, title: str | None = None) -> Path:
    """Three panels over epochs: losses (log), quick-eval accuracy (student, EMA, the
    teacher's line), learning rate and speed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = read_metrics(metrics)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), dpi=110)
    ax = axes[0]
    if train:
        ep = [r["epoch"] for r in train]
        for key, label in (("loss", "total"), ("direct", "1 - cos(student, teacher)"), ("relation", "relational MSE")):
            ax.plot(ep, [r[key] for r in train], ".-" if len(train) < 50 else "-", label=label, lw=1)
        if any("margin" in r for r in train):
            ax.plot(ep, [r.get("margin", float("nan")) for r in train], label="ArcFace", lw=1)
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_title("training loss (means over each logged window)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)

    ax = axes[1]
    if evals:
        ep = [r["epoch"] for r in evals]
        ax.plot(ep, [100 * r["student"]["acc"] for r in evals], "o-", label="student", ms=3)
        ax.plot(ep, [100 * r["ema"]["acc"] for r in evals], "s-", label="student EMA", ms=3)
        ax.axhline(100 * evals[-1]["teacher"]["acc"], color="k", ls="--", lw=1,
                   label=f"dlib teacher {100 * evals[-1]['teacher']['acc']:.2f}%")
        ax.set_title(f"quick eval: {evals[-1]['pairs']} held-out LFW train-identity pairs, 5-fold acc", fontsize=9)
    else:
        last = train[-1]["step"] if train else 0
        ax.text(0.5, 0.5, f"no quick eval yet\n(the run evaluates every N steps;\nit is at step {last})",
                ha="center", va="center", transform=ax.transAxes, fontsize=9)
        ax.set_title("quick eval: held-out LFW train-identity pairs", fontsize=9)
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy %")
    if evals:
        ax.legend(fontsize=7, loc="lower right")
    ax.grid(True, alpha=0.3)

    ax = axes[2]
    if train:
        ep = [r["epoch"] for r in train]
        ax.plot(ep, [r["lr"] for r in train], ".-", color="tab:purple", lw=1)
        ax.set_ylabel("learning rate", color="tab:purple")
        ax2 = ax.twinx()
        ax2.plot(ep, [r["img_s"] for r in train], ".-", color="tab:green", lw=0.8, alpha=0.7)
        ax2.set_ylabel("images/s (wall, shared CPU)", color="tab:green")
    ax.set_xlabel("epoch")
    ax.set_title("schedule and speed", fontsize=9)
    ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
