"""Read a dlib DNN ``.dat`` file (dlib's own serialization) with plain Python + numpy.

dlib writes a network with ``serialize(net)``, which recurses from the loss layer down
to the input layer, writing each wrapper's version number on the way down and each
layer's details on the way back up. So the file is:

    loss version, loss details,
    one version int per wrapper (output -> input): 2 = add_layer (has details),
        1 = add_tag_layer / add_skip_layer (no details), 3 or 2 = the add_layer that
        sits directly on the input layer,
    input layer details,
    then for every add_layer, input -> output: its layer details followed by
        bookkeeping (3 bools and a few cached tensors we skip).

Primitive encodings (dlib/serialize.h, dlib/dnn/tensor.h):
- integers: one control byte (low nibble = byte count, 0x80 = negative), then the
  magnitude little-endian;
- bool: the character '0' or '1';
- float/double: mantissa (int64) and exponent (int16) as integers: value = m * 2**e;
- string: length (integer) then the bytes;
- tensor: version 2, num_samples, k, nr, nc, then little-endian float32 values;
- alias_tensor: version 1, num_samples, k, nr, nc (a view into the layer's params).

Tag and skip wrappers store no tag number (it is a template argument), so the reader
returns them as anonymous ``Marker`` layers; ``dlib_resnet`` resolves them from the
known network definition and checks the sequence matches it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class DlibFormatError(ValueError):
    """The file is not a dlib DNN of a kind this reader understands."""


# ---------------------------------------------------------------------------- layers


@dataclass
class InputRGB:
    mean: tuple[float, float, float]  # avg_red, avg_green, avg_blue subtracted per channel
    size: tuple[int, int]  # (NR, NC); 0 means any size


@dataclass
class Conv:
    weight: np.ndarray  # (out, in, kh, kw) float32
    bias: np.ndarray | None  # (out,) float32
    stride: tuple[int, int]
    padding: tuple[int, int]


@dataclass
class Affine:
    gamma: np.ndarray  # (k,) per channel in conv mode
    beta: np.ndarray
    conv_mode: bool


@dataclass
class Relu:
    pass


@dataclass
class Pool:
    kind: str  # "max" | "avg"
    size: tuple[int, int]  # (0, 0) = pool the whole feature map
    stride: tuple[int, int]
    padding: tuple[int, int]


@dataclass
class AddPrev:
    pass


@dataclass
class FullyConnected:
    weight: np.ndarray  # (out, in) float32
    bias: np.ndarray | None


@dataclass
class Marker:
    """An add_tag_layer or add_skip_layer (indistinguishable in the file)."""


Layer = InputRGB | Conv | Affine | Relu | Pool | AddPrev | FullyConnected | Marker


@dataclass
class DlibNet:
    loss: str
    loss_params: dict[str, float]
    #: layers from input to output, wrappers (tag/skip) included as Marker
    layers: list[Layer] = field(default_factory=list)


# ---------------------------------------------------------------------------- reader


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def _take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise DlibFormatError(f"unexpected end of file at byte {self.pos}")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def integer(self) -> int:
        control = self._take(1)[0]
        size = control & 0x0F
        if size > 8 or control & 0x70:
            raise DlibFormatError(f"bad integer control byte {control:#x} at {self.pos - 1}")
        value = int.from_bytes(self._take(size), "little") if size else 0
        return -value if control & 0x80 else value

    def boolean(self) -> bool:
        c = bytes(self._take(1))
        if c not in (b"0", b"1"):
            raise DlibFormatError(f"bad bool {c!r} at {self.pos - 1}")
        return c == b"1"

    def real(self) -> float:
        mantissa = self.integer()
        exponent = self.integer()
        # dlib marks inf/nan with exponent values at the int16 limits; none occur in
        # trained weights' hyper-parameters, so treat them as an error.
        if abs(exponent) >= 32000:
            raise DlibFormatError(f"special float at {self.pos}")
        return float(np.ldexp(float(mantissa), exponent))

    def string(self) -> str:
        n = self.integer()
        return bytes(self._take(n)).decode("latin-1")

    def peek_string(self) -> str | None:
        """The string at the current position if one plausibly starts here."""
        save = self.pos
        try:
            n = self.integer()
            if not 0 < n < 64:
                return None
            s = bytes(self._take(n))
            return s.decode("ascii") if s.isascii() and s.replace(b"_", b"").isalnum() else None
        except DlibFormatError:
            return None
        finally:
            self.pos = save

    def tensor(self) -> np.ndarray:
        version = self.integer()
        if version != 2:
            raise DlibFormatError(f"tensor version {version} at {self.pos}")
        shape = tuple(self.integer() for _ in range(4))
        count = int(np.prod(shape))
        raw = self._take(4 * count)
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape)

    def alias_tensor(self) -> tuple[int, int, int, int]:
        version = self.integer()
        if version != 1:
            raise DlibFormatError(f"alias_tensor version {version} at {self.pos}")
        return tuple(self.integer() for _ in range(4))  # type: ignore[return-value]


def _split_params(params: np.ndarray, *shapes: tuple[int, ...]) -> list[np.ndarray]:
    """Cut a layer's flat parameter tensor into the views its alias_tensors describe."""
    flat = params.reshape(-1)
    out, offset = [], 0
    for shape in shapes:
        n = int(np.prod(shape))
        out.append(flat[offset : offset + n].reshape(shape).copy())
        offset += n
    if offset != flat.size:
        raise DlibFormatError(f"params hold {flat.size} values, aliases use {offset}")
    return out


def _read_details(r: _Reader) -> Layer:
    name = r.string()
    if name in ("con_4", "con_5"):
        params = r.tensor()
        num_filters = r.integer()
        nr, nc = r.integer(), r.integer()
        sy, sx = r.integer(), r.integer()
        py, px = r.integer(), r.integer()
        filt = r.alias_tensor()
        bias = r.alias_tensor()
        for _ in range(4):  # learning-rate / weight-decay multipliers
            r.real()
        use_bias = r.boolean() if name == "con_5" else True
        shapes = [filt] + ([bias] if use_bias and np.prod(bias) > 0 else [])
        parts = _split_params(params, *shapes)
        w = parts[0]
        if w.shape[0] != num_filters or w.shape[2:] != (nr, nc):
            raise DlibFormatError(f"con filter shape {w.shape} vs {num_filters}x{nr}x{nc}")
        b = parts[1].reshape(-1) if len(parts) > 1 else None
        return Conv(w, b, (sy, sx), (py, px))
    if name == "affine_":
        params = r.tensor()
        gamma_shape = r.alias_tensor()
        beta_shape = r.alias_tensor()
        mode = r.integer()  # dlib's layer_mode: CONV_MODE = 0, FC_MODE = 1
        gamma, beta = _split_params(params, gamma_shape, beta_shape)
        return Affine(gamma.reshape(-1), beta.reshape(-1), conv_mode=(mode == 0))
    if name == "relu_":
        return Relu()
    if name in ("max_pool_2", "avg_pool_2"):
        nr, nc = r.integer(), r.integer()
        sy, sx = r.integer(), r.integer()
        py, px = r.integer(), r.integer()
        return Pool(name[:3], (nr, nc), (sy, sx), (py, px))
    if name == "add_prev_":
        return AddPrev()
    if name == "fc_2":
        num_outputs = r.integer()
        num_inputs = r.integer()
        params = r.tensor()
        w_shape = r.alias_tensor()
        b_shape = r.alias_tensor()
        bias_mode = r.integer()  # FC_HAS_BIAS = 0, FC_NO_BIAS = 1
        for _ in range(4):
            r.real()
        shapes = [w_shape] + ([b_shape] if bias_mode == 0 else [])
        parts = _split_params(params, *shapes)
        # dlib stores fc weights as (num_inputs, num_outputs): out = x @ W
        w = parts[0].reshape(num_inputs, num_outputs).T.copy()
        b = parts[1].reshape(-1) if len(parts) > 1 else None
        return FullyConnected(w, b)
    raise DlibFormatError(f"unsupported dlib layer {name!r} at byte {r.pos}")


def _read_input(r: _Reader) -> InputRGB:
    name = r.string()
    if name != "input_rgb_image_sized":
        raise DlibFormatError(f"unsupported dlib input layer {name!r}")
    mean = (r.real(), r.real(), r.real())
    size = (r.integer(), r.integer())
    return InputRGB(mean, size)


def _skip_bookkeeping(r: _Reader, version: int, on_input: bool) -> None:
    """Skip what add_layer stores after the details: flags and cached tensors."""
    r.boolean()  # this_layer_setup_called
    r.boolean()  # gradient_input_is_stale
    r.boolean()  # get_output_and_gradient_input_disabled
    r.tensor()  # x_grad
    r.tensor()  # cached_output
    r.tensor()  # params_grad (or grad_final for the layer on the input)
    if on_input and version >= 3:
        r.integer()  # _sample_expansion_factor


def read_dlib_dnn(source: Path | str | bytes) -> DlibNet:
    """Parse a dlib DNN file (loss_metric networks such as dlib's face ResNet)."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    r = _Reader(data)

    if r.integer() != 1:
        raise DlibFormatError("not a dlib add_loss_layer (version != 1)")
    loss = r.string()
    if loss != "loss_metric_2":
        raise DlibFormatError(f"unsupported loss layer {loss!r}")
    loss_params = {"margin": r.real(), "distance_threshold": r.real()}

    # Wrapper versions, output -> input, until the input layer's name string shows up.
    wrappers: list[int] = []
    while r.peek_string() is None:
        wrappers.append(r.integer())
        if len(wrappers) > 10_000:
            raise DlibFormatError("no input layer found")
    if not wrappers or wrappers[-1] not in (2, 3):
        raise DlibFormatError("the innermost wrapper is not an add_layer")
    layers: list[Layer] = [_read_input(r)]

    # Details input -> output: walk the wrappers backwards.
    for i, version in enumerate(reversed(wrappers)):
        on_input = i == 0
        if version == 1 and not on_input:
            layers.append(Marker())
            continue
        if version not in (2, 3):
            raise DlibFormatError(f"unexpected wrapper version {version}")
        layers.append(_read_details(r))
        _skip_bookkeeping(r, version, on_input)

    if r.pos != len(data):
        raise DlibFormatError(f"{len(data) - r.pos} trailing bytes after the network")
    return DlibNet(loss, loss_params, layers)
