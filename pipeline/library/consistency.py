"""``python app.py check [--repair]``: do the database, image store and index agree?

The database is the source of truth. Problems and what --repair does:
- the schema is not at the newest migration, or SQLite's ``quick_check`` fails:
  reported only (restore a backup; nothing here can fix a damaged database file);
- an image row whose file is missing or whose bytes no longer match its sha256:
  reported only (the photo is gone; its labels are kept so nothing a person did is lost);
- a stored file no row points to (a crash between writing the file and committing the
  row, or between a privacy delete's commit and its file removal): deleted;
- temp files left by a write that did not finish (``.tmp-*``, ``.*.tmp``, ``*.part``
  anywhere in the data folder: image store, index, exports): reported when older than
  ``STALE_TEMP_S``; --repair deletes them all (run it while nothing else writes);
- dataset exports nobody fetched in time (``pipeline.datasets.downloads``): reported, deleted;
- faces without an embedding from the active embedder: embedded;
- embeddings of the active version whose size is not the embedder's: deleted and
  re-embedded (they would stop the index from loading);
- the trigger-kept change stamps (``embedding_stamps``) differ from a full count of the
  embeddings (a migration that rebuilt the table without its triggers): recomputed;
- a saved FAISS index that is missing, damaged, holds other face ids than the database,
  or holds a vector that differs from the database's (a crash after a re-embedding was
  committed but before the index was saved keeps the id set and changes a vector):
  rebuilt from the database.

Without --repair nothing is changed (the saved index is read, not rebuilt).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import delete, func, select

from pipeline.context import Lab
from storage.db import current_revision, head_revision
from storage.embedding_rows import (
    embedding_face_ids,
    embedding_stamp,
    embedding_stamp_scan,
    fetch_embeddings,
    recompute_embedding_stamps,
)
from storage.faiss_index import FaceIndex, OutdatedIndexFormat
from storage.orm import Embedding, EmbeddingStamp, Face, Image

#: cosine distance below which an index vector counts as the database's (float32 noise)
VECTOR_TOLERANCE = 1e-4


@dataclass
class CheckReport:
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    facts: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        out = [f"ok: {f}" for f in self.facts]
        out += [f"problem: {p}" for p in self.problems]
        out += [f"repaired: {r}" for r in self.repaired]
        out.append("consistent" if self.ok else f"{len(self.problems)} problem(s)")
        return out


def check(lab: Lab, repair: bool = False) -> CheckReport:
    report = CheckReport()
    _check_database(lab, report)
    _check_stamps(lab, report, repair)
    version = lab.model_version
    with lab.sessions() as session:
        images = session.execute(select(Image.id, Image.sha256)).all()
        face_count = session.scalar(select(func.count(Face.id))) or 0
        unembedded = session.scalars(
            select(Face.id).where(~Face.id.in_(select(Embedding.face_id).where(Embedding.model_version == version)))
        ).all()
        wrong_dim = session.scalars(
            select(Embedding.face_id).where(Embedding.model_version == version, Embedding.dim != lab.embedder.dim)
        ).all()
        db_ids = embedding_face_ids(session, version)
    report.facts.append(f"{len(images)} image(s), {face_count} face(s), {len(db_ids)} embedding(s) from {version}")

    _check_files(lab, report, images, repair)

    if wrong_dim:
        report.problems.append(f"{len(wrong_dim)} {version} embedding(s) have {lab.embedder.dim}-d vectors expected")
        if repair:
            with lab.write_lock, lab.session() as session:
                session.execute(delete(Embedding).where(Embedding.model_version == version,
                                                        Embedding.dim != lab.embedder.dim))
            report.repaired.append(f"deleted {len(wrong_dim)} malformed embedding(s)")
            unembedded = sorted(set(unembedded) | set(wrong_dim))
    if unembedded:
        report.problems.append(f"{len(unembedded)} face(s) have no {version} embedding")
        if repair:
            from pipeline.library.embed import embed_faces

            embed_faces(lab, list(unembedded))
            report.repaired.append(f"embedded {len(unembedded)} face(s)")

    _check_index(lab, report, repair)
    return report


def _check_database(lab: Lab, report: CheckReport) -> None:
    at, head = current_revision(lab.engine), head_revision()
    if at != head:
        report.problems.append(f"database schema is at revision {at}, the code expects {head}")
    else:
        report.facts.append(f"schema at revision {head} ({lab.engine.dialect.name})")
    if lab.engine.dialect.name == "sqlite":
        with lab.engine.connect() as conn:
            result = [r[0] for r in conn.exec_driver_sql("PRAGMA quick_check").all()]
        if result != ["ok"]:
            report.problems.append("SQLite quick_check: " + "; ".join(map(str, result[:5])))
        else:
            report.facts.append("SQLite quick_check ok")


def _check_stamps(lab: Lab, report: CheckReport, repair: bool) -> None:
    """The trigger-kept embedding stamps (what every search's change check reads) equal a
    full count: a wrong stamp would hide other processes' writes from a running app."""
    with lab.sessions() as session:
        versions = set(session.scalars(select(Embedding.model_version).distinct()).all())
        versions |= set(session.scalars(select(EmbeddingStamp.model_version)).all())
        wrong = sorted(v for v in versions if embedding_stamp(session, v) != embedding_stamp_scan(session, v))
    if not wrong:
        report.facts.append("change stamps match the embeddings")
        return
    report.problems.append(f"the change stamps of {', '.join(wrong)} do not match the embeddings "
                           "(a migration may have dropped their triggers)")
    if repair:
        with lab.write_lock, lab.session() as session:
            recompute_embedding_stamps(session)
        report.repaired.append("recomputed the change stamps from the embeddings")


def _check_files(lab: Lab, report: CheckReport, images: list, repair: bool) -> None:
    known = {sha for _, sha in images}
    for image_id, sha in images:
        if not lab.images.exists(sha):
            report.problems.append(f"image {image_id}: stored file {sha[:12]}… is missing")
        elif not lab.images.verify(sha):
            report.problems.append(f"image {image_id}: stored file {sha[:12]}… does not match its checksum")

    orphans = [sha for sha in lab.images.iter_shas() if sha not in known]
    if orphans:
        report.problems.append(f"{len(orphans)} stored file(s) belong to no image row")
        if repair:
            for sha in orphans:
                lab.images.delete(sha)
            report.repaired.append(f"deleted {len(orphans)} orphan file(s)")
    _check_temp_files(lab, report, repair)


#: a temp file older than this was left by a write that did not finish (a crash, a kill,
#: a full disk); younger ones may belong to a write going on right now
STALE_TEMP_S = 600.0
#: names of temp files: the image store's ``.tmp-*.part``, ``write_atomically``'s and the
#: index's ``.<name>.<random>.tmp``, an export's ``.<name>.<random>.part``
_TEMP_PATTERNS = (".tmp-*", ".*.tmp", "*.part")


def temp_files(lab: Lab) -> list[Path]:
    """Temp files anywhere in the data folder (Gradio's own cache folder aside)."""
    root, cache = Path(lab.settings.data_dir), Path(lab.settings.ui_cache_dir)
    found = {path for pattern in _TEMP_PATTERNS for path in root.rglob(pattern)
             if path.is_file() and not path.is_relative_to(cache)}
    return sorted(found)


def _check_temp_files(lab: Lab, report: CheckReport, repair: bool) -> None:
    from pipeline.datasets import downloads

    now = time.time()
    temps = temp_files(lab)
    stale = [p for p in temps if now - _mtime(p, now) >= STALE_TEMP_S]
    expired = [p for p in downloads.pending(lab) if p not in temps and now - _mtime(p, now) >= downloads.TTL_S]
    if stale:
        shown = ", ".join(str(p.relative_to(lab.settings.data_dir)) for p in stale[:3])
        report.problems.append(f"{len(stale)} temp file(s) left by a write that did not finish "
                               f"(older than {STALE_TEMP_S / 60:.0f} min): {shown}{' …' if len(stale) > 3 else ''}")
    fresh = len(temps) - len(stale)
    if fresh and not repair:
        report.facts.append(f"{fresh} temp file(s) younger than {STALE_TEMP_S / 60:.0f} min (a write in progress?)")
    if expired:
        report.problems.append(f"{len(expired)} dataset export file(s) nobody fetched within "
                               f"{downloads.TTL_S // 60} minutes (the app deletes them when it runs)")
    if repair:  # without --repair a running writer's fresh temp file must not be touched
        removed = 0
        for path in [*temps, *expired]:
            try:
                path.unlink()
                removed += 1
            except FileNotFoundError:
                pass
        if removed:
            report.repaired.append(f"deleted {removed} temp or expired export file(s) left behind")


def _mtime(path: Path, default: float) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return default


def _check_index(lab: Lab, report: CheckReport, repair: bool) -> None:
    version, dim = lab.model_version, lab.embedder.dim
    if lab.settings.vector_backend == "pgvector":
        # the index is PostgreSQL's own (an expression index over the embedding rows):
        # it cannot differ from them; only its existence is checked (and restored)
        lab.index()
        report.facts.append(f"search index: pgvector, in the database ({len(lab.index())} face(s))")
        return
    with lab.sessions() as session:
        try:
            db_ids, db_vectors = fetch_embeddings(session, version, dim)
        except ValueError:  # malformed rows, reported above and not repaired
            return
    problem = None
    never_saved = FaceIndex.read_manifest(lab.settings.index_dir, version) is None and \
        not FaceIndex.paths(lab.settings.index_dir, version)[0].exists()
    if never_saved and not len(db_ids):
        report.facts.append("no faces yet, so no search index file yet")
        return
    try:
        saved = FaceIndex.load(lab.settings.index_dir, version, dim)
    except OutdatedIndexFormat as exc:
        # written before an upgrade: a cache in an old format, not an inconsistency
        if repair:
            lab.rebuild_index()
            report.repaired.append(f"rebuilt the search index in the current format ({exc})")
        else:
            report.facts.append(f"the saved search index is from an older FaceLab ({exc}); "
                                "the app rebuilds it from the database when it next loads it")
        return
    except ValueError as exc:
        problem = f"the saved search index cannot be used ({exc})"
    else:
        index_ids = np.sort(saved.ids())
        if not np.array_equal(index_ids, db_ids):
            missing, extra = np.setdiff1d(db_ids, index_ids), np.setdiff1d(index_ids, db_ids)
            problem = (f"the search index differs from the database ({len(missing)} face(s) missing, "
                       f"{len(extra)} deleted face(s) still in it)")
        elif len(db_ids):
            stale = _stale_vectors(saved, db_ids, db_vectors)
            if stale:
                problem = f"the search index holds outdated vectors for {stale} face(s)"
    if problem is None:
        report.facts.append(f"search index holds the same {len(db_ids)} face(s) and vectors as the database")
        return
    report.problems.append(problem)
    if repair:
        lab.rebuild_index()
        report.repaired.append("rebuilt the search index from the database")


def _stale_vectors(index: FaceIndex, ids: np.ndarray, vectors: np.ndarray) -> int:
    stored = np.stack([index.reconstruct(int(i)) for i in ids])
    expected = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    cosine = np.sum(stored * expected, axis=1)
    return int(np.sum(cosine < 1.0 - VECTOR_TOLERANCE))
