"""A FAISS cosine-similarity index over face embeddings, one per embedder version.

The database is the source of truth; the index files are a cache that can always be
rebuilt from it. Every vector carries, besides its face id, a *row id*: the id of the
database row it was read from (the embedding row). Callers guarantee that a row's
vector never changes and that row ids are never reused, so the set of ``(face id, row
id)`` pairs identifies the index's contents exactly.

``FaceIndex.stamp()`` is ``(count, max row id, sum of row ids)`` of the contents: the
same figure ``storage.embedding_rows.embedding_stamp`` reads from the database, so a
caller can tell cheaply whether the database moved on (another process wrote) and then
sync just the difference (``rows()``, ``add``, ``remove``).

Structure, chosen by size (``IndexPolicy``)
-------------------------------------------
Vectors are L2-normalised float32, compared by inner product (cosine similarity), and
stored at *positions* 0, 1, 2, ... of one FAISS index, each position labelled with its
face id. Below ``IndexPolicy.hnsw_above`` live vectors that index is exact
(``IndexFlatIP``); from there on an HNSW graph (``hnsw_m`` links per node, ``ef_search``
candidates per query), built once when the library crosses the line. The graph walks
over half-precision copies of the vectors (``IndexHNSWSQ`` fp16: half the memory traffic
per step, which is what a search at 1M faces waits on) and the best ``refine_factor * k``
it finds are re-scored exactly against the float32 vectors (``IndexRefineFlat``), so the
answer's order and scores are exact. Graphs saved before that (``IndexHNSWFlat``, float32
throughout) load and work as they are and become fp16 graphs at their next rebuild.
Measured with ``bench/index_scaling.py`` (numbers in docs/scaling.md).

HNSW cannot remove a vector, so removal (and the old vector of a replaced face) is a
*tombstone*: the position's label becomes -1 and its stored vector is zeroed (a deleted
person's vector does not linger in memory), and searches skip tombstones through an
``IDSelectorBitmap`` of live positions. When tombstones pass ``rebuild_dead_share`` of
the positions, the structure is rebuilt from the live vectors. The rebuild snapshots the
live vectors under the lock, builds outside it (searches go on against the old
structure), then replays the changes made meanwhile and swaps; the flat index uses the
same scheme (its "rebuild" is a copy).

``search(..., among=face_ids)`` compares only with the given faces (e.g. the enrolled
ones). When they are few (``exact_candidates``) their vectors are gathered and scored
exactly (cached while the index and the list do not change): a selector that keeps a
few faces out of a big HNSW graph would walk most of the graph to find them. Larger
lists go through the structure with an ``IDSelectorBatch``.

Files
-----
In ``directory``, per model version (slug = the version made filename-safe plus a short
hash of it): ``<slug>.faiss`` (the FAISS index, tombstones included), ``<slug>.ids.npy``
(label and row id per position), ``<slug>.manifest.json`` (checksums of both files and
of the contents, and a random *token* naming this base) and ``<slug>.delta`` (changes
since the base). A *checkpoint* writes the first three (temp file, fsync,
``os.replace``; manifest last) and starts a new delta carrying the base's token. Every
other ``save()`` appends the changes made since the last save to the delta as
checksummed records, under an ``flock`` (several processes may append) and fsyncs that
small file: O(changes), not O(library). Loading replays the delta's records onto the
base (a torn last record, from a crash mid-append, ends the replay), and a delta whose
token is not the manifest's (a crash between a checkpoint's manifest and its new delta)
is ignored. The delta is folded into a new base when it grows past ``delta_share`` of
the base (or a caller asks, as privacy deletes do: a removed face's vector then leaves
the disk too).

``load_or_rebuild`` uses the saved files when their ``(face id, row id)`` pairs equal
the database's; when they differ (a process crashed between its commit and its save, or
two processes' saves crossed), it reads the vectors of just the missing rows when given
``fetch_rows`` and otherwise rebuilds from ``fetch_all``; either way it checkpoints.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import re
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from common.atomic import write_atomically

log = logging.getLogger(__name__)

#: 3: base + delta files, HNSW above a size, row ids stored; older manifests cause one rebuild
MANIFEST_FORMAT = 3

# faiss-cpu 1.15 computes multi-query flat searches with BLAS only from 128,000 queries
# on; below that it loops query by query (64 queries at 1M: 2650 ms vs 608 ms with BLAS
# from 20 queries on, measured on the machine)
faiss.cvar.distance_compute_blas_threshold = 20


class OutdatedIndexFormat(ValueError):
    """A saved index written by an older FaceLab (an older manifest format). Not damage:
    ``load_or_rebuild`` rebuilds it from the database like any unusable file."""


#: ``() -> (face ids, vectors, row ids)`` from the database, for a rebuild
FetchAll = Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]]
#: ``(row ids) -> (face ids, vectors, row ids)`` of those rows that still exist
FetchRows = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]
#: ``(count, max row id, sum of row ids)``; see FaceIndex.stamp
Stamp = tuple[int, int, int]


@dataclass(frozen=True)
class IndexPolicy:
    """When to use which structure, and how to tune it (figures: docs/scaling.md)."""

    #: live vectors from which an HNSW graph replaces exact search (back to exact below half)
    hnsw_above: int = 100_000
    #: HNSW links per node, candidates kept while building and while searching. On face-
    #: like data at 100k (bench/index_scaling.py): efConstruction 40 reached recall@10
    #: 0.978 at efSearch 128 and 0.994 at 256; efConstruction 200 reached 0.991 at 128
    #: (0.997 at 256, CPU p99 2.7 ms) for 4x the build time. efSearch 256: a second
    #: draw of the data gave 0.988 at 128 (bench/speed.py), under the 0.99 we promise.
    #: efConstruction 400: on a third draw at 300,000 (fp16 graphs) it reached 0.990 at
    #: efSearch 192 in 0.91 CPU ms (p50), where 200 needed 256 and 1.18 ms and M 48 1.27
    #: ms; the build takes twice as long (1M faces: 35 min on one core)
    hnsw_m: int = 32
    ef_construction: int = 400
    ef_search: int = 256
    #: graphs of at least ``large_graph`` positions search with ``ef_search_large``. Chosen
    #: on that third draw at 1,000,000 (fp16, efConstruction 400): efSearch 384 recall@10
    #: 0.992 (CPU p99 3.7 ms), 448 0.993 (4.1), 512 0.994 (4.5), 576 0.995 (5.0); 448
    #: keeps a margin over 0.99. (float32, efConstruction 200: 512 reached 0.991 at 5.9 ms.)
    large_graph: int = 500_000
    ef_search_large: int = 448
    #: how the graph stores the vectors it walks over: "fp16" (half precision, re-scored
    #: exactly; see the module docstring) or "flat" (float32, as before). At 100,000 face-
    #: like vectors fp16 + refine reached recall@10 0.9977 at efSearch 256 (CPU p99 0.94
    #: ms) where float32 reached 0.9973 (1.39 ms); fp16 without re-scoring stopped at 0.995
    hnsw_storage: str = "fp16"
    #: fp16 graphs re-score this many times k of their best candidates exactly (2 reached
    #: the same recall as 4 in that measurement)
    refine_factor: float = 2.0

    def ef_search_for(self, positions: int) -> int:
        """efSearch for a graph of ``positions`` nodes."""
        return self.ef_search_large if positions >= self.large_graph else self.ef_search
    #: ``among=`` lists up to this size are scored exactly over their gathered vectors
    #: (cached: 512 bytes per face). 20,000 until an HNSW graph of 1M faces searched
    #: among 50,000 of them through an id selector reached recall@200 0.747 in 47 ms,
    #: while the exact score over 50,000 gathered vectors takes ~3 CPU ms (200,000: ~10)
    exact_candidates: int = 200_000
    #: rebuild when this share of positions are tombstones (and at least this many)
    rebuild_dead_share: float = 0.2
    rebuild_dead_min: int = 1_000
    #: fold the delta into a new base when it holds more faces than this share of the
    #: base (and at least ``delta_min_faces``)
    delta_share: float = 0.1
    delta_min_faces: int = 20_000


#: what ``FaceIndex`` uses unless given another (module attribute, so tests and
#: benchmarks can change it)
DEFAULT_POLICY = IndexPolicy()


def ids_checksum(ids: np.ndarray | list[int]) -> str:
    """Order-independent sha256 of a set of ids (the manifest's check of the file's own ids)."""
    arr = np.unique(np.asarray(ids, dtype=np.int64))
    return hashlib.sha256(arr.astype("<i8").tobytes()).hexdigest()


def rows_checksum(ids: np.ndarray | list[int], row_ids: np.ndarray | list[int]) -> str:
    """Order-independent sha256 of ``(face id, row id)`` pairs (face ids unique)."""
    id_arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    row_arr = np.asarray(row_ids, dtype=np.int64).reshape(-1)
    if len(id_arr) != len(row_arr):
        raise ValueError(f"{len(id_arr)} ids but {len(row_arr)} row ids")
    order = np.argsort(id_arr, kind="stable")
    pairs = np.stack([id_arr[order], row_arr[order]], axis=1)
    return hashlib.sha256(pairs.astype("<i8").tobytes()).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _slug(model_version: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model_version).strip("._")[:80] or "model"
    return f"{safe}-{hashlib.sha256(model_version.encode()).hexdigest()[:8]}"


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Durable atomic write (common.atomic); a module-level name so fault tests can wrap it."""
    write_atomically(path, write, durable=True)


def _append(path: Path, data: bytes) -> None:
    """Append ``data`` to ``path`` in one write and fsync it (the delta log's only write)."""
    with path.open("ab") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


# -- delta log ------------------------------------------------------------------------------------
_DELTA_MAGIC = b"FLDELTA1"
_HEADER = struct.Struct("<8s32sI")  # magic, base token (hex), dim
_RECORD = struct.Struct("<IBI")  # payload bytes, op, count
_OP_ADD, _OP_REMOVE = 1, 2


def _delta_header(token: str, dim: int) -> bytes:
    return _HEADER.pack(_DELTA_MAGIC, token.encode("ascii"), dim)


def _delta_record(op: int, ids: np.ndarray, rows: np.ndarray | None = None, vectors: np.ndarray | None = None) -> bytes:
    payload = np.asarray(ids, "<i8").tobytes()
    if op == _OP_ADD:
        assert rows is not None and vectors is not None
        payload += np.asarray(rows, "<i8").tobytes() + np.ascontiguousarray(vectors, "<f4").tobytes()
    head = _RECORD.pack(len(payload), op, len(ids))
    return head + payload + struct.pack("<I", zlib.crc32(head + payload))


def _delta_token(path: Path, dim: int) -> str | None:
    """The base token a delta file belongs to (None: missing or not a delta of this dim)."""
    try:
        with path.open("rb") as fh:
            head = fh.read(_HEADER.size)
    except OSError:
        return None
    if len(head) < _HEADER.size:
        return None
    magic, token, found_dim = _HEADER.unpack(head)
    return token.decode("ascii", "replace") if magic == _DELTA_MAGIC and found_dim == dim else None


def _read_delta(path: Path, token: str, dim: int) -> tuple[list[tuple], bool]:
    """The delta's records for base ``token`` as ops, and whether it ended cleanly (False:
    a torn or damaged record ended the replay; a delta of another base yields nothing)."""
    try:
        data = path.read_bytes()
    except OSError:
        return [], True
    if len(data) < _HEADER.size:
        return [], not data
    magic, found, found_dim = _HEADER.unpack_from(data)
    if magic != _DELTA_MAGIC or found_dim != dim:
        return [], False
    if found.decode("ascii", "replace") != token:
        return [], True  # left from before the last checkpoint: already in the base
    ops: list[tuple] = []
    at = _HEADER.size
    while at < len(data):
        if at + _RECORD.size > len(data):
            return ops, False
        size, op, count = _RECORD.unpack_from(data, at)
        end = at + _RECORD.size + size
        if end + 4 > len(data) or zlib.crc32(data[at:end]) != struct.unpack_from("<I", data, end)[0]:
            return ops, False
        payload = data[at + _RECORD.size : end]
        ids = np.frombuffer(payload, "<i8", count).astype(np.int64)
        if op == _OP_ADD and size == count * (16 + 4 * dim):
            rows = np.frombuffer(payload, "<i8", count, offset=8 * count).astype(np.int64)
            vecs = np.frombuffer(payload, "<f4", count * dim, offset=16 * count).reshape(count, dim)
            ops.append(("add", ids, np.array(vecs, np.float32), rows))
        elif op == _OP_REMOVE and size == count * 8:
            ops.append(("remove", ids))
        else:
            return ops, False
        at = end + 4
    return ops, True


# -- a readers-writer lock: searches share, changes are exclusive -------------------------------
class _RWLock:
    """Readers share, a writer is alone; re-entrant for both (a writer may also read).
    Writers go first once waiting, so a stream of searches cannot starve a change."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer: int | None = None
        self._depth = 0
        self._waiting_writers = 0
        self._local = threading.local()

    @contextmanager
    def read(self) -> Iterator[None]:
        me = threading.get_ident()
        held = getattr(self._local, "reads", 0)
        if self._writer == me or held:  # already inside: never wait on ourselves
            self._local.reads = held + 1
            try:
                yield
            finally:
                self._local.reads -= 1
            return
        with self._cond:
            while self._writer is not None or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        self._local.reads = 1
        try:
            yield
        finally:
            self._local.reads = 0
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        me = threading.get_ident()
        if getattr(self._local, "reads", 0) and self._writer != me:
            raise RuntimeError("a reader cannot become a writer (it would wait for itself)")
        with self._cond:
            if self._writer == me:
                self._depth += 1
            else:
                self._waiting_writers += 1
                while self._writer is not None or self._readers:
                    self._cond.wait()
                self._waiting_writers -= 1
                self._writer, self._depth = me, 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if not self._depth:
                    self._writer = None
                    self._cond.notify_all()


# -- the vector store: one FAISS index with labelled positions and tombstones --------------------
class _Store:
    """Vectors at positions of one FAISS index (flat or HNSW), each labelled with a face id
    (-1: tombstone). Not thread-safe: FaceIndex locks around it."""

    def __init__(self, dim: int, kind: str, policy: IndexPolicy, index: Any = None) -> None:
        self.dim, self.kind, self.policy = dim, kind, policy
        if index is None:
            index = _new_hnsw(dim, policy) if kind == "hnsw" else faiss.IndexFlatIP(dim)
        self.index = index
        #: an fp16 graph re-scored against float32 copies (IndexRefineFlat), else None
        self.refined: Any = index if isinstance(index, faiss.IndexRefine) else None
        self.labels = np.full(max(16, index.ntotal), -1, dtype=np.int64)
        self.pos: dict[int, int] = {}
        self.alive = np.zeros((len(self.labels) + 7) // 8, dtype=np.uint8)
        self.dead = 0
        #: grows with every change: keys the candidate cache
        self.generation = 0

    @property
    def positions(self) -> int:
        return int(self.index.ntotal)

    def set_labels(self, labels: np.ndarray) -> None:
        """Labels for every position of a loaded index (-1: tombstone)."""
        n = self.positions
        if len(labels) != n:
            raise ValueError(f"{len(labels)} labels for {n} positions")
        self._grow(n)
        self.labels[:n] = labels
        live = np.flatnonzero(labels >= 0)
        self.pos = dict(zip(labels[live].tolist(), live.tolist(), strict=True))
        if len(self.pos) != len(live):
            raise ValueError("a face id labels two positions")
        bits = np.zeros(len(self.labels), dtype=bool)
        bits[live] = True
        self.alive = np.packbits(bits, bitorder="little")
        self.dead = n - len(live)
        self.generation += 1

    def _grow(self, needed: int) -> None:
        if needed <= len(self.labels):
            return
        size = max(needed, 2 * len(self.labels))
        labels = np.full(size, -1, dtype=np.int64)
        labels[: len(self.labels)] = self.labels
        self.labels = labels
        alive = np.zeros((size + 7) // 8, dtype=np.uint8)
        alive[: len(self.alive)] = self.alive
        self.alive = alive

    def vectors(self) -> np.ndarray:
        """A view (no copy) of every position's stored vector; valid until the next add."""
        n = self.positions
        if n == 0:
            return np.zeros((0, self.dim), np.float32)
        if self.kind == "flat":
            flat = self.index
        elif self.refined is not None:
            flat = faiss.downcast_index(self.refined.refine_index)
        else:
            flat = faiss.downcast_index(self.index.storage)
        return faiss.rev_swig_ptr(flat.get_xb(), n * self.dim).reshape(n, self.dim)

    def _fp16_codes(self) -> np.ndarray | None:
        """A view of the fp16 graph's half-precision vectors as bytes (positions x 2 dim)."""
        if self.refined is None or self.positions == 0:
            return None
        sq = faiss.downcast_index(_graph_of(self.refined).storage)
        return faiss.rev_swig_ptr(sq.codes.data(), self.positions * sq.code_size).reshape(self.positions, sq.code_size)

    def drop(self, face_ids: list[int]) -> int:
        """Tombstone these faces' positions (zeroing their vectors); returns how many."""
        if not face_ids:
            return 0
        found = [self.pos.pop(f) for f in face_ids if f in self.pos]
        if found:
            at = np.asarray(found, dtype=np.int64)
            self.labels[at] = -1
            np.bitwise_and.at(self.alive, at >> 3, ~np.left_shift(1, at & 7).astype(np.uint8))
            self.vectors()[at] = 0.0
            codes = self._fp16_codes()
            if codes is not None:
                codes[at] = 0  # fp16 zero: the half-precision copy does not linger either
            self.dead += len(found)
            self.generation += 1
        return len(found)

    def put(self, face_ids: np.ndarray, vectors: np.ndarray) -> None:
        """Store normalised ``vectors`` for unique ``face_ids``, replacing their old ones."""
        if len(face_ids) == 0:
            return
        self.drop([f for f in face_ids.tolist() if f in self.pos])
        start = self.positions
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        self._grow(start + len(face_ids))
        at = np.arange(start, start + len(face_ids), dtype=np.int64)
        self.labels[at] = face_ids
        self.pos.update(zip(face_ids.tolist(), at.tolist(), strict=True))
        np.bitwise_or.at(self.alive, at >> 3, np.left_shift(1, at & 7).astype(np.uint8))
        self.generation += 1

    def search(self, queries: np.ndarray, k: int, positions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` live positions per query (or among ``positions``): (scores, face ids)."""
        sel: Any = None
        keep: Any = None  # the selector's buffer must outlive the call
        if positions is not None:
            keep = np.ascontiguousarray(positions, dtype=np.int64)
            sel = faiss.IDSelectorBatch(keep)
        elif self.dead:
            keep = self.alive
            sel = faiss.IDSelectorBitmap(self.positions, faiss.swig_ptr(self.alive))
        if self.kind == "hnsw":
            ef = self.policy.ef_search_for(self.index.ntotal)
            if self.refined is not None:
                factor = max(1.0, float(self.policy.refine_factor))
                walk = faiss.SearchParametersHNSW(sel=sel, efSearch=max(ef, math.ceil(k * factor)))
                params = faiss.IndexRefineSearchParameters(k_factor=factor, base_index_params=walk)
            else:
                params = faiss.SearchParametersHNSW(sel=sel, efSearch=max(ef, k))
        else:
            params = faiss.SearchParameters(sel=sel) if sel is not None else None
        scores, at = self.index.search(queries, k, params=params)
        del keep
        ids = np.where(at >= 0, self.labels[np.maximum(at, 0)], -1)
        return scores, ids

    def live(self) -> tuple[np.ndarray, np.ndarray]:
        """(positions, face ids) of every live vector, in storage order."""
        n = self.positions
        at = np.flatnonzero(self.labels[:n] >= 0)
        return at, self.labels[at]


def _graph_of(index: Any) -> Any:
    """The HNSW graph of an HNSW index: itself, or the graph a refined index walks."""
    return faiss.downcast_index(index.base_index) if isinstance(index, faiss.IndexRefine) else index


def _new_hnsw(dim: int, policy: IndexPolicy) -> Any:
    """An empty HNSW index as ``policy.hnsw_storage`` says (see the module docstring)."""
    if policy.hnsw_storage == "flat":
        index = faiss.IndexHNSWFlat(dim, policy.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    elif policy.hnsw_storage == "fp16":
        graph = faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_fp16, policy.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index = faiss.IndexRefineFlat(graph)
        graph.this.disown()  # the refine index owns (and frees) the graph from here on
        index.own_fields = True
    else:
        raise ValueError(f"hnsw_storage must be 'fp16' or 'flat', got {policy.hnsw_storage!r}")
    _graph_of(index).hnsw.efConstruction = policy.ef_construction
    return index


def _build_store(dim: int, kind: str, policy: IndexPolicy, ids: np.ndarray, vectors: np.ndarray) -> _Store:
    store = _Store(dim, kind, policy)
    for start in range(0, len(ids), 100_000):  # HNSW adds in chunks: bounded temp memory
        store.put(ids[start : start + 100_000], vectors[start : start + 100_000])
    return store


class FaceIndex:
    """Cosine-similarity search over face embeddings of one embedder version; thread-safe."""

    def __init__(self, model_version: str, dim: int, directory: str | os.PathLike[str] | None = None,
                 policy: IndexPolicy | None = None) -> None:
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.model_version = model_version
        self.dim = int(dim)
        self.directory = Path(directory) if directory is not None else None
        self.policy = policy or DEFAULT_POLICY
        self._lock = _RWLock()
        self._store = _Store(self.dim, "flat", self.policy)
        # face id -> row id (0: not known) of every vector present
        self._rows: dict[int, int] = {}
        # running parts of stamp(); the max is recomputed only after its row went away
        self._row_sum = 0
        self._row_max: int | None = 0
        self._dirty = False
        # changes not written to the files yet: ("add", ids, vectors, rows) / ("remove", ids)
        self._pending: list[tuple] = []
        # changes made while a rebuild runs outside the lock (replayed onto the new store)
        self._journal: list[tuple] | None = None
        self._rebuilding = threading.Lock()
        self._save_lock = threading.Lock()
        # the base this process last wrote or loaded (its token); None: write a checkpoint
        self._token: str | None = None
        # (key, positions, vectors) of the last exact ``among`` search
        self._candidates: tuple[Any, np.ndarray, np.ndarray] | None = None

    def __repr__(self) -> str:
        return f"FaceIndex({self.model_version!r}, dim={self.dim}, n={len(self)}, {self.kind})"

    # -- paths ------------------------------------------------------------------------

    @staticmethod
    def paths(directory: str | os.PathLike[str], model_version: str) -> tuple[Path, Path]:
        """(index file, manifest file) for ``model_version`` in ``directory``."""
        base = Path(directory) / _slug(model_version)
        return base.with_name(base.name + ".faiss"), base.with_name(base.name + ".manifest.json")

    @staticmethod
    def all_paths(directory: str | os.PathLike[str], model_version: str) -> list[Path]:
        """Every file this index keeps in ``directory`` (to delete them all)."""
        base = Path(directory) / _slug(model_version)
        return [base.with_name(base.name + suffix)
                for suffix in (".faiss", ".ids.npy", ".manifest.json", ".delta", ".lock")]

    @classmethod
    def _files(cls, directory: str | os.PathLike[str], model_version: str) -> dict[str, Path]:
        index, ids, manifest, delta, lock = cls.all_paths(directory, model_version)
        return {"index": index, "ids": ids, "manifest": manifest, "delta": delta, "lock": lock}

    # -- contents ---------------------------------------------------------------------

    def __len__(self) -> int:
        with self._lock.read():
            return len(self._rows)

    @property
    def kind(self) -> str:
        """"flat" (exact) or "hnsw"."""
        return self._store.kind

    @property
    def dirty(self) -> bool:
        """True when changed since the last save/load."""
        return self._dirty

    def ids(self) -> np.ndarray:
        """All ids in the index (int64, in storage order)."""
        with self._lock.read():
            return self._store.live()[1].copy()

    def __contains__(self, face_id: int) -> bool:
        return int(face_id) in self._rows

    def row_id(self, face_id: int) -> int | None:
        """The row id ``face_id``'s vector came from (0: not known), None when absent."""
        return self._rows.get(int(face_id))

    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        """``(face ids, row ids)`` of every vector, by face id (int64; row id 0 = not known)."""
        with self._lock.read():
            ids = np.fromiter(self._rows.keys(), dtype=np.int64, count=len(self._rows))
            rows = np.fromiter(self._rows.values(), dtype=np.int64, count=len(self._rows))
        order = np.argsort(ids, kind="stable")
        return ids[order], rows[order]

    def stamp(self) -> Stamp:
        """``(count, max row id, sum of row ids)`` of the contents (see embedding_rows.embedding_stamp)."""
        with self._lock.read():
            if self._row_max is None:
                self._row_max = max(self._rows.values(), default=0)
            return len(self._rows), self._row_max, self._row_sum

    def _set_row(self, face_id: int, row_id: int) -> None:
        # caller holds the write lock
        old = self._rows.get(face_id)
        if old is not None:
            self._forget_row(old)
        self._rows[face_id] = row_id
        self._row_sum += row_id
        if self._row_max is not None and row_id > self._row_max:
            self._row_max = row_id

    def _forget_row(self, row_id: int) -> None:
        # caller holds the write lock
        self._row_sum -= row_id
        if row_id == self._row_max and row_id:
            self._row_max = None

    def _prepare(self, vectors: np.ndarray) -> np.ndarray:
        arr = np.array(vectors, dtype=np.float32, copy=True)
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise ValueError(f"expected vectors of dim {self.dim}, got shape {np.shape(vectors)}")
        if not np.all(np.isfinite(arr)):
            raise ValueError("vectors contain NaN or inf")
        norms = np.linalg.norm(arr, axis=1)
        if np.any(norms == 0):
            raise ValueError("zero vector cannot be normalised")
        arr /= norms[:, None]
        return np.ascontiguousarray(arr)

    def add(self, ids: np.ndarray | list[int], vectors: np.ndarray, row_ids: np.ndarray | list[int] | None = None,
            *, keep_newer: bool = False) -> int:
        """Add vectors under ``ids``, replacing any vectors already stored for those ids.

        ``row_ids``: the database row each vector came from (default 0, "not known").
        ``keep_newer``: leave a face alone when the index already holds a vector from the
        same or a later row (row ids only grow), so applying a change twice, or after a
        newer one, is harmless; rows with id 0 always replace. Vectors are L2-normalised
        here. If an id repeats within the call, the last vector wins. Returns how many
        vectors were written.
        """
        id_arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        vecs = self._prepare(vectors)
        if len(id_arr) != len(vecs):
            raise ValueError(f"{len(id_arr)} ids but {len(vecs)} vectors")
        row_arr = (np.zeros(len(id_arr), dtype=np.int64) if row_ids is None
                   else np.asarray(row_ids, dtype=np.int64).reshape(-1))
        if len(row_arr) != len(id_arr):
            raise ValueError(f"{len(id_arr)} ids but {len(row_arr)} row ids")
        if len(id_arr) == 0:
            return 0
        # keep the last occurrence of each id
        _, last_from_end = np.unique(id_arr[::-1], return_index=True)
        keep = np.sort(len(id_arr) - 1 - last_from_end)
        id_arr, vecs, row_arr = id_arr[keep], vecs[keep], row_arr[keep]
        with self._lock.write():
            if keep_newer:
                fresh = np.asarray([not (r and self._rows.get(i, -1) >= r)
                                    for i, r in zip(id_arr.tolist(), row_arr.tolist())], dtype=bool)
                id_arr, vecs, row_arr = id_arr[fresh], vecs[fresh], row_arr[fresh]
                if len(id_arr) == 0:
                    return 0
            self._store.put(id_arr, vecs)
            for face_id, row_id in zip(id_arr.tolist(), row_arr.tolist()):
                self._set_row(face_id, row_id)
            self._record(("add", id_arr, vecs, row_arr))
            added = len(id_arr)
        self._maybe_rebuild()
        return added

    def remove(self, ids: np.ndarray | list[int]) -> int:
        """Remove ``ids`` (unknown ids are ignored); returns how many were removed. The
        vectors are zeroed in memory at once; ``save(checkpoint=True)`` also takes them
        off the disk (a plain save only appends the removal to the delta)."""
        id_arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(id_arr) == 0:
            return 0
        with self._lock.write():
            present = [i for i in dict.fromkeys(id_arr.tolist()) if i in self._rows]
            if not present:
                return 0
            self._store.drop(present)
            for face_id in present:
                self._forget_row(self._rows.pop(face_id))
            self._record(("remove", np.asarray(present, dtype=np.int64)))
        self._maybe_rebuild()
        return len(present)

    def _record(self, op: tuple) -> None:
        # caller holds the write lock
        self._pending.append(op)
        if self._journal is not None:
            self._journal.append(op)
        self._dirty = True
        self._candidates = None

    def present(self, face_ids: np.ndarray | list[int]) -> np.ndarray:
        """Which of ``face_ids`` have a vector here (bool per id)."""
        rows = self._rows
        return np.fromiter((int(f) in rows for f in np.asarray(face_ids).reshape(-1).tolist()), dtype=bool)

    def reconstruct_many(self, face_ids: np.ndarray | list[int]) -> np.ndarray:
        """The stored (normalised) vectors of ``face_ids``, in that order; KeyError if one is absent."""
        with self._lock.read():
            pos = self._store.pos
            at = np.asarray([pos[int(f)] if int(f) in pos else -1 for f in np.asarray(face_ids).reshape(-1).tolist()],
                            dtype=np.int64)
            if (at < 0).any():
                raise KeyError(int(np.asarray(face_ids).reshape(-1)[np.argmax(at < 0)]))
            return self._store.vectors()[at].copy() if len(at) else np.zeros((0, self.dim), np.float32)

    def held_vectors(self, face_ids: np.ndarray | list[int]) -> tuple[list[int], np.ndarray]:
        """The ids of ``face_ids`` this index still holds and their vectors, read together
        under one lock: a removal by another thread cannot fall between the two."""
        with self._lock.read():
            pos = self._store.pos
            kept = [int(f) for f in np.asarray(face_ids).reshape(-1).tolist() if int(f) in pos]
            at = np.asarray([pos[f] for f in kept], dtype=np.int64)
            vectors = self._store.vectors()[at].copy() if len(at) else np.zeros((0, self.dim), np.float32)
            return kept, vectors

    def reconstruct(self, face_id: int) -> np.ndarray:
        """The stored (normalised) vector for ``face_id``; KeyError if absent."""
        with self._lock.read():
            at = self._store.pos.get(int(face_id))
            if at is None:
                raise KeyError(face_id)
            return self._store.vectors()[at].copy()

    def search(self, vectors: np.ndarray, k: int, among: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most similar stored faces for each query (cosine similarity, best first).

        A 1-D query returns 1-D ``(scores, ids)``; a 2-D (n, dim) batch returns (n, k')
        arrays. ``k' = min(k, len(self))``. Exact search fills every slot; HNSW may leave
        a slot empty (id -1, score -inf) when tombstones or a selector cut its candidate
        list short (a 1-D result drops them). Scores are float32 in [-1, 1]; ids are
        int64 face ids.

        ``among``: only these face ids compete (e.g. the enrolled faces, so unknown faces
        can never crowd the person a query belongs to out of the top k); slots no
        candidate fills hold id -1 and score -inf.
        """
        single = np.ndim(vectors) == 1
        queries = self._prepare(vectors)
        with self._lock.read():
            store = self._store
            if among is not None:
                positions, matrix = self._candidate_positions(store, np.asarray(among, dtype=np.int64).reshape(-1))
                k_eff = min(int(k), len(positions))
            else:
                positions, matrix = None, None
                k_eff = min(int(k), len(self._rows))
            if k_eff <= 0:
                scores = np.zeros((len(queries), 0), dtype=np.float32)
                ids = np.zeros((len(queries), 0), dtype=np.int64)
            elif matrix is not None:
                scores, ids = _exact_top(queries, matrix, store.labels[positions], k_eff)
            else:
                scores, ids = store.search(queries, k_eff, positions)
        if single:
            valid = ids[0] != -1
            return scores[0][valid], ids[0][valid]
        return scores, ids

    def _candidate_positions(self, store: _Store, among: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Live positions of ``among`` and, when they are few, their vectors (cached while
        neither the index nor the list changes). Caller holds the read lock."""
        key = (store.generation, id(store), hashlib.blake2b(among.tobytes(), digest_size=16).digest())
        cached = self._candidates
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        pos = store.pos
        positions = np.fromiter((pos[f] for f in among.tolist() if f in pos), dtype=np.int64)
        positions = np.unique(positions)
        if len(positions) > self.policy.exact_candidates:
            return positions, None
        matrix = store.vectors()[positions].copy() if len(positions) else np.zeros((0, self.dim), np.float32)
        self._candidates = (key, positions, matrix)
        return positions, matrix

    # -- structure: flat below a size, HNSW above; rebuilds drop tombstones ---------------------

    def _wanted_kind(self, live: int, current: str) -> str:
        if current == "flat":
            return "hnsw" if live >= self.policy.hnsw_above else "flat"
        return "flat" if live < self.policy.hnsw_above // 2 else "hnsw"

    def _needs_rebuild(self) -> str | None:
        """The kind to rebuild into, or None. Caller holds a lock."""
        store = self._store
        kind = self._wanted_kind(len(self._rows), store.kind)
        if kind != store.kind:
            return kind
        if store.dead >= max(self.policy.rebuild_dead_min, self.policy.rebuild_dead_share * store.positions):
            return kind
        return None

    def _maybe_rebuild(self) -> None:
        with self._lock.read():
            if self._needs_rebuild() is None:
                return
        self.rebuild()

    def rebuild(self) -> None:
        """Build the structure again from the live vectors (flat or HNSW by size), without
        tombstones. Built outside the lock: searches go on meanwhile; changes made during
        the build are replayed onto the new structure before it replaces the old one."""
        if not self._rebuilding.acquire(blocking=False):
            return  # another thread is at it
        try:
            with self._lock.write():
                kind = self._needs_rebuild() or self._store.kind
                at, ids = self._store.live()
                vectors = self._store.vectors()[at].copy()
                self._journal = []
            t0 = time.perf_counter()
            try:
                store = _build_store(self.dim, kind, self.policy, ids, vectors)
            except BaseException:
                with self._lock.write():
                    self._journal = None
                raise
            del vectors
            with self._lock.write():
                for op in self._journal:
                    if op[0] == "add":
                        store.put(op[1], op[2])
                    else:
                        store.drop(op[1].tolist())
                self._journal = None
                old, self._store = self._store, store
                self._candidates = None
                self._token = None  # the next save writes a checkpoint of the new structure
                self._dirty = True
            log.info("face index %s rebuilt as %s: %d vectors, %d tombstones dropped, %.1f s",
                     self.model_version, kind, len(ids), old.dead, time.perf_counter() - t0)
        finally:
            self._rebuilding.release()

    # -- persistence --------------------------------------------------------------------

    @contextmanager
    def _file_lock(self, lock_path: Path) -> Iterator[None]:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with lock_path.open("a") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def save(self, directory: str | os.PathLike[str] | None = None, *, checkpoint: bool = False) -> Path:
        """Persist the changes since the last save; returns the index file's path.

        Appends them to the delta log (O(changes)); writes a checkpoint (base files, new
        delta) instead when there is no base of this index yet, when the delta has grown
        past ``delta_share`` of the base, after a rebuild, or when ``checkpoint`` is
        asked for (privacy deletes: the removed vectors then leave the disk too).
        """
        target = Path(directory) if directory is not None else self.directory
        if target is None:
            raise ValueError("no directory given to save the index in")
        files = self._files(target, self.model_version)
        # the read lock keeps changes out (searches go on) while the files are written
        with self._save_lock, self._file_lock(files["lock"]), self._lock.read():
            manifest = self.read_manifest(target, self.model_version)
            base_ok = (manifest is not None and target == self.directory and self._token is not None
                       and manifest.get("format") == MANIFEST_FORMAT and isinstance(manifest.get("token"), str)
                       and _delta_token(files["delta"], self.dim) == manifest.get("token"))
            delta_size = files["delta"].stat().st_size if base_ok else 0
            base_faces = int(manifest.get("positions", 0)) if manifest else 0
            delta_faces = delta_size // (16 + 4 * self.dim)
            too_big = delta_faces > max(self.policy.delta_min_faces, self.policy.delta_share * base_faces)
            pending, self._pending = self._pending, []
            if checkpoint or not base_ok or too_big:
                self._write_checkpoint(files)
            elif pending:
                _append(files["delta"], b"".join(self._delta_bytes(op) for op in pending))
            self.directory = target
            self._dirty = False
        return files["index"]

    def _delta_bytes(self, op: tuple) -> bytes:
        if op[0] == "add":
            return _delta_record(_OP_ADD, op[1], op[3], op[2])
        return _delta_record(_OP_REMOVE, op[1])

    def _write_checkpoint(self, files: dict[str, Path]) -> None:
        # caller holds the file lock and the write lock
        store = self._store
        n = store.positions
        labels = store.labels[:n].copy()
        rows = np.array([self._rows.get(int(f), 0) if f >= 0 else 0 for f in labels.tolist()], dtype=np.int64)
        face_ids, row_ids = labels[labels >= 0], rows[labels >= 0]
        token = uuid.uuid4().hex
        _atomic_write(files["index"], lambda p: faiss.write_index(store.index, str(p)))

        def write_ids(p: Path) -> None:
            with p.open("wb") as fh:
                np.save(fh, np.stack([labels, rows], axis=1).astype("<i8"))

        _atomic_write(files["ids"], write_ids)
        manifest = {
            "format": MANIFEST_FORMAT,
            "model_version": self.model_version,
            "dim": self.dim,
            "kind": store.kind,
            "count": int(len(face_ids)),
            "positions": int(n),
            "ids_checksum": ids_checksum(face_ids),
            "rows_checksum": rows_checksum(face_ids, row_ids),
            "index_file": files["index"].name,
            "index_sha256": _file_sha256(files["index"]),
            "ids_file": files["ids"].name,
            "ids_sha256": _file_sha256(files["ids"]),
            "token": token,
            "hnsw": {"m": self.policy.hnsw_m, "ef_construction": self.policy.ef_construction,
                     "storage": "fp16" if store.refined is not None else "flat"}
            if store.kind == "hnsw" else None,
            "created": datetime.now(UTC).isoformat(),
        }
        _atomic_write(files["manifest"], lambda p: p.write_text(json.dumps(manifest, indent=2)))
        _atomic_write(files["delta"], lambda p: p.write_bytes(_delta_header(token, self.dim)))
        self._token = token

    def matches_saved(self, directory: str | os.PathLike[str] | None = None) -> bool:
        """True when the saved files (base and delta) hold exactly these (face id, row id)
        pairs. Reads them: O(library); meant for checks, not for every save."""
        target = Path(directory) if directory is not None else self.directory
        if target is None:
            return False
        try:
            saved = self.load(target, self.model_version, self.dim)
        except ValueError:
            return False
        mine, theirs = self.rows(), saved.rows()
        return np.array_equal(mine[0], theirs[0]) and np.array_equal(mine[1], theirs[1])

    @staticmethod
    def read_manifest(directory: str | os.PathLike[str], model_version: str) -> dict[str, Any] | None:
        """The saved manifest, or None if it is missing or unreadable."""
        _, manifest_path = FaceIndex.paths(directory, model_version)
        try:
            data = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    @classmethod
    def load(cls, directory: str | os.PathLike[str], model_version: str, dim: int,
             policy: IndexPolicy | None = None) -> FaceIndex:
        """Load a saved index (base plus delta), checking manifest and file checksums;
        ValueError if anything is off."""
        return cls._load(directory, model_version, dim, policy)[0]

    @classmethod
    def _load(cls, directory: str | os.PathLike[str], model_version: str, dim: int,
              policy: IndexPolicy | None = None) -> tuple[FaceIndex, dict[str, Any], bool]:
        """(index, manifest, whether the delta ended cleanly)."""
        files = cls._files(directory, model_version)
        manifest = cls.read_manifest(directory, model_version)
        if manifest is None:
            raise ValueError("manifest missing or unreadable")
        found = manifest.get("format")
        if isinstance(found, int) and not isinstance(found, bool) and 0 < found < MANIFEST_FORMAT:
            raise OutdatedIndexFormat(f"manifest format is {found}, this version writes {MANIFEST_FORMAT}")
        expected = {"format": MANIFEST_FORMAT, "model_version": model_version, "dim": int(dim)}
        for key, value in expected.items():
            if manifest.get(key) != value:
                raise ValueError(f"manifest {key} is {manifest.get(key)!r}, expected {value!r}")
        for name in ("index", "ids"):
            if not files[name].is_file():
                raise ValueError(f"index file missing: {files[name]}")
            # checked before faiss/numpy parse it: a damaged file must never reach read_index
            if _file_sha256(files[name]) != manifest.get(f"{name}_sha256"):
                raise ValueError(f"{files[name].name}: checksum does not match the manifest")
        try:
            raw = faiss.read_index(str(files["index"]))
            table = np.load(files["ids"], allow_pickle=False)
        except (RuntimeError, ValueError, OSError) as exc:
            raise ValueError(f"could not read {files['index'].name}: {exc}") from exc
        kind = manifest.get("kind")
        expected_type = {"flat": (faiss.IndexFlatIP,), "hnsw": (faiss.IndexHNSWFlat, faiss.IndexRefine)}.get(kind)
        if expected_type is None or not isinstance(raw, expected_type) or raw.d != dim:
            raise ValueError(f"unexpected index type {type(raw).__name__} or dim {raw.d} for kind {kind!r}")
        if isinstance(raw, faiss.IndexRefine) and not (
                isinstance(faiss.downcast_index(raw.base_index), faiss.IndexHNSWSQ)
                and isinstance(faiss.downcast_index(raw.refine_index), faiss.IndexFlat)
                and raw.base_index.ntotal == raw.refine_index.ntotal == raw.ntotal):
            raise ValueError("unexpected parts in a refined HNSW index")
        if table.ndim != 2 or table.shape != (raw.ntotal, 2):
            raise ValueError(f"ids table has shape {table.shape}, expected ({raw.ntotal}, 2)")
        index = cls(model_version, dim, directory, policy)
        if kind == "hnsw":
            _graph_of(raw).hnsw.efConstruction = index.policy.ef_construction
        store = _Store(dim, kind, index.policy, raw)
        labels, rows = table[:, 0].astype(np.int64), table[:, 1].astype(np.int64)
        store.set_labels(labels)
        live = labels >= 0
        face_ids, row_ids = labels[live], rows[live]
        if (len(face_ids) != manifest.get("count") or ids_checksum(face_ids) != manifest.get("ids_checksum")
                or rows_checksum(face_ids, row_ids) != manifest.get("rows_checksum")):
            raise ValueError("index contents do not match the manifest")
        index._store = store
        index._rows = dict(zip(face_ids.tolist(), row_ids.tolist(), strict=True))
        index._row_sum = int(row_ids.sum())
        index._row_max = None
        index._token = str(manifest.get("token"))
        ops, clean = _read_delta(files["delta"], index._token, dim)
        for op in ops:  # in the order they were saved; an exact repeat (two processes
            # saved the same change) is skipped, so it leaves no tombstone
            if op[0] == "add":
                fresh = np.asarray([not (r and index._rows.get(f) == r) for f, r in zip(op[1].tolist(), op[3].tolist())],
                                   dtype=bool)
                if fresh.any():
                    index.add(op[1][fresh], op[2][fresh], op[3][fresh])
            else:
                index.remove(op[1])
        index._pending = []
        index._dirty = False
        return index, manifest, clean

    @classmethod
    def build(cls, model_version: str, dim: int, ids: np.ndarray, vectors: np.ndarray,
              directory: str | os.PathLike[str] | None = None, row_ids: np.ndarray | None = None,
              policy: IndexPolicy | None = None) -> FaceIndex:
        """A new index holding ``vectors`` under ``ids`` (from rows ``row_ids``, default not
        known), in the structure its size calls for."""
        index = cls(model_version, dim, directory, policy)
        id_arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        vecs = np.asarray(vectors, dtype=np.float32).reshape(-1, dim)
        rows = np.zeros(len(id_arr), np.int64) if row_ids is None else np.asarray(row_ids, np.int64).reshape(-1)
        if len(id_arr) != len(vecs) or len(id_arr) != len(rows):
            raise ValueError(f"{len(id_arr)} ids but {len(vecs)} vectors and {len(rows)} row ids")
        # the last occurrence of an id wins, as in add()
        _, last_from_end = np.unique(id_arr[::-1], return_index=True)
        keep = np.sort(len(id_arr) - 1 - last_from_end)
        id_arr, rows = id_arr[keep], rows[keep]
        prepared = np.empty((len(keep), dim), dtype=np.float32)
        for start in range(0, len(keep), 100_000):  # bounded temp memory for normalising
            prepared[start : start + 100_000] = index._prepare(vecs[keep[start : start + 100_000]])
        kind = index._wanted_kind(len(id_arr), "flat")
        index._store = _build_store(dim, kind, index.policy, id_arr, prepared)
        index._rows = dict(zip(id_arr.tolist(), rows.tolist(), strict=True))
        index._row_sum, index._row_max = int(rows.sum()), None
        index._dirty = bool(len(id_arr))  # no base yet: the first save is a checkpoint
        return index

    @classmethod
    def load_or_rebuild(
        cls,
        directory: str | os.PathLike[str],
        model_version: str,
        dim: int,
        fetch_all: FetchAll,
        *,
        face_ids: np.ndarray,
        row_ids: np.ndarray,
        fetch_rows: FetchRows | None = None,
        policy: IndexPolicy | None = None,
    ) -> FaceIndex:
        """Load the saved index if it holds exactly the database's vectors; else bring it
        in step (``fetch_rows`` given: only the rows it lacks are read) or rebuild it.

        ``face_ids`` / ``row_ids`` are the database's current ``(face id, row id)`` pairs
        for this model version (``storage.embedding_rows.embedding_rows``). ``fetch_all``
        returns ``(face ids, vectors, row ids)`` from the database and is called only on
        rebuild; ``fetch_rows(row_ids)`` the same for just those rows. An index that had
        to be rebuilt or repaired, or whose delta was torn or long, is checkpointed
        before it is returned.
        """
        reason: str
        db_faces = np.asarray(face_ids, dtype=np.int64)
        db_rows = np.asarray(row_ids, dtype=np.int64)
        try:
            index, manifest, clean = cls._load(directory, model_version, dim, policy)
        except ValueError as exc:
            reason = str(exc)
        else:
            have_faces, have_rows = index.rows()
            same = np.array_equal(have_faces, np.sort(db_faces)) and \
                rows_checksum(have_faces, have_rows) == rows_checksum(db_faces, db_rows)
            if same:
                if not clean:
                    index.save(checkpoint=True)
                return index
            reason = "the database's embedding rows differ from the index's (added, deleted or re-embedded faces)"
            if fetch_rows is not None and len(db_faces) and len(have_faces):
                added, removed = index._follow(db_faces, db_rows, fetch_rows)
                if added is not None:
                    log.info("face index %s brought in step with the database: %d vector(s) read, %d removed",
                             model_version, added, removed)
                    index.save(checkpoint=True)
                    return index
        log.info("rebuilding face index %s from the database: %s", model_version, reason)
        ids, vectors, rows = fetch_all()
        index = cls.build(model_version, dim, ids, vectors, directory, rows, policy)
        index.save(checkpoint=True)
        return index

    def _follow(self, db_faces: np.ndarray, db_rows: np.ndarray, fetch_rows: FetchRows) -> tuple[int | None, int]:
        """Make the contents the database's pairs, reading only missing rows' vectors;
        (vectors added, removed), or (None, 0) when the rows changed meanwhile."""
        order = np.argsort(db_faces, kind="stable")
        db_faces, db_rows = db_faces[order], db_rows[order]
        have_faces, have_rows = self.rows()
        at = np.minimum(np.searchsorted(have_faces, db_faces), len(have_faces) - 1)
        held = (have_faces[at] == db_faces) & (have_rows[at] == db_rows)
        removed = self.remove(np.setdiff1d(have_faces, db_faces, assume_unique=True))
        wanted = db_rows[~held]
        if len(wanted):
            got_faces, got_vectors, got_rows = fetch_rows(wanted)
            if len(got_rows) != len(wanted):
                return None, removed
            self.add(got_faces, got_vectors, got_rows)
        return int(len(wanted)), removed


def _exact_top(queries: np.ndarray, matrix: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` of ``queries @ matrix.T`` per row: (scores, labels), best first."""
    sims = queries @ matrix.T
    if k < sims.shape[1]:
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(sims.shape[1]), (len(sims), sims.shape[1]))
    top = np.take_along_axis(sims, part, axis=1)
    order = np.argsort(-top, axis=1, kind="stable")
    best = np.take_along_axis(part, order, axis=1)
    return np.take_along_axis(sims, best, axis=1).astype(np.float32), labels[best]


__all__ = ["FaceIndex", "IndexPolicy", "DEFAULT_POLICY", "MANIFEST_FORMAT", "OutdatedIndexFormat",
           "ids_checksum", "rows_checksum"]
