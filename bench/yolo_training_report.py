"""Training curve and summary of a ``models.training.yolo_long_run`` run.

    python bench/yolo_training_report.py --run ~/facelab-runs/<run> \
        [--png docs/results/yolo_face_training.png] [--out docs/results/yolo_face_training.json]

Reads the run's ``history.json`` (one row per finished epoch: mean training losses,
select-split AP50 and recall) and ``log.txt`` (per-step losses), draws losses and select
AP50 against training hours, and writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

STEP_RE = re.compile(r"epoch (\d+)/(\d+) step (\d+)/(\d+) box ([\d.]+) cls ([\d.]+) dfl ([\d.]+)")


def step_losses(log: Path) -> list[tuple[float, float, float, float]]:
    """(epoch as a fraction, box, cls, dfl) for every logged step."""
    out = []
    if not log.is_file():
        return out
    for line in log.read_text().splitlines():
        m = STEP_RE.search(line)
        if m:
            e, _, s, n = (int(m.group(i)) for i in range(1, 5))
            out.append((e - 1 + s / n, float(m.group(5)), float(m.group(6)), float(m.group(7))))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--png", type=Path, default=REPO / "docs" / "results" / "yolo_face_training.png")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "yolo_face_training.json")
    args = ap.parse_args(argv)

    from models.evaluation.plots import COLOURS, _pyplot, _save

    run = args.run.expanduser()
    history = json.loads((run / "history.json").read_text()) if (run / "history.json").is_file() else []
    steps = step_losses(run / "log.txt")
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    if steps:
        x = [s[0] for s in steps]
        for i, (name, colour) in enumerate(zip(("box", "cls", "dfl"), COLOURS[1:])):
            ax1.plot(x, [s[i + 1] for s in steps], lw=0.6, alpha=0.35, color=colour)
        for name, colour in zip(("box", "cls", "dfl"), COLOURS[1:]):
            if history:
                ax1.plot([h["epoch"] for h in history], [h[f"train_{name}"] for h in history], "o-", color=colour,
                         label=f"{name} loss (epoch mean)")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("training loss")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax1.set_title("training losses (thin: every 10th step)", fontsize=9)
    if history:
        ax2.plot([h["epoch"] for h in history], [h["select_AP50"] for h in history], "o-", color=COLOURS[1],
                 label="select AP50")
        ax2.plot([h["epoch"] for h in history], [h["select_recall"] for h in history], "s--", color=COLOURS[2],
                 label="select recall (conf 0.001)")
        for h in history:
            ax2.annotate(f"{h['hours']:.1f} h", (h["epoch"], h["select_AP50"]), fontsize=7, xytext=(2, 4),
                         textcoords="offset points")
    ax2.set_ylim(0, 1)
    ax2.set_xlabel("epoch")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    ax2.set_title("select split (from the training sources), IoU 0.5", fontsize=9)
    _save(fig, args.png)
    summary = {"run": str(run), "epochs_done": len(history), "history": history,
               "best": max(history, key=lambda h: h["select_AP50"]) if history else None}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.png} and {args.out}")
    return summary


if __name__ == "__main__":
    main()
