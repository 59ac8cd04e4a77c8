"""Choose the emotion model's confidence floor on the select split.

    python bench/fit_emotion_floor.py --run ~/facelab-runs/attributes/emotion-sharp-b \
        [--weights models/weights/emotion-fer2013.pt] [--target 0.8] [--out docs/results/emotion_floor.json]

The app names a face's emotion only when the top probability reaches
``models.attributes.analyzer.EMOTION_MIN_CONFIDENCE``; below it the emotion is "unsure".
The floor is the lowest probability (0.30 ... 0.95, steps of 0.05) at which the faces it
names are right at least ``--target`` of the time **on the run's select split** (FER2013
train images held out from training; ``split.json``), with the weights as shipped (fp16,
centre crop + mirror), on FER's own crops (``--frames native``) or on the frames the
app's path cuts from them (``--frames app``, ``models.training.fer_app_frames``: what the
floor is applied to in the app). FER2013's test folder is not read here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from models.attributes.analyzer import EMOTION_WEIGHTS, FaceAttributeModel  # noqa: E402
from models.attributes.emotion_net import predict_proba  # noqa: E402
from models.training.fer_data import load_fer_split  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="emotion run folder (fer_train.npz, split.json)")
    ap.add_argument("--weights", type=Path, default=EMOTION_WEIGHTS)
    ap.add_argument("--target", type=float, default=0.8)
    ap.add_argument("--frames", choices=("native", "app"), default="native",
                    help="FER's own crops, or the frames the app's path cuts (cached in the run folder)")
    ap.add_argument("--out", type=Path, default=Path("docs/results/emotion_floor.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    images, labels, names = load_fer_split(None, "train", cache_dir=args.run.expanduser())
    if args.frames == "app":
        from models.training.fer_app_frames import load_app_frames

        images = load_app_frames(args.run.expanduser(), "train")[0]
    select = set(json.loads((args.run.expanduser() / "split.json").read_text())["select"])
    idx = np.array([i for i, n in enumerate(names) if n in select])
    model = FaceAttributeModel(emotion_path=args.weights, age_gender_path=None)
    model.load()
    net = model._emotion.net  # noqa: SLF001 - the shipped network, as the app loads it
    p = np.concatenate([predict_proba(net, torch.from_numpy(images[idx[s : s + 256]]).unsqueeze(1)).numpy()
                        for s in range(0, len(idx), 256)])
    y = labels[idx]
    top, right = p.max(1), p.argmax(1) == y
    rows = []
    for floor in np.round(np.arange(0.30, 0.951, 0.05), 2):
        named = top >= floor
        rows.append({"floor": float(floor), "named_fraction": float(named.mean()),
                     "accuracy_of_named": float(right[named].mean()) if named.any() else None})
    chosen = next((r for r in rows if r["accuracy_of_named"] is not None and r["accuracy_of_named"] >= args.target), None)
    out = {"what": "emotion confidence floor chosen on the select split (FER2013 train, held out from training)",
           "weights": args.weights.name, "frames": args.frames, "select_faces": int(len(idx)), "select_accuracy": float(right.mean()),
           "target_accuracy_of_named": args.target, "chosen": chosen, "floors": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(json.dumps({k: out[k] for k in ("select_faces", "select_accuracy", "chosen")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
