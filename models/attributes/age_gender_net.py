"""Age and gender from dlib's face ResNet: its frozen front, a trainable tail, two heads.

dlib's network (``models.embedders.dlib_resnet``) was trained to tell people apart,
and its later layers still carry age and sex (identity correlates with both). So the
age/gender model reuses it: ops ``[0, cut)`` run frozen, exactly as in the embedder;
ops ``[cut, gap]`` are a trainable copy initialised from dlib's weights (``cut`` = 99
leaves nothing trainable there: heads on the frozen 256-d pooled features); then

* age: 101 logits over 0..100 years; the estimate is the softmax expectation (trained
  against a Gaussian label distribution plus an L1 term on the expectation, the usual
  "label distribution" recipe, which beats plain regression on UTKFace);
* gender: one logit, P(female) (UTKFace's labels: 0 male, 1 female).

Only the tail and heads are stored in our weights file (fp16); the frozen front comes
from dlib's own file, whose hash is recorded and checked at load.
"""

from __future__ import annotations

import torch
from torch import nn

from models.embedders.dlib_resnet import DlibResNet, _Op

AGE_BINS = 101  #: 0..100 years; older labels count as 100


class DlibTail(nn.Module):
    """A trainable copy of ``DlibResNet.ops[start:stop]`` (its convs' weights copied)."""

    def __init__(self, net: DlibResNet, start: int, stop: int) -> None:
        super().__init__()
        self.start, self.stop = start, stop
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.ops: list[_Op] = []
        for op in net.ops[start:stop]:
            if op.kind in ("conv", "fc"):
                self.weights.append(nn.Parameter(net.weights[op.index].detach().clone()))
                self.biases.append(nn.Parameter(net.biases[op.index].detach().clone()))
                op = _Op(op.kind, index=len(self.weights) - 1, size=op.size, stride=op.stride,
                         padding=op.padding, tag=op.tag)
            self.ops.append(op)

    # the same op interpreter as the frozen network
    run_ops = DlibResNet.run_ops
    _padded_add = staticmethod(DlibResNet._padded_add)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # every cut point is right after a "tag 1" op, so x is the only live residual
        return self.run_ops(x, tags={1: x})

    def describe(self) -> list[str]:
        return [f"{op.kind}{tuple(self.weights[op.index].shape) if op.kind == 'conv' else ''}" for op in self.ops]


class AgeGenderNet(nn.Module):
    def __init__(self, net: DlibResNet, cut: int, hidden: int = 256, dropout: float = 0.3) -> None:
        super().__init__()
        gap = next(i for i, op in enumerate(net.ops) if op.kind == "gap")
        if not 0 < cut <= gap or (cut < gap and net.ops[cut - 1].kind != "tag"):
            raise ValueError(f"cut {cut}: must follow a tag op and be at most the pooling op ({gap})")
        self.cut = cut
        self.tail = DlibTail(net, cut, gap + 1)
        width = int(net.weights[net.ops[-1].index].shape[1])  # the pooled feature size (256)
        self.trunk = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.ReLU(inplace=True),
                                   nn.Dropout(dropout))
        self.age = nn.Linear(hidden, AGE_BINS)
        self.gender = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Activations at ``cut`` -> (age logits (N, 101), gender logit (N,))."""
        h = self.trunk(self.tail(x))
        return self.age(h), self.gender(h).squeeze(1)


def expected_age(age_logits: torch.Tensor) -> torch.Tensor:
    ages = torch.arange(AGE_BINS, dtype=age_logits.dtype, device=age_logits.device)
    return (age_logits.softmax(dim=1) * ages).sum(dim=1)
