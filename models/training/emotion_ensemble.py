"""One app weights file from several exported emotion networks; the app averages their
probabilities (``models.attributes.emotion_net.EmotionEnsemble``).

    python -m models.training.emotion_ensemble A.pt B.pt --out models/weights/emotion-fer2013.pt

Each input is a file written by ``emotion_trainer --export`` (fp16 weights with their
meta). All must name FER2013's classes in the same order and carry the same FER framing:
the app cuts one frame per face and every member reads it. An ensemble costs the sum of
its members' time per face; ``bench/emotion_select.py --average`` scores one on the
select split before it is built, ``bench/attributes_speed.py`` times it after.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from common.atomic import save_torch_atomically
from models.attributes.analyzer import EMOTION_ENSEMBLE_FORMAT, EMOTION_FORMAT
from models.attributes.emotion_net import EMOTIONS, FRAME_SIZE, INPUT_SIZE
from models.weights_locator import file_sha256

#: a member's meta keys that belong to the whole file, not to one network
_SHARED = ("emotions", "frame_size", "input_size", "framing")


def build_ensemble(files: list[Path | str], out: Path | str, note: str | None = None) -> Path:
    """Write ``out`` holding every file's network; raises ValueError naming the file that
    does not fit (another format, other classes, another framing)."""
    paths = [Path(f) for f in files]
    if len(paths) < 2:
        raise ValueError("an ensemble needs two or more weights files")
    states, members, framing = [], [], None
    for path in paths:
        doc = torch.load(path, map_location="cpu", weights_only=True)
        fmt = doc.get("format") if isinstance(doc, dict) else None
        if fmt != EMOTION_FORMAT:
            raise ValueError(f"{path}: not a single emotion network ({EMOTION_FORMAT}), format {fmt!r}")
        meta = doc["meta"]
        if list(meta["emotions"]) != list(EMOTIONS):
            raise ValueError(f"{path}: classes {meta['emotions']} differ from {list(EMOTIONS)}")
        if framing is None:
            framing = dict(meta["framing"])
        elif dict(meta["framing"]) != framing:
            raise ValueError(f"{path}: FER framing {meta['framing']} differs from {paths[0]}'s {framing}; "
                             "the members must read the same frame")
        states.append(doc["state_dict"])
        members.append({**{k: v for k, v in meta.items() if k not in _SHARED},
                        "source": path.name, "source_sha256": file_sha256(path)})
    meta = {"emotions": list(EMOTIONS), "frame_size": FRAME_SIZE, "input_size": INPUT_SIZE,
            "framing": framing, "members": members, "combine": "mean of probabilities"}
    if note:
        meta["note"] = note
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_torch_atomically({"format": EMOTION_ENSEMBLE_FORMAT, "members": states, "meta": meta}, out)
    return out


def member_files(ensemble: Path | str, out_dir: Path | str) -> list[Path]:
    """Each member of an ensemble file written back as a single-network file
    (``<out_dir>/member-K.pt``, the export format), e.g. to score or rebuild without one."""
    ensemble, out_dir = Path(ensemble), Path(out_dir)
    doc = torch.load(ensemble, map_location="cpu", weights_only=True)
    if not isinstance(doc, dict) or doc.get("format") != EMOTION_ENSEMBLE_FORMAT:
        raise ValueError(f"{ensemble}: not an emotion ensemble file ({EMOTION_ENSEMBLE_FORMAT})")
    shared = {k: doc["meta"][k] for k in _SHARED}
    out = []
    for k, (state, meta) in enumerate(zip(doc["members"], doc["meta"]["members"])):
        out.append(out_dir / f"member-{k}.pt")
        save_torch_atomically({"format": EMOTION_FORMAT, "state_dict": state, "meta": {**meta, **shared}}, out[-1])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("weights", type=Path, nargs="+", help="exported emotion weights files (emotion_trainer --export)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--note", help="kept in the file's meta (e.g. how it was chosen)")
    args = ap.parse_args(argv)
    try:
        out = build_ensemble(args.weights, args.out, args.note)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    print(f"{out}: {len(args.weights)} networks, {out.stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
