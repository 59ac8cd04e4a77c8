#!/usr/bin/env bash
# One lent-GPU session, as a few device-tool calls from the repo root (each call
# carries at most 64 MiB, and the machine stays only while calls follow each other
# within its warm period, so data is staged in /tmp there between calls):
#
#   1. run("bash tools/gpu_session.sh stage",              carry=["gpu_payload/emb0"])
#   2. run("bash tools/gpu_session.sh embedder MINUTES",   carry=["gpu_payload/emb1"])
#        stages emb1, starts the embedder distillation in its own process session
#        (it outlives the call) and returns
#   3. run("bash tools/gpu_session.sh detector MINUTES",   carry=["gpu_payload/detector", "gpu_payload/wheels"])
#        trains the detector in the foreground, waits for the embedder, bundles both
#        into $OUT (tools.gpu_distill bundle: fp16 weights, summaries, logs)
#   4. run("bash tools/gpu_session.sh collect")            (anything that did not fit)
#
# Back here: python -m tools.gpu_distill unbundle FILES_AT --dest /tmp/gpu-back
set -uo pipefail
cd "$(dirname "$0")/.."
what="${1:?usage: gpu_session.sh stage|embedder|detector|collect [minutes]}"
minutes="${2:-7}"
STAGE=/tmp/facelab-stage
WORK=/tmp/facelab-work
OUT="${OUT:-/tmp/facelab-gpu-out}"
mkdir -p "$STAGE" "$WORK" "$OUT"
export PYTHONUNBUFFERED=1 YOLO_OFFLINE=1 YOLO_AUTOINSTALL=false YOLO_CONFIG_DIR=/tmp/facelab-yolo-cfg
export GRADIO_ANALYTICS_ENABLED=False PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

stage() {  # copy whatever payload this call carried into /tmp (kept while the machine is held)
  for d in gpu_payload/*; do
    [ -d "$d" ] && cp -r "$d" "$STAGE/" && echo "staged $d: $(du -sb "$d" | cut -f1) bytes"
  done
}

give_back_parts() {  # parts not yet given back, up to 60 MiB per call (the tool's limit is 64)
  local total=0 size
  touch "$WORK/given"
  for p in "$WORK"/bundle/bundle.sha256 "$WORK"/bundle/bundle.part*; do
    [ -f "$p" ] || continue
    grep -qx "$p" "$WORK/given" && continue
    size=$(stat -c %s "$p")
    if [ $((total + size)) -gt $((60 * 1024 * 1024)) ]; then echo "LEFT FOR collect: $p"; continue; fi
    cp "$p" "$OUT/" && echo "$p" >>"$WORK/given" && total=$((total + size))
  done
  ls -la "$OUT"
}

case "$what" in
  stage)
    stage
    nvidia-smi -L; nproc; free -g | head -2; df -h /dev/shm /tmp | cat
    # DataLoader workers hand batches over through /dev/shm: make room if it is small
    shm_kb=$(df -k /dev/shm | awk 'NR==2 {print $2}')
    if command -v nvidia-smi >/dev/null && [ "${shm_kb:-0}" -lt 16000000 ]; then mount -o remount,size=32G /dev/shm && df -h /dev/shm | cat; fi
    python3 -c "import torch, torchvision, cv2; print('torch', torch.__version__, 'tv', torchvision.__version__, 'cv2', cv2.__version__, 'cuda', torch.cuda.is_available())"
    ;;
  embedder)
    stage
    payloads=()
    for d in "$STAGE"/emb*; do payloads+=(--payload "$d"); done
    echo "embedder payloads: ${payloads[*]}"
    rm -rf "$WORK/emb"; mkdir -p "$WORK/emb"
    setsid nohup python3 -m tools.gpu_distill train "${payloads[@]}" --out "$WORK/emb" --minutes "$minutes" \
      --workers "${EMB_WORKERS:-5}" ${EMB_ARGS:-} >"$WORK/emb/stdout.log" 2>&1 < /dev/null &
    sleep 25  # the first lines (data decoded: 12-21 s on the H200) come back with this call; device time counts
    cat "$WORK/emb/stdout.log"
    ;;
  detector)
    stage
    if ! python3 -c "import ultralytics" 2>/dev/null; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$STAGE"/wheels/*.whl
      export PYTHONPATH="$PYTHONPATH:/tmp/site"
    fi
    mkdir -p "$WORK/det"
    # a hard cap, so the bundling below always runs inside the call's own limit
    timeout "$(python3 -c "print(int(float('$minutes') * 60 + 120))")" python3 -m tools.gpu_train run-detector --data "$STAGE/detector/data.yaml" --out "$WORK/det" \
      --minutes "$minutes" --imgsz 640 --batch 64 2>&1 | tee "$WORK/det/stdout.log" | grep -v '^{"event": "batch' | tail -c 20000
    echo "detector done; waiting for the embedder"
    for _ in $(seq 1 60); do [ -f "$WORK/emb/embedder_summary.json" ] && break; sleep 5; done
    tail -n 5 "$WORK/emb/stdout.log"
    python3 -m tools.gpu_train join "$WORK/det" --dest "$WORK/detw"
    python3 -m tools.gpu_distill bundle "$WORK"/detw/yolov8s-face.pt "$WORK"/emb/resnet50-face.pt \
      "$WORK"/det/detector_summary.json "$WORK"/emb/embedder_summary.json "$WORK"/emb/train_log.jsonl \
      "$WORK"/det/stdout.log "$WORK"/emb/stdout.log --out "$WORK/bundle"
    give_back_parts
    ;;
  embedder-wait)  # the embedder alone (no detector this session): wait, bundle, give back
    for _ in $(seq 1 100); do [ -f "$WORK/emb/embedder_summary.json" ] && break; sleep 5; done
    grep -v '"event": "train"' "$WORK/emb/stdout.log" | tail -n 12
    python3 -m tools.gpu_distill bundle "$WORK"/emb/resnet50-face.pt "$WORK"/emb/embedder_summary.json \
      "$WORK"/emb/train_log.jsonl "$WORK"/emb/stdout.log --out "$WORK/bundle"
    give_back_parts
    ;;
  collect)
    ls -la "$WORK"/* ; tail -n 5 "$WORK"/emb/stdout.log
    give_back_parts
    ;;
esac
