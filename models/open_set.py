"""Open-set (1:N) identification thresholds, calibrated per embedder version.

Why not the 1:1 verification threshold: a search compares a query with every enrolled
face and keeps the best. For a stranger, the best of M similarities grows with M, so a
threshold chosen for one pair at a time (LFW verification) accepts more and more
strangers as the gallery grows (85 % of strangers at a few hundred enrolled people, as
measured in issue #11). The threshold here is a function of the number of enrolled
(searchable) faces M: for each M on a grid, the similarity that the best match of a
stranger exceeds with probability ``target_far`` (1 % by default), fitted on people the
benchmark never reports on (LFW train identities) by ``bench/fit_open_set.py``.

Between grid points the threshold is interpolated linearly in log M; below the grid it is
the first point's value, never below the 1:1 threshold; beyond the grid it is extended
with the last segment's slope per log M (a stranger's best match keeps growing slowly),
capped at 1.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def calibration_path(embedder_name: str) -> Path:
    return WEIGHTS_DIR / f"open_set_{embedder_name}.json"


@dataclass(frozen=True)
class OpenSetCalibration:
    """Threshold as a function of gallery size, for one embedder version."""

    embedder_version: str
    target_far: float
    #: (enrolled faces M, threshold) sorted by M, thresholds non-decreasing
    grid: tuple[tuple[int, float], ...]
    #: the embedder's 1:1 threshold: never go below it
    floor: float
    source: str = ""

    def threshold(self, gallery_faces: int) -> float:
        """The similarity the best match must reach to be called that person."""
        m = max(1, int(gallery_faces))
        sizes = [s for s, _ in self.grid]
        values = [t for _, t in self.grid]
        if m <= sizes[0]:
            t = values[0]
        elif m >= sizes[-1]:
            if len(sizes) > 1:
                slope = (values[-1] - values[-2]) / (math.log(sizes[-1]) - math.log(sizes[-2]))
                t = values[-1] + max(slope, 0.0) * (math.log(m) - math.log(sizes[-1]))
            else:
                t = values[-1]
        else:
            i = next(j for j in range(1, len(sizes)) if sizes[j] >= m)
            lo, hi = math.log(sizes[i - 1]), math.log(sizes[i])
            w = (math.log(m) - lo) / (hi - lo)
            t = values[i - 1] + w * (values[i] - values[i - 1])
        return float(min(1.0, max(self.floor, t)))

    @classmethod
    def from_dict(cls, doc: dict) -> "OpenSetCalibration":
        grid = sorted((int(m), float(t)) for m, t in doc["grid"])
        if not grid:
            raise ValueError("an open-set calibration needs at least one grid point")
        # a stranger's best match can only grow with the gallery: enforce monotonicity
        running, mono = -1.0, []
        for m, t in grid:
            running = max(running, t)
            mono.append((m, running))
        return cls(str(doc["embedder_version"]), float(doc["target_far"]), tuple(mono),
                   float(doc.get("floor", -1.0)), str(doc.get("source", "")))

    def to_dict(self) -> dict:
        return {"embedder_version": self.embedder_version, "target_far": self.target_far,
                "grid": [list(p) for p in self.grid], "floor": self.floor, "source": self.source}


#: the share of strangers the default decision lets in
DEFAULT_TARGET_FAR = 0.01


def load_calibration(embedder_name: str, embedder_version: str, target_far: float = DEFAULT_TARGET_FAR,
                     path: Path | None = None) -> OpenSetCalibration | None:
    """The calibration fitted for exactly this embedder version and stranger acceptance
    rate, or None (not calibrated: another checkpoint, or no file)."""
    path = path or calibration_path(embedder_name)
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    for entry in doc.get("calibrations", [doc]):
        if entry.get("embedder_version") == embedder_version and abs(float(entry["target_far"]) - target_far) < 1e-9:
            return OpenSetCalibration.from_dict(entry)
    return None
