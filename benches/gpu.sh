#!/usr/bin/env bash
# The embedding benchmark on a GPU machine: throughput of inference and of the whole pipeline
# on CUDA, and the accelerator's utilisation while they run. Not part of the test suite.
#
#   benches/gpu.sh            # device cuda (the first GPU); CORAL_BENCH_DEVICE=cuda:1 for another
#
# Needs an NVIDIA driver (nvidia-smi) and the full PyTorch 2.13.0 wheel with its CUDA
# dependencies, which it installs into ${XDG_CACHE_HOME:-~/.cache}/coral/venv-torch-cuda (several
# GB, once). Runs scripts/setup first for everything else (PostgreSQL, ffmpeg). Writes the
# bench's output and the utilisation samples to target/gpu-bench/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CACHE_ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/coral"
VENV="$CACHE_ROOT/venv-torch-cuda"
OUT=target/gpu-bench
export CORAL_BENCH_DEVICE="${CORAL_BENCH_DEVICE:-cuda}"

command -v nvidia-smi >/dev/null || {
    echo "gpu.sh: no nvidia-smi: this machine has no NVIDIA GPU driver" >&2
    exit 1
}
scripts/setup --for demo
if [[ ! -x $VENV/bin/python ]]; then
    python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") and torch.cuda.is_available() else 1)' 2>/dev/null; then
    "$VENV/bin/pip" install --quiet "torch==2.13.0"
fi
LIBTORCH=$("$VENV/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
export LIBTORCH LIBTORCH_CXX11_ABI=1
# libtorch's CUDA libraries come from the nvidia-* wheels beside torch.
LD_LIBRARY_PATH="$(find "$(dirname "$LIBTORCH")/nvidia" -maxdepth 3 -type d -name lib -printf '%p:' 2>/dev/null)${LD_LIBRARY_PATH:-}"
export LD_LIBRARY_PATH

mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
cargo build --release --workspace --bins --features corald/embed
cargo bench -p coral-benches --features corald/embed --bench embed --no-run

# Utilisation every 200 ms while the bench runs.
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits \
    -lms 200 >"$OUT/utilisation.csv" &
sampler=$!
trap 'kill "$sampler" 2>/dev/null || true' EXIT
cargo bench -p coral-benches --features corald/embed --bench embed 2>&1 | tee "$OUT/bench.txt"
kill "$sampler" 2>/dev/null || true
wait "$sampler" 2>/dev/null || true

awk -F', *' '$2 > 0 { busy++; sum += $2; if ($2 > max) max = $2; if ($3 > mem) mem = $3 }
    { n++ }
    END { if (n) printf "GPU utilisation over %d samples: mean %.0f %% (of samples with any work: %d), max %d %%, peak memory %d MiB\n",
              n, sum / n, busy, max, mem }' "$OUT/utilisation.csv" | tee "$OUT/utilisation.txt"
