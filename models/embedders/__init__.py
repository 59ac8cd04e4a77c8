"""Face embedders. ``create_embedder(name, **options)`` picks a backend by name."""
