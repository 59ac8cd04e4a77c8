"""A FAISS cosine-similarity index over face embeddings, one per embedder version.

The database is the source of truth; the index file is a cache that can always be
rebuilt from it. ``FaceIndex.load_or_rebuild`` loads the saved index only when its
manifest matches what the caller says the database holds (count and a checksum of the
id set) and the index file's own checksum matches; otherwise it rebuilds from the
``fetch_all`` callable and saves.

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

MANIFEST_FORMAT = 1

FetchAll = Callable[[], tuple[np.ndarray, np.ndarray]]


def ids_checksum(ids: np.ndarray | list[int]) -> str:
    """Order-independent sha256 of a set of ids (what the manifest records)."""
    arr = np.unique(np.asarray(ids, dtype=np.int64))
    return hashlib.sha256(arr.astype("<i8").tobytes()).hexdigest()


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
        # the ids present, so that adding new ids skips FAISS's O(n) remove_ids scan
        self._id_set: set[int] = set()
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
            return int(face_id) in self._id_set

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

    def add(self, ids: np.ndarray | list[int], vectors: np.ndarray) -> None:
        """Add vectors under ``ids``, replacing any vectors already stored for those ids.

        Vectors are L2-normalised here. If an id repeats within the call, the last
        vector wins.
        """
        id_arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        vecs = self._prepare(vectors)
        if len(id_arr) != len(vecs):
            raise ValueError(f"{len(id_arr)} ids but {len(vecs)} vectors")
        if len(id_arr) == 0:
            return
        # keep the last occurrence of each id
        _, last_from_end = np.unique(id_arr[::-1], return_index=True)
        keep = np.sort(len(id_arr) - 1 - last_from_end)
        id_arr, vecs = id_arr[keep], vecs[keep]
        with self._lock:
            present = [i for i in id_arr.tolist() if i in self._id_set]
            if present:  # O(len(index)) in FAISS: only pay it for real replacements
                self._index.remove_ids(faiss.IDSelectorBatch(np.asarray(present, dtype=np.int64)))
            self._index.add_with_ids(vecs, id_arr)
            self._id_set.update(id_arr.tolist())
            self._dirty = True

    def remove(self, ids: np.ndarray | list[int]) -> int:
        """Remove ``ids`` (unknown ids are ignored); returns how many were removed."""
        id_arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(id_arr) == 0:
            return 0
        with self._lock:
            present = [i for i in id_arr.tolist() if i in self._id_set]
            if not present:
                return 0
            removed = int(self._index.remove_ids(faiss.IDSelectorBatch(np.asarray(present, dtype=np.int64))))
            self._id_set.difference_update(present)
            self._dirty = True
            return removed

    def reconstruct(self, face_id: int) -> np.ndarray:
        """The stored (normalised) vector for ``face_id``; KeyError if absent."""
        with self._lock:
            try:
                return self._index.reconstruct(int(face_id))
            except RuntimeError as exc:
                raise KeyError(face_id) from exc

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most similar stored faces for each query (cosine similarity, best first).

        A 1-D query returns 1-D ``(scores, ids)``; a 2-D (n, dim) batch returns (n, k')
        arrays. ``k' = min(k, len(self))``, so exact search fills every slot and no -1 id
        is returned (a 1-D result also drops any -1 defensively). Scores are float32 in
        [-1, 1]; ids are int64 face ids.
        """
        single = np.ndim(vectors) == 1
        queries = self._prepare(vectors)
        with self._lock:
            k_eff = min(int(k), int(self._index.ntotal))
            if k_eff <= 0:
                scores = np.zeros((len(queries), 0), dtype=np.float32)
                ids = np.zeros((len(queries), 0), dtype=np.int64)
            else:
                scores, ids = self._index.search(queries, k_eff)
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
            _atomic_write(index_path, lambda p: faiss.write_index(self._index, str(p)))
            manifest = {
                "format": MANIFEST_FORMAT,
                "model_version": self.model_version,
                "dim": self.dim,
                "count": int(len(ids)),
                "ids_checksum": ids_checksum(ids),
                "index_file": index_path.name,
                "index_sha256": _file_sha256(index_path),
                "created": datetime.now(UTC).isoformat(),
            }
            _atomic_write(manifest_path, lambda p: p.write_text(json.dumps(manifest, indent=2)))
            self.directory = target
            self._dirty = False
        return index_path

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
        """Load a saved index, checking manifest and file checksum; ValueError if anything is off."""
        index_path, _ = cls.paths(directory, model_version)
        manifest = cls.read_manifest(directory, model_version)
        if manifest is None:
            raise ValueError("manifest missing or unreadable")
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
        index._id_set = set(ids.tolist())
        if len(ids) != manifest.get("count") or ids_checksum(ids) != manifest.get("ids_checksum"):
            raise ValueError("index contents do not match the manifest")
        return index

    @classmethod
    def build(cls, model_version: str, dim: int, ids: np.ndarray, vectors: np.ndarray,
              directory: str | os.PathLike[str] | None = None) -> FaceIndex:
        """A new index holding ``vectors`` under ``ids``."""
        index = cls(model_version, dim, directory)
        id_arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        vecs = np.asarray(vectors, dtype=np.float32).reshape(-1, dim)
        if len(id_arr) != len(vecs):
            raise ValueError(f"{len(id_arr)} ids but {len(vecs)} vectors")
        for start in range(0, len(vecs), 100_000):  # bounded temp memory for normalising
            index.add(id_arr[start : start + 100_000], vecs[start : start + 100_000])
        return index

    @classmethod
    def load_or_rebuild(
        cls,
        directory: str | os.PathLike[str],
        model_version: str,
        dim: int,
        fetch_all: FetchAll,
        *,
        expected_count: int | None = None,
        expected_checksum: str | None = None,
    ) -> FaceIndex:
        """Load the saved index if it matches the database, else rebuild from ``fetch_all``.

        ``expected_count`` / ``expected_checksum`` describe the database's current id set
        for this model version (``ids_checksum(ids)``); pass at least one. ``fetch_all``
        returns ``(ids, vectors)`` from the database and is called only on rebuild. The
        rebuilt index is saved before it is returned.
        """
        if expected_count is None and expected_checksum is None:
            raise ValueError("pass expected_count and/or expected_checksum from the database")
        reason: str
        try:
            index = cls.load(directory, model_version, dim)
        except ValueError as exc:
            reason = str(exc)
        else:
            manifest = cls.read_manifest(directory, model_version) or {}
            if expected_count is not None and manifest.get("count") != expected_count:
                reason = f"database has {expected_count} vectors, index {manifest.get('count')}"
            elif expected_checksum is not None and manifest.get("ids_checksum") != expected_checksum:
                reason = "the database's face ids differ from the index's"
            else:
                return index
        log.info("rebuilding face index %s from the database: %s", model_version, reason)
        ids, vectors = fetch_all()
        index = cls.build(model_version, dim, ids, vectors, directory)
        index.save()
        return index
