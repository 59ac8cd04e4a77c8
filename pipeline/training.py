"""Training jobs: fine-tune the detector or the embedder on collected labels, evaluate
the result against the model in use, and register it (inactive) for promotion.

One job at a time per data folder. The running job holds an exclusive ``flock`` on
``data_dir/training/job.lock`` for its whole life; the kernel drops that lock when the
process ends in any way (even SIGKILL), so a job record that says "running" while the
lock is free belongs to a dead process and is reported as interrupted. Progress goes to
``data_dir/training/job.json`` (written atomically, at most about once a second), which
is what the Train tab polls, so a page reload, a second browser tab or a CLI run on the
same data folder all see the same job. Cancelling writes ``training/cancel`` (the job
polls it between batches), so the UI can also stop a job started from the CLI.

Data (each run stores its split under ``data_dir/runs/<run id>/split.json``):

* detector, from labels: every image whose status is *reviewed* with its faces that a
  person did not reject (boxes a person drew or checked), image-disjoint seeded split;
  or face_mask's own train/val split (``source="face_mask"``).
* embedder, from labels: faces with a name, aligned by the app's own path (stored
  landmarks, else ``lab.landmarker``, then ``models.align.face_chips``), with the
  vectors of the embedder in use as distillation targets; identity-disjoint seeded
  split. Or LFW's train identities (``source="lfw"``; the test half is only evaluated).

Nothing here changes the model in use: a run ends with an inactive ``ModelVersion``
row; promotion is ``pipeline.registry.promote``.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from pipeline import registry
from pipeline.context import Lab
from pipeline.errors import Conflict, FaceLabError, InvalidRequest, NotFound
from pipeline.evaluate import (
    Comparison,
    DetectorUnderTest,
    EvaluationStopped,
    compare_detectors,
    compare_embeddings,
    compare_on_lfw_test_half,
    cpu_threads,
    pick_centre_face,
)
from storage.orm import Embedding, Face, Identity, Image, ImageStatus, ReviewStatus

log = logging.getLogger(__name__)

KINDS = ("detector", "embedder")
SOURCES = {"detector": ("labels", "face_mask"), "embedder": ("labels", "lfw")}
ACTIVE_STATES = ("starting", "preparing", "training", "evaluating", "registering")
#: share of the progress bar per phase (training dominates)
PHASES = {"starting": (0.0, 0.0), "preparing": (0.0, 0.1), "training": (0.1, 0.85), "evaluating": (0.85, 0.98),
          "registering": (0.98, 1.0)}
CHIP_SIZE, CHIP_PADDING = 150, 0.25  # the app's aligned chip (dlib's), see models.align
MAX_HISTORY = 1000


class JobCancelled(FaceLabError):
    pass


# ============================================================================ requests


def _has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - no torch, no GPU
        return False


@dataclass
class TrainRequest:
    """What to train. ``None`` fields get a default that depends on the hardware:
    small and quick on a CPU, the full recipe on a GPU (used automatically if present)."""

    kind: str = "detector"
    source: str = "labels"  #: labels | face_mask (detector) | lfw (embedder)
    source_path: str | None = None  #: the face_mask or LFW folder
    epochs: int | None = None
    #: wall-clock cap for the training itself (detector: its LR schedule is fitted to it,
    #: and ``epochs`` stays an upper bound; embedder: each stage gets its share)
    minutes: float | None = None
    seed: int = 0
    val_fraction: float = 0.2
    device: str | None = None  #: None: first GPU if any, else cpu
    #: torch threads while training on a CPU (None: the process's setting, which the web
    #: app keeps low so requests stay responsive; the CLI passes every core)
    threads: int | None = None
    # detector
    model: str | None = None  #: ultralytics .yaml (from scratch) or a local .pt to fine-tune
    imgsz: int | None = None
    batch: int | None = None
    validate_every_epoch: bool = True
    # embedder
    input_size: int = 112
    limit_images: int | None = None  #: LFW: at most this many training images
    max_per_identity: int = 12  #: LFW: images per person (a few people have hundreds)
    max_steps_per_epoch: int | None = None
    eval_pairs: int | None = None  #: LFW test half: an even subset of its 3,000 pairs

    def resolved(self) -> "TrainRequest":
        """A copy with the hardware-dependent defaults filled in, checked."""
        if self.kind not in KINDS:
            raise InvalidRequest(f"Unknown model kind {self.kind!r}; train a detector or an embedder.")
        if self.source not in SOURCES[self.kind]:
            raise InvalidRequest(f"A {self.kind} trains from {' or '.join(SOURCES[self.kind])}, not {self.source!r}.")
        if self.source != "labels" and not self.source_path:
            raise InvalidRequest(f"Give the {self.source} folder.")
        if not 0.0 < self.val_fraction < 1.0:
            raise InvalidRequest("The held-out fraction must be between 0 and 1.")
        gpu = (self.device or "").startswith(("cuda", "0")) or (self.device is None and _has_cuda())
        r = TrainRequest(**asdict(self))
        if self.kind == "detector":
            r.model = r.model or ("yolov8s.yaml" if gpu else "yolov8n.yaml")
            r.imgsz = r.imgsz or (640 if gpu else 416)
            r.batch = r.batch or (32 if gpu else 8)
            r.epochs = r.epochs or (100 if gpu else 30)
        else:
            r.batch = r.batch or (256 if gpu else 32)
            r.epochs = r.epochs or (60 if gpu else 6)
        if r.epochs < 1 or (r.minutes is not None and r.minutes <= 0):
            raise InvalidRequest("Epochs and minutes must be positive.")
        return r


# ============================================================================ job record


def _sig(value: Any) -> float:
    """A float with 5 significant digits (small losses stay readable, JSON stays short)."""
    return float(f"{float(value):.5g}")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class JobRecord:
    job_id: str
    kind: str
    status: str  #: starting/preparing/training/evaluating/registering, then done/failed/cancelled/interrupted
    started_at: str
    pid: int
    host: str
    request: dict[str, Any]
    updated_at: str = ""
    finished_at: str | None = None
    run_id: str | None = None
    phase: str = ""  #: what is happening, in words
    epoch: int | None = None
    epochs: int | None = None
    fraction: float = 0.0
    loss: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    message: str = ""
    error: str | None = None
    version_id: int | None = None

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATES

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "JobRecord":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def training_dir(lab: Lab) -> Path:
    return lab.settings.data_dir / "training"


def _job_file(lab: Lab) -> Path:
    return training_dir(lab) / "job.json"


def _cancel_file(lab: Lab) -> Path:
    return training_dir(lab) / "cancel"


class _FileLock:
    """An exclusive, non-blocking ``flock``: released by the kernel when the process dies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def read_job(lab: Lab) -> JobRecord | None:
    """The current (or last) job; a "running" record whose process is gone is marked
    interrupted here (nothing it did changed the model in use)."""
    data = registry.read_json(_job_file(lab))
    if not isinstance(data, dict):
        return None
    job = JobRecord.from_dict(data)
    if not job.active:
        return job
    probe = _FileLock(training_dir(lab) / "job.lock")
    if not probe.try_acquire():
        return job  # its owner is alive
    try:
        data = registry.read_json(_job_file(lab))  # it may have finished meanwhile
        job = JobRecord.from_dict(data) if isinstance(data, dict) else job
        if job.active:
            job.status = "interrupted"
            job.finished_at = job.finished_at or _now()
            job.message = ("The process running this job ended (killed or crashed) during "
                           f"{job.phase or job.status}. Nothing was registered or switched; start it again.")
            registry.write_json(_job_file(lab), job.to_dict())
            if job.run_id:
                _mark_run(lab, job.run_id, "interrupted")
    finally:
        probe.release()
    return job


def _mark_run(lab: Lab, run_id: str, status: str, **extra: Any) -> None:
    path = registry.runs_root(lab) / run_id / "run.json"
    doc = registry.read_json(path) or {"run_id": run_id}
    doc.update({"status": status, **extra})
    registry.write_json(path, doc)


class JobReporter:
    """Owns the job record while the job runs: throttled atomic writes, progress events
    from the trainers, and the cancel check."""

    def __init__(self, lab: Lab, record: JobRecord, cancel_event: threading.Event, echo: bool = False) -> None:
        self.lab = lab
        self.record = record
        self.cancel_event = cancel_event
        self.echo = echo
        self._last_write = 0.0
        self._last_cancel_check = 0.0
        self._phase_t0 = time.monotonic()
        self._minutes: float | None = record.request.get("minutes")
        self.write(force=True)

    # -- writing -------------------------------------------------------------------
    def write(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_write < 1.0:
            return
        self.record.updated_at = _now()
        registry.write_json(_job_file(self.lab), self.record.to_dict())
        self._last_write = now

    def say(self, text: str) -> None:
        if self.echo:
            print(text, flush=True)

    def phase(self, status: str, text: str) -> None:
        self.record.status = status
        self.record.phase = text
        self.record.fraction = max(self.record.fraction, PHASES.get(status, (0.0, 0.0))[0])
        self._phase_t0 = time.monotonic()
        self.say(f"[{status}] {text}")
        self.write(force=True)

    def within(self, fraction: float) -> None:
        lo, hi = PHASES.get(self.record.status, (0.0, 1.0))
        self.record.fraction = max(self.record.fraction, lo + (hi - lo) * min(max(fraction, 0.0), 1.0))

    # -- cancel --------------------------------------------------------------------
    def should_stop(self) -> bool:
        if self.cancel_event.is_set():
            return True
        now = time.monotonic()
        if now - self._last_cancel_check >= 0.5:
            self._last_cancel_check = now
            try:
                if _cancel_file(self.lab).read_text().strip() == self.record.job_id:
                    self.cancel_event.set()
            except OSError:
                pass
        return self.cancel_event.is_set()

    @property
    def cancelled(self) -> bool:
        return self.should_stop()

    # -- events from data preparation, trainers, evaluation ---------------------------
    def event(self, e: dict) -> None:
        kind = e.get("kind") or e.get("stage")
        rec = self.record
        if kind in ("prepare", "export"):
            if e.get("total"):
                self.within(e["done"] / e["total"])
                rec.phase = f"preparing data: {e['done']} of {e['total']}" + (
                    f" ({e['chips']} faces)" if "chips" in e else "")
        elif kind == "step":
            rec.epoch = int(e.get("epoch") or 0) or rec.epoch
            rec.epochs = self._planned(e) or rec.epochs
            loss = e.get("loss")
            rec.loss = {k: _sig(v) for k, v in loss.items()} if isinstance(loss, dict) else (
                {"loss": _sig(loss)} if loss is not None else rec.loss)
            self._training_fraction(e)
        elif kind == "epoch":
            row = {k: (_sig(v) if isinstance(v, (float, np.floating)) else v) for k, v in e.items() if k != "kind"}
            rec.history.append(row)
            del rec.history[:-MAX_HISTORY]
            rec.epoch = int(e.get("epoch") or 0) or rec.epoch
            rec.epochs = self._planned(e) or rec.epochs
            rec.metrics = {k: v for k, v in row.items() if isinstance(v, float) and ("metrics/" in k or k.startswith("val_"))}
            rec.loss = {k: v for k, v in row.items() if isinstance(v, float) and "loss" in k} or rec.loss
            self._training_fraction(e, epoch_done=True)
            stage = f" {row['stage']}" if "stage" in row else ""
            self.say(f"  epoch {rec.epoch}/{rec.epochs}{stage}: " + ", ".join(
                f"{k} {v:.4g}" for k, v in {**rec.loss, **rec.metrics}.items()))
            self.write(force=True)
            return
        elif kind == "eval":
            if e.get("total"):
                self.within(e["done"] / e["total"])
                rec.phase = f"evaluating: {e['done']} of {e['total']}"
        elif kind == "info":
            notes = {k: v for k, v in e.items() if k in ("device", "split", "stage", "classes", "teacher_metrics")}
            if notes:
                self.say(f"  info: {notes}")
        self.write()

    def _planned(self, e: dict) -> int:
        """Epochs the trainer plans; for the detector at most the epochs asked for
        (ultralytics' time mode re-plans them to fill the time cap, see _train_detector)."""
        planned = int(e.get("epochs") or 0)
        asked = self.record.request.get("epochs")
        if self.record.kind == "detector" and asked:
            planned = min(planned, int(asked)) if planned else int(asked)
        return planned

    def _training_fraction(self, e: dict, epoch_done: bool = False) -> None:
        rec = self.record
        frac = 0.0
        if rec.epochs:
            done = (rec.epoch or 0) if epoch_done else max(0, (rec.epoch or 1) - 1)
            if "step" in e and "steps" in e and not epoch_done:
                done += e["step"] / max(1, e["steps"])
            frac = done / rec.epochs
            if "stage" in e:  # the embedder trains in stages; count them together
                stages = rec.request.get("_stage_epochs") or {}
                offset = sum(n for s, n in stages.items() if s == "distill") if e["stage"] == "margin" else 0
                total = sum(stages.values()) or rec.epochs
                frac = (offset + done) / total
        if self._minutes:
            frac = max(frac, (time.monotonic() - self._phase_t0) / (60.0 * self._minutes))
        self.within(frac)


# ============================================================================ data


@dataclass
class DetectorData:
    data_yaml: Path
    val_images: list[Callable[[], np.ndarray]]
    val_boxes: list[np.ndarray]
    snapshot: dict[str, Any]


def _labelled_detection_samples(lab: Lab):
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


def prepare_detector_data(lab: Lab, req: TrainRequest, run_dir: Path, reporter: JobReporter) -> DetectorData:
    from models.training.chip_data import read_rgb
    from models.training.yolo_dataset import export_yolo_dataset, face_mask_samples, split_samples

    if req.source == "face_mask":
        root = Path(req.source_path or "")
        if not (root / "train.txt").is_file():
            raise InvalidRequest(f"{root} is not the face_mask folder (no train.txt).")
        train, val = face_mask_samples(root, "train"), face_mask_samples(root, "val")
        snapshot = {"source": "face_mask", "path": str(root), "split": "the dataset's own train.txt / val.txt",
                    "train": [s.image.stem for s in train], "val": [s.image.stem for s in val]}
    else:
        labelled = _labelled_detection_samples(lab)
        if len(labelled) < 4 or sum(len(s.boxes) for s, _, _ in labelled) < 2:
            raise InvalidRequest(
                f"Training the detector needs at least 4 reviewed images with faces (there are {len(labelled)}); "
                "review more in the Label tab.")
        meta = {str(s.image.resolve()): (image_id, face_ids) for s, image_id, face_ids in labelled}
        train, val = split_samples([s for s, _, _ in labelled], req.val_fraction, req.seed)
        snapshot = {"source": "labels", "split": f"image-disjoint, seed {req.seed}, val fraction {req.val_fraction}",
                    "train_images": [meta[str(s.image.resolve())][0] for s in train],
                    "val_images": [meta[str(s.image.resolve())][0] for s in val],
                    "train_faces": [fid for s in train for fid in meta[str(s.image.resolve())][1]],
                    "val_faces": [fid for s in val for fid in meta[str(s.image.resolve())][1]]}
    info = export_yolo_dataset(train, val, run_dir / "dataset", mode="symlink", on_progress=reporter.event)
    snapshot.update({"train_boxes": info.boxes["train"], "val_boxes": info.boxes["val"],
                     "dropped_boxes": info.dropped_boxes})
    registry.write_json(run_dir / "split.json", snapshot)
    if req.source == "labels":  # store files are named by their sha256
        loaders = [(lambda sha=s.image.stem: lab.images.open(sha)) for s in val]
    else:
        loaders = [(lambda p=s.image: read_rgb(p)) for s in val]
    return DetectorData(info.data_yaml, loaders, [np.asarray(s.boxes, dtype=np.float64).reshape(-1, 4) for s in val],
                        snapshot)


def _teacher_vectors(lab: Lab, face_ids: list[int]) -> dict[int, np.ndarray]:
    version = lab.model_version
    with lab.sessions() as session:
        rows = session.scalars(
            select(Embedding).where(Embedding.face_id.in_(face_ids), Embedding.model_version == version)).all()
        return {r.face_id: r.as_array() for r in rows}


def labelled_chipset(lab: Lab, store_size: int, reporter: JobReporter | None = None):
    """Aligned chips of every named face (not rejected), their names, and the vectors
    of the embedder in use (stored ones; computed where missing) as teacher targets."""
    from models.align import face_chips
    from models.training.chip_data import ChipSet
    from models.types import FaceBox

    with lab.sessions() as session:
        rows = session.execute(
            select(Face.id, Face.x1, Face.y1, Face.x2, Face.y2, Face.score, Face.landmarks, Image.sha256,
                   Identity.name)
            .join(Image, Face.image_id == Image.id).join(Identity, Face.identity_id == Identity.id)
            .where(Face.review_status != ReviewStatus.REJECTED).order_by(Face.id)
        ).all()
    stored = _teacher_vectors(lab, [r.id for r in rows])
    by_image: dict[str, list] = {}
    for r in rows:
        by_image.setdefault(r.sha256, []).append(r)
    names: dict[str, int] = {}
    chips, labels, teacher, sources = [], [], [], []
    for n, (sha, faces) in enumerate(by_image.items()):
        if reporter is not None and reporter.should_stop():
            raise JobCancelled("cancelled while preparing the faces")
        image = lab.images.open(sha)
        boxes = [FaceBox(f.x1, f.y1, f.x2, f.y2, f.score,
                         np.asarray(f.landmarks, np.float32) if f.landmarks is not None else None) for f in faces]
        boxes = lab.landmarker.predict(image, boxes, only_missing=True)
        aligned = face_chips(image, boxes, size=CHIP_SIZE, padding=CHIP_PADDING)
        missing = [i for i, f in enumerate(faces) if f.id not in stored]
        computed = lab.embedder.embed(image, [boxes[i] for i in missing]) if missing else []
        extra = dict(zip(missing, computed))
        for i, f in enumerate(faces):
            chip = aligned[i]
            if store_size != CHIP_SIZE:
                import cv2

                chip = cv2.resize(chip, (store_size, store_size), interpolation=cv2.INTER_AREA)
            chips.append(chip)
            labels.append(names.setdefault(f.name, len(names)))
            teacher.append(stored[f.id] if f.id in stored else extra[i])
            sources.append(f"face:{f.id}")
        if reporter is not None:
            reporter.event({"kind": "prepare", "done": n + 1, "total": len(by_image), "chips": len(chips)})
    if not chips:
        return ChipSet(np.zeros((0, store_size, store_size, 3), np.uint8), np.zeros(0, np.int64), [], None, [], {})
    return ChipSet(np.stack(chips), np.asarray(labels), list(names), np.asarray(teacher, np.float32), sources,
                   {"source": "labels", "teacher": lab.model_version, "chip_size": CHIP_SIZE,
                    "chip_padding": CHIP_PADDING})


def lfw_chipset(lab: Lab, req: TrainRequest, reporter: JobReporter):
    """LFW train identities with 2+ images (seeded choice, bounded), chips through the
    app's detect -> landmarks -> align path, teacher = the embedder in use."""
    from models.align import face_chips
    from models.training.chip_data import lfw_items, prepare_chipset

    root = Path(req.source_path or "")
    if not (root / "train_identities.txt").is_file():
        raise InvalidRequest(f"{root} is not the LFW folder (no train_identities.txt).")
    items = lfw_items(root, "train_identities.txt")  # never the test half
    by_person: dict[str, list] = {}
    for path, person in items:
        by_person.setdefault(person, []).append(path)
    people = sorted(p for p, imgs in by_person.items() if len(imgs) >= 2)
    rng = np.random.default_rng(req.seed)
    chosen: list[tuple[Path, str]] = []
    limit = req.limit_images or len(items)
    for person in rng.permutation(people):
        imgs = by_person[str(person)][: req.max_per_identity]
        if len(chosen) + len(imgs) > limit:
            if len(chosen) >= limit - 1:
                break
            imgs = imgs[: limit - len(chosen)]
        chosen.extend((p, str(person)) for p in imgs)
    teacher_fn = getattr(lab.embedder, "embed_chips", None)

    def chips_fn(image: np.ndarray) -> np.ndarray:
        boxes = lab.detector.detect(image)
        if not boxes:
            return np.zeros((0, CHIP_SIZE, CHIP_SIZE, 3), np.uint8)
        box, _ = pick_centre_face(boxes, image.shape[1], image.shape[0])
        return face_chips(image, lab.landmarker.predict(image, [box]), size=CHIP_SIZE, padding=CHIP_PADDING)

    with cpu_threads():
        cs = prepare_chipset(chosen, chips_fn, teacher_fn, store_size=req.input_size,
                             meta={"source": "lfw train_identities", "teacher": lab.model_version,
                                   "detector": lab.detector.version, "chip_size": CHIP_SIZE,
                                   "chip_padding": CHIP_PADDING},
                             on_progress=reporter.event, should_stop=reporter.should_stop)
    if reporter.should_stop():
        raise JobCancelled("cancelled while preparing the faces")
    return cs


# ============================================================================ the run


@dataclass
class RunOutcome:
    run_id: str
    run_dir: Path
    status: str
    version: registry.VersionInfo | None
    comparisons: dict[str, Comparison]
    message: str


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def new_run(lab: Lab, kind: str) -> tuple[str, Path]:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    root = registry.runs_root(lab)
    for n in range(100):
        run_id = f"{stamp}-{kind}" + (f"-{n}" if n else "")
        try:
            (root / run_id).mkdir(parents=True)
            return run_id, root / run_id
        except FileExistsError:
            continue
    raise FaceLabError("could not create a run folder")


def _train_detector(lab: Lab, req: TrainRequest, run_dir: Path, reporter: JobReporter) -> RunOutcome:
    from models.detectors.yolo_detector import YoloDetector
    from models.evaluation import plots
    from models.training.detector_trainer import DetectorTrainConfig, train_detector

    reporter.phase("preparing", "exporting the labelled images as a YOLO dataset")
    data = prepare_detector_data(lab, req, run_dir, reporter)
    cpu = not _has_cuda() if req.device is None else req.device == "cpu"
    config = DetectorTrainConfig(
        project=run_dir / "work", name="train", model=req.model, epochs=req.epochs, imgsz=req.imgsz, batch=req.batch,
        device=req.device, workers=0 if cpu else 8, seed=req.seed, time_limit_min=req.minutes,
        val=req.validate_every_epoch, plots=False, patience=max(50, req.epochs), close_mosaic=min(10, req.epochs // 3),
        output=run_dir / "weights" / "detector.pt")
    registry.write_json(run_dir / "run.json", {"run_id": run_dir.name, "kind": "detector", "status": "training",
                                               "request": asdict(req), "config": config.to_dict()})
    reporter.phase("training", f"training {req.model} at {req.imgsz} px")

    def stop() -> bool:
        # ultralytics' time mode re-plans the epochs to fill the minutes (so its LR
        # schedule ends annealed); the epochs asked for stay an upper bound
        return reporter.should_stop() or len(reporter.record.history) >= req.epochs

    with cpu_threads(req.threads):
        result = train_detector(config, data.data_yaml, on_progress=reporter.event, should_stop=stop)
        threads = _torch_threads()  # ultralytics sets min(8, cores - 1) itself on a CPU
    shutil.rmtree(result.run_dir / "weights", ignore_errors=True)  # optimizer-laden copies; ours is exported
    if reporter.cancelled:
        raise JobCancelled("cancelled during training")
    if result.weights is None:
        raise FaceLabError("training ended before the first epoch finished; no weights to evaluate")
    plots_dir = run_dir / "plots"
    curves = {}
    if result.history:
        keys = [k for k in result.history[0] if k.startswith("train/")][:3] + ["metrics/mAP50(B)"]
        curves["training"] = str(plots.training_curves(result.history, keys, plots_dir / "training_curves.png",
                                                       "detector training"))

    reporter.phase("evaluating", f"in use vs candidate on {len(data.val_images)} held-out images")
    candidate = YoloDetector(result.weights, conf=0.001, imgsz=req.imgsz, device=req.device)
    in_use_name = f"in use: {lab.settings.detector.partition(':')[0]}"
    comparison = compare_detectors(
        [DetectorUnderTest(in_use_name, lab.detector), DetectorUnderTest("candidate", candidate, operating_conf=0.25)],
        data.val_images, data.val_boxes, plots_dir, f"{req.source} held-out images",
        on_progress=reporter.event, should_stop=reporter.should_stop)
    comparison.plots.update(curves)

    reporter.phase("registering", "adding the candidate to the model registry")
    deployed = YoloDetector(result.weights, imgsz=req.imgsz)
    summary = {k: comparison.metrics[k][-1] for k in ("AP50", "mAP50-95", "F1", "recall") if k in comparison.metrics}
    version = registry.register_version(
        lab, "detector", "yolo", deployed.version, f"yolo:{registry.relative_to_data(lab, result.weights)}",
        file_path=registry.relative_to_data(lab, result.weights), sha256=result.version.removeprefix("yolo-"),
        options={"imgsz": req.imgsz}, run_id=run_dir.name, summary=summary)
    run_doc = {"train_seconds": result.seconds, "epochs_completed": result.epochs_completed, "device": result.device,
               "torch_threads_training": threads,
               "history": result.history, "ultralytics_val": result.metrics, "notes": result.notes}
    return _finish(lab, run_dir, req, version, {"held_out": comparison}, data.snapshot, run_doc)


def _stage_epochs(req: TrainRequest, has_teacher: bool, margin_possible: bool) -> tuple[int, int]:
    total = int(req.epochs or 1)
    if not has_teacher:
        return 0, total
    if not margin_possible:
        return total, 0
    margin = total // 3
    return total - margin, margin


def _train_embedder(lab: Lab, req: TrainRequest, run_dir: Path, reporter: JobReporter) -> RunOutcome:
    from models.embedders.resnet50 import ResNet50Embedder
    from models.evaluation import plots
    from models.training.chip_data import identity_split
    from models.training.embedder_trainer import EmbedderTrainConfig, train_embedder

    reporter.phase("preparing", "aligning the faces (the app's own path) and reading the teacher's vectors")
    if req.source == "lfw":
        cs = lfw_chipset(lab, req, reporter)
    else:
        with cpu_threads():
            cs = labelled_chipset(lab, req.input_size, reporter)
    labels = cs.labels
    ids, counts = np.unique(labels[labels >= 0], return_counts=True)
    multi = int((counts >= 2).sum())
    if multi < 3:
        raise InvalidRequest(
            f"Training the embedder needs at least 3 named people with 2+ faces each (there are {multi}); "
            "name more faces first.")
    train_idx, val_idx, train_ids, val_ids = identity_split(labels, req.val_fraction, req.seed)
    train_counts = np.unique(labels[train_idx][labels[train_idx] >= 0], return_counts=True)[1]
    distill, margin = _stage_epochs(req, cs.teacher is not None, int((train_counts >= 2).sum()) >= 2)
    reporter.record.request["_stage_epochs"] = {"distill": distill, "margin": margin}
    snapshot = {"source": req.source, "split": f"identity-disjoint, seed {req.seed}, val fraction {req.val_fraction}",
                "train_identities": [cs.identities[i] for i in train_ids],
                "val_identities": [cs.identities[i] for i in val_ids],
                "train_items": [cs.sources[i] for i in train_idx] if cs.sources else [],
                "val_items": [cs.sources[i] for i in val_idx] if cs.sources else [],
                "faces_prepared": int(len(cs)), "meta": {k: v for k, v in cs.meta.items() if not isinstance(v, dict)}}
    registry.write_json(run_dir / "split.json", snapshot)
    config = EmbedderTrainConfig(
        output_dir=run_dir / "weights", input_size=req.input_size, distill_epochs=distill, margin_epochs=margin,
        batch_size=min(req.batch, max(2, len(train_idx))), val_fraction=req.val_fraction, seed=req.seed,
        device=req.device, time_limit_min=req.minutes, max_steps_per_epoch=req.max_steps_per_epoch,
        log_every=1 if len(train_idx) < 40 * req.batch else 5, save_every=1)
    registry.write_json(run_dir / "run.json", {"run_id": run_dir.name, "kind": "embedder", "status": "training",
                                               "request": asdict(req), "config": config.to_dict()})
    reporter.phase("training", f"training ResNet50 on {len(train_idx)} faces of {len(train_ids)} people "
                               f"({distill} distillation + {margin} margin epochs)")
    with cpu_threads(req.threads):
        threads = _torch_threads()
        result = train_embedder(config, cs, on_progress=reporter.event, should_stop=reporter.should_stop)
    if reporter.cancelled:
        raise JobCancelled("cancelled during training")
    if result.checkpoint is None:
        raise FaceLabError("training ended before the first epoch finished; no weights to evaluate")
    weights = run_dir / "weights" / "embedder.pt"
    os.replace(result.checkpoint, weights)
    if result.last_checkpoint is not None:
        result.last_checkpoint.unlink(missing_ok=True)
    plots_dir = run_dir / "plots"
    curves = {}
    if result.history:
        curves["training"] = str(plots.training_curves(result.history, ["train_loss", "val_acc", "val_rank1"],
                                                       plots_dir / "training_curves.png", "embedder training"))

    reporter.phase("evaluating", f"in use vs candidate on {len(val_idx)} faces of {len(val_ids)} held-out people")
    candidate = ResNet50Embedder(weights, device=req.device)
    val_labels = labels[val_idx]
    in_use_name = f"in use: {lab.settings.embedder.partition(':')[0]}"
    comparisons = {"held_out": compare_embeddings(
        {in_use_name: cs.teacher[val_idx], "candidate": candidate.embed_chips(cs.chips[val_idx])},
        val_labels, cs.identities, plots_dir, f"{req.source} held-out people", seed=req.seed)}
    if req.source == "lfw":
        comparisons["lfw_test_half"] = compare_on_lfw_test_half(
            lab.detector, lab.landmarker, {in_use_name: lab.embedder, "candidate": candidate}, req.source_path,
            plots_dir, max_pairs=req.eval_pairs, on_progress=reporter.event, should_stop=reporter.should_stop)
    for c in comparisons.values():
        c.plots.update(curves)
        curves = {}

    reporter.phase("registering", "adding the candidate to the model registry")
    main = comparisons["held_out"]
    summary = {k: main.metrics[k][-1] for k in ("verification accuracy", "ROC AUC", "rank-1") if k in main.metrics}
    if "lfw_test_half" in comparisons:
        summary["LFW test-half accuracy"] = comparisons["lfw_test_half"].metrics["LFW test-half accuracy"][-1]
    threshold = main.details["per_model"]["candidate"]["calibrated_threshold"]
    version = registry.register_version(
        lab, "embedder", "resnet50", candidate.version, f"resnet50:{registry.relative_to_data(lab, weights)}",
        file_path=registry.relative_to_data(lab, weights), sha256=candidate.version.removeprefix("resnet50-"),
        run_id=run_dir.name, summary=summary, match_threshold=float(threshold))
    run_doc = {"train_seconds": result.seconds, "device": result.device, "history": result.history,
               "torch_threads_training": threads,
               "best_val_metrics": result.best_metrics, "teacher_val_metrics": result.teacher_metrics,
               "match_threshold": float(threshold),
               "match_threshold_note": "best-accuracy threshold on the held-out people's pairs"}
    return _finish(lab, run_dir, req, version, comparisons, snapshot, run_doc)


def _finish(lab: Lab, run_dir: Path, req: TrainRequest, version: registry.VersionInfo,
            comparisons: dict[str, Comparison], snapshot: dict, run_doc: dict) -> RunOutcome:
    registry.write_json(run_dir / "eval.json", {k: c.to_dict() for k, c in comparisons.items()})
    doc = registry.read_json(run_dir / "run.json") or {}
    doc.update({"run_id": run_dir.name, "kind": req.kind, "status": "done", "request": asdict(req),
                "version_id": version.id, "version": version.version, "spec": version.spec,
                "data": {k: v for k, v in snapshot.items() if not isinstance(v, list)}, **run_doc,
                "finished_at": _now()})
    registry.write_json(run_dir / "run.json", doc)
    main = comparisons["held_out"]
    line = ", ".join(f"{k} {v[0]:.3f} -> {v[-1]:.3f}" for k, v in list(main.metrics.items())[:3]
                     if v[0] is not None and v[-1] is not None)
    return RunOutcome(run_dir.name, run_dir, "done", version, comparisons,
                      f"Registered {version.label()} (not in use yet). In use -> candidate: {line}.")


def run_training(lab: Lab, req: TrainRequest, reporter: JobReporter) -> RunOutcome:
    """Prepare, train, evaluate, register (synchronously, in the calling thread)."""
    run_id, run_dir = new_run(lab, req.kind)
    reporter.record.run_id = run_id
    registry.write_json(run_dir / "run.json", {"run_id": run_id, "kind": req.kind, "status": "preparing",
                                               "request": asdict(req), "started_at": _now()})
    if req.kind == "detector":
        return _train_detector(lab, req, run_dir, reporter)
    return _train_embedder(lab, req, run_dir, reporter)


def _execute(lab: Lab, reporter: JobReporter, req: TrainRequest, lock: _FileLock) -> RunOutcome | None:
    """Run the job and always leave a final record (then release the lock)."""
    rec = reporter.record
    outcome = None
    try:
        outcome = run_training(lab, req, reporter)
        rec.status, rec.fraction, rec.version_id = "done", 1.0, outcome.version.id if outcome.version else None
        rec.message = outcome.message
    except (JobCancelled, EvaluationStopped) as exc:
        rec.status, rec.message = "cancelled", f"Cancelled ({exc}). Nothing was registered or switched."
    except FaceLabError as exc:
        rec.status, rec.error = "failed", str(exc)
        rec.message = f"Failed: {exc}"
    except Exception as exc:  # noqa: BLE001 - any crash becomes a readable record
        log.exception("training job %s failed", rec.job_id)
        rec.status, rec.error = "failed", f"{type(exc).__name__}: {exc}"
        rec.message = f"Failed: {type(exc).__name__}: {exc}. The model in use was not changed."
        if rec.run_id:
            (registry.runs_root(lab) / rec.run_id / "error.txt").write_text(traceback.format_exc())
    finally:
        rec.finished_at = _now()
        rec.phase = rec.status
        if rec.run_id and rec.status != "done":
            _mark_run(lab, rec.run_id, rec.status, message=rec.message, finished_at=rec.finished_at)
        if rec.run_id:
            registry.write_json(registry.runs_root(lab) / rec.run_id / "job.json", rec.to_dict())
        reporter.say(rec.message)
        reporter.write(force=True)
        _cancel_file(lab).unlink(missing_ok=True)
        lock.release()
    return outcome


# ============================================================================ job control


class _Jobs:
    """This process's running job (its thread and cancel flag)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.cancel: threading.Event | None = None
        self.job_id: str | None = None


_JOBS = _Jobs()


def _begin(lab: Lab, req: TrainRequest, echo: bool) -> tuple[JobReporter, _FileLock, threading.Event]:
    req = req.resolved()
    lock = _FileLock(training_dir(lab) / "job.lock")
    if not lock.try_acquire():
        job = read_job(lab)
        if job is not None and job.active:
            raise Conflict(f"a training job is running: {job.kind} started at {job.started_at}, cancel it first")
        raise Conflict("a training job is running (its record is being written), cancel it first")
    try:
        _cancel_file(lab).unlink(missing_ok=True)
        job_id = f"{datetime.now(UTC):%Y%m%d%H%M%S}-{os.getpid()}-{req.kind}"
        record = JobRecord(job_id=job_id, kind=req.kind, status="starting", started_at=_now(), pid=os.getpid(),
                           host=socket.gethostname(), request=asdict(req), phase="starting",
                           epochs=req.epochs)
        event = threading.Event()
        reporter = JobReporter(lab, record, event, echo=echo)
    except BaseException:
        lock.release()
        raise
    return reporter, lock, event


def start_training(lab: Lab, req: TrainRequest) -> JobRecord:
    """Start a job in a background thread; ``Conflict`` if one is running anywhere."""
    with _JOBS.lock:
        reporter, lock, event = _begin(lab, req, echo=False)
        req = TrainRequest(**{k: v for k, v in reporter.record.request.items() if not k.startswith("_")})
        thread = threading.Thread(target=_execute, args=(lab, reporter, req, lock), name=f"train-{req.kind}",
                                  daemon=True)
        _JOBS.thread, _JOBS.cancel, _JOBS.job_id = thread, event, reporter.record.job_id
        thread.start()
        return JobRecord.from_dict(reporter.record.to_dict())


def cancel_training(lab: Lab) -> str:
    """Ask the running job (in this process or another one) to stop."""
    job = read_job(lab)
    if job is None or not job.active:
        raise NotFound("No training job is running.")
    if _JOBS.job_id == job.job_id and _JOBS.cancel is not None:
        _JOBS.cancel.set()
    training_dir(lab).mkdir(parents=True, exist_ok=True)
    (_cancel_file(lab)).write_text(job.job_id)
    return f"Asked the {job.kind} job to stop; it ends after the current batch."


def wait_for_training(timeout: float | None = None) -> bool:
    """Join this process's job thread; True if none is left running."""
    thread = _JOBS.thread
    if thread is not None:
        thread.join(timeout)
        return not thread.is_alive()
    return True


def run_in_foreground(lab: Lab, req: TrainRequest, echo: bool = True) -> tuple[JobRecord, RunOutcome | None]:
    """The CLI's way: same job record and lock, in this thread; Ctrl-C cancels."""
    with _JOBS.lock:
        reporter, lock, event = _begin(lab, req, echo=echo)
    req = TrainRequest(**{k: v for k, v in reporter.record.request.items() if not k.startswith("_")})
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, lambda *_: event.set())
    try:
        outcome = _execute(lab, reporter, req, lock)
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)
    return reporter.record, outcome


# ============================================================================ results for display


def list_runs(lab: Lab) -> list[dict[str, Any]]:
    """Every run folder's run.json, newest first."""
    root = registry.runs_root(lab)
    if not root.is_dir():
        return []
    docs = []
    for d in sorted(root.iterdir(), reverse=True):
        doc = registry.read_json(d / "run.json")
        if isinstance(doc, dict):
            docs.append(doc)
    return docs


def run_comparisons(lab: Lab, run_id: str) -> dict[str, Comparison]:
    if not run_id or "/" in run_id or run_id.startswith("."):
        raise NotFound("No such run.")
    data = registry.read_json(registry.runs_root(lab) / run_id / "eval.json")
    if not isinstance(data, dict):
        return {}
    return {k: Comparison.from_dict(v) for k, v in data.items()}


def augmentation_preview_image(lab: Lab, faces: int = 4, seed: int = 0, input_size: int = 112):
    """The embedder's training augmentation on a few stored faces (named ones first),
    aligned by the app's path: one row per face, the plain chip first."""
    from models.align import face_chips
    from models.training.augment import AugmentConfig, augmentation_preview
    from models.types import FaceBox

    with lab.sessions() as session:
        rows = session.execute(
            select(Face.id, Face.x1, Face.y1, Face.x2, Face.y2, Face.score, Face.landmarks, Image.sha256)
            .join(Image, Face.image_id == Image.id).where(Face.review_status != ReviewStatus.REJECTED)
            .order_by(Face.identity_id.is_(None), Face.id).limit(faces)
        ).all()
    if not rows:
        raise InvalidRequest("No faces yet: add photos in the Detect tab first.")
    chips = []
    for r in rows:
        image = lab.images.open(r.sha256)
        box = FaceBox(r.x1, r.y1, r.x2, r.y2, r.score,
                      np.asarray(r.landmarks, np.float32) if r.landmarks is not None else None)
        box = lab.landmarker.predict(image, [box], only_missing=True)[0]
        chips.append(face_chips(image, [box], size=input_size, padding=CHIP_PADDING)[0])
    return augmentation_preview(np.stack(chips), AugmentConfig(), output_size=input_size, per_chip=7, seed=seed,
                                max_chips=faces)


# ============================================================================ CLI


def export_results(lab: Lab, run_id: str, prefix: Path | str, command: str = "") -> list[Path]:
    """Copy a run's evaluation to ``<prefix>.json`` and its plots to ``<prefix>_<plot>.png``
    (e.g. docs/results/train_detector.json), with the command and machine that made them."""
    import platform

    import torch

    run_dir = registry.runs_root(lab) / run_id
    run = registry.read_json(run_dir / "run.json") or {}
    evaluation = registry.read_json(run_dir / "eval.json") or {}
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for comparison in evaluation.values():
        for label, path in comparison.get("plots", {}).items():
            stem = Path(path).stem.removeprefix(f"{run.get('kind', '')}_")
            dest = prefix.with_name(f"{prefix.name}_{stem}.png")
            shutil.copyfile(path, dest)
            comparison["plots"][label] = dest.name
            written.append(dest)
    split = registry.read_json(run_dir / "split.json") or {}
    doc = {
        "command": command, "run_id": run_id, "kind": run.get("kind"), "status": run.get("status"),
        "request": run.get("request"), "device": run.get("device"),
        "train_seconds": run.get("train_seconds"), "epochs_completed": run.get("epochs_completed"),
        "torch_threads_training": run.get("torch_threads_training"),
        "history": run.get("history"), "evaluation": evaluation,
        "data": {k: (len(v) if isinstance(v, list) else v) for k, v in split.items()},
        "extra": {k: run[k] for k in ("ultralytics_val", "best_val_metrics", "teacher_val_metrics", "match_threshold",
                                      "match_threshold_note") if k in run},
        "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                    "cuda": torch.cuda.is_available(), "load_avg_at_export": os.getloadavg()},
        "date": _now(),
    }
    registry.write_json(prefix.with_suffix(".json"), doc)
    return [prefix.with_suffix(".json"), *written]


def train_command(lab: Lab, req: TrainRequest, results: Path | None = None, command: str = "") -> int:
    """``python app.py train ...``: runs in the foreground, prints progress; exit 0 done,
    1 failed, 2 refused, 130 cancelled. ``results``: also export the evaluation there."""
    try:
        record, outcome = run_in_foreground(lab, req)
    except FaceLabError as exc:
        print(f"error: {exc}")
        return 2
    if outcome is not None and results is not None:
        for path in export_results(lab, outcome.run_id, results, command):
            print(f"wrote {path}")
    if outcome is not None:
        for name, comparison in outcome.comparisons.items():
            print(f"\n{name}: {', '.join(comparison.names)} (change = candidate - in use)")
            for row in comparison.table():
                print("  " + " | ".join("-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v)) for v in row))
        print(f"\nrun folder: {outcome.run_dir}\npromote with: python app.py models promote {outcome.version.id}")
    return {"done": 0, "cancelled": 130}.get(record.status, 1)


def models_command(lab: Lab, action: str, version_id: int | None = None, kind: str | None = None) -> int:
    """``python app.py models list|promote ID|rollback KIND [--to ID]``."""
    from tqdm import tqdm

    try:
        if action == "list":
            rows = registry.versions_table(lab)
            if not rows:
                print("no registered models yet (train one: python app.py train detector|embedder)")
            for row in rows:
                print(f"#{row[0]:<4} {row[1]:<9} {row[2]:<10} {row[3]:<34} {'IN USE' if row[4] else '':<6} "
                      f"{row[5]}  {row[6]}  {row[7]}")
            for k in KINDS:
                info = registry.active_version(lab, k)
                print(f"{k} in use: {info.label() if info else registry.in_use_spec(lab, k) + ' (settings default)'}")
            return 0
        with tqdm(total=100, unit="%", desc=action.capitalize()) as bar:
            def progress(fraction: float, text: str) -> None:
                bar.n = round(100 * fraction)
                bar.set_postfix_str(text)
                bar.refresh()

            if action == "promote":
                if version_id is None:
                    raise InvalidRequest("Give the version id to promote (see `python app.py models list`).")
                message = registry.promote(lab, version_id, progress)
            else:
                if kind is None:
                    raise InvalidRequest("Say which model to roll back: detector or embedder.")
                message = registry.rollback(lab, kind, version_id, progress)
        print(message)
        return 0
    except FaceLabError as exc:
        print(f"error: {exc}")
        return 2


def parse_minutes(value: str | float | None) -> float | None:
    if value in (None, ""):
        return None
    v = float(value)
    return v if math.isfinite(v) and v > 0 else None


def request_from_args(args: Any) -> TrainRequest:
    """A TrainRequest from ``python app.py train`` arguments."""
    source, path = "labels", None
    if getattr(args, "from_face_mask", None):
        source, path = "face_mask", args.from_face_mask
    elif getattr(args, "from_lfw", None):
        source, path = "lfw", args.from_lfw
    req = TrainRequest(kind=args.kind, source=source, source_path=str(path) if path else None, epochs=args.epochs,
                       minutes=args.minutes, imgsz=args.imgsz, model=args.model, batch=args.batch, device=args.device,
                       limit_images=args.limit_images, eval_pairs=args.eval_pairs,
                       max_steps_per_epoch=args.max_steps, validate_every_epoch=not args.no_val,
                       threads=os.cpu_count())  # a CLI run has the process to itself
    if args.seed is not None:
        req.seed = args.seed
    if args.val_fraction is not None:
        req.val_fraction = args.val_fraction
    if args.input_size is not None:
        req.input_size = args.input_size
    return req


def cli_command(lab: Lab, args: Any) -> int:
    """Dispatch ``python app.py train ...`` and ``python app.py models ...``."""
    if args.command == "train":
        command = "python app.py " + " ".join(sys.argv[1:])
        return train_command(lab, request_from_args(args), getattr(args, "results", None), command)
    version_id, kind = args.to, None
    if args.action == "promote":
        if not (args.target or "").isdigit():
            print("error: give the version id to promote (see `python app.py models list`)")
            return 2
        version_id = int(args.target)
    elif args.action == "rollback":
        kind = args.target
    return models_command(lab, args.action, version_id, kind)
