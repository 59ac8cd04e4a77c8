"""A weight average ("model soup") of emotion checkpoints, chosen on the select split.

    python -m models.training.emotion_soup --fer ~/facelab-extra/fer2013-sharp/archive \
        --run ~/facelab-runs/attributes/emotion-sharp-c --out ~/facelab-runs/attributes/soup \
        RUN_A/best.pt RUN_B/best.pt ...

Runs fine-tuned from one starting point (same weights, a different batch order each)
stay in one basin of the loss, so the average of their weights is itself a good
network, often better than each (Wortsman et al. 2022, "Model soups"), at the cost of
one network at inference: unlike an ensemble, the app's time per face does not grow.

Greedy soup: the checkpoints are sorted by select accuracy, and each is added to the
average only if the average's select accuracy does not drop. BatchNorm statistics are
re-estimated for the average (its activations are not the mean of the members'): one
pass over the training faces with the training augmentation, in train mode, no
gradient. Everything is scored on the select split only (FER2013's test folder is not
read here). Writes ``<out>/best.pt`` in the trainer's checkpoint format, so
``models.training.emotion_trainer.export_weights`` exports it like any run, and
``<out>/soup.json`` with every score.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from common.atomic import save_torch_atomically
from models.attributes.emotion_net import EmotionNet
from models.training.emotion_trainer import (
    EmotionTrainConfig,
    augment_batch,
    evaluate,
    export_weights,
)
from models.training.fer_data import load_fer_split, stratified_split

log = logging.getLogger(__name__)


def _average(states: list[dict]) -> dict:
    out = {}
    for k, v in states[0].items():
        if v.is_floating_point():
            out[k] = sum(s[k] for s in states) / len(states)
        else:  # BatchNorm's batch counter
            out[k] = v.clone()
    return out


@torch.no_grad()
def recompute_batch_norm(net: EmotionNet, train_frames: torch.Tensor, cfg: EmotionTrainConfig,
                         batches: int = 100, batch_size: int = 128, seed: int = 0) -> None:
    """Re-estimate every BatchNorm's running mean/variance (cumulative average) on
    augmented training faces, as SWA does."""
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches below
    net.train()
    g = torch.Generator().manual_seed(seed)
    for _ in range(batches):
        idx = torch.randint(0, len(train_frames), (batch_size,), generator=g)
        net(augment_batch(train_frames[idx], cfg, g))
    net.eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", type=Path, help="best.pt / epoch-NN.pt files (same width)")
    ap.add_argument("--fer", type=Path, required=True, help="FER2013 root with train/<emotion>/ folders")
    ap.add_argument("--run", type=Path, required=True, help="a run folder with the FER array cache (fer_train.npz)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--export", type=Path, help="also write the soup as fp16 app weights here")
    ap.add_argument("--framing", type=Path, default=Path("docs/results/fer_framing.json"),
                    help="bench/fit_fer_framing.py's result; its framing goes into the exported weights")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    images, labels, _ = load_fer_split(args.fer.expanduser(), "train", cache_dir=args.run.expanduser())
    first = torch.load(args.checkpoints[0], map_location="cpu", weights_only=True)
    base_cfg = first.get("config") or torch.load(args.run.expanduser() / "best.pt", map_location="cpu",
                                                  weights_only=True)["config"]
    cfg = EmotionTrainConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in base_cfg.items()
                                if k in EmotionTrainConfig.__dataclass_fields__})
    keep, select = stratified_split(labels, cfg.select_fraction, cfg.seed)  # the trainer's select split
    train_frames = torch.from_numpy(images[keep]).unsqueeze(1)
    se_x, se_y = images[select], labels[select]

    def score(state: dict, recompute: bool) -> tuple[float, EmotionNet]:
        net = EmotionNet(cfg.width, dropout=cfg.dropout).to(memory_format=torch.channels_last)
        net.load_state_dict(state)
        if recompute:
            recompute_batch_norm(net, train_frames, cfg)
        return evaluate(net, se_x, se_y)[0], net

    members = []
    for path in args.checkpoints:
        state = torch.load(path, map_location="cpu", weights_only=True)["model"]
        acc, _ = score(state, recompute=False)
        members.append({"path": str(path), "select_accuracy": acc, "state": state})
        log.info("%s: select accuracy %.4f", path, acc)
    members.sort(key=lambda m: -m["select_accuracy"])
    t0 = time.time()
    chosen = [members[0]]
    best_acc, best_net = score(members[0]["state"], recompute=False)
    steps = [{"members": [members[0]["path"]], "select_accuracy": best_acc}]
    for m in members[1:]:
        acc, net = score(_average([c["state"] for c in chosen + [m]]), recompute=True)
        steps.append({"members": [c["path"] for c in chosen + [m]], "select_accuracy": acc})
        log.info("soup + %s: select accuracy %.4f (best so far %.4f)", m["path"], acc, best_acc)
        if acc >= best_acc:
            chosen.append(m)
            best_acc, best_net = acc, net
    args.out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone() for k, v in best_net.state_dict().items()}
    save_torch_atomically({"model": state, "epoch": 0, "select_accuracy": best_acc, "config": base_cfg,
                           "soup_of": [c["path"] for c in chosen]}, args.out / "best.pt")
    doc = {"members": [{k: v for k, v in m.items() if k != "state"} for m in members], "greedy_steps": steps,
           "chosen": [c["path"] for c in chosen], "select_accuracy": best_acc,
           "seconds": round(time.time() - t0, 1), "select_faces": int(len(se_y))}
    (args.out / "soup.json").write_text(json.dumps(doc, indent=1))
    log.info("soup of %d: select accuracy %.4f -> %s", len(chosen), best_acc, args.out / "best.pt")
    if args.export:
        framing = json.loads(args.framing.read_text())
        meta = {"framing": framing["framing"], "framing_measured_on": f"{framing['images']} select faces ({args.framing.name})",
                "soup_of": [str(Path(c["path"]).parent.name) + "/" + Path(c["path"]).name for c in chosen]}
        log.info("exported %s", export_weights(args.out / "best.pt", args.export, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
