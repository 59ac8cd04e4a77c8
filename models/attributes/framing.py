"""Frame a face like FER2013 does, from its 5 landmarks: a 48x48 grey picture.

FER2013's faces were registered by its authors so the face sits at about the same
place and size in every 48x48 image, upright or not. Our own path aligns a face to
dlib's chip (``models.align.face_chip_details``: centre, side, rotation from the 5
landmarks). The FER frame is a fixed similarity transform of that chip: centre
shifted by ``(dx, dy)`` chip sides (in the chip's rotated axes) and side ``scale``
chip sides. The three numbers are *measured*, not guessed: FER2013 images from the
training side (the select split) went through the app's detector and landmarks, and
the median placement of FER's own 48x48 frame relative to our chip is what
``bench/fit_fer_framing.py`` writes into the emotion model's metadata.

The frame is extracted straight from the photo with dlib's anti-aliased chip
extraction (``models.align.extract_chip``), so a large face is not resized twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from models.align import ChipDetails, chip_details_for, extract_chip
from models.types import FaceBox

FER_SIZE = 48


@dataclass(frozen=True)
class Framing:
    """FER frame = chip centre + (dx, dy) * side (rotated with the chip), side * scale."""

    dx: float
    dy: float
    scale: float

    def details(self, chip: ChipDetails, size: int = FER_SIZE) -> ChipDetails:
        side = chip.right - chip.left + 1.0
        cx, cy = (chip.left + chip.right) / 2.0, (chip.top + chip.bottom) / 2.0
        c, s = np.cos(chip.angle), np.sin(chip.angle)
        fx = cx + side * (c * self.dx - s * self.dy)
        fy = cy + side * (s * self.dx + c * self.dy)
        return ChipDetails.centered(fx, fy, side * self.scale, side * self.scale, chip.angle, size)

    def relative(self) -> dict[str, float]:
        return {"dx": self.dx, "dy": self.dy, "scale": self.scale}


def frame_of(chip: ChipDetails, frame_cx: float, frame_cy: float, frame_side: float) -> Framing:
    """The ``Framing`` that maps ``chip`` onto a known frame (centre and side in the same
    pixel-centre coordinates): what the fit measures per image."""
    side = chip.right - chip.left + 1.0
    cx, cy = (chip.left + chip.right) / 2.0, (chip.top + chip.bottom) / 2.0
    c, s = np.cos(chip.angle), np.sin(chip.angle)
    vx, vy = (frame_cx - cx) / side, (frame_cy - cy) / side
    return Framing(c * vx + s * vy, -s * vx + c * vy, frame_side / side)


def to_grey(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma (what PIL's "L" mode and FER2013's grey images use), uint8."""
    f = rgb.astype(np.float32)
    return np.clip(np.rint(f[..., 0] * 0.299 + f[..., 1] * 0.587 + f[..., 2] * 0.114), 0, 255).astype(np.uint8)


def fer_frames(image: np.ndarray, boxes: Sequence[FaceBox], framing: Framing, size: int = FER_SIZE) -> np.ndarray:
    """(N, size, size) uint8 grey faces framed like FER2013 (landmarks used when present)."""
    out = np.zeros((len(boxes), size, size), np.uint8)
    for i, box in enumerate(boxes):
        chip = chip_details_for(box)  # 150 px, padding 0.25: the embedder's chip geometry
        out[i] = to_grey(extract_chip(image, framing.details(chip, size)))
    return out
