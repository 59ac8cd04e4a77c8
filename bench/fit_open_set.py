"""Fit the 1:N (open-set) threshold of an embedder on LFW **train** identities.

    python bench/fit_open_set.py [--work DIR] [--embedder dlib] [--far 0.01]
        [--out models/weights/open_set_dlib.json] [--results docs/results/open_set_fit.json]

A stranger searched against M enrolled faces is wrongly accepted when their best match
reaches the threshold; that best match grows with M. For each M on a grid, this script
draws random galleries of M faces from one half of the train people and measures, over
every photo of the other half (strangers to that gallery), the similarity that only
``--far`` of strangers' best matches reach. That curve, threshold(M), is what
``models.open_set.OpenSetCalibration`` interpolates at run time.

Faces are what the app stores: the photos are ingested through ``pipeline.library.ingest`` into
the ``--work`` data folder (``bench/lfw_library.py``; reused between runs), and each
photo's face is its *primary* face (``pipeline.library.identify.primary_face``: boxes below the
face-quality gate never enter a gallery). No test identity is read.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.lfw_library import DEFAULT_WORK, LFW, ensure_ingested, identities, photo_faces, photos_of  # noqa: E402
from models.open_set import OpenSetCalibration, calibration_path  # noqa: E402
from pipeline.context import Lab  # noqa: E402
from pipeline.settings import Settings  # noqa: E402

GRID = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 3000)


def primary_vectors(lib: dict, people: list[str], photos: dict[str, list[Path]]) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, person index) of each photo's primary face."""
    vectors, owner = [], []
    for i, person in enumerate(people):
        for path in photos[person]:
            entry = lib.get(path.name)
            if entry is None:
                continue
            main = entry.primary()
            if main is not None:
                vectors.append(entry.vectors[main])
                owner.append(i)
    return np.asarray(vectors, np.float32), np.asarray(owner, np.int64)


def threshold_curve(strangers: np.ndarray, gallery: np.ndarray, far: float, grid: tuple[int, ...],
                    rng: np.random.Generator, draws: int = 64) -> list[tuple[int, float, int]]:
    """(M, threshold, samples) for every M on the grid that the gallery pool allows."""
    sims = strangers @ gallery.T  # (strangers, pool)
    out = []
    for m in grid:
        if m > gallery.shape[0]:
            break
        best = []
        for _ in range(draws if m < gallery.shape[0] else 1):
            pick = rng.choice(gallery.shape[0], size=m, replace=False)
            best.append(sims[:, pick].max(axis=1))
        best = np.concatenate(best)
        out.append((m, float(np.quantile(best, 1.0 - far)), len(best)))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lfw", type=Path, default=LFW)
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK, help="FaceLab data folder holding LFW (kept between runs)")
    ap.add_argument("--embedder", default="dlib")
    ap.add_argument("--far", type=float, default=0.01, help="share of strangers the threshold lets in")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--results", type=Path, default=ROOT / "docs" / "results" / "open_set_fit.json")
    args = ap.parse_args(argv)

    people = identities(args.lfw, "train")
    photos = photos_of(args.lfw, people)
    with Lab.open(Settings(data_dir=args.work, embedder=args.embedder)) as lab:
        ensure_ingested(lab, [p for ps in photos.values() for p in ps])
        lib = photo_faces(lab)
        version, name, floor = lab.model_version, lab.embedder.name, float(lab.embedder.match_threshold)

    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(people))
    half = len(people) // 2
    # two halves of the train people, each in turn the gallery pool and the strangers
    curves = []
    for pool_half, stranger_half in ((order[:half], order[half:]), (order[half:], order[:half])):
        pool, _ = primary_vectors(lib, [people[i] for i in pool_half], photos)
        strangers, _ = primary_vectors(lib, [people[i] for i in stranger_half], photos)
        curves.append(threshold_curve(strangers, pool, args.far, GRID, rng))
    sizes = sorted({m for curve in curves for m, _, _ in curve if all(m in {c[0] for c in cv} for cv in curves)})
    grid = [(m, float(np.mean([t for cv in curves for mm, t, _ in cv if mm == m]))) for m in sizes]
    calibration = OpenSetCalibration.from_dict({
        "embedder_version": version, "target_far": args.far, "grid": grid, "floor": floor,
        "source": f"bench/fit_open_set.py on LFW train identities ({len(people)} people), FAR {args.far:g}, "
                  f"{dt.date.today().isoformat()}",
    })
    out = args.out or calibration_path(name)
    existing = json.loads(out.read_text()) if out.is_file() else {}
    entries = [e for e in existing.get("calibrations", []) if not (e.get("embedder_version") == version and
                                                                  e.get("target_far") == args.far)]
    entries.append(calibration.to_dict())
    out.write_text(json.dumps({"calibrations": entries}, indent=1) + "\n")
    result = {"command": "python bench/fit_open_set.py " + " ".join(argv or sys.argv[1:]),
              "embedder_version": version, "target_far": args.far, "one_to_one_threshold": floor,
              "grid": [[m, round(t, 4)] for m, t in calibration.grid],
              "per_half": [[[m, round(t, 4), n] for m, t, n in cv] for cv in curves]}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["grid"]))
    return result


if __name__ == "__main__":
    main()
