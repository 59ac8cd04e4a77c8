"""Face quality: how likely a detected box is a real, usable face.

Detectors return false positives (hands, torsos, ornaments) with scores of 0.5-0.7, and
tiny or blurred faces whose embeddings say little. In a search index such boxes become
"hubs": non-faces look alike to a face embedder, so they match each other, and any
non-face query, at similarities above the same-person threshold. The quality score
keeps them out of search, suggestions and enrollment until a person confirms them.

The model is a logistic regression on what the pipeline already has for every face, so
it costs nothing at run time and can be recomputed from the database alone:

* the face embedding itself (a face embedder maps non-faces to a region of their own);
* log of the box's short side in pixels (tiny boxes are the least reliable).

The detector score is deliberately not an input: boxes drawn or imported by people carry
score 1, and the detector already dropped boxes below its own threshold.

It is fitted per embedder (the embedding space differs) by ``bench/fit_face_quality.py``
on face_mask **train** (detections matching a labelled face vs detections far from any
labelled face and crops of the photos' background) and stored as JSON:
``models/weights/face_quality_<embedder>.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def quality_path(embedder_name: str) -> Path:
    return WEIGHTS_DIR / f"face_quality_{embedder_name}.json"


def quality_features(vectors: np.ndarray, short_sides: np.ndarray) -> np.ndarray:
    """(N, dim + 1) feature rows: the unit embedding and the log2 of the box's short side."""
    sides = np.log2(np.maximum(np.asarray(short_sides, dtype=np.float64), 1.0)).reshape(-1, 1)
    vectors = np.asarray(vectors, dtype=np.float64).reshape(len(sides), -1)
    return np.hstack([vectors, sides])


@dataclass(frozen=True)
class FaceQualityModel:
    """Logistic regression over ``quality_features``; ``threshold`` is the gate."""

    embedder_version: str
    weights: np.ndarray  # (dim + 1,)
    bias: float
    #: faces scoring below this are kept for labeling but not searched or enrolled
    threshold: float
    source: str = ""

    @property
    def dim(self) -> int:
        return len(self.weights) - 1

    def predict(self, vectors: np.ndarray, short_sides: np.ndarray) -> np.ndarray:
        """Probability (0-1) that each box is a real face, float32 (N,)."""
        if len(short_sides) == 0:
            return np.zeros(0, dtype=np.float32)
        x = quality_features(vectors, short_sides)
        if x.shape[1] != len(self.weights):
            raise ValueError(f"quality model expects {self.dim}-d embeddings, got {x.shape[1] - 1}-d")
        z = x @ self.weights + self.bias
        return (1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))).astype(np.float32)

    def to_dict(self) -> dict:
        return {"embedder_version": self.embedder_version, "weights": [float(w) for w in self.weights],
                "bias": float(self.bias), "threshold": float(self.threshold), "source": self.source}

    @classmethod
    def from_dict(cls, doc: dict) -> "FaceQualityModel":
        return cls(str(doc["embedder_version"]), np.asarray(doc["weights"], dtype=np.float64), float(doc["bias"]),
                   float(doc["threshold"]), str(doc.get("source", "")))


def load_quality_model(embedder_name: str, embedder_version: str, path: Path | None = None) -> FaceQualityModel | None:
    """The quality model fitted on exactly this embedder version, or None."""
    path = path or quality_path(embedder_name)
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    model = FaceQualityModel.from_dict(doc.get("model", doc))
    return model if model.embedder_version == embedder_version else None
