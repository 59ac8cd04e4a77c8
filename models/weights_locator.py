"""Find weight files shipped inside installed Python packages, without importing them.

``face_recognition_models`` (CC0) carries dlib's face ResNet, shape predictors and
MMOD detector as ``.dat`` files. Importing the package runs ``pkg_resources``, which is
deprecated and absent on modern setuptools, so we only ask the import system *where*
the package lives (``find_spec`` does not execute it) and look for the file there.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
from pathlib import Path

from models.errors import WeightsNotFoundError

FACE_MODELS_PACKAGE = "face_recognition_models"
FACE_MODELS_PIN = "face_recognition_models==0.3.0"


def _package_dirs(package: str) -> list[Path]:
    """Directories of an installed package, found without importing it."""
    dirs: list[Path] = []
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        dirs.extend(Path(p) for p in spec.submodule_search_locations)
    if not dirs:
        # Fallback: the distribution's RECORD lists its files even when the import
        # system cannot see the package (e.g. an unusual install layout).
        try:
            files = importlib.metadata.files(package) or []
        except importlib.metadata.PackageNotFoundError:
            files = []
        for f in files:
            parts = Path(str(f)).parts
            if parts and parts[0] == package:
                dirs.append(Path(str(f.locate())).parents[len(parts) - 2])
                break
    return dirs


def package_file(package: str, filename: str, model: str, how_to_get: str) -> Path:
    """Path of ``filename`` anywhere under an installed ``package``.

    Raises ``WeightsNotFoundError`` naming the file and ``how_to_get`` if it is absent.
    """
    dirs = _package_dirs(package)
    for root in dirs:
        for candidate in (root / filename, root / "models" / filename):
            if candidate.is_file():
                return candidate
        for candidate in sorted(root.rglob(filename)):
            if candidate.is_file():
                return candidate
    expected = (dirs[0] / "models" / filename) if dirs else Path(package) / "models" / filename
    raise WeightsNotFoundError(model, expected, how_to_get)


def package_model_file(filename: str) -> Path:
    """A ``.dat`` file from ``face_recognition_models`` (e.g. the dlib face ResNet)."""
    return package_file(
        FACE_MODELS_PACKAGE,
        filename,
        model=filename,
        how_to_get=f"Install it with: pip install {FACE_MODELS_PIN}",
    )


def file_sha256(path: Path | str) -> str:
    """sha256 hex digest of a weights file: model versions are named after it."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
