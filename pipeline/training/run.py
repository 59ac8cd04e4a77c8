"""One training run, in the steps ultralytics splits its trainer into:

    prepare (three splits)  ->  train (train split; best checkpoint picked on select)
    ->  fit the threshold (select)  ->  compare with the model in use (test)  ->  register

``DetectorRun`` and ``EmbedderRun`` share that skeleton (``TrainingRun.run``). Every step
records what it was given in ``runs/<run>/stages.json`` (the keys of the images or faces
each one actually received, read back from the trainers and evaluators themselves), so
a test can check that nothing the candidate was chosen on is in the data that decides
its promotion. Nothing here changes the model in use: a run ends with an inactive
``ModelVersion`` row (``pipeline.training.registry.promote`` switches).

Where training starts from is named as what it is: *from scratch* (an architecture,
random weights; the embedder distilled from the model in use) or *fine-tune* (a
checkpoint registered by FaceLab, sha256-checked before it is loaded; or, from the
command line only, a file of the machine's owner).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.context import Lab
from pipeline.errors import FaceLabError, InvalidRequest
from pipeline.training import registry
from pipeline.training.data import (
    JobCancelled,
    describe,
    detector_splits,
    embedder_splits,
    labelled_chipset,
    lfw_chipset,
)
from pipeline.training.evaluate import (
    Comparison,
    DetectorUnderTest,
    compare_detectors,
    compare_embeddings,
    compare_on_lfw_test_half,
    cpu_threads,
    fit_detector_conf,
    fit_match_threshold,
)

if TYPE_CHECKING:
    from pipeline.training.jobs import JobReporter, TrainRequest


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class RunOutcome:
    run_id: str
    run_dir: Path
    status: str
    version: registry.VersionInfo | None
    comparisons: dict[str, Comparison]
    message: str


@dataclass(frozen=True)
class StartPoint:
    """Where training starts: from scratch, or a checkpoint to fine-tune."""

    fine_tune: bool
    model: str | None  #: architecture name, or the checkpoint's path
    sha256: str | None = None  #: the checkpoint must still have this digest
    version_id: int | None = None
    description: str = ""


def start_point(lab: Lab, req: "TrainRequest") -> StartPoint:
    """Resolve ``req``'s start (see the module docstring); a registered checkpoint is
    sha256-checked here and again by the trainer right before it loads it."""
    from models.model_files import UntrustedModelFile, verify_sha256

    family = {"detector": "yolo", "embedder": "resnet50"}[req.kind]
    if req.init_version is not None:
        info = registry.get_version(lab, req.init_version)
        if info.kind != req.kind or info.name != family:
            raise InvalidRequest(f"Version #{info.id} is a {info.kind} ({info.name}); a {req.kind} fine-tunes from "
                                 f"a registered {family} version.")
        path = registry.resolve_spec(lab, info.spec).partition(":")[2] or (info.file_path or "")
        try:
            verify_sha256(path, info.sha256, f"registered {family} checkpoint #{info.id}")
        except (UntrustedModelFile, FileNotFoundError) as exc:
            raise InvalidRequest(str(exc)) from exc
        return StartPoint(True, path, info.sha256, info.id, f"fine-tune of registered {info.label()} (sha256 checked)")
    if req.model_path:
        return StartPoint(True, str(Path(req.model_path).expanduser()), None, None,
                          f"fine-tune of {req.model_path} (the owner's file, given on the command line)")
    if req.kind == "detector":
        return StartPoint(False, req.model, description=f"from scratch: {req.model} (random weights)")
    return StartPoint(False, None, description=(
        "from scratch: ResNet50 (random weights), distilled from the embedder in use "
        f"({lab.settings.embedder.partition(':')[0]})"))


def new_run(lab: Lab, kind: str) -> tuple[str, Path]:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    root = registry.runs_root(lab)
    for n in range(100):
        run_id = f"{stamp}-{kind}" + (f"-{n}" if n else "")
        try:
            (root / run_id).mkdir(parents=True)
            return run_id, root / run_id
        except FileExistsError:
            continue
    raise FaceLabError("could not create a run folder")


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - no torch, no GPU
        return False


@dataclass
class TrainingRun:
    """The shared skeleton; subclasses fill in the steps."""

    lab: Lab
    req: "TrainRequest"
    run_dir: Path
    reporter: "JobReporter"
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    run_doc: dict[str, Any] = field(default_factory=dict)

    @property
    def plots_dir(self) -> Path:
        return self.run_dir / "plots"

    def record_stage(self, name: str, split: str, items: list[str], **extra: Any) -> None:
        """What a step was given: the keys it actually received (from the step's own result)."""
        self.stages[name] = {"split": split, "count": len(items), "items": list(items), **extra}
        registry.write_json(self.run_dir / "stages.json", self.stages)

    def write_split(self, manifest: dict[str, Any], labels: dict[str, str]) -> None:
        registry.write_json(self.run_dir / "split.json", manifest)
        self.reporter.record.splits = labels
        self.reporter.write(force=True)

    def stop_if_cancelled(self, when: str) -> None:
        if self.reporter.cancelled:
            raise JobCancelled(f"cancelled {when}")

    # the steps
    def prepare(self) -> None: ...
    def train(self) -> None: ...
    def fit_threshold(self) -> None: ...
    def compare(self) -> dict[str, Comparison]: ...
    def register(self, comparisons: dict[str, Comparison]) -> registry.VersionInfo: ...

    def run(self) -> RunOutcome:
        self.start = start_point(self.lab, self.req)
        self.prepare()
        self.train()
        self.stop_if_cancelled("during training")
        self.reporter.phase("evaluating", "fitting the candidate's threshold on the select split")
        self.fit_threshold()
        comparisons = self.compare()
        self.reporter.phase("registering", "adding the candidate to the model registry")
        version = self.register(comparisons)
        return self.finish(version, comparisons)

    def finish(self, version: registry.VersionInfo, comparisons: dict[str, Comparison]) -> RunOutcome:
        registry.write_json(self.run_dir / "eval.json", {k: c.to_dict() for k, c in comparisons.items()})
        doc = registry.read_json(self.run_dir / "run.json") or {}
        split = registry.read_json(self.run_dir / "split.json") or {}
        doc.update({"run_id": self.run_dir.name, "kind": self.req.kind, "status": "done", "request": asdict(self.req),
                    "start": self.start.description, "version_id": version.id, "version": version.version,
                    "spec": version.spec, "data": {k: v for k, v in split.items() if not isinstance(v, list)},
                    **self.run_doc, "finished_at": _now()})
        registry.write_json(self.run_dir / "run.json", doc)
        main = comparisons["test"]
        line = ", ".join(f"{k} {v[0]:.3f} -> {v[-1]:.3f}" for k, v in list(main.metrics.items())[:3]
                         if v[0] is not None and v[-1] is not None)
        return RunOutcome(self.run_dir.name, self.run_dir, "done", version, comparisons,
                          f"Registered {version.label()} (not in use yet). In use -> candidate on the {main.data}: "
                          f"{line}.")


# ============================================================================ detector


class DetectorRun(TrainingRun):
    def prepare(self) -> None:
        from models.training.yolo_dataset import export_yolo_dataset

        req = self.req
        self.reporter.phase("preparing", "splitting the images three ways and exporting train/select as YOLO data")
        self.splits = detector_splits(self.lab, req.source, req.source_path, req.select_fraction, req.test_fraction,
                                      req.seed)
        self.write_split(self.splits.manifest, {s: self.splits.label(s) for s in ("train", "select", "test")})
        # the test images are not exported: ultralytics never sees them
        self.dataset = export_yolo_dataset(self.splits.train, self.splits.select, self.run_dir / "dataset",
                                           mode="symlink", on_progress=self.reporter.event)

    def train(self) -> None:
        from models.evaluation import plots
        from models.training.detector_trainer import DetectorTrainConfig, train_detector

        req = self.req
        cpu = not has_cuda() if req.device is None else req.device == "cpu"
        config = DetectorTrainConfig(
            project=self.run_dir / "work", name="train", model=self.start.model, model_sha256=self.start.sha256,
            epochs=req.epochs, imgsz=req.imgsz, batch=req.batch, device=req.device, workers=0 if cpu else 8,
            seed=req.seed, time_limit_min=req.minutes, val=req.validate_every_epoch, plots=False,
            patience=max(50, req.epochs), close_mosaic=min(10, req.epochs // 3),
            output=self.run_dir / "weights" / "detector.pt")
        registry.write_json(self.run_dir / "run.json", {"run_id": self.run_dir.name, "kind": "detector",
                                                        "status": "training", "request": asdict(req),
                                                        "start": self.start.description, "config": config.to_dict()})
        self.reporter.phase("training", f"{self.start.description}, {req.imgsz} px, on the "
                                        f"{self.splits.label('train')}")

        def stop() -> bool:
            # ultralytics' time mode re-plans the epochs to fill the minutes (so its LR
            # schedule ends annealed); the epochs asked for stay an upper bound
            return self.reporter.should_stop() or len(self.reporter.record.history) >= req.epochs

        with cpu_threads(req.threads):
            result = train_detector(config, self.dataset.data_yaml, on_progress=self.reporter.event, should_stop=stop)
            threads = _torch_threads()  # ultralytics sets min(8, cores - 1) itself on a CPU
        shutil.rmtree(result.run_dir / "weights", ignore_errors=True)  # optimizer-laden copies; ours is exported
        self.stop_if_cancelled("during training")
        if result.weights is None:
            raise FaceLabError("training ended before the first epoch finished; no weights to evaluate")
        self.result = result
        self.record_stage("training", "train", [_dataset_key(f) for f in result.trained_on])
        self.record_stage("checkpoint_selection", "select", [_dataset_key(f) for f in result.selected_on],
                          note="ultralytics validates on these every epoch and keeps the best as best.pt")
        self.curves = {}
        if result.history:
            keys = [k for k in result.history[0] if k.startswith("train/")][:3] + ["metrics/mAP50(B)"]
            self.curves["training"] = str(plots.training_curves(
                result.history, keys, self.plots_dir / "training_curves.png",
                f"detector training (metrics: select split, {describe(self.splits.sizes('select'))})"))
        self.run_doc.update({"train_seconds": result.seconds, "epochs_completed": result.epochs_completed,
                             "device": result.device, "torch_threads_training": threads, "history": result.history,
                             "ultralytics_val": result.metrics, "ultralytics_val_data": self.splits.label("select"),
                             "notes": result.notes})

    def _candidate(self, conf: float):
        from models.detectors.yolo_detector import YoloDetector
        from models.weights_locator import file_sha256

        self.weights_sha256 = getattr(self, "weights_sha256", None) or file_sha256(self.result.weights)
        return YoloDetector(self.result.weights, conf=conf, imgsz=self.req.imgsz, device=self.req.device,
                            sha256=self.weights_sha256)

    def fit_threshold(self) -> None:
        self.candidate = self._candidate(conf=0.001)  # every box, so the curve is complete
        fitted = fit_detector_conf(self.candidate, self.splits.loaders("select"), self.splits.boxes("select"),
                                   self.splits.keys("select"), self.reporter.event, self.reporter.should_stop)
        self.operating_conf = fitted.value
        self.record_stage("threshold", "select", fitted.items, value=fitted.value, best_f1=fitted.score,
                          what="the candidate's confidence threshold at its best F1"
                               + (f" (best at {fitted.best_at:.4f}, raised to the 0.05 floor)"
                                  if fitted.best_at is not None else ""))

    def compare(self) -> dict[str, Comparison]:
        data = self.splits.label("test")
        self.reporter.phase("evaluating", f"model in use vs candidate on the {data}")
        in_use_name = f"in use: {self.lab.settings.detector.partition(':')[0]}"
        comparison = compare_detectors(
            [DetectorUnderTest(in_use_name, self.lab.detector),
             DetectorUnderTest("candidate", self.candidate, operating_conf=self.operating_conf)],
            self.splits.loaders("test"), self.splits.boxes("test"), self.plots_dir, data,
            on_progress=self.reporter.event, should_stop=self.reporter.should_stop, keys=self.splits.keys("test"),
            data=data)
        comparison.plots.update(self.curves)
        self.record_stage("comparison", "test", comparison.details["items"])
        return {"test": comparison}

    def register(self, comparisons: dict[str, Comparison]) -> registry.VersionInfo:
        main = comparisons["test"]
        deployed = self._candidate(conf=self.operating_conf)
        summary = {k: main.metrics[k][-1] for k in ("AP50", "mAP50-95", "F1", "recall") if k in main.metrics}
        summary["measured on"] = main.data
        rel = registry.relative_to_data(self.lab, self.result.weights)
        return registry.register_version(
            self.lab, "detector", "yolo", deployed.version, f"yolo:{rel}", file_path=rel, sha256=self.weights_sha256,
            options={"imgsz": self.req.imgsz, "conf": round(self.operating_conf, 4)}, run_id=self.run_dir.name,
            summary=summary)


def _dataset_key(path: str) -> str:
    """The split key of an exported dataset file: ``images/val/000003_<stem>.jpg`` -> stem."""
    return Path(path).stem.split("_", 1)[-1]


# ============================================================================ embedder


def _stage_epochs(epochs: int, has_teacher: bool, margin_possible: bool) -> tuple[int, int]:
    total = int(epochs or 1)
    if not has_teacher:
        return 0, total
    if not margin_possible:
        return total, 0
    margin = total // 3
    return total - margin, margin


class EmbedderRun(TrainingRun):
    def prepare(self) -> None:
        req, reporter = self.req, self.reporter
        reporter.phase("preparing", "aligning the faces (the app's own path) and reading the teacher's vectors")
        if req.source == "lfw":
            cs = lfw_chipset(self.lab, req.source_path, req.seed, req.input_size, req.limit_images,
                             req.max_per_identity, reporter.event, reporter.should_stop)
        else:
            with cpu_threads():
                cs = labelled_chipset(self.lab, req.input_size, reporter.event, reporter.should_stop)
        self.splits = embedder_splits(cs, req.source, req.select_fraction, req.test_fraction, req.seed)
        self.write_split(self.splits.manifest, {s: self.splits.label(s) for s in ("train", "select", "test")})

    def train(self) -> None:
        from models.evaluation import plots
        from models.training.embedder_trainer import EmbedderTrainConfig, train_embedder

        req, train_set = self.req, self.splits.train
        train_counts = np.unique(train_set.labels[train_set.labels >= 0], return_counts=True)[1]
        distill, margin = _stage_epochs(req.epochs, train_set.teacher is not None, int((train_counts >= 2).sum()) >= 2)
        self.reporter.record.request["_stage_epochs"] = {"distill": distill, "margin": margin}
        config = EmbedderTrainConfig(
            output_dir=self.run_dir / "weights", input_size=req.input_size, distill_epochs=distill,
            margin_epochs=margin, batch_size=min(req.batch, max(2, len(train_set))), seed=req.seed,
            device=req.device, time_limit_min=req.minutes, max_steps_per_epoch=req.max_steps_per_epoch,
            log_every=1 if len(train_set) < 40 * req.batch else 5, save_every=1,
            init_checkpoint=self.start.model if self.start.fine_tune else None)
        registry.write_json(self.run_dir / "run.json", {"run_id": self.run_dir.name, "kind": "embedder",
                                                        "status": "training", "request": asdict(req),
                                                        "start": self.start.description, "config": config.to_dict()})
        self.reporter.phase("training", f"{self.start.description}, on the {self.splits.label('train')} "
                                        f"({distill} distillation + {margin} margin epochs)")
        if self.start.fine_tune and self.start.sha256:
            from models.model_files import verify_sha256

            verify_sha256(self.start.model, self.start.sha256, "start checkpoint")
        with cpu_threads(req.threads):
            threads = _torch_threads()
            result = train_embedder(config, train_set, select=self.splits.select, on_progress=self.reporter.event,
                                    should_stop=self.reporter.should_stop)
        self.stop_if_cancelled("during training")
        if result.checkpoint is None:
            raise FaceLabError("training ended before the first epoch finished; no weights to evaluate")
        self.weights = self.run_dir / "weights" / "embedder.pt"
        os.replace(result.checkpoint, self.weights)
        if result.last_checkpoint is not None:
            result.last_checkpoint.unlink(missing_ok=True)
        self.result = result
        self.record_stage("training", "train", result.trained_on)
        self.record_stage("checkpoint_selection", "select", result.selected_on,
                          note="the epoch with the best verification accuracy on these faces' pairs is kept")
        self.curves = {}
        if result.history:
            self.curves["training"] = str(plots.training_curves(
                result.history, ["train_loss", "val_acc", "val_rank1"], self.plots_dir / "training_curves.png",
                f"embedder training (val_*: select split, {describe(self.splits.sizes('select'))})"))
        self.run_doc.update({"train_seconds": result.seconds, "device": result.device, "history": result.history,
                             "torch_threads_training": threads, "best_select_metrics": result.best_metrics,
                             "teacher_select_metrics": result.teacher_metrics,
                             "select_data": self.splits.label("select")})

    def fit_threshold(self) -> None:
        from models.embedders.resnet50 import ResNet50Embedder
        from models.weights_locator import file_sha256

        self.weights_sha256 = file_sha256(self.weights)
        self.candidate = ResNet50Embedder(self.weights, device=self.req.device, sha256=self.weights_sha256)
        select_set = self.splits.select
        fitted = fit_match_threshold(self.candidate.embed_chips(select_set.chips), select_set.labels,
                                     select_set.sources, seed=self.req.seed)
        self.match_threshold = fitted.value
        self.record_stage("threshold", "select", fitted.items, value=fitted.value, accuracy=fitted.score,
                          what="the candidate's match threshold (best same/different accuracy)")
        self.run_doc.update({"match_threshold": fitted.value,
                             "match_threshold_note": f"best-accuracy threshold on the {self.splits.label('select')}"})

    def _in_use_threshold(self) -> float | None:
        try:
            return float(self.lab.match_threshold)
        except RuntimeError:
            return None

    def compare(self) -> dict[str, Comparison]:
        req, test = self.req, self.splits.test
        data = self.splits.label("test")
        self.reporter.phase("evaluating", f"model in use vs candidate on the {data}")
        in_use_name = f"in use: {self.lab.settings.embedder.partition(':')[0]}"
        comparisons = {"test": compare_embeddings(
            {in_use_name: test.teacher, "candidate": self.candidate.embed_chips(test.chips)}, test.labels,
            test.identities, self.plots_dir, data, seed=req.seed, items=test.sources,
            thresholds={in_use_name: self._in_use_threshold(), "candidate": self.match_threshold}, data=data)}
        self.record_stage("comparison", "test", comparisons["test"].details["items"])
        if req.source == "lfw":
            comparisons["lfw_test_half"] = compare_on_lfw_test_half(
                self.lab.detector, self.lab.landmarker, {in_use_name: self.lab.embedder, "candidate": self.candidate},
                req.source_path, self.plots_dir, max_pairs=req.eval_pairs, on_progress=self.reporter.event,
                should_stop=self.reporter.should_stop)
        comparisons["test"].plots.update(self.curves)
        return comparisons

    def register(self, comparisons: dict[str, Comparison]) -> registry.VersionInfo:
        main = comparisons["test"]
        summary = {k: main.metrics[k][-1] for k in ("verification accuracy", "ROC AUC", "rank-1") if k in main.metrics}
        summary["measured on"] = main.data
        if "lfw_test_half" in comparisons:
            summary["LFW test-half accuracy"] = comparisons["lfw_test_half"].metrics["LFW test-half accuracy"][-1]
        rel = registry.relative_to_data(self.lab, self.weights)
        return registry.register_version(
            self.lab, "embedder", "resnet50", self.candidate.version, f"resnet50:{rel}", file_path=rel,
            sha256=self.weights_sha256, run_id=self.run_dir.name, summary=summary,
            match_threshold=float(self.match_threshold))


def run_training(lab: Lab, req: "TrainRequest", reporter: "JobReporter") -> RunOutcome:
    """Prepare, train, fit, compare, register (synchronously, in the calling process)."""
    run_id, run_dir = new_run(lab, req.kind)
    reporter.record.run_id = run_id
    registry.write_json(run_dir / "run.json", {"run_id": run_id, "kind": req.kind, "status": "preparing",
                                               "request": asdict(req), "started_at": _now()})
    cls = DetectorRun if req.kind == "detector" else EmbedderRun
    return cls(lab, req, run_dir, reporter).run()
