"""Train our ResNet50 face embedder on aligned chips.

Two stages, either of which can be skipped (0 epochs):

1. **Distillation** from precomputed teacher embeddings (dlib's 128-d vectors of the very
   same chips): ``SimilarityDistillationLoss``. Needs no identity labels, so every chip
   the detector found is usable, and the student starts from the teacher's geometry.
2. **Margin fine-tuning** (ArcFace or CosFace) on identity labels, optionally keeping a
   smaller distillation term so a small labelled set cannot drag the space far away.

The train/val split is identity-disjoint and seeded (returned in the result). After
every epoch the model is validated on the val identities: verification accuracy on
generated same/different pairs (threshold picked on one half of the pairs, measured on
the other, both ways, averaged) and leave-one-out rank-1. The teacher gets the same
validation once, as the baseline to beat. Checkpoints (fp16, ``ResNet50Embedder``
format) go to ``output_dir``: ``last.pt`` and ``best.pt`` (the epoch with the best val
accuracy, across both stages) every ``save_every`` epochs and at the end of each stage.
``time_limit_min`` bounds the wall-clock time (the LR schedule follows the clock, so a
cut-short run still ends annealed). AMP (bf16) and channels_last on CUDA, fp32 on CPU.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
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
    teacher_metrics: dict[str, float]  #: the teacher on the same val pairs (the bar to clear)
    history: list[dict[str, Any]]
    split: dict[str, Any]
    stopped: bool
    seconds: float
    device: str


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
) -> EmbedderTrainResult:
    """Train (see module docstring). ``chips_or_dataset`` is a ``ChipSet`` or a chip
    ``.npz`` path; ``teacher_embeddings`` overrides the set's own teacher vectors.

    ``on_progress(event)`` gets dicts with ``kind`` "step" / "epoch" / "info";
    ``should_stop()`` is polled every step and ends training early (the result then
    has ``stopped=True`` and the best checkpoint written so far, if any).
    """
    t_start = time.monotonic()
    cs = chips_or_dataset if isinstance(chips_or_dataset, ChipSet) else load_chipset(chips_or_dataset)
    teacher = teacher_embeddings if teacher_embeddings is not None else cs.teacher
    if teacher is not None:
        teacher = np.asarray(teacher, dtype=np.float32)
        if len(teacher) != len(cs):
            raise ValueError(f"{len(teacher)} teacher embeddings for {len(cs)} chips")
    emit = on_progress or (lambda event: None)
    stop = should_stop or (lambda: False)
    device = _resolve_device(config.device)
    use_amp = bool(config.amp and device.type == "cuda")
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out_dir = Path(config.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # ---- identity-disjoint split
    train_idx, val_idx, train_ids, val_ids = identity_split(cs.labels, config.val_fraction, config.seed)
    split = {
        "seed": config.seed,
        "val_fraction": config.val_fraction,
        "train_identities": [cs.identities[i] for i in train_ids],
        "val_identities": [cs.identities[i] for i in val_ids],
        "train_chips": int(len(train_idx)),
        "val_chips": int(len(val_idx)),
    }
    val_labels = cs.labels[val_idx]
    pairs = make_pairs(val_labels, config.val_pairs, config.seed)
    val_chips = cs.chips[val_idx]
    teacher_metrics: dict[str, float] = {}
    if teacher is not None and len(pairs):
        teacher_metrics = evaluate_embeddings(teacher[val_idx], val_labels, pairs)
    emit({"kind": "info", "split": {k: v for k, v in split.items() if not k.endswith("identities")},
          "val_pairs": int(len(pairs)), "teacher_metrics": teacher_metrics, "device": str(device)})

    # ---- model
    meta: dict[str, Any] = {
        **DEFAULT_META,
        "embedding_dim": config.embedding_dim,
        "input_size": config.input_size,
        "chip_padding": config.chip_padding,
        "mean": list(config.mean),
        "std": list(config.std),
        "dropout": config.dropout,
    }
    net: ResNet50EmbeddingNet = build_net(meta)
    if config.init_checkpoint is not None:
        state, init_meta = load_checkpoint(config.init_checkpoint)
        for key in ("embedding_dim", "input_size", "mean", "std"):
            if init_meta[key] != meta[key]:
                raise ValueError(f"init checkpoint has {key}={init_meta[key]}, config says {meta[key]}")
        net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    net.to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    mean = torch.tensor(config.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(config.std, device=device).view(1, 3, 1, 1)

    workers = config.num_workers
    if workers is None:
        workers = 0 if device.type == "cpu" else max(0, min(12, (os.cpu_count() or 2) - 2))
    transform = build_train_transform(config.augment, config.input_size)

    def loader(index: np.ndarray, targets: np.ndarray, tvec: np.ndarray | None) -> DataLoader:
        ds = _ChipDataset(cs.chips[index], targets, tvec, transform)
        bs = min(config.batch_size, len(ds))
        g = torch.Generator()
        g.manual_seed(config.seed)
        return DataLoader(ds, batch_size=bs, shuffle=True, drop_last=True, num_workers=workers,
                          pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                          worker_init_fn=_seed_worker, generator=g)

    history: list[dict[str, Any]] = []
    best_acc = -1.0
    best_metrics: dict[str, float] = {}
    best_path, last_path = out_dir / "best.pt", out_dir / "last.pt"
    wrote_best = wrote_last = False
    best: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None
    last_meta: dict[str, Any] | None = None
    saved_epoch = 0

    def flush() -> None:
        nonlocal wrote_best, wrote_last, saved_epoch
        if last_meta is None or saved_epoch == global_epoch:
            return
        save_checkpoint(net, last_meta, last_path)
        wrote_last = True
        if best is not None:
            save_checkpoint(best[0], best[1], best_path)
            wrote_best = True
        saved_epoch = global_epoch

    stopped = False
    global_epoch = 0

    # centred, unit-length teacher targets (see SimilarityDistillationLoss)
    teacher_targets = None
    if teacher is not None:
        centre = teacher[train_idx].mean(axis=0, keepdims=True) if config.center_teacher else 0.0
        teacher_targets = teacher - centre
        teacher_targets /= np.maximum(np.linalg.norm(teacher_targets, axis=1, keepdims=True), 1e-12)
        meta["teacher_centre_applied"] = bool(config.center_teacher)

    stages: list[tuple[str, int]] = []
    if config.distill_epochs > 0:
        if teacher_targets is None:
            raise ValueError("distill_epochs > 0 needs teacher embeddings (set distill_epochs=0 to skip)")
        stages.append(("distill", config.distill_epochs))
    if config.margin_epochs > 0:
        stages.append(("margin", config.margin_epochs))
    if not stages:
        raise ValueError("nothing to train: distill_epochs and margin_epochs are both 0")

    for stage, epochs in stages:
        distill = None
        head = None
        if stage == "distill":
            dl = loader(train_idx, cs.labels[train_idx], teacher_targets[train_idx])
            distill = SimilarityDistillationLoss(config.embedding_dim, teacher_targets.shape[1],
                                                 config.distill_pair_weight).to(device)
            params = list(net.parameters()) + list(distill.parameters())
            lr = config.lr
        else:
            lab = cs.labels[train_idx]
            ids, counts = np.unique(lab[lab >= 0], return_counts=True)
            keep_ids = ids[counts >= config.min_images_per_class]
            if len(keep_ids) < 2:
                raise ValueError(f"margin stage needs 2+ training identities with {config.min_images_per_class}+ chips")
            remap = {int(old): new for new, old in enumerate(keep_ids)}
            sel = train_idx[np.isin(lab, keep_ids)]
            targets = np.asarray([remap[int(v)] for v in cs.labels[sel]], dtype=np.int64)
            use_distill = teacher_targets is not None and config.stage2_distill_weight > 0
            dl = loader(sel, targets, teacher_targets[sel] if use_distill else None)
            head = make_margin_head(config.margin_loss, config.embedding_dim, len(keep_ids),
                                    config.margin_scale, config.margin).to(device)
            params = list(net.parameters()) + list(head.parameters())
            if use_distill:
                distill = SimilarityDistillationLoss(config.embedding_dim, teacher_targets.shape[1],
                                                     config.distill_pair_weight).to(device)
                params += list(distill.parameters())
            lr = config.margin_lr or config.lr / 2
            emit({"kind": "info", "stage": stage, "classes": int(len(keep_ids)), "chips": int(len(sel))})

        steps_per_epoch = len(dl) if config.max_steps_per_epoch is None else min(len(dl), config.max_steps_per_epoch)
        if steps_per_epoch == 0:
            raise ValueError(f"stage {stage}: no full batch of training chips")
        total = steps_per_epoch * epochs
        budget_s = None
        if config.time_limit_min is not None:
            share = epochs / sum(e for _, e in stages)
            budget_s = config.time_limit_min * 60.0 * share
        opt = _adamw(params, lr, config.weight_decay)
        step = 0
        stage_t0 = time.monotonic()
        stage_done = False
        for epoch in range(epochs):
            net.train()
            t_epoch = time.monotonic()
            sums: dict[str, float] = {}
            n_batches = 0
            for x, y, t in dl:
                if n_batches >= steps_per_epoch:
                    break
                if stop():
                    stopped = True
                    break
                progress = step / total
                if budget_s is not None:
                    progress = max(progress, (time.monotonic() - stage_t0) / budget_s)
                if progress >= 1.0:
                    stage_done = True  # time share spent: the LR has already reached 0
                    break
                for g in opt.param_groups:
                    g["lr"] = lr * _lr_factor(progress, config.warmup_fraction)
                x = x.to(device, non_blocking=True)
                if device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                x = (x.float().div_(255.0) - mean) / std
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    emb = net(x)
                parts: dict[str, torch.Tensor] = {}
                if head is not None:
                    logits = head(emb, y.to(device))
                    parts["margin"] = F.cross_entropy(logits, y.to(device))
                if distill is not None:
                    d = distill(emb, t.to(device, non_blocking=True))
                    w = 1.0 if stage == "distill" else config.stage2_distill_weight
                    parts["distill"] = w * d["loss"]
                    parts["pair"] = d["pair"]
                loss = sum(v for k, v in parts.items() if k != "pair")
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss at {stage} epoch {epoch + 1} step {step}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(params, 5.0)
                opt.step()
                step += 1
                n_batches += 1
                sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                if step % config.log_every == 0:
                    emit({"kind": "step", "stage": stage, "epoch": epoch + 1, "epochs": epochs, "step": n_batches,
                          "steps": steps_per_epoch, "loss": float(loss.detach()), "lr": opt.param_groups[0]["lr"]})
            if n_batches == 0:
                break
            global_epoch += 1
            row: dict[str, Any] = {"stage": stage, "epoch": epoch + 1, "global_epoch": global_epoch,
                                   "steps": n_batches, "train_s": time.monotonic() - t_epoch,
                                   "lr_end": opt.param_groups[0]["lr"]}
            row.update({f"train_{k}": v / n_batches for k, v in sums.items()})
            if len(pairs):
                emb_val = embed_chip_array(net, val_chips, meta, device, batch_size=max(64, config.batch_size),
                                           amp=use_amp)
                row.update(evaluate_embeddings(emb_val, val_labels, pairs))
            history.append(row)
            ckpt_meta = {**meta, "training": {"config": config.to_dict(), "stage": stage, "epoch": epoch + 1,
                                              "global_epoch": global_epoch, "metrics": _floats(row),
                                              "teacher_metrics": teacher_metrics, "data": _jsonable(cs.meta),
                                              "split_seed": config.seed, "train_chips": split["train_chips"],
                                              "val_identities": len(val_ids), "torch": str(torch.__version__)}}
            acc = float(row.get("val_acc", -1.0))
            if not len(pairs) or acc > best_acc:
                # keep the best weights in memory; writing 50 MB every epoch would cost
                # more than a short GPU epoch
                best_acc = acc
                best_metrics = _floats(row)
                best = ({k: v.detach().clone() for k, v in net.state_dict().items()}, ckpt_meta)
            last_meta = ckpt_meta
            if global_epoch % config.save_every == 0:
                flush()
            emit({"kind": "epoch", **_floats(row), "stage": stage, "best_val_acc": best_acc})
            if stopped or stage_done:
                break
        flush()  # every stage ends with both files on disk
        if stopped:
            break

    return EmbedderTrainResult(
        checkpoint=best_path if wrote_best else None,
        last_checkpoint=last_path if wrote_last else None,
        best_metrics=best_metrics,
        teacher_metrics=teacher_metrics,
        history=history,
        split=split,
        stopped=stopped,
        seconds=time.monotonic() - t_start,
        device=str(device),
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
