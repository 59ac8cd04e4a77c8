"""Train the age/gender model (``models.attributes.age_gender_net``) on UTKFace.

    nice -n 19 python -m models.training.age_gender_trainer \
        --prepared ~/facelab-runs/attributes/utk --out ~/facelab-runs/attributes/age_gender --cut 91

Input: ``models.training.utk_data``'s cache (UTKFace through the app's detector,
landmarks and aligned chip; dlib activations of each chip and its mirror image).
Splits: ``utk_data.utk_split`` (seeded 70 / 10 / 20 % train / select / test). Only
train is trained on; select picks the epoch and, across runs, the cut point and
settings; test is read by ``evaluate_test`` alone, once the choice is made.

Each epoch every training face is seen once, as one of its two views (mirror
augmentation); evaluation averages both views. Checkpoints (``last.pt`` each epoch,
``best.pt`` at the best select score = MAE / 6 + gender error / 0.08, i.e. each
relative to its target) live in ``--out``; a rerun resumes from ``last.pt``.
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
from models.attributes.age_gender_net import AGE_BINS, AgeGenderNet, expected_age
from models.training.utk_data import CUT_OP, load_prepared, utk_split

log = logging.getLogger("age_gender_trainer")

EXPORT_FORMAT = "facelab-age-gender/1"


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h"


@dataclass
class AgeGenderTrainConfig:
    cut: int = 91
    epochs: int = 12
    batch_size: int = 128
    lr_head: float = 2e-3
    lr_tail: float = 2e-4
    weight_decay: float = 1e-2
    hidden: int = 256
    dropout: float = 0.3
    age_sigma: float = 2.5  #: years; width of the Gaussian label distribution
    age_l1_weight: float = 0.1
    gender_weight: float = 1.0
    seed: int = 17
    split_seed: int = 17
    threads: int = 1


def _frozen_net():
    from models.embedders.dlib_resnet import DlibEmbedder

    embedder = DlibEmbedder(align=False)
    embedder.load()
    return embedder, embedder._net


def activations_at(net, acts: np.ndarray, cut: int, batch: int = 512) -> np.ndarray:
    """(N, 2, ...) fp16 activations at ``CUT_OP`` -> the same at ``cut`` (frozen ops)."""
    if cut == CUT_OP:
        return acts
    out = None
    with torch.inference_mode():
        for s in range(0, len(acts), batch):
            a = torch.from_numpy(acts[s : s + batch]).float()
            n = a.shape[0]
            a = a.reshape(n * 2, *a.shape[2:])
            y = net.run_ops(a, CUT_OP, cut, {1: a}).numpy().astype(np.float16)
            if out is None:
                out = np.zeros((len(acts), 2, *y.shape[1:]), np.float16)
            out[s : s + n] = y.reshape(n, 2, *y.shape[1:])
    return out


def soft_age_targets(age: torch.Tensor, sigma: float) -> torch.Tensor:
    bins = torch.arange(AGE_BINS, dtype=torch.float32)
    t = torch.exp(-0.5 * ((bins.view(1, -1) - age.view(-1, 1).float()) / sigma) ** 2)
    return t / t.sum(dim=1, keepdim=True)


@torch.inference_mode()
def predict(model: AgeGenderNet, x: np.ndarray, batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2, ...) activations (both views) -> age estimates, P(female), view-averaged."""
    model.eval()
    ages, pf = [], []
    for s in range(0, len(x), batch):
        a = torch.from_numpy(x[s : s + batch]).float()
        n = a.shape[0]
        logits, g = model(a.reshape(n * 2, *a.shape[2:]))
        ages.append(expected_age(logits).view(n, 2).mean(1).numpy())
        pf.append(torch.sigmoid(g).view(n, 2).mean(1).numpy())
    return np.concatenate(ages), np.concatenate(pf)


def metrics(age_pred: np.ndarray, p_female: np.ndarray, age: np.ndarray, gender: np.ndarray) -> dict[str, float]:
    mae = float(np.abs(age_pred - age).mean())
    acc = float(((p_female >= 0.5).astype(int) == gender).mean())
    return {"age_mae": mae, "gender_accuracy": acc, "score": mae / 6.0 + (1.0 - acc) / 0.08}


def _atomic_save(obj: object, path: Path) -> None:
    save_torch_atomically(obj, path)


def train(prepared: Path, out: Path, cfg: AgeGenderTrainConfig) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    data = load_prepared(prepared)
    split = utk_split(len(data["age"]), cfg.split_seed)
    (out / "split.json").write_text(json.dumps({"seed": cfg.split_seed, **{k: [str(data["names"][i]) for i in v]
                                                                           for k, v in split.items()}}))
    embedder, net = _frozen_net()
    cache = out / f"acts_cut{cfg.cut}.npy"
    if cache.is_file():
        x_all = np.load(cache, mmap_mode="r")
    else:
        log.info("computing activations at op %d for %d faces", cfg.cut, len(data["age"]))
        x_all = activations_at(net, data["acts"], cfg.cut)
        np.save(cache, x_all)
    del data["acts"]
    age = np.minimum(data["age"], AGE_BINS - 1)
    gender = data["gender"].astype(np.int64)
    tr, se = split["train"], split["select"]
    x_tr, x_se = np.ascontiguousarray(x_all[tr]), np.ascontiguousarray(x_all[se])
    log.info("UTKFace: %d train, %d select (test %d left alone); cut %d", len(tr), len(se), len(split["test"]), cfg.cut)

    torch.manual_seed(cfg.seed)
    model = AgeGenderNet(net, cfg.cut, cfg.hidden, cfg.dropout)
    groups = [{"params": [p for n, p in model.named_parameters() if not n.startswith("tail.")], "lr": cfg.lr_head}]
    tail_params = list(model.tail.parameters())
    if tail_params:
        groups.append({"params": tail_params, "lr": cfg.lr_tail})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    base_lrs = [g["lr"] for g in opt.param_groups]
    steps_per_epoch = math.ceil(len(tr) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    history: list[dict] = []
    start_epoch, best = 0, math.inf
    last = out / "last.pt"
    if last.is_file():
        ck = torch.load(last, map_location="cpu", weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start_epoch, history, best = ck["epoch"] + 1, ck["history"], ck["best_score"]
        log.info("resuming after epoch %d", start_epoch)
    age_t, gender_t = torch.from_numpy(age[tr]), torch.from_numpy(gender[tr]).float()
    t_start, steps_here = time.time(), 0
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        order = torch.randperm(len(tr), generator=g)
        views = torch.randint(0, 2, (len(tr),), generator=g)
        t0, loss_sum = time.time(), 0.0
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            factor = 0.5 * (1 + math.cos(math.pi * step / total))
            for group, lr in zip(opt.param_groups, base_lrs):
                group["lr"] = lr * factor
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            x = torch.from_numpy(x_tr[idx.numpy(), views[idx].numpy()]).float()
            logits, glogit = model(x)
            y = age_t[idx]
            loss = (-(soft_age_targets(y, cfg.age_sigma) * logits.log_softmax(1)).sum(1).mean()
                    + cfg.age_l1_weight * (expected_age(logits) - y.float()).abs().mean()
                    + cfg.gender_weight * F.binary_cross_entropy_with_logits(glogit, gender_t[idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(idx)
            steps_here += 1
        m = metrics(*predict(model, x_se), age[se], gender[se])
        row = {"epoch": epoch + 1, "train_loss": loss_sum / len(tr), **{f"select_{k}": v for k, v in m.items()},
               "seconds": time.time() - t0}
        history.append(row)
        eta = (total - (epoch + 1) * steps_per_epoch) * (time.time() - t_start) / max(steps_here, 1)
        log.info("epoch %d/%d loss %.4f | select age MAE %.3f gender acc %.4f | %.0f s | ETA %s", epoch + 1,
                 cfg.epochs, row["train_loss"], m["age_mae"], m["gender_accuracy"], row["seconds"],
                 _hours(eta))
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if m["score"] < best:
            best = m["score"]
            _atomic_save({"model": state, "epoch": epoch + 1, "select": m, "config": asdict(cfg),
                          "dlib_version": embedder.version}, out / "best.pt")
        _atomic_save({"model": state, "optimizer": opt.state_dict(), "epoch": epoch, "history": history,
                      "best_score": best, "config": asdict(cfg)}, last)
        (out / "history.json").write_text(json.dumps(history, indent=1))
    return {"history": history, "best_score": best}


def export_weights(checkpoint: Path | str, out: Path | str, extra_meta: dict | None = None) -> Path:
    """fp16 tail + heads and the metadata inference needs (cut, sizes, dlib version)."""
    ck = torch.load(checkpoint, map_location="cpu", weights_only=True)
    cfg = ck["config"]
    meta = {"cut": cfg["cut"], "hidden": cfg["hidden"], "dropout": cfg["dropout"], "age_bins": AGE_BINS,
            "dlib_version": ck["dlib_version"], "epoch": ck["epoch"], "select": ck["select"], "config": cfg,
            "genders": ["male", "female"], **(extra_meta or {})}
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in ck["model"].items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save({"format": EXPORT_FORMAT, "state_dict": state, "meta": meta}, out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepared", type=Path, required=True, help="utk_data's cache folder")
    ap.add_argument("--out", type=Path, required=True, help="run folder, outside the repository")
    for f in ("cut", "epochs", "batch_size", "hidden", "threads"):
        ap.add_argument(f"--{f.replace('_', '-')}", type=int, default=getattr(AgeGenderTrainConfig, f))
    for f in ("lr_head", "lr_tail", "weight_decay", "dropout", "age_sigma", "age_l1_weight"):
        ap.add_argument(f"--{f.replace('_', '-')}", type=float, default=getattr(AgeGenderTrainConfig, f))
    ap.add_argument("--export", type=Path, help="after training, write best.pt as fp16 app weights here")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        handlers=[logging.FileHandler(args.out / "train.log"), logging.StreamHandler()])
    cfg = AgeGenderTrainConfig(**{k: getattr(args, k) for k in AgeGenderTrainConfig.__dataclass_fields__
                                  if hasattr(args, k)})
    result = train(args.prepared.expanduser(), args.out.expanduser(), cfg)
    log.info("finished: best select score %.4f", result["best_score"])
    if args.export:
        log.info("exported %s", export_weights(args.out / "best.pt", args.export))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
