"""The FaceDetector interface: an RGB image in, face boxes out."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

import numpy as np

from models.base import InferenceModel
from models.types import FaceBox


class FaceDetector(InferenceModel):
    """Detects faces in HxWx3 uint8 RGB images.

    Boxes come back in original-image pixels, sorted by score (highest first), with
    ``landmarks`` filled when the backend (or a landmark stage) provides them.
    """

    def detect(self, image: np.ndarray) -> list[FaceBox]:
        self.load()
        return self._detect(image)

    @property
    def upscales(self) -> bool:
        """Whether ``detect`` enlarges photos to find small faces (then
        ``detect_without_upscale`` is a cheaper pass; otherwise it is the same call)."""
        return False

    def detect_without_upscale(self, image: np.ndarray) -> list[FaceBox]:
        """Faces findable at the photo's own size (or smaller): cheaper than ``detect`` for
        a backend that upscales to find small faces, the same for one that does not. For
        queries where a big face matters, not for finding every face."""
        return self.detect(image)

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[list[FaceBox]]:
        """Backends that can batch override this; the default loops."""
        self.load()
        return [self._detect(image) for image in images]

    @abstractmethod
    def _detect(self, image: np.ndarray) -> list[FaceBox]: ...
