"""Our own face embedder: a ResNet50 backbone with a 512-d embedding head.

The weights are ours, trained by ``models.training.embedder_trainer`` (distilled from the
dlib teacher, then ArcFace/CosFace fine-tuned) and stored as a small dict:

    {"format": CHECKPOINT_FORMAT, "state_dict": {name: fp16 tensor}, "meta": {...}}

``meta`` carries everything inference needs (input size, chip padding, mean/std, head
config) plus the training recipe, so a checkpoint is self-describing. It is read with
``torch.load(weights_only=True)``: no pickled code runs. There is no fallback to random
weights: a missing file raises ``WeightsNotFoundError`` saying how to train one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.atomic import write_atomically
from models.embedders.base import FaceEmbedder
from models.errors import ModelInputError, WeightsNotFoundError
from models.model_files import verify_sha256
from models.types import FaceBox
from models.weights_locator import file_sha256

CHECKPOINT_FORMAT = "facelab-resnet50-embedder/1"
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "weights" / "resnet50-face.pt"
HOW_TO_GET = (
    "Train it with `python app.py train embedder ...` (or on a GPU: "
    "`bash tools/gpu_train.sh embedder`, see tools/gpu_train.sh), "
    "then put the checkpoint there or pass its path as resnet50:PATH."
)

#: inference defaults; every trained checkpoint stores its own copy in ``meta``
DEFAULT_META: dict[str, Any] = {
    "embedding_dim": 512,
    "input_size": 112,
    "chip_padding": 0.25,
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "dropout": 0.0,
}


class ResNet50EmbeddingNet(nn.Module):
    """torchvision ResNet50 (no classifier) + BN -> Dropout -> Linear -> BN head.

    The final BatchNorm (no affine shift learned by the loss) is the usual ArcFace
    "BN-neck": it centres the features, which makes cosine similarity behave well.
    """

    def __init__(self, embedding_dim: int = 512, dropout: float = 0.0) -> None:
        super().__init__()
        from torchvision.models import resnet50

        backbone = resnet50(weights=None)  # never downloads: our weights come from our checkpoint
        backbone.fc = nn.Identity()
        self.backbone = backbone
        self.head = nn.Sequential(
            nn.BatchNorm1d(2048),
            nn.Dropout(dropout),
            nn.Linear(2048, embedding_dim, bias=False),
            nn.BatchNorm1d(embedding_dim),
        )
        self.embedding_dim = embedding_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Un-normalised embeddings (callers L2-normalise for cosine similarity)."""
        return self.head(self.backbone(x))


def build_net(meta: dict[str, Any]) -> ResNet50EmbeddingNet:
    return ResNet50EmbeddingNet(int(meta["embedding_dim"]), float(meta.get("dropout", 0.0)))


def chips_to_tensor(
    chips: np.ndarray | torch.Tensor,
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(N,H,W,3) uint8 chips -> normalised (N,3,S,S) float32 tensor on ``device``.

    Chips of another size are resized (bilinear, antialiased) so stored training chips and
    freshly aligned chips go through the very same function.
    """
    t = torch.as_tensor(chips)
    if t.ndim != 4 or t.shape[-1] != 3 or t.dtype != torch.uint8:
        raise ModelInputError(f"expected (N,H,W,3) uint8 chips, got {tuple(t.shape)} {t.dtype}")
    t = t.to(device).permute(0, 3, 1, 2).float().div_(255.0)
    if t.shape[-2:] != (input_size, input_size):
        t = F.interpolate(t, size=(input_size, input_size), mode="bilinear", align_corners=False, antialias=True)
    m = torch.tensor(mean, dtype=t.dtype, device=t.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=t.dtype, device=t.device).view(1, 3, 1, 1)
    return (t - m) / s


@torch.inference_mode()
def embed_chip_array(
    net: nn.Module,
    chips: np.ndarray,
    meta: dict[str, Any],
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    amp: bool = False,
    cpu_bf16: bool = False,
    channels_last: bool = False,
) -> np.ndarray:
    """Embed (N,H,W,3) uint8 chips in batches -> (N, dim) float32, L2-normalised.

    ``amp``: bf16 autocast on CUDA; ``cpu_bf16``: bf16 autocast on CPU (only worth it
    where the CPU has native bf16, see ``models.cpu_features``).
    """
    was_training = net.training
    net.eval()
    out = []
    dev = torch.device(device)
    bf16 = (amp and dev.type == "cuda") or (cpu_bf16 and dev.type == "cpu")
    try:
        for start in range(0, len(chips), batch_size):
            x = chips_to_tensor(chips[start : start + batch_size], meta["input_size"], meta["mean"], meta["std"], dev)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                y = net(x)
            out.append(F.normalize(y.float(), dim=1).cpu())
    finally:
        net.train(was_training)
    if not out:
        return np.zeros((0, int(meta["embedding_dim"])), dtype=np.float32)
    return torch.cat(out).numpy().astype(np.float32, copy=False)


def save_checkpoint(net: nn.Module | dict[str, torch.Tensor], meta: dict[str, Any], path: Path | str) -> Path:
    """Write an fp16 state dict (of a net, or a state dict) + meta atomically (a reader
    never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    source = net.state_dict() if isinstance(net, nn.Module) else net
    state = {k: (v.detach().half() if v.is_floating_point() else v.detach()).cpu() for k, v in source.items()}
    payload = {"format": CHECKPOINT_FORMAT, "state_dict": state, "meta": dict(meta)}
    return write_atomically(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, meta) of a checkpoint written by ``save_checkpoint``."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError("resnet50", path, HOW_TO_GET)
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ModelInputError(f"{path} is not a FaceLab ResNet50 embedder checkpoint ({CHECKPOINT_FORMAT})")
    meta = {**DEFAULT_META, **payload["meta"]}
    return payload["state_dict"], meta


class ResNet50Embedder(FaceEmbedder):
    """Embeddings from our trained ResNet50 (see module docstring); the width (512, or
    128 for the distilled student) comes from the checkpoint.

    Precision ``"auto"``: bf16 autocast + channels_last on a CPU with native bf16
    (AVX512-BF16 / AMX), fp32 elsewhere (emulated bf16 is ~20x slower, see
    ``models.cpu_features``); ``"fp32"`` / ``"bf16"`` force one.
    """

    name = "resnet50"
    dim = 512

    def __init__(
        self,
        checkpoint: Path | str | None = None,
        device: str | None = None,
        batch_size: int = 64,
        sha256: str | None = None,
        precision: str = "auto",
    ) -> None:
        super().__init__()
        if precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
        self.checkpoint = Path(checkpoint) if checkpoint is not None else DEFAULT_CHECKPOINT
        #: the digest a registered checkpoint must still have (read with weights_only=True
        #: anyway; the check catches a file replaced after registration)
        self.sha256 = sha256
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = batch_size
        self.precision = precision
        self.meta: dict[str, Any] = dict(DEFAULT_META)
        self._net: ResNet50EmbeddingNet | None = None
        self._sha = ""
        self._bf16 = False

    @property
    def version(self) -> str:
        self.load()
        return f"{self.name}-{self._sha[:12]}"

    def _load(self) -> None:
        if self.sha256 is not None and self.checkpoint.is_file():
            verify_sha256(self.checkpoint, self.sha256, "resnet50 checkpoint")
        state, meta = load_checkpoint(self.checkpoint)
        net = build_net(meta)
        # fp16 on disk, fp32 in memory: CPU inference in fp16 is slow and less exact.
        net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        net.eval().to(self.device)
        if self.device.type == "cpu":
            from models.cpu_features import cpu_native_bf16

            self._bf16 = self.precision == "bf16" or (self.precision == "auto" and cpu_native_bf16())
        if self._bf16:
            net = net.to(memory_format=torch.channels_last)
        self.meta = meta
        self.dim = int(meta["embedding_dim"])
        if meta.get("match_threshold") is not None:
            # chosen by the trainer on held-out LFW train-identity pairs (see the model card)
            self.match_threshold = float(meta["match_threshold"])
        self._net = net
        self._sha = file_sha256(self.checkpoint)

    @property
    def inference_precision(self) -> str:
        self.load()
        return "bf16" if self._bf16 else "fp32"

    def embed_chips(self, chips: np.ndarray) -> np.ndarray:
        """Embed already aligned (N,H,W,3) uint8 chips (resized to the input size)."""
        self.load()
        assert self._net is not None
        return embed_chip_array(self._net, chips, self.meta, self.device, self.batch_size,
                                cpu_bf16=self._bf16, channels_last=self._bf16)

    def chip_size(self) -> int:
        """The side faces are aligned at: the checkpoint's ``chip_size`` (150 for the
        distilled student, the teacher's chip, then resized to the input size by the
        same function training used) or, for older checkpoints, the input size."""
        return int(self.meta.get("chip_size") or self.meta["input_size"])

    def _embed(self, image: np.ndarray, boxes: Sequence[FaceBox]) -> np.ndarray:
        from models.align import face_chips

        chips = face_chips(image, boxes, size=self.chip_size(), padding=float(self.meta["chip_padding"]))
        return self.embed_chips(chips)


def export_onnx(checkpoint: Path | str, out_path: Path | str, opset: int = 17) -> Path:
    """Export a checkpoint to ONNX (input "chips": N x 3 x S x S normalised float32,
    output "embedding": N x dim, already L2-normalised). Needs the ``onnx`` package."""
    state, meta = load_checkpoint(checkpoint)
    net = build_net(meta)
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    net.eval()

    class _Normalised(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.normalize(self.inner(x), dim=1)

    size = int(meta["input_size"])
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        _Normalised(net),
        (torch.zeros(2, 3, size, size),),
        str(out_path),
        input_names=["chips"],
        output_names=["embedding"],
        dynamic_axes={"chips": {0: "batch"}, "embedding": {0: "batch"}},
        opset_version=opset,
        dynamo=False,
    )
    return out_path
