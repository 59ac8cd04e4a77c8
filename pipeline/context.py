"""``Lab``: the resources every pipeline operation works on, opened once per process.

It owns the database engine, the image store, the detector/landmarker/embedder (each
loaded once, on first use) and the FAISS index of the active embedder. Operations in
``pipeline.*`` are plain functions taking a ``Lab``, so the UI, the CLI and tests call
the same code.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType

import numpy as np
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from models.detectors.base import FaceDetector
from models.detectors.factory import create_detector
from models.embedders.base import FaceEmbedder
from models.embedders.factory import create_embedder
from models.landmarks import LandmarkDetector
from pipeline.settings import Settings
from storage.db import make_engine, migrate, session_factory
from storage.embedding_rows import embedding_face_ids, fetch_embeddings
from storage.faiss_index import FaceIndex, ids_checksum
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

    @classmethod
    def open(cls, settings: Settings | None = None) -> "Lab":
        settings = settings or Settings()
        settings.data_dir.mkdir(parents=True, exist_ok=True)
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
        )

    # -- context manager -------------------------------------------------------------
    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
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

    # -- index -----------------------------------------------------------------------
    def index(self) -> FaceIndex:
        """The FAISS index of the active embedder, rebuilt from the database if needed."""
        with self._index_lock:
            if self._index is None or self._index.model_version != self.model_version:
                self._index = self._load_index()
            return self._index

    def rebuild_index(self) -> FaceIndex:
        """Throw the index away and build it again from the database."""
        with self._index_lock:
            index_file, manifest = FaceIndex.paths(self.settings.index_dir, self.model_version)
            manifest.unlink(missing_ok=True)
            index_file.unlink(missing_ok=True)
            self._index = self._load_index()
            return self._index

    def _load_index(self) -> FaceIndex:
        version, dim = self.model_version, self.embedder.dim
        with self.sessions() as session:
            ids = embedding_face_ids(session, version)

        def fetch_all() -> tuple[np.ndarray, np.ndarray]:
            with self.sessions() as session:
                return fetch_embeddings(session, version, dim)

        return FaceIndex.load_or_rebuild(
            self.settings.index_dir, version, dim, fetch_all,
            expected_count=len(ids), expected_checksum=ids_checksum(ids),
        )


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
