"""Detection metrics on synthetic boxes small enough to check by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.evaluation.detection import (
    average_precision,
    evaluate_detections,
    iou_matrix,
    load_voc_split,
    match_greedy,
    parse_voc_xml,
)
from models.types import FaceBox

VOC_XML = """<annotation>
  <filename>img1.jpg</filename>
  <size><width>40</width><height>30</height><depth>3</depth></size>
  <object><name>with_mask</name><difficult>0</difficult>
    <bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax><ymax>20</ymax></bndbox></object>
  <object><name>without_mask</name>
    <bndbox><xmin>21</xmin><ymin>5</ymin><xmax>40</xmax><ymax>30</ymax></bndbox></object>
</annotation>
"""


def box(x1, y1, x2, y2, score=1.0) -> FaceBox:
    return FaceBox(float(x1), float(y1), float(x2), float(y2), score)


def test_iou_matrix_hand_values():
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 5, 5]])
    np.testing.assert_allclose(iou_matrix(a, b), [[1.0, 50 / 150, 0.0, 25 / 100]])
    assert iou_matrix(np.zeros((0, 4)), b).shape == (0, 4)


def test_parse_voc_xml_maps_inclusive_one_based_to_half_open(tmp_path):
    p = tmp_path / "img1.xml"
    p.write_text(VOC_XML)
    ann = parse_voc_xml(p)
    assert (ann.width, ann.height, ann.filename) == (40, 30, "img1.jpg")
    # xmin=1..xmax=10 inclusive is 10 pixels wide: [0, 10); xmax=40 on a 40-px image -> 40.
    np.testing.assert_array_equal(ann.boxes, [[0, 0, 10, 20], [20, 4, 40, 30]])
    assert ann.labels == ("with_mask", "without_mask")


def test_load_voc_split_reads_listed_stems_only(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "images").mkdir()
    for stem in ("a", "b"):
        (tmp_path / "annotations" / f"{stem}.xml").write_text(VOC_XML.replace("img1.jpg", f"{stem}.jpg"))
    (tmp_path / "val.txt").write_text("b\n")
    items = load_voc_split(tmp_path, "val")
    assert [(p.name, a.stem) for p, a in items] == [("b.jpg", "b")]


def test_match_greedy_highest_score_wins_duplicates():
    gt = np.array([[0, 0, 10, 10]])
    preds = np.array([[0, 0, 10, 9], [0, 0, 10, 10]])
    pred_to_gt, gt_matched = match_greedy(preds, np.array([0.9, 0.5]), gt)
    # The better-placed box scores lower, so it is the duplicate (false positive).
    assert pred_to_gt.tolist() == [0, -1]
    assert gt_matched.tolist() == [True]


def test_match_greedy_takes_best_unmatched_gt_and_respects_threshold():
    gt = np.array([[0, 0, 10, 10], [4, 0, 14, 10]])
    preds = np.array([[4, 0, 14, 10], [3, 0, 13, 10], [50, 50, 60, 60]])
    pred_to_gt, _ = match_greedy(preds, np.array([0.9, 0.8, 0.7]), gt)
    # Pred 0 takes gt 1 (IoU 1). Pred 1 overlaps gt 1 most (IoU 9/11) but it is taken,
    # so it takes gt 0 (IoU 7/13 = 0.54, still >= 0.5; VOC's devkit would call it a
    # false positive). Pred 2 overlaps nothing.
    assert pred_to_gt.tolist() == [1, 0, -1]
    pred_to_gt, _ = match_greedy(np.array([[5, 0, 15, 10]]), np.array([1.0]), gt[:1], iou_threshold=0.5)
    assert pred_to_gt.tolist() == [-1]  # IoU 1/3


def test_average_precision_all_point():
    # Ranked TP, FP, TP with 2 ground-truth boxes: recall .5 .5 1, precision 1 .5 .667
    # -> envelope gives 0.5 * 1 + 0.5 * 2/3.
    recall = np.array([0.5, 0.5, 1.0])
    precision = np.array([1.0, 0.5, 2 / 3])
    assert average_precision(recall, precision) == pytest.approx(0.5 + 1 / 3)
    assert average_precision(np.array([1.0]), np.array([1.0])) == pytest.approx(1.0)
    assert average_precision(np.array([]), np.array([])) == 0.0


def test_evaluate_counts_recall_by_size_precision_and_ap():
    # Squares with short sides 10, 20, 40 and 100 px; the detector finds the 10 and
    # the 100 px faces, plus one false positive scored between them.
    gts = [np.array([[0, 0, 10, 10], [100, 0, 120, 20]]), np.array([[0, 0, 40, 40], [200, 200, 300, 300]])]
    preds = [
        [box(0, 0, 10, 10, 0.9), box(300, 0, 330, 30, 0.5)],
        [box(200, 200, 300, 300, 0.4)],
    ]
    m = evaluate_detections(preds, gts)
    assert (m.num_gt, m.num_pred, m.true_positives) == (4, 3, 2)
    assert m.recall == pytest.approx(0.5)
    assert m.precision == pytest.approx(2 / 3)
    # Ranked TP (.9), FP (.5), TP (.4): recall .25 .25 .5, precision 1 .5 .667.
    assert m.ap50 == pytest.approx(0.25 * 1 + 0.25 * 2 / 3)
    sizes = {k: (v["recall"], v["num_gt"]) for k, v in m.recall_by_size.items()}
    assert sizes == {"<16": (1.0, 1), "16-32": (0.0, 1), "32-64": (0.0, 1), ">=64": (1.0, 1)}


def test_evaluate_map50_95_counts_thresholds_passed():
    # One prediction at IoU 0.77 with the only face: it is a hit at IoU 0.50..0.75
    # (6 of the 10 thresholds) and a miss at 0.80..0.95, so mAP50-95 = 0.6.
    m = evaluate_detections([[box(0, 0, 100, 77, 0.9)]], [np.array([[0, 0, 100, 100]])])
    assert m.ap50 == pytest.approx(1.0)
    assert m.map50_95 == pytest.approx(0.6)


def test_evaluate_accepts_arrays_and_handles_no_detections():
    gts = [np.array([[0, 0, 10, 10]]), np.zeros((0, 4))]
    m = evaluate_detections([(np.zeros((0, 4)), np.zeros(0)), (np.array([[0, 0, 5, 5]]), np.array([0.3]))], gts)
    assert (m.recall, m.ap50, m.precision) == (0.0, 0.0, 0.0)
    m = evaluate_detections([[], []], gts, with_map50_95=False)
    assert m.recall == 0.0 and math.isnan(m.precision) and m.map50_95 is None
    with pytest.raises(ValueError):
        evaluate_detections([[]], gts)
