"""ONNX Runtime vs PyTorch for our YOLO face detector, in one process, on real photos.

    nice -n 19 python bench/yolo_onnx.py --weights ~/facelab-runs/<run>/best.pt \
        [--imgsz 640] [--images 40] [--threads 1] [--onnx-dir ~/facelab-runs/onnx] \
        [--out docs/results/yolo_onnx.json]

Exports the checkpoint with ultralytics (offline, fp32, static shape), then on the first
``--images`` face_mask val photos, interleaved image by image so both see the same
machine load:

* network only: the letterboxed tensor through PyTorch eager (fp32, ``--threads``
  threads) and through an ONNX Runtime CPU session (``intra_op_num_threads`` =
  ``--threads``); median ms and the largest output difference;
* the app's path: ``--detector yolo:<.pt>`` and ``yolo:<.onnx>`` (``YoloDetector``:
  ultralytics' pre-processing, NMS, boxes) ``detect()`` median ms, and how many of the
  PyTorch boxes (score >= 0.25) the ONNX run reproduces at IoU >= 0.9. ultralytics opens
  its own ONNX Runtime session there with default options (all cores).

The ratio (ONNX / PyTorch) is the result; absolute ms swing with the shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.detection import DEFAULT_DATA, read_rgb  # noqa: E402
from common.boxes import iou_matrix  # noqa: E402
from models.evaluation.detection import load_voc_split  # noqa: E402


def export_onnx(weights: Path, imgsz: int, out_dir: Path) -> Path:
    from models.training.detector_trainer import import_ultralytics

    YOLO = import_ultralytics()
    out_dir.mkdir(parents=True, exist_ok=True)
    local = out_dir / weights.name
    if local.resolve() != weights.resolve():
        shutil.copyfile(weights, local)  # ultralytics writes the .onnx next to the .pt
    exported = Path(YOLO(str(local)).export(format="onnx", imgsz=imgsz, dynamic=False, simplify=False, half=False,
                                            device="cpu", verbose=False))
    return exported


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, required=True)
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--onnx-dir", type=Path, default=Path.home() / "facelab-runs" / "onnx")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "yolo_onnx.json")
    args = ap.parse_args(argv)

    import onnxruntime as ort
    import torch

    from models.detectors.factory import create_detector
    from ultralytics.data.augment import LetterBox
    from ultralytics.nn.tasks import load_checkpoint

    torch.set_num_threads(args.threads)
    onnx_path = export_onnx(args.weights.expanduser(), args.imgsz, args.onnx_dir)
    model, _ = load_checkpoint(args.weights.expanduser(), device="cpu", fuse=True)
    model = model.float().eval()
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    items = load_voc_split(args.data, "val")[: args.images]
    images = [read_rgb(p) for p, _ in items]
    letterbox = LetterBox((args.imgsz, args.imgsz), auto=False, stride=32)
    tensors = [np.ascontiguousarray(letterbox(image=im[:, :, ::-1])[:, :, ::-1].transpose(2, 0, 1))[None]
               .astype(np.float32) / 255 for im in images]

    def torch_forward(x):
        with torch.inference_mode():
            out = model(torch.from_numpy(x))
        return (out[0] if isinstance(out, (list, tuple)) else out).numpy()

    torch_forward(tensors[0])
    session.run(None, {input_name: tensors[0]})  # warm-ups
    t_ms, o_ms, max_diff, max_ref = [], [], 0.0, 0.0
    for x in tensors:
        t0 = time.perf_counter()
        a = torch_forward(x)
        t_ms.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        b = session.run(None, {input_name: x})[0]
        o_ms.append((time.perf_counter() - t0) * 1000)
        max_diff = max(max_diff, float(np.abs(a - b).max()))
        max_ref = max(max_ref, float(np.abs(a).max()))

    det_pt = create_detector(f"yolo:{args.weights.expanduser()}", imgsz=args.imgsz, conf=0.25)
    det_ox = create_detector(f"yolo:{onnx_path}", imgsz=args.imgsz, conf=0.25)
    det_pt.detect(images[0])
    det_ox.detect(images[0])
    e_pt, e_ox, agree, total = [], [], 0, 0
    for im in images:
        t0 = time.perf_counter()
        bp = det_pt.detect(im)
        e_pt.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        bo = det_ox.detect(im)
        e_ox.append((time.perf_counter() - t0) * 1000)
        total += len(bp)
        if bp and bo:
            m = iou_matrix(np.array([b.as_tuple() for b in bp]), np.array([b.as_tuple() for b in bo]))
            agree += int((m.max(axis=1) >= 0.9).sum())

    med = statistics.median
    res = {
        "weights": str(args.weights),
        "onnx": str(onnx_path),
        "onnx_mb": round(onnx_path.stat().st_size / 2**20, 1),
        "imgsz": args.imgsz,
        "images": len(images),
        "threads": args.threads,
        "network_only": {
            "pytorch_ms_median": med(t_ms), "onnxruntime_ms_median": med(o_ms),
            "onnx_over_pytorch": med(o_ms) / med(t_ms),
            "max_abs_output_difference": max_diff, "max_abs_output": max_ref,
        },
        "app_detector": {
            "pytorch_ms_median": med(e_pt), "onnxruntime_ms_median": med(e_ox),
            "onnx_over_pytorch": med(e_ox) / med(e_pt),
            "pytorch_boxes_score_0.25": total, "reproduced_by_onnx_iou_0.9": agree,
            "note": "YoloDetector (ultralytics pre/post-processing); its ONNX session uses default threads",
        },
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
        "load_avg_1min": os.getloadavg()[0],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:])),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    print(json.dumps(res, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
