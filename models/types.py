"""Plain value types shared by every detector and embedder."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class FaceBox:
    """One detected (or human-drawn) face, in original-image pixels.

    ``x1, y1`` is the top-left corner and ``x2, y2`` the bottom-right corner (exclusive),
    as floats so sub-pixel boxes from a detector survive a round trip.
    ``score`` is in [0, 1]. ``landmarks`` is an optional 5x2 array (x, y pixel centres)
    in dlib's 5-point order: outer then inner corner of the eye on the image's RIGHT
    (the person's left eye), outer then inner corner of the eye on the image's LEFT,
    nose base. (Checked against dlib's shape_predictor_5_face_landmarks on
    skimage's astronaut: part 0 x=255 > part 1 238 > part 3 212 > part 2 195.)
    """

    x1: float
    y1: float
    x2: float
    y2: float
    score: float = 1.0
    landmarks: np.ndarray | None = field(default=None, compare=False)

    @property
    def width(self) -> float:
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        return self.y2 - self.y1

    @property
    def short_side(self) -> float:
        return min(self.width, self.height)

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)

    def clipped(self, width: int, height: int) -> "FaceBox":
        """The same box clipped to an image of ``width`` x ``height``."""
        return FaceBox(
            max(0.0, min(self.x1, width)),
            max(0.0, min(self.y1, height)),
            max(0.0, min(self.x2, width)),
            max(0.0, min(self.y2, height)),
            self.score,
            self.landmarks,
        )
