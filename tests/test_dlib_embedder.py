"""DlibEmbedder: our reader + torch network must reproduce dlib's own descriptors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from skimage import data

from models.embedders.dlib_dat import Conv, FullyConnected, InputRGB, read_dlib_dnn
from models.errors import ModelInputError, WeightsNotFoundError
from models.types import FaceBox
from models.weights_locator import package_model_file

dlib = pytest.importorskip("dlib")

from models.embedders.dlib_resnet import DlibEmbedder  # noqa: E402
from models.landmarks import LandmarkDetector, load_box_map  # noqa: E402

WEIGHTS = "dlib_face_recognition_resnet_model_v1.dat"
ASTRONAUT_FACE = (175, 76, 265, 166)  # dlib HOG box (inclusive corners)


@pytest.fixture(scope="module")
def weights_path():
    return package_model_file(WEIGHTS)


@pytest.fixture(scope="module")
def embedder():
    # fp32 on every CPU: this module checks that we reproduce dlib's own (fp32) maths.
    # "auto" would pick bf16 on CPUs with native bf16 (AVX512-BF16/AMX), which moves
    # descriptors by ~2e-3 (test_bf16_only_where_the_cpu_has_it)
    e = DlibEmbedder(precision="fp32")
    e.load()
    return e


@pytest.fixture(scope="module")
def chips():
    """Three 150x150 chips: a dlib-aligned face, noise and a cat."""
    sp = dlib.shape_predictor(str(package_model_file("shape_predictor_5_face_landmarks.dat")))
    img = data.astronaut()
    shape = sp(img, dlib.rectangle(*ASTRONAUT_FACE))
    rng = np.random.default_rng(0)
    return np.stack(
        [
            dlib.get_face_chip(img, shape, 150, 0.25),
            rng.integers(0, 256, (150, 150, 3), dtype=np.uint8),
            np.ascontiguousarray(data.chelsea()[50:200, 100:250]),
        ]
    )


def test_reader_finds_dlibs_architecture(weights_path):
    net = read_dlib_dnn(weights_path)
    assert net.loss == "loss_metric_2"
    inp = net.layers[0]
    assert isinstance(inp, InputRGB) and inp.size == (150, 150)
    assert inp.mean == pytest.approx((122.782, 117.001, 104.298), abs=1e-3)
    convs = [l for l in net.layers if isinstance(l, Conv)]
    assert len(convs) == 29
    assert convs[0].weight.shape == (32, 3, 7, 7) and convs[0].stride == (2, 2)
    fc = net.layers[-1]
    assert isinstance(fc, FullyConnected) and fc.weight.shape == (128, 256) and fc.bias is None


def test_descriptors_match_dlib(weights_path, embedder, chips):
    ref = np.array([np.array(dlib.face_recognition_model_v1(str(weights_path)).compute_face_descriptor(c)) for c in chips])
    ours = embedder.descriptors(chips)
    assert ours.shape == (3, 128) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() < 1e-4  # measured ~4e-7
    unit = embedder.embed_chips(chips)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(unit, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-5)


def test_embed_aligns_like_dlib_from_a_bare_box(embedder, chips):
    """A box without landmarks gets dlib landmarks + alignment -> dlib's own chip."""
    img = data.astronaut()
    l, t, r, b = ASTRONAUT_FACE
    e_default = DlibEmbedder(landmark_detector=LandmarkDetector(box_map_path=None), precision="fp32")
    v = e_default.embed(img, [FaceBox(l, t, r + 1, b + 1)])
    assert v.shape == (1, 128) and v.dtype == np.float32
    assert np.linalg.norm(v[0]) == pytest.approx(1.0, abs=1e-5)
    ref = embedder.embed_chips(chips[:1])[0]
    assert float(v[0] @ ref) > 0.9999
    # unaligned square crops of the same face are clearly different vectors
    square = DlibEmbedder(align=False).embed(img, [FaceBox(l, t, r + 1, b + 1)])[0]
    assert float(square @ ref) < float(v[0] @ ref)


def test_same_face_is_closer_than_other_faces(embedder):
    img = data.astronaut()
    l, t, r, b = ASTRONAUT_FACE
    box = FaceBox(l, t, r + 1, b + 1)
    a = embedder.embed(img, [box])[0]
    # the same face, shifted and rescaled in a new photo
    import cv2

    img2 = cv2.resize(img, None, fx=0.8, fy=0.8, interpolation=cv2.INTER_AREA)
    box2 = FaceBox(l * 0.8 + 3, t * 0.8 - 2, (r + 1) * 0.8 + 3, (b + 1) * 0.8 - 2)
    same = embedder.embed(img2, [box2])[0]
    # a random other face-sized patch (the cat) as "someone else"
    other = embedder.embed(data.chelsea(), [FaceBox(100, 50, 250, 200)])[0]
    assert float(a @ same) > 0.99  # measured 0.997
    assert float(a @ other) < 0.95  # measured 0.875 (dlib vectors share a large mean)


LFW = __import__("pathlib").Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lfw"


@pytest.mark.data
@pytest.mark.skipif(not (LFW / "pairs.txt").is_file(), reason="needs ../shared/data/lfw")
def test_lfw_same_pairs_score_higher_than_different_pairs(embedder):
    """A few LFW View 2 pairs of fold 1 (train identities): the ranking must work."""
    import cv2

    from models.evaluation.verification import lfw_image_path, parse_lfw_pairs, roc_auc

    pairs = [p for p in parse_lfw_pairs(LFW / "pairs.txt") if p.fold == 0]
    pairs = pairs[:15] + pairs[300:315]  # 15 same, 15 different

    def chip(name: str, idx: int) -> np.ndarray:
        img = cv2.cvtColor(cv2.imread(str(lfw_image_path(LFW / "lfw-deepfunneled", name, idx))), cv2.COLOR_BGR2RGB)
        # deep-funneled LFW: the subject's face is centred, about 110 px
        return embedder.chips(img, [FaceBox(70, 70, 180, 180)])[0]

    chips_a = np.stack([chip(p.name_a, p.index_a) for p in pairs])
    chips_b = np.stack([chip(p.name_b, p.index_b) for p in pairs])
    scores = np.sum(embedder.embed_chips(chips_a) * embedder.embed_chips(chips_b), axis=1)
    assert roc_auc(scores, [p.same for p in pairs]) > 0.95


def test_flip_option_averages_the_mirrored_face(embedder):
    img = data.astronaut()
    l, t, r, b = ASTRONAUT_FACE
    box = FaceBox(l, t, r + 1, b + 1)
    flip = DlibEmbedder(flip=True, landmark_detector=embedder.landmark_detector)
    v = flip.embed(img, [box])[0]
    plain = embedder.embed(img, [box])[0]
    mirrored = embedder.embed(np.ascontiguousarray(img[:, ::-1]), [FaceBox(img.shape[1] - r - 1, t, img.shape[1] - l, b + 1)])[0]
    expected = (plain + mirrored) / np.linalg.norm(plain + mirrored)
    assert float(v @ expected) > 0.999
    assert flip.version == embedder.version + "-flip"
    # each variant carries its own measured operating threshold
    assert 0.5 < embedder.match_threshold < 1 and flip.match_threshold == DlibEmbedder.FLIP_MATCH_THRESHOLD


def test_version_and_errors(embedder, tmp_path):
    assert embedder.name == "dlib" and embedder.dim == 128
    assert embedder.version.startswith("dlib-") and len(embedder.version) == len("dlib-") + 12
    with pytest.raises(WeightsNotFoundError) as err:
        DlibEmbedder(weights_path=tmp_path / "missing.dat").load()
    assert "missing.dat" in str(err.value) and "pip install" in str(err.value)
    with pytest.raises(ModelInputError):
        embedder.descriptors(np.zeros((1, 112, 112, 3), dtype=np.uint8))
    assert embedder.embed(data.astronaut(), []).shape == (0, 128)


def test_landmarks_order_and_box_map(tmp_path):
    img = data.astronaut()
    l, t, r, b = ASTRONAUT_FACE
    det = LandmarkDetector(box_map_path=None)
    (face,) = det.predict(img, [FaceBox(l, t, r + 1, b + 1, 0.9)])
    lm = face.landmarks
    assert lm.shape == (5, 2) and lm.dtype == np.float32
    assert face.as_tuple() == (l, t, r + 1, b + 1) and face.score == 0.9
    # dlib order: parts 0/1 are the eye on the image's right, 2/3 the left one
    assert lm[0, 0] > lm[1, 0] > lm[3, 0] > lm[2, 0]
    assert lm[4, 1] > lm[:4, 1].max()  # nose below the eyes
    # a stored map is read and applied before the predictor
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"map": {"dx": 0.1, "dy": -0.05, "sw": 0.9, "sh": 0.8}}))
    cal, info = load_box_map(path)
    assert (cal.dx, cal.dy, cal.sw, cal.sh) == (0.1, -0.05, 0.9, 0.8) and info
    mapped = LandmarkDetector(box_map_path=path)
    mapped.load()
    x1, y1, x2, y2 = mapped.dlib_rect_for(FaceBox(0, 0, 100, 200))
    assert (x1, y1, x2, y2) == (15, 10, 104, 169)  # centre (60, 90), size 90x160
    assert load_box_map(tmp_path / "absent.json")[0].is_identity
    # only_missing keeps landmarks a box already has
    given = FaceBox(l, t, r + 1, b + 1, landmarks=np.zeros((5, 2), np.float32))
    kept, filled = det.predict(img, [given, FaceBox(l, t, r + 1, b + 1)], only_missing=True)
    assert np.all(kept.landmarks == 0) and np.allclose(filled.landmarks, lm)


def test_package_model_file_names_the_missing_file():
    with pytest.raises(WeightsNotFoundError) as err:
        package_model_file("no_such_model.dat")
    assert "no_such_model.dat" in str(err.value)
    assert "pip install face_recognition_models==0.3.0" in str(err.value)
    assert package_model_file(WEIGHTS).stat().st_size > 20_000_000


def test_embed_many_equals_embedding_photo_by_photo(embedder):
    """All faces and mirrors of several photos in one pass give each photo's own vectors."""
    import cv2

    flip = DlibEmbedder(flip=True, landmark_detector=embedder.landmark_detector)
    img = data.astronaut()
    l, t, r, b = ASTRONAUT_FACE
    small = cv2.resize(img, None, fx=0.7, fy=0.7, interpolation=cv2.INTER_AREA)
    items = [
        (img, [FaceBox(l, t, r + 1, b + 1)]),
        (data.chelsea(), []),  # a photo without faces keeps its place
        (small, [FaceBox(l * 0.7, t * 0.7, (r + 1) * 0.7, (b + 1) * 0.7), FaceBox(10, 10, 80, 80)]),
    ]
    together = flip.embed_many(items)
    assert [v.shape for v in together] == [(1, 128), (0, 128), (2, 128)]
    for (image, boxes), vecs in zip(items, together, strict=True):
        np.testing.assert_allclose(vecs, flip.embed(image, boxes), atol=1e-5)


def test_fast_alignment_embeds_like_the_exact_one(embedder):
    img = data.astronaut()
    l, t, r, b = ASTRONAUT_FACE
    box = FaceBox(l, t, r + 1, b + 1)
    exact = DlibEmbedder(landmark_detector=embedder.landmark_detector, fast_align=False).embed(img, [box])[0]
    fast = DlibEmbedder(landmark_detector=embedder.landmark_detector, fast_align=True).embed(img, [box])[0]
    assert float(exact @ fast) > 0.999


def test_bf16_only_where_the_cpu_has_it(embedder, chips):
    from models.base import cpu_has_native_bf16

    auto = DlibEmbedder(landmark_detector=embedder.landmark_detector)
    assert auto.bf16 == cpu_has_native_bf16()
    assert not DlibEmbedder(landmark_detector=embedder.landmark_detector, precision="fp32").bf16
    with pytest.raises(ValueError, match="precision"):
        DlibEmbedder(precision="fp16")
    # forced bf16 (emulated on CPUs without it, so only a few chips): close to fp32
    forced = DlibEmbedder(landmark_detector=embedder.landmark_detector, precision="bf16")
    got, want = forced.embed_chips(chips[:2]), embedder.embed_chips(chips[:2])
    assert np.min(np.sum(got * want, axis=1)) > 0.9999  # measured 0.99997-0.99998 (Zen 4, native bf16)
    assert not np.array_equal(got, want)  # bf16 really ran: the fixture is fp32
