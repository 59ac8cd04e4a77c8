"""The FaceEmbedder interface: an RGB image and its face boxes in, unit vectors out."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

import numpy as np

from models.base import InferenceModel
from models.types import FaceBox


class FaceEmbedder(InferenceModel):
    #: length of the output vectors
    dim: int = 0
    #: cosine similarity at or above which two faces are called the same person.
    #: Each backend sets a value measured on data it was not trained on (its model
    #: card says where); None means "not calibrated" and callers must supply one.
    match_threshold: float | None = None

    def embed(self, image: np.ndarray, boxes: Sequence[FaceBox]) -> np.ndarray:
        """Return an (N, dim) float32 array of L2-normalised embeddings, one per box.

        Faces are cropped (and aligned when boxes carry landmarks) by the shared
        ``models.align`` step so every embedder sees faces the same way.
        """
        self.load()
        if len(boxes) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._embed(image, boxes)

    def embed_many(self, items: Sequence[tuple[np.ndarray, Sequence[FaceBox]]]) -> list[np.ndarray]:
        """``embed`` for several photos at once: one (N_i, dim) array per (image, boxes).

        Backends that can, run every face of every photo through the network together
        (bigger batches use the CPU better than one photo's few faces); this default
        embeds photo by photo.
        """
        return [self.embed(image, boxes) for image, boxes in items]

    @abstractmethod
    def _embed(self, image: np.ndarray, boxes: Sequence[FaceBox]) -> np.ndarray: ...
