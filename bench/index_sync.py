"""Cost of keeping a Lab's in-memory FAISS index in step with the database (pipeline/context.py).

    python bench/index_sync.py [--size 20000] [--repeats 300] [--database-url URL] [--out FILE]

On a synthetic library of ``--size`` faces (rows only, random unit vectors, the active
embedder's version and dim) it measures, with a second Lab standing in for another
process that writes:

* ``stamp_query``: the SQL stamp ``(count, max id, sum id)`` alone;
* ``check_no_change``: ``Lab.index()`` when nothing changed (stamp query + compare), the
  price every search now pays;
* ``search_face``: a whole ``search_face`` (k=10) for scale, check included;
* ``sync_*``: ``Lab.index()`` right after the other Lab added 1 or 100 faces, deleted 1,
  or re-embedded 1 (pairs read, diff, vectors of the changed faces only, FAISS update,
  save); ``save`` alone is given too, as the part of a sync that grows with the library;
* ``open_load`` / ``open_rebuild``: a new Lab's first ``index()`` with a matching saved
  index (pairs read + checksum + file load) and without one.

``--database-url`` must name an empty PostgreSQL database; default: SQLite in a temp folder.
Milliseconds, p50/p90 over the repeats (sync scenarios: each run ``--sync-repeats`` times).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from sqlalchemy import delete, func, insert, select  # noqa: E402

from pipeline.context import Lab  # noqa: E402
from pipeline.library.search import search_face  # noqa: E402
from pipeline.settings import Settings  # noqa: E402
from storage.embedding_rows import embedding_stamp  # noqa: E402
from storage.faiss_index import FaceIndex  # noqa: E402
from storage.orm import Embedding, Face, Image  # noqa: E402


def _ms(samples_s: list[float]) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p90_ms": round(float(np.percentile(ms, 90)), 3),
            "n": len(ms)}


def _timed(fn: Callable[[], object], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _add_faces(lab: Lab, n: int, rng: np.random.Generator, per_image: int = 10) -> list[int]:
    """``n`` new faces with embeddings (rows only: no image files), ids assigned by the database."""
    version, dim = lab.model_version, lab.embedder.dim
    with lab.session() as s:
        start = s.scalar(select(func.count(Image.id))) or 0
        image_ids = s.scalars(insert(Image).returning(Image.id), [
            {"sha256": f"{start + i:064x}", "upload_sha256": f"{start + i:064x}", "original_name": f"s{start + i}.jpg",
             "width": 640, "height": 480, "size_bytes": 1, "mime": "image/jpeg", "version": 1}
            for i in range((n + per_image - 1) // per_image)
        ]).all()
        face_ids = s.scalars(insert(Face).returning(Face.id), [
            {"image_id": image_ids[j // per_image], "x1": 10.0, "y1": 10.0, "x2": 60.0, "y2": 70.0, "score": 0.9,
             "origin": "synthetic", "version": 1} for j in range(n)
        ]).all()
        vecs = _unit(rng, n, dim)
        s.execute(insert(Embedding), [
            {"face_id": f, "model_version": version, "dim": dim, "vector": vecs[j].astype("<f4").tobytes()}
            for j, f in enumerate(face_ids)
        ])
    return list(face_ids)


def _reembed(lab: Lab, face_id: int, rng: np.random.Generator) -> None:
    """What a moved box does: the face's embedding row is replaced by a new one."""
    with lab.session() as s:
        s.execute(delete(Embedding).where(Embedding.face_id == face_id))
        s.add(Embedding.from_array(face_id, lab.model_version, _unit(rng, 1, lab.embedder.dim)[0]))


def _delete_face(lab: Lab, face_id: int) -> None:
    with lab.session() as s:
        s.delete(s.get(Face, face_id))


def run(size: int, repeats: int, sync_repeats: int, database_url: str, data_dir: Path) -> dict:
    rng = np.random.default_rng(7)
    settings = Settings(data_dir=data_dir, database_url=database_url, match_threshold=0.8)
    result: dict = {"size": size, "backend": None}
    with Lab.open(settings) as app, Lab.open(settings) as other:
        result["backend"] = app.engine.dialect.name
        version = app.model_version
        with app.sessions() as s:
            if s.scalar(select(func.count(Face.id))):
                raise SystemExit("the database is not empty")
        faces = _add_faces(other, size, rng)
        t0 = time.perf_counter()
        app.index()  # no saved index yet: built from the database
        result["open_rebuild_s"] = round(time.perf_counter() - t0, 3)

        def stamp() -> None:
            with app.sessions() as s:
                embedding_stamp(s, version)

        stamp()
        result["stamp_query"] = _ms(_timed(stamp, repeats))
        result["check_no_change"] = _ms(_timed(app.index, repeats))
        probe = faces[len(faces) // 2]
        search_face(app, probe, k=10)
        result["search_face_k10"] = _ms(_timed(lambda: search_face(app, probe, k=10), max(20, repeats // 10)))

        index = app.index()
        result["save"] = _ms(_timed(index.save, sync_repeats))
        scenarios: dict[str, Callable[[], None]] = {
            "sync_after_1_added": lambda: _add_faces(other, 1, rng),
            "sync_after_100_added": lambda: _add_faces(other, 100, rng),
            "sync_after_1_deleted": lambda: _delete_face(other, faces.pop()),
            "sync_after_1_reembedded": lambda: _reembed(other, faces[len(faces) // 3], rng),
        }
        for name, change in scenarios.items():
            samples = []
            for _ in range(sync_repeats):
                change()
                t0 = time.perf_counter()
                app.index()
                samples.append(time.perf_counter() - t0)
            result[name] = _ms(samples)
        with app.sessions() as s:  # the syncs left the index exactly in step
            assert embedding_stamp(s, version) == app.index().stamp()

        samples = []
        for _ in range(sync_repeats):
            with Lab.open(settings) as fresh:
                fresh.model_version  # noqa: B018 - model load is not part of the index cost
                t0 = time.perf_counter()
                fresh.index()
                samples.append(time.perf_counter() - t0)
        result["open_load"] = _ms(samples)
        index_file, _ = FaceIndex.paths(settings.index_dir, version)
        result["index_file_mb"] = round(index_file.stat().st_size / 1e6, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--sync-repeats", type=int, default=5)
    parser.add_argument("--database-url", default="", help="an empty PostgreSQL database (default: SQLite)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.size, args.repeats, args.sync_repeats, args.database_url, Path(tmp))
    result["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count(),
                         "load_avg_1min": round(os.getloadavg()[0], 2)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
