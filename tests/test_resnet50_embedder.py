"""ResNet50Embedder: checkpoint format, loading, normalised batched output, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data

from models.embedders.resnet50 import (
    CHECKPOINT_FORMAT,
    DEFAULT_META,
    ResNet50Embedder,
    build_net,
    export_onnx,
    save_checkpoint,
)
from models.errors import ModelInputError, WeightsNotFoundError
from models.types import FaceBox

META = {**DEFAULT_META, "input_size": 48}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint in the trainer's format (weights are the fresh net's; the training
    test checks a trained one). BN running stats are nudged so eval mode is non-trivial."""
    torch.manual_seed(0)
    net = build_net(META)
    net.train()
    with torch.no_grad():
        net(torch.randn(8, 3, 48, 48))
    return save_checkpoint(net, {**META, "training": {"note": "test fixture"}}, tmp_path_factory.mktemp("ck") / "r50.pt")


def test_missing_checkpoint_raises_weights_not_found(tmp_path):
    emb = ResNet50Embedder(checkpoint=tmp_path / "nope.pt", device="cpu")
    with pytest.raises(WeightsNotFoundError) as err:
        emb.embed(data.astronaut(), [FaceBox(160, 40, 260, 160)])
    assert "nope.pt" in str(err.value) and "train embedder" in str(err.value)
    assert not emb.loaded


def test_wrong_file_is_refused(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"format": "something-else", "state_dict": {}}, bad)
    with pytest.raises(ModelInputError):
        ResNet50Embedder(checkpoint=bad, device="cpu").load()


def test_checkpoint_is_fp16_with_metadata(checkpoint):
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert payload["format"] == CHECKPOINT_FORMAT
    floats = [v for v in payload["state_dict"].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    assert payload["meta"]["input_size"] == 48 and payload["meta"]["embedding_dim"] == 512


def test_embeddings_are_unit_512d_and_batch_independent(checkpoint):
    emb = ResNet50Embedder(checkpoint=checkpoint, device="cpu", batch_size=3)
    rng = np.random.default_rng(0)
    chips = rng.integers(0, 256, size=(5, 60, 60, 3), dtype=np.uint8)
    out = emb.embed_chips(chips)
    assert out.shape == (5, 512) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    # eval mode: a chip's vector does not depend on its batch-mates
    alone = emb.embed_chips(chips[3:4])
    np.testing.assert_allclose(alone[0], out[3], atol=1e-5)
    # different inputs give different vectors
    assert float(out[0] @ out[1]) < 0.9999
    assert emb.version.startswith("resnet50-") and len(emb.version) == len("resnet50-") + 12


def test_embed_uses_shared_alignment(checkpoint):
    emb = ResNet50Embedder(checkpoint=checkpoint, device="cpu")
    image = data.astronaut()
    boxes = [FaceBox(170, 40, 260, 150), FaceBox(0, 0, 60, 60)]
    out = emb.embed(image, boxes)
    assert out.shape == (2, 512)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    from models.align import face_chips

    chips = face_chips(image, boxes, size=48, padding=0.25)
    np.testing.assert_allclose(out, emb.embed_chips(chips), atol=1e-6)
    assert emb.embed(image, []).shape == (0, 512)


def test_onnx_export_matches_torch(checkpoint, tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    path = export_onnx(checkpoint, tmp_path / "r50.onnx")
    # the ONNX graph is fp32; "auto" would run torch in bf16 on CPUs with native bf16
    emb = ResNet50Embedder(checkpoint=checkpoint, device="cpu", precision="fp32")
    chips = np.random.default_rng(1).integers(0, 256, size=(2, 48, 48, 3), dtype=np.uint8)
    from models.embedders.resnet50 import chips_to_tensor

    x = chips_to_tensor(chips, 48, META["mean"], META["std"]).numpy()
    y = ort.InferenceSession(str(path)).run(None, {"chips": x})[0]
    np.testing.assert_allclose(y, emb.embed_chips(chips), atol=1e-4)
