"""Privacy deletes: remove every trace of a person or a photo, and say so in the audit log.

``identities.delete_person(delete_faces=True)`` removes the person's faces, their
embeddings (every model version, by ON DELETE CASCADE) and the active index's entries.
A privacy delete has to go further; these functions do all of it in one go:

* the index files of *other* embedder versions (they hold the same faces' vectors) are
  deleted; they are caches and are rebuilt from the database when that version is used;
* the label history (``label_revisions`` box snapshots, which undo would otherwise bring
  back) and older audit entries lose the deleted faces and every name the person had
  (renames and merges included): boxes are dropped, names become ``"[deleted]"``;
* photos that no longer show anyone (``forget_person(delete_photos=True)``) and photos
  deleted with ``delete_image`` lose their row and their stored file;
* pictures made from every photo the person was on (served face crops, the label
  editor's copies; see ``pipeline.served``), in ``Settings.ui_cache_dir`` and any folder
  registered with ``register_cache_dir``, are deleted, kept photos included (the UI makes
  them again from the photo when they are needed);
* dataset exports not fetched yet and uploaded dataset archives (any of them may show
  the person) are deleted (``purge_transient_files``);
* on SQLite the database file is rewritten (``VACUUM``) and the write-ahead log
  truncated, so deleted rows do not linger in free pages; on PostgreSQL deleted rows
  stay in dead tuples until autovacuum reuses them (``compact=True`` runs
  ``VACUUM FULL`` on the touched tables; it locks them while it runs).

The audit entry of the deletion itself records who, when, which row ids and how many
faces/photos, never a name, file name or picture hash.

Order: the database commit comes first, files after. A crash in between leaves files
no row points to; ``python app.py check --repair`` deletes those and rebuilds the index.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from pipeline.context import Lab
from pipeline.errors import Conflict, InvalidRequest, NotFound
from pipeline.faults import fault_point
from pipeline.library.identities import clean_name
from storage.faiss_index import FaceIndex
from storage.orm import AuditLog, Face, Identity, Image, LabelRevision, record_audit

log = logging.getLogger(__name__)

REDACTED = "[deleted]"

_cache_dirs: list[Path] = []
_cache_lock = threading.Lock()


def register_cache_dir(path: str | os.PathLike[str]) -> None:
    """A folder holding copies of stored images named ``<sha256>.<ext>`` (e.g. what the UI
    serves); privacy deletes remove the deleted photo's copies from it."""
    with _cache_lock:
        folder = Path(path)
        if folder not in _cache_dirs:
            _cache_dirs.append(folder)


@dataclass(frozen=True)
class DeletionReport:
    faces: int
    photos_deleted: int
    #: photos of the person kept because other people are on them too
    photos_kept: int
    history_entries_scrubbed: int
    message: str


# -- public operations ---------------------------------------------------------------------
def delete_image(lab: Lab, image_id: int, user: str = "local", compact: bool | None = None) -> DeletionReport:
    """Delete one photo with its faces, embeddings, index entries, label history, stored
    file and cached copies."""
    image_id = _check_id(image_id)
    with lab.write_lock:
        try:
            with lab.session() as session:
                image = session.get(Image, image_id)
                if image is None:
                    raise NotFound(f"Image {image_id} does not exist (it may have been deleted already).")
                sha, file_name = image.sha256, image.original_name
                face_ids = [f.id for f in image.faces]
                _secure_delete(session)
                scrubbed = _scrub_history(session, set(face_ids), set(), {file_name}, skip_image=image_id)
                session.delete(image)  # faces, embeddings and label history go by ON DELETE CASCADE
                record_audit(session, user, "privacy_delete_image", "image", image_id, {"faces": len(face_ids)})
        except StaleDataError as exc:
            raise Conflict(f"Image {image_id} was changed by someone else just now; try again.") from exc
        fault_point("delete_image_after_commit")
        _after_commit(lab, face_ids, [sha])
    _compact(lab, compact, ("images", "faces", "embeddings", "label_revisions", "audit_log"))
    return DeletionReport(len(face_ids), 1, 0, scrubbed,
                          f"Deleted image {image_id} with {len(face_ids)} face(s), its file and its history.")


def forget_person(lab: Lab, name: str, user: str = "local", delete_photos: bool = False,
                  compact: bool | None = None) -> DeletionReport:
    """Delete a person, all their faces (every embedding version, every index) and every
    name they had from the label history and audit log.

    ``delete_photos`` also deletes the photos that show nobody else once their faces are
    gone (row, stored file, cached copies); photos with other people on them are kept
    and counted in the report.
    """
    with lab.write_lock:
        try:
            with lab.session() as session:
                person = session.scalars(
                    select(Identity).where(func.lower(Identity.name) == clean_name(name).lower())
                ).one_or_none()
                if person is None:
                    raise NotFound(f"No person called {clean_name(name)!r}.")
                pid = person.id
                faces = session.scalars(select(Face).where(Face.identity_id == pid)).all()
                face_ids = {f.id for f in faces}
                image_ids = {f.image_id for f in faces}
                touched = set(session.scalars(select(Image.sha256).where(Image.id.in_(image_ids))).all())
                names = {person.name} | _former_names(session, pid)
                _secure_delete(session)
                scrubbed = _scrub_history(session, face_ids, {pid}, names)
                for face in faces:
                    session.delete(face)
                session.flush()
                doomed: list[tuple[int, str]] = []
                kept = 0
                for image_id in sorted(image_ids):
                    left = session.scalar(select(func.count(Face.id)).where(Face.image_id == image_id))
                    if delete_photos and not left:
                        image = session.get(Image, image_id)
                        doomed.append((image_id, image.sha256))
                        session.delete(image)
                    else:
                        kept += 1
                session.delete(person)
                record_audit(session, user, "privacy_delete_person", "identity", pid,
                             {"faces": len(face_ids), "photos_deleted": len(doomed), "photos_kept": kept,
                              "image_ids_deleted": [i for i, _ in doomed]})
        except StaleDataError as exc:
            raise Conflict("Someone else changed one of this person's faces just now; try again.") from exc
        fault_point("forget_person_after_commit")
        _after_commit(lab, sorted(face_ids), [sha for _, sha in doomed], touched)
    _compact(lab, compact, ("identities", "images", "faces", "embeddings", "label_revisions", "audit_log"))
    message = f"Deleted the person, {len(face_ids)} face(s) and their history"
    if delete_photos:
        message += f", {len(doomed)} photo(s) that showed nobody else"
    if kept:
        why = "other people are on them" if delete_photos else "photos stay unless you delete them"
        message += f"; {kept} photo(s) with them on it were kept ({why})"
    return DeletionReport(len(face_ids), len(doomed), kept, scrubbed, message + ".")


# -- after the commit: indexes, files, caches ------------------------------------------------
def _after_commit(lab: Lab, face_ids: list[int], shas: list[str], touched: set[str] = frozenset()) -> None:
    """After the database commit: index entries, stored files of deleted photos, and every
    picture made from a deleted or ``touched`` photo."""
    if face_ids:
        with lab.index_for_update() as index:
            index.remove(np.asarray(face_ids, dtype=np.int64))
            index.save(checkpoint=True)  # rewrites the files: the vectors leave the disk too
        drop_other_version_indexes(lab)
    for sha in shas:
        with lab.sessions() as session:  # same bytes re-uploaded since? then the file is in use
            in_use = session.scalar(select(Image.id).where(Image.sha256 == sha)) is not None
        if not in_use:
            lab.images.delete(sha)
    for sha in set(shas) | set(touched):
        purge_cached_copies(sha, lab.settings.ui_cache_dir)
    purge_transient_files(lab)


def purge_transient_files(lab: Lab) -> int:
    """Delete files that may show anyone and that no row points to: every dataset export
    not fetched yet (``pipeline.datasets.downloads``) and every uploaded dataset archive still in
    the web UI's folder (an import deletes its own when done). Returns how many went."""
    from pipeline.datasets import downloads

    removed = downloads.purge(lab, everything=True)
    cache = Path(lab.settings.ui_cache_dir)
    if cache.is_dir():
        for path in cache.rglob("*"):
            if path.suffix.lower() == ".zip" and path.is_file():
                path.unlink(missing_ok=True)
                removed += 1
    return removed


def drop_other_version_indexes(lab: Lab) -> list[str]:
    """Delete saved indexes of embedder versions other than the active one (they are
    rebuilt from the database on use); returns their model versions."""
    active = lab.model_version
    dropped = []
    for manifest in Path(lab.settings.index_dir).glob("*.manifest.json"):
        try:
            version = json.loads(manifest.read_text()).get("model_version")
        except (OSError, ValueError):
            version = None
        if version == active:
            continue
        if isinstance(version, str):
            for path in FaceIndex.all_paths(lab.settings.index_dir, version):
                path.unlink(missing_ok=True)
            dropped.append(version)
        else:  # unreadable manifest: its index file cannot be trusted either
            manifest.unlink(missing_ok=True)
    # index files with no manifest at all
    for suffix in (".faiss", ".ids.npy", ".delta", ".lock"):
        for index_file in Path(lab.settings.index_dir).glob(f"*{suffix}"):
            if not index_file.with_name(index_file.name.removesuffix(suffix) + ".manifest.json").exists():
                index_file.unlink(missing_ok=True)
    return dropped


def purge_cached_copies(sha: str, ui_cache_dir: Path | None = None) -> int:
    """Delete the files named ``<sha>*`` in the registered folders and anywhere under
    ``ui_cache_dir`` (Gradio's own copies sit one folder down, ``<hash>/<name>``)."""
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ValueError(f"not a sha256: {sha!r}")  # never a glob pattern from elsewhere
    with _cache_lock:
        folders = list(_cache_dirs)
    paths = [p for folder in folders for p in folder.glob(f"{sha}*")]
    if ui_cache_dir is not None and Path(ui_cache_dir).is_dir():
        paths += Path(ui_cache_dir).rglob(f"{sha}*")
    removed = 0
    for path in set(paths):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed += 1
    return removed


# -- history scrubbing ----------------------------------------------------------------------
_DROP = object()


def _former_names(session: Session, pid: int) -> set[str]:
    """Names the person had before (renames) or absorbed (merges into them)."""
    names: set[str] = set()
    rows = session.execute(
        select(AuditLog.action, AuditLog.details)
        .where(AuditLog.target_type == "identity", AuditLog.target_id == pid, AuditLog.action.in_(("rename", "merge")))
    ).all()
    for action, details in rows:
        if not isinstance(details, dict):
            continue
        keys = ("from", "to") if action == "rename" else ("from", "into")
        names.update(v for k in keys if isinstance(v := details.get(k), str))
    return names


def _scrub(value: Any, face_ids: set[int], identity_ids: set[int], names: set[str]) -> Any:
    if isinstance(value, str):
        return REDACTED if value.casefold() in names else value
    if isinstance(value, list):
        items = [_scrub(v, face_ids, identity_ids, names) for v in value]
        return [v for v in items if v is not _DROP]
    if isinstance(value, dict):
        if value.get("face_id") in face_ids or value.get("identity_id") in identity_ids:
            return _DROP  # a box of a deleted face / of the deleted person
        out = {}
        for key, item in value.items():
            scrubbed = _scrub(item, face_ids, identity_ids, names)
            out[key] = None if scrubbed is _DROP else scrubbed
        return out
    return value


def _scrub_history(session: Session, face_ids: set[int], identity_ids: set[int], names: set[str],
                   skip_image: int | None = None) -> int:
    """Remove deleted boxes and names from label revisions and audit details; returns rows changed."""
    folded = {n.casefold() for n in names if n}
    changed = 0
    revisions = select(LabelRevision)
    if skip_image is not None:  # its revisions go with the image anyway
        revisions = revisions.where(LabelRevision.image_id != skip_image)
    for rev in session.scalars(revisions).all():
        new = {col: _scrub(getattr(rev, col), face_ids, identity_ids, folded)
               for col in ("boxes_before", "boxes_after", "changes")}
        if any(new[c] != getattr(rev, c) for c in new):
            session.execute(update(LabelRevision).where(LabelRevision.id == rev.id).values(**new))
            changed += 1
    for entry in session.scalars(select(AuditLog).where(AuditLog.details.is_not(None))).all():
        if entry.details is None:
            continue
        # the entry itself stays (who did what, when); only the personal data goes
        details = _scrub(entry.details, face_ids, identity_ids, folded)
        if details is _DROP:
            details = {"redacted": True}
        if details != entry.details:
            session.execute(update(AuditLog).where(AuditLog.id == entry.id).values(details=details))
            changed += 1
    return changed


# -- database compaction --------------------------------------------------------------------
def _secure_delete(session: Session) -> None:
    """SQLite: overwrite deleted content with zeros (this connection, from now on)."""
    if session.get_bind().dialect.name == "sqlite":
        session.connection().exec_driver_sql("PRAGMA secure_delete = ON")


def _compact(lab: Lab, compact: bool | None, tables: tuple[str, ...]) -> None:
    """Make deleted rows unrecoverable from the database files (see the module docstring).

    ``compact`` None means: yes on SQLite (VACUUM is quick at this app's sizes), no on
    PostgreSQL (VACUUM FULL takes exclusive table locks).
    """
    dialect = lab.engine.dialect.name
    if compact is None:
        compact = dialect == "sqlite"
    if not compact:
        return
    try:
        with lab.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            if dialect == "sqlite":
                conn.exec_driver_sql("VACUUM")
                conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
            elif dialect == "postgresql":
                conn.exec_driver_sql("VACUUM FULL " + ", ".join(tables))
    except Exception as exc:  # noqa: BLE001 - the delete itself is done; say what is left
        log.warning("privacy delete: compacting the database failed (%s); deleted rows may remain in free "
                    "pages until the next VACUUM", exc)


def _check_id(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise InvalidRequest(f"image id must be a positive whole number, got {value!r}")
    return int(value)
