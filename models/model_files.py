"""Which model files FaceLab loads, and the check it makes first.

An ultralytics ``.pt`` checkpoint is a pickle: ultralytics reads it with
``torch.load(weights_only=False)`` because it stores the whole module, so loading a file
runs whatever code its author put in it. FaceLab therefore only ever loads:

* a **known architecture**: a network description (``.yaml``) by the bare name
  ultralytics ships (``ARCHITECTURES``); it is built with random weights, nothing is read
  from disk but ultralytics' own package;
* a **checkpoint whose sha256 was recorded** when FaceLab registered it (its model
  registry, ``pipeline.training.registry``): ``verify_sha256`` before the load, so a file swapped
  or planted afterwards is refused, never unpickled;
* a path **given by the machine's owner** (``--detector yolo:PATH``, ``train --model
  PATH`` on the command line, ``FACELAB_DETECTOR``): trusted as the owner's own file,
  like any program they choose to run. The web app never takes a model path.

Our own ResNet50 checkpoints are plain tensors and are read with
``torch.load(weights_only=True)`` (see ``models.embedders.resnet50``), and are checked
against the registry too.
"""

from __future__ import annotations

import re
from pathlib import Path

from models.weights_locator import file_sha256

#: detection networks ultralytics builds from its bundled config (scale letter in the name)
ARCHITECTURES: tuple[str, ...] = ("yolov8n.yaml", "yolov8s.yaml", "yolov8m.yaml", "yolo11n.yaml", "yolo11s.yaml")

_SHA256 = re.compile(r"[0-9a-f]{64}")


class UntrustedModelFile(ValueError):
    """A model file FaceLab will not load (unknown, unregistered or changed since registered)."""


def is_architecture(name: str) -> bool:
    """True for a bare architecture name from ``ARCHITECTURES`` (no folder, no path)."""
    return name in ARCHITECTURES


def check_architecture(name: str) -> str:
    if not is_architecture(name):
        raise UntrustedModelFile(
            f"{name!r} is not a known network: choose one of {', '.join(ARCHITECTURES)} (trained from scratch), "
            "or fine-tune a model registered by FaceLab.")
    return name


def verify_sha256(path: Path | str, expected: str | None, what: str = "model file") -> Path:
    """``path`` if its sha256 is ``expected`` (a full 64-hex digest); else UntrustedModelFile.

    Call it right before loading: the digest is of the bytes that are about to be read.
    """
    path = Path(path)
    if not expected or not _SHA256.fullmatch(expected):
        raise UntrustedModelFile(
            f"{what} {path} has no recorded sha256, so FaceLab cannot tell it is the file it registered; "
            "it was not loaded (register it again by training, or pass it yourself on the command line).")
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    actual = file_sha256(path)
    if actual != expected:
        raise UntrustedModelFile(
            f"{what} {path} changed since FaceLab registered it (sha256 {actual[:12]}..., registered "
            f"{expected[:12]}...); it was not loaded.")
    return path
