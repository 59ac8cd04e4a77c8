"""Ingest throughput of several single-threaded processes writing one library.

    python bench/ingest_processes.py [--photos 160] [--processes 1 2] [--rounds 2] \
        [--out docs/results/ingest_processes.json]

FaceLab runs its models on one thread per process (two intra-op threads measured slower
than one on these 2-core machines: #18), so a machine's second core is used by a second
process: a second ``python app.py ingest`` (or app) on the same data folder and database.
This measures that, instead of estimating it as 2 x photos per CPU-second:

for each round and each process count N (interleaved: 1, 2, 1, 2, ...), a fresh library
(SQLite file + data folder) is ingested by N worker processes, each with every model
loaded and warmed up before a shared start barrier, each ingesting every N-th photo of
face_mask val (else generated photos) through ``pipeline.library.ingest.ingest`` as the
app does (detect, landmarks, embed, face attributes, database, index, suggestions).
Aggregate photos/s = photos / (last finish - start). The figure is only as good as the
machine is quiet: the 1-minute load average before and after each run is recorded.

Two ways of sharing the photos, interleaved in the same rounds:
``shares``: the original split above (every N-th photo to worker N, fixed in advance);
``queue``: the app's own path, ``pipeline.library.parallel_ingest.ingest_parallel``
(what ``python app.py ingest --workers N`` runs): chunks of 8 photos taken from one
queue. Its clock starts when every worker has loaded its models; the workers do not
ingest a warm-up photo first (the app does not), so their first batch also pays
PyTorch's first-call costs, which the ``shares`` workers paid before the barrier.

``--emotion-weights A B`` interleaves emotion weights files in each round (the workers
read ``FACELAB_EMOTION_WEIGHTS``), so a new emotion model's cost to ingest is measured
against the old one in the same run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _worker(data_dir: str, database_url: str, photos: list[tuple[str, bytes]], barrier, results,  # noqa: ANN001
            attributes: bool) -> None:
    from skimage import data as skdata

    from pipeline.context import Lab, set_compute_threads
    from pipeline.library.ingest import Upload, ingest
    from pipeline.settings import Settings

    set_compute_threads(1)
    lab = Lab.open(Settings(data_dir=Path(data_dir), database_url=database_url, torch_threads=1, attributes=attributes))
    warm = skdata.astronaut()  # not one of the photos: load and warm every model, store nothing
    boxes = lab.landmarker.predict(warm, lab.detector.detect(warm))
    lab.embedder.embed(warm, boxes)
    if lab.attributes is not None:
        lab.attributes.predict(warm, boxes)
    barrier.wait()
    t0, c0 = time.perf_counter(), time.process_time()
    report = ingest(lab, [Upload(name, data=data) for name, data in photos])
    results.put({"start": t0, "end": time.perf_counter(), "cpu_s": time.process_time() - c0,
                 "photos": len(photos), "faces": report.face_count})
    lab.close()


def run(n_processes: int, photos: list[tuple[str, bytes]], attributes: bool = True) -> dict:
    ctx = mp.get_context("spawn")  # torch and SQLite connections do not survive fork well
    with tempfile.TemporaryDirectory() as tmp:
        from pipeline.context import Lab
        from pipeline.settings import Settings

        url = f"sqlite:///{tmp}/facelab.db"
        Lab.open(Settings(data_dir=Path(tmp) / "data", database_url=url)).close()  # schema once, before the race
        barrier, results = ctx.Barrier(n_processes), ctx.Queue()
        shares = [photos[i::n_processes] for i in range(n_processes)]
        load_before = os.getloadavg()[0]
        procs = [ctx.Process(target=_worker, args=(str(Path(tmp) / "data"), url, share, barrier, results, attributes))
                 for share in shares]
        for p in procs:
            p.start()
        rows = [results.get(timeout=3600) for _ in procs]
        for p in procs:
            p.join()
            if p.exitcode != 0:
                raise RuntimeError(f"an ingest worker exited with {p.exitcode}")
        wall = max(r["end"] for r in rows) - min(r["start"] for r in rows)
        with Lab.open(Settings(data_dir=Path(tmp) / "data", database_url=url)) as lab:
            from sqlalchemy import func, select

            from storage.orm import Face, Image

            with lab.sessions() as s:
                stored = (s.scalar(select(func.count()).select_from(Image)),
                          s.scalar(select(func.count()).select_from(Face)))
    total = sum(r["photos"] for r in rows)
    return {"processes": n_processes, "attributes": attributes, "photos": total, "faces": sum(r["faces"] for r in rows),
            "stored_images": stored[0], "stored_faces": stored[1], "wall_s": round(wall, 2),
            "photos_per_s": total / wall, "cpu_s_per_process": [round(r["cpu_s"], 2) for r in rows],
            "load_avg_before": load_before, "load_avg_after": os.getloadavg()[0]}


def run_queue(n_processes: int, photos: list[tuple[str, bytes]], attributes: bool = True) -> dict:
    """The app's multi-process ingest (``ingest_parallel``) on a fresh library."""
    from pipeline.context import Lab
    from pipeline.library.ingest import Upload
    from pipeline.library.parallel_ingest import ingest_parallel
    from pipeline.settings import Settings

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp) / "data", database_url=f"sqlite:///{tmp}/facelab.db",
                            attributes=attributes)
        Lab.open(settings).close()
        load_before = os.getloadavg()[0]
        run_ = ingest_parallel(settings, [Upload(name, data=data) for name, data in photos], n_processes)
        with Lab.open(settings) as lab:
            from sqlalchemy import func, select

            from storage.orm import Face, Image

            with lab.sessions() as s:
                stored = (s.scalar(select(func.count()).select_from(Image)),
                          s.scalar(select(func.count()).select_from(Face)))
    return {"processes": n_processes, "mode": "queue", "attributes": attributes, "photos": len(photos),
            "faces": run_.report.face_count, "stored_images": stored[0], "stored_faces": stored[1],
            "wall_s": round(run_.seconds_after_ready, 2), "photos_per_s": len(photos) / run_.seconds_after_ready,
            "seconds_to_ready": round(run_.seconds_to_ready, 2),
            "load_avg_before": load_before, "load_avg_after": os.getloadavg()[0]}


def _cpu_model() -> str:
    """"AMD EPYC (family 25, model 17)": the name alone does not tell Zen 3 from Zen 4 here."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
                      if ":" in line)
    except OSError:
        return ""
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    return f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"


def main() -> None:
    from bench.speed import _photos

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=160)
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-attributes", action="store_true", help="face attributes off (FACELAB_ATTRIBUTES=0)")
    ap.add_argument("--modes", nargs="+", choices=("shares", "queue"), default=["shares", "queue"])
    ap.add_argument("--precisions", nargs="+", choices=("auto", "fp32"), default=["auto"],
                    help="the embedder's precision in the workers, interleaved in each round: auto (bf16 "
                         "where the CPU has it natively) and/or fp32 (FACELAB_CPU_BF16=0)")
    ap.add_argument("--emotion-weights", nargs="+", type=Path, default=[None],
                    help="emotion weights files, interleaved in each round (FACELAB_EMOTION_WEIGHTS in the "
                         "workers); default: the shipped one")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "ingest_processes.json")
    args = ap.parse_args()
    photos = _photos(args.photos)
    from models.cpu_features import cpu_native_bf16

    result: dict = {"machine": f"{_cpu_model() or platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                    # the embedder's "auto" precision: bf16 where native (a different machine
                    # than an fp32 one, so the two are never compared as before/after)
                    "native_bf16": cpu_native_bf16(),
                    "command": "python " + " ".join(sys.argv), "runs": []}
    runners = {"shares": run, "queue": run_queue}
    emotion_names = [w.name if w else "shipped" for w in args.emotion_weights]
    if len(set(emotion_names)) < len(emotion_names):  # two best.pt from two runs: keep them apart
        emotion_names = [str(w) if w else "shipped" for w in args.emotion_weights]

    def key(mode: str, n: int, precision: str, emotion: str) -> str:
        return (f"{mode} x{n}" + (f" {precision}" if len(args.precisions) > 1 else "")
                + (f" {emotion}" if len(emotion_names) > 1 else ""))

    for round_ in range(args.rounds):
        for n in args.processes:
            for precision in args.precisions:
                # the spawned workers inherit the environment: FACELAB_CPU_BF16=0 keeps them on fp32
                if precision == "fp32":
                    os.environ["FACELAB_CPU_BF16"] = "0"
                else:
                    os.environ.pop("FACELAB_CPU_BF16", None)
                for weights, emotion in zip(args.emotion_weights, emotion_names):
                    if weights is None:
                        os.environ.pop("FACELAB_EMOTION_WEIGHTS", None)
                    else:
                        os.environ["FACELAB_EMOTION_WEIGHTS"] = str(weights.resolve())
                    for mode in args.modes:
                        row = {"round": round_ + 1, "mode": mode, "precision": precision, "emotion": emotion,
                               **runners[mode](n, photos, attributes=not args.no_attributes)}
                        print(json.dumps(row), flush=True)
                        result["runs"].append(row)
    os.environ.pop("FACELAB_EMOTION_WEIGHTS", None)
    combos = [(mode, n, p, e) for mode in args.modes for n in args.processes for p in args.precisions
              for e in emotion_names]
    best = {key(*c): max(r["photos_per_s"] for r in result["runs"]
                         if (r["mode"], r["processes"], r["precision"], r["emotion"]) == c) for c in combos}
    result["best_photos_per_s"] = best
    for mode, n, p, e in combos:
        if key(mode, 1, p, e) in best:
            result.setdefault("speedup_vs_one_process", {})[key(mode, n, p, e)] = best[key(mode, n, p, e)] / best[key(mode, 1, p, e)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("best_photos_per_s", "speedup_vs_one_process") if k in result}))


if __name__ == "__main__":
    main()
