"""The resumable CPU YOLO training loop: a stopped and resumed run ends where an
uninterrupted one does, and its best checkpoint loads as ``--detector yolo:PATH``."""

from __future__ import annotations

import os
import tempfile

os.environ["YOLO_OFFLINE"] = "1"
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="yolo-cfg-"))

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from models.detectors.factory import create_detector
from models.training.yolo_long_run import LongRun, LongRunConfig, cpu_has_native_bf16, lr_at
from models.training.yolo_dataset import yolo_label_lines

ASTRONAUT_FACE = (170, 30, 270, 150)


def make_split(root, split: str, n: int, seed: int, size: int = 96) -> None:
    """Noise images with a pasted astronaut face at a known box, YOLO labels."""
    rng = np.random.default_rng(seed)
    face = Image.fromarray(data.astronaut()).crop(ASTRONAUT_FACE)
    (root / "images" / split).mkdir(parents=True)
    (root / "labels" / split).mkdir(parents=True)
    for i in range(n):
        bg = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        w = int(rng.integers(size // 4, size // 2))
        h = int(w * face.height / face.width)
        x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
        bg.paste(face.resize((w, h)), (x, y))
        bg.save(root / "images" / split / f"{i:03d}.jpg", quality=95)
        lines, _ = yolo_label_lines([(x, y, x + w, y + h)], size, size)
        (root / "labels" / split / f"{i:03d}.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("yolo-data")
    make_split(root, "train", 12, seed=0)
    make_split(root, "select", 3, seed=1)
    return root


def config(dataset, run) -> LongRunConfig:
    return LongRunConfig(data=str(dataset), run=str(run), model="yolov8n.yaml", imgsz=64, batch=4, epochs=2,
                         warmup_steps=2, close_mosaic=1, threads=1, checkpoint_minutes=60.0)


@pytest.mark.slow
def test_stopped_and_resumed_run_matches_an_uninterrupted_one(dataset, tmp_path):
    whole = LongRun(config(dataset, tmp_path / "whole"), log_to_file=False)
    state = whole.train()
    assert state["epoch"] == 2 and state["global_step"] == 6  # 12 images / batch 4 = 3 steps x 2 epochs
    assert [row["epoch"] for row in state["history"]] == [1, 2]

    first = LongRun(config(dataset, tmp_path / "parts"), log_to_file=False)
    part = first.train(max_steps=4)  # stops inside epoch 2, after the epoch-1 checkpoint
    assert (part["epoch"], part["step_in_epoch"], part["global_step"]) == (1, 1, 4)
    second = LongRun(config(dataset, tmp_path / "parts"), log_to_file=False)
    state2 = second.train()
    assert state2["global_step"] == 6
    for (name, a), b in zip(whole.model.state_dict().items(), second.model.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert state2["history"][-1]["train_box"] == pytest.approx(state["history"][-1]["train_box"], rel=1e-4)

    # best.pt is an ultralytics checkpoint the app's YOLO detector loads (fp16, no optimizer)
    best = tmp_path / "parts" / "best.pt"
    ckpt = torch.load(best, map_location="cpu", weights_only=False)
    assert ckpt["optimizer"] is None and next(ckpt["model"].parameters()).dtype == torch.float16
    detector = create_detector(f"yolo:{best}", imgsz=64, conf=0.0001)
    boxes = detector.detect(data.astronaut())
    assert all(0 <= b.x1 < b.x2 <= 512 for b in boxes)


def test_resume_refuses_other_settings(dataset, tmp_path):
    run = LongRun(config(dataset, tmp_path / "r"), log_to_file=False)
    run.save_state()
    other = config(dataset, tmp_path / "r")
    other.imgsz = 96
    with pytest.raises(SystemExit, match="imgsz"):
        LongRun(other, log_to_file=False).try_resume()


def test_precision_and_schedule():
    # This project's machines differ: bf16 only where the CPU does it natively.
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    assert cpu_has_native_bf16() == (" avx512_bf16" in flags or " amx_bf16" in flags)
    cfg = LongRunConfig(data="x", run="y", lr=0.01, warmup_steps=10, final_lr_fraction=0.1)
    assert lr_at(0, 100, cfg) == pytest.approx(0.001)
    assert lr_at(9, 100, cfg) == pytest.approx(0.01)
    assert lr_at(100, 100, cfg) == pytest.approx(0.001)
    assert lr_at(55, 100, cfg) == pytest.approx(0.01 * (0.1 + 0.9 * 0.5))
