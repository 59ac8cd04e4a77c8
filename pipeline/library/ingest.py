"""Ingest: files in -> images stored, faces detected, embedded, saved and indexed.

One bad file yields a per-file error and never aborts the batch. Per batch of
``Settings.batch_size`` photos: the models run over the whole batch (``analyse_photos``:
every face of the batch through the embedder together) without holding the write lock;
then the files are written, every row of the batch goes into the database in one
transaction, and the index takes the new vectors (one append to its delta file); then
one search suggests people for every new face. Every batch is committed before the next
starts, so a crash loses at most the batch in flight (the index catches up with the
database on the next start if it missed anything).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models.types import FaceBox
from pipeline.context import Lab
from pipeline.faults import fault_point
from pipeline.library.attributes import analyze, attribute_version, shared_trunk_cut
from pipeline.library.attributes import rows_for as attribute_rows
from pipeline.library.identify import face_quality, passes_gate, stored_face_quality
from pipeline.library.suggest import suggest_people
from pipeline.results import FaceInfo, FileResult, IngestReport
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
            data = read_regular_file(self.path, max_bytes)
        if len(data) > max_bytes:
            raise ImageRejected(f"file is {len(data) / 1e6:.1f} MB; the limit is {max_bytes / 1e6:.0f} MB")
        return data


def read_regular_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of ``path`` if it is a plain file, refusing anything else unread.

    Like ``import`` (pipeline.datasets.archive): a symbolic link is refused, not followed (it could
    point anywhere, /etc/passwd included), and so are pipes, sockets and devices (reading
    a FIFO would wait forever). Opened with O_NOFOLLOW | O_NONBLOCK and checked with
    fstat on the open file, so swapping the file for a link or a pipe after a check
    cannot slip through.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP or os.path.islink(path):
            raise ImageRejected("is a symbolic link, not read (copy the real file instead)") from exc
        raise
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            kind = "a folder" if stat.S_ISDIR(info.st_mode) else "a pipe, socket or device, not a file"
            raise ImageRejected(f"is {kind}; not read")
        if info.st_size > max_bytes:
            raise ImageRejected(f"file is {info.st_size / 1e6:.1f} MB; the limit is {max_bytes / 1e6:.0f} MB")
        return fh.read(max_bytes + 1)


def uploads_from_paths(paths: Iterable[Path | str]) -> list[Upload]:
    """Expand folders (recursively, image suffixes only, sorted) and keep files as given.

    Links are not followed: a linked file (or folder) inside a folder, like one given
    directly, becomes an upload that ``read`` refuses with a reason; nothing behind it
    is read. Pipes, sockets and devices with an image suffix are refused the same way.
    """
    uploads: list[Upload] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir() and not path.is_symlink():
            found: list[Path] = []
            for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
                base = Path(dirpath)
                linked = [d for d in dirnames if (base / d).is_symlink()]  # os.walk lists them, never enters
                found += [base / name for name in filenames if Path(name).suffix.lower() in IMAGE_SUFFIXES]
                found += [base / name for name in linked]
            uploads += [Upload(name=str(child.relative_to(path)), path=child) for child in sorted(found)]
            continue
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
                quality = stored_face_quality(lab, [f.id for f in existing.faces])
                out[i] = FileResult(
                    name=image.name, image_id=existing.id, sha256=existing.sha256, duplicate=True,
                    faces=[_face_info(f, *quality.get(f.id, (None, True))) for f in existing.faces],
                    note="already in the library",
                )
            else:
                fresh.append((i, image))

    if fresh:
        photos = analyse_photos(lab, [img for _, img in fresh])  # the models, outside the write lock
        with lab.write_lock:
            stored = _store(lab, photos)
        for (i, _), result in zip(fresh, _results(lab, stored), strict=True):
            out[i] = result
    return [r for r in out if r is not None]


@dataclass
class AnalysedPhoto:
    """One photo after the models ran, before anything is stored."""

    image: DecodedImage
    #: detected boxes, with landmarks
    boxes: list[FaceBox]
    #: (len(boxes), dim) unit vectors of the active embedder
    vectors: np.ndarray
    #: per box: the probability that it is a face (None: no quality model)
    quality: list[float | None]
    #: per box: emotion, age, gender (None: no attribute models, or they failed on this photo)
    attributes: list | None = None


def analyse_photos(lab: Lab, images: Sequence[DecodedImage]) -> list[AnalysedPhoto]:
    """The model steps of ingest for a batch of photos, one stage at a time over the whole
    batch: detect, landmarks, embed (every face and mirrored face of the batch through the
    network together), face quality. Per-face steps that need the pixels go here too.
    Nothing is stored and no lock is held, so other requests run meanwhile."""
    rgbs = [img.rgb for img in images]
    all_boxes = lab.detector.detect_batch(rgbs)
    with_landmarks = [lab.landmarker.predict(rgb, boxes) if boxes else [] for rgb, boxes in zip(rgbs, all_boxes)]
    items = list(zip(rgbs, with_landmarks, strict=True))
    cut = shared_trunk_cut(lab)
    if cut is None:
        vectors, trunks = lab.embedder.embed_many(items), [None] * len(items)
    else:  # the age/gender model continues from the embedding pass's activations
        vectors, trunks = lab.embedder.embed_many_keeping(items, cut)
    photos = []
    for image, boxes, vecs, trunk in zip(images, with_landmarks, vectors, trunks, strict=True):
        # quality of each box (may it be a non-face?): decided before anything is stored
        q = face_quality(lab, vecs, [b.as_tuple() for b in boxes]) if boxes else None
        photos.append(AnalysedPhoto(image, list(boxes), np.asarray(vecs, dtype=np.float32),
                                    [float(v) for v in q] if q is not None else [None] * len(boxes),
                                    analyze(lab, image.rgb, boxes, trunk)))
    return photos


#: per photo: (image, image id, faces, their vectors; None when the photo was there already)
Stored = tuple[DecodedImage, int, list[FaceInfo], np.ndarray | None]


def _store(lab: Lab, photos: Sequence[AnalysedPhoto]) -> list[Stored]:
    """Files, then every photo's rows in one transaction, then the index. Caller holds
    ``lab.write_lock`` (keeps this process's database writes and index in step)."""
    for photo in photos:
        lab.images.put(photo.image)  # atomic, content-addressed; before the row that points to it
        fault_point("ingest_after_file")
    try:
        with lab.session() as session:
            stored = _store_rows(lab, session, photos)
    except IntegrityError:
        # another process stored one of these photos between our check and our commit:
        # one transaction per photo, so the others still go in (and that one is found)
        log.info("ingest: a photo of the batch was stored meanwhile; storing the batch photo by photo")
        stored = []
        for photo in photos:
            with lab.session() as session:
                stored += _store_rows(lab, session, [photo])
    fault_point("ingest_after_commit")
    new = [(infos, vecs, rows) for _, _, infos, vecs, rows in stored if rows]
    if new:
        with lab.index_for_update() as index:
            index.add(np.array([f.face_id for infos, _, _ in new for f in infos], dtype=np.int64),
                      np.concatenate([vecs for _, vecs, _ in new]),
                      np.array([e.id for _, _, rows in new for e in rows], dtype=np.int64), keep_newer=True)
            index.save()
    return [(image, image_id, infos, vecs) for image, image_id, infos, vecs, _ in stored]


def _store_rows(lab: Lab, session: Session, photos: Sequence[AnalysedPhoto]
                ) -> list[tuple[DecodedImage, int, list[FaceInfo], np.ndarray | None, list[Embedding]]]:
    """The photos' image, face and embedding rows (two flushes for the whole batch)."""
    origin, version = lab.detector.version, lab.model_version
    # Another request may have stored the same image since we checked.
    known = {row.sha256: row for row in session.scalars(
        select(Image).where(Image.sha256.in_({p.image.sha256 for p in photos}))).all()}
    rows: list[tuple[AnalysedPhoto, Image, list[Face] | None]] = []
    for photo in photos:
        image = photo.image
        row = known.get(image.sha256)
        if row is not None:  # stored before, or earlier in this batch
            rows.append((photo, row, None))
            continue
        row = known[image.sha256] = Image(
            sha256=image.sha256, original_name=image.name, width=image.width, height=image.height,
            size_bytes=image.size_bytes, mime=image.mime, upload_sha256=image.upload_sha256,
        )
        session.add(row)
        faces = [_new_face(box, origin) for box in photo.boxes]
        row.faces.extend(faces)
        rows.append((photo, row, faces))
    session.flush()  # image and face ids
    embeddings = {id(photo): [Embedding.from_array(face.id, version, vec)
                              for face, vec in zip(faces, photo.vectors, strict=True)]
                  for photo, _, faces in rows if faces is not None}
    session.add_all([e for batch in embeddings.values() for e in batch])
    attr_version = attribute_version(lab)
    if attr_version is not None:
        session.add_all([row for photo, _, faces in rows if faces and photo.attributes is not None
                         for row in attribute_rows([f.id for f in faces], photo.attributes, attr_version)])
    session.flush()  # embedding row ids, for the index
    out = []
    for photo, row, faces in rows:
        if faces is None:
            quality = stored_face_quality(lab, [f.id for f in row.faces])
            out.append((photo.image, row.id, [_face_info(f, *quality.get(f.id, (None, True))) for f in row.faces],
                        None, []))
        else:
            infos = [_face_info(f, q, passes_gate(lab, q)) for f, q in zip(faces, photo.quality, strict=True)]
            out.append((photo.image, row.id, infos, photo.vectors, embeddings[id(photo)]))
    return out


def _results(lab: Lab, stored: Sequence[Stored]) -> list[FileResult]:
    """One FileResult per stored photo; suggestions for every new face in one search."""
    new_infos = [info for _, _, infos, vecs in stored if vecs is not None for info in infos]
    if new_infos:
        suggested = iter(suggest_people(lab, new_infos, np.concatenate(
            [vecs for *_, vecs in stored if vecs is not None and len(vecs)])))
    results = []
    for image, image_id, infos, vecs in stored:
        faces = [next(suggested) for _ in infos] if vecs is not None else infos
        results.append(FileResult(name=image.name, image_id=image_id, sha256=image.sha256, faces=faces,
                                  note="; ".join(image.notes) or None))
    return results


def _new_face(box: FaceBox, origin: str) -> Face:
    return Face(
        x1=float(box.x1), y1=float(box.y1), x2=float(box.x2), y2=float(box.y2), score=float(box.score),
        landmarks=Face.landmarks_to_json(box.landmarks), origin=origin,
    )


def _face_info(face: Face, quality: float | None = None, searchable: bool = True) -> FaceInfo:
    return FaceInfo(
        face_id=face.id, image_id=face.image_id, box=face.box, score=face.score, origin=face.origin,
        identity_id=face.identity_id, identity=face.identity.name if face.identity_id is not None else None,
        quality=quality, searchable=searchable,
    )
