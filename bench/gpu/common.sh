# Sourced by bench/gpu/run.sh and moe.sh: the repository root as the working directory, where results go
# ($OUT on the device machine, else bench/results), the build folder, the date, a timestamped step line,
# and cuBLAS from the nvidia-cublas Python package (VDIFF_CUBLAS_DIR, where the backend dlopens it).
set -u -o pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
RESULTS=${OUT:-$ROOT/bench/results}
mkdir -p "$RESULTS"
BUILD=${VDIFF_GPU_BUILD:-/tmp/vdiff-gpu-build}
DATE=$(date -u +%Y-%m-%d)
T0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - T0 )) s] $*"; }
export VDIFF_CUBLAS_DIR=${VDIFF_CUBLAS_DIR:-$(python3 bench/gpu/cublas_dir.py)}
