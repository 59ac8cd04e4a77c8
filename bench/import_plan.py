"""Cost of planning an import (which boxes are new) with many boxes on one image.

    python bench/import_plan.py [--boxes 4000] [--repeats 3] [--database-url URL] [--out FILE]

Two measurements in one process:

* ``dedupe``: deduplicating ``--boxes`` boxes on one image (5 % of them given twice,
  nudged by 0.25 px) with ``pipeline.datasets.import_data.BoxDeduper`` and, as the baseline, with
  the scan it replaced (each new box compared with every box kept so far, exactly the
  old ``_plan`` loop). Seconds and comparisons, best of ``--repeats`` (the scan: once).
* ``plan``: the import's whole planning step on a real COCO zip with that image (parse,
  decode the image, read the stored faces, dedupe: ``import_data._plan`` after
  ``read_dataset`` and ``_check_images``) against a fresh database, split into the
  parse + image check and the plan itself. Nothing is written.
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
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.datasets.archive import open_source  # noqa: E402
from pipeline.context import Lab  # noqa: E402
from pipeline.datasets.readers import read_dataset  # noqa: E402
from pipeline.datasets.import_data import SAME_BOX_PX, BoxDeduper, _check_images, _plan  # noqa: E402
from pipeline.settings import Settings  # noqa: E402


def crowd(n: int) -> list[tuple[float, float, float, float]]:
    """``n`` boxes (x1, y1, x2, y2) on a 2000 x 2000 image: 95 % on a grid, 5 % repeats."""
    unique = n - n // 20
    boxes = [(20.0 + 30 * (i % 60), 20.0 + 30 * (i // 60)) for i in range(unique)]
    out = [(x, y, x + 20.0, y + 20.0) for x, y in boxes]
    out += [(x + 0.25, y, x2, y2 - 0.25) for x, y, x2, y2 in out[: n - unique]]
    return out


def scan_dedupe(boxes: list[tuple[float, ...]]) -> tuple[int, int]:
    """The replaced algorithm: (boxes kept, comparisons)."""
    known: list[tuple[float, ...]] = []
    comparisons = 0
    for box in boxes:
        match = None
        for i, k in enumerate(known):
            comparisons += 1
            if max(abs(a - b) for a, b in zip(box, k)) <= SAME_BOX_PX:
                match = i
                break
        if match is None:
            known.append(box)
    return len(known), comparisons


def grid_dedupe(boxes: list[tuple[float, ...]]) -> tuple[int, int]:
    dedupe = BoxDeduper()
    for box in boxes:
        if dedupe.first_match(box) is None:
            dedupe.add(box)
    return len(dedupe), dedupe.comparisons


def coco_zip(path: Path, boxes: list[tuple[float, ...]]) -> Path:
    import io
    import zipfile

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (2000, 2000), (90, 90, 90)).save(buf, format="PNG")
    anns = [{"id": i, "image_id": 1, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1]}
            for i, (x1, y1, x2, y2) in enumerate(boxes, start=1)]
    doc = {"images": [{"id": 1, "file_name": "one.png", "width": 2000, "height": 2000}],
           "categories": [{"id": 1, "name": "face"}], "annotations": anns}
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("images/one.png", buf.getvalue())
        zf.writestr("annotations.json", json.dumps(doc))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--boxes", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--database-url", default="")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    boxes = crowd(args.boxes)

    grid_runs = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        kept, grid_comparisons = grid_dedupe(boxes)
        grid_runs.append(time.perf_counter() - started)
    started = time.perf_counter()
    scan_kept, scan_comparisons = scan_dedupe(boxes)
    scan_s = time.perf_counter() - started
    assert kept == scan_kept, (kept, scan_kept)

    with tempfile.TemporaryDirectory() as tmp:
        zip_path = coco_zip(Path(tmp) / "crowd.zip", boxes)
        settings = Settings(data_dir=Path(tmp) / "data", database_url=args.database_url, match_threshold=0.8)
        read_s, plan_s = [], []
        with Lab.open(settings) as lab:
            for _ in range(args.repeats):
                started = time.perf_counter()
                with open_source(zip_path) as source:
                    _fmt, entries, findings = read_dataset(source)
                    metas = _check_images(lab, source, entries, findings, None)
                    findings.check(source.label)
                    read_s.append(time.perf_counter() - started)
                    plan = _plan(lab, entries, metas)
                    plan_s.append(plan.seconds)
        planned = sum(len(p.boxes) for p in plan.plans)

    result = {
        "boxes": len(boxes), "kept": kept, "repeated": len(boxes) - kept,
        "dedupe": {"grid_s": min(grid_runs), "grid_comparisons": grid_comparisons,
                   "scan_s": scan_s, "scan_comparisons": scan_comparisons,
                   "speedup": scan_s / min(grid_runs)},
        "plan": {"read_and_check_s": min(read_s), "plan_s": min(plan_s), "planned_new": planned,
                 "repeated": plan.repeated, "comparisons": plan.comparisons,
                 "database": "postgresql" if args.database_url else "sqlite"},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_average": os.getloadavg()},
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
