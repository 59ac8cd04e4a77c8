"""Losses for training face embedders.

- ``ArcFaceHead`` / ``CosFaceHead``: margin softmax heads (one learned, unit-norm class
  centre per identity). They return logits; the trainer applies cross-entropy.
  ArcFace (Deng et al. 2019) adds an angular margin m to the target angle,
  CosFace (Wang et al. 2018) subtracts m from the target cosine; both scale by s.
- ``SimilarityDistillationLoss``: teaches a student the teacher's geometry when the two
  embedding spaces have different sizes (our 512-d vs dlib's 128-d): a learned linear
  projection student -> teacher space pulled onto the teacher's direction (cosine), plus
  the batch's pairwise cosine-similarity matrix matched to the teacher's (MSE), which is
  what a search index actually uses.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MarginHead(nn.Module):
    """Shared part of ArcFace and CosFace: normalised class centres and cosine logits."""

    def __init__(self, embedding_dim: int, num_classes: int, scale: float, margin: float) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a margin head needs at least 2 classes, got {num_classes}")
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.normal_(self.weight, std=0.01)
        self.scale = float(scale)
        self.margin = float(margin)

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        # float32 even under autocast: margins on fp16 cosines near +-1 are unstable
        return F.linear(F.normalize(embeddings.float(), dim=1), F.normalize(self.weight.float(), dim=1))

    def _target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scaled logits with the margin applied to each sample's own class."""
        cos = self.cosine(embeddings)
        onehot = F.one_hot(labels, cos.shape[1]).bool()
        target = self._target_logit(cos[onehot])
        logits = cos.masked_scatter(onehot, target)
        return logits * self.scale


class ArcFaceHead(MarginHead):
    """cos(theta + m) for the target class, with the usual fallback past pi - m."""

    def __init__(self, embedding_dim: int, num_classes: int, scale: float = 32.0, margin: float = 0.5) -> None:
        super().__init__(embedding_dim, num_classes, scale, margin)
        self.cos_m = math.cos(margin)
        self.sin_m = math.sin(margin)
        # past theta = pi - m, cos(theta + m) stops decreasing; use a linear penalty instead
        self.threshold = math.cos(math.pi - margin)
        self.fallback = math.sin(math.pi - margin) * margin

    def _target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        cos_target = cos_target.clamp(-1.0 + 1e-7, 1.0 - 1e-7)
        sin_target = torch.sqrt(1.0 - cos_target * cos_target)
        phi = cos_target * self.cos_m - sin_target * self.sin_m
        return torch.where(cos_target > self.threshold, phi, cos_target - self.fallback)


class CosFaceHead(MarginHead):
    """cos(theta) - m for the target class."""

    def __init__(self, embedding_dim: int, num_classes: int, scale: float = 32.0, margin: float = 0.35) -> None:
        super().__init__(embedding_dim, num_classes, scale, margin)

    def _target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        return cos_target - self.margin


def make_margin_head(
    kind: str, embedding_dim: int, num_classes: int, scale: float = 32.0, margin: float | None = None
) -> MarginHead:
    """``kind`` is "arcface" (default margin 0.5) or "cosface" (default margin 0.35)."""
    kind = kind.lower()
    if kind == "arcface":
        return ArcFaceHead(embedding_dim, num_classes, scale, 0.5 if margin is None else margin)
    if kind == "cosface":
        return CosFaceHead(embedding_dim, num_classes, scale, 0.35 if margin is None else margin)
    raise ValueError(f"unknown margin loss {kind!r}: use 'arcface' or 'cosface'")


def similarity_matrix(x: torch.Tensor) -> torch.Tensor:
    x = F.normalize(x.float(), dim=1)
    return x @ x.T


class SimilarityDistillationLoss(nn.Module):
    """loss = (1 - cos(P s, t)).mean() + pair_weight * MSE(offdiag S(s), offdiag S(t)).

    ``P`` is a learned linear map student_dim -> teacher_dim (trained with the student,
    discarded afterwards). ``S(x)`` is the batch's cosine-similarity matrix; the diagonal
    (always 1) is left out. Teacher vectors should be centred by the trainer first
    (dlib's raw vectors all point roughly the same way, so their cosines are squeezed
    into a narrow band that would be a poor target for the student's own space).
    """

    def __init__(self, student_dim: int, teacher_dim: int, pair_weight: float = 1.0, direct_weight: float = 1.0) -> None:
        super().__init__()
        self.projection = nn.Linear(student_dim, teacher_dim, bias=False)
        self.pair_weight = float(pair_weight)
        self.direct_weight = float(direct_weight)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> dict[str, torch.Tensor]:
        student = student.float()
        teacher = teacher.float()
        direct = (1.0 - F.cosine_similarity(self.projection(student), teacher, dim=1)).mean()
        n = student.shape[0]
        if n > 1:
            off = ~torch.eye(n, dtype=torch.bool, device=student.device)
            pair = F.mse_loss(similarity_matrix(student)[off], similarity_matrix(teacher)[off])
        else:
            pair = student.new_zeros(())
        total = self.direct_weight * direct + self.pair_weight * pair
        return {"loss": total, "direct": direct.detach(), "pair": pair.detach()}
