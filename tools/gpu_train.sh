#!/usr/bin/env bash
# The one command a GPU session runs (device tool, from the repo root), per model:
#
#   run(command="bash tools/gpu_train.sh detector", carry=["gpu_payload"], timeout_s=540)
#   run(command="bash tools/gpu_train.sh embedder", carry=["gpu_payload"], timeout_s=540)
#
# Before it, on the CPU machine (repo root; gpu_payload/ must be git-ignored):
#   python -m tools.gpu_train wheels             # detector only: ultralytics for py3.12 (~1.5 MB)
#   python -m tools.gpu_train prepare-detector   # face_mask train/val -> YOLO (~28 MB, seconds)
#   python -m tools.gpu_train prepare-embedder   # LFW train half -> chips + dlib teacher (.npz)
# Carry only what the run needs (64 MiB per call): gpu_payload/wheels + gpu_payload/detector
# for the detector, gpu_payload/embedder for the embedder (carry those paths, not the folder).
#
# After it, with the files the tool brought back (its files_at folder):
#   python -m tools.gpu_train join FILES_AT --dest models/weights
#
# Extra arguments go to the run step, e.g. `... detector --minutes 4 --imgsz 800`.
# MINUTES (default 6) bounds the training itself; add ~1 min for start-up and the
# final validation, so timeout_s=540 leaves room. The log is also saved to $OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."

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
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  python3 -m tools.gpu_train "run-$what" --out "$OUT" --minutes "${MINUTES:-6}" "$@"
} 2>&1 | tee "$OUT/$what.log"
ls -la "$OUT"
