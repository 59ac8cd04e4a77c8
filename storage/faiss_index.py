"""A FAISS cosine-similarity index over face embeddings, one per embedder version.

The database is the source of truth; the index file is a cache that can always be
rebuilt from it. Every vector carries, besides its face id, a *row id*: the id of the
database row it was read from (the embedding row). Callers guarantee that a row's
vector never changes and that row ids are never reused, so the set of ``(face id, row
id)`` pairs identifies the index's contents exactly. The manifest records a checksum of
those pairs; ``FaceIndex.load_or_rebuild`` loads the saved index only when it equals
the checksum of the pairs the database holds now (ids only: no vector is read) and the
index file's own checksum matches; otherwise it rebuilds from the ``fetch_all``
callable and saves. A re-embedded face (same face id, new row) thus forces a rebuild,
where a checksum of face ids alone would have loaded the old vector.

``FaceIndex.stamp()`` is ``(count, max row id, sum of row ids)`` of the contents: the
same figure ``storage.embedding_rows.embedding_stamp`` computes in SQL, so a caller can
tell cheaply whether the database moved on (another process wrote) and then sync just
the difference (``rows()``, ``add``, ``remove``).

Index type: exact inner product (``IndexIDMap2(IndexFlatIP)``) over L2-normalised
float32 vectors, i.e. cosine similarity. Exact search needs no training, supports
removal, and never returns fewer hits than asked for. Rough timings on the shared
2-core dev machine (random vectors, k=10, other jobs running, load average 2-8):
dim 128: one query 7-54 ms at 100k vectors and 130-220 ms at 1M (batches of 64:
3-13 and 50-130 ms per query); dim 512 at 100k: ~120 ms per query. Memory is
n * dim * 4 bytes (1M x 128: 512 MB). Adding a new id is amortised O(1); replacing or
removing ids costs one O(n) compaction per call (~0.1-0.3 s at 1M), so batch them.
That is interactive up to about 1M faces; beyond that an IVF index
(``IndexIVFFlat``, which also supports removal) is the next step. Not implemented:
no collection here is that large.

Files, in ``directory``: ``<slug>.faiss`` and ``<slug>.manifest.json`` where the slug
is the model version made filename-safe plus a short hash of it. Both are written to a
temp file, fsynced and moved into place with ``os.replace``; the manifest (written last)
records the index file's sha256, so a crash between the two writes is detected.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np

log = logging.getLogger(__name__)

#: 2: the manifest records ``rows_checksum`` (face id, row id pairs); older manifests
#: cause one rebuild
MANIFEST_FORMAT = 2


class OutdatedIndexFormat(ValueError):
    """A saved index written by an older FaceLab (an older manifest format). Not damage:
    ``load_or_rebuild`` rebuilds it from the database like any unusable file."""

#: ``() -> (face ids, vectors, row ids)`` from the database, for a rebuild
FetchAll = Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]]
#: ``(count, max row id, sum of row ids)``; see FaceIndex.stamp
Stamp = tuple[int, int, int]


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
    """Write via ``write(tmp_path)`` to a temp file next to ``path``, fsync, os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        try:
            dir_fd = os.open(path.parent, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        tmp.unlink(missing_ok=True)


class FaceIndex:
    """Cosine-similarity search over face embeddings of one embedder version; thread-safe."""

    def __init__(self, model_version: str, dim: int, directory: str | os.PathLike[str] | None = None) -> None:
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.model_version = model_version
        self.dim = int(dim)
        self.directory = Path(directory) if directory is not None else None
        self._lock = threading.RLock()
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        # face id -> row id (0: not known) of every vector present; also lets adding new
        # ids skip FAISS's O(n) remove_ids scan
        self._rows: dict[int, int] = {}
        # running parts of stamp(); the max is recomputed only after its row went away
        self._row_sum = 0
        self._row_max: int | None = 0
        self._dirty = False

    def __repr__(self) -> str:
        return f"FaceIndex({self.model_version!r}, dim={self.dim}, n={len(self)})"

    # -- paths ------------------------------------------------------------------------

    @staticmethod
    def paths(directory: str | os.PathLike[str], model_version: str) -> tuple[Path, Path]:
        """(index file, manifest file) for ``model_version`` in ``directory``."""
        base = Path(directory) / _slug(model_version)
        return base.with_name(base.name + ".faiss"), base.with_name(base.name + ".manifest.json")

    # -- contents ---------------------------------------------------------------------

    def __len__(self) -> int:
        with self._lock:
            return int(self._index.ntotal)

    @property
    def dirty(self) -> bool:
        """True when changed since the last save/load."""
        return self._dirty

    def ids(self) -> np.ndarray:
        """All ids in the index (int64, in storage order)."""
        with self._lock:
            return faiss.vector_to_array(self._index.id_map).astype(np.int64)

    def __contains__(self, face_id: int) -> bool:
        with self._lock:
            return int(face_id) in self._rows

    def row_id(self, face_id: int) -> int | None:
        """The row id ``face_id``'s vector came from (0: not known), None when absent."""
        with self._lock:
            return self._rows.get(int(face_id))

    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        """``(face ids, row ids)`` of every vector, by face id (int64; row id 0 = not known)."""
        with self._lock:
            ids = np.fromiter(self._rows.keys(), dtype=np.int64, count=len(self._rows))
            rows = np.fromiter(self._rows.values(), dtype=np.int64, count=len(self._rows))
        order = np.argsort(ids, kind="stable")
        return ids[order], rows[order]

    def stamp(self) -> Stamp:
        """``(count, max row id, sum of row ids)`` of the contents (see embedding_rows.embedding_stamp)."""
        with self._lock:
            if self._row_max is None:
                self._row_max = max(self._rows.values(), default=0)
            return len(self._rows), self._row_max, self._row_sum

    def _set_rows(self, face_ids: np.ndarray, row_ids: np.ndarray) -> None:
        """Row ids for exactly the faces present (after a load); caller holds self._lock."""
        rows = dict(zip(np.asarray(face_ids, np.int64).tolist(), np.asarray(row_ids, np.int64).tolist(), strict=True))
        if rows.keys() != self._rows.keys():
            raise ValueError("row ids given for other faces than the index holds")
        self._rows = rows
        self._row_sum = sum(rows.values())
        self._row_max = None

    def _set_row(self, face_id: int, row_id: int) -> None:
        # caller holds self._lock
        old = self._rows.get(face_id)
        if old is not None:
            self._forget_row(old)
        self._rows[face_id] = row_id
        self._row_sum += row_id
        if self._row_max is not None and row_id > self._row_max:
            self._row_max = row_id

    def _forget_row(self, row_id: int) -> None:
        # caller holds self._lock
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
        with self._lock:
            if keep_newer:
                fresh = np.asarray([not (r and self._rows.get(i, -1) >= r)
                                    for i, r in zip(id_arr.tolist(), row_arr.tolist())], dtype=bool)
                id_arr, vecs, row_arr = id_arr[fresh], vecs[fresh], row_arr[fresh]
                if len(id_arr) == 0:
                    return 0
            present = [i for i in id_arr.tolist() if i in self._rows]
            if present:  # O(len(index)) in FAISS: only pay it for real replacements
                self._index.remove_ids(faiss.IDSelectorBatch(np.asarray(present, dtype=np.int64)))
            self._index.add_with_ids(vecs, id_arr)
            for face_id, row_id in zip(id_arr.tolist(), row_arr.tolist()):
                self._set_row(face_id, row_id)
            self._dirty = True
            return len(id_arr)

    def remove(self, ids: np.ndarray | list[int]) -> int:
        """Remove ``ids`` (unknown ids are ignored); returns how many were removed."""
        id_arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(id_arr) == 0:
            return 0
        with self._lock:
            present = [i for i in id_arr.tolist() if i in self._rows]
            if not present:
                return 0
            removed = int(self._index.remove_ids(faiss.IDSelectorBatch(np.asarray(present, dtype=np.int64))))
            for face_id in present:
                self._forget_row(self._rows.pop(face_id))
            self._dirty = True
            return removed

    def reconstruct(self, face_id: int) -> np.ndarray:
        """The stored (normalised) vector for ``face_id``; KeyError if absent."""
        with self._lock:
            try:
                return self._index.reconstruct(int(face_id))
            except RuntimeError as exc:
                raise KeyError(face_id) from exc

    def search(self, vectors: np.ndarray, k: int, among: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most similar stored faces for each query (cosine similarity, best first).

        A 1-D query returns 1-D ``(scores, ids)``; a 2-D (n, dim) batch returns (n, k')
        arrays. ``k' = min(k, len(self))``, so exact search fills every slot and no -1 id
        is returned (a 1-D result also drops any -1 defensively). Scores are float32 in
        [-1, 1]; ids are int64 face ids.

        ``among``: only these face ids compete (e.g. the enrolled faces, so unknown faces
        can never crowd the person a query belongs to out of the top k); slots no
        candidate fills hold id -1 and score -inf.
        """
        single = np.ndim(vectors) == 1
        queries = self._prepare(vectors)
        params = None
        if among is not None:
            among = np.ascontiguousarray(np.asarray(among, dtype=np.int64))
            params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(among))
        with self._lock:
            k_eff = min(int(k), int(self._index.ntotal), len(among) if among is not None else int(k))
            if k_eff <= 0:
                scores = np.zeros((len(queries), 0), dtype=np.float32)
                ids = np.zeros((len(queries), 0), dtype=np.int64)
            else:
                scores, ids = self._index.search(queries, k_eff, params=params)
        if single:
            valid = ids[0] != -1
            return scores[0][valid], ids[0][valid]
        return scores, ids

    # -- persistence --------------------------------------------------------------------

    def save(self, directory: str | os.PathLike[str] | None = None) -> Path:
        """Write the index and then its manifest atomically; returns the index path."""
        target = Path(directory) if directory is not None else self.directory
        if target is None:
            raise ValueError("no directory given to save the index in")
        index_path, manifest_path = self.paths(target, self.model_version)
        with self._lock:
            ids = self.ids()
            face_ids, row_ids = self.rows()
            _atomic_write(index_path, lambda p: faiss.write_index(self._index, str(p)))
            manifest = {
                "format": MANIFEST_FORMAT,
                "model_version": self.model_version,
                "dim": self.dim,
                "count": int(len(ids)),
                "ids_checksum": ids_checksum(ids),
                "rows_checksum": rows_checksum(face_ids, row_ids),
                "index_file": index_path.name,
                "index_sha256": _file_sha256(index_path),
                "created": datetime.now(UTC).isoformat(),
            }
            _atomic_write(manifest_path, lambda p: p.write_text(json.dumps(manifest, indent=2)))
            self.directory = target
            self._dirty = False
        return index_path

    def matches_saved(self, directory: str | os.PathLike[str] | None = None) -> bool:
        """True when the saved manifest describes exactly these (face id, row id) pairs, e.g.
        because another process saved the same state: then a save can be skipped."""
        target = Path(directory) if directory is not None else self.directory
        manifest = self.read_manifest(target, self.model_version) if target is not None else None
        if manifest is None:
            return False
        face_ids, row_ids = self.rows()
        return (manifest.get("format") == MANIFEST_FORMAT and manifest.get("model_version") == self.model_version
                and manifest.get("dim") == self.dim and manifest.get("count") == len(face_ids)
                and manifest.get("rows_checksum") == rows_checksum(face_ids, row_ids))

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
    def load(cls, directory: str | os.PathLike[str], model_version: str, dim: int) -> FaceIndex:
        """Load a saved index, checking manifest and file checksum; ValueError if anything is off.

        The row ids are not in the file: they come out as 0 ("not known");
        ``load_or_rebuild`` fills them in from the database once the manifest matches it.
        """
        return cls._load(directory, model_version, dim)[0]

    @classmethod
    def _load(cls, directory: str | os.PathLike[str], model_version: str, dim: int) -> tuple[FaceIndex, dict[str, Any]]:
        index_path, _ = cls.paths(directory, model_version)
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
        if not index_path.is_file():
            raise ValueError(f"index file missing: {index_path}")
        # checked before faiss parses it: a damaged file must never reach read_index
        if _file_sha256(index_path) != manifest.get("index_sha256"):
            raise ValueError("index file checksum does not match the manifest")
        try:
            raw = faiss.read_index(str(index_path))
        except RuntimeError as exc:
            raise ValueError(f"faiss could not read {index_path}: {exc}") from exc
        if not isinstance(raw, faiss.IndexIDMap2) or raw.d != dim:
            raise ValueError(f"unexpected index type {type(raw).__name__} or dim {raw.d}")
        index = cls(model_version, dim, directory)
        index._index = raw
        ids = index.ids()
        index._rows = dict.fromkeys(ids.tolist(), 0)
        if len(ids) != manifest.get("count") or ids_checksum(ids) != manifest.get("ids_checksum"):
            raise ValueError("index contents do not match the manifest")
        return index, manifest

    @classmethod
    def build(cls, model_version: str, dim: int, ids: np.ndarray, vectors: np.ndarray,
              directory: str | os.PathLike[str] | None = None, row_ids: np.ndarray | None = None) -> FaceIndex:
        """A new index holding ``vectors`` under ``ids`` (from rows ``row_ids``, default not known)."""
        index = cls(model_version, dim, directory)
        id_arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        vecs = np.asarray(vectors, dtype=np.float32).reshape(-1, dim)
        rows = np.zeros(len(id_arr), np.int64) if row_ids is None else np.asarray(row_ids, np.int64).reshape(-1)
        if len(id_arr) != len(vecs) or len(id_arr) != len(rows):
            raise ValueError(f"{len(id_arr)} ids but {len(vecs)} vectors and {len(rows)} row ids")
        for start in range(0, len(vecs), 100_000):  # bounded temp memory for normalising
            stop = start + 100_000
            index.add(id_arr[start:stop], vecs[start:stop], rows[start:stop])
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
    ) -> FaceIndex:
        """Load the saved index if it holds exactly the database's vectors, else rebuild.

        ``face_ids`` / ``row_ids`` are the database's current ``(face id, row id)`` pairs
        for this model version (``storage.embedding_rows.embedding_rows``): the saved
        index is used only when its manifest's ``rows_checksum`` is theirs. ``fetch_all``
        returns ``(face ids, vectors, row ids)`` from the database and is called only on
        rebuild. The rebuilt index is saved before it is returned.
        """
        reason: str
        try:
            index, manifest = cls._load(directory, model_version, dim)
        except ValueError as exc:
            reason = str(exc)
        else:
            if manifest.get("count") != len(face_ids):
                reason = f"database has {len(face_ids)} vectors, index {manifest.get('count')}"
            elif manifest.get("rows_checksum") != rows_checksum(face_ids, row_ids):
                reason = "the database's embedding rows differ from the index's (added, deleted or re-embedded faces)"
            else:
                with index._lock:
                    index._set_rows(face_ids, row_ids)
                return index
        log.info("rebuilding face index %s from the database: %s", model_version, reason)
        ids, vectors, rows = fetch_all()
        index = cls.build(model_version, dim, ids, vectors, directory, rows)
        index.save()
        return index
