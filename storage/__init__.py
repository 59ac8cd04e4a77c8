"""Persistence for FaceLab: database, image files, vector index. Imports no models/pipeline code.

* ``storage.db``: engines (SQLite / PostgreSQL), Alembic migrations, sessions
* ``storage.orm``: the tables (Image, Identity, Face, Embedding, ModelVersion, AuditLog)
* ``storage.embedding_rows``: embeddings out of the database, shaped for the index
* ``storage.image_decode``: upload validation and normalisation (re-exported by images)
* ``storage.images``: the content-addressed ImageStore
* ``storage.faiss_index``: FaceIndex, cosine search per embedder version
"""
