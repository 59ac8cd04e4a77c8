"""The emotion network and the one preprocessing step training and inference share.

A compact VGG-style CNN for FER2013-framed grey faces: four stages of two 3x3
conv-BN-ReLU layers (widths w, 2w, 4w, 8w) with 2x2 max pooling, global average
pooling, dropout and a linear layer over the 7 FER2013 classes. With w = 32 it has
1.2 M parameters and trains at ~100 img/s on one Zen 3 core in fp32 (40 px input,
batch 64, channels_last), which is what made ~30 epochs fit the CPU budget
(docs/attributes.md).

Input framing: a 48x48 FER-style face (see ``models.attributes.framing``), centre-cropped
to 40x40 (training takes random 40 px crops of the 48 px face). Each crop is
standardised on its own (zero mean, unit variance), so the network sees no difference
between a dark phone photo and FER's web images as far as global brightness and
contrast go.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

#: FER2013's classes, in its folder order (the network's output order)
EMOTIONS: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
FRAME_SIZE = 48  #: FER2013's image size; faces are framed like FER's at this size
INPUT_SIZE = 40  #: the network's input: the central 40x40 of the 48x48 frame


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class EmotionNet(nn.Module):
    def __init__(self, width: int = 32, num_classes: int = len(EMOTIONS), dropout: float = 0.3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 1
        for k in range(4):
            cout = width * 2**k
            layers += _conv(cin, cout) + _conv(cout, cout) + [nn.MaxPool2d(2)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 40, 40) standardised crops -> (N, 7) logits."""
        return self.classifier(self.dropout(self.pool(self.features(x)).flatten(1)))


class EmotionEnsemble(nn.Module):
    """Several emotion networks answering as one, for the price of running each.

    ``forward`` returns the log of the members' mean probabilities, so
    ``forward(x).softmax(1)`` is exactly their probability average and every caller of a
    single network (``predict_proba``, the benches) works unchanged. Averaging
    probabilities rather than logits keeps one over-confident member from outvoting the
    rest."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError("an ensemble needs two or more networks")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        log_probs = torch.stack([m(x).log_softmax(dim=1) for m in self.members])
        return torch.logsumexp(log_probs, dim=0) - math.log(len(self.members))


@torch.no_grad()
def fold_batch_norm(net: EmotionNet | EmotionEnsemble) -> EmotionNet | EmotionEnsemble:
    """The same network (eval mode) with each BatchNorm folded into the convolution before
    it: one pass over the activations fewer per layer, ~15 % less time per face on one
    core (same probabilities to ~1e-7). For inference only: the result cannot train."""
    if isinstance(net, EmotionEnsemble):
        return EmotionEnsemble([fold_batch_norm(m) for m in net.members]).eval()
    folded = copy.deepcopy(net)  # the caller's network stays as it was
    layers: list[nn.Module] = []
    items = list(folded.features)
    i = 0
    while i < len(items):
        conv = items[i]
        if isinstance(conv, nn.Conv2d) and i + 1 < len(items) and isinstance(items[i + 1], nn.BatchNorm2d):
            bn = items[i + 1]
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=True)
            fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
            layers.append(fused)
            i += 2
        else:
            layers.append(conv)
            i += 1
    folded.features = nn.Sequential(*layers)
    return folded.eval().to(memory_format=torch.channels_last)


def standardise(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) grey values (any scale) -> per-image zero mean, unit variance."""
    x = x.float()
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True)
    return (x - mean) / std.clamp_min(1e-3 * float(x.abs().amax().clamp_min(1.0)))


def centre_crop(frames: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """(N, 1, 48, 48) -> the central (N, 1, size, size)."""
    h, w = frames.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return frames[..., top : top + size, left : left + size]


@torch.inference_mode()
def predict_proba(net: EmotionNet, frames: torch.Tensor, flip: bool = True) -> torch.Tensor:
    """(N, 1, 48, 48) uint8/float frames -> (N, 7) probabilities (mirror-averaged if ``flip``)."""
    x = standardise(centre_crop(frames)).contiguous(memory_format=torch.channels_last)
    p = net(x).softmax(dim=1)
    if flip:
        p = (p + net(x.flip(-1)).softmax(dim=1)) / 2
    return p
