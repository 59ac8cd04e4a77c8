"""The photo library: ingest, embeddings, search and identification, people, face attributes, privacy deletes and the consistency check."""
