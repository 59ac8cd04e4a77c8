"""A growing, resumable store of aligned face chips on disk (outside the repository).

Layout of a store folder::

    chips.u8        (capacity, S, S, 3) uint8 memmap: the aligned chips, S = chip_size
    teacher.f32     (capacity, D) float32 memmap: the teacher's clean-chip vectors
    manifest.jsonl  one row per chip: index, source, file, box, landmarks, split, identity
    files.jsonl     one row per processed photo (also photos with no usable face), so a
                    restarted preparation skips what is done
    store.json      chip size, padding, capacity, teacher dim and how the chips were made

Why a memmap of raw pixels and not JPEG: the trainer reads random chips every step,
and decoding ~45k JPEGs per epoch would cost a noticeable share of a single CPU thread;
raw 150 px chips are 67.5 KB each (about 3 GB for 45k), which the page cache or the
disk serves for free.

Crash safety: a photo's chips and teacher vectors are written and flushed before its
manifest rows and then its ``files.jsonl`` row; the chip count is derived from
``files.jsonl`` on open, so rows of a photo interrupted half-way are dropped and redone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import write_atomically

STORE_FORMAT = "facelab-chip-store/1"


@dataclass(frozen=True)
class ChipRecord:
    index: int
    source: str
    file: str
    box: tuple[float, float, float, float]
    split: str  #: "train" or "eval" (held-out LFW train-identity pairs)
    identity: str | None


class ChipStore:
    """Append chips while preparing; read them (memmapped) while training."""

    def __init__(self, root: Path | str, mode: str = "r") -> None:
        self.root = Path(root)
        info_path = self.root / "store.json"
        if not info_path.is_file():
            raise FileNotFoundError(f"{info_path} missing: prepare the chips first (distill_long_run prepare)")
        self.info: dict[str, Any] = json.loads(info_path.read_text())
        if self.info.get("format") != STORE_FORMAT:
            raise ValueError(f"{self.root} is not a chip store ({STORE_FORMAT})")
        self.chip_size = int(self.info["chip_size"])
        self.capacity = int(self.info["capacity"])
        self.teacher_dim = int(self.info["teacher_dim"])
        self.writable = mode == "r+"
        self._chips = np.memmap(self.root / "chips.u8", dtype=np.uint8, mode=mode,
                                shape=(self.capacity, self.chip_size, self.chip_size, 3))
        self._teacher = np.memmap(self.root / "teacher.f32", dtype=np.float32, mode=mode,
                                  shape=(self.capacity, self.teacher_dim))
        self.done_files: set[tuple[str, str]] = set()
        self.count = 0
        if self.writable:
            for name in ("files.jsonl", "manifest.jsonl"):
                _cut_torn_line(self.root / name)
        files_path = self.root / "files.jsonl"
        if files_path.is_file():
            for row in _read_jsonl(files_path):
                self.done_files.add((row["source"], row["file"]))
                self.count = max(self.count, int(row["first"]) + int(row["faces"]))
        if self.writable:
            self._drop_manifest_rows_from(self.count)

    # ------------------------------------------------------------------ creation

    @classmethod
    def create(cls, root: Path | str, chip_size: int, capacity: int, teacher_dim: int, info: dict[str, Any]) -> "ChipStore":
        """A new empty store (sparse files: disk fills only as chips arrive), or the
        existing one if ``root`` already holds a store with the same geometry."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        info_path = root / "store.json"
        if info_path.is_file():
            old = json.loads(info_path.read_text())
            for key, value in (("chip_size", chip_size), ("capacity", capacity), ("teacher_dim", teacher_dim)):
                if int(old[key]) != value:
                    raise ValueError(f"{root}: existing store has {key}={old[key]}, asked for {value}")
            return cls(root, "r+")
        for name, nbytes in (("chips.u8", capacity * chip_size * chip_size * 3), ("teacher.f32", capacity * teacher_dim * 4)):
            with open(root / name, "wb") as f:
                f.truncate(nbytes)
        doc = {"format": STORE_FORMAT, "chip_size": chip_size, "capacity": capacity, "teacher_dim": teacher_dim, **info}
        info_path.write_text(json.dumps(doc, indent=1) + "\n")
        return cls(root, "r+")

    # ------------------------------------------------------------------ writing

    def is_done(self, source: str, file: str) -> bool:
        return (source, file) in self.done_files

    def add_photo(self, source: str, file: str, chips: np.ndarray, teacher: np.ndarray, rows: list[dict[str, Any]]) -> None:
        """Store one photo's chips (possibly none) with their teacher vectors and rows."""
        if not self.writable:
            raise PermissionError("store opened read-only")
        k = len(chips)
        if k != len(teacher) or k != len(rows):
            raise ValueError("one teacher vector and one manifest row per chip")
        if self.count + k > self.capacity:
            raise RuntimeError(f"chip store full ({self.capacity}); recreate it with a larger capacity")
        first = self.count
        if k:
            self._chips[first : first + k] = chips
            self._teacher[first : first + k] = teacher
            self._chips.flush()
            self._teacher.flush()
            with open(self.root / "manifest.jsonl", "a") as f:
                for j, row in enumerate(rows):
                    f.write(json.dumps({"i": first + j, "source": source, "file": file, **row}) + "\n")
                f.flush()
                os.fsync(f.fileno())
        with open(self.root / "files.jsonl", "a") as f:
            f.write(json.dumps({"source": source, "file": file, "first": first, "faces": k}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.count += k
        self.done_files.add((source, file))

    def _drop_manifest_rows_from(self, count: int) -> None:
        path = self.root / "manifest.jsonl"
        if not path.is_file():
            return
        rows = list(_read_jsonl(path))
        kept = [r for r in rows if int(r["i"]) < count]
        if len(kept) != len(rows):
            write_atomically(path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    # ------------------------------------------------------------------ reading

    @property
    def chips(self) -> np.ndarray:
        """(count, S, S, 3) uint8, memmapped."""
        return self._chips[: self.count]

    @property
    def teacher(self) -> np.ndarray:
        """(count, D) float32 unit vectors (flip-averaged teacher of the clean chips)."""
        return self._teacher[: self.count]

    def records(self) -> list[ChipRecord]:
        path = self.root / "manifest.jsonl"
        out: list[ChipRecord] = []
        if path.is_file():
            for r in _read_jsonl(path):
                if int(r["i"]) < self.count:
                    out.append(ChipRecord(int(r["i"]), r["source"], r["file"], tuple(r["box"]), r.get("split", "train"),
                                          r.get("identity")))
        out.sort(key=lambda r: r.index)
        if [r.index for r in out] != list(range(self.count)):
            raise ValueError(f"{path}: manifest rows do not cover chips 0..{self.count - 1}")
        return out

    def file_counts(self) -> dict[str, dict[str, int]]:
        """Per source: photos processed, photos with a stored face, chips."""
        out: dict[str, dict[str, int]] = {}
        path = self.root / "files.jsonl"
        if path.is_file():
            for r in _read_jsonl(path):
                d = out.setdefault(r["source"], {"photos": 0, "photos_with_face": 0, "chips": 0})
                d["photos"] += 1
                d["photos_with_face"] += int(r["faces"] > 0)
                d["chips"] += int(r["faces"])
        return out


def _cut_torn_line(path: Path) -> None:
    """Truncate a JSONL file after its last newline: a writer killed mid-line leaves a
    torn row that the next append would otherwise glue onto a good one."""
    if not path.is_file():
        return
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with open(path, "r+b") as f:
            f.truncate(end)


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line (read-only readers see it while a writer runs)
