"""Training throughput of the distillation run's real step, per thread count and input size.

    python bench/distill_throughput.py [--data ~/facelab-runs/embedder-data] [--steps 2]
        [--threads 1 2] [--sizes 112 96] [--out docs/results/distill_throughput.json]

Each configuration runs ``DistillRun.train_step`` (read chips from the store, augment,
dlib teacher flip-averaged on the augmented chips, ResNet50 forward + backward + AdamW +
EMA, batch 64) in a throwaway run folder: one warm-up step, then ``--steps`` timed steps.
Reported per configuration: images/s by wall clock, and images per CPU-second of the
process (``time.process_time``): on a shared, overloaded machine the wall rate says
how busy the machine was, the CPU-time rate what a step costs (for 1 thread, the rate an
idle core would give). The teacher's share is measured inside each step, so the cost of
``--teacher stored`` is the same step without it. Ratios to the first configuration
come from the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_DATA = Path.home() / "facelab-runs" / "embedder-data"


def measure(data: Path, threads: int, size: int, steps: int, batch: int, teacher: str, precision: str) -> dict:
    import torch

    from models.training.distill_trainer import DistillConfig, DistillRun

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = DistillConfig(data=str(data), run=tmp, input_size=size, batch_size=batch, teacher=teacher,
                            threads=threads, eval_every_steps=0, precision=precision)
        run = DistillRun(cfg, log=lambda m: None)
        run.teacher.load()
        run.train_step()  # warm-up: allocator, first-touch of the memmap, teacher load
        rows = []
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            rows.append(run.train_step())
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    n = steps * batch
    mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    return {"threads": threads, "input_size": size, "teacher": teacher, "precision": run.precision, "batch": batch,
            "steps": steps, "img_s_wall": round(n / wall, 3), "img_per_cpu_s": round(n / cpu, 3),
            "s_per_step_wall": {"data_augment": round(mean("t_data"), 3), "teacher": round(mean("t_teacher"), 3),
                                "student": round(mean("t_student"), 3)},
            "teacher_share_of_step": round(mean("t_teacher") / (wall / steps), 3),
            "load_avg_1min": round(os.getloadavg()[0], 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--sizes", type=int, nargs="+", default=[112, 96])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--teacher", choices=["online", "stored"], default="online")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import cv2

    cv2.setNumThreads(1)
    from models.cpu_features import cpu_flags, cpu_native_bf16

    rows = []
    for threads in args.threads:
        for size in args.sizes:
            r = measure(args.data, threads, size, args.steps, args.batch, args.teacher, args.precision)
            rows.append(r)
            print(json.dumps(r), flush=True)
    base = rows[0]
    for r in rows:
        r["ratio_cpu_rate_to_first"] = round(r["img_per_cpu_s"] / base["img_per_cpu_s"], 3)
        r["ratio_wall_rate_to_first"] = round(r["img_s_wall"] / base["img_s_wall"], 3)
    doc = {"benchmark": "distillation training step (bench/distill_throughput.py)", "rows": rows,
           "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "native_bf16": cpu_native_bf16(), "avx512": any(f.startswith("avx512") for f in cpu_flags()),
           "command": "python " + " ".join(sys.argv),
           "note": "shared machine: other jobs ran at the same time (see load_avg_1min)",
           "date": time.strftime("%Y-%m-%d")}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
