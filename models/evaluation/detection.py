"""Face detection metrics: VOC XML ground truth, IoU matching, recall by size, AP.

Conventions (they change small-face numbers, so they are spelled out):

* Boxes are ``(x1, y1, x2, y2)`` floats in 0-based, half-open pixel coordinates, the
  same as ``FaceBox``. PASCAL VOC XML stores 1-based *inclusive* pixel indices
  (face_mask has ``xmax == 401`` on 400-px-wide images), so ``parse_voc_xml`` maps
  ``[xmin, xmax]`` to ``[xmin - 1, xmax)``; a box's width is ``xmax - xmin + 1`` as in
  the VOC devkit.
* Every object class counts as "face" (face_mask's with_mask / without_mask /
  mask_weared_incorrect are all faces). ``difficult`` objects are kept as ordinary
  ground truth (face_mask marks none).
* Matching, per image and IoU threshold: predictions in descending score order each
  take the still-unmatched ground-truth box with the highest IoU, if that IoU is at
  least the threshold (greedy by score; COCO's rule. VOC's devkit instead marks a
  prediction false when its best box is already taken, which punishes crowded small
  faces for no good reason).
* AP is the area under the all-point interpolated precision/recall curve (VOC 2010+).
  mAP50-95 averages that AP over IoU 0.50:0.05:0.95 (COCO's thresholds, VOC's
  interpolation, so it is close to but not identical with COCO's 101-point number).
* Recall and precision without a qualifier are at *every* prediction the detector
  returned, i.e. at the detector's own score threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.boxes import iou_matrix
from common.safe_xml import parse_xml_file
from models.types import FaceBox

#: (label, low, high) buckets on a ground-truth box's short side in pixels, [low, high)
SIZE_BUCKETS: tuple[tuple[str, float, float], ...] = (
    ("<16", 0.0, 16.0),
    ("16-32", 16.0, 32.0),
    ("32-64", 32.0, 64.0),
    (">=64", 64.0, float("inf")),
)

COCO_IOUS: tuple[float, ...] = tuple(np.round(np.arange(0.5, 0.96, 0.05), 2).tolist())


@dataclass(frozen=True)
class VocAnnotation:
    """Ground truth of one image from a PASCAL VOC XML file."""

    stem: str
    filename: str
    width: int
    height: int
    boxes: np.ndarray  # (N, 4) float64, x1 y1 x2 y2, 0-based half-open
    labels: tuple[str, ...]


def parse_voc_xml(path: Path | str) -> VocAnnotation:
    """Read one VOC XML file; see the module docstring for the coordinate mapping."""
    path = Path(path)
    root = parse_xml_file(path)  # hardened: no DTDs or entities, capped depth and size
    size = root.find("size")
    width = int(float(size.findtext("width", "0"))) if size is not None else 0
    height = int(float(size.findtext("height", "0"))) if size is not None else 0
    boxes: list[list[float]] = []
    labels: list[str] = []
    for obj in root.iter("object"):
        bnd = obj.find("bndbox")
        if bnd is None:
            continue
        xmin, ymin, xmax, ymax = (float(bnd.findtext(k, "nan")) for k in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append([xmin - 1.0, ymin - 1.0, xmax, ymax])
        labels.append((obj.findtext("name") or "face").strip())
    return VocAnnotation(
        stem=path.stem,
        filename=root.findtext("filename") or f"{path.stem}.jpg",
        width=width,
        height=height,
        boxes=np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        labels=tuple(labels),
    )


def load_voc_split(root: Path | str, split: str) -> list[tuple[Path, VocAnnotation]]:
    """``(image path, annotation)`` for every stem in ``root/<split>.txt``.

    Expects the face_mask layout: ``images/<stem>.jpg`` and ``annotations/<stem>.xml``.
    """
    root = Path(root)
    stems = [s.strip() for s in (root / f"{split}.txt").read_text().splitlines() if s.strip()]
    out = []
    for stem in stems:
        ann = parse_voc_xml(root / "annotations" / f"{stem}.xml")
        image = root / "images" / ann.filename
        if not image.is_file():
            image = root / "images" / f"{stem}.jpg"
        out.append((image, ann))
    return out


def boxes_array(boxes: Sequence[FaceBox] | np.ndarray) -> np.ndarray:
    """(N, 4) float64 array from FaceBoxes or anything array-like with 4 columns."""
    if isinstance(boxes, np.ndarray):
        return boxes.astype(np.float64, copy=False).reshape(-1, 4)
    return np.asarray([b.as_tuple() for b in boxes], dtype=np.float64).reshape(-1, 4)


def match_greedy(
    pred_boxes: np.ndarray, pred_scores: np.ndarray, gt_boxes: np.ndarray, iou_threshold: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Match one image's predictions to its ground truth, greedy by descending score.

    Returns ``(pred_to_gt, gt_matched)``: for each prediction the index of the
    ground-truth box it matched or -1 (a false positive), and a boolean per gt box.
    """
    n_pred, n_gt = len(pred_boxes), len(gt_boxes)
    pred_to_gt = np.full(n_pred, -1, dtype=np.int64)
    gt_matched = np.zeros(n_gt, dtype=bool)
    if n_pred == 0 or n_gt == 0:
        return pred_to_gt, gt_matched
    ious = iou_matrix(pred_boxes, gt_boxes)
    # Stable sort so equal scores keep the caller's order (deterministic results).
    for p in np.argsort(-np.asarray(pred_scores, dtype=np.float64), kind="stable"):
        candidates = np.where(gt_matched, -1.0, ious[p])
        g = int(np.argmax(candidates))
        if candidates[g] >= iou_threshold:
            pred_to_gt[p] = g
            gt_matched[g] = True
    return pred_to_gt, gt_matched


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC all-point interpolated AP from a PR curve ordered by descending score."""
    if len(recall) == 0:
        return 0.0
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    # Precision envelope: the best precision at this recall or any higher recall.
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


@dataclass
class DetectionMetrics:
    """Dataset-level numbers; ``pr_recall``/``pr_precision``/``pr_scores`` trace the
    PR curve at the evaluation IoU (0.5 unless asked otherwise; ``ap50`` is the AP at
    that IoU) from the highest-scoring prediction down."""

    num_images: int
    num_gt: int
    num_pred: int
    true_positives: int
    recall: float
    precision: float
    ap50: float
    map50_95: float | None
    recall_by_size: dict[str, dict[str, float]]
    pr_recall: np.ndarray = field(repr=False)
    pr_precision: np.ndarray = field(repr=False)
    pr_scores: np.ndarray = field(repr=False)

    def summary(self) -> dict:
        """JSON-friendly numbers (no curves)."""
        return {
            "num_images": self.num_images,
            "num_gt": self.num_gt,
            "num_pred": self.num_pred,
            "true_positives": self.true_positives,
            "recall@0.5": self.recall,
            "precision@0.5": self.precision,
            "AP50": self.ap50,
            "mAP50-95": self.map50_95,
            "recall_by_size": self.recall_by_size,
        }


def _pr_curve(
    preds: list[tuple[np.ndarray, np.ndarray]], gts: list[np.ndarray], iou_threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
    """Pooled PR curve over all images at one IoU threshold, plus per-image gt matches."""
    all_scores, all_tp, gt_flags = [], [], []
    for (boxes, scores), gt in zip(preds, gts):
        pred_to_gt, gt_matched = match_greedy(boxes, scores, gt, iou_threshold)
        all_scores.append(scores)
        all_tp.append(pred_to_gt >= 0)
        gt_flags.append(gt_matched)
    scores = np.concatenate(all_scores) if all_scores else np.zeros(0)
    tp = np.concatenate(all_tp) if all_tp else np.zeros(0, dtype=bool)
    order = np.argsort(-scores, kind="stable")
    tp = tp[order]
    n_gt = sum(len(g) for g in gts)
    ctp = np.cumsum(tp)
    recall = ctp / max(n_gt, 1)
    precision = ctp / np.arange(1, len(tp) + 1)
    return recall, precision, scores[order], gt_flags


def evaluate_detections(
    predictions: Sequence[Sequence[FaceBox] | tuple[np.ndarray, np.ndarray]],
    ground_truth: Sequence[Sequence[FaceBox] | np.ndarray],
    iou_threshold: float = 0.5,
    with_map50_95: bool = True,
    size_buckets: Sequence[tuple[str, float, float]] = SIZE_BUCKETS,
) -> DetectionMetrics:
    """Score a detector over a dataset.

    ``predictions[i]`` is image i's list of FaceBox (score used for ranking) or an
    ``(boxes (N, 4), scores (N,))`` pair; ``ground_truth[i]`` its boxes.
    """
    if len(predictions) != len(ground_truth):
        raise ValueError(f"{len(predictions)} prediction lists for {len(ground_truth)} images")
    preds: list[tuple[np.ndarray, np.ndarray]] = []
    for p in predictions:
        if isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], np.ndarray):
            preds.append((boxes_array(p[0]), np.asarray(p[1], dtype=np.float64).reshape(-1)))
        else:
            preds.append((boxes_array(p), np.asarray([b.score for b in p], dtype=np.float64)))
    gts = [boxes_array(g) for g in ground_truth]

    recall, precision, scores, gt_flags = _pr_curve(preds, gts, iou_threshold)
    n_gt = sum(len(g) for g in gts)
    n_pred = len(scores)
    tp = int(sum(f.sum() for f in gt_flags))

    matched = np.concatenate(gt_flags) if gt_flags else np.zeros(0, dtype=bool)
    all_gt = np.concatenate(gts) if gts else np.zeros((0, 4))
    short = np.minimum(all_gt[:, 2] - all_gt[:, 0], all_gt[:, 3] - all_gt[:, 1])
    by_size: dict[str, dict[str, float]] = {}
    for label, lo, hi in size_buckets:
        sel = (short >= lo) & (short < hi)
        n = int(sel.sum())
        by_size[label] = {"recall": float(matched[sel].mean()) if n else float("nan"), "num_gt": n}

    map50_95 = None
    if with_map50_95:
        aps = [average_precision(*_pr_curve(preds, gts, t)[:2]) for t in COCO_IOUS]
        map50_95 = float(np.mean(aps))

    return DetectionMetrics(
        num_images=len(gts),
        num_gt=n_gt,
        num_pred=n_pred,
        true_positives=tp,
        recall=tp / n_gt if n_gt else float("nan"),
        precision=tp / n_pred if n_pred else float("nan"),
        ap50=average_precision(recall, precision) if n_gt else float("nan"),
        map50_95=map50_95,
        recall_by_size=by_size,
        pr_recall=recall,
        pr_precision=precision,
        pr_scores=scores,
    )
