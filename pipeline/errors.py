"""Errors users see. Every message says what went wrong and what to do."""

from __future__ import annotations

import os


class FaceLabError(Exception):
    """Base class: the message is shown to the user as is."""


class NotFound(FaceLabError):
    pass


class InvalidRequest(FaceLabError):
    pass


class Conflict(FaceLabError):
    """Someone else changed the same thing first (optimistic locking)."""


class StorageFull(FaceLabError):
    """The disk (or quota) holding the data folder or the database is full."""


#: errno values that mean "no room to write": ENOSPC, EDQUOT, EFBIG (a file size limit)
_FULL_ERRNOS = frozenset({28, 122, 27})
#: what SQLite / PostgreSQL say when they cannot write for lack of room
_FULL_TEXTS = ("database or disk is full", "no space left on device", "disk quota exceeded",
               "could not extend file", "file too large")


def _nearly_full(path: str | os.PathLike[str] | None) -> bool:
    try:
        info = os.statvfs(path) if path is not None else None
    except OSError:
        return False
    return info is not None and info.f_bavail * info.f_frsize < 1024 * 1024


def storage_error(exc: BaseException, near: str | os.PathLike[str] | None = None) -> StorageFull | None:
    """A ``StorageFull`` with one clear line if ``exc`` (or what caused it) means the disk
    is full, else None. Checks OSError numbers and the database drivers' messages
    (SQLAlchemy wraps them), following ``__cause__``/``__context__``. SQLite says only
    "disk I/O error" when a completely full disk keeps it from creating its WAL files:
    that counts as full when the filesystem of ``near`` (the data folder) has less than
    1 MiB left, and stays an error (with its traceback) otherwise."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, StorageFull):
            return current
        if isinstance(current, OSError) and current.errno in _FULL_ERRNOS:
            where = f", writing {current.filename}" if current.filename else ""
            return StorageFull(f"The disk is full ({current.strerror or current}{where}): what was being written "
                               "was not saved. Free some space and try again.")
        text = str(current).lower()
        from_database = type(current).__module__.split(".")[0] in ("sqlite3", "sqlalchemy", "psycopg", "psycopg2")
        if from_database and (any(marker in text for marker in _FULL_TEXTS)
                              or ("disk i/o error" in text and _nearly_full(near))):
            return StorageFull("The disk holding the database is full: the change was rolled back, nothing of "
                               "it was saved. Free some space and try again.")
        current = current.__cause__ or current.__context__
    return None
