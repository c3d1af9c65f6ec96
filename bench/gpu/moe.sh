#!/usr/bin/env bash
# Issue 23's MoE benchmark on a lent GPU, in one device call: the llada2-mini shape (16.26B parameters, 256
# experts, top 8, random bf16 weights) on the CUDA backend — ms per denoising step of a 32-token block with
# the exact block KV cache at batch 1 and batch 8, against the floor of the bytes a step reads over the
# GPU's own bandwidth (bench/moe/moebench.cpp --device cuda).
#
# The device has no Node, so the model's layout is planned first on a machine with one (about a minute;
# config.json, the index, each shard's header and plan, no data):
#   bash bench/moe/run.sh --formats none --plan-only .gpu-moe      (builds moe-fill, checks it, plans)
# then, with the plan carried (device tool: carry [".gpu-moe"]):
#   bash bench/gpu/moe.sh                                           (about 3 minutes: 32.5 GB written)
# Steps: build moe-fill and moebench against the CUDA build (bench/gpu/CMakeLists.txt, sm_90); fill the
# shards from their plans (make-model's bytes, computed by fill.cpp); a device-to-device copy measures the
# GPU's bandwidth (torch); moebench --device cuda. Writes moe-gpu-<date>.json to $OUT (or bench/results).
source "$(dirname "$0")/common.sh"
MODEL=${VDIFF_GPU_MOE_MODEL:-$ROOT/.gpu-moe/llada2-mini-none}

[ -f "$MODEL/config.json" ] || { echo "no planned model at $MODEL (see the comment at the top)"; exit 1; }
echo "VDIFF_CUBLAS_DIR=$VDIFF_CUBLAS_DIR"

stamp "build"
cmake -S bench/gpu -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90-real \
  > "$RESULTS/moe-build.log" 2>&1 && ninja -C "$BUILD" -j"$(nproc)" moe-fill moebench >> "$RESULTS/moe-build.log" 2>&1 \
  || { echo "BUILD FAILED"; tail -30 "$RESULTS/moe-build.log"; exit 1; }

# 32.5 GB of shards: on a warm machine run.sh's LLaDA-8B model (16 GB) may still take the disk.
free_gb=$(df -Pk "$MODEL" | awk 'NR==2 {print int($4 / 1048576)}')
if [ "$free_gb" -lt 36 ] && [ -d "${VDIFF_GPU_MODEL:-/tmp/vdiff-llada8b-random}" ]; then
  echo "only $free_gb GiB free: removing run.sh's model"; rm -rf "${VDIFF_GPU_MODEL:-/tmp/vdiff-llada8b-random}"
fi
df -h "$MODEL" | tail -1

stamp "fill the shards ($(ls "$MODEL"/*.plan.json | wc -l) plans)"
for plan in "$MODEL"/*.plan.json; do
  # Every plan at once: each writer uses 2 threads, the disk takes the rest.
  sed -i 's/"threads":[0-9]*/"threads":2/' "$plan"
  "$BUILD/moe-fill" "$plan" > /dev/null &
done
wait
du -sh "$MODEL"

stamp "GPU bandwidth (device-to-device copy)"
GBPS=$(python3 - <<'PY'
import torch
x = torch.empty(4 << 30, dtype=torch.uint8, device="cuda")
y = torch.empty_like(x)
best = 0.0
for _ in range(5):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(); y.copy_(x); end.record(); torch.cuda.synchronize()
    best = max(best, 2 * x.numel() / (start.elapsed_time(end) / 1e3) / 1e9)  # read + write
print(f"{best:.1f}")
PY
)
echo "bandwidth ${GBPS} GB/s"

stamp "moebench --device cuda"
for steps in 2 8; do
  timeout 300 "$BUILD/moebench" --model "$MODEL" --device cuda --threads 4 --batches 1,8 --gen 64 --steps $steps \
    --bandwidth-gbps "$GBPS" > "$RESULTS/moe-gpu-steps$steps.json" 2> "$RESULTS/moe-gpu-steps$steps.err"
  echo "steps $steps: rc $?"; tail -4 "$RESULTS/moe-gpu-steps$steps.err"
done
python3 - "$RESULTS" "$DATE" <<'PY'
import json, sys
out, date = sys.argv[1], sys.argv[2]
runs = {}
for steps in (2, 8):
    try:
        runs[f"steps_{steps}"] = json.load(open(f"{out}/moe-gpu-steps{steps}.json"))
    except Exception as e:
        runs[f"steps_{steps}"] = {"error": str(e)}
json.dump({"date": date, **runs}, open(f"{out}/moe-gpu-{date}.json", "w"), indent=1)
for name, r in runs.items():
    for run in r.get("runs", []):
        print(f"{name} batch {run['batch']}: {run['denoise_ms_median']} ms / denoising step, floor {run['floor_ms']} ms "
              f"({run['floor_pct']}%), {run['experts_touched_per_layer']} experts / layer, forwards "
              f"{run['forward_passes_per_sequence']} ({run['expected_forwards']} expected)")
PY
stamp "done"
