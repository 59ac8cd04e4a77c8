"""The one crop/alignment step every embedder uses.

With 5 landmarks (dlib order, see ``FaceBox``) a face is warped by a similarity
transform onto dlib's mean 5-point face. This reproduces dlib's
``get_face_chip_details`` + ``extract_image_chip`` (dlib/image_transforms/
interpolation.h, image_pyramid.h; geometry/drectangle.h) step by step, so chips match
``dlib.get_face_chip`` and networks trained on dlib chips see what they were trained
on. Without landmarks a square crop around the box is used instead (worse for
recognition, but it never fails).

Coordinates: landmarks use dlib's convention (pixel centres at integers, as cv2);
``FaceBox`` corners are pixel edges (``x2`` exclusive), so pixel ``j`` has centre ``j``
in landmark coordinates and spans ``[j, j+1)`` in box coordinates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from models.errors import ModelInputError
from models.types import FaceBox

#: dlib's mean positions of the 5 landmarks in a unit face square (x, y), in dlib's
#: part order. Parts 0/1 lie on the image's right (x ~ 0.86 / 0.65).
DLIB_MEAN_FACE_5 = np.array(
    [
        [0.8595674595992, 0.2134981538014],
        [0.6460604764104, 0.2289674387677],
        [0.1205750620789, 0.2137274526848],
        [0.3340850613712, 0.2290642403242],
        [0.4901123135679, 0.6277975316475],
    ],
    dtype=np.float64,
)


# ------------------------------------------------------------------------- geometry


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) src -> dst.

    Umeyama's method, as dlib's ``find_similarity_transform``. Returns a 2x3 matrix.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    s, d = src - mu_s, dst - mu_d
    var_s = (s**2).sum() / len(src)
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(cov) < 0:
        sign[1, 1] = -1
    rot = u @ sign @ vt
    scale = float((sig * np.diag(sign)).sum() / var_s) if var_s > 0 else 1.0
    m = np.zeros((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - m[:, :2] @ mu_s
    return m


@dataclass(frozen=True)
class ChipDetails:
    """dlib's ``chip_details``: a (rotated) source rectangle and the chip size.

    ``left..bottom`` is a dlib ``drectangle`` (inclusive pixel-centre coordinates,
    width = right - left + 1); ``angle`` rotates it about its centre (radians).
    """

    left: float
    top: float
    right: float
    bottom: float
    angle: float
    size: int

    @staticmethod
    def centered(cx: float, cy: float, width: float, height: float, angle: float, size: int) -> "ChipDetails":
        # dlib's centered_drect: width-- and height-- before spanning +-width/2
        hw, hh = (width - 1.0) / 2.0, (height - 1.0) / 2.0
        return ChipDetails(cx - hw, cy - hh, cx + hw, cy + hh, angle, size)


def face_chip_details(landmarks: np.ndarray, size: int = 150, padding: float = 0.25) -> ChipDetails:
    """dlib's ``get_face_chip_details`` for a 5-point shape."""
    pts = np.asarray(landmarks, dtype=np.float64).reshape(-1, 2)
    if pts.shape != (5, 2) or not np.all(np.isfinite(pts)):
        raise ModelInputError(f"expected 5 finite (x, y) landmarks, got shape {pts.shape}")
    mean_face = (padding + DLIB_MEAN_FACE_5) / (2 * padding + 1) * size
    tform = similarity_transform(mean_face, pts)
    vx, vy = tform[:, 0]  # image of the unit x vector: scale and rotation
    angle = float(np.arctan2(vy, vx))
    scale = float(np.hypot(vx, vy))
    cx, cy = tform[:, :2] @ np.array([size / 2.0, size / 2.0]) + tform[:, 2]
    return ChipDetails.centered(cx, cy, size * scale, size * scale, angle, size)


def box_chip_details(box: FaceBox, size: int = 150, padding: float = 0.25) -> ChipDetails:
    """An axis-aligned square around the box, for faces without landmarks.

    The aligned chip's unpadded unit square is roughly a face box, so the square's side
    is the box's longer side times ``1 + 2*padding``: both paths frame faces alike.
    """
    if not (box.width > 0 and box.height > 0):
        raise ModelInputError(f"empty face box {box.as_tuple()}")
    side = max(box.width, box.height) * (1.0 + 2.0 * padding)
    # box edges -> pixel-centre coordinates: the centre moves by half a pixel
    cx, cy = (box.x1 + box.x2) / 2.0 - 0.5, (box.y1 + box.y2) / 2.0 - 0.5
    return ChipDetails.centered(cx, cy, side, side, 0.0, size)


# ------------------------------------------------------------------ dlib internals


def _rect_down(l: float, t: float, r: float, b: float) -> tuple[float, float, float, float]:
    # pyramid_down<2>::point_down(p) = p/2 - (1.25, 0.75)
    return l / 2 - 1.25, t / 2 - 0.75, r / 2 - 1.25, b / 2 - 0.75


def _area(l: float, t: float, r: float, b: float) -> float:
    if t > b or l > r:
        return 0.0
    return (r - l + 1.0) * (b - t + 1.0)


def _rotate(cx: float, cy: float, x: float, y: float, angle: float) -> tuple[float, float]:
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = x - cx, y - cy
    return cx + c * dx - s * dy, cy + s * dx + c * dy


def _pyramid_down(img: np.ndarray) -> np.ndarray:
    """dlib's pyramid_down<2> for RGB: 5-tap [1 4 6 4 1] filter, keep every 2nd pixel.

    Output pixel (r, c) is centred on input (2r+2, 2c+2); sums are integer, divided
    by 256 with truncation, as dlib does with its uint16 accumulators.
    """
    h, w = img.shape[:2]
    if h <= 8 or w <= 8:
        return np.zeros((0, 0, 3), dtype=np.uint8)
    x = img.astype(np.uint32)
    nc = (w - 3) // 2
    cols = [x[:, k : k + 2 * nc : 2] for k in range(5)]
    tmp = cols[0] + 4 * cols[1] + 6 * cols[2] + 4 * cols[3] + cols[4]  # (h, nc, 3)
    nr = (h - 3) // 2
    rows = [tmp[k : k + 2 * nr : 2] for k in range(5)]
    out = rows[0] + 4 * rows[1] + 6 * rows[2] + 4 * rows[3] + rows[4]
    return (out // 256).astype(np.uint8)


def _bilinear(img: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """dlib's interpolate_bilinear: truncates to uint8; 0 where a neighbour is outside."""
    h, w = img.shape[:2]
    left = np.floor(xs).astype(np.int64)
    top = np.floor(ys).astype(np.int64)
    inside = (left >= 0) & (top >= 0) & (left + 1 < w) & (top + 1 < h)
    out = np.zeros(xs.shape + (3,), dtype=np.uint8)
    if not inside.any():
        return out
    l, t = left[inside], top[inside]
    fx = (xs[inside] - l)[:, None]
    fy = (ys[inside] - t)[:, None]
    flat = np.ascontiguousarray(img).reshape(-1, 3)
    i = t * w + l
    tl, tr = np.take(flat, i, axis=0).astype(np.float64), np.take(flat, i + 1, axis=0).astype(np.float64)
    bl, br = np.take(flat, i + w, axis=0).astype(np.float64), np.take(flat, i + w + 1, axis=0).astype(np.float64)
    val = (1 - fy) * ((1 - fx) * tl + fx * tr) + fy * ((1 - fx) * bl + fx * br)
    out[inside] = np.minimum(val, 255.0).astype(np.uint8)  # >= 0 already; C++ cast truncates
    return out


def _affine_from_3(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 affine matrix mapping three src points onto three dst points."""
    a = np.hstack([src, np.ones((3, 1))])
    return np.linalg.solve(a, dst).T


def extract_chip(image: np.ndarray, cd: ChipDetails) -> np.ndarray:
    """dlib's ``extract_image_chip`` with bilinear interpolation (one chip)."""
    size = cd.size
    h, w = image.shape[:2]
    rect = (cd.left, cd.top, cd.right, cd.bottom)

    # how deep an image pyramid is needed so bilinear sampling does not alias
    depth, grow = 0, 2.0
    down = _rect_down(*rect)
    while _area(*down) > size * size:
        down = _rect_down(*down)
        depth += 1
        grow = grow * 2 + 2

    # the region of the image the chip can touch (dlib rounds drectangle -> rectangle)
    cx, cy = (cd.left + cd.right) / 2, (cd.top + cd.bottom) / 2
    corners = [(cd.left, cd.top), (cd.right, cd.top), (cd.left, cd.bottom), (cd.right, cd.bottom)]
    rot = np.array([_rotate(cx, cy, x, y, cd.angle) for x, y in corners])
    bl_, bt_ = max(rot[:, 0].min() - grow, 0.0), max(rot[:, 1].min() - grow, 0.0)
    br_, bb_ = min(rot[:, 0].max() + grow, w - 1.0), min(rot[:, 1].max() + grow, h - 1.0)
    bx0, by0 = int(np.floor(bl_ + 0.5)), int(np.floor(bt_ + 0.5))
    bx1, by1 = int(np.floor(br_ + 0.5)), int(np.floor(bb_ + 0.5))
    if bx1 < bx0 or by1 < by0:
        return np.zeros((size, size, 3), dtype=np.uint8)  # chip lies outside the image
    src = image[by0 : by1 + 1, bx0 : bx1 + 1]

    # pick the pyramid level and express the rectangle in its coordinates
    l, t, r, b = cd.left - bx0, cd.top - by0, cd.right - bx0, cd.bottom - by0
    level = -1
    while _area(*_rect_down(l, t, r, b)) > size * size:
        level += 1
        l, t, r, b = _rect_down(l, t, r, b)
    for _ in range(level + 1):
        src = _pyramid_down(src)

    # chip corners (0,0), (size-1,0), (0,size-1) -> rotated rectangle corners
    ccx, ccy = (l + r) / 2, (t + b) / 2
    to = np.array(
        [_rotate(ccx, ccy, l, t, cd.angle), _rotate(ccx, ccy, r, t, cd.angle), _rotate(ccx, ccy, l, b, cd.angle)]
    )
    frm = np.array([[0.0, 0.0], [size - 1.0, 0.0], [0.0, size - 1.0]])
    m = _affine_from_3(frm, to)
    gx, gy = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64))
    xs = m[0, 0] * gx + m[0, 1] * gy + m[0, 2]
    ys = m[1, 0] * gx + m[1, 1] * gy + m[1, 2]
    if src.size == 0:
        return np.zeros((size, size, 3), dtype=np.uint8)
    return _bilinear(src, xs, ys)


# --------------------------------------------------------------------------- public


def _check_image(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        raise ModelInputError(f"expected an HxWx3 RGB image, got {getattr(image, 'shape', None)}")
    if image.dtype != np.uint8:
        raise ModelInputError(f"expected uint8 pixels, got {image.dtype}")
    return image


def chip_details_for(box: FaceBox, size: int = 150, padding: float = 0.25) -> ChipDetails:
    """Aligned chip geometry when the box has landmarks, else a square around it."""
    if box.landmarks is not None:
        return face_chip_details(box.landmarks, size, padding)
    return box_chip_details(box, size, padding)


#: dlib part order after a left-right mirror: the two eyes swap, the nose stays
MIRROR_ORDER_5 = (2, 3, 0, 1, 4)


def mirror_boxes(boxes: Sequence[FaceBox], width: int) -> list[FaceBox]:
    """The boxes of ``image[:, ::-1]`` (``width`` = image width), landmarks reordered.

    Box edges map x -> width - x; landmark pixel centres map x -> width - 1 - x, and
    the eyes swap places in dlib's order, so the mirrored face aligns like a face.
    """
    out: list[FaceBox] = []
    for b in boxes:
        lm = None
        if b.landmarks is not None:
            pts = np.asarray(b.landmarks, dtype=np.float32).reshape(-1, 2).copy()
            if pts.shape != (5, 2):
                raise ModelInputError(f"expected 5 landmarks, got shape {pts.shape}")
            pts[:, 0] = (width - 1) - pts[:, 0]
            lm = pts[list(MIRROR_ORDER_5)]
        out.append(FaceBox(width - b.x2, b.y1, width - b.x1, b.y2, b.score, lm))
    return out


def face_chip(image: np.ndarray, box: FaceBox, size: int = 150, padding: float = 0.25) -> np.ndarray:
    """One ``size`` x ``size`` x 3 uint8 chip (see ``face_chips``)."""
    return face_chips(image, [box], size=size, padding=padding)[0]


def face_chips(
    image: np.ndarray, boxes: Sequence[FaceBox], size: int = 150, padding: float = 0.25
) -> np.ndarray:
    """Crop every face to an (N, size, size, 3) uint8 array.

    Boxes with 5 landmarks are aligned like ``dlib.get_face_chip(img, shape, size,
    padding)``; boxes without get a square crop around the box. Pixels outside the
    image are black, as in dlib.
    """
    image = _check_image(image)
    if size < 2:
        raise ModelInputError(f"chip size must be >= 2, got {size}")
    out = np.zeros((len(boxes), size, size, 3), dtype=np.uint8)
    for i, box in enumerate(boxes):
        out[i] = extract_chip(image, chip_details_for(box, size, padding))
    return out


# ------------------------------------------------------------------ fast path (OpenCV)


def _chip_region(image_shape: tuple[int, ...], cd: ChipDetails
                 ) -> tuple[int, int, int, int, int, tuple[float, float, float, float]]:
    """What ``extract_chip`` decides before sampling: the pixel region the chip can touch
    (x0, y0, x1, y1, inclusive), how many 2x pyramid steps come first, and the chip's
    rectangle in that pyramid level's coordinates (dlib's own mapping)."""
    size = cd.size
    h, w = image_shape[:2]
    grow = 2.0
    down = _rect_down(cd.left, cd.top, cd.right, cd.bottom)
    while _area(*down) > size * size:
        down = _rect_down(*down)
        grow = grow * 2 + 2
    cx, cy = (cd.left + cd.right) / 2, (cd.top + cd.bottom) / 2
    corners = [(cd.left, cd.top), (cd.right, cd.top), (cd.left, cd.bottom), (cd.right, cd.bottom)]
    rot = np.array([_rotate(cx, cy, x, y, cd.angle) for x, y in corners])
    x0 = int(np.floor(max(rot[:, 0].min() - grow, 0.0) + 0.5))
    y0 = int(np.floor(max(rot[:, 1].min() - grow, 0.0) + 0.5))
    x1 = int(np.floor(min(rot[:, 0].max() + grow, w - 1.0) + 0.5))
    y1 = int(np.floor(min(rot[:, 1].max() + grow, h - 1.0) + 0.5))
    rect = (cd.left - x0, cd.top - y0, cd.right - x0, cd.bottom - y0)
    steps = 0
    while _area(*_rect_down(*rect)) > size * size:
        steps += 1
        rect = _rect_down(*rect)
    return x0, y0, x1, y1, steps, rect


def extract_chip_fast(image: np.ndarray, cd: ChipDetails) -> np.ndarray:
    """``extract_chip`` with OpenCV: the same region, the same number of 2x blur-and-
    subsample steps (``cv2.pyrDown``: dlib's 5-tap [1 4 6 4 1] filter) and bilinear
    sampling by ``cv2.warpAffine``, in place of the float64 numpy sampler. Not bit-exact
    (OpenCV rounds where dlib truncates, and treats the region's border otherwise), so
    ``bench/fast_path.py`` compares chips, embeddings and LFW accuracy of both."""
    import cv2

    size = cd.size
    x0, y0, x1, y1, steps, (l, t, r, b) = _chip_region(image.shape, cd)
    if x1 < x0 or y1 < y0:
        return np.zeros((size, size, 3), dtype=np.uint8)
    src = image[y0 : y1 + 1, x0 : x1 + 1]
    # dlib's pyramid pixel j is centred on 2j+2 of the level above, OpenCV's on 2j, so
    # a dlib coordinate q at level n is q + c_n in OpenCV's, c_n = 1 + c_(n-1) / 2
    shift = 0.0
    for _ in range(steps):
        if min(src.shape[:2]) < 2:
            return np.zeros((size, size, 3), dtype=np.uint8)
        src = cv2.pyrDown(src)
        shift = 1.0 + shift / 2.0
    # chip corners (0,0), (size-1,0), (0,size-1) -> the rotated rectangle
    ccx, ccy = (l + r) / 2, (t + b) / 2
    to = np.array([_rotate(ccx, ccy, l, t, cd.angle), _rotate(ccx, ccy, r, t, cd.angle),
                   _rotate(ccx, ccy, l, b, cd.angle)]) + shift
    frm = np.array([[0.0, 0.0], [size - 1.0, 0.0], [0.0, size - 1.0]])
    m = _affine_from_3(frm, to)
    return cv2.warpAffine(np.ascontiguousarray(src), m, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


def face_chips_fast(image: np.ndarray, boxes: Sequence[FaceBox], size: int = 150, padding: float = 0.25,
                    mirrored: bool = False) -> np.ndarray:
    """``face_chips`` through ``extract_chip_fast``. ``mirrored``: the chips of
    ``image[:, ::-1]`` with ``mirror_boxes(boxes)`` (the flip pass), without copying
    the whole mirrored image."""
    image = _check_image(image)
    if size < 2:
        raise ModelInputError(f"chip size must be >= 2, got {size}")
    if mirrored:
        boxes = mirror_boxes(boxes, image.shape[1])
        image = image[:, ::-1]
    out = np.zeros((len(boxes), size, size, 3), dtype=np.uint8)
    for i, box in enumerate(boxes):
        out[i] = extract_chip_fast(image, chip_details_for(box, size, padding))
    return out
