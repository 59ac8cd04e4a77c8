"""Face search inside PostgreSQL with pgvector: one index every app process shares.

With FAISS each app process keeps its own copy of the index in memory and follows the
database (``pipeline.context``): fine for one machine, but N processes hold N copies and
each catches up with every write. Here the index lives in the database instead: an HNSW
*expression index* (pgvector) over the ``embeddings`` rows themselves,

    CREATE INDEX ix_embeddings_pgvector_<slug> ON embeddings USING hnsw
        ((facelab_f4le_to_vector(vector)::vector(<dim>)) vector_cosine_ops)
        WHERE model_version = '<version>'

where ``facelab_f4le_to_vector`` decodes the stored float32 little-endian bytes. So
PostgreSQL maintains the index in the writer's own transaction, whoever writes: a vector
is searchable in every process the moment its row commits, a deleted face (ON DELETE
CASCADE included) leaves it the same way, and no process builds, syncs or saves
anything. ``add``/``remove``/``save`` are therefore no-ops here, kept so the pipeline's
writers need not know which backend runs.

The index is created by ``ensure()`` (idempotent: the extension, the decoding function
and one partial index per embedder version), not by a migration: it exists only where
pgvector is installed and this backend is chosen, and only for the embedder versions in
use. pgvector's HNSW has no efficient filter for "only these faces", so ``among=``
searches (the enrolled gallery) are exact, over the candidates' vectors read once and
cached until the embeddings change.

Figures (latency and recall@10 against exact search and FAISS on the same data):
``bench/pgvector_bench.py``, docs/scaling.md.
"""

from __future__ import annotations

import hashlib
import re
import threading
from typing import Any

import numpy as np
from sqlalchemy import Engine, text

from storage.embedding_rows import embedding_stamp
from storage.orm import VECTOR_DTYPE

#: decodes Embedding.vector (float32 little-endian bytes) into a pgvector value; exact for
#: every finite float32 (Embedding.encode refuses NaN and inf)
_DECODE_FUNCTION = """
CREATE OR REPLACE FUNCTION facelab_f4le_to_vector(b bytea) RETURNS vector
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT array_agg(
        (CASE WHEN (get_byte(b, 4 * i + 3) >> 7) = 1 THEN -1.0::float8 ELSE 1.0::float8 END)
        * CASE WHEN e = 0 THEN m::float8 / 8388608.0::float8 * 2.0::float8 ^ (-126)
               ELSE (1.0::float8 + m::float8 / 8388608.0::float8) * 2.0::float8 ^ (e - 127) END
        ORDER BY i)::real[]::vector
    FROM (SELECT i,
                 ((get_byte(b, 4 * i + 3) & 127) << 1) | (get_byte(b, 4 * i + 2) >> 7) AS e,
                 ((get_byte(b, 4 * i + 2) & 127) << 16) | (get_byte(b, 4 * i + 1) << 8) | get_byte(b, 4 * i) AS m
          FROM generate_series(0, length(b) / 4 - 1) AS i) AS parts
$$
"""

_SAFE_VERSION = re.compile(r"^[A-Za-z0-9._:+\-]{1,128}$")


class PgVectorUnavailable(RuntimeError):
    """The database cannot hold this index (not PostgreSQL, or pgvector is not installed)."""


def pgvector_available(engine: Engine) -> bool:
    """True on PostgreSQL where the ``vector`` extension can be (or is) installed."""
    if engine.dialect.name != "postgresql":
        return False
    with engine.connect() as conn:
        return conn.execute(text("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'")).first() is not None


def _literal(vector: np.ndarray) -> str:
    return "[" + ",".join(repr(float(v)) for v in vector) + "]"


class PgVectorIndex:
    """The FaceIndex interface over pgvector (see the module docstring); thread-safe."""

    kind = "pgvector"

    #: hnsw.ef_search 256: at 100,000 face-like vectors (bench/pgvector_bench.py) recall@10
    #: 0.988 at p50 24 ms, against 0.968 at 19 ms with 128 (pgvector's m 16, ef_construction 64)
    def __init__(self, engine: Engine, model_version: str, dim: int, *, m: int = 16, ef_construction: int = 64,
                 ef_search: int = 256, exact_candidates: int = 20_000) -> None:
        if not _SAFE_VERSION.match(model_version):
            raise ValueError(f"model version {model_version!r} cannot name a pgvector index")
        self.engine = engine
        self.model_version = model_version
        self.dim = int(dim)
        self.m, self.ef_construction, self.ef_search = int(m), int(ef_construction), int(ef_search)
        self.exact_candidates = int(exact_candidates)
        slug = hashlib.sha256(model_version.encode()).hexdigest()[:12]
        self.index_name = f"ix_embeddings_pgvector_{slug}"
        self._expr = f"(facelab_f4le_to_vector(vector)::vector({self.dim}))"
        self._where = f"model_version = '{model_version}'"
        self._candidates: tuple[Any, np.ndarray, np.ndarray] | None = None
        self._lock = threading.Lock()
        self._search_engines: dict[int, Engine] = {}

    def __repr__(self) -> str:
        return f"PgVectorIndex({self.model_version!r}, dim={self.dim})"

    # -- the index itself --------------------------------------------------------------

    def ensure(self) -> PgVectorIndex:
        """Create the extension, the decoding function and this version's HNSW index if
        missing (building it reads every embedding row of the version once)."""
        if not pgvector_available(self.engine):
            raise PgVectorUnavailable(
                "the pgvector backend needs PostgreSQL with the 'vector' extension installed "
                "(e.g. the pgserver wheel's PostgreSQL 16, or a server package with pgvector)")
        with self.engine.begin() as conn:
            # one process at a time (two app processes starting together)
            conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('facelab-pgvector'))"))
            conn.execute(text("CREATE EXTENSION IF NOT EXISTS vector"))
            conn.execute(text(_DECODE_FUNCTION))
            conn.execute(text(
                f"CREATE INDEX IF NOT EXISTS {self.index_name} ON embeddings USING hnsw ({self._expr} vector_cosine_ops) "
                f"WITH (m = {self.m}, ef_construction = {self.ef_construction}) WHERE {self._where}"))
            conn.execute(text("ANALYZE embeddings"))
        return self

    def _search_engine(self, ef_search: int) -> Engine:
        """Connections for searches only: autocommit (one round trip per query) and set up
        at connect time for HNSW scans. pgvector returns at most ``hnsw.ef_search`` rows
        per scan; and the planner may think a scan plus sort is cheaper (e.g. before
        ANALYZE has seen a bulk import), which would decode every row of the version, so
        scans and sorts are off on these connections (never on the app's own)."""
        engine = self._search_engines.get(ef_search)
        if engine is None:
            from storage.db import make_engine

            options = (f"-c hnsw.ef_search={ef_search} -c enable_seqscan=off -c enable_bitmapscan=off "
                       "-c enable_sort=off")
            engine = make_engine(self.engine.url.render_as_string(hide_password=False), pool_size=2,
                                 connect_args={"options": options}, isolation_level="AUTOCOMMIT")
            with self._lock:
                engine = self._search_engines.setdefault(ef_search, engine)
        return engine

    def close(self) -> None:
        for engine in self._search_engines.values():
            engine.dispose()
        self._search_engines.clear()

    def drop(self) -> None:
        with self.engine.begin() as conn:
            conn.execute(text(f"DROP INDEX IF EXISTS {self.index_name}"))

    # -- contents (read from the embeddings table) ----------------------------------------

    def stamp(self) -> tuple[int, int, int]:
        with self.engine.connect() as conn:
            from sqlalchemy.orm import Session

            with Session(bind=conn) as session:
                return embedding_stamp(session, self.model_version)

    def __len__(self) -> int:
        return self.stamp()[0]

    def _scalars(self, sql: str, **params: Any) -> list:
        with self.engine.connect() as conn:
            return list(conn.execute(text(sql), params).scalars())

    def ids(self) -> np.ndarray:
        return np.asarray(self._scalars(f"SELECT face_id FROM embeddings WHERE {self._where}"), dtype=np.int64)

    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        with self.engine.connect() as conn:
            got = conn.execute(text(f"SELECT face_id, id FROM embeddings WHERE {self._where} ORDER BY face_id")).all()
        pairs = np.asarray(got, dtype=np.int64).reshape(-1, 2)
        return pairs[:, 0].copy(), pairs[:, 1].copy()

    def present(self, face_ids: np.ndarray | list[int]) -> np.ndarray:
        """Which of ``face_ids`` have a vector (bool per id)."""
        ids = np.asarray(face_ids, dtype=np.int64).reshape(-1)
        if not len(ids):
            return np.zeros(0, dtype=bool)
        found = set(self._scalars(f"SELECT face_id FROM embeddings WHERE {self._where} AND face_id = ANY(:ids)",
                                  ids=ids.tolist()))
        return np.fromiter((int(i) in found for i in ids), dtype=bool, count=len(ids))

    def __contains__(self, face_id: int) -> bool:
        return bool(self.present([int(face_id)])[0])

    def row_id(self, face_id: int) -> int | None:
        got = self._scalars(f"SELECT id FROM embeddings WHERE {self._where} AND face_id = :f", f=int(face_id))
        return int(got[0]) if got else None

    def reconstruct_many(self, face_ids: np.ndarray | list[int]) -> np.ndarray:
        """Unit vectors of ``face_ids`` in that order; KeyError if one has none."""
        ids = [int(i) for i in np.asarray(face_ids, dtype=np.int64).reshape(-1)]
        with self.engine.connect() as conn:
            got = dict(conn.execute(text(f"SELECT face_id, vector FROM embeddings WHERE {self._where} "
                                         "AND face_id = ANY(:ids)"), {"ids": ids}).all())
        missing = [i for i in ids if i not in got]
        if missing:
            raise KeyError(missing[0])
        out = np.stack([np.frombuffer(got[i], dtype=VECTOR_DTYPE) for i in ids]).astype(np.float32) if ids \
            else np.zeros((0, self.dim), np.float32)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    def reconstruct(self, face_id: int) -> np.ndarray:
        return self.reconstruct_many([face_id])[0]

    def held_vectors(self, face_ids: np.ndarray | list[int]) -> tuple[list[int], np.ndarray]:
        """The ids of ``face_ids`` that have a vector, and those vectors (one query)."""
        ids = [int(i) for i in np.asarray(face_ids, dtype=np.int64).reshape(-1)]
        with self.engine.connect() as conn:
            got = dict(conn.execute(text(f"SELECT face_id, vector FROM embeddings WHERE {self._where} "
                                         "AND face_id = ANY(:ids)"), {"ids": ids}).all()) if ids else {}
        kept = [i for i in ids if i in got]
        if not kept:
            return [], np.zeros((0, self.dim), np.float32)
        out = np.stack([np.frombuffer(got[i], dtype=VECTOR_DTYPE) for i in kept]).astype(np.float32)
        return kept, out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    # -- writers: the database rows are the index ----------------------------------------

    def add(self, ids: Any, vectors: Any, row_ids: Any = None, *, keep_newer: bool = False) -> int:
        """Nothing to do: the rows the caller committed are indexed by PostgreSQL."""
        return 0

    def remove(self, ids: Any) -> int:
        """Nothing to do: deleted rows left the index with their transaction."""
        return 0

    def save(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to write: the index is in the database."""

    # -- search ------------------------------------------------------------------------------

    def search(self, vectors: np.ndarray, k: int, among: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """As ``FaceIndex.search``: cosine similarity, best first; -1 / -inf pad short rows."""
        single = np.ndim(vectors) == 1
        queries = np.asarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
        k = int(k)
        if among is not None:
            scores, ids = self._search_among(queries, k, np.asarray(among, dtype=np.int64).reshape(-1))
        else:
            scores = np.full((len(queries), max(k, 0)), -np.inf, dtype=np.float32)
            ids = np.full((len(queries), max(k, 0)), -1, dtype=np.int64)
            if k > 0:
                # the similarity is computed here from the row's bytes: selecting the
                # distance would decode every returned row in SQL once more
                sql = text(f"SELECT face_id, vector FROM embeddings WHERE {self._where} "
                           f"ORDER BY {self._expr} <=> CAST(:q AS vector({self.dim})) LIMIT :k")
                with self._search_engine(max(self.ef_search, k)).connect() as conn:
                    for row, q in enumerate(queries):
                        got = conn.execute(sql, {"q": _literal(q), "k": k}).all()
                        if not got:
                            continue
                        found = np.stack([np.frombuffer(blob, dtype=VECTOR_DTYPE) for _, blob in got]).astype(np.float32)
                        sims = found @ q / np.maximum(np.linalg.norm(found, axis=1), 1e-12)
                        order = np.argsort(-sims, kind="stable")  # HNSW order is approximate
                        ids[row, : len(got)] = np.asarray([face_id for face_id, _ in got], dtype=np.int64)[order]
                        scores[row, : len(got)] = sims[order]
            filled = int((ids >= 0).sum(axis=1).max()) if len(ids) else 0
            scores, ids = scores[:, :filled], ids[:, :filled]
        if single:
            valid = ids[0] != -1
            return scores[0][valid], ids[0][valid]
        return scores, ids

    def _search_among(self, queries: np.ndarray, k: int, among: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact search over the candidates' vectors (read once per change of the embeddings)."""
        key = (self.stamp(), hashlib.blake2b(np.unique(among).tobytes(), digest_size=16).digest())
        with self._lock:
            cached = self._candidates
        if cached is not None and cached[0] == key:
            ids, matrix = cached[1], cached[2]
        else:
            ids = np.unique(among)
            with self.engine.connect() as conn:
                got = conn.execute(text(f"SELECT face_id, vector FROM embeddings WHERE {self._where} "
                                        "AND face_id = ANY(:ids) ORDER BY face_id"), {"ids": ids.tolist()}).all()
            ids = np.asarray([r[0] for r in got], dtype=np.int64)
            matrix = np.stack([np.frombuffer(r[1], dtype=VECTOR_DTYPE) for r in got]).astype(np.float32) if got \
                else np.zeros((0, self.dim), np.float32)
            matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
            if len(ids) <= self.exact_candidates:
                with self._lock:
                    self._candidates = (key, ids, matrix)
        k_eff = min(k, len(ids))
        if k_eff <= 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        sims = queries @ matrix.T
        part = np.argpartition(-sims, k_eff - 1, axis=1)[:, :k_eff] if k_eff < sims.shape[1] else \
            np.broadcast_to(np.arange(sims.shape[1]), sims.shape)
        order = np.argsort(-np.take_along_axis(sims, part, axis=1), axis=1, kind="stable")
        best = np.take_along_axis(part, order, axis=1)
        return np.take_along_axis(sims, best, axis=1).astype(np.float32), ids[best]
