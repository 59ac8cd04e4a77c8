"""A long, resumable distillation of the dlib teacher into our ResNet50 (CPU first).

Made for a shared CPU where one run takes days of one thread: it can be killed at any
moment and resumed to the same state, and it says where it stands (log with loss, speed
and ETA; a quick eval on held-out LFW *train*-identity pairs).

Recipe (defaults in ``DistillConfig``):

* Data: a ``ChipStore`` of aligned 150 px chips made by the app's own path
  (``distill_data``), train split only; the quick-eval people are not in it.
* Teacher: dlib's ResNet, flip-averaged, on the SAME augmented chip the student sees
  ("consistent teaching", ``teacher="online"``), or the stored clean-chip vectors
  (``teacher="stored"``, cheaper, weaker with strong augmentation).
* Student: ``ResNet50EmbeddingNet`` with a 128-d head, the teacher's width, so the
  direct term is a plain cosine to the teacher's vector (no projection to discard) and
  the student's vectors can use the teacher's similarity scale. Input: the 150 px chip
  resized to ``input_size`` (112) by ``chips_to_tensor``, the function inference uses.
* Loss: ``direct_weight`` x (1 - cos(student, teacher)) + ``relation_weight`` x MSE of
  the batch's pairwise cosine matrices (off-diagonal), both sides centred by the
  teacher's mean vector first (dlib's vectors share a large common component that
  squeezes raw cosines into a narrow band) + optional ``margin_weight`` x ArcFace on the
  LFW train-identity chips of the batch.
* Optimiser: AdamW, linear warmup then cosine to 0 over ``epochs`` x the planned number
  of training chips (fixed when the run is created). An EMA of the weights is kept; it
  is usually the better model while the LR is still high.
* Precision: bf16 autocast + channels_last only where the CPU has native bf16
  (``models.cpu_features``); fp32 (+ channels_last) elsewhere.

Resume: ``state.pt`` (model, EMA, optimiser, step, sampler epoch/position, RNG states)
is written atomically every ``checkpoint_minutes`` and on SIGINT/SIGTERM. The LR is a
function of the step, batches are drawn from a permutation seeded by (seed, epoch) and
augmented from a generator seeded by (seed, step), so a resumed run continues exactly
as an uninterrupted one would (tests check bit-identical weights).

The chip store may still be growing while a run trains: each epoch permutes the
training chips present when the epoch starts (its size is saved with the sampler).
"""

from __future__ import annotations

import copy
import json
import math
import random
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.atomic import save_torch_atomically
from models.cpu_features import cpu_native_bf16
from models.embedders.resnet50 import (
    ResNet50EmbeddingNet,
    chips_to_tensor,
    save_checkpoint,
)
from models.evaluation.verification import best_threshold, kfold_accuracy, roc_auc
from models.training.chip_augment import ChipAugmentConfig, augment_batch
from models.training.face_chip_store import ChipStore

STATE_FORMAT = "facelab-distill-state/1"
LogFn = Callable[[str], None]


@dataclass
class DistillConfig:
    data: str = ""  #: chip store folder
    run: str = ""  #: run folder (state, logs)
    input_size: int = 112
    embedding_dim: int = 128
    batch_size: int = 64
    epochs: float = 20.0
    #: training chips the LR schedule is planned for; None: the store's at creation
    planned_train_chips: int | None = None
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_samples: int = 12_800
    direct_weight: float = 1.0
    relation_weight: float = 1.0
    margin_weight: float = 0.0  #: ArcFace on LFW train identities (0 = off)
    margin_min_chips: int = 2
    teacher: str = "online"  #: "online" (augmented chip) | "stored" (clean-chip vectors)
    ema_decay: float = 0.999
    seed: int = 0
    precision: str = "auto"  #: "auto" (bf16 only with native CPU bf16 / CUDA) | "fp32" | "bf16"
    channels_last: bool = True
    grad_clip: float = 5.0
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    augment: ChipAugmentConfig = field(default_factory=ChipAugmentConfig)
    #: runtime knobs (may change between resumes; not part of the recipe)
    threads: int = 1
    checkpoint_minutes: float = 10.0
    eval_every_steps: int = 100  #: ~25 min of one idle core at 112 px; ~6 % of the time
    log_every_steps: int = 5

    RUNTIME_KEYS = ("threads", "checkpoint_minutes", "eval_every_steps", "log_every_steps")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["augment"] = self.augment.to_dict()
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DistillConfig":
        d = dict(d)
        d["augment"] = ChipAugmentConfig.from_dict(d.get("augment"))
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)


# ---------------------------------------------------------------------------- pieces


def lr_at(step: int, cfg: DistillConfig, total_steps: int) -> float:
    """Linear warmup over ``warmup_samples``, then cosine to 0 at ``total_steps``."""
    warm = max(1, cfg.warmup_samples // cfg.batch_size)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total_steps - warm))
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


class EpochSampler:
    """Batches of training-chip positions; an epoch is a permutation seeded by (seed,
    epoch) of the training chips present when it starts. State: epoch, size, position."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.epoch = -1
        self.size = 0
        self.pos = 0
        self._perm: np.ndarray | None = None

    def _permutation(self) -> np.ndarray:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, 0x5A3]))
        return rng.permutation(self.size)

    def next_batch(self, batch: int, available: int) -> np.ndarray:
        """Positions into the training-chip list (drop_last within an epoch)."""
        if self._perm is None and self.epoch >= 0:
            self._perm = self._permutation()
        if self._perm is None or self.pos + batch > self.size:
            if available < batch:
                raise ValueError(f"{available} training chips: fewer than one batch of {batch}")
            self.epoch += 1
            self.size = available
            self.pos = 0
            self._perm = self._permutation()
        out = self._perm[self.pos : self.pos + batch]
        self.pos += batch
        return out

    def epoch_float(self) -> float:
        return max(0, self.epoch) + (self.pos / self.size if self.size else 0.0)

    def state(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "size": self.size, "pos": self.pos}

    def load(self, s: dict[str, int]) -> None:
        self.seed, self.epoch, self.size, self.pos = int(s["seed"]), int(s["epoch"]), int(s["size"]), int(s["pos"])
        self._perm = None


class EMA:
    """Exponential moving average of a module's parameters (buffers are copied)."""

    def __init__(self, net: nn.Module, decay: float) -> None:
        self.net = copy.deepcopy(net).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for e, p in zip(self.net.parameters(), net.parameters()):
            e.mul_(d).add_(p.detach(), alpha=1 - d)
        for e, b in zip(self.net.buffers(), net.buffers()):
            e.copy_(b)


def distill_losses(student: torch.Tensor, teacher: torch.Tensor, centre: torch.Tensor, cfg: DistillConfig) -> dict[str, torch.Tensor]:
    s = F.normalize(student.float(), dim=1)
    t = F.normalize(teacher.float(), dim=1)
    direct = (1.0 - (s * t).sum(dim=1)).mean()
    n = s.shape[0]
    sc = F.normalize(s - centre, dim=1)
    tc = F.normalize(t - centre, dim=1)
    off = ~torch.eye(n, dtype=torch.bool, device=s.device)
    relation = F.mse_loss((sc @ sc.T)[off], (tc @ tc.T)[off]) if n > 1 else s.new_zeros(())
    return {"direct": direct, "relation": relation}


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "gauss": float(np_state[4])}}


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    n = s["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))


def _atomic_torch_save(obj: Any, path: Path) -> None:
    save_torch_atomically(obj, path, keep_previous=True)


def resolve_precision(cfg: DistillConfig, device: torch.device) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    if device.type == "cuda":
        return "bf16"
    return "bf16" if cpu_native_bf16() else "fp32"


# ---------------------------------------------------------------------------- trainer


class DistillRun:
    """One run folder: create it, or resume it, then ``train()`` until done or told to stop."""

    def __init__(self, cfg: DistillConfig, log: LogFn = print, teacher: Any | None = None, device: str = "cpu",
                 writer: bool = True) -> None:
        """``writer=False`` opens an existing run read-only (export or eval from another
        process while the training process runs): its files are left untouched."""
        self.cfg = cfg
        self.writer = writer
        self.log = log
        self.run_dir = Path(cfg.run)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.device = torch.device(device)
        torch.set_num_threads(max(1, cfg.threads))
        self.store = ChipStore(cfg.data)
        self.precision = resolve_precision(cfg, self.device)
        self._teacher = teacher
        self._stop = False

        records = self.store.records()
        self._train_all = np.asarray([r.index for r in records if r.split == "train"], dtype=np.int64)
        self._eval = self._load_eval(records)
        fixed = self._fixed_run_facts(records)
        self.planned_train_chips = int(fixed["planned_train_chips"])
        self.centre = torch.tensor(fixed["teacher_centre"], dtype=torch.float32)
        self.classes: dict[str, int] = fixed.get("classes", {})
        self.labels = np.full(self.store.capacity, -1, dtype=np.int64)
        for r in records:
            if r.split == "train" and r.identity in self.classes:
                self.labels[r.index] = self.classes[r.identity]
        self.total_steps = int(cfg.epochs * self.planned_train_chips) // cfg.batch_size

        torch.manual_seed(cfg.seed)
        self.net = ResNet50EmbeddingNet(cfg.embedding_dim).to(self.device)
        self.margin_head = None
        params = list(self.net.parameters())
        if cfg.margin_weight > 0:
            from models.training.losses import ArcFaceHead

            if len(self.classes) < 2:
                raise ValueError("margin_weight > 0 needs 2+ LFW train identities in the store")
            self.margin_head = ArcFaceHead(cfg.embedding_dim, len(self.classes)).to(self.device)
            params += list(self.margin_head.parameters())
        if cfg.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.params = params
        try:
            self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        except (RuntimeError, TypeError):
            self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.ema = EMA(self.net, cfg.ema_decay)
        self.sampler = EpochSampler(cfg.seed)
        self.step = 0
        self.train_seconds = 0.0
        self.evals: list[dict[str, Any]] = []
        self.state_path = self.run_dir / "state.pt"
        if self.state_path.is_file():
            self._resume()
        else:
            self.log(f"new run {self.run_dir}: {self.total_steps} steps planned "
                     f"({cfg.epochs} epochs x {self.planned_train_chips} chips / batch {cfg.batch_size})")

    # ------------------------------------------------------------------ facts fixed at creation

    def _fixed_run_facts(self, records) -> dict[str, Any]:
        """Schedule length, teacher centre and margin classes: decided once per run and
        kept in ``run.json`` so a resumed run (on a grown store) keeps its recipe."""
        path = self.run_dir / "run.json"
        if not path.is_file() and not self.writer:
            raise FileNotFoundError(f"{path} missing: no run to read in {self.run_dir}")
        if path.is_file():
            facts = json.loads(path.read_text())
            saved = DistillConfig.from_dict(facts["config"]).to_dict()
            now = self.cfg.to_dict()
            changed = [k for k in now if k not in DistillConfig.RUNTIME_KEYS and k not in ("data", "run") and now[k] != saved[k]]
            if changed:
                raise ValueError(f"{self.run_dir} was created with another recipe ({', '.join(changed)}); "
                                 "use a new --run folder or the same options")
            return facts
        train = self._train_all
        if len(train) < self.cfg.batch_size:
            raise ValueError(f"{len(train)} training chips in {self.store.root}: fewer than one batch")
        centre = np.asarray(self.store.teacher[train], dtype=np.float64).mean(axis=0)
        classes: dict[str, int] = {}
        if self.cfg.margin_weight > 0:
            counts: dict[str, int] = {}
            for r in records:
                if r.split == "train" and r.identity:
                    counts[r.identity] = counts.get(r.identity, 0) + 1
            for name in sorted(n for n, c in counts.items() if c >= self.cfg.margin_min_chips):
                classes[name] = len(classes)
        facts = {"config": self.cfg.to_dict(),
                 "planned_train_chips": int(self.cfg.planned_train_chips or len(train)),
                 "train_chips_at_creation": int(len(train)),
                 "teacher_centre": centre.round(7).tolist(), "classes": classes,
                 "store": {k: v for k, v in self.store.info.items() if isinstance(v, (str, int, float))},
                 "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "torch": torch.__version__}
        path.write_text(json.dumps(facts, indent=1) + "\n")
        return facts

    def _load_eval(self, records) -> dict[str, Any] | None:
        path = self.store.root / "eval_pairs.json"
        if not path.is_file():
            return None
        by_file = {r.file: r.index for r in records if r.split == "eval" and r.source == "lfw"}
        pairs = json.loads(path.read_text())["pairs"]
        usable = [p for p in pairs if p["a"] in by_file and p["b"] in by_file]
        if len(usable) < 20:
            return None
        files = sorted({p["a"] for p in usable} | {p["b"] for p in usable})
        pos = {f: i for i, f in enumerate(files)}
        return {"index": np.asarray([by_file[f] for f in files], dtype=np.int64),
                "a": np.asarray([pos[p["a"]] for p in usable]), "b": np.asarray([pos[p["b"]] for p in usable]),
                "same": np.asarray([bool(p["same"]) for p in usable]), "fold": np.asarray([int(p["fold"]) for p in usable]),
                "pairs_total": len(pairs)}

    # ------------------------------------------------------------------ state

    def _state(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "step": self.step, "sampler": self.sampler.state(),
                "model": self.net.state_dict(), "ema": self.ema.net.state_dict(), "ema_updates": self.ema.updates,
                "optimizer": self.opt.state_dict(),
                "margin_head": None if self.margin_head is None else self.margin_head.state_dict(),
                "rng": _rng_state(), "train_seconds": self.train_seconds, "evals": self.evals,
                "saved": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def save(self) -> Path:
        if not self.writer:
            raise PermissionError("run opened read-only (writer=False)")
        _atomic_torch_save(self._state(), self.state_path)
        return self.state_path

    def _resume(self) -> None:
        s = torch.load(self.state_path, map_location=self.device, weights_only=True)
        if s.get("format") != STATE_FORMAT:
            raise ValueError(f"{self.state_path} is not a distillation state ({STATE_FORMAT})")
        self.net.load_state_dict(s["model"])
        self.ema.net.load_state_dict(s["ema"])
        self.ema.updates = int(s["ema_updates"])
        self.opt.load_state_dict(s["optimizer"])
        if self.margin_head is not None and s["margin_head"] is not None:
            self.margin_head.load_state_dict(s["margin_head"])
        self.sampler.load(s["sampler"])
        self.step = int(s["step"])
        self.train_seconds = float(s["train_seconds"])
        self.evals = list(s["evals"])
        _set_rng_state(s["rng"])
        if self.writer:
            self._truncate_metrics(self.step)
        self.log(f"resumed {self.run_dir} at step {self.step}/{self.total_steps} (epoch {self.sampler.epoch_float():.3f}, "
                 f"{self.train_seconds / 3600:.2f} h trained, state from {s['saved']})")

    def _truncate_metrics(self, step: int) -> None:
        """Rows logged after the checkpoint will be logged again: drop them."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if int(row.get("step", 0)) <= step:
                keep.append(line)
        path.write_text("".join(k + "\n" for k in keep))

    def _metric(self, row: dict[str, Any]) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    # ------------------------------------------------------------------ teacher

    @property
    def teacher(self):
        if self._teacher is None:
            from models.embedders.dlib_resnet import DlibEmbedder

            self._teacher = DlibEmbedder(align=False, batch_size=64)
        return self._teacher

    def teacher_vectors(self, aug: np.ndarray, idx: np.ndarray) -> np.ndarray:
        if self.cfg.teacher == "stored":
            return np.asarray(self.store.teacher[idx], dtype=np.float32)
        from models.training.distill_data import teacher_flip_vectors

        return teacher_flip_vectors(self.teacher, aug)

    # ------------------------------------------------------------------ one step

    def _refresh_store(self) -> None:
        """Pick up chips a still-running preparation added (only between epochs)."""
        fresh = ChipStore(self.cfg.data)
        if fresh.count == self.store.count:
            return
        self.store = fresh
        records = fresh.records()
        self._train_all = np.asarray([r.index for r in records if r.split == "train"], dtype=np.int64)
        for r in records:
            if r.split == "train" and r.identity in self.classes:
                self.labels[r.index] = self.classes[r.identity]
        self.log(f"chip store grew: {len(self._train_all)} training chips from the next epoch on")

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        if self.sampler.pos + cfg.batch_size > self.sampler.size:
            self._refresh_store()  # an epoch starts with this batch
        pos = self.sampler.next_batch(cfg.batch_size, len(self._train_all))
        idx = self._train_all[pos]
        order = np.argsort(idx)  # memmap reads in file order, then back to batch order
        clean = np.empty((len(idx), *self.store.chips.shape[1:]), np.uint8)
        clean[order] = self.store.chips[idx[order]]
        aug = augment_batch(clean, cfg.seed, self.step, cfg.augment)
        t1 = time.perf_counter()
        target = torch.from_numpy(self.teacher_vectors(aug, idx)).to(self.device)
        t2 = time.perf_counter()
        lr = lr_at(self.step, cfg, self.total_steps)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.net.train()
        x = chips_to_tensor(aug, cfg.input_size, cfg.mean, cfg.std, self.device)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            emb = self.net(x)
        parts = distill_losses(emb, target, self.centre.to(self.device), cfg)
        loss = cfg.direct_weight * parts["direct"] + cfg.relation_weight * parts["relation"]
        if self.margin_head is not None:
            lab = torch.from_numpy(self.labels[idx]).to(self.device)
            known = lab >= 0
            if int(known.sum()) > 0:
                parts["margin"] = F.cross_entropy(self.margin_head(emb[known], lab[known]), lab[known])
                loss = loss + cfg.margin_weight * parts["margin"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {self.step}")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.opt.step()
        self.ema.update(self.net)
        self.step += 1
        t3 = time.perf_counter()
        out = {"loss": float(loss.detach()), "lr": lr, "t_data": t1 - t0, "t_teacher": t2 - t1, "t_student": t3 - t2}
        out.update({k: float(v.detach()) for k, v in parts.items()})
        return out

    # ------------------------------------------------------------------ eval

    @torch.inference_mode()
    def embed_eval_chips(self, net: nn.Module, chips: np.ndarray) -> np.ndarray:
        """Unit vectors of clean (N,150,150,3) chips, as inference computes them."""
        net.eval()
        out = []
        for start in range(0, len(chips), 64):
            x = chips_to_tensor(np.asarray(chips[start : start + 64]), self.cfg.input_size, self.cfg.mean, self.cfg.std,
                                self.device)
            if self.cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                y = net(x)
            out.append(F.normalize(y.float(), dim=1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.cfg.embedding_dim), np.float32)

    def embed_eval(self, net: nn.Module) -> np.ndarray:
        return self.embed_eval_chips(net, np.asarray(self.store.chips[self._eval["index"]]))

    def pair_metrics(self, vecs: np.ndarray) -> dict[str, float]:
        e = self._eval
        scores = np.sum(vecs[e["a"]] * vecs[e["b"]], axis=1)
        kf = kfold_accuracy(scores, e["same"], e["fold"])
        thr, _ = best_threshold(scores, e["same"])
        return {"acc": round(kf.mean, 5), "acc_std": round(kf.std, 5), "auc": round(roc_auc(scores, e["same"]), 5),
                "pos_sim": round(float(scores[e["same"]].mean()), 4), "neg_sim": round(float(scores[~e["same"]].mean()), 4),
                "threshold_all_pairs": round(thr, 5)}

    def evaluate(self, record: bool = True) -> dict[str, Any] | None:
        """Quick eval of the live and EMA weights; ``record=False`` (an export from
        another process while the run trains) keeps it out of the run's metrics."""
        if self._eval is None:
            return None
        t0 = time.perf_counter()
        teacher = np.asarray(self.store.teacher[self._eval["index"]])
        row: dict[str, Any] = {"kind": "eval", "step": self.step, "epoch": round(self.sampler.epoch_float(), 4),
                               "pairs": int(len(self._eval["same"])), "teacher": self.pair_metrics(teacher)}
        row["student"] = self.pair_metrics(self.embed_eval(self.net))
        row["ema"] = self.pair_metrics(self.embed_eval(self.ema.net))
        row["eval_s"] = round(time.perf_counter() - t0, 1)
        self.net.train()
        self.evals.append(row)
        if record and self.writer:
            self._metric(row)
        self.log(f"eval step {self.step} epoch {row['epoch']:.3f}: quick-eval LFW train-identity pairs ({row['pairs']}) "
                 f"acc student {100 * row['student']['acc']:.2f}% / EMA {100 * row['ema']['acc']:.2f}% "
                 f"(teacher {100 * row['teacher']['acc']:.2f}%), AUC {row['student']['auc']:.4f} / {row['ema']['auc']:.4f} "
                 f"[{row['eval_s']} s]")
        return row

    # ------------------------------------------------------------------ loop

    def request_stop(self, *_: Any) -> None:
        self._stop = True

    def train(self, max_steps: int | None = None, max_minutes: float | None = None, handle_signals: bool = False) -> str:
        """Train until the schedule ends ("done"), ``max_steps``/``max_minutes`` for this
        call ("paused") or a signal ("stopped"); the state is saved in every case."""
        cfg = self.cfg
        if handle_signals:
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)
        start_step = self.step
        t_call = time.monotonic()
        last_save = time.monotonic()
        window: list[dict[str, float]] = []
        window_t = time.monotonic()
        status = "done"
        self.log(f"training: precision {self.precision}, channels_last {cfg.channels_last}, "
                 f"{torch.get_num_threads()} thread(s), teacher {cfg.teacher}, input {cfg.input_size} px, "
                 f"batch {cfg.batch_size}, {len(self._train_all)} training chips now, "
                 f"quick-eval pairs {0 if self._eval is None else len(self._eval['same'])}")
        while self.step < self.total_steps:
            if self._stop:
                status = "stopped"
                break
            if max_steps is not None and self.step - start_step >= max_steps:
                status = "paused"
                break
            if max_minutes is not None and time.monotonic() - t_call >= 60 * max_minutes:
                status = "paused"
                break
            t0 = time.monotonic()
            row = self.train_step()
            self.train_seconds += time.monotonic() - t0
            window.append(row)
            if self.step % cfg.log_every_steps == 0 or self.step == self.total_steps:
                self._log_window(window, window_t)
                window, window_t = [], time.monotonic()
            if cfg.eval_every_steps and self.step % cfg.eval_every_steps == 0:
                self.evaluate()
            if time.monotonic() - last_save >= 60 * cfg.checkpoint_minutes:
                self.save()
                last_save = time.monotonic()
                self.log(f"checkpoint: {self.state_path} at step {self.step}")
        if window:  # steps since the last progress line (a pause or stop mid-window)
            self._log_window(window, window_t)
        self.save()
        if self.step >= self.total_steps:
            status = "done"
            if not self.evals or self.evals[-1]["step"] != self.step:
                self.evaluate()
            self.export(self.run_dir / "final-ema.pt", ema=True)
            self.export(self.run_dir / "final.pt", ema=False)
        self.log(f"{status} at step {self.step}/{self.total_steps}; state {self.state_path}")
        return status

    def _log_window(self, window: list[dict[str, float]], window_t: float) -> None:
        """One progress line + metrics row: means over the steps since the last one."""
        cfg = self.cfg
        n = len(window)
        avg = {k: sum(r.get(k, 0.0) for r in window) / n for k in window[0]}
        img_s = n * cfg.batch_size / max(time.monotonic() - window_t, 1e-9)
        eta_h = (self.total_steps - self.step) * cfg.batch_size / img_s / 3600
        m = {"kind": "train", "step": self.step, "epoch": round(self.sampler.epoch_float(), 4),
             "samples": self.step * cfg.batch_size, "steps_in_mean": n, "img_s": round(img_s, 3), "eta_h": round(eta_h, 2),
             **{k: round(v, 6) for k, v in avg.items()}, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self._metric(m)
        extra = f" margin {avg['margin']:.4f}" if "margin" in avg else ""
        self.log(f"step {self.step}/{self.total_steps} epoch {m['epoch']:.3f} loss {avg['loss']:.4f} "
                 f"(direct {avg['direct']:.4f} relation {avg['relation']:.5f}{extra}) lr {avg['lr']:.2e} "
                 f"{img_s:.2f} img/s (data {avg['t_data']:.2f} s, teacher {avg['t_teacher']:.2f} s, "
                 f"student {avg['t_student']:.2f} s per step) ETA {eta_h:.1f} h")

    # ------------------------------------------------------------------ export

    def export(self, path: Path | str, ema: bool = True) -> Path:
        """An fp16 ``ResNet50Embedder`` checkpoint of the student (or its EMA)."""
        net = self.ema.net if ema else self.net
        last = self.evals[-1] if self.evals else None
        key = "ema" if ema else "student"
        meta = {"embedding_dim": self.cfg.embedding_dim, "input_size": self.cfg.input_size,
                "chip_size": self.store.chip_size, "chip_padding": float(self.store.info.get("chip_padding", 0.25)),
                "mean": list(self.cfg.mean), "std": list(self.cfg.std), "dropout": 0.0,
                "training": {"recipe": "distill_long_run (dlib teacher, consistent teaching)", "weights": key,
                             "step": self.step, "total_steps": self.total_steps,
                             "finished": self.step >= self.total_steps, "epoch": round(self.sampler.epoch_float(), 4),
                             "train_hours": round(self.train_seconds / 3600, 3), "config": self.cfg.to_dict(),
                             "quick_eval": None if last is None else {"step": last["step"], **last[key],
                                                                       "teacher": last["teacher"]}}}
        if last is not None:
            # picked on held-out LFW *train*-identity pairs (folds 1-5): allowed by the data rules
            meta["match_threshold"] = float(last[key]["threshold_all_pairs"])
        state = {k: v.contiguous() for k, v in net.state_dict().items()}
        return save_checkpoint(state, meta, path)
