"""Write (image, face boxes) lists as a one-class YOLO dataset for ultralytics.

Layout under ``out_dir`` (a work folder outside the repo; never the user's originals):

    images/{train,val}/NNNNNN_<stem>.jpg   symlinks, or (resized) JPEG copies
    labels/{train,val}/NNNNNN_<stem>.txt   "0 cx cy w h" per face, normalised to [0, 1]
    data.yaml                              path/train/val/names (class 0 = "face")

Copies are the portable form: they can be carried to a GPU machine (links cannot), and
``max_side`` shrinks big photos so a whole set fits a 64 MiB transfer. Labels are
normalised, so resizing never touches them. The train/val split is image-disjoint (an
image listed twice is merged first) and seeded.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in original-image pixels


@dataclass
class DetSample:
    image: Path
    boxes: list[Box] = field(default_factory=list)


@dataclass
class YoloDatasetInfo:
    root: Path
    data_yaml: Path
    train_images: list[str]  #: source image paths in the train split
    val_images: list[str]
    boxes: dict[str, int]  #: boxes written per split
    dropped_boxes: int  #: boxes that were empty after clipping to the image

    def to_dict(self) -> dict:
        return {"root": str(self.root), "data_yaml": str(self.data_yaml), "train_images": len(self.train_images),
                "val_images": len(self.val_images), "boxes": self.boxes, "dropped_boxes": self.dropped_boxes}


def merge_samples(samples: Iterable[DetSample]) -> list[DetSample]:
    """One sample per image file (boxes of repeated entries are concatenated)."""
    merged: dict[str, DetSample] = {}
    for s in samples:
        key = str(Path(s.image).resolve())
        if key in merged:
            merged[key].boxes.extend(s.boxes)
        else:
            merged[key] = DetSample(Path(s.image), list(s.boxes))
    return list(merged.values())


def split_samples(samples: Sequence[DetSample], val_fraction: float, seed: int) -> tuple[list[DetSample], list[DetSample]]:
    """Image-disjoint, seeded split."""
    samples = merge_samples(samples)
    order = np.random.default_rng(seed).permutation(len(samples))
    n_val = int(round(len(samples) * val_fraction))
    if val_fraction > 0 and len(samples) >= 2:
        n_val = min(max(n_val, 1), len(samples) - 1)
    val = [samples[i] for i in sorted(order[:n_val])]
    train = [samples[i] for i in sorted(order[n_val:])]
    return train, val


def yolo_label_lines(boxes: Sequence[Box], width: int, height: int) -> tuple[list[str], int]:
    """Normalised "0 cx cy w h" lines for boxes clipped to the image; (lines, dropped)."""
    lines, dropped = [], 0
    for x1, y1, x2, y2 in boxes:
        x1, x2 = sorted((min(max(x1, 0.0), width), min(max(x2, 0.0), width)))
        y1, y2 = sorted((min(max(y1, 0.0), height), min(max(y2, 0.0), height)))
        if x2 - x1 < 1.0 or y2 - y1 < 1.0:
            dropped += 1
            continue
        cx, cy = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height
        lines.append(f"0 {cx:.6f} {cy:.6f} {(x2 - x1) / width:.6f} {(y2 - y1) / height:.6f}")
    return lines, dropped


def _write_image(src: Path, dst: Path, mode: str, max_side: int | None, quality: int) -> tuple[int, int]:
    """Place the image at ``dst``; return the ORIGINAL (width, height) the boxes refer to."""
    with Image.open(src) as im:
        # EXIF orientation is applied: boxes from our app are drawn on the upright image
        rotated = im.getexif().get(0x0112, 1) not in (0, 1)  # 0x0112: EXIF Orientation
        oriented = ImageOps.exif_transpose(im) if rotated else im
        width, height = oriented.size
        if mode == "symlink" and not rotated and max_side is None:
            dst.symlink_to(Path(src).resolve())
            return width, height
        if mode == "copy" and not rotated and max_side is None and src.suffix.lower() in (".jpg", ".jpeg"):
            shutil.copyfile(src, dst)
            return width, height
        img = oriented.convert("RGB")
        if max_side is not None and max(width, height) > max_side:
            scale = max_side / max(width, height)
            img = img.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.LANCZOS)
        img.save(dst, "JPEG", quality=quality)
        return width, height


def export_yolo_dataset(
    train: Sequence[DetSample],
    val: Sequence[DetSample],
    out_dir: Path | str,
    mode: str = "copy",
    max_side: int | None = None,
    jpeg_quality: int = 90,
    on_progress: Callable[[dict], None] | None = None,
) -> YoloDatasetInfo:
    """Write the dataset (see module docstring). ``mode``: "symlink" (fast, local only),
    "copy" (JPEG files copied byte for byte, others re-encoded) or "jpeg" (always
    re-encode); any mode re-encodes when ``max_side`` is set or EXIF rotates the image.
    ``out_dir`` is emptied first."""
    if mode not in ("symlink", "copy", "jpeg"):
        raise ValueError(f"mode must be symlink, copy or jpeg, not {mode!r}")
    root = Path(out_dir)
    if root.exists():
        shutil.rmtree(root)
    counts: dict[str, int] = {}
    dropped = 0
    total = len(train) + len(val)
    done = 0
    for split, samples in (("train", train), ("val", val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        counts[split] = 0
        for i, s in enumerate(samples):
            src = Path(s.image)
            name = f"{i:06d}_{src.stem}"
            width, height = _write_image(src, root / "images" / split / f"{name}.jpg", mode, max_side, jpeg_quality)
            lines, d = yolo_label_lines(s.boxes, width, height)
            dropped += d
            counts[split] += len(lines)
            (root / "labels" / split / f"{name}.txt").write_text("".join(line + "\n" for line in lines))
            done += 1
            if on_progress is not None and (done % 50 == 0 or done == total):
                on_progress({"stage": "export", "done": done, "total": total})
    data_yaml = write_data_yaml(root)
    info = YoloDatasetInfo(root, data_yaml, [str(s.image) for s in train], [str(s.image) for s in val], counts, dropped)
    (root / "export.json").write_text(json.dumps({**info.to_dict(), "train": info.train_images, "val": info.val_images}, indent=1))
    return info


def write_data_yaml(root: Path | str) -> Path:
    """(Re)write ``root/data.yaml`` with an absolute ``path`` (ultralytics resolves a
    relative one against its own datasets folder, not the yaml's)."""
    root = Path(root).resolve()
    path = root / "data.yaml"
    # JSON is valid YAML and needs no yaml writer; quoting keeps odd paths intact
    path.write_text(
        f"path: {json.dumps(str(root))}\ntrain: images/train\nval: images/val\nnames:\n  0: face\n"
    )
    return path


def face_mask_samples(root: Path | str, split: str) -> list[DetSample]:
    """face_mask's VOC boxes (every class is a face) for ``split`` ("train" or "val")."""
    from models.evaluation.detection import load_voc_split

    return [DetSample(img, [tuple(map(float, b)) for b in ann.boxes]) for img, ann in load_voc_split(root, split)]


def export_face_mask(
    root: Path | str, out_dir: Path | str, mode: str = "copy", max_side: int | None = None, jpeg_quality: int = 90
) -> YoloDatasetInfo:
    """face_mask -> YOLO with the dataset's own split: ``train.txt`` trains, ``val.txt``
    is the validation set (and stays the held-out evaluation set: tune nothing on it
    beyond what ultralytics' per-epoch validation reports)."""
    return export_yolo_dataset(face_mask_samples(root, "train"), face_mask_samples(root, "val"), out_dir,
                               mode=mode, max_side=max_side, jpeg_quality=jpeg_quality)


def dataset_size_bytes(root: Path | str) -> int:
    """Bytes the dataset would take when carried (links count as their targets)."""
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            total += os.path.getsize(os.path.join(dirpath, f))
    return total
