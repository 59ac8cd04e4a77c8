"""Pictures made from stored photos (face crops, photos with boxes drawn) as files to serve.

Why files, and why these names: handed a picture, Gradio writes it into its cache under a
hash of the picture's bytes, so a privacy delete could not tell which photo a cached crop
came from. Written here as ``<photo sha256>-<content digest>.webp`` instead, a delete finds
every picture made from a photo by the photo's sha256 (``privacy.purge_cached_copies``).
The folder is inside ``Settings.ui_cache_dir``, which the app makes Gradio's own temporary
folder, so Gradio serves these files where they are instead of copying them again.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from common.atomic import write_atomically
from pipeline.context import Lab

FOLDER_NAME = "facelab-served"
QUALITY = 90


def served_folder(lab: Lab) -> Path:
    return lab.settings.ui_cache_dir / FOLDER_NAME


def picture_file(lab: Lab, picture: np.ndarray, source_sha256: str) -> str:
    """``picture`` (H x W x 3 uint8 RGB) as a WebP file named after the photo it was made from.

    Written once per distinct picture (the name holds a digest of its bytes), atomically:
    two requests serving the same crop at once never see a half-written file.
    """
    buffer = io.BytesIO()
    PILImage.fromarray(np.ascontiguousarray(picture)).save(buffer, format="WEBP", quality=QUALITY)
    data = buffer.getvalue()
    folder = served_folder(lab)
    target = folder / f"{source_sha256}-{hashlib.sha256(data).hexdigest()[:16]}.webp"
    if not target.exists():
        write_atomically(target, data)
    return str(target)
