#!/usr/bin/env bash
# bench/cpu: builds vdiff_core in a build directory of its own and bench/cpu/cpubench.cpp against it, then
# runs it: the CPU model, the dispatched path, each instruction family's measured peak, the GEMMs and (with
# a model) the forward as stored and quantized at load, each with its percentage of the relevant peak.
#
#   bench/cpu/run.sh [BUILD_DIR] -- [--threads 2] [--model DIR] [--tokens 160] [--formats none,q8_0,q4_0] [--pack-max-mb N]
#                                   [--forward-trials 5] [--logit-rows 32] [--gemms none]
#   VDIFF_ISA=avx2 bench/cpu/run.sh ...   forces a lower path (the peaks are still measured for every family)
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
build="${1:-/tmp/vdiff-bench-cpu}"
shift || true
[ "${1:-}" = "--" ] && shift
cmake -S "$root/native" -B "$build" -G Ninja -DVDIFF_CUDA=OFF >/dev/null
ninja -C "$build" vdiff_core >/dev/null
c++ -O3 -std=c++20 -I "$root/native/src" "$root/bench/cpu/cpubench.cpp" "$build/libvdiff_core.a" -lpthread -o "$build/cpubench"
exec "$build/cpubench" "$@"
