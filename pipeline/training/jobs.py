"""Training jobs: train a detector or an embedder on collected labels (or face_mask /
LFW), compare it with the model in use on a test split nothing chose it on, and register
it (inactive) for promotion.

A job runs in **its own process** (``python -m pipeline.training.process``, started by
``start_training``), never in the web server's threads: the server only starts it,
reads its record and can ask it to stop; a job that crashes or is killed (even SIGKILL)
leaves the server serving and its record reads "failed". The command line
(``python app.py train ...``) runs the same job in its own process, in the foreground.

One job at a time per data folder. The running job holds an exclusive ``flock`` on
``data_dir/training/job.lock`` for its whole life (the web server takes it, hands it to
the job process and lets go); the kernel drops that lock when the process ends in any
way, so a job record that says "running" while the lock is free belongs to a dead
process and is reported as interrupted. Progress goes to ``data_dir/training/job.json``
(written atomically, at most about once a second, with an ETA), which is what the Train
tab polls, so a page reload, a second browser tab or a CLI run on the same data folder
all see the same job. Cancelling writes ``training/cancel`` (the job polls it between
batches), so the UI can also stop a job started from the CLI.

The run itself (three splits, training, threshold on the select split, comparison on
the test split, registration) is ``pipeline.training.run``; the data and its split,
``pipeline.training.data``. Nothing here changes the model in use: a run ends with an
inactive ``ModelVersion`` row; promotion is ``pipeline.training.registry.promote``.

Model files: the web app can only pick an architecture from
``models.model_files.ARCHITECTURES`` (from scratch) or a version registered by FaceLab
(fine-tune, sha256-checked). A checkpoint *path* is accepted only from the command line,
as the machine owner's own file (``--model PATH``).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from models.model_files import ARCHITECTURES
from pipeline.context import Lab
from pipeline.errors import Conflict, FaceLabError, InvalidRequest, NotFound
from pipeline.settings import REPO_ROOT
from pipeline.training import registry
from pipeline.training.data import CHIP_PADDING, JobCancelled
from pipeline.training.evaluate import Comparison, EvaluationStopped
from pipeline.training.run import RunOutcome, has_cuda, run_training, start_point
from storage.orm import Face, Image, ReviewStatus

log = logging.getLogger(__name__)

KINDS = ("detector", "embedder")
SOURCES = {"detector": ("labels", "face_mask"), "embedder": ("labels", "lfw")}
ACTIVE_STATES = ("starting", "preparing", "training", "evaluating", "registering")
#: share of the progress bar per phase (training dominates)
PHASES = {"starting": (0.0, 0.0), "preparing": (0.0, 0.1), "training": (0.1, 0.85), "evaluating": (0.85, 0.98),
          "registering": (0.98, 1.0)}
MAX_HISTORY = 1000

__all__ = ["ARCHITECTURES", "JobCancelled", "JobRecord", "JobReporter", "RunOutcome", "TrainRequest", "cancel_training", "read_job",
           "run_in_foreground", "start_training", "wait_for_training"]


# ============================================================================ requests


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
    #: shares of the images (detector) or of the people with 2+ faces (embedder) that pick
    #: the checkpoint and threshold (select) and that decide promotion (test); face_mask
    #: keeps its own val.txt as the test split
    select_fraction: float = 0.2
    test_fraction: float = 0.2
    device: str | None = None  #: None: first GPU if any, else cpu
    #: torch threads while training on a CPU (None: the process's setting; a job started
    #: from the web gets all cores but one, the CLI every core)
    threads: int | None = None
    #: detector, from scratch: an architecture of models.model_files.ARCHITECTURES
    model: str | None = None
    #: fine-tune: a version registered by FaceLab (its file is sha256-checked before loading)
    init_version: int | None = None
    #: fine-tune from a checkpoint file: the command line only (the machine owner's file;
    #: an ultralytics .pt is unpickled). start_training refuses it.
    model_path: str | None = None
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
        if not (0.0 < self.select_fraction < 1.0 and 0.0 <= self.test_fraction < 1.0) \
                or self.select_fraction + self.test_fraction > 0.8:
            raise InvalidRequest("The select share must be above 0, the test share at least 0, and together at most "
                                 "0.8 (the rest trains).")
        starts = [x for x in (self.model, self.init_version, self.model_path) if x not in (None, "")]
        if len(starts) > 1:
            raise InvalidRequest("Start from one thing: an architecture (from scratch), a registered version or a "
                                 "checkpoint file (fine-tune).")
        if self.model not in (None, ""):
            if self.kind != "detector" or self.model not in ARCHITECTURES:
                raise InvalidRequest(
                    f"{str(self.model)[:200]!r} is not a network FaceLab builds: the detector trains from scratch as "
                    f"one of {', '.join(ARCHITECTURES)}, or fine-tunes a version registered by FaceLab.")
        if self.model_path and not Path(self.model_path).expanduser().is_file():
            raise InvalidRequest(f"No checkpoint file at {self.model_path}.")
        gpu = (self.device or "").startswith(("cuda", "0")) or (self.device is None and has_cuda())
        r = TrainRequest(**asdict(self))
        if self.kind == "detector":
            if not (r.init_version is not None or r.model_path):
                r.model = r.model or ("yolov8s.yaml" if gpu else "yolov8n.yaml")
            r.imgsz = r.imgsz or (640 if gpu else 416)
            r.batch = r.batch or (32 if gpu else 8)
            r.epochs = r.epochs or (100 if gpu else 30)
        else:
            r.model = None
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
    eta_s: float | None = None  #: estimated seconds left in the current phase (training dominates)
    #: what each split holds, in words with its size ("test split: 40 images, 120 faces")
    splits: dict[str, str] = field(default_factory=dict)
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

    def hand_over(self) -> None:
        """Close this process's descriptor *without* unlocking: a child process that
        inherited it keeps the lock (flock belongs to the open file, not the process)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    @classmethod
    def adopt(cls, path: Path, fd: int) -> "_FileLock":
        """The lock held through an inherited descriptor (see ``hand_over``)."""
        lock = cls(path)
        lock.fd = fd
        return lock


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
    """Owns the job record while the job runs: throttled atomic writes with an ETA,
    progress events from the trainers, and the cancel check (a cancel file, Ctrl-C, or
    the app that started the job going away: ``parent_pid``)."""

    def __init__(self, lab: Lab, record: JobRecord, cancel_event: threading.Event, echo: bool = False,
                 parent_pid: int | None = None) -> None:
        self.lab = lab
        self.record = record
        self.cancel_event = cancel_event
        self.echo = echo
        self.parent_pid = parent_pid
        self.stop_reason: str | None = None  #: set when the job stops itself (not asked to)
        self._last_write = 0.0
        self._last_cancel_check = 0.0
        self._t0 = self._phase_t0 = time.monotonic()
        self._minutes: float | None = record.request.get("minutes")
        self.write(force=True)

    # -- writing -------------------------------------------------------------------
    def write(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_write < 1.0:
            return
        rec = self.record
        rec.updated_at = _now()
        rec.eta_s = self._phase_eta(now)
        registry.write_json(_job_file(self.lab), rec.to_dict())
        self._last_write = now

    def _phase_eta(self, now: float) -> float | None:
        """Seconds left in the current phase: a straight line through its progress so far
        (once there is enough of it to say), capped by the time limit while training."""
        rec = self.record
        lo, hi = PHASES.get(rec.status, (0.0, 0.0))
        elapsed = now - self._phase_t0
        done = (rec.fraction - lo) / (hi - lo) if hi > lo else 0.0
        if not rec.active or done < 0.05 or elapsed < 10.0:
            return None
        left = elapsed * (1.0 - done) / done
        if rec.status == "training" and self._minutes:
            left = min(left, max(0.0, 60.0 * self._minutes - elapsed))
        return round(left, 1)

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
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                self.stop_reason = "the app that started it stopped"
                self.cancel_event.set()
        return self.cancel_event.is_set()

    @property
    def cancelled(self) -> bool:
        return self.should_stop()

    # -- events from data preparation, trainers, evaluation ---------------------------
    def event(self, e: dict) -> None:
        kind = e.get("kind") or e.get("stage")
        handler = {"prepare": self._on_prepare, "export": self._on_prepare, "step": self._on_step,
                   "epoch": self._on_epoch, "eval": self._on_eval, "info": self._on_info}.get(kind)
        if handler is not None:
            handler(e)
        self.write(force=kind == "epoch")

    def _on_prepare(self, e: dict) -> None:
        if e.get("total"):
            self.within(e["done"] / e["total"])
            self.record.phase = f"preparing data: {e['done']} of {e['total']}" + (
                f" ({e['chips']} faces)" if "chips" in e else "")

    def _on_step(self, e: dict) -> None:
        rec = self.record
        rec.epoch = int(e.get("epoch") or 0) or rec.epoch
        rec.epochs = self._planned(e) or rec.epochs
        loss = e.get("loss")
        rec.loss = {k: _sig(v) for k, v in loss.items()} if isinstance(loss, dict) else (
            {"loss": _sig(loss)} if loss is not None else rec.loss)
        self._training_fraction(e)

    def _on_epoch(self, e: dict) -> None:
        rec = self.record
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
            f"{k} {v:.4g}" for k, v in {**rec.loss, **rec.metrics}.items())
            + (f" ({rec.splits['select']})" if rec.metrics and "select" in rec.splits else ""))

    def _on_eval(self, e: dict) -> None:
        if e.get("total"):
            self.within(e["done"] / e["total"])
            self.record.phase = f"evaluating: {e['done']} of {e['total']}"

    def _on_info(self, e: dict) -> None:
        notes = {k: v for k, v in e.items() if k in ("device", "split", "stage", "classes", "teacher_metrics", "start")}
        if notes:
            self.say(f"  info: {notes}")

    def _planned(self, e: dict) -> int:
        """Epochs the trainer plans; for the detector at most the epochs asked for
        (ultralytics' time mode re-plans them to fill the time cap, see DetectorRun.train)."""
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


# ============================================================================ running a job


def _execute(lab: Lab, reporter: JobReporter, req: TrainRequest, lock: _FileLock) -> RunOutcome | None:
    """Run the job and always leave a final record (then release the lock)."""
    rec = reporter.record
    outcome = None
    try:
        outcome = run_training(lab, req, reporter)
        rec.status, rec.fraction, rec.version_id = "done", 1.0, outcome.version.id if outcome.version else None
        rec.message = outcome.message
    except (JobCancelled, EvaluationStopped) as exc:
        why = f": {reporter.stop_reason}" if reporter.stop_reason else ""
        rec.status, rec.message = "cancelled", f"Cancelled ({exc}{why}). Nothing was registered or switched."
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
    """The job process this app started, and the thread that waits for it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.process: subprocess.Popen | None = None
        self.watcher: threading.Thread | None = None
        self.job_id: str | None = None


_JOBS = _Jobs()


def _new_record(req: TrainRequest) -> JobRecord:
    job_id = f"{datetime.now(UTC):%Y%m%d%H%M%S}-{os.getpid()}-{req.kind}"
    return JobRecord(job_id=job_id, kind=req.kind, status="starting", started_at=_now(), pid=os.getpid(),
                     host=socket.gethostname(), request=asdict(req), phase="starting", epochs=req.epochs)


def _begin(lab: Lab, req: TrainRequest, echo: bool) -> tuple[JobReporter, _FileLock, threading.Event]:
    """Take the job lock (Conflict if a job holds it) and write the "starting" record."""
    req = req.resolved()
    start_point(lab, req)  # a bad or changed registered start checkpoint is refused now, not in the job
    lock = _FileLock(training_dir(lab) / "job.lock")
    if not lock.try_acquire():
        job = read_job(lab)
        if job is not None and job.active:
            raise Conflict(f"a training job is running: {job.kind} started at {job.started_at}, cancel it first")
        raise Conflict("a training job is running (its record is being written), cancel it first")
    try:
        _cancel_file(lab).unlink(missing_ok=True)
        event = threading.Event()
        reporter = JobReporter(lab, _new_record(req), event, echo=echo)
    except BaseException:
        lock.release()
        raise
    return reporter, lock, event


def _request_of(record: JobRecord) -> TrainRequest:
    return TrainRequest(**{k: v for k, v in record.request.items() if not k.startswith("_")})


def start_training(lab: Lab, req: TrainRequest) -> JobRecord:
    """Start a job in its own process (the web app's way); ``Conflict`` if one is running
    anywhere. A checkpoint path is refused here: only the command line takes one."""
    if req.model_path:
        raise InvalidRequest("A checkpoint file path is accepted only on the command line (python app.py train "
                             "--model PATH), as the machine owner's own file. Here, start from an architecture or "
                             "fine-tune a version registered by FaceLab.")
    if req.threads is None:  # the job has a process of its own; leave one core to the app
        req = TrainRequest(**{**asdict(req), "threads": max(1, (os.cpu_count() or 2) - 1)})
    with _JOBS.lock:
        reporter, lock, _ = _begin(lab, req, echo=False)
        record = reporter.record
        log_path = training_dir(lab) / "logs" / f"{record.job_id}.log"
        try:
            process = _spawn(lab, record, lock, log_path)
        except BaseException as exc:
            record.status, record.error = "failed", f"{type(exc).__name__}: {exc}"
            record.message = f"Failed: could not start the training process ({record.error})."
            record.finished_at = _now()
            reporter.write(force=True)
            lock.release()
            raise
        lock.hand_over()  # the job process holds the lock from now on
        watcher = threading.Thread(target=_watch, args=(lab, process, record.job_id, log_path),
                                   name=f"train-watch-{record.job_id}", daemon=True)
        _JOBS.process, _JOBS.watcher, _JOBS.job_id = process, watcher, record.job_id
        watcher.start()
        started = JobRecord.from_dict(record.to_dict())
        started.pid = process.pid
        return started


def _spawn(lab: Lab, record: JobRecord, lock: _FileLock, log_path: Path) -> subprocess.Popen:
    """``python -m pipeline.training.process`` with the lock's descriptor; the settings
    (database URL included) travel on its stdin, never on disk or the command line."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    spec = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(lab.settings).items()},
            "record": record.to_dict(), "lock_path": str(lock.path), "lock_fd": lock.fd, "parent_pid": os.getpid()}
    env = {**os.environ, "YOLO_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "pipeline.training.process"], cwd=REPO_ROOT, env=env,
                                   stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                                   pass_fds=(lock.fd,), text=True)
    assert process.stdin is not None
    process.stdin.write(json.dumps(spec))
    process.stdin.close()
    return process


def _exit_words(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


def _watch(lab: Lab, process: subprocess.Popen, job_id: str, log_path: Path) -> None:
    """Wait for the job process (a thread that sleeps in ``wait``); if it died without
    a final record (killed, crashed in C, out of memory), write one: failed."""
    returncode = process.wait()
    deadline = time.monotonic() + 30.0
    probe = _FileLock(training_dir(lab) / "job.lock")
    while not probe.try_acquire():  # the dead job's children may hold it a moment longer
        if time.monotonic() > deadline:
            return  # read_job reports it as interrupted once the lock is free
        time.sleep(0.2)
    try:
        data = registry.read_json(_job_file(lab))
        job = JobRecord.from_dict(data) if isinstance(data, dict) else None
        if job is None or job.job_id != job_id or not job.active:
            return
        tail = ""
        try:
            tail = log_path.read_text(errors="replace")[-2000:]
        except OSError:
            pass
        job.status, job.finished_at = "failed", _now()
        job.error = f"the training process ended unexpectedly ({_exit_words(returncode)})"
        job.message = (f"Failed: {job.error} during {job.phase or 'start-up'}. Nothing was registered or switched; "
                       f"the app kept running. Its output: {log_path}")
        job.eta_s = None
        registry.write_json(_job_file(lab), job.to_dict())
        if job.run_id:
            _mark_run(lab, job.run_id, "failed", message=job.message, finished_at=job.finished_at,
                      output_tail=tail)
    finally:
        probe.release()


def cancel_training(lab: Lab) -> str:
    """Ask the running job (in this process or another one) to stop."""
    job = read_job(lab)
    if job is None or not job.active:
        raise NotFound("No training job is running.")
    training_dir(lab).mkdir(parents=True, exist_ok=True)
    (_cancel_file(lab)).write_text(job.job_id)
    return f"Asked the {job.kind} job to stop; it ends after the current batch."


def wait_for_training(timeout: float | None = None) -> bool:
    """Wait for the job process this app started (and its final record); True if none
    is left running."""
    watcher = _JOBS.watcher
    if watcher is not None:
        watcher.join(timeout)
        return not watcher.is_alive()
    return True


def running_job_pid() -> int | None:
    """The process id of the job this app started, while it runs."""
    process = _JOBS.process
    return process.pid if process is not None and process.poll() is None else None


def run_in_foreground(lab: Lab, req: TrainRequest, echo: bool = True) -> tuple[JobRecord, RunOutcome | None]:
    """The CLI's way: this process is the job's own process; Ctrl-C cancels."""
    with _JOBS.lock:
        reporter, lock, event = _begin(lab, req, echo=echo)
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, lambda *_: event.set())
    try:
        outcome = _execute(lab, reporter, _request_of(reporter.record), lock)
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)
    return reporter.record, outcome


def run_job_process(lab: Lab, record: JobRecord, lock: _FileLock, parent_pid: int) -> JobRecord:
    """The job process's side of ``start_training`` (see ``pipeline.training.process``)."""
    record.pid = os.getpid()
    reporter = JobReporter(lab, record, threading.Event(), echo=True, parent_pid=parent_pid)
    _execute(lab, reporter, _request_of(record), lock)
    return reporter.record


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
    (e.g. docs/results/train_detector.json), with the command, the machine, the three
    splits (what each holds) and what each step of the run was given."""
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
    stages = registry.read_json(run_dir / "stages.json") or {}
    doc = {
        "command": command, "run_id": run_id, "kind": run.get("kind"), "status": run.get("status"),
        "start": run.get("start"), "request": run.get("request"), "device": run.get("device"),
        "promotion_decided_on": {name: c.get("data") for name, c in evaluation.items()},
        "train_seconds": run.get("train_seconds"), "epochs_completed": run.get("epochs_completed"),
        "torch_threads_training": run.get("torch_threads_training"),
        "history": run.get("history"), "evaluation": evaluation,
        "splits": {"how": split.get("how"), "sizes": split.get("sizes"), "source": split.get("source")},
        "stages": {name: {k: v for k, v in st.items() if k != "items"} for name, st in stages.items()},
        "extra": {k: run[k] for k in ("ultralytics_val", "ultralytics_val_data", "best_select_metrics",
                                      "teacher_select_metrics", "select_data", "match_threshold",
                                      "match_threshold_note") if k in run},
        "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                    "cuda": torch.cuda.is_available(), "load_avg_at_export": os.getloadavg()},
        "date": _now(),
    }
    registry.write_json(prefix.with_suffix(".json"), doc)
    return [prefix.with_suffix(".json"), *written]


def comparison_lines(name: str, comparison: Comparison) -> list[str]:
    """A comparison as text: what it was measured on, then one row per metric (each
    with its data, so a number copied out of context still says where it came from)."""
    lines = [f"{name}: {', '.join(comparison.names)} (change = candidate - in use)",
             f"  measured on the {comparison.data}"]
    for row in comparison.table():
        metric, data, *values = row
        cells = " | ".join("-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v)) for v in values)
        lines.append(f"  {metric} [{data}]: {cells}")
    return lines
