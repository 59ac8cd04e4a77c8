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
