"""The emotion trainer on a tiny generated FER-style folder: the app-path frames it can
train on (real detector and landmarks), their cache, and the select split scored both
ways. FER2013 itself is never needed here (it is not in the repository)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from models.attributes.emotion_net import EMOTIONS
from models.training.emotion_trainer import EmotionTrainConfig, train
from models.training.fer_app_frames import load_app_frames

ASTRONAUT_FACE = (175, 76, 265, 166)  # the face in skimage's astronaut (l, t, r, b)


def _fer_folder(root: Path, per_class: int = 6) -> Path:
    """FER-like 48x48 grey faces: the astronaut's face, cropped a little differently each time."""
    grey = np.asarray(Image.fromarray(skdata.astronaut()).convert("L"))
    rng = np.random.default_rng(0)
    l, t, r, b = ASTRONAUT_FACE
    for k, emotion in enumerate(EMOTIONS):
        folder = root / "train" / emotion
        folder.mkdir(parents=True)
        for i in range(per_class):
            dx, dy, pad = rng.integers(-6, 7), rng.integers(-6, 7), rng.integers(8, 16)
            crop = grey[t - pad + dy : b + pad + dy, l - pad + dx : r + pad + dx]
            Image.fromarray(crop).resize((48, 48), Image.BILINEAR).save(folder / f"{k}_{i}.png")
    return root


@pytest.fixture(scope="module")
def fer_root(tmp_path_factory) -> Path:
    return _fer_folder(tmp_path_factory.mktemp("fer"))


def test_app_frames_are_cut_by_the_apps_path_and_cached(fer_root: Path, tmp_path: Path) -> None:
    frames, found, names = load_app_frames(tmp_path, "train", fer_root)
    native = np.load(tmp_path / "fer_train.npz")["images"]
    assert frames.shape == native.shape == (6 * len(EMOTIONS), 48, 48) and frames.dtype == np.uint8
    assert found.sum() > len(found) // 2  # the detector finds the astronaut in most crops
    # a different cut of the same faces: related, not identical
    diff = np.abs(frames.astype(int) - native.astype(int)).mean(axis=(1, 2))
    assert (diff > 1).all()
    corr = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(frames, native)]
    assert np.median(corr) > 0.3
    again, _, names_again = load_app_frames(tmp_path, "train")  # from the cache, no FER root needed
    assert np.array_equal(again, frames) and names_again == names


def test_a_run_on_app_frames_scores_select_both_ways_and_resumes(fer_root: Path, tmp_path: Path) -> None:
    cfg = EmotionTrainConfig(epochs=1, width=8, batch_size=8, app_frames_p=0.5, precision="fp32",
                             select_fraction=0.2)
    result = train(fer_root, tmp_path, cfg)
    row = result["history"][0]
    assert {"select_accuracy_app", "select_accuracy_native"} <= row.keys()
    assert row["select_accuracy"] == row["select_accuracy_app"]  # the app's frames pick the epoch
    assert (tmp_path / "fer_train_app.npz").is_file() and (tmp_path / "best.pt").is_file()
    cfg2 = EmotionTrainConfig(**{**cfg.__dict__, "epochs": 2})
    result2 = train(fer_root, tmp_path, cfg2)  # continues after epoch 1
    assert [r["epoch"] for r in result2["history"]] == [1, 2]


def test_precision_must_be_known(fer_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="precision"):
        train(fer_root, tmp_path, EmotionTrainConfig(epochs=1, width=8, batch_size=8, precision="fp16"))
    with pytest.raises(ValueError, match="app_frames_p"):
        train(fer_root, tmp_path, EmotionTrainConfig(epochs=1, width=8, batch_size=8, app_frames_p=1.5))
    assert not (tmp_path / "fer_train.npz").exists()  # refused before any data was read


def test_distillation_learns_from_a_teacher_file(fer_root: Path, tmp_path: Path) -> None:
    """With distill_weight 1 the labels do not enter the loss: a student taught by a
    teacher file that gives every face one emotion learns to give every face that
    emotion, which the labels alone do not teach it."""
    import torch

    from models.attributes.analyzer import EMOTION_FORMAT
    from models.attributes.emotion_net import EmotionNet, predict_proba

    base = EmotionTrainConfig(epochs=3, width=8, batch_size=8, precision="fp32", select_fraction=0.2)

    def answers(cfg: EmotionTrainConfig, out: Path) -> np.ndarray:
        train(fer_root, out, cfg)
        student = EmotionNet(8)
        student.load_state_dict(torch.load(out / "last.pt", weights_only=True)["model"])
        frames = torch.from_numpy(np.load(out / "fer_train.npz")["images"]).unsqueeze(1)
        return predict_proba(student.eval(), frames).argmax(1).numpy()

    # every face here is the astronaut, so a tiny student may well settle on one class:
    # the teacher's class is one the labels-only student gives least
    labels_only = answers(base, tmp_path / "labels")
    target = int(np.argmin(np.bincount(labels_only, minlength=len(EMOTIONS))))
    net = EmotionNet(8)
    with torch.no_grad():
        net.classifier.weight.zero_()
        net.classifier.bias.copy_(torch.nn.functional.one_hot(torch.tensor(target), len(EMOTIONS)) * 4.0)
    teacher = tmp_path / "one-emotion.pt"
    torch.save({"format": EMOTION_FORMAT, "state_dict": {k: v.half() if v.is_floating_point() else v
                                                         for k, v in net.state_dict().items()},
                "meta": {"emotions": list(EMOTIONS), "width": 8, "dropout": 0.3,
                         "framing": {"dx": 0.0, "dy": 0.0, "scale": 1.6}}}, teacher)
    taught = answers(EmotionTrainConfig(**{**base.__dict__, "teacher": str(teacher), "distill_weight": 1.0}),
                     tmp_path / "taught")
    assert (taught == target).mean() > 0.9 and (labels_only == target).mean() < 0.5, (target, taught, labels_only)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        train(fer_root, tmp_path / "s2", EmotionTrainConfig(**{**base.__dict__, "teacher": str(tmp_path / "missing.pt")}))
    with pytest.raises(ValueError, match="distill_weight"):
        train(fer_root, tmp_path / "s3", EmotionTrainConfig(**{**base.__dict__, "distill_weight": 1.5}))
