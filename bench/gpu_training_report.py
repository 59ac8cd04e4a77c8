"""Training curves and a summary of one lent-GPU session (tools/gpu_session.sh).

    python bench/gpu_training_report.py --run ~/facelab-runs/gpu-2026-11-30/out \
        [--out docs/results/gpu_training.json] [--png-prefix docs/results/gpu_training]

Reads what the session gave back (``tools.gpu_distill unbundle``): the detector's
``detector_summary.json`` (one row per epoch: training losses and the *select* split's
precision / recall / mAP50 / mAP50-95) and the embedder's ``embedder_summary.json`` +
``train_log.jsonl`` (losses every 100 steps; every minute the quick eval: LFW View 2
folds 1-5 pairs of train-identity people held out of training, student / EMA / teacher).
Writes the numbers (no images of people) and two PNGs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def detector_part(summary: dict) -> dict:
    hist = summary["history"]
    return {"weights": summary["weights"], "version": summary["version"], "device": summary.get("device"),
            "epochs": summary["epochs_completed"], "seconds": round(summary["seconds"], 1),
            "config": {k: summary["config"][k] for k in ("model", "imgsz", "batch", "time_limit_min", "mosaic",
                                                          "scale", "fliplr", "hsv_s", "hsv_v", "translate")},
            "select_final": {k.split("/")[1].replace("(B)", ""): round(v, 4) for k, v in summary["metrics"].items()},
            "history": [{"epoch": h["epoch"], "select_precision": round(h["metrics/precision(B)"], 4),
                         "select_recall": round(h["metrics/recall(B)"], 4),
                         "select_mAP50": round(h["metrics/mAP50(B)"], 4),
                         "select_mAP50_95": round(h["metrics/mAP50-95(B)"], 4),
                         "train_box_loss": round(h["train/box_loss"], 4), "train_cls_loss": round(h["train/cls_loss"], 4)}
                        for h in hist]}


def embedder_part(summary: dict, log_rows: list[dict]) -> dict:
    keep = ("recipe", "weights", "step", "epochs", "train_seconds", "device", "torch", "batch", "lr", "warmup_frac",
            "weight_decay", "centred_weight", "train_chips", "teacher")
    return {**{k: summary[k] for k in keep if k in summary},
            "pack": {k: summary["pack"][k] for k in ("webp_quality", "eval_webp_quality", "train_chips_total",
                                                    "eval_chips", "teacher_fp16_vs_fp32")},
            "train": [{k: r[k] for k in ("t", "step", "epoch", "lr", "img_s", "loss", "direct", "relation", "centred")
                       if k in r} for r in log_rows if r.get("event") == "train"],
            "quick_eval": [{"t": r["t"], "step": r["step"], "epoch": r["epoch"], "pairs": r["pairs"],
                            "student_acc": r["student"]["acc"], "ema_acc": r["ema"]["acc"],
                            "student_auc": r["student"]["auc"], "teacher_acc": r["teacher"]["acc"]}
                           for r in log_rows if r.get("event") == "eval" and "student" in r]}


def plot(det: dict, emb: list[dict], prefix: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    h = det["history"]
    ep = [r["epoch"] for r in h]
    a.plot(ep, [r["train_box_loss"] for r in h], label="box loss (train)")
    a.plot(ep, [r["train_cls_loss"] for r in h], label="cls loss (train)")
    a.set_xlabel("epoch")
    a.legend()
    a.set_title(f"YOLOv8s from scratch, {det['epochs']} epochs in {det['seconds'] / 60:.1f} min (H200)")
    for key, label in (("select_mAP50", "mAP50"), ("select_recall", "recall"), ("select_precision", "precision"),
                       ("select_mAP50_95", "mAP50-95")):
        b.plot(ep, [r[key] for r in h], label=label)
    b.set_ylim(0, 1)
    b.set_xlabel("epoch")
    b.set_title("select split (training sources, never face_mask val)")
    b.legend()
    fig.tight_layout()
    p = prefix.with_name(prefix.name + "_detector.png")
    fig.savefig(p, dpi=90)
    out.append(p)
    plt.close(fig)

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for i, run in enumerate(emb, start=1):
        tr = run["train"]
        a.plot([r["epoch"] for r in tr], [r["direct"] for r in tr], label=f"run {i}: 1 - cos(student, teacher)")
        if tr and "centred" in tr[-1]:
            a.plot([r["epoch"] for r in tr], [r["centred"] for r in tr], label=f"run {i}: same, teacher-centred")
        q = run["quick_eval"]
        b.plot([r["epoch"] for r in q], [max(r["student_acc"], r["ema_acc"]) for r in q], "o-",
               label=f"run {i} ({run['train_seconds'] / 60:.1f} min), best of student/EMA")
    teacher = emb[0]["quick_eval"][-1]["teacher_acc"] if emb and emb[0]["quick_eval"] else None
    if teacher is not None:
        b.axhline(teacher, linestyle="--", color="grey", label="teacher (dlib)")
    a.set_xlabel("epoch")
    a.set_title("ResNet50 distilled from dlib on an H200: losses")
    a.legend(fontsize=8)
    b.set_ylim(0.5, 1.0)
    b.set_xlabel("epoch")
    b.set_title("quick eval: 600 held-out LFW train-identity pairs")
    b.legend(fontsize=8)
    fig.tight_layout()
    p = prefix.with_name(prefix.name + "_embedder.png")
    fig.savefig(p, dpi=90)
    out.append(p)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="the session's folder: detector and first embedder run")
    ap.add_argument("--embedder-run", type=Path, action="append", default=[], help="later embedder-only runs")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "gpu_training.json")
    ap.add_argument("--png-prefix", type=Path, default=REPO / "docs" / "results" / "gpu_training")
    a = ap.parse_args(argv)
    det = detector_part(json.loads((a.run / "detector_summary.json").read_text()))
    emb = []
    for run in [a.run, *a.embedder_run]:
        rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line.strip()]
        emb.append(embedder_part(json.loads((run / "embedder_summary.json").read_text()), rows))
    doc = {"what": "one lent-GPU session (NVIDIA H200), tools/gpu_session.sh: both networks trained at once, "
                   "then a second, shorter embedder run",
           "detector": det, "embedder_runs": emb}
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    for p in plot(det, emb, a.png_prefix):
        print("wrote", p)
    print("wrote", a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
