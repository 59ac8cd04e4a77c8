"""Strong, reproducible augmentation of aligned 150 px face chips (numpy + OpenCV).

The teacher (dlib, 150 px) and the student see the SAME augmented chip, so the
augmentation may be strong: the target moves with the input ("consistent teaching")
instead of asking the student to map a distorted face onto the clean face's vector.

Reproducible by construction: ``augment_batch(chips, seed, step)`` draws everything from
a generator seeded by (seed, step), so a resumed run repeats exactly the batches an
uninterrupted run would have seen, without saving any RNG state.

Per chip, in this order (probabilities and ranges in ``ChipAugmentConfig``):
flip; one similarity warp (rotation, zoom, shift: crop/scale/rotation in one
resampling, black outside as in dlib chips); colour (brightness, contrast, saturation)
or greyscale; blur or low resolution (down- and up-sampled: small faces in photos);
JPEG re-encoding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class ChipAugmentConfig:
    flip_p: float = 0.5
    rotation_deg: float = 12.0  #: uniform in +-
    zoom: tuple[float, float] = (0.88, 1.12)  #: >1 zooms in (crops), <1 zooms out
    shift_frac: float = 0.05  #: of the chip side, each axis
    color_p: float = 0.8
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.4
    gray_p: float = 0.1
    blur_p: float = 0.15
    blur_sigma: tuple[float, float] = (0.5, 1.6)
    lowres_p: float = 0.15
    lowres_side: tuple[int, int] = (24, 64)  #: down-sample to this side, then back up
    jpeg_p: float = 0.3
    jpeg_quality: tuple[int, int] = (30, 90)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "ChipAugmentConfig":
        d = dict(d or {})
        for key in ("zoom", "blur_sigma", "lowres_side", "jpeg_quality"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


NO_AUGMENT = ChipAugmentConfig(flip_p=0.0, rotation_deg=0.0, zoom=(1.0, 1.0), shift_frac=0.0, color_p=0.0,
                               gray_p=0.0, blur_p=0.0, lowres_p=0.0, jpeg_p=0.0)


def batch_rng(seed: int, step: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(step), 0xFACE]))


def _warp(chip: np.ndarray, rng: np.random.Generator, cfg: ChipAugmentConfig) -> np.ndarray:
    s = chip.shape[0]
    angle = rng.uniform(-cfg.rotation_deg, cfg.rotation_deg) if cfg.rotation_deg > 0 else 0.0
    zoom = rng.uniform(*cfg.zoom)
    dx, dy = rng.uniform(-cfg.shift_frac, cfg.shift_frac, 2) * s
    if angle == 0.0 and zoom == 1.0 and dx == 0.0 and dy == 0.0:
        return chip
    centre = ((s - 1) / 2.0, (s - 1) / 2.0)
    m = cv2.getRotationMatrix2D(centre, angle, zoom)
    m[:, 2] += (dx, dy)
    return cv2.warpAffine(chip, m, (s, s), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def _colour(chip: np.ndarray, rng: np.random.Generator, cfg: ChipAugmentConfig) -> np.ndarray:
    x = chip.astype(np.float32)
    if rng.random() < cfg.color_p:
        # random order of the three jitters, as torchvision's ColorJitter
        for op in rng.permutation(3):
            if op == 0:
                x *= rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)
            elif op == 1:
                mean = x.mean()
                x = (x - mean) * rng.uniform(1 - cfg.contrast, 1 + cfg.contrast) + mean
            else:
                grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
                x = (x - grey[..., None]) * rng.uniform(1 - cfg.saturation, 1 + cfg.saturation) + grey[..., None]
    if rng.random() < cfg.gray_p:
        grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
        x = np.repeat(grey[..., None], 3, axis=2)
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def _degrade(chip: np.ndarray, rng: np.random.Generator, cfg: ChipAugmentConfig) -> np.ndarray:
    s = chip.shape[0]
    u = rng.random()
    if u < cfg.lowres_p:
        side = int(rng.integers(cfg.lowres_side[0], cfg.lowres_side[1] + 1))
        small = cv2.resize(chip, (side, side), interpolation=cv2.INTER_AREA)
        chip = cv2.resize(small, (s, s), interpolation=cv2.INTER_LINEAR)
    elif u < cfg.lowres_p + cfg.blur_p:
        chip = cv2.GaussianBlur(chip, (0, 0), rng.uniform(*cfg.blur_sigma))
    if rng.random() < cfg.jpeg_p:
        q = int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1))
        ok, buf = cv2.imencode(".jpg", chip[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, q])
        if ok:
            chip = cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1]
    return np.ascontiguousarray(chip)


def augment_chip(chip: np.ndarray, rng: np.random.Generator, cfg: ChipAugmentConfig) -> np.ndarray:
    """One (S,S,3) uint8 RGB chip -> its augmented copy."""
    out = np.ascontiguousarray(chip)
    if rng.random() < cfg.flip_p:
        out = np.ascontiguousarray(out[:, ::-1])
    out = _warp(out, rng, cfg)
    out = _colour(out, rng, cfg)
    return _degrade(out, rng, cfg)


def augment_batch(chips: np.ndarray, seed: int, step: int, cfg: ChipAugmentConfig) -> np.ndarray:
    """(B,S,S,3) uint8 -> augmented (B,S,S,3) uint8, a pure function of its arguments."""
    rng = batch_rng(seed, step)
    return np.stack([augment_chip(c, rng, cfg) for c in chips])
