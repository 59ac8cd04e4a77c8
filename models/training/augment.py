"""Face-chip augmentation for embedder training (torchvision.transforms.v2).

Chips are aligned faces with a margin (padding 0.25), so the jitter is mild: the point
is robustness to what our own detector -> aligner path produces (a few degrees of
landmark error, slightly different scale, lighting, greyscale photos), not to teach
invariance to gross geometry. Transforms run on uint8 CHW tensors and output uint8, so
the same pipeline feeds ``preview_grid`` in the UI; normalisation happens later, on the
training device, in ``models.embedders.resnet50.chips_to_tensor``-style code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2


@dataclass
class AugmentConfig:
    hflip: float = 0.5  #: probability of a horizontal flip
    rotation_deg: float = 8.0  #: max rotation either way
    rotation_p: float = 0.5
    crop_scale: tuple[float, float] = (0.80, 1.0)  #: area fraction kept by the random crop
    crop_ratio: tuple[float, float] = (0.9, 1.1)  #: aspect ratio range of the random crop
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.3
    hue: float = 0.03
    color_p: float = 0.8  #: probability of applying the colour jitter
    grayscale_p: float = 0.1
    blur_p: float = 0.1  #: small Gaussian blur (low-resolution faces)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "AugmentConfig":
        d = dict(d or {})
        for key in ("crop_scale", "crop_ratio"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


def build_train_transform(cfg: AugmentConfig, output_size: int) -> v2.Compose:
    """uint8 (3,H,W) tensor -> augmented uint8 (3,output_size,output_size) tensor."""
    steps: list[v2.Transform] = [v2.RandomHorizontalFlip(cfg.hflip)]
    if cfg.rotation_deg > 0 and cfg.rotation_p > 0:
        steps.append(
            v2.RandomApply([v2.RandomRotation(cfg.rotation_deg, interpolation=v2.InterpolationMode.BILINEAR)], p=cfg.rotation_p)
        )
    steps.append(v2.RandomResizedCrop(output_size, scale=cfg.crop_scale, ratio=cfg.crop_ratio, antialias=True))
    if cfg.color_p > 0:
        steps.append(
            v2.RandomApply([v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)], p=cfg.color_p)
        )
    if cfg.grayscale_p > 0:
        steps.append(v2.RandomGrayscale(cfg.grayscale_p))
    if cfg.blur_p > 0:
        steps.append(v2.RandomApply([v2.GaussianBlur(5, sigma=(0.3, 1.2))], p=cfg.blur_p))
    return v2.Compose(steps)


def build_eval_transform(output_size: int) -> v2.Compose:
    """The whole chip, resized: exactly what inference sees."""
    return v2.Compose([v2.Resize((output_size, output_size), antialias=True)])


def hwc_to_chw(chip: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(chip)).permute(2, 0, 1)


def _to_hwc_uint8(sample: np.ndarray | torch.Tensor | Image.Image) -> np.ndarray:
    if isinstance(sample, Image.Image):
        return np.asarray(sample.convert("RGB"))
    if isinstance(sample, torch.Tensor):
        t = sample.detach().cpu()
        if t.is_floating_point():
            t = (t.clamp(0, 1) * 255).round().to(torch.uint8)
        if t.ndim == 3 and t.shape[0] in (1, 3) and t.shape[-1] not in (1, 3):
            t = t.permute(1, 2, 0)
        arr = t.numpy()
    else:
        arr = np.asarray(sample)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return arr.astype(np.uint8, copy=False)


def preview_grid(
    samples: Sequence[np.ndarray | torch.Tensor | Image.Image], ncols: int = 8, pad: int = 2, cell: int | None = None
) -> Image.Image:
    """Tile chips (HWC/CHW arrays or tensors, or PIL images) into one RGB image.

    ``cell`` resizes every tile to cell x cell (default: the first sample's size).
    """
    if len(samples) == 0:
        raise ValueError("preview_grid needs at least one sample")
    tiles = [Image.fromarray(_to_hwc_uint8(s)) for s in samples]
    size = cell or tiles[0].width
    tiles = [t.resize((size, size), Image.Resampling.BILINEAR) if t.size != (size, size) else t for t in tiles]
    ncols = max(1, min(ncols, len(tiles)))
    nrows = (len(tiles) + ncols - 1) // ncols
    grid = Image.new("RGB", (ncols * size + (ncols + 1) * pad, nrows * size + (nrows + 1) * pad), (32, 32, 32))
    for i, tile in enumerate(tiles):
        r, c = divmod(i, ncols)
        grid.paste(tile, (pad + c * (size + pad), pad + r * (size + pad)))
    return grid


def augmentation_preview(
    chips: np.ndarray, cfg: AugmentConfig, output_size: int = 112, per_chip: int = 7, seed: int = 0, max_chips: int = 4
) -> Image.Image:
    """One row per chip: the eval view, then ``per_chip`` augmented draws (for the Train tab)."""
    torch.manual_seed(seed)
    train_tf = build_train_transform(cfg, output_size)
    eval_tf = build_eval_transform(output_size)
    samples = []
    for chip in chips[:max_chips]:
        x = hwc_to_chw(chip)
        samples.append(eval_tf(x))
        samples.extend(train_tf(x) for _ in range(per_chip))
    return preview_grid(samples, ncols=per_chip + 1)
