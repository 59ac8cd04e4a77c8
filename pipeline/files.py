"""Writing a file so that no reader ever sees half of it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomically(target: Path, write: Callable[[Path], None] | bytes) -> Path:
    """Write ``target`` through a temporary file in the same folder, then ``os.replace``
    it into place (atomic on POSIX): a concurrent reader gets the old complete file or the
    new complete one, and a crash leaves no truncated file under the final name.

    ``write`` is the bytes to write, or a function that writes the temporary path it gets.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        if isinstance(write, bytes):
            with os.fdopen(fd, "wb") as fh:
                fh.write(write)
        else:
            os.close(fd)
            write(Path(staging))
        os.replace(staging, target)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return target
