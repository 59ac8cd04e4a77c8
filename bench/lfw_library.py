"""LFW as a FaceLab library: every photo ingested through the app's own pipeline
(detector, landmarks, embedder, database, index), kept in a data folder between runs.

Shared by ``bench/identification.py``, ``bench/fit_open_set.py`` and ``bench/clustering.py``.
Only reading helpers live here; the protocols (who is enrolled, who is a stranger) are in
each script.
"""

from __future__ import annotations

import shutil
import sqlite3
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sqlalchemy import select  # noqa: E402

from pipeline.context import Lab  # noqa: E402
from pipeline.library.identify import face_quality, passes_gate, primary_face  # noqa: E402
from pipeline.library.ingest import Upload, ingest  # noqa: E402
from storage.orm import Embedding, Face, Image  # noqa: E402

LFW = ROOT.parent / "shared" / "data" / "lfw"
DEFAULT_WORK = Path.home() / "facelab-runs" / "ident-lfw" / "lab"


def identities(lfw: Path, split: str) -> list[str]:
    """People of ``train_identities.txt`` or ``test_identities.txt`` (see shared/data/README.md)."""
    return [n for n in (lfw / f"{split}_identities.txt").read_text().split() if n]


def photos_of(lfw: Path, people: list[str]) -> dict[str, list[Path]]:
    root = lfw / "lfw-deepfunneled"
    return {p: sorted((root / p).glob("*.jpg")) for p in people}


def ensure_ingested(lab: Lab, files: list[Path], chunk: int = 64, log=print) -> None:  # noqa: ANN001
    """Ingest the photos the library does not hold yet (by file name; LFW names are unique)."""
    with lab.sessions() as session:
        have = set(session.scalars(select(Image.original_name)).all())
    missing = [f for f in files if f.name not in have and f"{f.parent.name}/{f.name}" not in have]
    for start in range(0, len(missing), chunk):
        ingest(lab, [Upload(f.name, path=f) for f in missing[start:start + chunk]])
        log(f"ingested {min(start + chunk, len(missing))} of {len(missing)} missing photo(s)")


@dataclass(frozen=True)
class PhotoFaces:
    """A stored photo's faces: ids, boxes, detector scores, vectors, quality."""

    image_id: int
    width: int
    height: int
    face_ids: list[int]
    boxes: list[tuple[float, float, float, float]]
    scores: list[float]
    vectors: np.ndarray
    quality: list[float | None]
    searchable: list[bool]

    def primary(self) -> int | None:
        """The app's primary face (``pipeline.library.identify.primary_face``)."""
        return primary_face(self.boxes, self.width, self.height, self.searchable)

    def most_confident(self) -> int | None:
        """What enrolling ``faces[0]`` of an ingest report did before: the detector's
        most confident box."""
        return int(np.argmax(self.scores)) if self.scores else None


def photo_faces(lab: Lab) -> dict[str, PhotoFaces]:
    """Every stored photo by file name, with its faces (one pass over the database)."""
    version = lab.model_version
    by_photo: dict[int, list] = defaultdict(list)
    with lab.sessions() as session:
        images = {i.id: (i.original_name.split("/")[-1], i.width, i.height)
                  for i in session.scalars(select(Image)).all()}
        for face_id, image_id, x1, y1, x2, y2, score, vector in session.execute(
            select(Face.id, Face.image_id, Face.x1, Face.y1, Face.x2, Face.y2, Face.score, Embedding.vector)
            .join(Embedding, (Embedding.face_id == Face.id) & (Embedding.model_version == version))
            .order_by(Face.id)
        ).all():
            by_photo[image_id].append((face_id, (x1, y1, x2, y2), score, np.frombuffer(vector, "<f4")))
    out = {}
    for image_id, (name, width, height) in images.items():
        faces = by_photo.get(image_id, [])
        vectors = np.stack([f[3] for f in faces]) if faces else np.zeros((0, lab.embedder.dim), np.float32)
        q = face_quality(lab, vectors, [f[1] for f in faces]) if faces else None
        quality = [float(v) for v in q] if q is not None else [None] * len(faces)
        out[name] = PhotoFaces(image_id, width, height, [f[0] for f in faces], [f[1] for f in faces],
                               [f[2] for f in faces], vectors, quality, [passes_gate(lab, v) for v in quality])
    return out


def copy_library(source: Path, dest: Path) -> Path:
    """A throwaway copy of a SQLite data folder (database + index), for one protocol run."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    # SQLite's backup API: a consistent copy even while another process writes (WAL)
    with sqlite3.connect(source / "facelab.sqlite3") as src, sqlite3.connect(dest / "facelab.sqlite3") as dst:
        src.backup(dst)
    if (source / "index").is_dir():
        shutil.copytree(source / "index", dest / "index")
    (dest / "images").symlink_to((source / "images").resolve(), target_is_directory=True)
    return dest
