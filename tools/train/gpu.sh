#!/usr/bin/env bash
# Trains the embedded Shakespeare model on a lent GPU in one device call (issue 19) and brings the weights
# back through $OUT as pack.py shards (the device has torch but no Node, so export.py runs back here).
#
# Here, before the call (the corpus is not in the repository and ../shared does not travel):
#   mkdir -p .train-data && cp ../shared/data/tinyshakespeare.txt .train-data/
#   grep -qx /.train-data/ .git/info/exclude || echo /.train-data/ >> .git/info/exclude
# The device call: command `bash tools/train/gpu.sh`, carry [".train-data"], timeout_s 600.
# Back here, with FILES the call's files_at:
#   /usr/bin/python3 tools/train/export.py --packed FILES/pack --tokenizer models/shakespeare \
#     --raw /tmp/gpu-raw --out /tmp/gpu-model --dtype bf16
#   /usr/bin/python3 tools/train/evaluate.py --model /tmp/gpu-model --corpus ../shared/data/tinyshakespeare.txt --seq-len 256
#
# The run trains from scratch with the stage-3 data options (context 512, packed chat conversations, a
# share of them starting at a reply that takes up the line) for at most MINUTES minutes, probes the
# held-out split every 250 steps and keeps the EMA weights with the best probe at mask ratio 0.5. Unless
# STEPS is given, a 100-step timing run first sizes the cosine schedule to end within the time. The log
# (log.txt) records every argument and the step the run stopped at; the same arguments repeat the run.
# DEVICE=cpu with a tiny ARCH checks the whole pipeline on a machine without a GPU; on a CPU with a bf16 dot
# instruction, DEVICE=cpu THREADS=2 EXTRA=--cpu-bf16 PYTHON=/usr/bin/python3 trains the real ARCH there
# (STAGE4.md).
set -euo pipefail
export PYTHONUNBUFFERED=1
root=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:-/tmp/gpu-train-out}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
MINUTES=${MINUTES:-7}
STEPS=${STEPS:-}
THREADS=${THREADS:-8}
EXTRA=${EXTRA:-}
CORPUS=${CORPUS:-$root/.train-data/tinyshakespeare.txt}
ARCH=${ARCH:-"--d-model 320 --n-heads 5 --n-layers 8 --mlp-hidden 1024"}
BATCH=${BATCH:-"--batch 32 --sft-rows 8"}
mkdir -p "$OUT"
cd "$root/tools/train"
"$PYTHON" - "$DEVICE" <<'PY'
import sys, torch
if sys.argv[1] == "cuda" and not torch.cuda.is_available():
    raise SystemExit("gpu.sh: no CUDA device visible to torch")
print("torch", torch.__version__, torch.cuda.get_device_name(0) if sys.argv[1] == "cuda" else "cpu", flush=True)
PY
common="--device $DEVICE --threads $THREADS $EXTRA --tokenizer $root/models/shakespeare --corpus $CORPUS --ckpt /tmp/gpu-train-ckpt.pt
  --seed 0 $ARCH --seq-len 512 $BATCH --sft-len 256 --sft-from 0 --random-length 0.3 --sft-packed --sft-echo 0.5
  --lr 1e-3 --min-lr 5e-5 --warmup 200 --ema 0.999"
: > "$OUT/log.txt"
if [ -z "$STEPS" ]; then
  # The cosine should end when the time does: time steps 26-100 of a short run (its set-up and first steps
  # excluded), then size the run to 90% of MINUTES.
  rm -f /tmp/gpu-train-ckpt.pt
  # shellcheck disable=SC2086
  "$PYTHON" train.py $common --steps 100 --log-every 25 --eval-every 1000 --ckpt-every 1000 > /tmp/gpu-timing.txt 2>&1
  cat /tmp/gpu-timing.txt >> "$OUT/log.txt"
  STEPS=$("$PYTHON" - "$MINUTES" /tmp/gpu-timing.txt <<'PY'
import re, sys
elapsed = dict(re.findall(r"^step (\d+) loss .* elapsed ([0-9.]+)s$", open(sys.argv[2]).read(), re.M))
per_step = (float(elapsed["100"]) - float(elapsed["25"])) / 75
print(max(100, int(0.9 * 60 * float(sys.argv[1]) / per_step)))
PY
)
  echo "timing run: $STEPS steps fit in 90% of $MINUTES minutes" | tee -a "$OUT/log.txt"
fi
args="$common --steps $STEPS --ckpt-every 1000 --eval-every 250 --log-every 50 --max-minutes $MINUTES
  --keep-best /tmp/gpu-train-best.pt"
echo "train.py $args" | tee -a "$OUT/log.txt"
rm -f /tmp/gpu-train-ckpt.pt /tmp/gpu-train-best.pt
# shellcheck disable=SC2086
"$PYTHON" train.py $args 2>&1 | tee -a "$OUT/log.txt"
"$PYTHON" pack.py --from /tmp/gpu-train-best.pt --out "$OUT/pack" | tee -a "$OUT/log.txt"
