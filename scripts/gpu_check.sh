#!/usr/bin/env bash
# The project's GPU checks as one prepared run for a session that is lent a device machine (an H200, 15 minutes of
# device time in all): the CUDA tests and the GPU rows of the benchmarks, each log under $OUT.
#
#   bash scripts/gpu_check.sh --wheels   # here, once: the packages the device's Python 3.12 lacks (kornia,
#                                        # kornia_rs, faiss-cpu, at this venv's versions) into .whl/ (git-ignored)
#   bash scripts/gpu_check.sh            # on the device: device tool `run` with carry [".whl"], timeout_s 600
#   bash scripts/gpu_check.sh million    # on the device, if time is left: the 1M-node diffusion row (faiss IVF)
#
# The default run is sized to end within about 9 minutes (each step has its own timeout, so one slow step cannot
# take the others' time): the tests whose id names CUDA (--device=cuda parametrisations and the test_cuda_* ones;
# app tests need hydra, absent there, and are left out by --continue-on-collection-errors), bench_spatial
# --device cuda (the batched matcher and the torch MSER detector on the GPU), bench_diffusion --parts large (CG on
# a 100k-node graph, CPU, SciPy and GPU rows) and bench_heat (its GPU row). Without CUDA it writes the environment
# line and stops.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-all}

if [ "$mode" = "--wheels" ]; then
    py=.venv/bin/python
    [ -x "$py" ] || { echo "gpu_check --wheels: run bash scripts/setup.sh first (the versions come from .venv)"; exit 1; }
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
    mkdir -p .whl
    kornia=$($py -c 'import kornia; print(kornia.__version__)')
    faiss=$($py -c 'import faiss; print(faiss.__version__)')
    exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "kornia==$kornia" kornia_rs "faiss-cpu==$faiss"
fi

OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_check: installing .whl/ failed"; exit 1; }
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

$PY - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none (no CUDA)")
print("cpus:", __import__("os").cpu_count())
EOF
if ! $PY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA device here; nothing else to check" | tee -a "$OUT/env.txt"
    exit 0
fi

step() {  # step NAME SECONDS COMMAND...: the command's output to $OUT/NAME.txt, its exit status to the summary
    local name=$1 secs=$2
    shift 2
    local t0=$SECONDS
    timeout "$secs" "$@" >"$OUT/$name.txt" 2>&1
    local rc=$?
    echo "$name: rc $rc after $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
}

if [ "$mode" = "million" ]; then
    step bench_diffusion_million 560 $PY -m benchmarks.bench_diffusion --million --parts
    exit 0
fi
step tests 180 $PY -m pytest -q -p no:cacheprovider --continue-on-collection-errors --device=cuda -k cuda tests
step bench_spatial 120 $PY -m benchmarks.bench_spatial --device cuda --repeats 5 --json "$OUT/bench_spatial.json"
step bench_diffusion 150 $PY -m benchmarks.bench_diffusion --parts large
step bench_heat 90 $PY -m benchmarks.bench_heat
