"""Train the emotion CNN (``models.attributes.emotion_net``) on FER2013, on the CPU.

    nice -n 19 python -m models.training.emotion_trainer \
        --fer ~/facelab-extra/fer2013/archive --out ~/facelab-runs/attributes/emotion

Splits: FER2013's ``test`` folder is the test set and is never read here; a seeded,
stratified 10 % of ``train`` is the *select* split (epoch choice, nothing else), the
rest is trained on. The split is written to ``<out>/split.json``.

Augmentation runs on whole batches in torch (one affine resample per batch): random
40x40 crops of the 48x48 face (shift up to 4 px), rotation up to 15 degrees, zoom
0.9-1.1, horizontal flip, gamma 0.67-1.5 and a 12 px cutout on half of the faces.
Brightness/contrast jitter would be pointless: every crop is standardised on its own.

``--teacher FILE`` distils: the network also learns the probabilities an app weights
file (e.g. an ensemble from ``models.training.emotion_ensemble``) gives each augmented
batch, so one network can approach several networks' accuracy at one network's cost.

Resumable: ``<out>/last.pt`` (model, optimiser, epoch, history) is written after every
epoch and a rerun with the same ``--out`` continues from it; ``<out>/best.pt`` holds the
epoch with the best select accuracy. Progress and ETA go to ``<out>/train.log``.
``--export PATH`` writes the best epoch's fp16 weights in the app's format, with the FER
framing measured by ``bench/fit_fer_framing.py`` (``--framing``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.atomic import save_torch_atomically
from models.attributes.emotion_net import (
    EMOTIONS,
    FRAME_SIZE,
    INPUT_SIZE,
    EmotionNet,
    predict_proba,
    standardise,
)
from models.cpu_features import cpu_precision
from models.training.fer_data import load_fer_split, stratified_split

log = logging.getLogger("emotion_trainer")

EXPORT_FORMAT = "facelab-emotion/1"


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h"


@dataclass
class EmotionTrainConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    width: int = 32
    dropout: float = 0.3
    select_fraction: float = 0.10
    seed: int = 17
    #: batch order and augmentation draws; None = ``seed``. Runs that differ only here
    #: share the select split and differ in what they saw when (for soups / ensembles)
    order_seed: int | None = None
    #: also keep every epoch's weights as ``epoch-NN.pt`` (model only)
    keep_epochs: bool = False
    threads: int = 1
    #: "bf16": forward and loss under bf16 autocast (weights, gradients and the optimiser
    #: stay fp32); "fp32"; "auto" = bf16 where the CPU computes it natively
    #: (``models.cpu_features``), fp32 where it would be emulated (~20x slower)
    precision: str = "auto"
    #: the share of training faces shown as the app frames them (``fer_app_frames``:
    #: detector, landmarks, our FER framing) instead of FER's own crop; > 0 also scores the
    #: select split both ways and picks the best epoch on the app's frames, what users see
    app_frames_p: float = 0.0
    #: start from these weights (another run's best.pt/last.pt), not from random ones
    init_from: str | None = None
    #: knowledge distillation: an app emotion weights file (one network or an ensemble)
    #: whose probabilities on each augmented batch the network also learns to match:
    #: loss = (1 - w) * cross-entropy(labels) + w * T^2 * KL(teacher_T || student_T)
    teacher: str | None = None
    distill_weight: float = 0.7
    distill_temperature: float = 2.0
    #: augmentation
    max_shift_px: float = 4.0
    max_rotation_deg: float = 15.0
    zoom: tuple[float, float] = (0.9, 1.1)
    gamma_log_range: float = 0.4
    cutout_p: float = 0.5
    cutout_px: int = 12


def augment_batch(frames: torch.Tensor, cfg: EmotionTrainConfig, g: torch.Generator) -> torch.Tensor:
    """(B, 1, 48, 48) uint8 -> (B, 1, 40, 40) augmented, standardised float crops."""
    b = frames.shape[0]
    x = frames.float() / 255.0
    gamma = torch.exp((torch.rand(b, 1, 1, 1, generator=g) * 2 - 1) * cfg.gamma_log_range)
    x = x.clamp_min(1e-4) ** gamma
    angle = (torch.rand(b, generator=g) * 2 - 1) * math.radians(cfg.max_rotation_deg)
    zoom = cfg.zoom[0] + torch.rand(b, generator=g) * (cfg.zoom[1] - cfg.zoom[0])
    shift = (torch.rand(b, 2, generator=g) * 2 - 1) * cfg.max_shift_px / (FRAME_SIZE / 2)
    flip = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
    # output grid (normalised over 40 px) -> input coordinates (normalised over 48 px)
    s = (INPUT_SIZE / FRAME_SIZE) / zoom
    cos, sin = torch.cos(angle) * s, torch.sin(angle) * s
    theta = torch.stack([
        torch.stack([cos * flip, -sin, shift[:, 0]], dim=1),
        torch.stack([sin * flip, cos, shift[:, 1]], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, [b, 1, INPUT_SIZE, INPUT_SIZE], align_corners=False)
    x = standardise(F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False))
    if cfg.cutout_p > 0:
        cut = torch.rand(b, generator=g) < cfg.cutout_p
        cy = torch.randint(0, INPUT_SIZE, (b,), generator=g)
        cx = torch.randint(0, INPUT_SIZE, (b,), generator=g)
        ys = torch.arange(INPUT_SIZE).view(1, -1, 1)
        xs = torch.arange(INPUT_SIZE).view(1, 1, -1)
        half = cfg.cutout_px // 2
        mask = ((ys - cy.view(-1, 1, 1)).abs() <= half) & ((xs - cx.view(-1, 1, 1)).abs() <= half) & cut.view(-1, 1, 1)
        x = x.masked_fill(mask.unsqueeze(1), 0.0)
    return x.contiguous(memory_format=torch.channels_last)


def evaluate(net: EmotionNet, images: np.ndarray, labels: np.ndarray, batch: int = 256) -> tuple[float, np.ndarray]:
    """Accuracy and (N, 7) probabilities (centre crop, mirror-averaged)."""
    net.eval()
    probs = []
    for start in range(0, len(images), batch):
        frames = torch.from_numpy(images[start : start + batch]).unsqueeze(1)
        probs.append(predict_proba(net, frames).numpy())
    p = np.concatenate(probs)
    return float((p.argmax(1) == labels).mean()), p


def _lr_at(step: float, total: float, warmup: float, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1.0, total - warmup))))


def _param_groups(net: EmotionNet, weight_decay: float) -> list[dict]:
    decay = [p for n, p in net.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in net.named_parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _atomic_save(obj: object, path: Path) -> None:
    save_torch_atomically(obj, path)


def export_weights(checkpoint: Path | str, out: Path | str, extra_meta: dict | None = None) -> Path:
    """The app's weights file: fp16 state dict + everything inference needs in ``meta``."""
    ck = torch.load(checkpoint, map_location="cpu", weights_only=True)
    meta = {
        "emotions": list(EMOTIONS), "frame_size": FRAME_SIZE, "input_size": INPUT_SIZE,
        "width": ck["config"]["width"], "dropout": ck["config"]["dropout"],
        "epoch": ck["epoch"], "select_accuracy": ck["select_accuracy"], "config": ck["config"],
        **(extra_meta or {}),
    }
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in ck["model"].items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save({"format": EXPORT_FORMAT, "state_dict": state, "meta": meta}, out)
    return out


def _load_teacher(path: Path) -> torch.nn.Module:
    """The teacher as the app loads it (BatchNorm folded, eval mode; a missing file is
    named). Its forward's softmax is its probabilities, ensemble or not."""
    from models.attributes.analyzer import FaceAttributeModel

    model = FaceAttributeModel(emotion_path=path, age_gender_path=None)
    model.load()
    if model.missing_note():
        raise FileNotFoundError(model.missing_note())
    log.info("distilling from %s (%s)", path, model.version)
    return model._emotion.net  # noqa: SLF001 - the network as the app runs it


def train(fer_root: Path, out: Path, cfg: EmotionTrainConfig) -> dict:
    # settings first: a typo should not cost the minute of reading FER2013 and its app frames
    precision = cpu_precision() if cfg.precision == "auto" else cfg.precision
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {cfg.precision!r}")
    if not 0.0 <= cfg.app_frames_p <= 1.0:
        raise ValueError(f"app_frames_p is a share of the training faces (0 to 1), got {cfg.app_frames_p}")
    if not 0.0 <= cfg.distill_weight <= 1.0 or cfg.distill_temperature <= 0:
        raise ValueError(f"distill_weight must be in [0, 1] and distill_temperature > 0, "
                         f"got {cfg.distill_weight} and {cfg.distill_temperature}")
    teacher = _load_teacher(Path(cfg.teacher)) if cfg.teacher else None
    log.info("precision: %s", precision)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    images, labels, names = load_fer_split(fer_root, "train", cache_dir=out)
    keep, select = stratified_split(labels, cfg.select_fraction, cfg.seed)
    split_file = out / "split.json"
    if not split_file.is_file():
        split_file.write_text(json.dumps({"seed": cfg.seed, "select": [names[i] for i in select]}))
    tr_x, tr_y = torch.from_numpy(images[keep]).unsqueeze(1), torch.from_numpy(labels[keep])
    se_x, se_y = images[select], labels[select]
    tr_app = se_app = None
    if cfg.app_frames_p > 0:
        from models.training.fer_app_frames import load_app_frames

        app, _, _ = load_app_frames(out, "train", fer_root)
        tr_app, se_app = torch.from_numpy(app[keep]).unsqueeze(1), app[select]
        log.info("%.0f %% of training faces framed by the app's path; best epoch chosen on the app's frames",
                 100 * cfg.app_frames_p)
    log.info("FER2013 train %d = %d training + %d select (seed %d)", len(labels), len(keep), len(select), cfg.seed)

    torch.manual_seed(cfg.seed)
    net = EmotionNet(cfg.width, dropout=cfg.dropout).to(memory_format=torch.channels_last)
    if cfg.init_from and not (out / "last.pt").is_file():
        net.load_state_dict(torch.load(cfg.init_from, map_location="cpu", weights_only=True)["model"])
        log.info("initialised from %s", cfg.init_from)
    opt = torch.optim.SGD(_param_groups(net, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    steps_per_epoch = len(keep) // cfg.batch_size
    total_steps = steps_per_epoch * cfg.epochs
    history: list[dict] = []
    start_epoch, best = 0, -1.0
    last = out / "last.pt"
    if last.is_file():
        ck = torch.load(last, map_location="cpu", weights_only=True)
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start_epoch, history, best = ck["epoch"] + 1, ck["history"], ck["best_select_accuracy"]
        log.info("resuming after epoch %d (best select accuracy %.4f)", ck["epoch"] + 1, best)

    train_start = time.time()
    steps_done_here = 0
    for epoch in range(start_epoch, cfg.epochs):
        net.train()
        order_seed = cfg.seed if cfg.order_seed is None else cfg.order_seed
        g = torch.Generator().manual_seed(order_seed * 1000 + epoch)  # same batches after a resume
        order = torch.randperm(len(keep), generator=g)
        t0, loss_sum, correct, seen = time.time(), 0.0, 0, 0
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, total_steps, cfg.warmup_epochs * steps_per_epoch, cfg.lr)
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            frames = tr_x[idx]
            if tr_app is not None:
                use_app = torch.rand(len(idx), generator=g) < cfg.app_frames_p
                frames = torch.where(use_app.view(-1, 1, 1, 1), tr_app[idx], frames)
            x, y = augment_batch(frames, cfg, g), tr_y[idx]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = net(x)
                loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
                if teacher is not None:
                    with torch.no_grad():
                        target = (teacher(x).float() / cfg.distill_temperature).log_softmax(dim=1)
                    student = (logits.float() / cfg.distill_temperature).log_softmax(dim=1)
                    kl = F.kl_div(student, target, log_target=True, reduction="batchmean")
                    loss = (1 - cfg.distill_weight) * loss + cfg.distill_weight * cfg.distill_temperature**2 * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            steps_done_here += 1
            if (i + 1) % 50 == 0 or i + 1 == steps_per_epoch:
                rate = steps_done_here / (time.time() - train_start)
                eta = (total_steps - step - 1) / max(rate, 1e-9)
                log.info("epoch %d/%d step %d/%d loss %.4f train acc %.4f | %.1f img/s | ETA %s",
                         epoch + 1, cfg.epochs, i + 1, steps_per_epoch, loss_sum / seen, correct / seen,
                         rate * cfg.batch_size, _hours(eta))
        select_native, _ = evaluate(net, se_x, se_y)
        row = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
               "select_accuracy": select_native, "seconds": time.time() - t0, "lr_end": opt.param_groups[0]["lr"]}
        select_acc = select_native
        if se_app is not None:
            select_acc = row["select_accuracy_app"] = evaluate(net, se_app, se_y)[0]
            row["select_accuracy_native"] = select_native
            row["select_accuracy"] = select_acc  # what picks the epoch
        history.append(row)
        log.info("epoch %d done: select accuracy %.4f%s (%.0f s)", epoch + 1, select_acc,
                 f" on the app's frames (FER's framing: {select_native:.4f})" if se_app is not None else "",
                 row["seconds"])
        state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        if select_acc > best:
            best = select_acc
            _atomic_save({"model": state, "epoch": epoch + 1, "select_accuracy": select_acc, "config": asdict(cfg)},
                         out / "best.pt")
        if cfg.keep_epochs:
            _atomic_save({"model": state, "epoch": epoch + 1, "select_accuracy": select_acc}, out / f"epoch-{epoch + 1:02d}.pt")
        _atomic_save({"model": state, "optimizer": opt.state_dict(), "epoch": epoch, "history": history,
                      "best_select_accuracy": best, "config": asdict(cfg)}, last)
        (out / "history.json").write_text(json.dumps(history, indent=1))
    return {"history": history, "best_select_accuracy": best}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fer", type=Path, required=True, help="FER2013 root with train/<emotion>/ folders")
    ap.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, log); outside the repo")
    ap.add_argument("--epochs", type=int, default=EmotionTrainConfig.epochs)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                    help="bf16 autocast or fp32 (auto: bf16 where the CPU has it natively)")
    ap.add_argument("--width", type=int, default=EmotionTrainConfig.width)
    ap.add_argument("--init", type=Path, help="start from another run's best.pt/last.pt weights (same width)")
    ap.add_argument("--lr", type=float, default=EmotionTrainConfig.lr, help="peak learning rate of the cosine schedule")
    ap.add_argument("--warmup-epochs", type=float, default=EmotionTrainConfig.warmup_epochs)
    ap.add_argument("--dropout", type=float, default=EmotionTrainConfig.dropout)
    ap.add_argument("--label-smoothing", type=float, default=EmotionTrainConfig.label_smoothing)
    ap.add_argument("--cutout-p", type=float, default=EmotionTrainConfig.cutout_p)
    ap.add_argument("--max-rotation", type=float, default=EmotionTrainConfig.max_rotation_deg, help="degrees")
    ap.add_argument("--teacher", help="distil from this app emotion weights file (one network or an ensemble)")
    ap.add_argument("--distill-weight", type=float, default=0.7)
    ap.add_argument("--distill-temperature", type=float, default=2.0)
    ap.add_argument("--app-frames-p", type=float, default=0.0,
                    help="share of training faces framed by the app's path (models.training.fer_app_frames); "
                         "> 0 picks the best epoch on the app's frames of the select split")
    ap.add_argument("--order-seed", type=int, help="seed of batch order and augmentation (default: the split's seed)")
    ap.add_argument("--keep-epochs", action="store_true", help="keep every epoch's weights as epoch-NN.pt")
    ap.add_argument("--export", type=Path, help="after training, write best.pt as fp16 app weights here")
    ap.add_argument("--framing", type=Path, default=Path("docs/results/fer_framing.json"),
                    help="bench/fit_fer_framing.py's result; its framing goes into the exported weights")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        handlers=[logging.FileHandler(args.out / "train.log"), logging.StreamHandler()])
    cfg = EmotionTrainConfig(epochs=args.epochs, threads=args.threads, width=args.width,
                             init_from=str(args.init.expanduser()) if args.init else None,
                             lr=args.lr, warmup_epochs=args.warmup_epochs, dropout=args.dropout,
                             label_smoothing=args.label_smoothing, cutout_p=args.cutout_p,
                             max_rotation_deg=args.max_rotation, order_seed=args.order_seed,
                             keep_epochs=args.keep_epochs, precision=args.precision,
                             app_frames_p=args.app_frames_p,
                             teacher=str(Path(args.teacher).expanduser()) if args.teacher else None,
                             distill_weight=args.distill_weight, distill_temperature=args.distill_temperature)
    result = train(args.fer.expanduser(), args.out.expanduser(), cfg)
    log.info("finished: best select accuracy %.4f", result["best_select_accuracy"])
    if args.export:
        framing = json.loads(args.framing.read_text())
        meta = {"framing": framing["framing"], "framing_measured_on": f"{framing['images']} select faces ({args.framing.name})"}
        log.info("exported %s", export_weights(args.out / "best.pt", args.export, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
