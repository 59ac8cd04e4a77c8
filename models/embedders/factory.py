"""``create_embedder(spec)``: pick an embedder backend by name.

Specs: ``"dlib"`` (offline default, dlib's CC0 face ResNet read by our own code),
``"resnet50"`` (our ResNet50 checkpoint at its default path) or ``"resnet50:PATH"``.
"""

from __future__ import annotations

from pathlib import Path

from models.embedders.base import FaceEmbedder

EMBEDDERS = ("dlib", "resnet50")


def available_embedders() -> tuple[str, ...]:
    return EMBEDDERS


def create_embedder(spec: str, landmark_detector: object | None = None, **options: object) -> FaceEmbedder:
    """Build (not load) the embedder named by ``spec``.

    ``landmark_detector`` is shared with the embedders that align faces themselves, so
    one process loads the landmark model once.
    """
    name, _, path = spec.partition(":")
    name = name.strip().lower()
    if name == "dlib":
        from models.embedders.dlib_resnet import DlibEmbedder

        # flip averaging on by default: it is what reaches 99.08 % on LFW (98.95 % without),
        # at twice the embedding cost (docs/results/lfw_verification_dlib_full10.json)
        options.setdefault("flip", True)
        return DlibEmbedder(landmark_detector=landmark_detector, **options)  # type: ignore[arg-type]
    if name == "resnet50":
        from models.embedders.resnet50 import ResNet50Embedder

        if path:
            options["checkpoint"] = Path(path)
        return ResNet50Embedder(**options)  # type: ignore[arg-type]
    raise ValueError(f"unknown embedder {spec!r}; choose one of: {', '.join(EMBEDDERS)} (or resnet50:PATH)")
