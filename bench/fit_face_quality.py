"""Fit (and evaluate) the face-quality gate: detector boxes that match a labelled face
(face_mask) and LFW train identities' faces vs detector boxes far from every labelled
face and crops of the photos' background (face_mask).

    python bench/fit_face_quality.py [--data ../shared/data/face_mask] [--work DIR]
        [--out models/weights/face_quality_dlib.json] [--results docs/results/face_quality.json]

The photos go through the app's own ``ingest`` (detector at the app default, landmarks,
embedder) into a FaceLab data folder (``--work``, reused between runs), so the features
are exactly what the app stores. Labels per stored box, by IoU with the VOC boxes:
face if >= 0.5, not a face if < 0.2 (boxes in between are left out). face_mask leaves
many background faces unlabelled, so some "not a face" boxes are real faces: these
negatives are noisy. Clean negatives come from background crops: boxes of face sizes
placed where no labelled face and no detection is (IoU < 0.05), landmarked and embedded
like any box without landmarks (walls, clothes, hands, signs: what false positives are).

LFW: the centred face of every photo of the train identities, as the app stored it
(``bench/lfw_library.py``), is a positive too: face_mask's faces mostly wear masks, and
fitted on them alone the gate turned down 1.5 % of LFW's big, clear, frontal faces. LFW
test identities' faces are only counted (how many the gate keeps).

The model is fitted on the **train** split only; the gate threshold is chosen on train
(the highest threshold that keeps ``--keep`` of train's faces with a short side of at
least 24 px); every reported number is on **val** (its own background crops included).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sqlalchemy import select  # noqa: E402

from bench.lfw_library import DEFAULT_WORK as DEFAULT_LFW_WORK  # noqa: E402
from bench.lfw_library import LFW, copy_library, identities, photo_faces, photos_of  # noqa: E402
from common.boxes import iou_matrix  # noqa: E402
from models.evaluation.detection import load_voc_split  # noqa: E402
from models.evaluation.verification import roc_auc  # noqa: E402
from models.face_quality import FaceQualityModel, quality_features, quality_path  # noqa: E402
from models.types import FaceBox  # noqa: E402
from pipeline.context import Lab  # noqa: E402
from pipeline.library.ingest import Upload, ingest  # noqa: E402
from pipeline.settings import Settings  # noqa: E402
from storage.orm import Embedding, Face, Image  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "face_mask"
FACE_IOU, NONFACE_IOU = 0.5, 0.2
#: faces at least this big must pass the gate (smaller ones are allowed to fail it)
KEEP_MIN_SIDE = 24.0


def collect(lab: Lab, data: Path, split: str) -> dict[str, np.ndarray]:
    """Stored boxes of the split's photos with their label (1 face, 0 not, -1 unclear)."""
    items = load_voc_split(data, split)
    names = {path.name: ann for path, ann in items}
    with lab.sessions() as session:
        have = set(session.scalars(select(Image.original_name)).all())
    missing = [path for path, _ in items if path.name not in have]
    for start in range(0, len(missing), 64):
        ingest(lab, [Upload(p.name, path=p) for p in missing[start:start + 64]])
    version = lab.model_version
    rows = []
    with lab.sessions() as session:
        for face, name, emb in session.execute(
            select(Face, Image.original_name, Embedding)
            .join(Image, Face.image_id == Image.id)
            .join(Embedding, (Embedding.face_id == Face.id) & (Embedding.model_version == version))
        ).all():
            if name in names:
                rows.append((name, face.box, face.score, emb.as_array()))
    labels, boxes, scores, vectors, photos = [], [], [], [], []
    for name, box, score, vector in rows:
        gt = names[name].boxes
        best = float(iou_matrix(np.asarray([box]), gt).max()) if len(gt) else 0.0
        labels.append(1 if best >= FACE_IOU else 0 if best < NONFACE_IOU else -1)
        boxes.append(box)
        scores.append(score)
        vectors.append(vector)
        photos.append(name)
    boxes_arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return {
        "label": np.asarray(labels), "score": np.asarray(scores, dtype=np.float64),
        "side": np.minimum(boxes_arr[:, 2] - boxes_arr[:, 0], boxes_arr[:, 3] - boxes_arr[:, 1]), "box": boxes_arr,
        "vector": np.asarray(vectors, dtype=np.float64), "photo": np.asarray(photos),
    }


def background_crops(lab: Lab, photos: list[tuple[Path, np.ndarray]], per_photo: int, sides: np.ndarray,
                     rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Face-sized boxes (short side drawn from ``sides``) on each photo's background, away
    from its ``taken`` boxes (IoU < 0.05), embedded through the app's landmark + embedder
    path (label 0)."""
    vectors, boxes = [], []
    for path, taken in photos:
        rgb = np.asarray(PILImage.open(path).convert("RGB"))
        h, w = rgb.shape[:2]
        taken = np.asarray(taken, np.float64).reshape(-1, 4)
        picked = []
        for _ in range(per_photo * 20):
            if len(picked) >= per_photo:
                break
            side = float(rng.choice(sides))
            bw, bh = side, side * 1.2
            if bw >= w or bh >= h:
                continue
            x1, y1 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            box = np.array([[x1, y1, x1 + bw, y1 + bh]])
            if len(taken) and iou_matrix(box, taken).max() >= 0.05:
                continue
            picked.append(FaceBox(*box[0].tolist(), 1.0))
            taken = np.vstack([taken, box])
        if picked:
            vectors.append(lab.embedder.embed(rgb, lab.landmarker.predict(rgb, picked)))
            boxes += [b.as_tuple() for b in picked]
    arr = np.asarray(boxes, np.float64).reshape(-1, 4)
    return {"label": np.zeros(len(arr), np.int64), "side": np.minimum(arr[:, 2] - arr[:, 0], arr[:, 3] - arr[:, 1]),
            "vector": np.vstack(vectors).astype(np.float64) if vectors else np.zeros((0, lab.embedder.dim)),
            "box": arr}


def face_mask_photos(lab: Lab, data: Path, split: str) -> list[tuple[Path, np.ndarray]]:
    """(photo, boxes to stay away from: labelled faces and every stored detection)."""
    with lab.sessions() as session:
        stored = {img.original_name: [f.box for f in img.faces] for img in session.scalars(select(Image)).all()}
    return [(path, np.vstack([ann.boxes.reshape(-1, 4), np.asarray(stored.get(path.name, []), np.float64).reshape(-1, 4)]))
            for path, ann in load_voc_split(data, split)]


def lfw_faces(work: Path, split: str) -> tuple[dict[str, np.ndarray], list[tuple[Path, np.ndarray]]]:
    """The centred face of every photo of LFW's ``split`` identities (label 1), as stored
    by the app's ingest in the LFW library folder (bench/lfw_library.py), and each photo
    with its stored detections (for background crops: shoulders, suits, walls)."""
    people = identities(LFW, split)
    photos = photos_of(LFW, people)
    snapshot = Path(tempfile.mkdtemp(prefix="facelab-quality-")) / "lab"
    copy_library(work, snapshot)
    with Lab.open(Settings(data_dir=snapshot, face_quality_gate=False)) as lab:
        lib = photo_faces(lab)
    vectors, sides, backgrounds = [], [], []
    for paths in photos.values():
        for path in paths:
            entry = lib.get(path.name)
            main = entry.primary() if entry is not None else None  # gate off: the big, central box
            if main is not None:
                x1, y1, x2, y2 = entry.boxes[main]
                vectors.append(entry.vectors[main])
                sides.append(min(x2 - x1, y2 - y1))
                backgrounds.append((path, np.asarray(entry.boxes, np.float64)))
    shutil.rmtree(snapshot.parent, ignore_errors=True)
    faces = {"vector": np.asarray(vectors, np.float64), "side": np.asarray(sides, np.float64),
             "label": np.ones(len(sides), np.int64)}
    return faces, backgrounds


def fit_logistic(x: np.ndarray, y: np.ndarray, groups: np.ndarray, l2: float, steps: int = 50) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression by Newton's method on standardised features;
    every group of rows (face_mask faces, its backgrounds, LFW faces, LFW backgrounds...)
    weighs the same in total, so the big, easy LFW set does not decide alone. Returns
    weights and bias for the raw features."""
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-9
    z = np.hstack([(x - mean) / std, np.ones((len(x), 1))])
    w = np.zeros(z.shape[1])
    reg = np.full(z.shape[1], l2)
    reg[-1] = 0.0  # no penalty on the bias
    counts = np.bincount(groups)
    weight = len(groups) / len(counts) / counts[groups]
    for _ in range(steps):
        p = 1 / (1 + np.exp(-np.clip(z @ w, -50, 50)))
        grad = z.T @ (weight * (p - y)) + reg * w
        hess = (z * (weight * p * (1 - p))[:, None]).T @ z + np.diag(reg + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w[:-1] / std, float(w[-1] - (w[:-1] * mean / std).sum())


def summary(prob: np.ndarray, data: dict[str, np.ndarray], background: dict[str, np.ndarray] | None,
            threshold: float) -> dict:
    y, side = data["label"], data["side"]
    known = y >= 0
    faces, nonfaces = known & (y == 1), known & (y == 0)
    out = {
        "faces": int(faces.sum()), "unmatched_detections": int(nonfaces.sum()), "unclear": int((~known).sum()),
        "auc_faces_vs_unmatched_detections": round(float(roc_auc(prob[known], y[known] == 1)), 4),
        "faces_kept": round(float((prob[faces] >= threshold).mean()), 4),
        "unmatched_detections_removed": round(float((prob[nonfaces] < threshold).mean()), 4),
        "faces_kept_by_size": {},
    }
    if background is not None:
        pb = background["prob"]
        scores = np.concatenate([prob[faces], pb])
        out["background_crops"] = int(len(pb))
        out["auc_faces_vs_background"] = round(float(roc_auc(scores, np.r_[np.ones(faces.sum()), np.zeros(len(pb))] == 1)), 4)
        out["background_removed"] = round(float((pb < threshold).mean()), 4)
    for label, lo, hi in (("<16", 0, 16), ("16-24", 16, 24), ("24-48", 24, 48), (">=48", 48, 1e9)):
        sel = faces & (side >= lo) & (side < hi)
        if sel.any():
            out["faces_kept_by_size"][label] = {"n": int(sel.sum()), "kept": round(float((prob[sel] >= threshold).mean()), 4)}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--work", type=Path, default=Path.home() / "facelab-runs" / "quality-fm" / "lab",
                    help="FaceLab data folder the photos are ingested into (kept between runs)")
    ap.add_argument("--embedder", default="dlib")
    ap.add_argument("--keep", type=float, default=0.98, help="share of train faces >= 24 px the gate keeps")
    ap.add_argument("--l2", type=float, default=1.0)
    ap.add_argument("--background", type=int, default=4, help="background crops per photo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lfw-background", type=int, default=3000, help="LFW train photos to crop a background box from")
    ap.add_argument("--lfw-work", type=lambda v: Path(v) if v else None, default=DEFAULT_LFW_WORK,
                    help="FaceLab data folder holding LFW (bench/lfw_library.py); its train identities' centred "
                         "faces are positives, its test identities' are only reported ('' to leave LFW out)")
    ap.add_argument("--dump", type=Path, default=None, help="also save the feature sets to this .npz")
    ap.add_argument("--out", type=Path, default=None, help="model JSON (default models/weights/face_quality_<embedder>.json)")
    ap.add_argument("--results", type=Path, default=ROOT / "docs" / "results" / "face_quality.json")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    # clear, unmasked faces too (face_mask alone taught it that a face wears a mask: it
    # turned down 1.5 % of LFW's big frontal faces): LFW train identities' centred faces,
    # and crops of those photos' backgrounds (shoulders, suits: big non-faces)
    lfw_train, lfw_bg_photos = lfw_faces(args.lfw_work, "train") if args.lfw_work else (None, [])
    lfw_test, lfw_test_photos = lfw_faces(args.lfw_work, "test") if args.lfw_work else (None, [])
    # the gate off: the model being fitted must not depend on an earlier one
    with Lab.open(Settings(data_dir=args.work, embedder=args.embedder, face_quality_gate=False)) as lab:
        train, val = collect(lab, args.data, "train"), collect(lab, args.data, "val")
        sides = train["side"][train["label"] == 1]
        bg_train = background_crops(lab, face_mask_photos(lab, args.data, "train"), args.background, sides, rng)
        bg_val = background_crops(lab, face_mask_photos(lab, args.data, "val"), args.background, sides, rng)
        if lfw_train is not None:
            pick = rng.choice(len(lfw_bg_photos), min(args.lfw_background, len(lfw_bg_photos)), replace=False)
            bg_lfw = background_crops(lab, [lfw_bg_photos[i] for i in pick], 1, lfw_train["side"], rng)
            pick = rng.choice(len(lfw_test_photos), min(1000, len(lfw_test_photos)), replace=False)
            bg_lfw_test = background_crops(lab, [lfw_test_photos[i] for i in pick], 1, lfw_train["side"], rng)
        version = lab.model_version
        name = lab.embedder.name

    if args.dump:  # the feature sets, for experiments with other classifiers
        np.savez(args.dump, **{f"{n}_{k}": v for n, d in (("train", train), ("val", val), ("bg_train", bg_train),
                                                         ("bg_val", bg_val), ("lfw_train", lfw_train or {}),
                                                         ("bg_lfw", bg_lfw if lfw_train else {}),
                                                         ("lfw_test", lfw_test or {}),
                                                         ("bg_lfw_test", bg_lfw_test if lfw_train else {}))
                               for k, v in d.items() if k in ("vector", "side", "label")})
    known = train["label"] >= 0
    parts = [(train["vector"][known], train["side"][known], train["label"][known]),
             (bg_train["vector"], bg_train["side"], bg_train["label"])]
    if lfw_train is not None:
        parts += [(lfw_train["vector"], lfw_train["side"], lfw_train["label"]),
                  (bg_lfw["vector"], bg_lfw["side"], bg_lfw["label"])]
    x = np.vstack([quality_features(v, side) for v, side, _ in parts])
    y = np.concatenate([label for *_, label in parts]).astype(np.float64)
    groups = np.concatenate([np.full(len(label), i) for i, (*_, label) in enumerate(parts)])
    weights, bias = fit_logistic(x, y, groups, args.l2)
    model = FaceQualityModel(version, weights, bias, 0.5)
    p_train = model.predict(train["vector"], train["side"])
    big_faces = (train["label"] == 1) & (train["side"] >= KEEP_MIN_SIDE)
    kept_probs = [p_train[big_faces]]
    if lfw_train is not None:
        kept_probs.append(model.predict(lfw_train["vector"], lfw_train["side"]))
    # the gate keeps --keep of each set's faces: the easy, plentiful LFW faces must not
    # decide it for face_mask's small, masked ones
    threshold = float(min(np.quantile(p, 1 - args.keep) for p in kept_probs))
    model = FaceQualityModel(version, weights, bias, threshold,
                             source=f"bench/fit_face_quality.py on face_mask train ({int(known.sum())} detections, "
                                    f"{len(bg_train['label'])} background crops)"
                                    + (f", {len(lfw_train['label'])} LFW train-identity faces and "
                                       f"{len(bg_lfw['label'])} LFW background crops" if lfw_train else "")
                                    + f"; the gate keeps {args.keep:.0%} of train faces >= {KEEP_MIN_SIDE:.0f} px")
    p_val = model.predict(val["vector"], val["side"])
    bg_train["prob"] = model.predict(bg_train["vector"], bg_train["side"])
    bg_val["prob"] = model.predict(bg_val["vector"], bg_val["side"])

    # the detector score alone, gated to keep the same share of train faces >= 24 px
    t = float(np.quantile(train["score"][big_faces], 1 - args.keep))
    result = {
        "command": "python bench/fit_face_quality.py " + " ".join(argv or sys.argv[1:]),
        "date": dt.date.today().isoformat(),
        "embedder_version": version,
        "threshold": round(threshold, 4),
        "train": summary(p_train, train, bg_train, threshold),
        "val": summary(p_val, val, bg_val, threshold),
        "val_detector_score_alone_same_keep_rate": summary(val["score"], val, None, t),
    }
    if lfw_test is not None:
        p_lfw = model.predict(lfw_test["vector"], lfw_test["side"])
        p_bg = model.predict(bg_lfw_test["vector"], bg_lfw_test["side"])
        result["lfw_test"] = {"centred_faces": len(p_lfw), "faces_kept": round(float((p_lfw >= threshold).mean()), 4),
                              "background_crops": len(p_bg), "background_removed": round(float((p_bg < threshold).mean()), 4)}
    out = args.out or quality_path(name)
    out.write_text(json.dumps({"model": model.to_dict(), "fit": {k: result[k] for k in ("command", "date", "train", "val")}},
                              indent=1) + "\n")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("threshold", "train", "val", "val_detector_score_alone_same_keep_rate")},
                     indent=2))
    return result


if __name__ == "__main__":
    main()
