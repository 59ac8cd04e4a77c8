"""Make Gradio's image cache writes atomic.

Gradio turns every image a callback returns (numpy array or PIL image) into a file named
by the hash of its encoded bytes, ``<cache>/<sha256>/image.webp``, and writes it with
``Path.write_bytes``: truncate, then write, in place. When two requests return the same
picture at once (two people searching with the same photo get the same face crops), one
request truncates the file while the other is serving it; the browser or
``gradio_client`` then receives fewer bytes than the Content-Length it was promised
("peer closed connection without sending complete message body"). ``bench/load.py``
hit this 8 times in 78 searches at 20 clients.

The fix keeps Gradio's naming and only changes how the file appears: the bytes go to a
temporary file in the same folder, which is renamed over the final name with
``os.replace`` (atomic on POSIX: a reader sees the old complete file or the new
complete one). Since the name is a hash of the content, an existing file already holds
exactly these bytes and is not written again, the same rule Gradio's own
``save_file_to_cache`` follows for uploaded files.
"""

from __future__ import annotations

import os
from pathlib import Path

from gradio import processing_utils
from PIL import Image

from common.atomic import write_atomically

_installed = False
#: Gradio's own writer, kept for comparison (tests measure the race against it)
gradio_save_pil_to_cache = processing_utils.save_pil_to_cache


def save_pil_to_cache_atomically(img: Image.Image, cache_dir: str, name: str = "image", format: str = "webp") -> str:
    """Drop-in for ``gradio.processing_utils.save_pil_to_cache`` (same arguments, same path)."""
    data = processing_utils.encode_pil_to_bytes(img, format)
    folder = Path(cache_dir) / processing_utils.hash_bytes(data)
    folder.mkdir(exist_ok=True, parents=True)
    final = (folder / f"{name}.{format}").resolve()
    if final.exists() and final.stat().st_size == len(data):
        try:  # Gradio's cache cleaner ages files by ctime: a file handed out again is fresh
            os.utime(final)
        except OSError:
            pass
        return str(final)
    write_atomically(final, data)
    return str(final)


def install() -> None:
    """Route Gradio's image cache writes through ``save_pil_to_cache_atomically``.

    Gradio's Image, Gallery and AnnotatedImage components (and ``save_img_array_to_cache``)
    all call ``processing_utils.save_pil_to_cache`` through the module, so replacing
    that one attribute covers every image output. Idempotent.
    """
    global _installed
    if not _installed:
        processing_utils.save_pil_to_cache = save_pil_to_cache_atomically
        _installed = True
