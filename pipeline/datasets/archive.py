"""Untrusted dataset containers, read without trusting them: zip archives, folders, XML.

Nothing is ever extracted to disk. A ``DatasetSource`` lists the regular files of a zip
or a folder as POSIX-style relative names and reads one of them into memory on request,
so a hostile name can never become a path we write to. Still, every name is checked
up front and the whole source is refused on the first sign of hostility, because a
dataset that carries ``../`` paths, symlinks or device files was not made by an
annotation tool:

* names: absolute (``/x``, ``C:x``), climbing (``..``), backslashes, NUL or control
  characters, overlong names, duplicates;
* entries: symlinks, device files, pipes, sockets, encrypted members;
* zip bombs: too many entries, too many bytes in total or in one member (as declared
  in the central directory, and enforced again while reading: a member that inflates
  beyond its declared size is refused), and a compression ratio above ``max_ratio``
  for members big enough to matter.

macOS archive litter (``__MACOSX/``, ``._*``, ``.DS_Store``) is skipped, not refused.

``parse_xml`` (``common.safe_xml``) parses XML with expat directly and refuses any DOCTYPE, entity
declaration or external entity reference before it is processed: no XXE, no
"billion laughs", no network or file access. It builds a tiny tree that remembers the
line of every element, so errors can name it. (defusedxml would do the same job; it is
not a dependency, and refusing DTDs outright is simpler and stricter.)
"""

from __future__ import annotations

import os
import re
import stat
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import TracebackType

from common import safe_xml
from common.safe_xml import MalformedXml, UnsafeXml, XmlNode
from pipeline.errors import InvalidRequest


class UnsafeInput(InvalidRequest):
    """The archive, folder or file is refused as a whole. The message names the entry."""


@dataclass(frozen=True)
class ArchiveLimits:
    """Ceilings for one import. Defaults fit datasets of tens of thousands of photos."""

    #: entries in a zip (directories included) or files in a folder
    max_files: int = 50_000
    #: uncompressed bytes of all entries together
    max_total_bytes: int = 8 * 2**30
    #: uncompressed bytes of one entry
    max_file_bytes: int = 200 * 2**20
    #: uncompressed / compressed size of one entry (JPEG ~1, XML/JSON ~5-30, zeros ~1000)
    max_ratio: float = 200.0
    #: entries smaller than this are exempt from the ratio check (tiny files compress oddly)
    ratio_min_bytes: int = 1 * 2**20
    #: face boxes in the whole dataset (WIDER FACE train + val together have ~200k):
    #: parsing stops at the first box over it. Each box is a row, an embedding and an
    #: index entry; bigger collections go in as several imports.
    max_boxes: int = 250_000
    #: face boxes on one image (WIDER FACE's most crowded image has 1,968)
    max_boxes_per_image: int = 5_000


MAX_NAME_LENGTH = 1024
_DRIVE = re.compile(r"^[A-Za-z]:")


def name_problem(name: str) -> str | None:
    """Why an entry name is unacceptable, or None when it is a plain relative name."""
    if not name:
        return "has an empty name"
    if len(name) > MAX_NAME_LENGTH:
        return f"has a name longer than {MAX_NAME_LENGTH} characters"
    if "\x00" in name or any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        return "has control characters in its name"
    if "\\" in name:
        return "uses backslashes in its path (possible path traversal on Windows)"
    if name.startswith("/") or _DRIVE.match(name):
        return "has an absolute path"
    if ".." in name.split("/"):
        return "has '..' in its path (it would point outside the archive)"
    return None


def _is_litter(name: str) -> bool:
    parts = name.split("/")
    return "__MACOSX" in parts or parts[-1].startswith("._") or parts[-1] == ".DS_Store"


class DatasetSource(ABC):
    """Regular files of a zip or folder, by relative POSIX name, read on demand."""

    #: what to call the source in messages (the file or folder name)
    label: str

    def __init__(self, label: str, limits: ArchiveLimits | None = None) -> None:
        self.label = label
        #: the caps this source was opened with (the box caps apply while parsing)
        self.limits = limits or ArchiveLimits()
        self._sizes: dict[str, int] = {}
        #: names skipped as archive litter
        self.skipped: list[str] = []

    @property
    def names(self) -> list[str]:
        """Every regular file, sorted."""
        return sorted(self._sizes)

    def __contains__(self, name: str) -> bool:
        return name in self._sizes

    def size(self, name: str) -> int:
        return self._sizes[name]

    def read(self, name: str, max_bytes: int | None = None) -> bytes:
        """The bytes of ``name``; UnsafeInput if it is bigger than ``max_bytes`` or damaged."""
        if name not in self._sizes:
            raise KeyError(name)
        declared = self._sizes[name]
        if max_bytes is not None and declared > max_bytes:
            raise UnsafeInput(f"{name}: {declared / 2**20:.1f} MiB; the limit is {max_bytes / 2**20:.0f} MiB")
        return self._read(name, declared)

    @abstractmethod
    def _read(self, name: str, declared: int) -> bytes: ...

    def close(self) -> None:  # noqa: B027 - folders hold nothing open
        pass

    def __enter__(self) -> DatasetSource:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class ZipSource(DatasetSource):
    """A zip archive checked entry by entry before anything is read."""

    def __init__(self, path: Path, limits: ArchiveLimits) -> None:
        super().__init__(Path(path).name, limits)
        try:
            self._zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as exc:
            raise UnsafeInput(f"{self.label}: not a readable zip archive ({exc})") from exc
        try:
            self._check(limits)
        except BaseException:
            self._zip.close()
            raise

    def _check(self, limits: ArchiveLimits) -> None:
        infos = self._zip.infolist()
        if len(infos) > limits.max_files:
            raise UnsafeInput(f"{self.label}: {len(infos)} entries; the limit is {limits.max_files}")
        total = 0
        self._infos: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            name = info.filename
            problem = name_problem(name)
            if problem:
                raise UnsafeInput(f"{self.label}: entry {name!r} {problem}; the archive is refused")
            # Unix file type bits (set by Unix zippers; checked whatever the host says,
            # since some extractors honour them regardless)
            mode = info.external_attr >> 16
            if stat.S_IFMT(mode):
                if stat.S_ISLNK(mode):
                    raise UnsafeInput(f"{self.label}: entry {name!r} is a symbolic link; the archive is refused")
                if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                    raise UnsafeInput(f"{self.label}: entry {name!r} is a device file, pipe or socket; the archive is refused")
            if info.is_dir():
                continue
            if info.flag_bits & 0x1:
                raise UnsafeInput(f"{self.label}: entry {name!r} is encrypted; encrypted archives are not supported")
            if info.file_size > limits.max_file_bytes:
                raise UnsafeInput(
                    f"{self.label}: entry {name!r} unpacks to {info.file_size / 2**20:.1f} MiB; "
                    f"the limit for one file is {limits.max_file_bytes / 2**20:.0f} MiB"
                )
            ratio = info.file_size / max(info.compress_size, 1)
            if info.file_size >= limits.ratio_min_bytes and ratio > limits.max_ratio:
                raise UnsafeInput(
                    f"{self.label}: entry {name!r} is compressed {ratio:.0f}:1 (limit {limits.max_ratio:.0f}:1); "
                    "this looks like a zip bomb, the archive is refused"
                )
            total += info.file_size
            if total > limits.max_total_bytes:
                raise UnsafeInput(
                    f"{self.label}: unpacks to more than {limits.max_total_bytes / 2**30:.1f} GiB; the archive is refused"
                )
            if name in self._infos:
                raise UnsafeInput(f"{self.label}: entry {name!r} appears twice; the archive is refused")
            if _is_litter(name):
                self.skipped.append(name)
                continue
            self._infos[name] = info
            self._sizes[name] = info.file_size

    def _read(self, name: str, declared: int) -> bytes:
        chunks: list[bytes] = []
        got = 0
        try:
            with self._zip.open(self._infos[name]) as fh:
                while chunk := fh.read(1 << 20):
                    got += len(chunk)
                    if got > declared:  # zipfile caps at the declared size; belt and braces
                        raise UnsafeInput(f"{self.label}: entry {name!r} inflates beyond its declared size")
                    chunks.append(chunk)
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError) as exc:
            raise UnsafeInput(f"{self.label}: entry {name!r} is damaged ({exc})") from exc
        return b"".join(chunks)

    def close(self) -> None:
        self._zip.close()


class FolderSource(DatasetSource):
    """A local folder, walked without following links; the same limits as a zip."""

    def __init__(self, path: Path, limits: ArchiveLimits) -> None:
        super().__init__(Path(path).name or str(path), limits)
        self.root = Path(path)
        total = 0
        for name, full in self._walk():
            info = os.lstat(full)
            if stat.S_ISLNK(info.st_mode):
                raise UnsafeInput(f"{self.label}: {name!r} is a symbolic link; copy the real file instead")
            if not stat.S_ISREG(info.st_mode):
                raise UnsafeInput(f"{self.label}: {name!r} is a device file, pipe or socket")
            problem = name_problem(name)
            if problem:
                raise UnsafeInput(f"{self.label}: file {name!r} {problem}")
            if len(self._sizes) >= limits.max_files:
                raise UnsafeInput(f"{self.label}: more than {limits.max_files} files; the limit is {limits.max_files}")
            if info.st_size > limits.max_file_bytes:
                raise UnsafeInput(
                    f"{self.label}: {name!r} is {info.st_size / 2**20:.1f} MiB; "
                    f"the limit for one file is {limits.max_file_bytes / 2**20:.0f} MiB"
                )
            total += info.st_size
            if total > limits.max_total_bytes:
                raise UnsafeInput(f"{self.label}: more than {limits.max_total_bytes / 2**30:.1f} GiB of files")
            if _is_litter(name):
                self.skipped.append(name)
                continue
            self._sizes[name] = info.st_size

    def _walk(self) -> Iterator[tuple[str, Path]]:
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            base = Path(dirpath)
            for d in list(dirnames):
                if os.path.islink(base / d):
                    rel = (base / d).relative_to(self.root).as_posix()
                    raise UnsafeInput(f"{self.label}: {rel!r} is a symbolic link to a folder; copy the real folder instead")
            dirnames.sort()
            for f in sorted(filenames):
                full = base / f
                yield full.relative_to(self.root).as_posix(), full

    def _read(self, name: str, declared: int) -> bytes:
        # O_NOFOLLOW: a file swapped for a symlink after the walk is refused, not followed
        try:
            fd = os.open(self.root / name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError as exc:
            raise UnsafeInput(f"{self.label}: cannot read {name!r} ({exc.strerror or exc})") from exc
        with os.fdopen(fd, "rb") as fh:
            data = fh.read(declared + 1)
        if len(data) > declared:
            raise UnsafeInput(f"{self.label}: {name!r} grew while being read")
        return data


def open_source(path: Path | str, limits: ArchiveLimits | None = None) -> DatasetSource:
    """A zip file or a folder as a checked ``DatasetSource`` (UnsafeInput if refused)."""
    path = Path(path)
    limits = limits or ArchiveLimits()
    if path.is_dir():
        return FolderSource(path, limits)
    if path.is_file():
        return ZipSource(path, limits)
    raise InvalidRequest(f"{path} does not exist (give a .zip file or a folder)")


# -- XML ----------------------------------------------------------------------------------
def parse_xml(data: bytes, name: str) -> XmlNode:
    """``common.safe_xml.parse_xml`` with FaceLab's errors: UnsafeInput for DTDs/entities,
    InvalidRequest when malformed."""
    try:
        return safe_xml.parse_xml(data, name)
    except UnsafeXml as exc:
        raise UnsafeInput(str(exc)) from None
    except MalformedXml as exc:
        raise InvalidRequest(str(exc)) from None


def posix_parent(name: str) -> str:
    """The folder part of a relative POSIX name ('' at the top level)."""
    parent = str(PurePosixPath(name).parent)
    return "" if parent == "." else parent
