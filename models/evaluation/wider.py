"""WIDER FACE val evaluation, the official protocol (easy / medium / hard AP).

This follows the reference Python port of the official MATLAB code
(``widerface_evaluate/evaluation.py`` in biubug6/Pytorch_Retinaface, the repository the
ground truth comes from) step by step; only the loops are vectorised:

* Ground truth: ``wider_face_val.mat`` holds every annotated box per image (x, y, w, h);
  ``wider_{easy,medium,hard}_val.mat`` hold, per image, the 1-based indices of the boxes
  a setting *counts* (``gt_list``, the "keep list"). The other boxes stay in the image:
  a prediction whose best match is one of them is ignored (neither a true nor a false
  positive), so finding a face a setting does not count costs nothing.
* Scores are min-max normalised over ALL predictions of the whole set (so a detector's
  score scale does not matter, only its ranking).
* Per image, predictions in descending score order: each takes the ground-truth box of
  highest IoU (boxes as x, y, w, h with the "+1 pixel" convention: a box covers pixels
  x .. x+w inclusive, so its area is (w+1)(h+1)). IoU >= 0.5 with a counted box: that box
  is recalled (once; a second prediction on it is still a proposal, i.e. a false
  positive). IoU >= 0.5 with an uncounted box: the prediction is dropped from the
  proposals. Otherwise: a false positive.
* Precision/recall at 1000 thresholds ``t = 1 - k/1000`` (k = 1..1000) summed over images;
  recall's denominator is the number of counted faces of the whole set (images without
  predictions included).
* AP: VOC all-point interpolation over those 1000 points
  (``models.evaluation.detection.average_precision``, the same formula).

The +1 convention is why ``iou_matrix`` (half-open boxes) is called on boxes widened by
one pixel: ``min(x2a, x2b) + 1 - max(x1a, x1b)`` is exactly the official intersection.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.boxes import iou_matrix
from models.evaluation.detection import average_precision

SETTINGS: tuple[str, ...] = ("easy", "medium", "hard")
THRESH_NUM = 1000
IOU_THRESHOLD = 0.5


@dataclass(frozen=True)
class WiderImage:
    """One WIDER val image: ``key`` is ``"<event>/<file stem>"``."""

    event: str
    stem: str
    boxes: np.ndarray  # (N, 4) float64 x, y, w, h as in the .mat file
    keep: Mapping[str, np.ndarray]  # setting -> 0-based indices of the counted boxes

    @property
    def key(self) -> str:
        return f"{self.event}/{self.stem}"


def load_wider_ground_truth(gt_dir: Path | str) -> list[WiderImage]:
    """Read the four official ``.mat`` files from ``gt_dir`` (3,226 images for val)."""
    from scipy.io import loadmat

    gt_dir = Path(gt_dir)
    missing = [n for n in ("wider_face_val.mat", *(f"wider_{s}_val.mat" for s in SETTINGS)) if not (gt_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(f"WIDER ground truth incomplete in {gt_dir}: missing {', '.join(missing)}")
    full = loadmat(str(gt_dir / "wider_face_val.mat"))
    keep_lists = {s: loadmat(str(gt_dir / f"wider_{s}_val.mat"))["gt_list"] for s in SETTINGS}
    images: list[WiderImage] = []
    for i in range(len(full["event_list"])):
        event = str(full["event_list"][i][0][0])
        files = full["file_list"][i][0]
        boxes = full["face_bbx_list"][i][0]
        for j in range(len(files)):
            keep = {}
            for s in SETTINGS:
                idx = np.asarray(keep_lists[s][i][0][j][0], dtype=np.int64).reshape(-1)
                keep[s] = idx - 1  # the .mat lists are 1-based
            images.append(
                WiderImage(event, str(files[j][0][0]), np.asarray(boxes[j][0], dtype=np.float64).reshape(-1, 4), keep)
            )
    return images


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """Our half-open (x1, y1, x2, y2) -> WIDER's (x, y, w, h) with w = x2 - x1, as the
    reference detectors' result writers do."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)


def iou_plus_one(pred_xywh: np.ndarray, gt_xywh: np.ndarray) -> np.ndarray:
    """The official overlap of (x, y, w, h) boxes: corners x..x+w inclusive."""

    def widened(b: np.ndarray) -> np.ndarray:
        b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
        return np.stack([b[:, 0], b[:, 1], b[:, 0] + b[:, 2] + 1.0, b[:, 1] + b[:, 3] + 1.0], axis=1)

    return iou_matrix(widened(pred_xywh), widened(gt_xywh))


def image_eval(
    pred_xywh: np.ndarray, gt_xywh: np.ndarray, counted: np.ndarray, iou_threshold: float = IOU_THRESHOLD
) -> tuple[np.ndarray, np.ndarray]:
    """One image, predictions already in descending score order.

    Returns ``(pred_recall, proposal)``: after prediction h, how many counted boxes are
    recalled; and whether prediction h is a proposal (False: it matched an uncounted box).
    """
    n_pred = len(pred_xywh)
    overlaps = iou_plus_one(pred_xywh, gt_xywh)
    best = overlaps.argmax(axis=1)
    best_iou = overlaps[np.arange(n_pred), best]
    is_counted = np.zeros(len(gt_xywh), dtype=bool)
    is_counted[counted] = True
    recalled = np.zeros(len(gt_xywh), dtype=bool)
    proposal = np.ones(n_pred, dtype=bool)
    pred_recall = np.zeros(n_pred, dtype=np.int64)
    hits = 0
    for h in range(n_pred):
        if best_iou[h] >= iou_threshold:
            g = best[h]
            if not is_counted[g]:
                proposal[h] = False
            elif not recalled[g]:
                recalled[g] = True
                hits += 1
        pred_recall[h] = hits
    return pred_recall, proposal


def thresholds(thresh_num: int = THRESH_NUM) -> np.ndarray:
    """The official thresholds, highest first: 1 - k/thresh_num for k = 1..thresh_num."""
    return 1.0 - np.arange(1, thresh_num + 1) / thresh_num


def image_pr_info(scores_desc: np.ndarray, pred_recall: np.ndarray, proposal: np.ndarray,
                  thresh_num: int = THRESH_NUM) -> np.ndarray:
    """(thresh_num, 2): proposals and recalled faces among predictions scored >= t."""
    # Number of predictions at or above each threshold (scores sorted high to low).
    n_above = np.searchsorted(-scores_desc, -thresholds(thresh_num), side="right")
    cum_prop = np.concatenate(([0], np.cumsum(proposal)))
    cum_rec = np.concatenate(([0], pred_recall))
    return np.stack([cum_prop[n_above], cum_rec[n_above]], axis=1).astype(np.float64)


def normalise_scores(scores: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Min-max normalise over every prediction of the set (official ``norm_score``,
    including its start values min = 1, max = 0: the same as plain min-max for scores in
    [0, 1], which is what our detectors return)."""
    nonempty = [s for s in scores if len(s)]
    if not nonempty:
        return [np.asarray(s, dtype=np.float64) for s in scores]
    lo = min([1.0] + [float(np.min(s)) for s in nonempty])
    hi = max([0.0] + [float(np.max(s)) for s in nonempty])
    diff = hi - lo
    if diff <= 0:  # one distinct score: the official code would divide by zero
        return [np.ones(len(s)) for s in scores]
    return [(np.asarray(s, dtype=np.float64) - lo) / diff for s in scores]


@dataclass
class WiderSettingResult:
    setting: str
    ap: float
    num_faces: int  #: counted faces (recall's denominator)
    precision: np.ndarray  #: at each of the thresholds (highest threshold first)
    recall: np.ndarray


def evaluate_wider(
    images: Sequence[WiderImage],
    predictions: Mapping[str, tuple[np.ndarray, np.ndarray]],
    settings: Sequence[str] = SETTINGS,
    iou_threshold: float = IOU_THRESHOLD,
    thresh_num: int = THRESH_NUM,
) -> dict[str, WiderSettingResult]:
    """AP per setting. ``predictions[image.key] = (boxes x1y1x2y2 (N, 4), scores (N,))``;
    an image without an entry counts as "no detections" (its faces still count)."""
    keys = [im.key for im in images]
    raw = [predictions.get(k, (np.zeros((0, 4)), np.zeros(0))) for k in keys]
    norm = normalise_scores([np.asarray(s, dtype=np.float64).reshape(-1) for _, s in raw])
    per_image = []
    for (boxes, _), scores in zip(raw, norm):
        order = np.argsort(-scores, kind="stable")
        per_image.append((xyxy_to_xywh(np.asarray(boxes).reshape(-1, 4))[order], scores[order]))

    out: dict[str, WiderSettingResult] = {}
    for setting in settings:
        pr = np.zeros((thresh_num, 2))
        count = 0
        for im, (pred, scores) in zip(images, per_image):
            counted = im.keep[setting]
            count += len(counted)
            if len(im.boxes) == 0 or len(pred) == 0:
                continue
            pred_recall, proposal = image_eval(pred, im.boxes, counted, iou_threshold)
            pr += image_pr_info(scores, pred_recall, proposal, thresh_num)
        with np.errstate(divide="ignore", invalid="ignore"):
            # 0 proposals above a threshold (possible only at the very top): precision 0,
            # where the reference code would produce NaN and a NaN AP.
            precision = np.where(pr[:, 0] > 0, pr[:, 1] / pr[:, 0], 0.0)
        recall = pr[:, 1] / max(count, 1)
        out[setting] = WiderSettingResult(setting, average_precision(recall, precision), count, precision, recall)
    return out
