"""Face detectors. ``create_detector(name, **options)`` picks a backend by name."""
