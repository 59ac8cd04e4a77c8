"""Aligned face chips for embedder training: build them once (CPU), store them compactly.

A ``ChipSet`` is an (N,H,W,3) uint8 array of aligned chips with an identity label per
chip (-1 = unknown, still usable for distillation) and, optionally, the teacher's
embedding of each chip. ``save_chipset`` writes one ``.npz`` with the chips as JPEG
bytes (about 20x smaller than raw pixels, so a whole training set travels to a GPU
machine) and no pickled objects; ``load_chipset`` decodes it back.

``prepare_chipset`` is the CPU data-preparation step. It takes plain callables, so the
caller wires in the app's real detector + aligner (``chips_fn``) and teacher embedder
(``teacher_fn``); this module imports neither storage nor pipeline.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

ProgressFn = Callable[[dict], None]


@dataclass
class ChipSet:
    chips: np.ndarray  #: (N,H,W,3) uint8 aligned chips
    labels: np.ndarray  #: (N,) int64 index into ``identities``; -1 = unknown identity
    identities: list[str]  #: label -> identity name
    teacher: np.ndarray | None = None  #: (N,D) float32 teacher embeddings of the same chips
    sources: list[str] = field(default_factory=list)  #: image path each chip came from
    meta: dict = field(default_factory=dict)  #: chip_size, chip_padding, teacher name, ...

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.chips.ndim != 4 or self.chips.shape[-1] != 3 or self.chips.dtype != np.uint8:
            raise ValueError(f"chips must be (N,H,W,3) uint8, got {self.chips.shape} {self.chips.dtype}")
        if len(self.labels) != len(self.chips):
            raise ValueError("one label per chip")
        if self.teacher is not None and len(self.teacher) != len(self.chips):
            raise ValueError("one teacher embedding per chip")
        if len(self.labels) and self.labels.max(initial=-1) >= len(self.identities):
            raise ValueError("a label points past the identity list")

    def __len__(self) -> int:
        return len(self.chips)

    def subset(self, index: np.ndarray) -> "ChipSet":
        index = np.asarray(index, dtype=np.int64)
        return ChipSet(
            chips=self.chips[index],
            labels=self.labels[index],
            identities=list(self.identities),
            teacher=None if self.teacher is None else self.teacher[index],
            sources=[self.sources[i] for i in index] if self.sources else [],
            meta=dict(self.meta),
        )


def save_chipset(path: Path | str, cs: ChipSet, jpeg_quality: int | None = 92) -> Path:
    """Write ``cs`` to ``path`` (.npz). ``jpeg_quality=None`` stores raw pixels."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {
        "labels": cs.labels,
        "identities": np.asarray(cs.identities, dtype=np.str_),
        "sources": np.asarray(cs.sources, dtype=np.str_),
        "meta_json": np.asarray(json.dumps(cs.meta)),
        "chip_shape": np.asarray(cs.chips.shape[1:], dtype=np.int64),
    }
    if cs.teacher is not None:
        arrays["teacher"] = np.asarray(cs.teacher, dtype=np.float32)
    if jpeg_quality is None:
        arrays["chips"] = cs.chips
    else:
        blobs = []
        for chip in cs.chips:
            ok, buf = cv2.imencode(".jpg", cv2.cvtColor(chip, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
            if not ok:
                raise RuntimeError("JPEG encoding failed")
            blobs.append(buf.reshape(-1))
        offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(b) for b in blobs])
        arrays["jpeg_bytes"] = np.concatenate(blobs) if blobs else np.zeros(0, np.uint8)
        arrays["jpeg_offsets"] = offsets
    np.savez(path, **arrays)
    return path


def load_chipset(path: Path | str) -> ChipSet:
    """Read a ``.npz`` written by ``save_chipset`` (no pickle)."""
    with np.load(Path(path), allow_pickle=False) as z:
        shape = tuple(int(v) for v in z["chip_shape"])
        if "chips" in z:
            chips = z["chips"]
        else:
            data, offsets = z["jpeg_bytes"], z["jpeg_offsets"]
            chips = np.empty((len(offsets) - 1, *shape), dtype=np.uint8)
            for i in range(len(chips)):
                img = cv2.imdecode(data[offsets[i] : offsets[i + 1]], cv2.IMREAD_COLOR)
                chips[i] = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        return ChipSet(
            chips=chips,
            labels=z["labels"],
            identities=[str(s) for s in z["identities"]],
            teacher=z["teacher"] if "teacher" in z else None,
            sources=[str(s) for s in z["sources"]],
            meta=json.loads(str(z["meta_json"])),
        )


def read_rgb(path: Path | str) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"cannot read image {path}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def prepare_chipset(
    items: Iterable[tuple[Path | str, str | None]],
    chips_fn: Callable[[np.ndarray], np.ndarray],
    teacher_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    store_size: int | None = 128,
    max_faces_per_image: int = 1,
    meta: dict | None = None,
    on_progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    load_image: Callable[[Path | str], np.ndarray] = read_rgb,
) -> ChipSet:
    """Run ``chips_fn`` over ``(image path, identity or None)`` items.

    ``chips_fn(rgb_image) -> (K,S,S,3) uint8`` is the app's detect -> align path; it
    must return the chips best first (e.g. for LFW, the face nearest the image centre),
    and only the first ``max_faces_per_image`` are kept, labelled with the item's
    identity. ``teacher_fn(chips) -> (K,D)`` embeds the chips at their aligned size,
    before they are resized to ``store_size`` for storage (None keeps them as they are).
    Images where ``chips_fn`` finds nothing are skipped and counted in ``meta``.
    """
    items = list(items)
    names: dict[str, int] = {}
    chips_out: list[np.ndarray] = []
    labels: list[int] = []
    teacher_out: list[np.ndarray] = []
    sources: list[str] = []
    skipped = 0
    t0 = time.monotonic()
    for i, (path, identity) in enumerate(items):
        if should_stop is not None and should_stop():
            break
        chips = np.asarray(chips_fn(load_image(path)))
        if chips.ndim != 4 or len(chips) == 0:
            skipped += 1
        else:
            chips = chips[:max_faces_per_image]
            if teacher_fn is not None:
                teacher_out.append(np.asarray(teacher_fn(chips), dtype=np.float32))
            if store_size is not None and chips.shape[1] != store_size:
                chips = np.stack([cv2.resize(c, (store_size, store_size), interpolation=cv2.INTER_AREA) for c in chips])
            label = -1 if identity is None else names.setdefault(identity, len(names))
            chips_out.append(chips)
            labels.extend([label] * len(chips))
            sources.extend([str(path)] * len(chips))
        if on_progress is not None and (i % 25 == 0 or i == len(items) - 1):
            on_progress({"stage": "prepare", "done": i + 1, "total": len(items), "chips": len(labels),
                         "skipped": skipped, "elapsed_s": time.monotonic() - t0})
    side = store_size or (chips_out[0].shape[1] if chips_out else 1)
    all_chips = np.concatenate(chips_out) if chips_out else np.zeros((0, side, side, 3), np.uint8)
    info = dict(meta or {})
    info.update({"images": len(items), "images_without_face": skipped, "store_size": int(all_chips.shape[1])})
    return ChipSet(
        chips=all_chips,
        labels=np.asarray(labels, dtype=np.int64),
        identities=list(names),
        teacher=np.concatenate(teacher_out) if teacher_out else None,
        sources=sources,
        meta=info,
    )


def lfw_items(lfw_root: Path | str, identities_file: str = "train_identities.txt") -> list[tuple[Path, str]]:
    """``(image, person)`` for every image of the people listed in ``identities_file``.

    Use only the train half for training (``test_identities.txt`` is the held-out
    protocol, see the data README).
    """
    root = Path(lfw_root)
    people = [p.strip() for p in (root / identities_file).read_text().splitlines() if p.strip()]
    items: list[tuple[Path, str]] = []
    for person in people:
        for img in sorted((root / "lfw-deepfunneled" / person).glob("*.jpg")):
            items.append((img, person))
    return items


def identity_split(
    labels: Sequence[int] | np.ndarray, val_fraction: float, seed: int, min_val_images: int = 2
) -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
    """Identity-disjoint split: (train index, val index, train labels, val labels).

    Only identities with at least ``min_val_images`` chips can go to validation (pairs
    need two); ``val_fraction`` is the share of those that do. Unknown-identity chips
    (label -1) always train (distillation needs no label).
    """
    labels = np.asarray(labels, dtype=np.int64)
    known, counts = np.unique(labels[labels >= 0], return_counts=True)
    eligible = known[counts >= min_val_images]
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(eligible)
    n_val = int(round(len(eligible) * val_fraction))
    if val_fraction > 0 and len(eligible) >= 2:
        n_val = max(n_val, 2)  # verification needs at least two identities
    val_ids = np.sort(shuffled[:n_val])
    is_val = np.isin(labels, val_ids)
    train_ids = np.setdiff1d(known, val_ids)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val), train_ids.tolist(), val_ids.tolist()
