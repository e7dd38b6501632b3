#!/usr/bin/env bash
# One GPU validation round from a source checkout, in as few commands as a borrowed GPU allows:
# build the CUDA module for the GPU at hand, run the GPU tests, run the benchmark suite.
#
#   benchmarks/gpu_round.sh OUT_DIR [build,tests,bench] [EXTRA_WORKLOADS_DIR]
#
# Stages default to all three; name a subset to split a round over several calls (the build stays
# in the checkout). Everything lands in OUT_DIR: env.log, build.log, pytest-gpu.log (+ junit XML),
# bench.log and <device-kind>.json/.png. Exits non-zero when a stage fails; later stages still run
# so that one call brings back as much as it can.
set -uo pipefail
out=${1:?usage: benchmarks/gpu_round.sh OUT_DIR [build,tests,bench] [EXTRA_WORKLOADS_DIR]}
stages=${2:-build,tests,bench}
workloads=${3:-}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0

{
    date -u +%FT%TZ
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    python3 -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} >"$out/env.log" 2>&1
cat "$out/env.log"

if [[ ",$stages," == *",build,"* ]]; then
    # Only the GPU at hand's architecture: half the nvcc time of the default sm_80 + sm_90 build.
    arch=$(python3 -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}')")
    echo "building gradfuse._C_cuda for sm_${arch/./}"
    # Editable: gradfuse.triton_kernels maps to triton_kernels/ only through the install.
    if ! GRADFUSE_CUDA=1 GRADFUSE_CUDA_ARCH_LIST="$arch" python3 -m pip install --no-build-isolation --no-deps -e . \
        >"$out/build.log" 2>&1; then
        tail -40 "$out/build.log"
        exit 1  # nothing below means anything without the module
    fi
    python3 -c "import gradfuse; print('backends on cuda:', gradfuse.available_backends('cuda'))" || status=1
fi

if [[ ",$stages," == *",tests,"* ]]; then
    python3 -m pytest -m gpu -q -p no:cacheprovider --junitxml="$out/pytest-gpu.xml" tests 2>&1 \
        | tee "$out/pytest-gpu.log" | tail -40
    [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
fi

if [[ ",$stages," == *",bench,"* ]]; then
    kind=$(python3 -c "import torch, benchmarks.environment as e; print(e.device_kind(torch.device('cuda')))" || echo gpu)
    python3 -m benchmarks --device cuda ${workloads:+--workloads-dir "$workloads"} --no-progress \
        --compile-budget 60 --out "$out/$kind.json" 2>&1 | tee "$out/bench.log" | tail -80
    [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
fi
exit "$status"
