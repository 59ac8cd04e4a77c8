"""A long, resumable YOLO face-detector training run on a CPU, in our own loop.

Why not ``ultralytics``' trainer: on CPU it turns AMP off (so no bf16), its
checkpoints are per epoch only (an epoch here is most of an hour) and its resume is tied
to its run folder layout. This loop keeps what matters from ultralytics and nothing else:

* model: ``DetectionModel`` from a bundled yaml (``yolov8n.yaml`` / ``yolov8s.yaml``,
  from scratch, nc=1) and its own loss (``v8DetectionLoss`` via ``model.loss``);
* data: ultralytics' ``YOLODataset`` and its augmentation (mosaic, random scale /
  translate, horizontal flip, HSV colour jitter); mosaic is switched off for the last
  ``close_mosaic`` epochs, as ultralytics does;
* ``ModelEMA``; AdamW with no weight decay on biases and norm layers, linear warm-up then
  cosine decay, gradient-norm clipping at 10 (ultralytics' value).

Precision: bf16 autocast + channels_last ONLY when the CPU has native bf16
(``avx512_bf16`` or ``amx_bf16`` in /proc/cpuinfo). Where bf16 is emulated (e.g. AMD Zen 3)
it is many times slower than fp32, so fp32 is used there.

Resumability: a full state (model, EMA, optimizer, position inside the epoch, RNG seeds
are derived from the step number, history, elapsed time) is written atomically to
``<run>/state.pt`` every ``checkpoint_minutes`` and at each epoch end; starting the same
command again continues from it. SIGTERM / SIGINT write a state before exiting. The data
order of epoch e is a permutation seeded by (seed, e), so a resumed epoch skips exactly
the batches already done.

Selection: after each epoch the EMA model is scored (AP50 at IoU 0.5, our evaluator) on
the ``select`` split, which comes from the training sources, never from face_mask val
(the test set) or WIDER val; the best epoch is exported as ``<run>/best.pt``, an fp16
ultralytics-format checkpoint that ``--detector yolo:PATH`` loads.

    python -m models.training.yolo_long_run train --data ~/facelab-runs/detector-data \
        --run ~/facelab-runs/yolo-face-n416 --model yolov8n.yaml --imgsz 416 --epochs 12
    python -m models.training.yolo_long_run bench --data ... --model yolov8s.yaml --imgsz 320 --steps 30 --threads 1
    python -m models.training.yolo_long_run export --run ~/facelab-runs/yolo-face-n416 --out early.pt

A resumed epoch replays the same batches and the same random draws, but ultralytics'
mosaic takes its partner images from a buffer of recently loaded images, which starts
empty after a resume: the first mosaics after a resume differ from an uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import save_torch_atomically
from models.cpu_features import cpu_native_bf16 as cpu_has_native_bf16
from models.training.detector_trainer import prepare_ultralytics_env


@dataclass
class LongRunConfig:
    data: str  #: folder with images/{train,select} and labels/{train,select} (YOLO format)
    run: str  #: run folder (outside the repo): state.pt, best.pt, log.txt, history.json
    model: str = "yolov8n.yaml"
    imgsz: int = 416
    batch: int = 16
    epochs: int = 12
    lr: float = 0.002  #: AdamW peak learning rate (ultralytics' "auto" value for nc=1)
    weight_decay: float = 0.0005
    warmup_steps: int = 300
    final_lr_fraction: float = 0.05
    close_mosaic: int = 2  #: last epochs without mosaic
    threads: int = 1
    seed: int = 0
    checkpoint_minutes: float = 5.0
    select_limit: int | None = None  #: score only the first N select images (None: all)
    precision: str = "auto"  #: auto (bf16 only if native), fp32, bf16
    # augmentation (ultralytics names)
    mosaic: float = 1.0
    scale: float = 0.5
    translate: float = 0.1
    fliplr: float = 0.5
    hsv_h: float = 0.015
    hsv_s: float = 0.7
    hsv_v: float = 0.4
    extra: dict[str, Any] = field(default_factory=dict)


class Logger:
    def __init__(self, path: Path | None) -> None:
        self.path = path

    def __call__(self, msg: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        print(line, flush=True)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(line + "\n")


def _hyp(cfg: LongRunConfig, task_overrides: dict | None = None):
    from ultralytics.cfg import get_cfg

    overrides = {
        "task": "detect", "imgsz": cfg.imgsz, "mosaic": cfg.mosaic, "scale": cfg.scale, "translate": cfg.translate,
        "fliplr": cfg.fliplr, "hsv_h": cfg.hsv_h, "hsv_s": cfg.hsv_s, "hsv_v": cfg.hsv_v, "degrees": 0.0,
        "mixup": 0.0, "copy_paste": 0.0, "single_cls": True, "cache": False, "rect": False, "fraction": 1.0,
        "plots": False, "verbose": False,
    }
    overrides.update(cfg.extra)
    overrides.update(task_overrides or {})
    return get_cfg(overrides=overrides)


def build_model(cfg: LongRunConfig):
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel(cfg.model, nc=1, verbose=False)
    model.names = {0: "face"}
    model.args = _hyp(cfg)  # the loss reads its gains (box, cls, dfl) from here
    return model


def build_dataset(cfg: LongRunConfig, split: str, augment: bool, stride: int):
    from ultralytics.data.build import build_yolo_dataset

    hyp = _hyp(cfg)
    data = {"names": {0: "face"}, "nc": 1, "channels": 3}
    img_path = str(Path(cfg.data) / "images" / split)
    return build_yolo_dataset(hyp, img_path, cfg.batch, data, mode="train" if augment else "val", stride=stride), hyp


def param_groups(model, weight_decay: float) -> list[dict]:
    import torch.nn as nn

    norm = tuple(v for k, v in nn.__dict__.items() if "Norm" in k)
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            (no_decay if name == "bias" or isinstance(module, norm) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total: int, cfg: LongRunConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (cfg.final_lr_fraction + (1 - cfg.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def seed_step(seed: int, step: int) -> None:
    """Augmentation draws from python's and numpy's global RNGs: seed them per step so a
    resumed run replays the same augmentations."""
    import torch

    s = (seed * 1_000_003 + step) % (2**31)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def collate(dataset, indices):
    return dataset.collate_fn([dataset[int(i)] for i in indices])


def export_checkpoint(ema_model, path: Path, meta: dict) -> Path:
    """fp16, ultralytics-format checkpoint (``YOLO(path)`` / ``--detector yolo:PATH``)."""
    import copy

    import torch

    m = copy.deepcopy(ema_model).half().to(memory_format=torch.contiguous_format)
    if hasattr(m, "criterion"):
        m.criterion = None
    for v in m.state_dict().values():
        if v.is_floating_point():
            torch.nan_to_num_(v)
    args = {k: v for k, v in vars(m.args).items()} if not isinstance(m.args, dict) else dict(m.args)
    m.args = args
    ckpt = {"model": m, "ema": None, "train_args": args, "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "facelab": meta, "epoch": -1, "optimizer": None}
    return save_torch_atomically(ckpt, path)


def read_labels(label_file: Path, width: int, height: int) -> np.ndarray:
    rows = [line.split() for line in label_file.read_text().splitlines() if line.strip()] if label_file.is_file() else []
    a = np.asarray(rows, dtype=np.float64).reshape(-1, 5)[:, 1:]
    cx, cy, w, h = a[:, 0] * width, a[:, 1] * height, a[:, 2] * width, a[:, 3] * height
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)


def predict_boxes(model, rgb: np.ndarray, imgsz: int, conf: float = 0.001, iou: float = 0.6,
                  autocast=None) -> tuple[np.ndarray, np.ndarray]:
    """Letterbox -> model -> NMS -> boxes in the image's pixels (x1y1x2y2) and scores."""
    import torch
    from ultralytics.data.augment import LetterBox
    from ultralytics.utils.nms import non_max_suppression
    from ultralytics.utils.ops import scale_boxes

    img = LetterBox((imgsz, imgsz), auto=False, stride=32)(image=rgb[:, :, ::-1])  # BGR like ultralytics
    x = torch.from_numpy(np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1))).float().div_(255)[None]
    with torch.inference_mode(), (autocast or nullcontext()):
        out = model(x)
    pred = out[0] if isinstance(out, (list, tuple)) else out
    det = non_max_suppression(pred.float(), conf, iou, max_det=1000)[0]
    if len(det) == 0:
        return np.zeros((0, 4)), np.zeros(0)
    det[:, :4] = scale_boxes(x.shape[2:], det[:, :4], rgb.shape[:2])
    d = det.cpu().numpy().astype(np.float64)
    return d[:, :4], d[:, 4]


def score_select(model, cfg: LongRunConfig, autocast=None) -> dict:
    """AP50 / recall of ``model`` on the select split (our evaluator, greedy IoU 0.5)."""
    from PIL import Image

    from models.evaluation.detection import evaluate_detections

    images = sorted((Path(cfg.data) / "images" / "select").glob("*.jpg"))
    if cfg.select_limit:
        images = images[: cfg.select_limit]
    preds, gts = [], []
    model.eval()
    for p in images:
        with Image.open(p) as im:
            rgb = np.asarray(im.convert("RGB"))
        preds.append(predict_boxes(model, rgb, cfg.imgsz, autocast=autocast))
        gts.append(read_labels(Path(cfg.data) / "labels" / "select" / f"{p.stem}.txt", rgb.shape[1], rgb.shape[0]))
    m = evaluate_detections(preds, gts, with_map50_95=False)
    return {"select_AP50": m.ap50, "select_recall": m.recall, "select_images": len(images), "select_faces": m.num_gt}


class LongRun:
    def __init__(self, cfg: LongRunConfig, log_to_file: bool = True) -> None:
        import torch

        prepare_ultralytics_env()
        self.cfg = cfg
        self.run = Path(cfg.run).expanduser()
        self.run.mkdir(parents=True, exist_ok=True)
        self.log = Logger(self.run / "log.txt" if log_to_file else None)
        torch.set_num_threads(max(1, cfg.threads))
        native = cpu_has_native_bf16()
        if cfg.precision == "auto":
            self.bf16 = native
        else:
            self.bf16 = cfg.precision == "bf16"
        seed_step(cfg.seed, -1)  # the initial weights depend on the seed only
        self.model = build_model(cfg)
        if self.bf16:
            self.model = self.model.to(memory_format=torch.channels_last)
        stride = int(self.model.stride.max())
        self.train_set, self.hyp = build_dataset(cfg, "train", augment=True, stride=stride)
        self.steps_per_epoch = len(self.train_set) // cfg.batch  # drop the last partial batch
        self.total_steps = self.steps_per_epoch * cfg.epochs
        from ultralytics.utils.torch_utils import ModelEMA

        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
        self.ema = ModelEMA(self.model)
        self.state: dict[str, Any] = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "elapsed_s": 0.0,
                                      "history": [], "best_select_AP50": -1.0, "best_epoch": None,
                                      "config": asdict(cfg), "precision": "bf16" if self.bf16 else "fp32",
                                      "native_bf16": native}
        self._stop = False
        self.log(f"model {cfg.model} imgsz {cfg.imgsz} batch {cfg.batch} threads {cfg.threads} precision "
                 f"{self.state['precision']} (native bf16: {native}); {len(self.train_set)} train images, "
                 f"{self.steps_per_epoch} steps/epoch, {cfg.epochs} epochs")

    # --- state ------------------------------------------------------------------------
    def state_path(self) -> Path:
        return self.run / "state.pt"

    def save_state(self) -> None:

        self.state["ema_updates"] = self.ema.updates
        blob = {"model": self.model.state_dict(), "ema": self.ema.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "state": self.state}
        save_torch_atomically(blob, self.state_path())
        (self.run / "history.json").write_text(json.dumps(self.state["history"], indent=1))

    def try_resume(self) -> bool:
        import torch

        if not self.state_path().is_file():
            return False
        blob = torch.load(self.state_path(), map_location="cpu", weights_only=False)
        saved = blob["state"]["config"]
        for key in ("model", "imgsz", "batch", "epochs", "seed", "data"):
            if saved.get(key) != asdict(self.cfg).get(key):
                raise SystemExit(f"{self.state_path()} was made with {key}={saved.get(key)!r}, not "
                                 f"{asdict(self.cfg).get(key)!r}; use another --run folder or the same settings")
        self.model.load_state_dict(blob["model"])
        self.ema.ema.load_state_dict(blob["ema"])
        self.optimizer.load_state_dict(blob["optimizer"])
        self.state.update(blob["state"])
        self.ema.updates = self.state.get("ema_updates", 0)
        self.log(f"resumed at epoch {self.state['epoch'] + 1} step {self.state['step_in_epoch']}/{self.steps_per_epoch} "
                 f"(global step {self.state['global_step']}, {self.state['elapsed_s'] / 3600:.2f} h trained)")
        return True

    def _on_signal(self, signum, frame) -> None:
        self.log(f"signal {signum}: saving state and stopping after this step")
        self._stop = True

    def autocast(self):
        import torch

        return torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else nullcontext()

    # --- one step -----------------------------------------------------------------------
    def step(self, indices) -> dict[str, float]:
        import torch

        cfg = self.cfg
        seed_step(cfg.seed, self.state["global_step"])
        batch = collate(self.train_set, indices)
        img = batch["img"].float().div_(255)
        if self.bf16:
            img = img.contiguous(memory_format=torch.channels_last)
        batch["img"] = img
        lr = lr_at(self.state["global_step"], self.total_steps, cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.model.train()
        with self.autocast():
            preds = self.model(img)
        loss, items = self.model.loss(batch, preds)  # the loss itself in fp32
        self.optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=10.0)
        self.optimizer.step()
        self.ema.update(self.model)
        self.state["global_step"] += 1
        vals = [float(v) for v in (items.values() if isinstance(items, dict) else items)]
        return {"box": vals[0], "cls": vals[1], "dfl": vals[2], "lr": lr}

    # --- the run ------------------------------------------------------------------------
    def train(self, max_steps: int | None = None) -> dict:
        """Train to the end (or for ``max_steps`` steps of this session, then save and stop)."""
        cfg = self.cfg
        self._stop = False
        if self.state["global_step"] == 0:
            self.try_resume()
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        last_ckpt = time.monotonic()
        t_session = time.monotonic()
        elapsed0 = self.state["elapsed_s"]
        steps0 = self.state["global_step"]
        try:
            while self.state["epoch"] < cfg.epochs and not self._stop:
                epoch = self.state["epoch"]
                if epoch >= cfg.epochs - cfg.close_mosaic and self.hyp.mosaic > 0:
                    self.train_set.close_mosaic(self.hyp)
                    self.log(f"epoch {epoch + 1}: mosaic off for the last {cfg.close_mosaic} epochs")
                order = epoch_order(len(self.train_set), cfg.seed, epoch)
                # kept in the state so an epoch's mean loss survives a resume
                sums = self.state.setdefault("epoch_sums", {"box": 0.0, "cls": 0.0, "dfl": 0.0})
                self.state.setdefault("epoch_n", 0)
                while self.state["step_in_epoch"] < self.steps_per_epoch and not self._stop:
                    i = self.state["step_in_epoch"]
                    items = self.step(order[i * cfg.batch:(i + 1) * cfg.batch])
                    self.state["step_in_epoch"] += 1
                    self.state["epoch_n"] += 1
                    for k in sums:
                        sums[k] += items[k]
                    self.state["elapsed_s"] = elapsed0 + time.monotonic() - t_session
                    if self.state["global_step"] % 10 == 0:
                        done = self.state["global_step"] - steps0
                        rate = done / max(time.monotonic() - t_session, 1e-9)
                        left = self.total_steps - self.state["global_step"]
                        self.log(f"epoch {epoch + 1}/{cfg.epochs} step {i + 1}/{self.steps_per_epoch} "
                                 f"box {items['box']:.3f} cls {items['cls']:.3f} dfl {items['dfl']:.3f} "
                                 f"lr {items['lr']:.5f} | {rate * cfg.batch:.2f} img/s, epoch ETA "
                                 f"{(self.steps_per_epoch - i - 1) / rate / 60:.0f} min, run ETA {left / rate / 3600:.1f} h")
                    if max_steps is not None and self.state["global_step"] - steps0 >= max_steps:
                        self._stop = True
                    if time.monotonic() - last_ckpt > cfg.checkpoint_minutes * 60:
                        self.save_state()
                        last_ckpt = time.monotonic()
                if self._stop:
                    break
                row = {"epoch": epoch + 1, "hours": round(self.state["elapsed_s"] / 3600, 3),
                       **{f"train_{k}": v / max(self.state["epoch_n"], 1) for k, v in sums.items()}}
                t0 = time.monotonic()
                row.update(score_select(self.ema.ema, cfg, self.autocast()))
                row["select_seconds"] = round(time.monotonic() - t0, 1)
                self.state["history"].append(row)
                self.log(f"epoch {epoch + 1} done: " + json.dumps(row))
                if row["select_AP50"] > self.state["best_select_AP50"]:
                    self.state["best_select_AP50"] = row["select_AP50"]
                    self.state["best_epoch"] = epoch + 1
                    export_checkpoint(self.ema.ema, self.run / "best.pt", self.meta())
                    self.log(f"new best select AP50 {row['select_AP50']:.4f}: wrote {self.run / 'best.pt'}")
                export_checkpoint(self.ema.ema, self.run / "last.pt", self.meta())
                self.state["epoch"] += 1
                self.state["step_in_epoch"] = 0
                self.state["epoch_sums"] = {"box": 0.0, "cls": 0.0, "dfl": 0.0}
                self.state["epoch_n"] = 0
                self.save_state()
                last_ckpt = time.monotonic()
        finally:
            self.state["elapsed_s"] = elapsed0 + time.monotonic() - t_session
            self.save_state()
            for s, h in old.items():
                signal.signal(s, h)
        finished = self.state["epoch"] >= cfg.epochs
        self.log(("finished" if finished else "stopped") + f" after {self.state['elapsed_s'] / 3600:.2f} h; "
                 f"best select AP50 {self.state['best_select_AP50']:.4f} (epoch {self.state['best_epoch']})")
        return self.state

    def meta(self) -> dict:
        return {"trainer": "models/training/yolo_long_run.py", "config": asdict(self.cfg),
                "epoch": self.state["epoch"] + 1, "global_step": self.state["global_step"],
                "hours": round(self.state["elapsed_s"] / 3600, 3), "precision": self.state["precision"],
                "history": self.state["history"]}

    def bench(self, steps: int, warmup: int = 2) -> dict:
        """Seconds per training step (after ``warmup`` untimed steps), no checkpoints."""
        need = (warmup + steps) * self.cfg.batch
        order = np.resize(epoch_order(len(self.train_set), self.cfg.seed, 0), max(need, len(self.train_set)))
        secs, cpu = [], []
        for i in range(warmup + steps):
            idx = order[i * self.cfg.batch:(i + 1) * self.cfg.batch]
            t0, c0 = time.perf_counter(), time.process_time()
            self.step(idx)
            if i >= warmup:
                secs.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
        t0 = time.perf_counter()
        for i in range(min(steps, 5)):  # data loading + augmentation alone
            collate(self.train_set, order[i * self.cfg.batch:(i + 1) * self.cfg.batch])
        data_secs = (time.perf_counter() - t0) / min(steps, 5)
        s = float(np.median(secs))
        return {"model": self.cfg.model, "imgsz": self.cfg.imgsz, "batch": self.cfg.batch, "threads": self.cfg.threads,
                "precision": self.state["precision"], "steps": steps, "s_per_step_median": s,
                "s_per_step_mean": float(np.mean(secs)), "cpu_s_per_step_median": float(np.median(cpu)),
                "data_s_per_batch": data_secs, "img_per_s": self.cfg.batch / s,
                "train_images": len(self.train_set), "steps_per_epoch": self.steps_per_epoch,
                "epoch_hours": self.steps_per_epoch * s / 3600, "load_avg_1min": os.getloadavg()[0]}


def export_from_state(run: Path | str, out: Path | str) -> dict:
    """fp16 checkpoint of the EMA weights in ``<run>/state.pt`` (an unfinished run too:
    for measurements such as the ONNX export, not for shipping)."""
    import torch

    prepare_ultralytics_env()
    blob = torch.load(Path(run).expanduser() / "state.pt", map_location="cpu", weights_only=False)
    st = blob["state"]
    cfg = LongRunConfig(**st["config"])
    model = build_model(cfg)
    model.load_state_dict(blob["ema"])
    meta = {"trainer": "models/training/yolo_long_run.py", "config": st["config"], "from": "state.pt EMA",
            "epoch_in_progress": st["epoch"] + 1, "step_in_epoch": st["step_in_epoch"],
            "global_step": st["global_step"], "hours": round(st["elapsed_s"] / 3600, 3), "history": st["history"]}
    export_checkpoint(model, Path(out).expanduser(), meta)
    return meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["train", "bench", "export"])
    ap.add_argument("--data", default=None, help="train/bench: the dataset folder")
    ap.add_argument("--out", default=None, help="export: where to write the fp16 checkpoint of state.pt's EMA")
    ap.add_argument("--run", default=None, help="run folder (train: required; state.pt there is resumed)")
    ap.add_argument("--model", default="yolov8n.yaml")
    ap.add_argument("--imgsz", type=int, default=416)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--lr", type=float, default=0.002)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--close-mosaic", type=int, default=2)
    ap.add_argument("--checkpoint-minutes", type=float, default=5.0)
    ap.add_argument("--select-limit", type=int, default=None)
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    ap.add_argument("--steps", type=int, default=30, help="bench: timed steps")
    ap.add_argument("--bench-out", default=None, help="bench: append the result as a JSON line here")
    args = ap.parse_args(argv)
    if args.command == "export":
        if not args.run or not args.out:
            ap.error("export needs --run and --out")
        meta = export_from_state(args.run, args.out)
        print(f"wrote {args.out} (global step {meta['global_step']}, {meta['hours']} h)")
        return 0
    if not args.data:
        ap.error(f"{args.command} needs --data")
    data = str(Path(args.data).expanduser().resolve())
    if args.command == "train" and not args.run:
        ap.error("train needs --run")
    run = args.run or str(Path(os.environ.get("TMPDIR", "/tmp")) / "yolo-bench")
    cfg = LongRunConfig(data=data, run=str(Path(run).expanduser().resolve()), model=args.model, imgsz=args.imgsz,
                        batch=args.batch, epochs=args.epochs, lr=args.lr, threads=args.threads, seed=args.seed,
                        close_mosaic=args.close_mosaic, checkpoint_minutes=args.checkpoint_minutes,
                        select_limit=args.select_limit, precision=args.precision)
    if args.command == "bench":
        r = LongRun(cfg, log_to_file=False).bench(args.steps)
        print(json.dumps(r))
        if args.bench_out:
            with open(args.bench_out, "a") as f:
                f.write(json.dumps(r) + "\n")
        return 0
    LongRun(cfg).train()
    return 0


if __name__ == "__main__":
    sys.exit(main())
