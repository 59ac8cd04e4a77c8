"""What the quick detection pass of a photo search costs and changes.

    nice -n 19 python bench/search_detect.py [--lfw-images 300] [--face-mask-images 175] \
        [--out docs/results/search_detect.json]

A search photo's faces are found with ``pipeline.library.search.query_boxes``: with
``search_detect="quick"`` the detector first looks at the photo at its own size and keeps
that answer if it holds a face of at least ``search_quick_min_face_px``; otherwise the
full (2x) detector runs. This compares that policy with always running the full detector,
photo by photo (interleaved, CPU time of this process, one thread), through
``pipeline.library.search.query_faces`` (detection, landmarks, embedding, face-quality
gate, primary face; with the quick policy, the full detector runs again when the quick
look finds no searchable main face):

* CPU time per photo of those steps;
* how often the quick answer stands (no full run);
* the primary face (the one that decides who the photo is): found by both (IoU >= 0.5 with
  the full run's), and the cosine similarity of its two embeddings;
* faces found per photo by each.

Data: LFW images of the train identities (folds 1-5; portraits, like most search photos)
and face_mask val (crowds with small faces: the hard case for the quick pass). The LFW
test half is not read.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from common.boxes import iou  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def _lfw_images(n: int) -> list[tuple[str, np.ndarray]]:
    from bench.verification import LFW, read_rgb, select_pairs
    from models.evaluation.verification import lfw_image_path, parse_lfw_pairs

    if not (LFW / "pairs.txt").is_file():
        return []
    pairs = select_pairs(parse_lfw_pairs(LFW / "pairs.txt"), "train5", None)
    keys = sorted({(p.name_a, p.index_a) for p in pairs} | {(p.name_b, p.index_b) for p in pairs})
    keys = [keys[i] for i in np.random.default_rng(3).permutation(len(keys))[:n]]
    return [(f"{name}_{idx}", read_rgb(lfw_image_path(LFW / "lfw-deepfunneled", name, idx))) for name, idx in keys]


def _face_mask_images(n: int) -> list[tuple[str, np.ndarray]]:
    from bench.verification import read_rgb

    folder = SHARED / "face_mask"
    if not folder.is_dir():
        return []
    stems = (folder / "val.txt").read_text().split()[:n]
    return [(s, read_rgb(folder / "images" / f"{s}.jpg")) for s in stems]


def compare(labs: dict, photos: list[tuple[str, np.ndarray]]) -> dict:  # noqa: ANN001
    """``labs``: {"full": a Lab with search_detect="full", "quick": one with "quick"}."""
    from pipeline.library.search import query_faces

    t: dict[str, list[float]] = {"full": [], "quick": []}
    quick_stood = 0
    faces: dict[str, list[int]] = {"full": [], "quick": []}
    both_primary, same_primary, cosines, primary_only_full, primary_only_quick = 0, 0, [], 0, 0
    for lab in labs.values():  # load every model before timing
        query_faces(lab, photos[0][1])
    for _, rgb in photos:
        out = {}
        for name in ("full", "quick"):  # interleaved, photo by photo
            c0 = time.process_time()
            out[name] = query_faces(labs[name], rgb)
            t[name].append(time.process_time() - c0)
            faces[name].append(len(out[name].boxes) if out[name] else 0)
        quick_stood += bool(out["quick"] and out["quick"].quick)
        f, q = out["full"], out["quick"]
        pf = f.primary if f else None
        pq = q.primary if q else None
        if pf is not None and pq is not None:
            both_primary += 1
            if iou(f.boxes[pf], q.boxes[pq]) >= 0.5:
                same_primary += 1
                cosines.append(float(f.vectors[pf] @ q.vectors[pq]))
        elif pf is not None:
            primary_only_full += 1
        elif pq is not None:
            primary_only_quick += 1
    n = len(photos)
    return {
        "photos": n,
        "cpu_ms_per_photo": {name: {"median": round(1000 * float(np.median(v)), 1),
                                    "mean": round(1000 * float(np.mean(v)), 1),
                                    "p99": round(1000 * float(np.percentile(v, 99)), 1)} for name, v in t.items()},
        "ratio_quick_to_full_mean": float(np.mean(t["quick"]) / np.mean(t["full"])),
        "quick_answer_stood": quick_stood / n if n else None,
        "primary_face_in_both": both_primary,
        "primary_face_same_box": same_primary,
        "primary_face_only_full": primary_only_full,
        "primary_face_only_quick": primary_only_quick,
        "primary_cosine_min": min(cosines) if cosines else None,
        "primary_cosine_median": float(np.median(cosines)) if cosines else None,
        "faces_per_photo_mean": {name: float(np.mean(v)) if v else 0.0 for name, v in faces.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lfw-images", type=int, default=300)
    ap.add_argument("--face-mask-images", type=int, default=175)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "search_detect.json")
    args = ap.parse_args()
    from pipeline.context import Lab, set_compute_threads
    from pipeline.settings import Settings

    set_compute_threads(1)
    result: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                    "command": "python " + " ".join(sys.argv), "load_avg_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        labs = {name: Lab.open(Settings(data_dir=Path(tmp) / name, search_detect=name)) for name in ("full", "quick")}
        result["min_face_px"] = labs["quick"].settings.search_quick_min_face_px
        for name, photos in (("lfw_train_identities", _lfw_images(args.lfw_images)),
                             ("face_mask_val", _face_mask_images(args.face_mask_images))):
            if photos:
                result[name] = compare(labs, photos)
                print(name, json.dumps(result[name]), flush=True)
        for lab in labs.values():
            lab.close()
    result["load_avg_after"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
