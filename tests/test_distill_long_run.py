"""The long distillation run on generated tiny data: chip store, augmentation, resume,
quick eval, export into ResNet50Embedder. Runs in seconds (32 px inputs, batch 8)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data

from models.cpu_features import cpu_native_bf16
from models.embedders.resnet50 import ResNet50Embedder
from models.training.chip_augment import NO_AUGMENT, ChipAugmentConfig, augment_batch
from models.training.distill_trainer import DistillConfig, DistillRun, EpochSampler, lr_at
from models.training.face_chip_store import ChipStore
from models.types import FaceBox

pytestmark = pytest.mark.slow  # real (short) training runs

CHIP = 150


def generated_chips(n: int, seed: int = 0) -> np.ndarray:
    """150 px crops of skimage's astronaut at random offsets and scales."""
    import cv2

    rng = np.random.default_rng(seed)
    img = data.astronaut()
    out = np.empty((n, CHIP, CHIP, 3), np.uint8)
    for i in range(n):
        side = int(rng.integers(120, 300))
        x, y = (int(v) for v in rng.integers(0, 512 - side, 2))
        out[i] = cv2.resize(img[y : y + side, x : x + side], (CHIP, CHIP), interpolation=cv2.INTER_AREA)
    return out


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def make_store(root: Path, n_train: int = 40, n_eval_people: int = 8, seed: int = 0) -> ChipStore:
    """n_train training chips (one per photo) and 2 eval chips for each of n_eval_people,
    plus an eval_pairs.json over them; teacher vectors: random, an eval person's two
    chips get nearby vectors (so the teacher's own pair accuracy is high)."""
    rng = np.random.default_rng(seed)
    store = ChipStore.create(root, CHIP, n_train + 2 * n_eval_people + 16, 128, {"chip_padding": 0.25})
    chips = generated_chips(n_train + 2 * n_eval_people, seed)
    for i in range(n_train):
        t = unit(rng.normal(size=(1, 128)))
        store.add_photo("utkface", f"gen{i}.jpg", chips[i : i + 1], t,
                        [{"box": [0, 0, 10, 10], "split": "train", "identity": None}])
    for k in range(n_eval_people):
        base = rng.normal(size=(1, 128))
        for j in range(2):
            c = chips[n_train + 2 * k + j : n_train + 2 * k + j + 1]
            store.add_photo("lfw", f"P{k}/P{k}_{j + 1:04d}.jpg", c, unit(base + 0.2 * rng.normal(size=(1, 128))),
                            [{"box": [0, 0, 10, 10], "split": "eval", "identity": f"P{k}"}])
    pairs = [{"fold": k % 5, "a": f"P{k}/P{k}_0001.jpg", "b": f"P{k}/P{k}_0002.jpg", "same": True}
             for k in range(n_eval_people)]
    pairs += [{"fold": k % 5, "a": f"P{k}/P{k}_0001.jpg", "b": f"P{(k + 1) % n_eval_people}/P{(k + 1) % n_eval_people}_0002.jpg",
               "same": False} for k in range(n_eval_people)]
    (root / "eval_pairs.json").write_text(json.dumps({"pairs": pairs * 2}))
    return store


def tiny_config(store_dir: Path, run_dir: Path, **kw) -> DistillConfig:
    base = dict(data=str(store_dir), run=str(run_dir), input_size=32, batch_size=8, epochs=2.0, teacher="stored",
                warmup_samples=16, eval_every_steps=0, log_every_steps=2, checkpoint_minutes=1e9, precision="fp32")
    base.update(kw)
    return DistillConfig(**base)


def test_chip_store_resumes_and_drops_a_torn_photo(tmp_path):
    store = ChipStore.create(tmp_path / "s", CHIP, 10, 128, {})
    chips = generated_chips(3)
    store.add_photo("a", "x.jpg", chips[:2], unit(np.ones((2, 128))), [{"box": [0, 0, 1, 1]}] * 2)
    store.add_photo("a", "empty.jpg", chips[:0], np.zeros((0, 128), np.float32), [])
    # a writer killed after the chips and a torn manifest line, before files.jsonl
    with open(tmp_path / "s" / "manifest.jsonl", "a") as f:
        f.write('{"i": 2, "source": "a", "file": "y.jpg", "box": [0, 0, 1, 1]}\n{"i": 3, "sou')
    again = ChipStore(tmp_path / "s", "r+")
    assert again.count == 2 and again.is_done("a", "x.jpg") and again.is_done("a", "empty.jpg")
    assert not again.is_done("a", "y.jpg")
    again.add_photo("a", "y.jpg", chips[2:], unit(np.ones((1, 128))), [{"box": [0, 0, 1, 1]}])
    reader = ChipStore(tmp_path / "s")
    assert [r.file for r in reader.records()] == ["x.jpg", "x.jpg", "y.jpg"]
    np.testing.assert_array_equal(reader.chips[2], chips[2])
    assert reader.file_counts()["a"] == {"photos": 3, "photos_with_face": 2, "chips": 3}


def test_augmentation_is_a_function_of_seed_and_step():
    chips = generated_chips(4)
    cfg = ChipAugmentConfig()
    a = augment_batch(chips, 0, 5, cfg)
    np.testing.assert_array_equal(a, augment_batch(chips, 0, 5, cfg))
    assert a.shape == chips.shape and a.dtype == np.uint8
    assert not np.array_equal(a, augment_batch(chips, 0, 6, cfg))
    assert not np.array_equal(a, chips)
    np.testing.assert_array_equal(augment_batch(chips, 0, 5, NO_AUGMENT), chips)


def test_schedule_and_sampler():
    cfg = DistillConfig(lr=1e-3, batch_size=8, warmup_samples=32)
    lrs = [lr_at(s, cfg, 100) for s in range(101)]
    assert lrs[0] < lrs[3] == pytest.approx(1e-3) and lrs[100] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))  # cosine decay after warmup
    s = EpochSampler(seed=1)
    first = np.concatenate([s.next_batch(4, 12) for _ in range(3)])
    assert sorted(first) == list(range(12)) and s.epoch == 0
    nxt = s.next_batch(4, 20)  # the store grew: the next epoch covers the new chips
    assert s.epoch == 1 and s.size == 20 and len(nxt) == 4
    t = EpochSampler(seed=1)
    t.load(s.state())
    np.testing.assert_array_equal(t.next_batch(4, 20), s.next_batch(4, 20))


def _all_tensors(run: DistillRun) -> dict[str, torch.Tensor]:
    out = {f"net.{k}": v for k, v in run.net.state_dict().items()}
    out.update({f"ema.{k}": v for k, v in run.ema.net.state_dict().items()})
    for i, st in run.opt.state_dict()["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                out[f"opt.{i}.{k}"] = v
    return out


def test_resume_gives_the_same_state(tmp_path):
    torch.set_num_threads(1)
    make_store(tmp_path / "store", n_train=24)
    logs: list[str] = []
    straight = DistillRun(tiny_config(tmp_path / "store", tmp_path / "a"), log=logs.append)
    assert straight.train(max_steps=5) == "paused"  # 3 steps per epoch: crosses into epoch 2

    first = DistillRun(tiny_config(tmp_path / "store", tmp_path / "b"), log=logs.append)
    first.train(max_steps=2)
    del first
    resumed = DistillRun(tiny_config(tmp_path / "store", tmp_path / "b"), log=logs.append)
    assert resumed.step == 2 and any("resumed" in line for line in logs)
    resumed.train(max_steps=3)

    assert resumed.step == straight.step == 5 and resumed.sampler.state() == straight.sampler.state()
    a, b = _all_tensors(straight), _all_tensors(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the metrics log holds each step once, also across the resume
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "train"]
    assert steps == sorted(set(steps))


def test_a_run_refuses_another_recipe(tmp_path):
    make_store(tmp_path / "store")
    DistillRun(tiny_config(tmp_path / "store", tmp_path / "r")).save()
    with pytest.raises(ValueError, match="another recipe"):
        DistillRun(tiny_config(tmp_path / "store", tmp_path / "r", lr=5e-4))
    # runtime knobs may change between resumes
    DistillRun(tiny_config(tmp_path / "store", tmp_path / "r", eval_every_steps=7, checkpoint_minutes=3))


def test_quick_eval_and_export_load_in_resnet50_embedder(tmp_path):
    torch.set_num_threads(1)
    make_store(tmp_path / "store")
    run = DistillRun(tiny_config(tmp_path / "store", tmp_path / "r"))
    run.train(max_steps=2)
    row = run.evaluate()
    assert row["pairs"] == 32 and row["teacher"]["acc"] > 0.9  # the teacher's own vectors separate the pairs
    for key in ("student", "ema"):
        assert 0.0 <= row[key]["acc"] <= 1.0 and 0.0 <= row[key]["auc"] <= 1.0

    path = run.export(tmp_path / "student.pt", ema=True)
    emb = ResNet50Embedder(checkpoint=path, device="cpu")
    chips = np.array(run.store.chips[:5])
    out = emb.embed_chips(chips)
    assert out.shape == (5, 128) and emb.dim == 128
    assert emb.match_threshold == pytest.approx(row["ema"]["threshold_all_pairs"])
    ref = run.embed_eval_chips(run.ema.net, chips)
    # fp16 weights on disk vs the fp32 EMA in memory
    assert float(np.min(np.sum(out * ref, axis=1))) > 0.999
    meta = torch.load(path, weights_only=True)["meta"]
    assert meta["chip_size"] == 150 and meta["training"]["finished"] is False
    # the app's path: a box with landmarks is aligned at the chip size, then resized
    image = data.astronaut()
    lm = np.array([[255, 105], [238, 106], [195, 105], [212, 106], [226, 140]], np.float32)
    from models.align import face_chips

    boxes = [FaceBox(170, 40, 280, 170, 0.9, lm)]
    np.testing.assert_allclose(emb.embed(image, boxes), emb.embed_chips(face_chips(image, boxes, size=150)), atol=1e-6)


def test_online_teacher_sees_the_augmented_chip(tmp_path):
    from models.errors import WeightsNotFoundError
    from models.weights_locator import package_model_file

    try:
        package_model_file("dlib_face_recognition_resnet_model_v1.dat")
    except WeightsNotFoundError:
        pytest.skip("dlib face ResNet weights (face_recognition_models) not installed")
    torch.set_num_threads(1)
    make_store(tmp_path / "store")
    run = DistillRun(tiny_config(tmp_path / "store", tmp_path / "r", teacher="online"))
    from models.training.distill_data import teacher_flip_vectors

    chips = np.array(run.store.chips[:4])
    aug = augment_batch(chips, 0, 0, run.cfg.augment)
    online = run.teacher_vectors(aug, np.arange(4))
    np.testing.assert_allclose(online, teacher_flip_vectors(run.teacher, aug), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(online, axis=1), 1.0, atol=1e-5)
    assert run.train_step()["t_teacher"] > 0


def test_precision_follows_the_cpu(monkeypatch):
    monkeypatch.setenv("FACELAB_CPU_BF16", "0")
    assert not cpu_native_bf16()
    monkeypatch.setenv("FACELAB_CPU_BF16", "1")
    assert cpu_native_bf16()
    from models.training.distill_trainer import resolve_precision

    monkeypatch.setenv("FACELAB_CPU_BF16", "0")
    assert resolve_precision(DistillConfig(), torch.device("cpu")) == "fp32"
    assert resolve_precision(DistillConfig(precision="bf16"), torch.device("cpu")) == "bf16"


def test_cli_trains_resumes_with_a_bare_command_and_exports(tmp_path, capsys):
    from models.training.distill_long_run import main

    make_store(tmp_path / "store", n_train=16)
    common = ["--data", str(tmp_path / "store"), "--run", str(tmp_path / "run")]
    recipe = ["--input-size", "32", "--batch", "8", "--epochs", "3", "--teacher", "stored", "--precision", "fp32",
              "--eval-every", "0"]
    assert main(["train", *common, *recipe, "--max-steps", "1"]) == 0
    assert main(["train", *common, "--max-steps", "1"]) == 0  # resumes with the saved recipe
    log = (tmp_path / "run" / "train.log").read_text()
    assert "new run" in log and "resumed" in log and "at step 1/" in log
    with pytest.raises(ValueError, match="another recipe"):
        main(["train", *common, "--lr", "0.5", "--max-steps", "1"])
    assert main(["export", *common, "--out", str(tmp_path / "s.pt")]) == 0
    assert "step 2/6" in capsys.readouterr().out
    assert ResNet50Embedder(checkpoint=tmp_path / "s.pt", device="cpu").embed_chips(generated_chips(2)).shape == (2, 128)
    assert main(["plot", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "curve.png")]) == 0
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_read_only_reader_leaves_a_running_run_alone(tmp_path):
    """An export while the trainer runs must not touch its files: the trainer's metrics
    run ahead of its last saved state, and a writer would drop those rows on resume."""
    import time

    torch.set_num_threads(1)
    make_store(tmp_path / "store")
    run = DistillRun(tiny_config(tmp_path / "store", tmp_path / "r", log_every_steps=1))
    run.train(max_steps=1)  # state saved at step 1
    run._log_window([run.train_step()], time.monotonic())  # step 2 logged, not saved yet
    metrics = (tmp_path / "r" / "metrics.jsonl").read_text()
    assert '"step": 2' in metrics
    reader = DistillRun(tiny_config(tmp_path / "store", tmp_path / "r", log_every_steps=1), writer=False)
    assert reader.step == 1
    reader.evaluate(record=True)
    reader.export(tmp_path / "x.pt")
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == metrics
    with pytest.raises(PermissionError):
        reader.save()
