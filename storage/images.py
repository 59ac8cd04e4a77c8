"""Content-addressed image store on the local filesystem.

Objects live at ``root/ab/cd/<sha256>.<jpg|png>`` where the sha256 is that of the
stored bytes (see ``storage.image_decode`` for what is stored and why). Objects are
immutable: ``put`` writes a temp file in the target folder, fsyncs it, then links it
into place with ``os.link``, which is atomic and fails if the object already exists, so
an existing object is never overwritten, even by two uploads racing each other.
(On filesystems without hard links it falls back to ``os.replace`` after an existence
check; the bytes are identical by construction, so the small race there is harmless.)

Upload validation and normalisation live in ``storage.image_decode`` and are
re-exported here: ``decode_upload``, ``DecodedImage``, ``ImageRejected``,
``sanitize_name``.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from common.atomic import fsync_dir
from storage.image_decode import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    EXT_FOR_MIME,
    DecodedImage,
    ImageRejected,
    decode_upload,
    sanitize_name,
)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "DecodedImage",
    "ImageRejected",
    "ImageStore",
    "decode_upload",
    "sanitize_name",
]

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_EXTS = tuple(EXT_FOR_MIME.values())
_TEMP_PREFIX = ".tmp-"


def _check_sha(sha256: str) -> str:
    # the sha becomes a path: anything but 64 lowercase hex digits is refused
    if not isinstance(sha256, str) or not _SHA256_RE.fullmatch(sha256):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")
    return sha256


class ImageStore:
    """Immutable, content-addressed image files under ``root``. Safe across threads and processes."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"ImageStore({str(self.root)!r})"

    # -- paths -----------------------------------------------------------------------

    def object_path(self, sha256: str, ext: str) -> Path:
        """Where an object with this hash and extension lives (whether or not it exists)."""
        _check_sha(sha256)
        if ext not in _EXTS:
            raise ValueError(f"unknown image extension {ext!r}")
        return self.root / sha256[:2] / sha256[2:4] / f"{sha256}.{ext}"

    def path(self, sha256: str) -> Path:
        """The stored file for ``sha256``; FileNotFoundError if there is none."""
        for ext in _EXTS:
            candidate = self.object_path(sha256, ext)
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"no image {sha256} in {self.root}")

    def exists(self, sha256: str) -> bool:
        try:
            self.path(sha256)
        except FileNotFoundError:
            return False
        return True

    # -- writing ---------------------------------------------------------------------

    def put(self, decoded: DecodedImage) -> tuple[str, Path, bool]:
        """Store ``decoded.data``; return ``(sha256, path, is_new)``.

        ``is_new`` is False when the same content was already stored (the existing file
        is left untouched).
        """
        sha256 = hashlib.sha256(decoded.data).hexdigest()
        if sha256 != decoded.sha256:
            raise ValueError("DecodedImage.sha256 does not match its data")
        final = self.object_path(sha256, decoded.ext)
        is_new = self._write_new(final, decoded.data)
        return sha256, final, is_new

    def _write_new(self, final: Path, data: bytes) -> bool:
        if final.exists():
            return False
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=_TEMP_PREFIX, suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as fh:
                os.fchmod(fh.fileno(), 0o600)  # photos are personal data: this user only
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, final)
            except FileExistsError:
                return False
            except OSError:
                if final.exists():
                    return False
                os.replace(tmp, final)
            fsync_dir(final.parent)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def delete(self, sha256: str) -> bool:
        """Remove the object; False if it was not there. Empty folders are left (racing puts may use them)."""
        removed = False
        for ext in _EXTS:
            try:
                self.object_path(sha256, ext).unlink()
                removed = True
            except FileNotFoundError:
                pass
        return removed

    # -- reading ---------------------------------------------------------------------

    def read_bytes(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    def open(self, sha256: str) -> np.ndarray:
        """The stored image as a (H, W, 3) uint8 RGB array."""
        with Image.open(self.path(sha256), formats=("JPEG", "PNG")) as img:
            img.load()
            return np.asarray(img.convert("RGB"))

    def verify(self, sha256: str) -> bool:
        """True if the stored bytes still hash to their name."""
        digest = hashlib.sha256()
        with self.path(sha256).open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest() == sha256

    def thumbnail(
        self,
        sha256: str,
        box: Sequence[float] | None = None,
        size: int = 256,
        margin: float = 0.0,
    ) -> np.ndarray:
        """An RGB crop of ``box`` = (x1, y1, x2, y2) in pixels (whole image if None),
        grown by ``margin`` x its width/height on each side, clipped to the image, and
        shrunk (never enlarged) to fit in ``size`` x ``size`` keeping its aspect ratio."""
        with Image.open(self.path(sha256), formats=("JPEG", "PNG")) as img:
            img = img.convert("RGB")
            if box is not None:
                x1, y1, x2, y2 = (float(v) for v in box)
                if not (x2 > x1 and y2 > y1):
                    raise ValueError(f"empty box {tuple(box)}")
                dx, dy = (x2 - x1) * margin, (y2 - y1) * margin
                left = max(0, math.floor(x1 - dx))
                top = max(0, math.floor(y1 - dy))
                right = min(img.width, math.ceil(x2 + dx))
                bottom = min(img.height, math.ceil(y2 + dy))
                if right <= left or bottom <= top:
                    raise ValueError(f"box {tuple(box)} lies outside the {img.width}x{img.height} image")
                img = img.crop((left, top, right, bottom))
            img.thumbnail((size, size), Image.Resampling.LANCZOS)
            return np.asarray(img)

    # -- maintenance -----------------------------------------------------------------

    def iter_shas(self) -> Iterator[str]:
        """Every stored object's sha256 (for finding files no database row points to)."""
        for path in self.root.glob("??/??/*"):
            stem, _, ext = path.name.partition(".")
            if ext in _EXTS and _SHA256_RE.fullmatch(stem):
                yield stem

    def remove_stale_temp_files(self, older_than_s: float = 3600.0) -> int:
        """Delete temp files left by writers that crashed; returns how many were removed."""
        cutoff = time.time() - older_than_s
        removed = 0
        for path in self.root.glob(f"??/??/{_TEMP_PREFIX}*"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
        return removed
