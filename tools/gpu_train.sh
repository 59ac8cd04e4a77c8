#!/usr/bin/env bash
# The one command a GPU session runs (device tool, from the repo root), per model:
#
#   run(command="bash tools/gpu_train.sh detector --minutes 7 --imgsz 640 --batch 64",
#       carry=["gpu_payload/wheels", "gpu_payload/detector"], timeout_s=570)
#   run(command="bash tools/gpu_train.sh embedder", carry=["gpu_payload/embedder"], timeout_s=540)
#
# Before it, on the CPU machine (repo root; gpu_payload/ must be git-ignored):
#   python -m models.training.build_detector_data --cached-only --format webp --quality 75 \
#       --out ~/facelab-runs/detector-data-webp --report /tmp/detector_data_webp.json
#   python -m tools.gpu_train wheels             # detector only: ultralytics for py3.12 (~1.5 MB)
#   python -m tools.gpu_train prepare-detector   # WebP subset, <= 44 MiB with the wheels
#   python -m tools.gpu_train prepare-embedder   # LFW train half -> chips + dlib teacher (.npz)
# Carry only what the run needs (64 MiB per call): gpu_payload/wheels + gpu_payload/detector
# for the detector, gpu_payload/embedder for the embedder (carry those paths, not the folder).
#
# After it, with the files the tool brought back (its files_at folder):
#   python -m tools.gpu_train join FILES_AT --dest models/weights
#
# Extra arguments go to the run step, e.g. `... detector --minutes 4 --imgsz 800`.
# MINUTES (default 6; --minutes wins) bounds the training itself (ultralytics' `time`, checked
# after every batch); add ~1 min for start-up, RAM caching and the final validation of best.pt,
# so --minutes 7 fits timeout_s=570. The log is also saved to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."  # the repo root (this file is in tools/)

what="${1:?usage: gpu_train.sh detector|embedder [extra args]}"
shift
OUT="${OUT:-/tmp/facelab-gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 YOLO_OFFLINE=1 YOLO_AUTOINSTALL=false YOLO_CONFIG_DIR=/tmp/facelab-yolo-cfg
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "$what" = detector ]; then
  if ! python3 -c "import ultralytics" 2>/dev/null; then
    ls gpu_payload/wheels/*.whl >/dev/null 2>&1 || { echo "no gpu_payload/wheels: carry it" >&2; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site gpu_payload/wheels/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
fi

{
  nvidia-smi -L || true
  df -h /dev/shm || true  # DataLoader workers need room there (run-detector fits workers to it)
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  python3 -m tools.gpu_train "run-$what" --out "$OUT" --minutes "${MINUTES:-6}" "$@"
} 2>&1 | tee "$OUT/$what.log"
ls -la "$OUT"
