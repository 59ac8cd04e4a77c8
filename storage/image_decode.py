"""Validate an uploaded file and normalise it into the one form the app stores.

``decode_upload(data, name)`` either raises ``ImageRejected`` with a message a user can
read, or returns a ``DecodedImage``: upright, 8-bit RGB pixels plus the exact bytes the
ImageStore will keep, so that decoding the stored bytes gives back exactly ``rgb``.

Normalisation rules (what gets stored):

* A JPEG that needs no pixel change (RGB or grayscale, no EXIF rotation) keeps its
  compressed image data byte for byte (no generational loss, identical pixels), but
  its metadata segments are dropped (``strip_jpeg_metadata``): EXIF (GPS position,
  time, camera serial number, an uncropped thumbnail), XMP, IPTC, comments and extra
  MPO pictures. Kept: JFIF (without thumbnail), the ICC colour profile, Adobe's colour
  transform flag, and every segment a decoder needs. A JPEG with no such metadata is
  stored exactly as uploaded.
* Any other JPEG (EXIF-rotated, CMYK, ...) is re-encoded as JPEG quality 95 and
  ``rgb`` is decoded from those new bytes. Re-encoded and PNG files carry no
  metadata but the ICC profile.
* Everything else (PNG, GIF, WebP, BMP, TIFF) becomes a lossless 8-bit RGB PNG.
  Transparency is composited on white, 16-bit samples are scaled (v * 255 / 65535,
  rounded), palette/grayscale/CMYK become RGB, and only the first frame of an animated
  image is kept (``notes`` says so).

Content address: ``DecodedImage.sha256`` is the sha256 of the *stored* bytes, so a file
in the store can always be checked against its name. The encoders are deterministic,
so identical uploads give identical stored bytes (tested); ``upload_sha256`` (the hash
of the bytes as uploaded) is kept as well so a re-upload can be recognised before
decoding and even if a future Pillow encodes differently.

Safety: only whitelisted formats are parsed; file size is checked before parsing and
pixel count from the header before any pixel is decoded (Pillow's own bomb check,
which raises at twice ``Image.MAX_IMAGE_PIXELS``, stays on as a second fence);
truncated files are errors (``ImageFile.LOAD_TRUNCATED_IMAGES`` is kept False).
Colour management: ICC profiles are not applied (pixel values are used as stored);
an RGB profile is carried into re-encoded files so browsers still show them right.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import sys
import unicodedata
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Register exactly the plugins ALLOWED_FORMATS names (Image.open(formats=...) looks
# them up and fails with KeyError for one that was never imported).
from PIL import (  # noqa: E402,F401  isort: skip
    BmpImagePlugin,
    GifImagePlugin,
    JpegImagePlugin,
    MpoImagePlugin,  # JpegImagePlugin hands multi-picture files to it
    PngImagePlugin,
    PpmImagePlugin,  # PGM/PPM: research face sets (ORL) come as PGM
    TiffImagePlugin,
    WebPImagePlugin,
)

log = logging.getLogger(__name__)

#: default cap on width * height, checked from the header before decoding
DEFAULT_MAX_PIXELS = 50_000_000
#: default cap on the uploaded file's size
DEFAULT_MAX_BYTES = 50 * 1024 * 1024
#: quality for JPEGs that must be re-encoded (rotation, CMYK)
JPEG_QUALITY = 95
#: the longest display name kept (the database column is 255 characters)
MAX_NAME_LENGTH = 255

#: formats Pillow may parse for an upload (its JPEG opener also yields "MPO", the
#: multi-picture JPEGs of phones)
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "PPM")
_JPEG_FORMATS = ("JPEG", "MPO")

MIME_JPEG = "image/jpeg"
MIME_PNG = "image/png"
EXT_FOR_MIME = {MIME_JPEG: "jpg", MIME_PNG: "png"}

_EXIF_ORIENTATION = 0x0112
# bidirectional-text controls: let "gpj.exe" display as "exe.jpg"; stripped from names
_BIDI_CONTROLS = dict.fromkeys(map(ord, "\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"))


class ImageRejected(ValueError):
    """The upload is not an image this app accepts. ``str(err)`` is for the user."""

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """A validated, normalised upload, ready for ``ImageStore.put``."""

    #: (height, width, 3) uint8 RGB, upright; equal to decoding ``data``
    rgb: np.ndarray
    #: the bytes to store (see the module docstring)
    data: bytes
    #: "image/jpeg" or "image/png"
    mime: str
    width: int
    height: int
    #: sanitised display name (never a filesystem path)
    name: str
    #: sha256 hex of ``data``: the content address
    sha256: str
    #: sha256 hex of the bytes as uploaded
    upload_sha256: str
    #: Pillow's name for the uploaded format, e.g. "JPEG", "PNG", "GIF"
    source_format: str
    #: what normalisation did, for the user ("animated GIF: kept frame 1 of 12", ...)
    notes: tuple[str, ...] = field(default=())

    @property
    def ext(self) -> str:
        return EXT_FOR_MIME[self.mime]

    @property
    def size_bytes(self) -> int:
        return len(self.data)


def sanitize_name(name: str | None, max_length: int = MAX_NAME_LENGTH) -> str:
    """A display name from an uploaded file name.

    Keeps only the last path component (splitting on both ``/`` and ``\\``), drops
    control characters, lone surrogates and bidi overrides, trims whitespace and
    shortens to ``max_length`` characters keeping the extension. HTML stays as text:
    escaping is the UI's job. The result is for display only, never a path.
    """
    if not name:
        return "unnamed"
    text = unicodedata.normalize("NFC", str(name))
    text = re.split(r"[/\\]", text)[-1]
    text = text.translate(_BIDI_CONTROLS)
    text = "".join(ch for ch in text if unicodedata.category(ch) not in ("Cc", "Cs"))
    text = " ".join(text.split())  # also folds odd whitespace to single spaces
    if text in ("", ".", ".."):
        return "unnamed"
    if len(text) > max_length:
        stem, dot, ext = text.rpartition(".")
        if dot and stem and 0 < len(ext) <= 16:
            text = stem[: max_length - len(ext) - 1].rstrip() + "." + ext
        else:
            text = text[:max_length]
    return text


def _pil_open() -> Callable[..., Image.Image]:
    """PIL's own ``Image.open``.

    Importing ultralytics replaces ``PIL.Image.open`` process-wide with a wrapper that,
    on a file PIL cannot identify, tries to pip-install pi-heif (and, offline, raises
    ModuleNotFoundError instead of UnidentifiedImageError). An upload must never trigger
    that, so use the original it keeps.
    """
    opener = Image.open
    if getattr(opener, "__module__", "PIL.Image") != "PIL.Image":
        patches = sys.modules.get("ultralytics.utils.patches")
        opener = getattr(patches, "_image_open", opener)
    return opener


def _open(data: bytes, max_pixels: int) -> Image.Image:
    try:
        img = _pil_open()(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageRejected(f"image is too large to process ({exc})") from exc
    except (UnidentifiedImageError, ImportError) as exc:
        raise ImageRejected(
            "not an image, or a format this app does not accept (JPEG, PNG, GIF, WebP, BMP, TIFF, PGM/PPM)"
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageRejected(f"the image file is damaged ({exc})") from exc
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageRejected(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageRejected(
            f"image is {width}x{height} = {width * height / 1e6:.1f} megapixels; "
            f"the limit is {max_pixels / 1e6:.1f} megapixels"
        )
    return img


def _load(img: Image.Image) -> None:
    """Decode every pixel now, so damaged files fail here and not later."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # some other library flipped the global; truncated uploads must still fail
        log.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES was True; setting it back to False")
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        img.load()
    except Image.DecompressionBombError as exc:
        raise ImageRejected(f"image is too large to process ({exc})") from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, MemoryError) as exc:
        raise ImageRejected(f"the image file is damaged or truncated ({exc})") from exc


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(_EXIF_ORIENTATION, 1)
        return int(value) if value in range(1, 9) else 1
    except Exception:  # noqa: BLE001 - broken EXIF must not reject an otherwise fine image
        return 1


def _scale_16bit(img: Image.Image) -> Image.Image:
    """16-bit (and 32-bit integer) grayscale to 8-bit by v * 255 / 65535, rounded.

    Pillow's own ``convert("L")`` clips instead of scaling (everything above 255 turns
    white), which is why this exists.
    """
    arr = np.asarray(img).astype(np.int64)
    arr = np.clip(arr, 0, 65535)
    return Image.fromarray(((arr * 255 + 32767) // 65535).astype(np.uint8), mode="L")


def _to_rgb(img: Image.Image, notes: list[str]) -> Image.Image:
    mode = img.mode
    if mode.startswith("I"):
        notes.append("16-bit image scaled to 8 bits")
        img = _scale_16bit(img)
        mode = img.mode
    if mode == "F":
        raise ImageRejected("floating-point images are not supported")
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] < 255:
            notes.append("transparent areas composited on white")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "CMYK":
        notes.append("CMYK converted to RGB")
    return img.convert("RGB") if mode != "RGB" else img


# JPEG markers (ITU T.81 table B.1)
_SOI, _EOI, _SOS, _APP0, _APP2, _APP14, _TEM = 0xD8, 0xD9, 0xDA, 0xE0, 0xE2, 0xEE, 0x01
_RST = range(0xD0, 0xD8)


def _keep_segment(marker: int, body: bytes) -> bytes | None:
    """The segment body to write for an APPn/COM marker, or None to drop it."""
    if marker == _APP0:
        if body.startswith(b"JFIF\0") and len(body) >= 14:
            return body[:12] + b"\0\0" if body[12:14] != b"\0\0" else body[:14]  # no thumbnail
        return None  # JFXX (thumbnails) and others
    if marker == _APP2:
        return body if body.startswith(b"ICC_PROFILE\0") else None  # MPF, FlashPix: dropped
    if marker == _APP14:
        return body if body.startswith(b"Adobe") else None  # colour transform: changes pixels
    return None  # APP1 (EXIF, XMP), APP3-APP13, APP15, COM


def strip_jpeg_metadata(data: bytes) -> bytes:
    """The JPEG with its metadata segments removed and its coded image data untouched.

    Stops at the first image's EOI (an MPO's further pictures are dropped). Raises
    ValueError on anything it does not understand; the caller then re-encodes.
    """
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG")
    out = bytearray(b"\xff\xd8")
    pos, n = 2, len(data)
    while pos < n:
        if data[pos] != 0xFF:
            raise ValueError(f"expected a marker at byte {pos}")
        while pos + 1 < n and data[pos + 1] == 0xFF:  # fill bytes
            pos += 1
        if pos + 1 >= n:
            raise ValueError("truncated marker")
        marker = data[pos + 1]
        if marker == _EOI:
            out += b"\xff\xd9"
            return bytes(out)
        if marker in _RST or marker == _TEM or marker == _SOI:
            raise ValueError(f"unexpected standalone marker {marker:#x}")
        if pos + 4 > n:
            raise ValueError("truncated segment")
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        end = pos + 2 + length
        if length < 2 or end > n:
            raise ValueError("bad segment length")
        if 0xE0 <= marker <= 0xEF or marker == 0xFE:
            body = _keep_segment(marker, data[pos + 4 : end])
            if body is not None:
                out += bytes((0xFF, marker)) + (len(body) + 2).to_bytes(2, "big") + body
            pos = end
            continue
        out += data[pos:end]
        pos = end
        if marker == _SOS:  # entropy-coded data runs to the next marker that is not RSTn or a stuffed 0
            scan = pos
            while True:
                scan = data.find(b"\xff", scan)
                if scan < 0 or scan + 1 >= n:
                    raise ValueError("scan data runs past the end")
                following = data[scan + 1]
                if following == 0x00 or following in _RST or following == 0xFF:
                    scan += 1 if following == 0xFF else 2
                    continue
                break
            out += data[pos:scan]
            pos = scan
    raise ValueError("no EOI marker")


def _strip_or_none(data: bytes, rgb: np.ndarray) -> bytes | None:
    """``strip_jpeg_metadata(data)`` if it decodes to exactly ``rgb``, else None."""
    try:
        stripped = strip_jpeg_metadata(data)
        if stripped == data:
            return data
        if np.array_equal(_decode_stored(stripped), rgb):
            return stripped
        log.warning("JPEG metadata stripping changed the pixels; re-encoding instead")
    except (ValueError, OSError, SyntaxError) as exc:
        log.info("JPEG metadata not stripped in place (%s); re-encoding instead", exc)
    return None


def _encode(img: Image.Image, fmt: str, icc_profile: bytes | None) -> bytes:
    img = img.copy()
    img.info.clear()  # Pillow carries e.g. a JPEG comment over from info; store no metadata
    out = io.BytesIO()
    extra = {"icc_profile": icc_profile} if icc_profile else {}
    if fmt == "JPEG":
        img.save(out, format="JPEG", quality=JPEG_QUALITY, **extra)
    else:
        img.save(out, format="PNG", **extra)
    return out.getvalue()


def _decode_stored(data: bytes) -> np.ndarray:
    with _pil_open()(io.BytesIO(data), formats=("JPEG", "PNG")) as img:
        img.load()
        return np.asarray(img.convert("RGB"))


def decode_upload(
    data: bytes,
    name: str | None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> DecodedImage:
    """Validate and normalise one uploaded file; raise ``ImageRejected`` if it is unusable."""
    if not data:
        raise ImageRejected("the file is empty (0 bytes)")
    if len(data) > max_bytes:
        raise ImageRejected(f"the file is {len(data) / 2**20:.1f} MiB; the limit is {max_bytes / 2**20:.1f} MiB")
    upload_sha256 = hashlib.sha256(data).hexdigest()
    display_name = sanitize_name(name)
    notes: list[str] = []

    with warnings.catch_warnings():
        # Pillow warns between MAX_IMAGE_PIXELS and twice that; our own limit decides.
        # (catch_warnings is process-global; a concurrent decode can at worst see this
        # one warning filter too, which is harmless.)
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = _open(data, max_pixels)
    with img:
        source_format = img.format or "?"
        n_frames = int(getattr(img, "n_frames", 1) or 1)
        if n_frames > 1 and source_format not in _JPEG_FORMATS:
            notes.append(f"animated {source_format}: kept the first of {n_frames} frames")
            img.seek(0)
        _load(img)
        source_mode = img.mode
        orientation = _orientation(img)
        icc = img.info.get("icc_profile") if source_mode in ("RGB", "RGBA", "P", "PA") else None

        stored = None
        if source_format in _JPEG_FORMATS and source_mode in ("RGB", "L") and orientation == 1:
            rgb = np.asarray(img.convert("RGB"))
            stored = _strip_or_none(data, rgb)
            mime = MIME_JPEG
        if stored is None:
            upright = img
            if orientation != 1:
                try:
                    upright = ImageOps.exif_transpose(img)
                    notes.append(f"rotated upright (EXIF orientation {orientation})")
                except Exception as exc:  # noqa: BLE001 - keep the image as it is stored
                    log.warning("EXIF orientation %s not applied: %s", orientation, exc)
            rgb_img = _to_rgb(upright, notes)
            fmt = "JPEG" if source_format in _JPEG_FORMATS else "PNG"
            stored = _encode(rgb_img, fmt, icc)
            mime = MIME_JPEG if fmt == "JPEG" else MIME_PNG
            rgb = _decode_stored(stored) if fmt == "JPEG" else np.asarray(rgb_img)

    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    rgb.setflags(write=False)  # shared by everyone who receives this DecodedImage
    height, width = rgb.shape[:2]
    return DecodedImage(
        rgb=rgb,
        data=stored,
        mime=mime,
        width=width,
        height=height,
        name=display_name,
        sha256=hashlib.sha256(stored).hexdigest(),
        upload_sha256=upload_sha256,
        source_format=source_format,
        notes=tuple(notes),
    )
