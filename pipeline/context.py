"""``Lab``: the resources every pipeline operation works on, opened once per process.

It owns the database engine, the image store, the detector/landmarker/embedder (each
loaded once, on first use) and the FAISS index of the active embedder. Operations in
``pipeline.*`` are plain functions taking a ``Lab``, so the UI, the CLI and tests call
the same code.

The in-memory index follows the database, including writes by other processes (``python
app.py ingest`` while the app runs, a second app on the same data folder):

* ``Lab.index()`` (every search) first compares the database's embedding stamp
  ``(count, max row id, sum of row ids)`` with the index's own (one primary-key read of
  the trigger-kept ``embedding_stamps`` table: the same cost at any library size). On a difference it syncs: reads the rows above the index's newest row
  id (new and re-embedded faces) by id range, and only if that does not explain the
  difference (deletions) diffs all ``(face id, embedding row id)`` pairs; vectors are
  read only for new or re-embedded faces. Then it saves the index (appending just those
  changes to its delta file, see ``storage.faiss_index``).
* Writers in this process apply their own change right after their commit, inside
  ``Lab.index_for_update()``, so the next stamp check finds nothing to do.

Why the two cannot lose or double-apply a change: both run under ``_index_lock``, and a
writer applies only after its commit, so a sync sees either the index without the
writer's change and the database with it (it applies the change; the writer's later
``add(..., keep_newer=True)`` then skips rows the index already holds, or that a newer
row replaced) or the index with it. Any vector a sync finds that the database no longer
has was therefore deleted, and it goes. If a writer re-adds a face that another process
deleted in between, index and database stamps differ and the next ``index()`` syncs it
away before anything searches.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType

import numpy as np
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from models.attributes.analyzer import FaceAttributeModel
from models.detectors.base import FaceDetector
from models.detectors.factory import create_detector
from models.embedders.base import FaceEmbedder
from models.embedders.factory import create_embedder
from models.face_quality import FaceQualityModel, load_quality_model
from models.landmarks import LandmarkDetector
from models.open_set import OpenSetCalibration, load_calibration
from pipeline.settings import Settings
from storage.db import make_engine, migrate, session_factory
from storage.embedding_rows import embedding_rows, embedding_stamp, fetch_embedding_rows
from storage.faiss_index import FaceIndex
from storage.images import ImageStore

log = logging.getLogger(__name__)


@dataclass
class Lab:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    images: ImageStore
    detector: FaceDetector
    landmarker: LandmarkDetector
    embedder: FaceEmbedder
    _index: FaceIndex | None = field(default=None, repr=False)
    _index_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    #: one writer at a time for ingest/enroll/delete: keeps DB and index in step
    write_lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    #: per embedder version: its face-quality model and 1:N calibration (None: none fitted)
    _quality_models: dict[str, FaceQualityModel | None] = field(default_factory=dict, repr=False)
    _calibrations: dict[str, OpenSetCalibration | None] = field(default_factory=dict, repr=False)
    #: (key, pipeline.library.suggest.Gallery) of the last search: see enrolled_gallery
    _gallery_cache: tuple | None = field(default=None, repr=False)
    #: per embedder version, with Settings.vector_backend "pgvector"
    _pg_indexes: dict = field(default_factory=dict, repr=False)
    #: emotion/age/gender (pipeline.library.attributes); None when switched off in the settings
    attributes: FaceAttributeModel | None = None

    @classmethod
    def open(cls, settings: Settings | None = None) -> "Lab":
        settings = settings or Settings()
        restrict_data_dir(settings)
        set_compute_threads(settings.torch_threads)
        engine = make_engine(settings.resolved_database_url)
        migrate(engine)
        landmarker = LandmarkDetector()
        return cls(
            settings=settings,
            engine=engine,
            sessions=session_factory(engine),
            images=ImageStore(settings.images_dir),
            detector=create_detector(settings.detector),
            landmarker=landmarker,
            embedder=create_embedder(settings.embedder, landmark_detector=landmarker),
            attributes=(FaceAttributeModel(emotion_path=settings.emotion_weights, landmark_detector=landmarker)
                        if settings.attributes else None),
        )

    # -- context manager -------------------------------------------------------------
    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        for index in self._pg_indexes.values():
            index.close()
        self.engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session inside one transaction: committed on success, rolled back on error."""
        with self.sessions() as session, session.begin():
            yield session

    # -- models ----------------------------------------------------------------------
    @property
    def model_version(self) -> str:
        """The embedder version whose vectors the index holds."""
        self.embedder.load()
        return self.embedder.version

    @property
    def match_threshold(self) -> float:
        if self.settings.match_threshold is not None:
            return self.settings.match_threshold
        if self.embedder.match_threshold is None:
            raise RuntimeError(
                f"embedder {self.embedder.name!r} has no calibrated match threshold; "
                "pass one with FACELAB_MATCH_THRESHOLD or Settings(match_threshold=...)"
            )
        return float(self.embedder.match_threshold)

    def quality_model(self) -> FaceQualityModel | None:
        """The face-quality gate fitted for the active embedder version (None: none was
        fitted for it, or the gate is switched off in the settings)."""
        if not self.settings.face_quality_gate:
            return None
        version = self.model_version
        if version not in self._quality_models:
            self._quality_models[version] = load_quality_model(self.embedder.name, version)
        return self._quality_models[version]

    def open_set_calibration(self) -> OpenSetCalibration | None:
        """The 1:N threshold calibration fitted for the active embedder version, or None."""
        version = self.model_version
        if version not in self._calibrations:
            self._calibrations[version] = load_calibration(self.embedder.name, version)
        return self._calibrations[version]

    # -- index -----------------------------------------------------------------------
    def index(self, sync: bool = True) -> FaceIndex:
        """The FAISS index of the active embedder, loaded (or rebuilt) from the database if needed.

        ``sync`` (default): first bring it up to date with writes made since, by any
        process (module docstring). ``sync=False`` skips the check, e.g. for a caller that
        reads the index many times within one operation.

        With ``Settings.vector_backend == "pgvector"`` it is a ``PgVectorIndex`` instead:
        the index lives in PostgreSQL, always current, so there is nothing to sync.
        """
        if self.settings.vector_backend == "pgvector":
            return self._pgvector_index(self.model_version, self.embedder.dim)
        index = self._index
        if index is None or index.model_version != self.model_version:
            with self._index_lock:
                if self._index is None or self._index.model_version != self.model_version:
                    self._index = self._load_index()
                return self._index
        # the no-change check runs without the lock, so concurrent searches do not queue
        # behind each other's query; only a sync takes it (and checks again under it)
        if sync and self._database_stamp(index.model_version) != index.stamp():
            with self._index_lock:
                if self._index is index:
                    self._sync_index(index)
                return self._index
        return index

    def _database_stamp(self, version: str) -> tuple[int, int, int]:
        with self.sessions() as session:
            return embedding_stamp(session, version)

    def _pgvector_index(self, version: str, dim: int) -> FaceIndex:
        index = self._pg_indexes.get(version)
        if index is None:
            from storage.pgvector_index import PgVectorIndex

            with self._index_lock:
                index = self._pg_indexes.get(version)
                if index is None:
                    index = self._pg_indexes[version] = PgVectorIndex(self.engine, version, dim).ensure()
        return index  # type: ignore[return-value]  # the same interface

    def rebuild_index(self) -> FaceIndex:
        """Throw the index away and build it again from the database."""
        if self.settings.vector_backend == "pgvector":
            index = self._pgvector_index(self.model_version, self.embedder.dim)
            index.drop()  # type: ignore[attr-defined]
            return index.ensure()  # type: ignore[attr-defined]
        with self._index_lock:
            for path in FaceIndex.all_paths(self.settings.index_dir, self.model_version):
                path.unlink(missing_ok=True)
            self._index = self._load_index()
            return self._index

    def _load_index(self) -> FaceIndex:
        return self.load_index(self.model_version, self.embedder.dim)

    def load_index(self, version: str, dim: int) -> FaceIndex:
        """The saved index of embedder ``version``, or one rebuilt (and saved) from the
        database when the saved one is missing, damaged or behind the database. For the
        active embedder use ``index()``, which also keeps it in memory and in sync."""
        if self.settings.vector_backend == "pgvector":
            return self._pgvector_index(version, dim)
        with self.sessions() as session:
            face_ids, row_ids = embedding_rows(session, version)

        def fetch_all() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            with self.sessions() as session:
                return fetch_embedding_rows(session, version, dim)

        def fetch_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            with self.sessions() as session:
                return fetch_embedding_rows(session, version, dim, rows)

        return FaceIndex.load_or_rebuild(self.settings.index_dir, version, dim, fetch_all,
                                         face_ids=face_ids, row_ids=row_ids, fetch_rows=fetch_rows)

    @contextmanager
    def index_for_update(self) -> Iterator[FaceIndex]:
        """The index, for a writer to apply the change it has just committed (and save).

        Holds ``_index_lock`` so no sync runs meanwhile. Use ``add(..., row_ids,
        keep_newer=True)`` (the database may already hold a newer row for the face, or a
        sync may have applied this very change) and ``remove`` for deleted faces.
        """
        if self.settings.vector_backend == "pgvector":
            yield self.index()  # its add/remove/save are no-ops: the commit did it all
            return
        with self._index_lock:
            if self._index is None or self._index.model_version != self.model_version:
                self._index = self._load_index()  # reads the database after the commit
            yield self._index

    def _sync_index(self, index: FaceIndex) -> bool:
        """Apply the database's changes since the index was last in step; True if any.

        Called with ``_index_lock`` held: one sync at a time, never during a writer's update.
        First the cheap part: rows with ids above the index's newest (added faces, and
        re-embedded ones, whose new row replaces the old vector) are read by id range.
        Only if the stamps still differ (deletions; on PostgreSQL also a row that committed
        after a higher id) are all (face id, row id) pairs diffed.
        """
        version, dim = index.model_version, index.dim
        with self.sessions() as session:
            target = embedding_stamp(session, version)
            if target == index.stamp():
                return False  # another thread synced meanwhile
            newest = index.stamp()[1]
            fetched = self._fetch_rows(session, version, dim, after=newest, up_to=target[1]) if target[1] > newest \
                else None
        added = index.add(*fetched) if fetched is not None else 0
        removed = 0
        if index.stamp() != target:
            with self.sessions() as session:
                db_faces, db_rows = embedding_rows(session, version)
            have_faces, have_rows = index.rows()
            # pairs the index lacks: new faces, or faces re-embedded since (a new row id)
            if len(have_faces):
                at = np.minimum(np.searchsorted(have_faces, db_faces), len(have_faces) - 1)
                held = (have_faces[at] == db_faces) & (have_rows[at] == db_rows)
            else:
                held = np.zeros(len(db_faces), dtype=bool)
            removed = index.remove(np.setdiff1d(have_faces, db_faces, assume_unique=True))
            if not held.all():
                # rows deleted since the pairs were read are not returned: the stamps then
                # still differ and the next call syncs again
                with self.sessions() as session:
                    fetched = self._fetch_rows(session, version, dim, db_rows[~held])
                if fetched is not None:
                    added += index.add(*fetched)
        if removed or added:
            log.info("search index %s synced with the database: %d vector(s) added or replaced, %d removed",
                     version, added, removed)
            index.save()  # appends just these changes to the index's delta file
        return bool(removed or added)

    @staticmethod
    def _fetch_rows(session: Session, version: str, dim: int, row_ids: np.ndarray | None = None,
                    **bounds: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        try:
            return fetch_embedding_rows(session, version, dim, row_ids, **bounds)
        except ValueError as exc:  # a malformed row: serve what we have; `check --repair` fixes it
            log.warning("search index %s not synced with the database: %s", version, exc)
            return None


def restrict_data_dir(settings: Settings) -> None:
    """Create the data folder for this user only (0700), and close an existing one that
    others could read: it holds photos, names and password hashes. With the folder closed
    nobody else can reach the files inside, whatever their own modes; the SQLite files
    are made 0600 as well (copied elsewhere, they keep it)."""
    folder = settings.data_dir
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    for path in (folder, settings.sqlite_path, *(settings.sqlite_path.with_name(settings.sqlite_path.name + s)
                                                  for s in ("-wal", "-shm", "-journal"))):
        try:
            info = path.stat()
        except FileNotFoundError:
            continue
        wanted = 0o700 if path == folder else 0o600
        if info.st_mode & 0o077 and info.st_uid == os.geteuid():
            os.chmod(path, wanted)
            log.warning("%s was open to other users (mode %o); now %o", path, info.st_mode & 0o777, wanted)


def set_compute_threads(threads: int) -> None:
    """Threads for PyTorch and FAISS (OpenMP). One per request keeps concurrent requests
    from fighting over the cores: a single FAISS query at 100k faces took 21 ms with 2
    OpenMP threads and 5 ms with 1 on this 2-core machine."""
    import faiss
    import torch

    if threads > 0:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
