"""Training-data helpers of our YOLO detector on generated points and boxes."""

from __future__ import annotations

import numpy as np
import pytest

from models.training.detector_data import (
    PointBoxMap,
    fill_regions,
    fit_point_box_map,
    fit_webfaces_map,
    match_points_to_detections,
    parse_webfaces,
    uncertain_regions,
    webfaces_labels,
)


def face_points(cx: float, cy: float, s: float) -> np.ndarray:
    """Left eye, right eye, nose, mouth of an upright face of eye distance ``s``."""
    return np.array([[cx - s / 2, cy], [cx + s / 2, cy], [cx, cy + 0.5 * s], [cx, cy + 0.9 * s]])


def test_fit_recovers_a_known_map_despite_outliers():
    rng = np.random.default_rng(0)
    true = PointBoxMap("norm", dx=0.02, dy=0.15, sw=1.4, sh=1.7)
    pts = np.stack([face_points(*rng.uniform(50, 400, 2), rng.uniform(10, 80)) for _ in range(200)])
    boxes = true.apply(pts)
    boxes[:10] += rng.uniform(-40, 40, (10, 4))  # a few bad target boxes
    fitted = fit_point_box_map(pts, boxes, "norm")
    assert fitted.dx == pytest.approx(true.dx, abs=1e-6)
    assert fitted.sw == pytest.approx(true.sw, rel=1e-6)
    assert fitted.sh == pytest.approx(true.sh, rel=1e-6)


def test_match_needs_all_points_inside_and_a_high_score():
    pts = np.stack([face_points(100, 100, 20), face_points(300, 100, 20)])
    boxes = np.array([[80, 80, 120, 130], [280, 80, 320, 130], [85, 85, 110, 100]], dtype=np.float64)
    assert match_points_to_detections(pts, boxes, np.array([0.9, 0.3, 0.9]), 0.7) == [(0, 0)]
    assert sorted(match_points_to_detections(pts, boxes, np.array([0.9, 0.9, 0.9]), 0.7)) == [(0, 0), (1, 1)]


def test_webfaces_map_fit_and_heldout_report(tmp_path):
    rng = np.random.default_rng(1)
    true = PointBoxMap("norm", dx=0.0, dy=0.2, sw=1.3, sh=1.6)
    webfaces, dets = {}, {}
    for i in range(50):
        pts = np.stack([face_points(*rng.uniform(60, 300, 2), rng.uniform(15, 40))])
        webfaces[f"img{i}"] = pts
        dets[f"img{i}"] = (true.apply(pts) + rng.normal(0, 0.5, (1, 4)), np.array([0.95]))
    rep = fit_webfaces_map(webfaces, dets, min_score=0.7, seed=0)
    assert rep.fit_pairs == 40 and rep.heldout_pairs == 10
    assert rep.heldout_mean_iou > 0.95 and rep.heldout_frac_iou_05 == 1.0


def test_webfaces_labels_add_unannotated_confident_faces_and_fill_uncertain_ones():
    pts = np.stack([face_points(100, 100, 20)])
    m = PointBoxMap("eye", dx=0, dy=0.4, sw=1.6, sh=2.0)
    boxes = np.array([[82, 78, 118, 126],  # the annotated face (contains its points)
                      [300, 50, 340, 100],  # confident, not annotated: added
                      [400, 50, 420, 75]], dtype=np.float64)  # uncertain: filled
    labels, fill, added = webfaces_labels(pts, boxes, np.array([0.95, 0.9, 0.4]), m, 0.7)
    assert added == 1 and len(labels) == 2
    np.testing.assert_allclose(labels[1], boxes[1])
    np.testing.assert_allclose(fill, boxes[2:3])
    assert len(uncertain_regions(labels, boxes, np.array([0.95, 0.9, 0.4]), 0.3)) == 0


def test_fill_regions_paints_mean_colour_only_inside():
    img = np.zeros((10, 10, 3), np.uint8)
    img[:, 5:] = 200
    out = fill_regions(img, np.array([[0, 0, 2, 2]]))
    assert (out[:2, :2] == 100).all() and (out[2:, :5] == 0).all() and (img[:2, :2] == 0).all()


def test_parse_webfaces_groups_faces_per_existing_image(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    gt = tmp_path / "gt.txt"
    gt.write_text("a.jpg 1 2 3 4 5 6 7 8\na.jpg 9 9 9 9 9 9 9 9\nmissing.jpg 1 1 1 1 1 1 1 1\n")
    out = parse_webfaces(gt, tmp_path)
    assert list(out) == [str(tmp_path / "a.jpg")] and out[str(tmp_path / "a.jpg")].shape == (2, 4, 2)
