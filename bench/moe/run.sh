#!/usr/bin/env bash
# bench/moe: the llada2-mini shape (16.26B parameters, 256 experts, top 8) with random weights, in Q4_0 and
# in Q8_0, on the CPU: ms per denoising step of a 32-token block with the exact block KV cache at batch 1
# and batch 8, peak RSS, a streaming-read bandwidth, and the floor of a step (the bytes of the weights it
# reads, touched experts counted, over that bandwidth). See bench/moe/moebench.cpp.
#
#   bench/moe/run.sh [--models DIR] [--build DIR] [--formats q4_0,q8_0] [--threads 2] [--batches 1,8]
#                    [--gen 64] [--steps 8] [--no-results] [--plan-only DIR]
#
# --plan-only DIR: only plans each format's model into DIR/llada2-mini-<format> (config.json, index, each
# shard's header and plan for moe-fill; no data, no benchmark) — for bench/gpu/moe.sh on a GPU machine
# without Node (--formats none: the unquantized bf16 model it runs).
#
# The models go to DIR (default /tmp/vdiff-moe; 9.2 GB and 17.3 GB), written once by
# bench/moe/write-model.ts (make-model's layout, data by the native writer fill.cpp, checked against the
# TypeScript writer first) and reused while their directory holds write.json. Each model is read into the
# page cache before it is measured. Writes bench/results/moe-<date>.json (unless --no-results) and prints a
# Markdown table for bench/moe/RESULTS.md.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
models=/tmp/vdiff-moe
build=/tmp/vdiff-bench-moe
formats=q4_0,q8_0
threads=2
batches=1,8
gen=64
steps=8
results=1
plan_only=""
while [ $# -gt 0 ]; do
  case "$1" in
    --models) models="$2"; shift 2 ;;
    --build) build="$2"; shift 2 ;;
    --formats) formats="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --batches) batches="$2"; shift 2 ;;
    --gen) gen="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --no-results) results=0; shift ;;
    --plan-only) plan_only="$2"; shift 2 ;;
    *) echo "unknown flag $1" >&2; exit 2 ;;
  esac
done

mkdir -p "$models" "$build"
cmake -S "$root/native" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DVDIFF_CUDA=OFF >/dev/null
ninja -C "$build" -j2 vdiff_core >/dev/null
c++ -O3 -ffp-contract=off -std=c++20 -I "$root/native/src" "$root/bench/moe/fill.cpp" "$build/libvdiff_core.a" -lpthread -o "$build/moe-fill"
c++ -O3 -std=c++20 -I "$root/native/src" "$root/bench/moe/moebench.cpp" "$build/libvdiff_core.a" -lpthread -o "$build/moebench"

if [ -n "$plan_only" ]; then
  for format in ${formats//,/ }; do
    (cd "$root" && npx tsx bench/moe/write-model.ts --fill "$build/moe-fill" --format "$format" \
      --out "$plan_only/llada2-mini-$format" --threads "$threads" --plan-only)
  done
  exit 0
fi

out="$build/moe-runs.jsonl"
: > "$out"
for format in ${formats//,/ }; do
  dir="$models/llada2-mini-$format"
  if [ ! -f "$dir/write.json" ]; then
    need=$([ "$format" = q8_0 ] && echo 18 || echo 10)
    avail=$(df -Pk "$models" | awk 'NR==2 {print int($4 / 1048576)}')
    if [ "$avail" -lt "$need" ]; then
      echo "bench/moe: $models has $avail GiB free, the $format model needs about $need GiB" >&2
      exit 1
    fi
    (cd "$root" && npx tsx bench/moe/write-model.ts --fill "$build/moe-fill" --format "$format" --out "$dir" --threads "$threads") > "$build/write.json"
    mv "$build/write.json" "$dir/write.json"
  fi
  echo "bench/moe: reading $dir into the page cache" >&2
  cat "$dir"/*.safetensors > /dev/null
  "$build/moebench" --model "$dir" --threads "$threads" --batches "$batches" --gen "$gen" --steps "$steps" >> "$out"
done

node - "$out" "$root" "$results" <<'EOF'
const fs = require("node:fs")
const [file, root, results] = process.argv.slice(2)
const runs = fs.readFileSync(file, "utf8").trim().split("\n").map((l) => JSON.parse(l))
const date = new Date().toISOString().slice(0, 10)
const doc = { date, cpu: runs[0]?.cpu, threads: runs[0]?.threads, models: runs }
if (results === "1") {
  const path = `${root}/bench/results/moe-${date}.json`
  fs.mkdirSync(`${root}/bench/results`, { recursive: true })
  fs.writeFileSync(path, JSON.stringify(doc, null, 2) + "\n")
  console.error(`wrote ${path}`)
}
const gib = (b) => (b / 2 ** 30).toFixed(2)
console.log(`| weights | batch | ms / denoising step | experts read / layer | bytes read / step | floor (ms) | floor / measured | forwards (expected) | peak RSS |`)
console.log(`|---|---|---|---|---|---|---|---|---|`)
for (const m of runs) {
  for (const r of m.runs) {
    console.log(
      `| ${m.quant} (${gib(m.weights.total_bytes)} GiB) | ${r.batch} | ${r.denoise_ms_median.toFixed(0)} | ${r.experts_touched_per_layer.toFixed(0)} of ${m.weights.experts_per_layer} | ${gib(r.touched_bytes_per_step)} GiB | ${r.floor_ms.toFixed(0)} | ${r.floor_pct.toFixed(0)}% | ${r.forward_passes_per_sequence} (${r.expected_forwards})${r.finished_by_eos > 0 ? `, ${r.finished_by_eos} ended at EOS` : ""} | ${r.peak_rss_gib.toFixed(1)} GiB |`
    )
  }
}
console.log("")
for (const m of runs) {
  const [b1, b8] = [m.runs.find((r) => r.batch === 1), m.runs.find((r) => r.batch === 8)]
  const ratio = b1 && b8 ? `batch 8 costs ${(b8.denoise_ms_median / b1.denoise_ms_median).toFixed(2)}x batch 1 per step; ` : ""
  console.log(`${m.quant}: ${ratio}bandwidth ${m.bandwidth_gbps.toFixed(1)} GB/s (${m.threads} threads), ${m.bandwidth_1thread_gbps.toFixed(1)} GB/s (1 thread)`)
}
EOF
