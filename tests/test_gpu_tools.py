"""The GPU-session tooling (tools/gpu_distill.py): what travels to the GPU machine and
back must arrive unchanged, and the teacher that travels must be the app's teacher."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tools.gpu_distill import _decode_webp, _encode_webp, bundle, load_teacher, save_teacher_fp16, unbundle


def test_bundle_round_trip_is_bit_exact_and_smaller_for_fp16_weights(tmp_path):
    rng = np.random.default_rng(0)
    weights = {f"w{i}": torch.from_numpy(rng.normal(0, 0.05, (256, 257)).astype(np.float16)) for i in range(8)}
    pt = tmp_path / "model.pt"
    torch.save(weights, pt)
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n' * 100)
    parts = bundle([pt, log, tmp_path / "absent.json"], tmp_path / "out", part_mib=0.25)
    assert len(parts) >= 2  # split into parts, as the device tool needs
    assert sum(p.stat().st_size for p in parts) < pt.stat().st_size  # fp16 byte planes compress
    back = unbundle(tmp_path / "out", tmp_path / "back")
    assert sorted(p.name for p in back) == ["log.jsonl", "model.pt"]
    assert (tmp_path / "back" / "model.pt").read_bytes() == pt.read_bytes()
    assert (tmp_path / "back" / "log.jsonl").read_bytes() == log.read_bytes()


def test_unbundle_refuses_a_damaged_part(tmp_path):
    f = tmp_path / "a.pt"
    f.write_bytes(np.random.default_rng(1).integers(0, 255, 300_000, dtype=np.uint8).tobytes())
    parts = bundle([f], tmp_path / "out", part_mib=0.1)
    data = bytearray(parts[-1].read_bytes())
    data[10] ^= 0x01
    parts[-1].write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        unbundle(tmp_path / "out", tmp_path / "back")


def test_webp_chips_round_trip_closely():
    from skimage import data

    chip = np.ascontiguousarray(data.astronaut()[40:190, 160:310])
    back = _decode_webp(_encode_webp(chip, 90))
    assert back.shape == chip.shape and back.dtype == np.uint8
    assert np.abs(back.astype(int) - chip.astype(int)).mean() < 4  # lossy, but the same face


def test_the_teacher_that_travels_as_fp16_embeds_like_the_apps_teacher(tmp_path):
    from models.errors import WeightsNotFoundError
    from models.embedders.dlib_resnet import DlibEmbedder

    try:
        info = save_teacher_fp16(tmp_path / "teacher.pt")
    except WeightsNotFoundError:
        pytest.skip("dlib face ResNet weights (face_recognition_models) not installed")
    assert info["teacher_bytes"] < 12_000_000  # half of dlib's 22.5 MB file
    from skimage import data

    rng = np.random.default_rng(2)
    chips = np.stack([np.ascontiguousarray(data.astronaut()[40:190, 160:310]),
                      rng.integers(0, 255, (150, 150, 3), dtype=np.uint8)])
    ref = DlibEmbedder(align=False).embed_chips(chips)
    net, version = load_teacher(tmp_path / "teacher.pt", "cpu")
    with torch.inference_mode():
        y = net(torch.from_numpy(chips).permute(0, 3, 1, 2).float())
    y = (y / y.norm(dim=1, keepdim=True)).numpy()
    assert version == DlibEmbedder(align=False).version
    assert np.all(np.sum(ref * y, axis=1) > 0.9999)
