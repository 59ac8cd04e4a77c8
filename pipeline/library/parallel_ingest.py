"""Ingest with several worker processes: how a bulk import uses more than one core.

FaceLab runs its models on one thread per process (two intra-op threads were slower
than one on 2-core machines, #18), so a second core is used by a second process. Each
worker opens the same library (database and data folder) with the models the app would
use (the promoted ones included), loads them, says it is ready, then takes chunks of
files from one shared queue until the queue is empty. A worker that met quick photos
takes more chunks, so the workers finish together: with fixed shares (every N-th
photo to worker N) one of two processes sat idle for 2 s of a 21 s import
(docs/results/ingest_processes.json, stop 21).

What the workers share is what two app processes on one library share: the database
(every photo in one transaction per batch; a photo stored by the other worker meanwhile
is found as a duplicate) and the index, which each process keeps in step with the
database through its change stamps. Nothing is lost when a worker dies: what it stored
stays stored, and running the same import again skips those photos as duplicates.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pipeline.library.ingest import Upload
from pipeline.results import FileResult, IngestReport
from pipeline.settings import Settings

#: files per task: the app's ingest batch (one database transaction each), small enough
#: that the workers' finishing times differ by about one batch
DEFAULT_CHUNK = 8
#: below this many files per worker the models' load time (a few seconds per process)
#: costs more than a second core saves
MIN_FILES_PER_WORKER = 24


def default_workers() -> int:
    """One worker per core this process may run on, at most 4: each holds its own models
    (peak RSS 0.8 GB measured after ingesting 16 face_mask photos), and more than 4 was
    not measured (the single database writer would become the limit at some point)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def workers_for(n_files: int, requested: int) -> int:
    """The workers worth starting for ``n_files`` files (1 = ingest in this process)."""
    return max(1, min(requested, n_files // MIN_FILES_PER_WORKER))


@dataclass
class ParallelIngestRun:
    report: IngestReport
    workers: int
    #: seconds from the moment every worker had its models loaded to the last result
    seconds_after_ready: float
    #: seconds the workers took to start and load their models
    seconds_to_ready: float


class IngestWorkerFailed(RuntimeError):
    """A worker process died or raised; photos stored before that stay stored."""


def _worker(settings: Settings, tasks: mp.Queue, results: mp.Queue) -> None:
    os.umask(0o077)  # like app.py: the library's files are for its user only
    from pipeline.context import Lab
    from pipeline.library.ingest import ingest
    from pipeline.training.registry import apply_active_models

    lab = None
    try:
        lab = Lab.open(settings)
        apply_active_models(lab)
        for model in (lab.detector, lab.landmarker, lab.embedder, lab.attributes):
            if model is not None:
                model.load()
        lab.quality_model()
    except BaseException as exc:  # noqa: BLE001 - the parent reports it
        if lab is not None:
            lab.close()
        results.put(("failed", None, f"{type(exc).__name__}: {exc}"))
        return
    results.put(("ready", None, None))
    try:
        while (task := tasks.get()) is not None:
            index, uploads = task
            try:
                results.put(("done", index, ingest(lab, uploads).files))
            except BaseException as exc:  # noqa: BLE001 - stop here, the parent stops the rest
                results.put(("failed", index, f"{type(exc).__name__}: {exc}"))
                return
    finally:
        lab.close()


def ingest_parallel(settings: Settings, uploads: Sequence[Upload], workers: int, chunk: int = DEFAULT_CHUNK,
                    on_chunk: Callable[[list[FileResult]], None] | None = None) -> ParallelIngestRun:
    """Ingest ``uploads`` with ``workers`` single-threaded processes (at least 1).

    ``on_chunk`` is called in this process with each chunk's results as they arrive (for
    a progress bar); the returned report lists every file in the order given. Raises
    ``IngestWorkerFailed`` when a worker raised or died (the others are stopped)."""
    workers = max(1, int(workers))
    chunks = [list(uploads[i : i + chunk]) for i in range(0, len(uploads), chunk)]
    ctx = mp.get_context("spawn")  # torch, OpenMP and database connections do not survive fork
    tasks, results = ctx.Queue(), ctx.Queue()
    worker_settings = settings.with_overrides(torch_threads=1)
    procs = [ctx.Process(target=_worker, args=(worker_settings, tasks, results), daemon=True)
             for _ in range(workers)]
    t_start = time.perf_counter()
    for p in procs:
        p.start()
    try:
        _wait_ready(procs, results)
        t_ready = time.perf_counter()
        for task in enumerate(chunks):
            tasks.put(task)
        for _ in procs:
            tasks.put(None)
        done: dict[int, list[FileResult]] = {}
        while len(done) < len(chunks):
            kind, index, payload = _next_result(procs, results)
            if kind == "failed":
                raise IngestWorkerFailed(f"an ingest worker failed: {payload}. Photos stored before it stay "
                                         "stored; running the same import again skips them as duplicates.")
            done[index] = payload
            if on_chunk is not None:
                on_chunk(payload)
        t_end = time.perf_counter()
        for p in procs:
            p.join(timeout=60)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
    files = [f for i in range(len(chunks)) for f in done[i]]
    return ParallelIngestRun(IngestReport(files), workers, t_end - t_ready, t_ready - t_start)


def _wait_ready(procs: Sequence, results: mp.Queue) -> None:
    ready = 0
    while ready < len(procs):
        kind, _, payload = _next_result(procs, results)
        if kind == "failed":
            raise IngestWorkerFailed(f"an ingest worker could not start: {payload}")
        ready += kind == "ready"


def _next_result(procs: Sequence, results: mp.Queue) -> tuple:
    """The next message from a worker; raises if every worker is gone and nothing is left."""
    while True:
        try:
            return results.get(timeout=1.0)
        except queue.Empty:
            dead = [p for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
            if dead:
                raise IngestWorkerFailed(
                    f"an ingest worker died (exit code {dead[0].exitcode}). Photos stored before it stay "
                    "stored; running the same import again skips them as duplicates.") from None
            if all(not p.is_alive() for p in procs):
                raise IngestWorkerFailed("every ingest worker exited with files left to do") from None
