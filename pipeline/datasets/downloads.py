"""Files the web app hands to one user, once: dataset exports.

An export holds every face and name in the library, so it is treated like the rest of
the personal data:

* written inside the data folder (``DATA/exports``, mode 0700 like the data folder),
  never in the system's temp folder or Gradio's cache;
* offered under a random token (``secrets.token_urlsafe``) to the user who asked;
* served once: ``claim`` checks that the caller is that user and may still export,
  then renames the file away, so a second request (or anyone else's) finds nothing;
  the server unlinks it as it starts sending it;
* deleted unsent after ``TTL_S`` (``purge``: run at each export, each download, by
  ``python app.py check --repair`` and at start), and at once by a privacy delete
  (``purge(everything=True)``), since any pending export may show the deleted person.

Layout: ``exports/<token>.zip`` (the file), ``exports/<token>.json`` (owner, file name
to send, when it was made); ``<token>.serving`` while it is being sent.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from common.atomic import write_atomically
from pipeline import auth
from pipeline.context import Lab
from pipeline.errors import NotFound

#: an unsent export is deleted this long after it was made
TTL_S = 15 * 60
FOLDER_NAME = "exports"
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{32}")
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,120}")


@dataclass(frozen=True)
class Offer:
    token: str
    path: Path
    filename: str
    owner: str


def folder(lab: Lab) -> Path:
    path = lab.settings.data_dir / FOLDER_NAME
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def reserve(lab: Lab, owner: str, filename: str) -> Offer:
    """Where to write a new export for ``owner``; ``publish`` it once it is complete."""
    if not _NAME_RE.fullmatch(filename):
        raise ValueError(f"not a plain file name: {filename!r}")
    purge(lab)
    token = secrets.token_urlsafe(24)  # 32 characters of [A-Za-z0-9_-]
    return Offer(token, folder(lab) / f"{token}.zip", filename, owner)


def publish(lab: Lab, offer: Offer) -> None:
    """Make a complete export claimable by its owner."""
    if not offer.path.is_file():
        raise FileNotFoundError(offer.path)
    record = {"owner": offer.owner, "filename": offer.filename, "created": time.time()}
    write_atomically(folder(lab) / f"{offer.token}.json", json.dumps(record).encode())


def withdraw(lab: Lab, offer: Offer) -> None:
    """Forget an export that failed half-way."""
    for path in (offer.path, folder(lab) / f"{offer.token}.json"):
        path.unlink(missing_ok=True)


def claim(lab: Lab, token: str, username: str | None) -> tuple[Path, str]:
    """The file to send for ``token`` and the name to send it under, for ``username``
    (None: nobody logged in, single-user mode). Only its owner gets it, only while their
    role still allows exports, and only once: the file is renamed away from its token
    (the caller deletes it after sending). Anything else is ``NotFound`` (a stranger
    learns nothing about whose it is) or ``auth.Forbidden``."""
    gone = NotFound("No such download: it was downloaded already, it expired, or it is not yours. Export again.")
    if not isinstance(token, str) or not _TOKEN_RE.fullmatch(token):
        raise gone
    user = auth.require(lab, username, "export")  # the role is read again now
    purge(lab)
    record_path = folder(lab) / f"{token}.json"
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        raise gone from None
    if not isinstance(record, dict) or record.get("owner") != user:
        raise gone
    serving = folder(lab) / f"{token}.serving"
    try:
        os.rename(folder(lab) / f"{token}.zip", serving)  # atomic: one claim wins
    except FileNotFoundError:
        raise gone from None
    record_path.unlink(missing_ok=True)
    filename = record.get("filename")
    return serving, filename if isinstance(filename, str) and _NAME_RE.fullmatch(filename) else "facelab-export.zip"


def purge(lab: Lab, everything: bool = False, older_than_s: float = TTL_S) -> int:
    """Delete exports older than ``older_than_s`` (all of them with ``everything``), with
    their records and leftovers of interrupted writes; returns how many files went."""
    root = lab.settings.data_dir / FOLDER_NAME
    if not root.is_dir():
        return 0
    cutoff = time.time() - older_than_s
    removed = 0
    for path in root.iterdir():
        try:
            if everything or path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            continue
    return removed


def pending(lab: Lab) -> list[Path]:
    """Every file in the exports folder (exports not yet sent, and leftovers)."""
    root = lab.settings.data_dir / FOLDER_NAME
    return sorted(p for p in root.iterdir() if p.is_file()) if root.is_dir() else []
