"""Emotion weights compared on the select split, the way the app would load and use them.

    python bench/emotion_select.py --run ~/facelab-runs/attributes/emotion-app \
        models/weights/emotion-fer2013.pt CANDIDATE.pt ... [--average 0,1 ...] \
        [--out docs/results/emotion_select.json]

Every file is an exported app weights file (fp16, ``emotion_trainer --export``), loaded
by ``FaceAttributeModel`` as the app loads it (BatchNorm folded). Scored on the select
split of ``--run`` (FER2013 train faces held out from training by the split seed 17, the
same faces for every run trained with that seed; FER2013's test folder is not read):

* ``native``: FER's own crop (centre 40 px + mirror), the protocol FER2013 results use;
* ``app``: the frames the app's path cuts (``models.training.fer_app_frames``: detector,
  dlib landmarks, our FER framing), what users get.

``--average 0,1`` also scores the probability average of the first two files (what
``models.training.emotion_ensemble`` would build from them), from the same probabilities.

This is where a new model is chosen against the shipped one; the test set is read only
afterwards, by ``bench/attributes_eval.py``, for the one chosen.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from models.attributes.analyzer import FaceAttributeModel  # noqa: E402
from models.attributes.emotion_net import predict_proba  # noqa: E402
from models.training.fer_app_frames import load_app_frames  # noqa: E402
from models.training.fer_data import load_fer_split  # noqa: E402


def _probabilities(net, frames: np.ndarray) -> np.ndarray:
    return np.concatenate([predict_proba(net, torch.from_numpy(frames[s : s + 256]).unsqueeze(1)).numpy()
                           for s in range(0, len(frames), 256)])


def _accuracy(p: np.ndarray, labels: np.ndarray) -> float:
    return float((p.argmax(1) == labels).mean())


def _members(spec: str, n: int) -> list[int]:
    """'0,2' -> [0, 2]: positions in the weights list (0 = the first file)."""
    try:
        members = sorted({int(k) for k in spec.split(",")})
    except ValueError:
        raise SystemExit(f"--average {spec!r}: give positions in the weights list, e.g. 0,2") from None
    if len(members) < 2 or members[0] < 0 or members[-1] >= n:
        raise SystemExit(f"--average {spec!r}: two or more positions between 0 and {n - 1}")
    return members


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("weights", type=Path, nargs="+", help="exported emotion weights files")
    ap.add_argument("--run", type=Path, required=True,
                    help="a run folder with fer_train.npz, split.json and fer_train_app.npz")
    ap.add_argument("--fer", type=Path, help="FER2013 root, if the run folder has no caches yet")
    ap.add_argument("--average", action="append", default=[], metavar="I,J[,K]",
                    help="also score the probability average (an ensemble) of these files, by their "
                         "positions in the weights list (0 = first); repeatable")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    averages = [_members(spec, len(args.weights)) for spec in args.average]
    torch.set_num_threads(1)
    run = args.run.expanduser()
    images, labels, names = load_fer_split(args.fer, "train", cache_dir=run)
    app, found, _ = load_app_frames(run, "train", args.fer)
    split = json.loads((run / "split.json").read_text())
    select = set(split["select"])
    idx = np.array([i for i, n in enumerate(names) if n in select])
    rows, probs = [], []
    for path in args.weights:
        model = FaceAttributeModel(emotion_path=path, age_gender_path=None)
        model.load()
        if model.missing_note():
            raise SystemExit(model.missing_note())
        net = model._emotion.net  # noqa: SLF001 - the network as the app loads it
        meta = model._emotion.meta  # noqa: SLF001
        probs.append((_probabilities(net, images[idx]), _probabilities(net, app[idx])))
        rows.append({"weights": str(path), "sha256": model._emotion.sha[:12],  # noqa: SLF001
                     "width": meta.get("width") or [m["width"] for m in meta["members"]],
                     "epoch": meta.get("epoch"),
                     "select_native": _accuracy(probs[-1][0], labels[idx]),
                     "select_app": _accuracy(probs[-1][1], labels[idx])})
        print(json.dumps(rows[-1]), flush=True)
    for members in averages:
        native = np.mean([probs[k][0] for k in members], axis=0)
        app_p = np.mean([probs[k][1] for k in members], axis=0)
        rows.append({"average_of": [str(args.weights[k]) for k in members],
                     "select_native": _accuracy(native, labels[idx]), "select_app": _accuracy(app_p, labels[idx])})
        print(json.dumps(rows[-1]), flush=True)
    doc = {"what": "emotion weights on the select split (FER2013 train, held out; test not read)",
           "command": "python " + " ".join(sys.argv), "select_faces": int(len(idx)), "split_seed": split["seed"],
           "detector_found_face": int(found[idx].sum()), "weights": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
