"""Reading embeddings out of the database in the shape FaceIndex wants.

The FAISS index is keyed by face id; each vector also remembers the embedding row it
came from. Embedding rows are never updated in place: a re-embedding (e.g. a moved box)
deletes the row and inserts a new one, and ids are never reused (AUTOINCREMENT on
SQLite, sequences on PostgreSQL), so a ``(face id, embedding row id)`` pair names one
vector for good. That lets the index's manifest and the change detector below work on
ids alone, without reading vectors.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain

import numpy as np
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from storage.orm import VECTOR_DTYPE, ChangeCounter, Embedding, EmbeddingStamp

#: row ids per ``IN (...)`` query (PostgreSQL and SQLite both take far more; this keeps
#: statements small)
_CHUNK = 5000


def embedding_face_ids(session: Session, model_version: str) -> np.ndarray:
    """Face ids that have an embedding from ``model_version`` (int64, ascending)."""
    rows = session.scalars(
        select(Embedding.face_id).where(Embedding.model_version == model_version).order_by(Embedding.face_id)
    ).all()
    return np.asarray(rows, dtype=np.int64)


def embedding_rows(session: Session, model_version: str) -> tuple[np.ndarray, np.ndarray]:
    """``(face_ids, embedding row ids)`` of ``model_version``'s embeddings, by face id (int64)."""
    # Core rows, flattened straight into numpy: np.asarray on a list of Row objects goes
    # through per-item key lookups and took ~0.6 s for 20k pairs instead of ~0.03 s
    rows = session.connection().execute(
        select(Embedding.face_id, Embedding.id).where(Embedding.model_version == model_version)
        .order_by(Embedding.face_id)
    ).all()
    pairs = np.fromiter(chain.from_iterable(rows), dtype=np.int64, count=2 * len(rows)).reshape(-1, 2)
    return np.ascontiguousarray(pairs[:, 0]), np.ascontiguousarray(pairs[:, 1])


def embedding_stamp(session: Session, model_version: str) -> tuple[int, int, int]:
    """``(count, max row id, sum of row ids)`` of ``model_version``'s embeddings.

    With ids that are never reused this changes whenever a row is added (the max grows,
    or on PostgreSQL, where a lower id can commit later, the count and sum move) or
    deleted (the count drops), so equal stamps mean "nothing changed" unless additions
    and deletions cancel out in count, max and sum at once. ``FaceIndex.stamp()``
    computes the same for the index's contents.

    One primary-key read of ``embedding_stamps``, which database triggers keep in the
    writer's own transaction (migration 0010), so it costs the same at 10 or 10M rows;
    ``embedding_stamp_scan`` computes the same figures the slow way (for checks).
    """
    row = session.connection().execute(
        select(EmbeddingStamp.row_count, EmbeddingStamp.max_row_id, EmbeddingStamp.row_id_sum)
        .where(EmbeddingStamp.model_version == model_version)
    ).one_or_none()
    if row is None:
        return 0, 0, 0
    count, top, total = row
    return int(count or 0), int(top or 0), int(total or 0)


def embedding_stamp_scan(session: Session, model_version: str) -> tuple[int, int, int]:
    """``embedding_stamp`` computed from the rows themselves (one aggregate scan): what the
    trigger-kept stamp must equal; ``check`` compares the two."""
    count, top, total = session.connection().execute(
        select(func.count(), func.max(Embedding.id), func.sum(Embedding.id))
        .where(Embedding.model_version == model_version)
    ).one()
    return int(count or 0), int(top or 0), int(total or 0)


def recompute_embedding_stamps(session: Session) -> None:
    """Set every version's stamp from its rows (repair, e.g. after a migration that
    rebuilt the table without its triggers). Call inside a write transaction."""
    session.execute(delete(EmbeddingStamp))
    rows = session.execute(
        select(Embedding.model_version, func.count(), func.max(Embedding.id), func.sum(Embedding.id))
        .group_by(Embedding.model_version)
    ).all()
    session.add_all(EmbeddingStamp(model_version=v, row_count=int(n), max_row_id=int(m), row_id_sum=int(t))
                    for v, n, m, t in rows)


def gallery_counter(session: Session) -> int:
    """A number that grows whenever the enrolled faces or people's names change (kept by
    triggers, migration 0010): equal values mean the enrolled gallery is unchanged."""
    value = session.connection().execute(
        select(ChangeCounter.value).where(ChangeCounter.name == "gallery")
    ).scalar_one_or_none()
    return int(value or 0)


def fetch_embeddings(session: Session, model_version: str, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """``(face_ids int64 (n,), vectors float32 (n, dim))`` for every face embedded by ``model_version``.

    Rows whose stored dim differs from ``dim`` raise ValueError (a model version string
    must identify one vector size).
    """
    ids, vectors, _ = fetch_embedding_rows(session, model_version, dim)
    return ids, vectors


def fetch_embedding_rows(
    session: Session, model_version: str, dim: int, row_ids: Iterable[int] | None = None,
    *, after: int | None = None, up_to: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(face_ids, vectors, embedding row ids)`` by face id: every row of ``model_version``,
    or only the rows ``row_ids`` that still exist, or only rows with ``after < id <=
    up_to`` (a range read on the model_version index: rows added since the caller last
    looked). Dim mismatches raise ValueError."""
    query = select(Embedding.face_id, Embedding.dim, Embedding.vector, Embedding.id).where(
        Embedding.model_version == model_version
    )
    if after is not None:
        query = query.where(Embedding.id > after)
    if up_to is not None:
        query = query.where(Embedding.id <= up_to)
    conn = session.connection()  # Core rows: no ORM overhead per row
    if row_ids is None:
        rows = conn.execute(query.order_by(Embedding.face_id)).all()
    else:
        wanted = sorted({int(i) for i in row_ids})
        rows = []
        for start in range(0, len(wanted), _CHUNK):
            rows += conn.execute(query.where(Embedding.id.in_(wanted[start : start + _CHUNK]))).all()
        rows.sort(key=lambda r: r[0])
    ids = np.empty(len(rows), dtype=np.int64)
    emb_ids = np.empty(len(rows), dtype=np.int64)
    vectors = np.empty((len(rows), dim), dtype=np.float32)
    for i, (face_id, row_dim, blob, emb_id) in enumerate(rows):
        if row_dim != dim or len(blob) != dim * VECTOR_DTYPE.itemsize:
            raise ValueError(f"face {face_id}: embedding {model_version!r} has dim {row_dim}, expected {dim}")
        ids[i] = face_id
        emb_ids[i] = emb_id
        vectors[i] = np.frombuffer(blob, dtype=VECTOR_DTYPE)
    return ids, vectors, emb_ids
