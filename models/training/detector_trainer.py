"""Train a YOLO face detector with ultralytics, offline, with progress and cancel hooks.

ultralytics reaches for the network in a few places; each is closed here:

* ``YOLO_OFFLINE=1`` (set before the first import) makes ``ONLINE`` False, which turns
  off its usage events; ``YOLO_AUTOINSTALL=false`` stops pip installs of missing extras.
* ``YOLO_CONFIG_DIR`` defaults to a temp folder so its settings file never lands in ~.
* ``check_det_dataset`` calls ``check_font`` which HEADs/downloads Arial.ttf: patched to
  a no-op (fonts only matter for plots, and plots are off unless asked).
* On CUDA, ``amp=True`` runs ``check_amp``, which downloads yolo26n.pt to compare fp32
  and fp16 outputs. ``amp="bf16"`` skips that check (trainer.py: the check runs only when
  ``amp != "bf16"``) and is our default on GPUs with bf16 (Ampere+, e.g. H100/H200);
  ``amp="fp16"`` patches ``trainer.check_amp`` to answer True for the run instead.
* A ``.yaml`` model (e.g. "yolov8s.yaml", one of ``models.model_files.ARCHITECTURES``) is
  built from ultralytics' bundled config: no weights are fetched or read (from scratch).
  A ``.pt`` start checkpoint (fine-tuning) must be a local file, and since ultralytics
  unpickles it, either registered (``model_sha256`` is checked first) or the owner's own.

Progress comes from ultralytics callbacks (``on_train_batch_end``, ``on_fit_epoch_end``);
``should_stop()`` sets ``trainer.stop``, which ultralytics checks after every batch, so a
cancelled run still ends cleanly with its best weights so far.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from models.weights_locator import file_sha256

ProgressFn = Callable[[dict], None]


@dataclass
class DetectorTrainConfig:
    project: Path | str = "runs/detector"  #: ultralytics' work folder (all its writes go here)
    name: str = "train"
    #: an architecture from models.model_files.ARCHITECTURES (from scratch) or a local .pt
    #: to fine-tune (unpickled: see resolve_start_model)
    model: str = "yolov8s.yaml"
    model_sha256: str | None = None  #: a .pt model must have this digest (a registered checkpoint)
    epochs: int = 100
    imgsz: int = 640
    batch: int = 16
    device: str | None = None  #: None: first CUDA GPU if any, else cpu
    workers: int = 8
    seed: int = 0
    deterministic: bool = True  #: False is faster on GPUs (cuDNN picks the fastest kernels)
    optimizer: str = "auto"
    lr0: float | None = None
    patience: int = 100
    time_limit_min: float | None = None  #: stop after this many minutes (ultralytics' ``time``)
    cache: bool | str = False  #: "ram" keeps decoded images in memory (fast on a GPU box)
    val: bool = True  #: validate every epoch (False: only at the end)
    plots: bool = False
    amp: str = "auto"  #: "auto" (bf16 if supported, else off), "bf16", "fp16", "off"
    # augmentation (ultralytics names and meanings)
    degrees: float = 0.0
    translate: float = 0.1
    scale: float = 0.5
    fliplr: float = 0.5
    hsv_h: float = 0.015
    hsv_s: float = 0.7
    hsv_v: float = 0.4
    mosaic: float = 1.0
    close_mosaic: int = 10
    #: exported weights: fp16 .pt without optimizer (None: <run>/face-yolo.pt)
    output: Path | str | None = None
    export_onnx: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  #: any other ultralytics train argument

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["project"] = str(self.project)
        d["output"] = None if self.output is None else str(self.output)
        return d


@dataclass
class DetectorTrainResult:
    weights: Path | None  #: exported fp16 weights
    onnx: Path | None
    version: str  #: "yolo-<sha256[:12]>" of ``weights``
    run_dir: Path
    metrics: dict[str, float]  #: final validation of the best weights
    history: list[dict[str, Any]]
    epochs_completed: int
    stopped: bool
    seconds: float
    device: str
    notes: list[str]
    #: the image files ultralytics' train and val loaders read: what trained, and what
    #: picked best.pt (the dataset's val = the job's select split)
    trained_on: list[str] = field(default_factory=list)
    selected_on: list[str] = field(default_factory=list)
    pretrained: bool = False  #: fine-tuned from a checkpoint (else from scratch)


def prepare_ultralytics_env(config_dir: Path | str | None = None) -> None:
    """Set ultralytics' environment before it is imported (no effect afterwards)."""
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    if config_dir is not None:
        os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
    elif not os.environ.get("YOLO_CONFIG_DIR"):
        cfg = Path(tempfile.gettempdir()) / "facelab-ultralytics"
        cfg.mkdir(parents=True, exist_ok=True)
        os.environ["YOLO_CONFIG_DIR"] = str(cfg)


def import_ultralytics():
    """Import ultralytics offline-safe and return its ``YOLO`` class."""
    if "ultralytics" not in sys.modules:
        prepare_ultralytics_env()
    import ultralytics.data.utils as data_utils
    from ultralytics import YOLO
    from ultralytics.utils import events

    data_utils.check_font = lambda *args, **kwargs: None  # would download Arial.ttf
    events.events.enabled = False  # usage analytics, in case ultralytics was imported online
    return YOLO


def _polars_available() -> bool:
    try:
        import polars  # noqa: F401
    except ImportError:
        return False
    return True


def _read_results_csv_plain(trainer) -> dict[str, list]:
    """``BaseTrainer.read_results_csv`` without polars: {column: [values]}."""
    import csv

    try:
        with open(trainer.csv, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return {}
    out: dict[str, list] = {}
    for row in rows:
        for k, v in row.items():
            k = (k or "").strip()
            try:
                value: Any = float(v)
            except (TypeError, ValueError):
                value = v
            out.setdefault(k, []).append(value)
    return out


@contextmanager
def _without_polars_if_missing():
    """ultralytics' trainer imports polars (~170 MB unpacked) only to put results.csv
    into each checkpoint. Where polars is absent (the GPU machine) read it with the csv
    module instead, so one fewer large wheel has to travel."""
    if _polars_available():
        yield
        return
    from ultralytics.engine.trainer import BaseTrainer

    original = BaseTrainer.read_results_csv
    BaseTrainer.read_results_csv = _read_results_csv_plain
    try:
        yield
    finally:
        BaseTrainer.read_results_csv = original


@contextmanager
def _fp16_amp_check_patched():
    """``amp="fp16"``: answer ultralytics' AMP self-test without its download."""
    import ultralytics.engine.trainer as trainer_mod

    original = trainer_mod.check_amp
    trainer_mod.check_amp = lambda model: True
    try:
        yield
    finally:
        trainer_mod.check_amp = original


def _resolve_device(device: str | None) -> str:
    import torch

    if device:
        return device
    return "0" if torch.cuda.is_available() else "cpu"


def _amp_argument(amp: str, device: str) -> bool | str:
    import torch

    if device == "cpu" or amp == "off":
        return False
    if amp == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else False
    if amp in ("bf16", "fp16"):
        return amp
    raise ValueError(f"amp must be auto, bf16, fp16 or off, not {amp!r}")


def ensure_data_yaml(data_yaml: Path | str) -> Path:
    """Point the yaml's ``path`` at its own folder when the recorded one is relative or
    gone (a dataset exported on one machine and carried to another, where the repo sits
    elsewhere). ultralytics would resolve a relative ``path`` against its own datasets
    folder, not the yaml's. Other keys (``train``, ``val``: e.g. images/select) stay."""
    import yaml

    data_yaml = Path(data_yaml).resolve()
    spec = yaml.safe_load(data_yaml.read_text()) or {}
    recorded = spec.get("path")
    if recorded and Path(recorded).is_absolute() and Path(recorded).is_dir():
        return data_yaml
    relative = recorded and not Path(recorded).is_absolute()
    root = (data_yaml.parent / recorded).resolve() if relative else data_yaml.parent  # a gone absolute: here
    kept = {k: v for k, v in spec.items() if k != "path"}
    spec = {"path": str(root), "train": "images/train", "val": "images/val", "names": {0: "face"}, **kept}
    data_yaml.write_text(yaml.safe_dump(spec, sort_keys=False))
    return data_yaml


def _plain(d: dict | None) -> dict[str, Any]:
    out = {}
    for k, v in (d or {}).items():
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            continue
    return out


def export_weights(best: Path, out: Path) -> Path:
    """fp16 copy of a trained checkpoint with optimizer/EMA/training state stripped."""
    from ultralytics.utils.torch_utils import strip_optimizer

    out.parent.mkdir(parents=True, exist_ok=True)
    strip_optimizer(best, s=str(out))
    return out


def resolve_start_model(model: str, sha256: str | None = None) -> tuple[str, bool]:
    """(what to hand ultralytics, whether it is pretrained) for ``model``:

    * an architecture name from ``models.model_files.ARCHITECTURES``: built from
      ultralytics' bundled config, random weights (from scratch);
    * a local ``.pt``: fine-tuned from it. With ``sha256`` the file must still have that
      digest (a registered checkpoint); without, the caller vouches for it (the owner's
      command line). It is unpickled by ultralytics, so nothing else may reach here.
    """
    from models.errors import WeightsNotFoundError
    from models.model_files import check_architecture, verify_sha256

    if model.endswith((".yaml", ".yml")):
        return check_architecture(model), False
    if not Path(model).is_file():
        raise WeightsNotFoundError("yolo", model, "Give a local .pt checkpoint or a bundled .yaml such as yolov8s.yaml.")
    if sha256 is not None:
        verify_sha256(model, sha256, "start checkpoint")
    return str(Path(model).resolve()), True


class _TrainingWatch:
    """ultralytics callbacks: progress events, per-epoch history, the stop request."""

    def __init__(self, emit: ProgressFn, stop: Callable[[], bool]) -> None:
        self.emit, self.stop = emit, stop
        self.history: list[dict[str, Any]] = []
        self.batches = 0
        self.stopped = False
        self.final: dict[str, Any] | None = None  #: ultralytics' validation of best.pt
        self.in_epoch = False

    def attach(self, model) -> None:
        model.add_callback("on_train_epoch_start", self.on_epoch_start)
        model.add_callback("on_train_batch_end", self.on_batch_end)
        model.add_callback("on_fit_epoch_end", self.on_fit_epoch_end)

    def _check_stop(self, trainer) -> None:
        if not trainer.stop and self.stop():
            self.stopped = True
            trainer.stop = True

    def on_epoch_start(self, trainer) -> None:
        self.in_epoch = True

    def on_batch_end(self, trainer) -> None:
        self.batches += 1
        if self.batches % 10 == 0:
            self.emit({"kind": "step", "epoch": trainer.epoch + 1, "epochs": trainer.epochs, "batches": self.batches,
                       "loss": _plain(trainer.tloss)})
        self._check_stop(trainer)

    def on_fit_epoch_end(self, trainer) -> None:
        row = {"epoch": trainer.epoch + 1, **_plain(trainer.metrics)}
        if not self.in_epoch:
            self.final = row  # final_eval's call after the loop: the validation of best.pt
            return
        self.in_epoch = False
        if trainer.tloss is not None:
            row.update({f"train/{k}": v for k, v in _plain(trainer.tloss).items()})
        self.history.append(row)
        self.emit({"kind": "epoch", "epochs": trainer.epochs, **row})
        self._check_stop(trainer)


def _train_arguments(config: DetectorTrainConfig, data_yaml: Path, device: str, amp: bool | str,
                     pretrained: bool) -> dict[str, Any]:
    project = Path(config.project).resolve()
    project.mkdir(parents=True, exist_ok=True)
    args: dict[str, Any] = {
        "data": str(data_yaml), "epochs": config.epochs, "imgsz": config.imgsz, "batch": config.batch,
        "device": device, "workers": config.workers, "seed": config.seed, "deterministic": config.deterministic,
        "optimizer": config.optimizer, "patience": config.patience, "cache": config.cache, "val": config.val,
        "plots": config.plots, "amp": amp, "project": str(project), "name": config.name, "exist_ok": True,
        "pretrained": pretrained, "degrees": config.degrees, "translate": config.translate, "scale": config.scale,
        "fliplr": config.fliplr, "hsv_h": config.hsv_h, "hsv_s": config.hsv_s, "hsv_v": config.hsv_v,
        "mosaic": config.mosaic, "close_mosaic": config.close_mosaic, "verbose": False,
    }
    if config.lr0 is not None:
        args["lr0"] = config.lr0
    if config.time_limit_min is not None:
        args["time"] = config.time_limit_min / 60.0
    args.update(config.extra)
    return args


def _loader_files(loader) -> list[str]:
    """The image files an ultralytics data loader read (its dataset's ``im_files``)."""
    return [str(p) for p in getattr(getattr(loader, "dataset", None), "im_files", []) or []]


def _export(config: DetectorTrainConfig, trainer, YOLO, notes: list[str]) -> tuple[Path | None, Path | None, str]:
    """fp16 weights (and ONNX if asked) from ultralytics' best (else last) checkpoint,
    files this run has just written."""
    best = Path(trainer.best) if Path(trainer.best).exists() else Path(trainer.last)
    if not best.exists():
        notes.append("no weights were saved (stopped before the first epoch ended)")
        return None, None, ""
    run_dir = Path(trainer.save_dir)
    weights = export_weights(best, Path(config.output) if config.output else run_dir / "face-yolo.pt")
    onnx_path = None
    if config.export_onnx:
        if importlib.util.find_spec("onnx") is None:
            notes.append("ONNX export skipped: the onnx package is not installed")
        else:
            exported = YOLO(str(weights)).export(format="onnx", imgsz=config.imgsz, dynamic=True,
                                                 simplify=False, half=False, device="cpu")
            onnx_path = Path(exported)
    return weights, onnx_path, f"yolo-{file_sha256(weights)[:12]}"


def train_detector(
    config: DetectorTrainConfig,
    data_yaml: Path | str,
    on_progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> DetectorTrainResult:
    """Train (see module docstring); returns the exported weights and the metrics.

    The dataset's ``val`` images are what ultralytics validates on every epoch and
    picks ``best.pt`` with: a *select* split, not a place for a fair comparison (callers
    keep a test split out of the dataset). The result lists the files each loader read.
    """
    t0 = time.monotonic()
    emit = on_progress or (lambda event: None)
    YOLO = import_ultralytics()
    data_yaml = ensure_data_yaml(data_yaml)
    device = _resolve_device(config.device)
    amp = _amp_argument(config.amp, device)
    notes: list[str] = []
    model_spec, pretrained = resolve_start_model(str(config.model), config.model_sha256)
    model = YOLO(model_spec)
    watch = _TrainingWatch(emit, should_stop or (lambda: False))
    watch.attach(model)
    args = _train_arguments(config, data_yaml, device, amp, pretrained)
    emit({"kind": "info", "device": device, "amp": amp, "model": model_spec, "data": str(data_yaml),
          "start": "fine-tune" if pretrained else "from scratch"})
    with _without_polars_if_missing():
        if amp == "fp16":
            with _fp16_amp_check_patched():
                model.train(**args)
        else:
            model.train(**args)

    trainer = model.trainer
    weights, onnx_path, version = _export(config, trainer, YOLO, notes)
    final = watch.final or (watch.history[-1] if watch.history else {})
    return DetectorTrainResult(
        weights=weights,
        onnx=onnx_path,
        version=version,
        run_dir=Path(trainer.save_dir),
        metrics={k: v for k, v in final.items() if k != "epoch" and not k.startswith("train/")},
        history=watch.history,
        epochs_completed=len(watch.history),
        stopped=watch.stopped,
        seconds=time.monotonic() - t0,
        device=device,
        notes=notes,
        trained_on=_loader_files(getattr(trainer, "train_loader", None)),
        selected_on=_loader_files(getattr(trainer, "test_loader", None)),
        pretrained=pretrained,
    )
