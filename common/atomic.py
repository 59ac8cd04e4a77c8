"""Writing a file so that no reader ever sees half of it: the one helper every package uses."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort: some filesystems refuse)."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def write_atomically(target: Path | str, write: Callable[[Path], None] | bytes, *, durable: bool = False,
                     mode: int | None = None) -> Path:
    """Write ``target`` through a temporary file in the same folder, then ``os.replace``
    it into place (atomic on POSIX): a concurrent reader gets the old complete file or the
    new complete one, and a crash leaves no truncated file under the final name.

    ``write`` is the bytes to write, or a function that writes the temporary path it gets.
    ``durable``: fsync the file before the rename and the folder after it, so the new file
    survives a power cut, not only a crash of this process. ``mode``: the file's
    permissions (``mkstemp`` creates it 0600).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, staging_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    staging = Path(staging_name)
    try:
        if isinstance(write, bytes):
            with os.fdopen(fd, "wb") as fh:
                fh.write(write)
        else:
            os.close(fd)
            write(staging)
        if mode is not None:
            os.chmod(staging, mode)
        if durable:
            with staging.open("rb") as fh:
                os.fsync(fh.fileno())
        os.replace(staging, target)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(target.parent)
    return target


def save_torch_atomically(obj: Any, target: Path | str, *, keep_previous: bool = False) -> Path:
    """``torch.save`` through ``write_atomically`` (durable: checkpoints are what a resumed
    run starts from). ``keep_previous`` renames the old file to ``<stem>.prev<suffix>``."""
    import torch

    target = Path(target)
    if keep_previous and target.exists():
        os.replace(target, target.with_name(target.stem + ".prev" + target.suffix))
    return write_atomically(target, lambda p: torch.save(obj, p), durable=True)
