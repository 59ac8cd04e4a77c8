"""The data of a training job, split three ways: train / select / test.

* **train** teaches the candidate;
* **select** picks what training cannot (ultralytics' ``best.pt``, the embedder's best
  epoch, the candidate's confidence or match threshold);
* **test** is used once, to compare the candidate with the model in use: the numbers that
  decide promotion. Nothing that chose the candidate has seen it.

The detector splits *images* (a photo's faces travel together), the embedder splits
*people* (nobody is learnt and tested). Seeded, so a rerun gets the same split; written
to ``runs/<run>/split.json`` with the key of every item (detector: the image file's stem,
the sha256 for the app's photos; embedder: ``face:<id>`` or the LFW image path).

Sources:

* detector from labels: every *reviewed* image with the faces a person did not reject;
  split by ``select_fraction`` / ``test_fraction`` of the images;
* detector from face_mask: ``train.txt`` split into train / select, ``val.txt`` is the test
  split (as the dataset intends: nothing is tuned on it);
* embedder from labels: named faces, aligned by the app's own path, with the vectors of
  the embedder in use as distillation targets (stored ones, computed where missing);
  people with 2+ faces can go to select / test (pairs need two), the rest train;
* embedder from LFW: ``train_identities.txt`` people only, split the same way (LFW's test
  half is evaluated separately, never trained or tuned on).

Each split has a minimum size (``MINIMUM``), checked before any training starts, with a
message saying how much more data or which share would do.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from pipeline.context import Lab
from pipeline.errors import FaceLabError, InvalidRequest
from pipeline.training.evaluate import cpu_threads, pick_centre_face
from storage.orm import Embedding, Face, Identity, Image, ImageStatus, ReviewStatus

ProgressFn = Callable[[dict], None]
StopFn = Callable[[], bool]

CHIP_SIZE, CHIP_PADDING = 150, 0.25  # the app's aligned chip (dlib's), see models.align
SPLITS = ("train", "select", "test")

#: the smallest split a job accepts, per kind: below these the numbers mean little
#: (a 3-photo test set once scored 1.000 for everything)
MINIMUM: dict[str, dict[str, dict[str, int]]] = {
    "detector": {"train": {"images": 8}, "select": {"images": 5, "faces": 5}, "test": {"images": 10, "faces": 10}},
    "embedder": {"train": {"people": 2, "faces": 4}, "select": {"people": 2, "faces": 4},
                 "test": {"people": 3, "faces": 10}},
}


class JobCancelled(FaceLabError):
    pass


def describe(sizes: dict[str, int]) -> str:
    """"10 images, 31 faces" / "12 faces of 3 people"."""
    if "people" in sizes:
        return f"{sizes.get('faces', 0)} faces of {sizes['people']} people"
    return f"{sizes.get('images', 0)} images, {sizes.get('faces', 0)} faces"


def check_minimums(kind: str, sizes: dict[str, dict[str, int]], fractions: dict[str, float], unit_total: int,
                   how_to_add: str) -> None:
    """InvalidRequest naming the first split below its minimum, its size and a way out."""
    unit = "people" if kind == "embedder" else "images"
    for split in SPLITS:
        for measure, least in MINIMUM[kind][split].items():
            have = sizes[split].get(measure, 0)
            if have >= least:
                continue
            share = fractions.get(split)
            advice = how_to_add
            if share:
                needed = math.ceil(max(least, 1) / share)
                advice = (f"{how_to_add} (about {needed} {unit} at a {split} share of {share:g}), "
                          f"or raise the {split} share")
            raise InvalidRequest(
                f"The {split} split would hold {have} {measure} ({describe(sizes[split])}, from {unit_total} "
                f"{unit} in all); training the {kind} needs at least {least} there. {advice}.")


# ============================================================================ detector


@dataclass
class DetectorSplits:
    """The three splits as (image, boxes) samples, with a key per image."""

    source: str
    train: list  #: models.training.yolo_dataset.DetSample
    select: list
    test: list
    manifest: dict[str, Any]
    open_image: Callable[[Any], np.ndarray]  #: DetSample -> RGB uint8

    def of(self, split: str) -> list:
        return {"train": self.train, "select": self.select, "test": self.test}[split]

    @staticmethod
    def key(sample) -> str:
        return Path(sample.image).stem

    def keys(self, split: str) -> list[str]:
        return [self.key(s) for s in self.of(split)]

    def loaders(self, split: str) -> list[Callable[[], np.ndarray]]:
        return [(lambda s=s: self.open_image(s)) for s in self.of(split)]

    def boxes(self, split: str) -> list[np.ndarray]:
        return [np.asarray(s.boxes, dtype=np.float64).reshape(-1, 4) for s in self.of(split)]

    def sizes(self, split: str) -> dict[str, int]:
        samples = self.of(split)
        return {"images": len(samples), "faces": sum(len(s.boxes) for s in samples)}

    def label(self, split: str) -> str:
        where = {"face_mask": {"test": " (face_mask val.txt)", "train": " (of face_mask train.txt)",
                               "select": " (of face_mask train.txt)"}}.get(self.source, {}).get(split, "")
        return f"{split} split{where}: {describe(self.sizes(split))}"


def _labelled_detection_samples(lab: Lab) -> list[tuple[Any, int, list[int]]]:
    """(DetSample, image id, face ids) for every reviewed image (not-rejected faces)."""
    from models.training.yolo_dataset import DetSample

    with lab.sessions() as session:
        images = session.execute(
            select(Image.id, Image.sha256).where(Image.status == ImageStatus.REVIEWED).order_by(Image.id)
        ).all()
        faces = session.execute(
            select(Face.id, Face.image_id, Face.x1, Face.y1, Face.x2, Face.y2)
            .join(Image, Face.image_id == Image.id)
            .where(Image.status == ImageStatus.REVIEWED, Face.review_status != ReviewStatus.REJECTED)
            .order_by(Face.id)
        ).all()
    by_image: dict[int, list] = {}
    for f in faces:
        by_image.setdefault(f.image_id, []).append(f)
    out = []
    for image_id, sha in images:
        rows = by_image.get(image_id, [])
        out.append((DetSample(lab.images.path(sha), [(f.x1, f.y1, f.x2, f.y2) for f in rows]), image_id,
                    [f.id for f in rows]))
    return out


def detector_splits(lab: Lab, source: str, source_path: str | None, select_fraction: float, test_fraction: float,
                    seed: int) -> DetectorSplits:
    """Three image-disjoint splits (see the module docstring), minimum sizes checked."""
    from models.training.chip_data import read_rgb
    from models.training.splits import split_groups
    from models.training.yolo_dataset import face_mask_samples, merge_samples

    fractions = {"select": select_fraction, "test": test_fraction}
    extra: dict[str, Any] = {}
    if source == "face_mask":
        root = Path(source_path or "")
        if not (root / "train.txt").is_file():
            raise InvalidRequest(f"{root} is not the face_mask folder (no train.txt).")
        pool = merge_samples(face_mask_samples(root, "train"))
        test = merge_samples(face_mask_samples(root, "val"))
        groups = split_groups([DetectorSplits.key(s) for s in pool], select_fraction, 0.0, seed)
        how = (f"face_mask's train.txt split image-disjointly into train / select (seed {seed}, select share "
               f"{select_fraction:g}); its val.txt is the test split")
        fractions = {"select": select_fraction}
        open_image: Callable[[Any], np.ndarray] = lambda s: read_rgb(s.image)  # noqa: E731
        extra["path"] = str(root)
    else:
        labelled = _labelled_detection_samples(lab)
        pool = [s for s, _, _ in labelled]
        groups = split_groups([DetectorSplits.key(s) for s in pool], select_fraction, test_fraction, seed)
        test = []
        how = (f"reviewed images, split image-disjointly (seed {seed}, select share {select_fraction:g}, "
               f"test share {test_fraction:g})")
        open_image = lambda s: lab.images.open(Path(s.image).stem)  # noqa: E731 - store files are named by sha256
        ids = {DetectorSplits.key(s): (image_id, face_ids) for s, image_id, face_ids in labelled}
    by_key = {DetectorSplits.key(s): s for s in pool}
    splits = DetectorSplits(source, [by_key[k] for k in groups.train], [by_key[k] for k in groups.select],
                            test or [by_key[k] for k in groups.test], {}, open_image)
    sizes = {split: splits.sizes(split) for split in SPLITS}
    how_to_add = ("Review more images in the Label tab" if source == "labels"
                  else "Use a larger dataset")
    check_minimums("detector", sizes, fractions, len(pool) + len(test), how_to_add)
    splits.manifest = {"kind": "detector", "source": source, "unit": "image", "how": how, "seed": seed, **extra,
                       "sizes": sizes, **{split: splits.keys(split) for split in SPLITS}}
    if source == "labels":
        for split in SPLITS:
            splits.manifest[f"{split}_images"] = [ids[k][0] for k in splits.keys(split)]
            splits.manifest[f"{split}_faces"] = [f for k in splits.keys(split) for f in ids[k][1]]
    return splits


# ============================================================================ embedder


@dataclass
class EmbedderSplits:
    """The three identity-disjoint splits as chip sets (``ChipSet.sources`` are the keys)."""

    source: str
    train: Any  #: models.training.chip_data.ChipSet
    select: Any
    test: Any
    manifest: dict[str, Any] = field(default_factory=dict)

    def of(self, split: str) -> Any:
        return {"train": self.train, "select": self.select, "test": self.test}[split]

    def sizes(self, split: str) -> dict[str, int]:
        labels = self.of(split).labels
        return {"people": int(len(np.unique(labels[labels >= 0]))), "faces": int(len(labels))}

    def label(self, split: str) -> str:
        return f"{split} split: {describe(self.sizes(split))}"

    def people(self, split: str) -> list[str]:
        cs = self.of(split)
        return [cs.identities[i] for i in sorted({int(v) for v in cs.labels if v >= 0})]


def embedder_splits(cs, source: str, select_fraction: float, test_fraction: float, seed: int) -> EmbedderSplits:
    """Split prepared chips by person (see the module docstring), minimum sizes checked."""
    from models.training.splits import split_groups

    labels = cs.labels
    known, counts = np.unique(labels[labels >= 0], return_counts=True)
    eligible = known[counts >= 2].tolist()
    groups = split_groups(known.tolist(), select_fraction, test_fraction, seed, eligible=eligible)
    index = {name: np.flatnonzero(np.isin(labels, groups.of(name))) for name in ("select", "test")}
    index["train"] = np.flatnonzero(~np.isin(labels, groups.select + groups.test))
    splits = EmbedderSplits(source, cs.subset(index["train"]), cs.subset(index["select"]), cs.subset(index["test"]))
    sizes = {split: splits.sizes(split) for split in SPLITS}
    how_to_add = "Name more people (2+ faces each) in the Label or People tab" if source == "labels" else \
        "Use more LFW images (--limit-images)"
    check_minimums("embedder", sizes, {"select": select_fraction, "test": test_fraction}, len(known), how_to_add)
    splits.manifest = {
        "kind": "embedder", "source": source, "unit": "person", "seed": seed,
        "how": (f"people split identity-disjointly (seed {seed}, select share {select_fraction:g}, test share "
                f"{test_fraction:g} of the {len(eligible)} people with 2+ faces; the others train)"),
        "sizes": sizes, "faces_prepared": int(len(cs)),
        "meta": {k: v for k, v in cs.meta.items() if not isinstance(v, dict)},
        **{split: list(splits.of(split).sources) for split in SPLITS},
        **{f"{split}_identities": splits.people(split) for split in SPLITS},
    }
    return splits


def _teacher_vectors(lab: Lab, face_ids: list[int]) -> dict[int, np.ndarray]:
    version = lab.model_version
    with lab.sessions() as session:
        rows = session.scalars(
            select(Embedding).where(Embedding.face_id.in_(face_ids), Embedding.model_version == version)).all()
        return {r.face_id: r.as_array() for r in rows}


def _named_faces(lab: Lab) -> list[Any]:
    with lab.sessions() as session:
        return list(session.execute(
            select(Face.id, Face.x1, Face.y1, Face.x2, Face.y2, Face.score, Face.landmarks, Image.sha256,
                   Identity.name)
            .join(Image, Face.image_id == Image.id).join(Identity, Face.identity_id == Identity.id)
            .where(Face.review_status != ReviewStatus.REJECTED).order_by(Face.id)
        ).all())


def _aligned_chips(lab: Lab, image: np.ndarray, faces: list[Any], store_size: int) -> tuple[list, list[np.ndarray]]:
    """The app's alignment of these stored faces: (boxes with landmarks, chips at store_size)."""
    import cv2

    from models.align import face_chips
    from models.types import FaceBox

    boxes = [FaceBox(f.x1, f.y1, f.x2, f.y2, f.score,
                     np.asarray(f.landmarks, np.float32) if f.landmarks is not None else None) for f in faces]
    boxes = lab.landmarker.predict(image, boxes, only_missing=True)
    chips = list(face_chips(image, boxes, size=CHIP_SIZE, padding=CHIP_PADDING))
    if store_size != CHIP_SIZE:
        chips = [cv2.resize(c, (store_size, store_size), interpolation=cv2.INTER_AREA) for c in chips]
    return boxes, chips


def labelled_chipset(lab: Lab, store_size: int, on_progress: ProgressFn | None = None,
                     should_stop: StopFn | None = None):
    """Aligned chips of every named face (not rejected), their names, and the vectors
    of the embedder in use (stored ones; computed where missing) as teacher targets."""
    from models.training.chip_data import ChipSet

    rows = _named_faces(lab)
    stored = _teacher_vectors(lab, [r.id for r in rows])
    by_image: dict[str, list] = {}
    for r in rows:
        by_image.setdefault(r.sha256, []).append(r)
    names: dict[str, int] = {}
    chips, labels, teacher, sources = [], [], [], []
    for n, (sha, faces) in enumerate(by_image.items()):
        if should_stop is not None and should_stop():
            raise JobCancelled("cancelled while preparing the faces")
        image = lab.images.open(sha)
        boxes, aligned = _aligned_chips(lab, image, faces, store_size)
        missing = [i for i, f in enumerate(faces) if f.id not in stored]
        computed = dict(zip(missing, lab.embedder.embed(image, [boxes[i] for i in missing]) if missing else []))
        for i, f in enumerate(faces):
            chips.append(aligned[i])
            labels.append(names.setdefault(f.name, len(names)))
            teacher.append(stored[f.id] if f.id in stored else computed[i])
            sources.append(f"face:{f.id}")
        if on_progress is not None:
            on_progress({"kind": "prepare", "done": n + 1, "total": len(by_image), "chips": len(chips)})
    if not chips:
        return ChipSet(np.zeros((0, store_size, store_size, 3), np.uint8), np.zeros(0, np.int64), [], None, [], {})
    return ChipSet(np.stack(chips), np.asarray(labels), list(names), np.asarray(teacher, np.float32), sources,
                   {"source": "labels", "teacher": lab.model_version, "chip_size": CHIP_SIZE,
                    "chip_padding": CHIP_PADDING})


def _lfw_choice(root: Path, seed: int, limit_images: int | None, max_per_identity: int) -> list[tuple[Path, str]]:
    """LFW train-identity people with 2+ images, in seeded order, at most
    ``max_per_identity`` images each and ``limit_images`` in all."""
    from models.training.chip_data import lfw_items

    items = lfw_items(root, "train_identities.txt")  # never the test half
    by_person: dict[str, list] = {}
    for path, person in items:
        by_person.setdefault(person, []).append(path)
    people = sorted(p for p, imgs in by_person.items() if len(imgs) >= 2)
    chosen: list[tuple[Path, str]] = []
    limit = limit_images or len(items)
    for person in np.random.default_rng(seed).permutation(people):
        imgs = by_person[str(person)][:max_per_identity]
        if len(chosen) + len(imgs) > limit:
            if len(chosen) >= limit - 1:
                break
            imgs = imgs[: limit - len(chosen)]
        chosen.extend((p, str(person)) for p in imgs)
    return chosen


def lfw_chipset(lab: Lab, source_path: str | None, seed: int, store_size: int, limit_images: int | None,
                max_per_identity: int, on_progress: ProgressFn | None = None, should_stop: StopFn | None = None):
    """LFW train identities with 2+ images (seeded choice, bounded), chips through the
    app's detect -> landmarks -> align path, teacher = the embedder in use."""
    from models.align import face_chips
    from models.training.chip_data import prepare_chipset

    root = Path(source_path or "")
    if not (root / "train_identities.txt").is_file():
        raise InvalidRequest(f"{root} is not the LFW folder (no train_identities.txt).")
    chosen = _lfw_choice(root, seed, limit_images, max_per_identity)

    def chips_fn(image: np.ndarray) -> np.ndarray:
        boxes = lab.detector.detect(image)
        if not boxes:
            return np.zeros((0, CHIP_SIZE, CHIP_SIZE, 3), np.uint8)
        box, _ = pick_centre_face(boxes, image.shape[1], image.shape[0])
        return face_chips(image, lab.landmarker.predict(image, [box]), size=CHIP_SIZE, padding=CHIP_PADDING)

    with cpu_threads():
        cs = prepare_chipset(chosen, chips_fn, getattr(lab.embedder, "embed_chips", None), store_size=store_size,
                             meta={"source": "lfw train_identities", "teacher": lab.model_version,
                                   "detector": lab.detector.version, "chip_size": CHIP_SIZE,
                                   "chip_padding": CHIP_PADDING},
                             on_progress=on_progress, should_stop=should_stop)
    if should_stop is not None and should_stop():
        raise JobCancelled("cancelled while preparing the faces")
    return cs
