"""Embedder training on CPU with tiny synthetic identities (ResNet50, a few steps)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from models.embedders.resnet50 import ResNet50Embedder
from models.errors import WeightsNotFoundError
from models.training.augment import AugmentConfig, augmentation_preview, build_train_transform, hwc_to_chw, preview_grid
from models.training.chip_data import ChipSet, identity_split, load_chipset, prepare_chipset, save_chipset
from models.training.embedder_trainer import (
    EmbedderTrainConfig,
    make_pairs,
    rank1_accuracy,
    train_embedder,
    verification_metrics,
)
from models.training.losses import ArcFaceHead, CosFaceHead, SimilarityDistillationLoss

NO_AUGMENT = AugmentConfig(hflip=0.0, rotation_p=0.0, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0),
                           color_p=0.0, grayscale_p=0.0, blur_p=0.0)


def synthetic_identities(n_ids: int = 6, per_id: int = 4, size: int = 40, teacher_dim: int = 16, seed: int = 0) -> ChipSet:
    """Each identity is a random arrangement of coloured ellipses; its chips are small
    rotations/shifts/noise of it. The teacher vector is the identity's code plus noise."""
    rng = np.random.default_rng(seed)
    codes = rng.normal(size=(n_ids, teacher_dim))
    chips, labels, teacher = [], [], []
    c = size // 2
    for k in range(n_ids):
        base = np.full((size, size, 3), rng.integers(0, 256, 3), np.uint8)
        for _ in range(4):
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            centre = (int(rng.integers(4, size - 4)), int(rng.integers(4, size - 4)))
            axes = (int(rng.integers(3, size // 3)), int(rng.integers(3, size // 3)))
            cv2.ellipse(base, centre, axes, float(rng.integers(0, 180)), 0, 360, colour, -1)
        for _ in range(per_id):
            m = cv2.getRotationMatrix2D((c, c), float(rng.normal(0, 4)), 1.0)
            m[:, 2] += rng.normal(0, 1.5, 2)
            img = cv2.warpAffine(base, m, (size, size), borderMode=cv2.BORDER_REFLECT)
            img = np.clip(img.astype(np.int16) + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
            chips.append(img)
            labels.append(k)
            teacher.append(codes[k] + rng.normal(0, 0.1, teacher_dim))
    return ChipSet(np.stack(chips), np.asarray(labels), [f"person{k}" for k in range(n_ids)],
                   np.asarray(teacher, np.float32), meta={"source": "synthetic"})


def test_margin_heads_and_distillation_loss_behave():
    torch.manual_seed(0)
    emb = torch.randn(6, 8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    for head in (ArcFaceHead(8, 3, scale=10.0, margin=0.5), CosFaceHead(8, 3, scale=10.0, margin=0.35)):
        logits = head(emb, labels)
        plain = head.cosine(emb) * head.scale
        target = logits.gather(1, labels[:, None])
        # the margin only lowers the target logit; other logits are untouched
        assert torch.all(target < plain.gather(1, labels[:, None]))
        other = torch.ones_like(logits, dtype=torch.bool).scatter_(1, labels[:, None], False)
        assert torch.allclose(logits[other], plain[other])
    loss = SimilarityDistillationLoss(8, 4)
    teacher = torch.randn(6, 4)
    with torch.no_grad():
        loss.projection.weight.copy_(torch.eye(4, 8))
    perfect = loss(torch.cat([teacher, torch.zeros(6, 4)], dim=1), teacher)
    assert perfect["loss"].item() < 1e-5
    assert loss(torch.randn(6, 8), teacher)["loss"].item() > 0.05


def test_identity_split_is_disjoint_and_seeded():
    labels = np.repeat(np.arange(20), 3)
    labels = np.concatenate([labels, [-1, -1, 20]])  # unknowns and a single-image identity train
    tr, va, tr_ids, va_ids = identity_split(labels, 0.25, seed=3)
    assert set(tr_ids).isdisjoint(va_ids) and len(va_ids) == 5
    assert set(labels[va]) == set(va_ids) and not set(labels[tr]) & set(va_ids)
    assert {-1, 20} <= set(labels[tr].tolist())
    assert identity_split(labels, 0.25, seed=3)[3] == va_ids
    assert identity_split(labels, 0.25, seed=4)[3] != va_ids


def test_verification_metrics_and_rank1_on_known_embeddings():
    labels = np.repeat(np.arange(10), 4)
    rng = np.random.default_rng(0)
    good = np.eye(10)[labels] + rng.normal(0, 0.05, (40, 10))
    pairs = make_pairs(labels, 200, seed=0)
    assert len(pairs) > 100 and 0.4 < pairs[:, 2].mean() < 0.6
    assert all(labels[i] == labels[j] for i, j, s in pairs if s) and all(labels[i] != labels[j] for i, j, s in pairs if not s)
    assert verification_metrics(good, pairs)["val_acc"] > 0.98
    assert rank1_accuracy(good, labels) == 1.0
    noise = rng.normal(size=(40, 10))
    assert verification_metrics(noise, pairs)["val_acc"] < 0.8
    assert rank1_accuracy(noise, labels) < 0.6


def test_chipset_npz_round_trip_and_prepare(tmp_path):
    cs = synthetic_identities(n_ids=3, per_id=2)
    raw = load_chipset(save_chipset(tmp_path / "raw.npz", cs, jpeg_quality=None))
    np.testing.assert_array_equal(raw.chips, cs.chips)
    jpg = load_chipset(save_chipset(tmp_path / "jpg.npz", cs, jpeg_quality=95))
    assert jpg.chips.shape == cs.chips.shape
    err = np.abs(jpg.chips.astype(int) - cs.chips.astype(int)).mean()
    assert err < 12 and err < 0.3 * np.abs(jpg.chips[0].astype(int) - cs.chips[-1].astype(int)).mean()
    np.testing.assert_array_equal(jpg.labels, cs.labels)
    assert jpg.identities == cs.identities and jpg.meta == cs.meta
    np.testing.assert_allclose(jpg.teacher, cs.teacher)

    # prepare: chips_fn finds nothing in one image; the rest are resized for storage
    paths = []
    for i in range(3):
        p = tmp_path / f"img{i}.png"
        cv2.imwrite(str(p), cv2.cvtColor(cs.chips[i], cv2.COLOR_RGB2BGR))
        paths.append(p)

    def chips_fn(image: np.ndarray) -> np.ndarray:
        if image.mean() < 0:  # never; the empty case is the third image below
            return np.zeros((0, 50, 50, 3), np.uint8)
        return np.stack([cv2.resize(image, (50, 50))] * 2)

    items = [(paths[0], "a"), (paths[1], "b"), (paths[2], None)]
    events = []
    out = prepare_chipset(items, chips_fn, teacher_fn=lambda c: c.reshape(len(c), -1)[:, :4].astype(np.float32),
                          store_size=32, on_progress=events.append)
    assert out.chips.shape == (3, 32, 32, 3)  # one chip per image (max_faces_per_image=1)
    assert out.labels.tolist() == [0, 1, -1] and out.identities == ["a", "b"]
    assert out.teacher.shape == (3, 4) and events[-1]["done"] == 3
    empty = prepare_chipset([(paths[0], "a")], lambda im: np.zeros((0, 50, 50, 3), np.uint8))
    assert len(empty) == 0 and empty.meta["images_without_face"] == 1


def test_augmentation_outputs_and_preview():
    cs = synthetic_identities(n_ids=2, per_id=1, size=64)
    tf = build_train_transform(AugmentConfig(grayscale_p=1.0), 48)
    out = tf(hwc_to_chw(cs.chips[0]))
    assert out.shape == (3, 48, 48) and out.dtype == torch.uint8
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])  # greyscale always on
    grid = augmentation_preview(cs.chips, AugmentConfig(), output_size=48, per_chip=3)
    assert grid.size == (4 * 48 + 5 * 2, 2 * 48 + 3 * 2)
    assert preview_grid([cs.chips[0]], cell=20).size == (24, 24)


@pytest.mark.slow
def test_train_embedder_distill_then_arcface(tmp_path):
    torch.manual_seed(0)
    cs = synthetic_identities()
    events = []
    cfg = EmbedderTrainConfig(
        output_dir=tmp_path / "run", input_size=32, distill_epochs=2, margin_epochs=2, batch_size=8,
        val_fraction=0.34, val_pairs=40, lr=1e-3, margin_lr=3e-4, num_workers=0, device="cpu", log_every=1,
        augment=NO_AUGMENT, warmup_fraction=0.0,
    )
    result = train_embedder(cfg, cs, on_progress=events.append)

    assert not result.stopped
    # identity-disjoint split, reported back
    assert len(result.split["select_identities"]) == 2
    assert set(result.split["train_identities"]).isdisjoint(result.split["select_identities"])
    assert result.teacher_metrics["val_acc"] > 0.9  # the teacher codes separate identities
    distill = [h for h in result.history if h["stage"] == "distill"]
    margin = [h for h in result.history if h["stage"] == "margin"]
    assert len(distill) == 2 and len(margin) == 2
    assert distill[-1]["train_distill"] < distill[0]["train_distill"]
    assert margin[-1]["train_margin"] < margin[0]["train_margin"]
    assert all("val_acc" in h and "val_rank1" in h for h in result.history)
    assert any(e["kind"] == "step" for e in events) and sum(e["kind"] == "epoch" for e in events) == 4

    emb = ResNet50Embedder(checkpoint=result.checkpoint, device="cpu")
    vecs = emb.embed_chips(cs.chips)
    assert vecs.shape == (len(cs), 512)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert emb.meta["input_size"] == 32 and emb.meta["training"]["config"]["margin_loss"] == "arcface"
    with pytest.raises(WeightsNotFoundError):
        ResNet50Embedder(checkpoint=tmp_path / "run" / "missing.pt").load()


@pytest.mark.slow
def test_train_embedder_cosface_only_stops_when_asked(tmp_path):
    cs = synthetic_identities(n_ids=5, per_id=4)
    polls = {"n": 0}

    def should_stop() -> bool:
        polls["n"] += 1
        return polls["n"] > 2  # two steps, then stop

    cfg = EmbedderTrainConfig(
        output_dir=tmp_path / "run", input_size=32, distill_epochs=0, margin_epochs=5, margin_loss="cosface",
        batch_size=4, val_fraction=0.4, val_pairs=20, num_workers=0, device="cpu",
    )
    result = train_embedder(cfg, cs, should_stop=should_stop)
    assert result.stopped
    assert len(result.history) == 1 and result.history[0]["steps"] == 2
    assert result.checkpoint is not None and result.checkpoint.is_file()
    assert result.teacher_metrics  # the set's own teacher vectors are evaluated as the baseline


def test_time_budget_ends_training(tmp_path):
    """A spent time budget ends every stage before its first step: no epoch, no file."""
    cs = synthetic_identities(n_ids=4, per_id=3)
    cfg = EmbedderTrainConfig(output_dir=tmp_path / "run", input_size=32, distill_epochs=50, margin_epochs=50,
                              batch_size=4, val_fraction=0.5, num_workers=0, device="cpu", time_limit_min=1e-6)
    result = train_embedder(cfg, cs)
    assert result.history == [] and result.checkpoint is None and not result.stopped


def test_train_and_select_sets_must_hold_different_people(tmp_path):
    """The select set picks the best epoch: a person in both sets would let the
    trainer pick on faces it learnt."""
    cs = synthetic_identities(n_ids=4, per_id=3)
    cfg = EmbedderTrainConfig(output_dir=tmp_path / "run", input_size=32, distill_epochs=1, margin_epochs=0,
                              batch_size=4, num_workers=0, device="cpu")
    with pytest.raises(ValueError, match="1 people are in both the training and the select chips"):
        train_embedder(cfg, cs.subset(np.arange(0, 9)), select=cs.subset(np.arange(6, 12)))
