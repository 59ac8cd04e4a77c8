"""Crash injection for the crash-consistency tests (tests/test_faults.py).

``fault_point("name")`` does nothing unless the environment variable ``FACELAB_FAULT``
names that point; then the process kills itself with SIGKILL on the spot: no cleanup,
no ``finally``, no flushing, exactly like a power cut of the process (the kernel keeps
what was already written, so it is not an OS crash). Reading one environment variable
costs nanoseconds, so the calls stay in production code.

Points (where they are):
- ``ingest_after_file``: ingest, image file stored, its database row not committed yet
- ``ingest_after_commit``: ingest, rows committed, FAISS index not updated/saved yet
- ``enroll_after_commit``: enroll, the label is committed, the call has not returned
- ``delete_person_after_commit``: delete_person, rows deleted, index not updated yet
- ``delete_image_after_commit``: privacy.delete_image, rows deleted, file/index not yet
"""

from __future__ import annotations

import os
import signal

ENV = "FACELAB_FAULT"


def fault_point(name: str) -> None:
    """SIGKILL this process if ``FACELAB_FAULT`` equals ``name`` (comma-separated list allowed)."""
    wanted = os.environ.get(ENV)
    if wanted and name in wanted.split(","):
        os.kill(os.getpid(), signal.SIGKILL)
