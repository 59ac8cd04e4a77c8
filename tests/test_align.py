"""models.align: chips must equal dlib.get_face_chip (dlib-bin) pixel for pixel."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from skimage import data

from models.align import (
    DLIB_MEAN_FACE_5,
    face_chip_details,
    face_chips,
    mirror_boxes,
    similarity_transform,
)
from models.errors import ModelInputError
from models.types import FaceBox

dlib = pytest.importorskip("dlib")


@pytest.fixture(scope="module")
def predictor():
    from models.weights_locator import package_model_file

    return dlib.shape_predictor(str(package_model_file("shape_predictor_5_face_landmarks.dat")))


def _dlib_shape(predictor, img, rect):
    shape = predictor(img, dlib.rectangle(*rect))
    return shape, np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)


# the astronaut's face as dlib's HOG detector reports it (left, top, right, bottom)
ASTRONAUT_FACE = (175, 76, 265, 166)


@pytest.mark.parametrize(
    "scale,angle",
    [(1.0, 0.0), (0.6, 0.0), (1.0, 25.0), (3.0, -10.0)],  # 3x: dlib's pyramid path
)
def test_chips_equal_dlib_get_face_chip(predictor, scale, angle):
    img = data.astronaut()
    h, w = img.shape[:2]
    # scale and rotate the whole photo so the face is seen at another size and tilt
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    m[:, 2] += (np.array([w, h]) * (scale - 1)) / 2
    out_size = (int(w * scale), int(h * scale))
    img2 = np.ascontiguousarray(cv2.warpAffine(img, m, out_size))
    centre = m @ np.array([(ASTRONAUT_FACE[0] + ASTRONAUT_FACE[2]) / 2, (ASTRONAUT_FACE[1] + ASTRONAUT_FACE[3]) / 2, 1])
    half = (ASTRONAUT_FACE[2] - ASTRONAUT_FACE[0]) / 2 * scale
    rect = tuple(int(v) for v in (centre[0] - half, centre[1] - half, centre[0] + half, centre[1] + half))
    shape, lm = _dlib_shape(predictor, img2, rect)

    for size, padding in [(150, 0.25), (112, 0.1)]:
        ref = dlib.get_face_chip(img2, shape, size, padding)
        ours = face_chips(img2, [FaceBox(*rect, landmarks=lm)], size=size, padding=padding)[0]
        assert ours.shape == ref.shape == (size, size, 3)
        diff = np.abs(ours.astype(int) - ref.astype(int))
        # measured: identical; allow float rounding to flip a truncation here and there
        assert diff.max() <= 1, f"max diff {diff.max()}"
        assert (diff > 0).mean() < 0.001


def test_similarity_transform_recovers_a_known_transform():
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 100, size=(5, 2))
    a = np.deg2rad(17.0)
    s = 2.3
    true = np.array([[s * np.cos(a), -s * np.sin(a), 12.0], [s * np.sin(a), s * np.cos(a), -7.0]])
    dst = src @ true[:, :2].T + true[:, 2]
    np.testing.assert_allclose(similarity_transform(src, dst), true, atol=1e-9)


def test_chip_details_put_mean_face_landmarks_where_dlib_expects_them():
    # landmarks exactly on the padded mean face of a 150 px chip -> identity geometry
    size, padding = 150, 0.25
    lm = (padding + DLIB_MEAN_FACE_5) / (2 * padding + 1) * size
    cd = face_chip_details(lm, size, padding)
    assert cd.angle == pytest.approx(0.0, abs=1e-9)
    assert cd.right - cd.left + 1 == pytest.approx(size)
    assert ((cd.left + cd.right) / 2, (cd.top + cd.bottom) / 2) == pytest.approx((75.0, 75.0))


def test_square_crop_without_landmarks_frames_the_box():
    img = np.zeros((300, 400, 3), dtype=np.uint8)
    img[100:200, 150:250] = (255, 0, 0)  # a red 100x100 "face"
    chip = face_chips(img, [FaceBox(150, 100, 250, 200)], size=150, padding=0.25)[0]
    # the box is the central 1/(1+2*0.25) = 2/3 of the chip: 100 px of 150
    red = (chip[:, :, 0] > 128) & (chip[:, :, 1] < 64)
    rows, cols = np.nonzero(red)
    assert 98 <= rows.max() - rows.min() + 1 <= 102
    assert 98 <= cols.max() - cols.min() + 1 <= 102
    assert abs((rows.min() + rows.max()) / 2 - 74.5) <= 1
    assert abs((cols.min() + cols.max()) / 2 - 74.5) <= 1


def test_faces_outside_the_image_give_black_chips_and_bad_input_raises():
    img = data.astronaut()
    chips = face_chips(img, [FaceBox(5000, 5000, 5100, 5100), FaceBox(-60, -60, 40, 40)])
    assert chips.shape == (2, 150, 150, 3) and chips.dtype == np.uint8
    assert chips[0].max() == 0
    assert chips[1].max() > 0  # partly inside: some pixels, black elsewhere
    assert chips[1][0, 0].max() == 0
    with pytest.raises(ModelInputError):
        face_chips(img[:, :, 0], [FaceBox(0, 0, 10, 10)])
    with pytest.raises(ModelInputError):
        face_chips(img, [FaceBox(10, 10, 10, 20)])
    assert face_chips(img, []).shape == (0, 150, 150, 3)


def test_mirrored_face_aligns_to_the_mirrored_chip(predictor):
    img = data.astronaut()
    shape, lm = _dlib_shape(predictor, img, ASTRONAUT_FACE)
    box = FaceBox(*ASTRONAUT_FACE, landmarks=lm)
    mirrored = np.ascontiguousarray(img[:, ::-1])
    (mbox,) = mirror_boxes([box], img.shape[1])
    # the mirrored landmarks are what dlib finds on the mirrored photo, in dlib's order
    _, lm_m = _dlib_shape(predictor, mirrored, (round(mbox.x1), round(mbox.y1), round(mbox.x2), round(mbox.y2)))
    assert np.abs(lm_m - mbox.landmarks).max() <= 3.0
    a = face_chips(img, [box])[0].astype(float)
    b = face_chips(mirrored, [mbox])[0][:, ::-1].astype(float)
    # dlib's mean face is almost symmetric, so the two chips nearly coincide
    assert np.abs(a - b).mean() < 12


@pytest.mark.parametrize("scale", [0.6, 1.0, 2.5, 5.0])  # 2.5 and 5: one and two pyramid steps
def test_fast_chips_are_within_a_few_grey_levels_of_dlibs(predictor, scale):
    from models.align import face_chips_fast

    img = cv2.resize(data.astronaut(), None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    rect = tuple(int(round(v * scale)) for v in ASTRONAUT_FACE)
    _, pts = _dlib_shape(predictor, img, rect)
    box = FaceBox(rect[0], rect[1], rect[2] + 1, rect[3] + 1, 1.0, pts)
    exact, fast = face_chips(img, [box])[0].astype(int), face_chips_fast(img, [box])[0].astype(int)
    diff = np.abs(exact - fast)
    # dlib truncates where OpenCV rounds, once per pyramid step and once when sampling:
    # measured mean 0.45 (no step) to 1.5 (two steps)
    assert diff.mean() < 2.0 and np.percentile(diff, 99) <= 4, (diff.mean(), np.percentile(diff, 99))
    # the mirrored pass equals aligning the mirrored image
    mirrored = face_chips(np.ascontiguousarray(img[:, ::-1]), mirror_boxes([box], img.shape[1]))[0].astype(int)
    assert np.abs(mirrored - face_chips_fast(img, [box], mirrored=True)[0]).mean() < 2.0
    # a face outside the image is black on both paths
    off = FaceBox(-500, -500, -400, -400, 1.0)
    assert not face_chips_fast(img, [off]).any()
