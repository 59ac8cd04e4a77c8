"""YOLO dataset export and a tiny offline ultralytics training run on CPU."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path

# ultralytics reads these at import time: offline, and settings in a temp folder
os.environ["YOLO_OFFLINE"] = "1"
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="yolo-cfg-"))

import numpy as np
import pytest
from PIL import Image
from skimage import data

from models.training.yolo_dataset import (
    DetSample,
    export_face_mask,
    export_yolo_dataset,
    split_samples,
    yolo_label_lines,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ASTRONAUT_FACE = (170, 30, 270, 150)  # x1, y1, x2, y2 of the face in skimage's astronaut


def make_images(folder: Path, n: int, size: int = 128, seed: int = 0) -> list[DetSample]:
    """Noise backgrounds with 1-2 pasted astronaut faces at known boxes."""
    rng = np.random.default_rng(seed)
    face = Image.fromarray(data.astronaut()).crop(ASTRONAUT_FACE)
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(n):
        bg = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        boxes = []
        for _ in range(int(rng.integers(1, 3))):
            w = int(rng.integers(size // 5, size // 2))
            h = int(w * face.height / face.width)
            x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
            bg.paste(face.resize((w, h)), (x, y))
            boxes.append((float(x), float(y), float(x + w), float(y + h)))
        path = folder / f"img{i}.png"
        bg.save(path)
        samples.append(DetSample(path, boxes))
    return samples


@pytest.fixture
def no_network(monkeypatch):
    """Fail (and record) any DNS lookup or socket connect during the test."""
    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[:2]))
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def test_label_lines_normalise_and_clip():
    lines, dropped = yolo_label_lines([(10, 20, 30, 60), (-5, -5, 5, 5), (50, 50, 50, 80), (90, 90, 120, 130)], 100, 100)
    assert lines[0] == "0 0.200000 0.400000 0.200000 0.400000"
    assert lines[1] == "0 0.025000 0.025000 0.050000 0.050000"  # clipped at the top-left corner
    assert lines[2] == "0 0.950000 0.950000 0.100000 0.100000"  # clipped at the bottom-right corner
    assert len(lines) == 3 and dropped == 1  # the zero-width box


def test_split_is_image_disjoint_and_seeded(tmp_path):
    samples = [DetSample(tmp_path / f"{i}.jpg", [(0, 0, 1, 1)]) for i in range(10)]
    samples.append(DetSample(tmp_path / "3.jpg", [(2, 2, 3, 3)]))  # same image again: merged
    train, val = split_samples(samples, 0.3, seed=1)
    assert len(train) + len(val) == 10 and len(val) == 3
    assert {s.image for s in train}.isdisjoint({s.image for s in val})
    merged = next(s for s in train + val if s.image.name == "3.jpg")
    assert len(merged.boxes) == 2
    assert [s.image for s in split_samples(samples, 0.3, seed=1)[1]] == [s.image for s in val]


def test_export_writes_yolo_layout(tmp_path):
    samples = make_images(tmp_path / "src", 4, size=96)
    train, val = split_samples(samples, 0.25, seed=0)
    info = export_yolo_dataset(train, val, tmp_path / "ds", mode="jpeg", max_side=64)
    assert info.boxes["train"] + info.boxes["val"] == sum(len(s.boxes) for s in samples)
    imgs = sorted((tmp_path / "ds" / "images" / "train").glob("*.jpg"))
    assert len(imgs) == 3 and max(Image.open(imgs[0]).size) == 64
    label = (tmp_path / "ds" / "labels" / "train" / (imgs[0].stem + ".txt")).read_text().split()
    src = next(s for s in train if s.image.stem == imgs[0].stem.split("_", 1)[1])
    x1, y1, x2, y2 = src.boxes[0]
    assert float(label[1]) == pytest.approx((x1 + x2) / 2 / 96, abs=1e-5)  # normalised: resize-proof
    text = info.data_yaml.read_text()
    assert "train: images/train" in text and "0: face" in text and str((tmp_path / "ds").resolve()) in text
    linked = export_yolo_dataset(train, val, tmp_path / "ds2", mode="symlink")
    assert next((tmp_path / "ds2" / "images" / "val").iterdir()).is_symlink()
    assert linked.boxes == info.boxes


@pytest.mark.slow
def test_train_detector_one_epoch_offline(tmp_path, no_network):
    from models.training.detector_trainer import DetectorTrainConfig, ensure_data_yaml, train_detector

    samples = make_images(tmp_path / "src", 10, size=128)
    train, val = split_samples(samples, 0.2, seed=0)
    export_yolo_dataset(train, val, tmp_path / "ds", mode="copy")
    # carried datasets: a yaml whose recorded path is gone is re-pointed at its folder
    moved = tmp_path / "moved"
    (tmp_path / "ds").rename(moved)
    data_yaml = ensure_data_yaml(moved / "data.yaml")
    assert str(moved.resolve()) in data_yaml.read_text()

    events = []
    cfg = DetectorTrainConfig(project=tmp_path / "runs", model="yolov8n.yaml", epochs=1, imgsz=96, batch=4,
                              workers=0, device="cpu", mosaic=0.0, close_mosaic=0, output=tmp_path / "face-yolo.pt")
    result = train_detector(cfg, data_yaml, on_progress=events.append)

    assert no_network == []
    assert not result.stopped and result.epochs_completed == 1
    assert result.weights == tmp_path / "face-yolo.pt" and result.weights.is_file()
    assert result.version.startswith("yolo-") and len(result.version) == 17
    assert result.run_dir.parent == (tmp_path / "runs").resolve()
    assert (result.run_dir / "results.csv").is_file()
    assert "metrics/mAP50(B)" in result.metrics and 0.0 <= result.metrics["metrics/mAP50(B)"] <= 1.0
    epochs = [e for e in events if e["kind"] == "epoch"]
    assert len(epochs) == 1 and epochs[0]["epoch"] == 1 and "train/box_loss" in epochs[0]

    import torch

    ckpt = torch.load(result.weights, map_location="cpu", weights_only=False)
    assert ckpt.get("optimizer") is None  # stripped
    assert next(ckpt["model"].parameters()).dtype == torch.float16
    from ultralytics import YOLO

    boxes = YOLO(str(result.weights)).predict(np.zeros((96, 96, 3), np.uint8), imgsz=96, verbose=False)[0].boxes
    assert boxes is not None  # the exported file is a loadable ultralytics model


@pytest.mark.slow
def test_train_detector_stops_when_asked(tmp_path, no_network, monkeypatch):
    from models.training.detector_trainer import DetectorTrainConfig, train_detector

    # as on the GPU machine: no polars (the trainer reads results.csv without it)
    monkeypatch.setitem(sys.modules, "polars", None)

    samples = make_images(tmp_path / "src", 8, size=96, seed=1)
    train, val = split_samples(samples, 0.25, seed=0)
    info = export_yolo_dataset(train, val, tmp_path / "ds", mode="copy")
    polls = {"n": 0}

    def should_stop() -> bool:
        polls["n"] += 1
        return True  # asked at the first batch

    cfg = DetectorTrainConfig(project=tmp_path / "runs", model="yolov8n.yaml", epochs=5, imgsz=64, batch=2,
                              workers=0, device="cpu", mosaic=0.0, close_mosaic=0, val=False)
    result = train_detector(cfg, info.data_yaml, should_stop=should_stop)
    assert result.stopped and polls["n"] >= 1
    assert result.epochs_completed == 1  # ended after the first batch's epoch, not 5
    assert result.weights is not None and result.weights.is_file()
    assert no_network == []


@pytest.mark.data
def test_face_mask_conversion(tmp_path):
    root = SHARED_DATA / "face_mask"
    if not (root / "train.txt").is_file():
        pytest.skip("../shared/data/face_mask is not here")
    info = export_face_mask(root, tmp_path / "fm", mode="symlink")
    assert len(info.train_images) == 528 and len(info.val_images) == 175
    assert info.dropped_boxes == 0
    for split in ("train", "val"):  # every VOC <object> of the split becomes one label line
        stems = (root / f"{split}.txt").read_text().split()
        objects = sum((root / "annotations" / f"{s}.xml").read_text().count("<object>") for s in stems)
        assert info.boxes[split] == objects
    assert info.boxes["val"] == 895  # as in ../shared/notes/measurements.md
    train_stems = {Path(p).stem for p in info.train_images}
    assert train_stems == set((root / "train.txt").read_text().split())


def test_weights_travel_in_parts_and_join_checks_them(tmp_path):
    from tools.gpu_train import join_parts, split_file

    blob = np.random.default_rng(0).integers(0, 256, 2500, dtype=np.uint8).tobytes()
    (tmp_path / "w.pt").write_bytes(blob)
    parts = split_file(tmp_path / "w.pt", tmp_path / "out", part_bytes=1000)
    assert [p.name for p in parts] == ["w.pt.part00", "w.pt.part01", "w.pt.part02"]
    assert join_parts(tmp_path / "out", "w.pt", tmp_path / "back").read_bytes() == blob
    parts[1].write_bytes(b"x" * 1000)  # a damaged part is refused
    with pytest.raises(ValueError):
        join_parts(tmp_path / "out", "w.pt", tmp_path / "back2")


def test_gpu_payload_pick_and_carried_yaml(tmp_path):
    from models.training.detector_trainer import ensure_data_yaml
    from tools.gpu_train import pick_payload

    def items(src: str, n: int, size: int) -> list[dict]:
        return [{"source": src, "split": "train", "bytes": size} for _ in range(n)]

    pool = {"face_mask": items("face_mask", 3, 100), "webfaces": items("webfaces", 50, 10),
            "crowds": items("crowds", 50, 40)}
    picked = pick_payload(pool, budget=700, whole=("face_mask",), per_file=0)
    spent = {s: sum(it["bytes"] for it in picked if it["source"] == s) for s in pool}
    assert spent["face_mask"] == 300 and abs(spent["webfaces"] - spent["crowds"]) <= 40  # equal bytes each
    assert sum(spent.values()) <= 700

    # the payload's relative path is resolved against the yaml's folder; other keys stay
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/select\nnames:\n  0: face\n")
    text = ensure_data_yaml(tmp_path / "ds" / "data.yaml").read_text()
    assert f"path: {(tmp_path / 'ds').resolve()}" in text and "val: images/select" in text
