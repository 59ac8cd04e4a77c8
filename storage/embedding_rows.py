"""Reading embeddings out of the database in the shape FaceIndex wants.

The FAISS index is keyed by face id, so these return face ids (not embedding row ids).
"""

from __future__ import annotations

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.orm import VECTOR_DTYPE, Embedding


def embedding_face_ids(session: Session, model_version: str) -> np.ndarray:
    """Face ids that have an embedding from ``model_version`` (int64, ascending)."""
    rows = session.scalars(
        select(Embedding.face_id).where(Embedding.model_version == model_version).order_by(Embedding.face_id)
    ).all()
    return np.asarray(rows, dtype=np.int64)


def fetch_embeddings(session: Session, model_version: str, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """``(face_ids int64 (n,), vectors float32 (n, dim))`` for every face embedded by ``model_version``.

    Rows whose stored dim differs from ``dim`` raise ValueError (a model version string
    must identify one vector size).
    """
    rows = session.execute(
        select(Embedding.face_id, Embedding.dim, Embedding.vector)
        .where(Embedding.model_version == model_version)
        .order_by(Embedding.face_id)
    ).all()
    ids = np.empty(len(rows), dtype=np.int64)
    vectors = np.empty((len(rows), dim), dtype=np.float32)
    for i, (face_id, row_dim, blob) in enumerate(rows):
        if row_dim != dim or len(blob) != dim * VECTOR_DTYPE.itemsize:
            raise ValueError(f"face {face_id}: embedding {model_version!r} has dim {row_dim}, expected {dim}")
        ids[i] = face_id
        vectors[i] = np.frombuffer(blob, dtype=VECTOR_DTYPE)
    return ids, vectors
