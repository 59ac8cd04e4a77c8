"""Train our ResNet50 face embedder on aligned chips.

Two stages, either of which can be skipped (0 epochs):

1. **Distillation** from precomputed teacher embeddings (dlib's 128-d vectors of the very
   same chips): ``SimilarityDistillationLoss``. Needs no identity labels, so every chip
   the detector found is usable, and the student starts from the teacher's geometry.
2. **Margin fine-tuning** (ArcFace or CosFace) on identity labels, optionally keeping a
   smaller distillation term so a small labelled set cannot drag the space far away.

The trainer gets a training set and a *select* set of other people (identity-disjoint;
split off the training chips by identity when the caller passes none). After every
epoch the model is validated on the select people: verification accuracy on generated
same/different pairs (threshold picked on one half of the pairs, measured on the other,
both ways, averaged) and leave-one-out rank-1. The teacher gets the same validation
once, as the baseline to beat. The select set picks the best epoch, so it is not a fair
place to compare the result with anything: callers keep a test set the trainer never
sees (``pipeline.training.jobs``). Checkpoints (fp16, ``ResNet50Embedder`` format) go to
``output_dir``: ``last.pt`` and ``best.pt`` (the epoch with the best select accuracy,
across both stages) every ``save_every`` epochs and at the end of each stage.
``time_limit_min`` bounds the wall-clock time (the LR schedule follows the clock, so a
cut-short run still ends annealed). AMP (bf16) and channels_last on CUDA, fp32 on CPU.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from models.embedders.resnet50 import (
    DEFAULT_META,
    ResNet50EmbeddingNet,
    build_net,
    embed_chip_array,
    load_checkpoint,
    save_checkpoint,
)
from models.training.augment import AugmentConfig, build_train_transform, hwc_to_chw
from models.training.chip_data import ChipSet, identity_split, load_chipset
from models.training.losses import SimilarityDistillationLoss, make_margin_head

ProgressFn = Callable[[dict], None]


@dataclass
class EmbedderTrainConfig:
    output_dir: Path | str = "runs/embedder"
    embedding_dim: int = 512
    input_size: int = 112
    chip_padding: float = 0.25  #: must match the padding the chips were aligned with
    dropout: float = 0.0
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    #: stage 1
    distill_epochs: int = 20
    distill_pair_weight: float = 1.0
    center_teacher: bool = True
    #: stage 2
    margin_epochs: int = 20
    margin_loss: str = "arcface"  #: "arcface" or "cosface"
    margin: float | None = None  #: None: 0.5 (ArcFace) / 0.35 (CosFace)
    margin_scale: float = 32.0
    min_images_per_class: int = 2  #: identities with fewer labelled chips are left out of stage 2
    stage2_distill_weight: float = 0.5  #: keep this much distillation in stage 2 (0 = off)
    #: optimisation
    batch_size: int = 256
    lr: float = 2e-3
    margin_lr: float | None = None  #: None = lr / 2 (the backbone is already trained by then)
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    max_steps_per_epoch: int | None = None  #: cap for quick runs (tests, UI previews)
    #: wall-clock budget for all training; each stage gets a share proportional to its
    #: epochs, its LR schedule runs on max(step progress, time progress), and the stage
    #: ends (annealed, validated, saved) when its share is spent. None: epochs only.
    time_limit_min: float | None = None
    #: data
    val_fraction: float = 0.1
    val_pairs: int = 3000
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int = 0
    #: hardware
    device: str | None = None  #: None: cuda when available
    amp: bool = True  #: bf16 autocast on CUDA (ignored on CPU)
    num_workers: int | None = None  #: None: 0 on CPU, min(12, cores - 2) on CUDA
    init_checkpoint: Path | str | None = None  #: continue from an existing embedder checkpoint
    log_every: int = 20
    save_every: int = 5  #: write last.pt/best.pt every N epochs (and always at a stage's end)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["output_dir"] = str(self.output_dir)
        d["init_checkpoint"] = None if self.init_checkpoint is None else str(self.init_checkpoint)
        d["augment"] = self.augment.to_dict()
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


@dataclass
class EmbedderTrainResult:
    checkpoint: Path | None  #: best.pt (None if no epoch finished)
    last_checkpoint: Path | None
    best_metrics: dict[str, float]
    teacher_metrics: dict[str, float]  #: the teacher on the same select pairs (the bar to clear)
    history: list[dict[str, Any]]
    split: dict[str, Any]
    stopped: bool
    seconds: float
    device: str
    #: sources of the chips each step actually received (``ChipSet.sources``): the record
    #: that lets a caller check no test chip trained or selected anything
    trained_on: list[str] = field(default_factory=list)
    selected_on: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- evaluation


def make_pairs(labels: np.ndarray, n_pairs: int, seed: int) -> np.ndarray:
    """(M,3) int array of (i, j, same) with about half same-identity pairs."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    by_id: dict[int, np.ndarray] = {}
    for lab in np.unique(labels):
        by_id[int(lab)] = np.flatnonzero(labels == lab)
    multi = [idx for idx in by_id.values() if len(idx) >= 2]
    if not multi or len(by_id) < 2:
        return np.zeros((0, 3), dtype=np.int64)
    half = n_pairs // 2
    pos = set()
    for _ in range(half * 20):
        if len(pos) >= half:
            break
        idx = multi[rng.integers(len(multi))]
        i, j = rng.choice(idx, 2, replace=False)
        pos.add((int(min(i, j)), int(max(i, j))))
    neg = set()
    n = len(labels)
    for _ in range(half * 20):
        if len(neg) >= len(pos):
            break
        i, j = rng.integers(n, size=2)
        if labels[i] != labels[j]:
            neg.add((int(min(i, j)), int(max(i, j))))
    rows = [(i, j, 1) for i, j in sorted(pos)] + [(i, j, 0) for i, j in sorted(neg)]
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)


def _best_threshold(sims: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """Threshold (midpoint between sorted scores) maximising accuracy, and that accuracy."""
    order = np.argsort(sims)
    s, y = sims[order], same[order]
    # predicting "same" for everything above position k: correct = negatives below + positives above
    neg_below = np.concatenate([[0], np.cumsum(y == 0)])
    pos_above = np.concatenate([np.cumsum((y == 1)[::-1])[::-1], [0]])
    correct = neg_below + pos_above
    k = int(np.argmax(correct))
    if k == 0:
        thr = s[0] - 1e-6
    elif k == len(s):
        thr = s[-1] + 1e-6
    else:
        thr = (s[k - 1] + s[k]) / 2.0
    return float(thr), float(correct[k] / len(s))


def verification_metrics(emb: np.ndarray, pairs: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Pair accuracy with a threshold chosen on held-out halves (honest), plus the
    optimistic best-threshold accuracy and the threshold itself."""
    if len(pairs) < 4:
        return {}
    e = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    sims = np.sum(e[pairs[:, 0]] * e[pairs[:, 1]], axis=1)
    same = pairs[:, 2]
    perm = np.random.default_rng(seed).permutation(len(pairs))
    a, b = perm[: len(perm) // 2], perm[len(perm) // 2 :]
    accs = []
    for fit, test in ((a, b), (b, a)):
        thr, _ = _best_threshold(sims[fit], same[fit])
        accs.append(float(np.mean((sims[test] >= thr) == (same[test] == 1))))
    thr_all, best = _best_threshold(sims, same)
    return {"val_acc": float(np.mean(accs)), "val_acc_best_thr": best, "val_threshold": thr_all,
            "val_pos_sim": float(sims[same == 1].mean()), "val_neg_sim": float(sims[same == 0].mean())}


def rank1_accuracy(emb: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out nearest neighbour (cosine) accuracy over chips whose identity has 2+."""
    labels = np.asarray(labels)
    _, inv, counts = np.unique(labels, return_inverse=True, return_counts=True)
    queries = np.flatnonzero(counts[inv] >= 2)
    if len(queries) == 0:
        return float("nan")
    e = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    hits = 0
    for start in range(0, len(queries), 1024):
        q = queries[start : start + 1024]
        sims = e[q] @ e.T
        sims[np.arange(len(q)), q] = -np.inf
        hits += int(np.sum(labels[np.argmax(sims, axis=1)] == labels[q]))
    return hits / len(queries)


def evaluate_embeddings(emb: np.ndarray, labels: np.ndarray, pairs: np.ndarray) -> dict[str, float]:
    out = verification_metrics(emb, pairs)
    out["val_rank1"] = rank1_accuracy(emb, labels)
    return out


# ----------------------------------------------------------------------------- data


class _ChipDataset(Dataset):
    """Augmented uint8 chips with their class index (or -1) and teacher vector (or 0s)."""

    def __init__(self, chips: np.ndarray, targets: np.ndarray, teacher: np.ndarray | None, transform) -> None:
        self.chips = chips
        self.targets = np.asarray(targets, dtype=np.int64)
        self.teacher = teacher
        self.transform = transform

    def __len__(self) -> int:
        return len(self.chips)

    def __getitem__(self, i: int):
        x = self.transform(hwc_to_chw(self.chips[i]))
        t = torch.from_numpy(self.teacher[i]) if self.teacher is not None else torch.zeros(0)
        return x, int(self.targets[i]), t


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)


# ----------------------------------------------------------------------------- training


def _lr_factor(progress: float, warmup_fraction: float) -> float:
    """Linear warmup over the first ``warmup_fraction`` of progress, then cosine to 0."""
    progress = min(max(progress, 0.0), 1.0)
    if warmup_fraction > 0 and progress < warmup_fraction:
        return max(progress / warmup_fraction, 1e-3)
    rest = (progress - warmup_fraction) / max(1e-9, 1.0 - warmup_fraction)
    return 0.5 * (1.0 + math.cos(math.pi * rest))


def _adamw(params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with the fused kernel where this torch build has it (CPU and CUDA): one
    kernel for all 25M parameters instead of a Python loop over 300 tensors."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _resolve_device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def train_embedder(
    config: EmbedderTrainConfig,
    chips_or_dataset: ChipSet | Path | str,
    teacher_embeddings: np.ndarray | None = None,
    on_progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    select: ChipSet | None = None,
) -> EmbedderTrainResult:
    """Train (see module docstring). ``chips_or_dataset`` is a ``ChipSet`` or a chip
    ``.npz`` path; ``teacher_embeddings`` overrides the set's own teacher vectors.

    ``select``: the chips that choose the best epoch (people who are not in the training
    set). None: split them off ``chips_or_dataset`` by identity (``config.val_fraction``);
    a caller that keeps a test split of its own passes train and select explicitly, so
    the trainer never sees the test chips.

    ``on_progress(event)`` gets dicts with ``kind`` "step" / "epoch" / "info";
    ``should_stop()`` is polled every step and ends training early (the result then
    has ``stopped=True`` and the best checkpoint written so far, if any).
    """
    cs = chips_or_dataset if isinstance(chips_or_dataset, ChipSet) else load_chipset(chips_or_dataset)
    if teacher_embeddings is not None:
        if len(teacher_embeddings) != len(cs):
            raise ValueError(f"{len(teacher_embeddings)} teacher embeddings for {len(cs)} chips")
        cs = replace(cs, teacher=np.asarray(teacher_embeddings, dtype=np.float32))
    if select is None:
        train_idx, select_idx, _, _ = identity_split(cs.labels, config.val_fraction, config.seed)
        cs, select = cs.subset(train_idx), cs.subset(select_idx)
    return EmbedderTrainer(config, cs, select, on_progress, should_stop).run()


@dataclass
class _Stage:
    """One training stage, ready to run: its data, losses, parameters and budget."""

    name: str  #: "distill" or "margin"
    epochs: int
    loader: DataLoader
    params: list[nn.Parameter]
    lr: float
    steps_per_epoch: int
    head: nn.Module | None = None
    distill: nn.Module | None = None
    budget_s: float | None = None  #: this stage's share of the time limit


class _Checkpoints:
    """best.pt / last.pt: the best epoch's weights are kept in memory (writing 50 MB every
    epoch would cost more than a short GPU epoch) and written every ``save_every`` epochs
    and at the end of each stage."""

    def __init__(self, out_dir: Path, save_every: int) -> None:
        self.best_path, self.last_path = out_dir / "best.pt", out_dir / "last.pt"
        self.save_every = save_every
        self.best_acc = -1.0
        self.best_metrics: dict[str, float] = {}
        self._best: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None
        self._last_meta: dict[str, Any] | None = None
        self._saved_epoch = 0
        self.wrote_best = self.wrote_last = False

    def epoch_done(self, net: nn.Module, row: dict[str, Any], meta: dict[str, Any], global_epoch: int,
                   can_select: bool) -> None:
        acc = float(row.get("val_acc", -1.0))
        if not can_select or acc > self.best_acc:
            self.best_acc = acc
            self.best_metrics = _floats(row)
            self._best = ({k: v.detach().clone() for k, v in net.state_dict().items()}, meta)
        self._last_meta = meta
        if global_epoch % self.save_every == 0:
            self.flush(net, global_epoch)

    def flush(self, net: nn.Module, global_epoch: int) -> None:
        if self._last_meta is None or self._saved_epoch == global_epoch:
            return
        save_checkpoint(net, self._last_meta, self.last_path)
        self.wrote_last = True
        if self._best is not None:
            save_checkpoint(self._best[0], self._best[1], self.best_path)
            self.wrote_best = True
        self._saved_epoch = global_epoch


class EmbedderTrainer:
    """The steps of a run, in the order ``run`` calls them (as ultralytics splits its
    trainer): device, selection data, model, teacher targets, stages; then per stage
    ``train_epoch`` and ``validate`` until its epochs or its time share are spent."""

    def __init__(self, config: EmbedderTrainConfig, train: ChipSet, select: ChipSet,
                 on_progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None) -> None:
        self.config = config
        self.train_set, self.select_set = train, select
        self.emit = on_progress or (lambda event: None)
        self.stop = should_stop or (lambda: False)
        self.history: list[dict[str, Any]] = []
        self.global_epoch = 0
        self.stopped = False
        self.trained_on: set[str] = set()

    # -- setup -----------------------------------------------------------------------
    def setup_device(self) -> None:
        cfg = self.config
        self.device = _resolve_device(cfg.device)
        self.use_amp = bool(cfg.amp and self.device.type == "cuda")  # bf16 on CPU is emulated on most CPUs
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.out_dir = Path(cfg.output_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def setup_selection(self) -> None:
        """Same/different pairs among the select chips, and the teacher measured on them
        (the bar the student has to clear)."""
        cfg, sel, tr = self.config, self.select_set, self.train_set
        train_ids = sorted({int(v) for v in tr.labels if v >= 0})
        select_ids = sorted({int(v) for v in sel.labels if v >= 0})
        overlap = set(train_ids) & set(select_ids)
        if overlap:
            raise ValueError(f"{len(overlap)} people are in both the training and the select chips")
        self.pairs = make_pairs(sel.labels, cfg.val_pairs, cfg.seed)
        self.teacher_metrics: dict[str, float] = {}
        if sel.teacher is not None and len(self.pairs):
            self.teacher_metrics = evaluate_embeddings(np.asarray(sel.teacher, np.float32), sel.labels, self.pairs)
        self.split = {
            "seed": cfg.seed,
            "train_identities": [tr.identities[i] for i in train_ids],
            "select_identities": [sel.identities[i] for i in select_ids],
            "train_chips": int(len(tr)),
            "select_chips": int(len(sel)),
            "select_pairs": int(len(self.pairs)),
        }
        self.emit({"kind": "info", "split": {k: v for k, v in self.split.items() if not k.endswith("identities")},
                   "teacher_metrics": self.teacher_metrics, "device": str(self.device)})

    def build_model(self) -> None:
        cfg = self.config
        self.meta: dict[str, Any] = {
            **DEFAULT_META, "embedding_dim": cfg.embedding_dim, "input_size": cfg.input_size,
            "chip_padding": cfg.chip_padding, "mean": list(cfg.mean), "std": list(cfg.std), "dropout": cfg.dropout,
        }
        net: ResNet50EmbeddingNet = build_net(self.meta)
        if cfg.init_checkpoint is not None:  # fine-tuning: load_checkpoint reads with weights_only=True
            state, init_meta = load_checkpoint(cfg.init_checkpoint)
            for key in ("embedding_dim", "input_size", "mean", "std"):
                if init_meta[key] != self.meta[key]:
                    raise ValueError(f"init checkpoint has {key}={init_meta[key]}, config says {self.meta[key]}")
            net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        net.to(self.device)
        if self.device.type == "cuda":
            net = net.to(memory_format=torch.channels_last)
        self.net = net
        self.mean = torch.tensor(cfg.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.std, device=self.device).view(1, 3, 1, 1)
        workers = cfg.num_workers
        if workers is None:
            workers = 0 if self.device.type == "cpu" else max(0, min(12, (os.cpu_count() or 2) - 2))
        self.workers = workers
        self.transform = build_train_transform(cfg.augment, cfg.input_size)

    def setup_teacher_targets(self) -> None:
        """Centred, unit-length teacher targets of the training chips (see
        SimilarityDistillationLoss); the centre comes from the training chips only."""
        teacher = self.train_set.teacher
        self.teacher_targets = None
        if teacher is None:
            return
        teacher = np.asarray(teacher, dtype=np.float32)
        centre = teacher.mean(axis=0, keepdims=True) if self.config.center_teacher else 0.0
        targets = teacher - centre
        targets /= np.maximum(np.linalg.norm(targets, axis=1, keepdims=True), 1e-12)
        self.teacher_targets = targets
        self.meta["teacher_centre_applied"] = bool(self.config.center_teacher)

    def plan_stages(self) -> list[tuple[str, int]]:
        cfg = self.config
        stages: list[tuple[str, int]] = []
        if cfg.distill_epochs > 0:
            if self.teacher_targets is None:
                raise ValueError("distill_epochs > 0 needs teacher embeddings (set distill_epochs=0 to skip)")
            stages.append(("distill", cfg.distill_epochs))
        if cfg.margin_epochs > 0:
            stages.append(("margin", cfg.margin_epochs))
        if not stages:
            raise ValueError("nothing to train: distill_epochs and margin_epochs are both 0")
        return stages

    def loader(self, index: np.ndarray, targets: np.ndarray, tvec: np.ndarray | None) -> DataLoader:
        cfg, cs = self.config, self.train_set
        if cs.sources:
            self.trained_on.update(cs.sources[i] for i in index)
        ds = _ChipDataset(cs.chips[index], targets, tvec, self.transform)
        g = torch.Generator()
        g.manual_seed(cfg.seed)
        return DataLoader(ds, batch_size=min(cfg.batch_size, len(ds)), shuffle=True, drop_last=True,
                          num_workers=self.workers, pin_memory=self.device.type == "cuda",
                          persistent_workers=self.workers > 0, worker_init_fn=_seed_worker, generator=g)

    def build_stage(self, name: str, epochs: int, total_epochs: int) -> _Stage:
        cfg, cs, dim = self.config, self.train_set, self.config.embedding_dim
        every = np.arange(len(cs))
        tt = self.teacher_targets
        if name == "distill":
            distill = SimilarityDistillationLoss(dim, tt.shape[1], cfg.distill_pair_weight).to(self.device)
            stage = _Stage(name, epochs, self.loader(every, cs.labels, tt), list(self.net.parameters())
                           + list(distill.parameters()), cfg.lr, 0, distill=distill)
        else:
            ids, counts = np.unique(cs.labels[cs.labels >= 0], return_counts=True)
            keep_ids = ids[counts >= cfg.min_images_per_class]
            if len(keep_ids) < 2:
                raise ValueError(f"margin stage needs 2+ training identities with {cfg.min_images_per_class}+ chips")
            remap = {int(old): new for new, old in enumerate(keep_ids)}
            sel = every[np.isin(cs.labels, keep_ids)]
            targets = np.asarray([remap[int(v)] for v in cs.labels[sel]], dtype=np.int64)
            use_distill = tt is not None and cfg.stage2_distill_weight > 0
            head = make_margin_head(cfg.margin_loss, dim, len(keep_ids), cfg.margin_scale, cfg.margin).to(self.device)
            distill = (SimilarityDistillationLoss(dim, tt.shape[1], cfg.distill_pair_weight).to(self.device)
                       if use_distill else None)
            params = list(self.net.parameters()) + list(head.parameters())
            params += list(distill.parameters()) if distill is not None else []
            stage = _Stage(name, epochs, self.loader(sel, targets, tt[sel] if use_distill else None), params,
                           cfg.margin_lr or cfg.lr / 2, 0, head=head, distill=distill)
            self.emit({"kind": "info", "stage": name, "classes": int(len(keep_ids)), "chips": int(len(sel))})
        n = len(stage.loader)
        stage.steps_per_epoch = n if cfg.max_steps_per_epoch is None else min(n, cfg.max_steps_per_epoch)
        if stage.steps_per_epoch == 0:
            raise ValueError(f"stage {name}: no full batch of training chips")
        if cfg.time_limit_min is not None:
            stage.budget_s = cfg.time_limit_min * 60.0 * epochs / total_epochs
        return stage

    # -- the loop ----------------------------------------------------------------------
    def train_step(self, stage: _Stage, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
                   where: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = x.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        x = (x.float().div_(255.0) - self.mean) / self.std
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
            emb = self.net(x)
        parts: dict[str, torch.Tensor] = {}
        if stage.head is not None:
            labels = y.to(self.device)
            parts["margin"] = F.cross_entropy(stage.head(emb, labels), labels)
        if stage.distill is not None:
            d = stage.distill(emb, t.to(self.device, non_blocking=True))
            weight = 1.0 if stage.name == "distill" else self.config.stage2_distill_weight
            parts["distill"] = weight * d["loss"]
            parts["pair"] = d["pair"]
        loss = sum(v for k, v in parts.items() if k != "pair")
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at {where}")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(stage.params, 5.0)
        self.opt.step()
        return loss, parts

    def train_epoch(self, stage: _Stage, epoch: int) -> tuple[dict[str, float], int, bool]:
        """One pass over the stage's loader: (mean losses, batches run, stage time spent)."""
        cfg = self.config
        self.net.train()
        sums: dict[str, float] = {}
        n_batches = 0
        total = stage.steps_per_epoch * stage.epochs
        for x, y, t in stage.loader:
            if n_batches >= stage.steps_per_epoch:
                break
            if self.stop():
                self.stopped = True
                break
            progress = self.step / total
            if stage.budget_s is not None:
                progress = max(progress, (time.monotonic() - self.stage_t0) / stage.budget_s)
            if progress >= 1.0:
                return sums, n_batches, True  # time share spent: the LR has already reached 0
            for g in self.opt.param_groups:
                g["lr"] = stage.lr * _lr_factor(progress, cfg.warmup_fraction)
            loss, parts = self.train_step(stage, x, y, t, f"{stage.name} epoch {epoch} step {self.step}")
            self.step += 1
            n_batches += 1
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            if self.step % cfg.log_every == 0:
                self.emit({"kind": "step", "stage": stage.name, "epoch": epoch, "epochs": stage.epochs,
                           "step": n_batches, "steps": stage.steps_per_epoch, "loss": float(loss.detach()),
                           "lr": self.opt.param_groups[0]["lr"]})
        return sums, n_batches, False

    def validate(self) -> dict[str, float]:
        """The student on the select chips' pairs (what picks the best epoch)."""
        if not len(self.pairs):
            return {}
        cfg = self.config
        emb = embed_chip_array(self.net, self.select_set.chips, self.meta, self.device,
                               batch_size=max(64, cfg.batch_size), amp=self.use_amp)
        return evaluate_embeddings(emb, self.select_set.labels, self.pairs)

    def checkpoint_meta(self, stage: str, epoch: int, row: dict[str, Any]) -> dict[str, Any]:
        return {**self.meta, "training": {
            "config": self.config.to_dict(), "stage": stage, "epoch": epoch, "global_epoch": self.global_epoch,
            "metrics": _floats(row), "teacher_metrics": self.teacher_metrics, "data": _jsonable(self.train_set.meta),
            "split_seed": self.config.seed, "train_chips": self.split["train_chips"],
            "select_identities": len(self.split["select_identities"]), "torch": str(torch.__version__)}}

    def run_stage(self, stage: _Stage) -> None:
        self.opt = _adamw(stage.params, stage.lr, self.config.weight_decay)
        self.step = 0
        self.stage_t0 = time.monotonic()
        for epoch in range(1, stage.epochs + 1):
            t_epoch = time.monotonic()
            sums, n_batches, spent = self.train_epoch(stage, epoch)
            if n_batches == 0:
                break
            self.global_epoch += 1
            row: dict[str, Any] = {"stage": stage.name, "epoch": epoch, "global_epoch": self.global_epoch,
                                   "steps": n_batches, "train_s": time.monotonic() - t_epoch,
                                   "lr_end": self.opt.param_groups[0]["lr"]}
            row.update({f"train_{k}": v / n_batches for k, v in sums.items()})
            row.update(self.validate())
            self.history.append(row)
            self.checkpoints.epoch_done(self.net, row, self.checkpoint_meta(stage.name, epoch, row),
                                        self.global_epoch, can_select=bool(len(self.pairs)))
            self.emit({"kind": "epoch", **_floats(row), "stage": stage.name, "best_val_acc": self.checkpoints.best_acc})
            if self.stopped or spent:
                break
        self.checkpoints.flush(self.net, self.global_epoch)  # every stage ends with both files on disk

    def run(self) -> EmbedderTrainResult:
        t_start = time.monotonic()
        self.setup_device()
        self.setup_selection()
        self.build_model()
        self.setup_teacher_targets()
        plan = self.plan_stages()
        self.checkpoints = _Checkpoints(self.out_dir, self.config.save_every)
        total_epochs = sum(e for _, e in plan)
        for name, epochs in plan:
            self.run_stage(self.build_stage(name, epochs, total_epochs))
            if self.stopped:
                break
        ck = self.checkpoints
        return EmbedderTrainResult(
            checkpoint=ck.best_path if ck.wrote_best else None,
            last_checkpoint=ck.last_path if ck.wrote_last else None,
            best_metrics=ck.best_metrics,
            teacher_metrics=self.teacher_metrics,
            history=self.history,
            split=self.split,
            stopped=self.stopped,
            seconds=time.monotonic() - t_start,
            device=str(self.device),
            trained_on=sorted(self.trained_on),
            selected_on=list(self.select_set.sources) if len(self.pairs) else [],
        )


def _floats(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in row.items()}


def _jsonable(d: dict) -> dict:
    """Keep only values torch.load(weights_only=True) can read back."""
    out = {}
    for k, v in d.items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float, bool)) for x in v):
            out[k] = list(v)
    return out
