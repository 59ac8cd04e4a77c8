"""What the attribute models' smallest-face rule saves at ingest, in one process.

    python bench/ingest_attribute_rule.py [--photos 80] [--rounds 3] \
        [--out docs/results/ingest_attribute_rule.json]

``models.attributes.analyzer`` reads emotion only from faces of at least
``EMOTION_MIN_FACE_PX`` and age/gender from ``AGE_GENDER_MIN_FACE_PX`` (the sides where
they stop being readable: bench/attributes_by_size.py). This ingests the same face_mask
val photos (else generated ones) into a fresh SQLite library per pass through
``pipeline.library.ingest.ingest``, one thread, with the rule as shipped and with both
minimums set to 0 (every face read, as before the rule; bench only), alternating within
each round so both see the same machine. Reports photos per CPU-second of this process
and the ratio, plus how many faces each attribute model read.
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


def main() -> None:
    from skimage import data as skdata
    from sqlalchemy import func, select

    import models.attributes.analyzer as analyzer
    from bench.speed import _photos
    from pipeline.context import Lab, set_compute_threads
    from pipeline.library.ingest import Upload, ingest
    from pipeline.settings import Settings
    from storage.orm import FaceAttributes

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=80)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "ingest_attribute_rule.json")
    args = ap.parse_args()
    set_compute_threads(1)
    photos = _photos(args.photos)
    shipped = (analyzer.EMOTION_MIN_FACE_PX, analyzer.AGE_GENDER_MIN_FACE_PX)
    rows = []
    for round_ in range(args.rounds):
        for label, minimums in (("rule as shipped", shipped), ("every face read", (0, 0))):
            analyzer.EMOTION_MIN_FACE_PX, analyzer.AGE_GENDER_MIN_FACE_PX = minimums
            with tempfile.TemporaryDirectory() as tmp:
                lab = Lab.open(Settings(data_dir=Path(tmp) / "data", torch_threads=1))
                warm = skdata.astronaut()  # load and warm every model; nothing stored
                boxes = lab.landmarker.predict(warm, lab.detector.detect(warm))
                lab.embedder.embed(warm, boxes)
                lab.attributes.predict(warm, boxes)
                c0, t0 = time.process_time(), time.perf_counter()
                report = ingest(lab, [Upload(name, data=data) for name, data in photos])
                cpu, wall = time.process_time() - c0, time.perf_counter() - t0
                with lab.sessions() as s:
                    emotions = s.scalar(select(func.count()).select_from(FaceAttributes)
                                        .where(FaceAttributes.emotion.is_not(None)))
                    ages = s.scalar(select(func.count()).select_from(FaceAttributes).where(FaceAttributes.age.is_not(None)))
                lab.close()
            row = {"round": round_ + 1, "path": label, "minimums_px": list(minimums), "photos": len(photos),
                   "faces": report.face_count, "faces_with_emotion": emotions, "faces_with_age": ages,
                   "cpu_s": round(cpu, 2), "wall_s": round(wall, 2), "photos_per_cpu_s": len(photos) / cpu,
                   "load_avg": os.getloadavg()[0]}
            print(json.dumps(row), flush=True)
            rows.append(row)
    analyzer.EMOTION_MIN_FACE_PX, analyzer.AGE_GENDER_MIN_FACE_PX = shipped
    best = {p: max(r["photos_per_cpu_s"] for r in rows if r["path"] == p) for p in ("rule as shipped", "every face read")}
    doc = {"what": __doc__.split("\n\n")[0].strip(), "command": "python " + " ".join(sys.argv),
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "runs": rows,
           "best_photos_per_cpu_s": best, "ratio": best["rule as shipped"] / best["every face read"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    print(json.dumps({"best_photos_per_cpu_s": best, "ratio": doc["ratio"]}))


if __name__ == "__main__":
    main()
