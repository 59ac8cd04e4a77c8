"""The pgvector backend against the FAISS index on the same face-like data.

    nice -n 19 python bench/pgvector_bench.py --database-url postgresql+psycopg://USER:PW@HOST:PORT/DB
        [--size 100000] [--queries 300] [--ef 64 128 256] [--out docs/results/pgvector.json]

Needs PostgreSQL with the ``vector`` extension (e.g. the one in the pgserver wheel, as
tests/run.sh starts it). The database's public schema is dropped and rebuilt.

Data as in bench/index_scaling.py (LFW dlib embeddings + fitted identity clusters; queries
held out). Both backends hold the same vectors; per query and interleaved: FAISS
(``FaceIndex``, the structure its policy picks for this size) and pgvector
(``PgVectorIndex.search``: an SQL round trip per query over a local TCP connection, HNSW
m=16, ef_construction=64, pgvector's defaults). Reported: recall@10 against exact search,
p50/p99 wall per query, build time, and the time from a commit in one connection to
the vector being found by a search in another.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import faiss  # noqa: E402
from sqlalchemy import insert, text  # noqa: E402

from bench.face_like import fit_and_generate, lfw_embeddings  # noqa: E402
from bench.index_scaling import exact_top, pct, recall, split  # noqa: E402
from storage.db import make_engine, migrate  # noqa: E402
from storage.faiss_index import DEFAULT_POLICY, FaceIndex  # noqa: E402
from storage.orm import Embedding, Face, Image  # noqa: E402
from storage.pgvector_index import PgVectorIndex  # noqa: E402

VERSION = "bench-dlib"


def load_rows(engine, vectors: np.ndarray) -> None:  # noqa: ANN001
    with engine.begin() as conn:
        conn.execute(insert(Image), [{"id": 1, "sha256": "c" * 64, "upload_sha256": "c" * 64, "original_name": "x",
                                      "width": 1, "height": 1, "size_bytes": 1, "mime": "image/jpeg", "version": 1}])
    for start in range(0, len(vectors), 20_000):
        stop = min(len(vectors), start + 20_000)
        with engine.begin() as conn:
            conn.execute(insert(Face), [{"id": j + 1, "image_id": 1, "x1": 0, "y1": 0, "x2": 1, "y2": 1, "score": 1,
                                         "origin": "bench", "version": 1} for j in range(start, stop)])
            conn.execute(insert(Embedding), [{"face_id": j + 1, "model_version": VERSION, "dim": vectors.shape[1],
                                              "vector": vectors[j].astype("<f4").tobytes()} for j in range(start, stop)])
    with engine.begin() as conn:
        conn.execute(text("SELECT setval(pg_get_serial_sequence('faces', 'id'), (SELECT max(id) FROM faces))"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--database-url", required=True)
    ap.add_argument("--size", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--ef", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "pgvector.json")
    args = ap.parse_args()
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    real, person, _ = lfw_embeddings()
    data = fit_and_generate(real, person, args.size + args.queries)
    rows, qrows = split(data, args.size, args.queries, rng)
    vectors, queries = data.vectors[rows], data.vectors[qrows]
    ids = np.arange(1, len(vectors) + 1, dtype=np.int64)
    truth = ids[exact_top(vectors, queries, 10)]

    engine = make_engine(args.database_url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    migrate(engine)
    t0 = time.perf_counter()
    load_rows(engine, vectors)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pg = PgVectorIndex(engine, VERSION, vectors.shape[1]).ensure()
    pg_build = time.perf_counter() - t0
    with engine.connect() as conn:
        pg_size = conn.execute(text(f"SELECT pg_relation_size('{pg.index_name}')")).scalar_one()
    t0 = time.perf_counter()
    fx = FaceIndex.build(VERSION, vectors.shape[1], ids, vectors)
    fx_build = time.perf_counter() - t0
    print(f"{args.size:,} vectors: rows loaded in {load_s:.0f} s, pgvector index {pg_build:.0f} s "
          f"({pg_size / 1e6:.0f} MB), FAISS {fx.kind} {fx_build:.0f} s (load {os.getloadavg()[0]:.1f})", flush=True)

    out: dict = {"command": "python " + " ".join(a if "://" not in a else "<database-url>" for a in sys.argv),
                 "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                 "size": args.size, "queries": len(queries), "load_avg_start": os.getloadavg()[0],
                 "pgvector": {"build_s": round(pg_build, 1), "index_mb": round(pg_size / 1e6, 1), "m": pg.m,
                              "ef_construction": pg.ef_construction, "ef_search": {}},
                 "faiss": {"kind": fx.kind, "build_s": round(fx_build, 1), "ef_search": {}}}
    for ef in args.ef:
        pg.ef_search = ef
        fx._store.policy = replace(fx._store.policy, ef_search=ef, ef_search_large=ef)
        t_pg, t_fx, got_pg, got_fx = [], [], [], []
        for q in queries:
            t0 = time.perf_counter()
            _, a = pg.search(q[None], 10)
            t_pg.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            _, b = fx.search(q[None], 10)
            t_fx.append(time.perf_counter() - t0)
            got_pg.append(np.pad(a[0], (0, 10 - len(a[0])), constant_values=-1))
            got_fx.append(np.pad(b[0], (0, 10 - len(b[0])), constant_values=-1))
        out["pgvector"]["ef_search"][str(ef)] = {"recall_at_10": recall(np.stack(got_pg), truth), **pct(t_pg)}
        out["faiss"]["ef_search"][str(ef)] = {"recall_at_10": recall(np.stack(got_fx), truth), **pct(t_fx)}
        print(f"ef {ef}: pgvector {out['pgvector']['ef_search'][str(ef)]} | FAISS {out['faiss']['ef_search'][str(ef)]}",
              flush=True)
    pg.ef_search = DEFAULT_POLICY.ef_search

    # a commit in one connection, then searched from another (what a second app process sees)
    lag = []
    rng2 = np.random.default_rng(9)
    with engine.begin() as conn:
        base = conn.execute(text("SELECT max(id) FROM faces")).scalar_one()
    for i in range(20):
        vec = rng2.standard_normal(vectors.shape[1]).astype(np.float32)
        face_id = base + 1 + i
        with engine.begin() as conn:
            conn.execute(insert(Face), [{"id": face_id, "image_id": 1, "x1": 0, "y1": 0, "x2": 1, "y2": 1, "score": 1,
                                         "origin": "bench", "version": 1}])
            conn.execute(insert(Embedding), [{"face_id": face_id, "model_version": VERSION, "dim": len(vec),
                                              "vector": vec.astype("<f4").tobytes()}])
        t0 = time.perf_counter()
        other = PgVectorIndex(make_engine(args.database_url), VERSION, len(vec))  # another process's handle
        found = other.search(vec, 1)[1]
        lag.append(time.perf_counter() - t0)
        other.engine.dispose()
        assert len(found) and found[0] == face_id, "a committed vector was not found at once"
    out["visible_to_another_connection"] = {"found_at_once": True, "first_search_ms": pct(lag)}
    out["load_avg_end"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=1))
    engine.dispose()


if __name__ == "__main__":
    main()
