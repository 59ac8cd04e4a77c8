"""Ingest: files in -> images stored, faces detected, embedded, saved and indexed.

One bad file yields a per-file error and never aborts the batch; every batch is
committed before the next starts, so a crash loses at most the batch in flight (the
FAISS index is rebuilt from the database on the next start if it missed anything).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import or_, select

from models.types import FaceBox
from pipeline.attributes import analyze, attribute_version
from pipeline.attributes import rows_for as attribute_rows
from pipeline.context import Lab
from pipeline.faults import fault_point
from pipeline.results import FaceInfo, FileResult, IngestReport
from pipeline.suggest import suggest_people
from storage.images import DecodedImage, ImageRejected, decode_upload, sanitize_name
from storage.orm import Embedding, Face, Image

log = logging.getLogger(__name__)

#: progress(fraction 0..1, text)
Progress = Callable[[float, str], None]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm"}


@dataclass(frozen=True)
class Upload:
    """One file to ingest: its name as the user knows it and where its bytes are."""

    name: str
    path: Path | None = None
    data: bytes | None = None

    def read(self, max_bytes: int) -> bytes:
        if self.data is not None:
            data = self.data
        else:
            assert self.path is not None
            size = self.path.stat().st_size
            if size > max_bytes:
                raise ImageRejected(f"file is {size / 1e6:.1f} MB; the limit is {max_bytes / 1e6:.0f} MB")
            data = self.path.read_bytes()
        if len(data) > max_bytes:
            raise ImageRejected(f"file is {len(data) / 1e6:.1f} MB; the limit is {max_bytes / 1e6:.0f} MB")
        return data


def uploads_from_paths(paths: Iterable[Path | str]) -> list[Upload]:
    """Expand folders (recursively, image suffixes only, sorted) and keep files as given."""
    uploads: list[Upload] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.is_file()):
                if child.suffix.lower() in IMAGE_SUFFIXES:
                    uploads.append(Upload(name=str(child.relative_to(path)), path=child))
        else:
            uploads.append(Upload(name=path.name, path=path))
    return uploads


def ingest(lab: Lab, uploads: Sequence[Upload], progress: Progress | None = None) -> IngestReport:
    """Store, detect, embed and index every upload; returns one FileResult per upload."""
    if len(uploads) > lab.settings.max_files_per_batch:
        from pipeline.errors import InvalidRequest

        raise InvalidRequest(
            f"{len(uploads)} files in one go; the limit is {lab.settings.max_files_per_batch}. "
            "Use `python app.py ingest FOLDER` for large imports."
        )
    results: list[FileResult] = []
    batch_size = max(1, lab.settings.batch_size)
    total = len(uploads)
    for start in range(0, total, batch_size):
        batch = uploads[start : start + batch_size]
        if progress:
            progress(start / max(total, 1), f"Processing {start + 1}-{start + len(batch)} of {total}")
        results.extend(_ingest_batch(lab, batch))
    if progress:
        progress(1.0, f"Done: {total} file(s)")
    return IngestReport(results)


def _ingest_batch(lab: Lab, batch: Sequence[Upload]) -> list[FileResult]:
    decoded: list[tuple[int, DecodedImage]] = []
    out: list[FileResult | None] = [None] * len(batch)
    for i, upload in enumerate(batch):
        display = sanitize_name(upload.name)
        try:
            decoded.append((i, decode_upload(upload.read(lab.settings.max_upload_bytes), upload.name,
                                             max_pixels=lab.settings.max_pixels,
                                             max_bytes=lab.settings.max_upload_bytes)))
        except ImageRejected as exc:
            out[i] = FileResult(name=display, error=str(exc))
        except OSError as exc:  # unreadable path
            out[i] = FileResult(name=display, error=f"could not read the file: {exc.strerror or exc}")

    # Duplicates are answered from the database: same content, same faces.
    fresh: list[tuple[int, DecodedImage]] = []
    with lab.sessions() as session:
        for i, image in decoded:
            existing = session.scalars(
                select(Image).where(or_(Image.sha256 == image.sha256, Image.upload_sha256 == image.upload_sha256))
            ).first()
            if existing is not None:
                out[i] = FileResult(
                    name=image.name, image_id=existing.id, sha256=existing.sha256, duplicate=True,
                    faces=[_face_info(f) for f in existing.faces], note="already in the library",
                )
            else:
                fresh.append((i, image))

    if fresh:
        with lab.write_lock:
            for (i, image), result in zip(fresh, _detect_embed_store(lab, [img for _, img in fresh]), strict=True):
                out[i] = result
    return [r for r in out if r is not None]


def _detect_embed_store(lab: Lab, images: Sequence[DecodedImage]) -> list[FileResult]:
    all_boxes = lab.detector.detect_batch([img.rgb for img in images])
    with_landmarks = [lab.landmarker.predict(img.rgb, boxes) if boxes else [] for img, boxes in zip(images, all_boxes)]
    vectors = [lab.embedder.embed(img.rgb, boxes) for img, boxes in zip(images, with_landmarks)]
    attributes = [analyze(lab, img.rgb, boxes) for img, boxes in zip(images, with_landmarks)]
    attr_version = attribute_version(lab)
    version = lab.model_version
    origin = lab.detector.version

    stored: list[tuple[DecodedImage, int, list[FaceInfo], np.ndarray | None]] = []
    new_ids: list[np.ndarray] = []
    new_vectors: list[np.ndarray] = []
    new_rows: list[list[Embedding]] = []
    for image, boxes, vecs, attrs in zip(images, with_landmarks, vectors, attributes, strict=True):
        lab.images.put(image)  # atomic, content-addressed; before the row that points to it
        fault_point("ingest_after_file")
        with lab.session() as session:
            # Another request may have stored the same image since we checked.
            row = session.scalars(select(Image).where(Image.sha256 == image.sha256)).one_or_none()
            if row is not None:
                stored.append((image, row.id, [_face_info(f) for f in row.faces], None))
                continue
            row = Image(
                sha256=image.sha256, original_name=image.name, width=image.width, height=image.height,
                size_bytes=image.size_bytes, mime=image.mime, upload_sha256=image.upload_sha256,
            )
            session.add(row)
            faces = [_new_face(box, origin) for box in boxes]
            row.faces.extend(faces)
            session.flush()
            embeddings = [Embedding.from_array(face.id, version, vec) for face, vec in zip(faces, vecs, strict=True)]
            session.add_all(embeddings)
            if attrs is not None and attr_version is not None:
                session.add_all(attribute_rows([f.id for f in faces], attrs, attr_version))
            stored.append((image, row.id, [_face_info(f) for f in faces], np.asarray(vecs, dtype=np.float32)))
            if faces:
                new_ids.append(np.array([f.id for f in faces], dtype=np.int64))
                new_vectors.append(np.asarray(vecs, dtype=np.float32))
                new_rows.append(embeddings)  # ids are set by the flush at commit

    fault_point("ingest_after_commit")
    if new_ids:
        row_ids = np.array([e.id for batch in new_rows for e in batch], dtype=np.int64)
        with lab.index_for_update() as index:
            index.add(np.concatenate(new_ids), np.concatenate(new_vectors), row_ids, keep_newer=True)
            index.save()

    results = []
    for image, image_id, infos, vecs in stored:
        results.append(FileResult(
            name=image.name, image_id=image_id, sha256=image.sha256,
            faces=suggest_people(lab, infos, vecs) if vecs is not None else infos, note="; ".join(image.notes) or None,
        ))
    return results


def _new_face(box: FaceBox, origin: str) -> Face:
    return Face(
        x1=float(box.x1), y1=float(box.y1), x2=float(box.x2), y2=float(box.y2), score=float(box.score),
        landmarks=Face.landmarks_to_json(box.landmarks), origin=origin,
    )


def _face_info(face: Face) -> FaceInfo:
    return FaceInfo(
        face_id=face.id, image_id=face.image_id, box=face.box, score=face.score, origin=face.origin,
        identity_id=face.identity_id, identity=face.identity.name if face.identity_id is not None else None,
    )
