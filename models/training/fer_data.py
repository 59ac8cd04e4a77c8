"""FER2013 as arrays: the 48x48 grey faces of one split and their emotion indices.

The set (research/non-commercial terms, never copied into the repository) is laid out as
``<root>/{train,test}/<emotion>/*.jpg``. Reading 36k small JPEGs takes about a minute,
so the arrays are cached as one ``.npz`` next to the training run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from models.attributes.emotion_net import EMOTIONS, FRAME_SIZE


def read_fer_split(root: Path | str, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(N, 48, 48) uint8 faces, (N,) int64 class indices (``EMOTIONS`` order), and the
    files' paths relative to ``root``, sorted by class then file name."""
    root = Path(root)
    images: list[np.ndarray] = []
    labels: list[int] = []
    names: list[str] = []
    for k, emotion in enumerate(EMOTIONS):
        folder = root / split / emotion
        if not folder.is_dir():
            raise FileNotFoundError(f"FER2013 folder not found: {folder} (expected <root>/{split}/<emotion>/)")
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            with Image.open(path) as im:
                grey = im.convert("L")
                if grey.size != (FRAME_SIZE, FRAME_SIZE):
                    grey = grey.resize((FRAME_SIZE, FRAME_SIZE), Image.BILINEAR)
                images.append(np.asarray(grey, dtype=np.uint8))
            labels.append(k)
            names.append(str(path.relative_to(root)))
    return np.stack(images), np.asarray(labels, dtype=np.int64), names


def load_fer_split(root: Path | str, split: str, cache_dir: Path | str | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``read_fer_split``, cached as ``cache_dir/fer_<split>.npz`` when a folder is given."""
    if cache_dir is not None:
        cache = Path(cache_dir) / f"fer_{split}.npz"
        if cache.is_file():
            z = np.load(cache)
            return z["images"], z["labels"], [str(n) for n in z["names"]]
    images, labels, names = read_fer_split(root, split)
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        tmp = Path(cache_dir) / f"fer_{split}.tmp.npz"
        np.savez(tmp, images=images, labels=labels, names=np.asarray(names))
        tmp.replace(cache)
    return images, labels, names


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (keep, held_out) index arrays; ``fraction`` of every class is held out."""
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = []
    for k in np.unique(labels):
        idx = np.flatnonzero(labels == k)
        rng.shuffle(idx)
        held.append(idx[: int(round(len(idx) * fraction))])
    held_out = np.sort(np.concatenate(held))
    keep = np.setdiff1d(np.arange(len(labels)), held_out)
    return keep, held_out
