#!/usr/bin/env bash
# One-command GPU check (issue 17): the CUDA tests, the calibration and the CUDA decode benchmark, in one go.
#
#     bash scripts/gpu_check.sh          # from any folder; about 5-7 minutes on one H200 (budget: under 8)
#
# Everything lands in scripts/results/gpu/ (GPU_CHECK_OUT=DIR to put it elsewhere), 8 files at most, so that a
# session on a lent machine gets all of them back even if its call is cut short: `GPU_CHECK_OUT=$OUT bash
# scripts/gpu_check.sh` there, then copy them into scripts/results/gpu/ here and commit them. Each step has a
# time limit, and no step starts after GPU_CHECK_SECONDS (460) with less than 30 s left:
#   summary.txt                    the machine (nvidia-smi, torch, CUDA), each step's exit status and time
#   pytest-gpu.txt                 python -m pytest -m gpu: CUDA parity with transformers (float32, bf16), prefetch
#                                  on CUDA, the pinned double-buffered staging, hybrid against fetch-only, the
#                                  CUDA measurements of bench-hw, the CUDA mover and the dequantizing layout
#   bench-hw.txt, hardware.json    offload bench-hw: memory, O_DIRECT disk, CPU and GPU expert rates, pinned H2D
#   bench_decode-cuda.{json,log}   scripts/bench_decode.py --device cuda: the RAM tier at 100/50/25%, with and
#                                  without pregate, transformers eager for reference tokens; the performance
#                                  model's prediction beside each, from hardware.json
#   bench_decode-cuda-hybrid.{json,log}  the same at 50/25% with --hybrid auto
#                                  execution into the MoE block (skipped until offload/model.py mentions it)
#
# It installs nothing. It runs this checkout (put first on PYTHONPATH, no pip install) with $PYTHON (default
# python3: on the project's H200 image, the one that has torch with CUDA) and expects the packages the project
# and its tests import to be there, as they are on that image: torch (CUDA), numpy, numba, safetensors,
# tokenizers, typer, rich, psutil, jinja2, huggingface_hub, transformers, pytest, pytest-xdist, hypothesis.
# compressed-tensors and accelerate are optional (their tests skip). A missing package is named in summary.txt
# and stops the check; on a machine without a registry, bring it as a wheel (.library/device/README.md).
#
# Exit status: 0 when the GPU tests pass; 1 when they fail; 2 without a usable CUDA device; 3 when a package is
# missing. A benchmark that fails is reported in summary.txt but does not fail the check.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${GPU_CHECK_OUT:-$ROOT/scripts/results/gpu}"
PY="${PYTHON:-python3}"
DEADLINE="${GPU_CHECK_SECONDS:-460}"
cd "$ROOT" || exit 2
mkdir -p "$OUT_DIR"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
SUMMARY="$OUT_DIR/summary.txt"
: >"$SUMMARY"

note() { echo "$*" | tee -a "$SUMMARY"; }

step() {  # step NAME TIMEOUT_S LOG COMMAND...: run with a time limit, log its output, record status and time
    local name=$1 limit=$2 log=$3 start=$SECONDS left=$((DEADLINE - SECONDS)) rc
    shift 3
    if [ "$left" -lt 30 ]; then
        note "== $name: skipped, out of time"
        return 124
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    note "== $name (at most $limit s): $*"
    timeout "$limit" "$@" >"$log" 2>&1
    rc=$?
    note "   exit $rc after $((SECONDS - start)) s (log: ${log#"$ROOT"/})"
    return $rc
}

ENV_CHECK='
import importlib.util, sys
import torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, cuda available "
      f"{torch.cuda.is_available()}, {torch.cuda.device_count()} device(s), {torch.get_num_threads()} threads")
needed = ["numpy", "numba", "safetensors", "tokenizers", "typer", "rich", "psutil", "jinja2", "huggingface_hub",
          "transformers", "pytest", "xdist", "hypothesis"]
missing = [m for m in needed if importlib.util.find_spec(m) is None]
optional = [m for m in ["compressed_tensors", "accelerate", "pynvml"] if importlib.util.find_spec(m) is None]
print("missing: " + (", ".join(missing) or "none") + "; optional, absent: " + (", ".join(optional) or "none"))
sys.exit(3 if missing else 0 if torch.cuda.is_available() else 2)
'

note "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true; } | tee -a "$SUMMARY"
"$PY" -c "$ENV_CHECK" 2>&1 | tee -a "$SUMMARY"
env_rc=${PIPESTATUS[0]}
if [ "$env_rc" -ne 0 ]; then
    [ "$env_rc" -ne 3 ] && env_rc=2  # no python/torch, a CPU build of torch, or no device
    note "not running: $([ "$env_rc" = 3 ] && echo 'packages missing (above)' || echo 'no usable CUDA device')"
    exit "$env_rc"
fi

# 1. the CUDA tests (the rest of the suite is deselected; collection still imports every test module)
step "pytest -m gpu" 150 "$OUT_DIR/pytest-gpu.txt" "$PY" -m pytest -m gpu -q -p no:cacheprovider -n 4 -rs
tests_rc=$?
tail -n 3 "$OUT_DIR/pytest-gpu.txt" | sed 's/^/   /' | tee -a "$SUMMARY"

# 2. the calibration the cost and performance models read (written here, not to the user's cache)
CALIBRATION=()
if step "offload bench-hw" 90 "$OUT_DIR/bench-hw.txt" \
        "$PY" -m cli.main bench-hw --out "$OUT_DIR/hardware.json" --path /tmp/offload-gpu-check; then
    CALIBRATION=(--calibration "$OUT_DIR/hardware.json")
fi

# 3. decode on CUDA, experts in host RAM: 100/50/25% with and without pregate, transformers eager for reference
BENCH=("$PY" scripts/bench_decode.py --device cuda --dtype bfloat16 --repeats 2 --new-tokens 24 --threads 8
       --work-dir /tmp/offload-bench "${CALIBRATION[@]}")
step "bench_decode --device cuda" 270 "$OUT_DIR/bench_decode-cuda.log" "${BENCH[@]}" \
    --configs offload-ram-100,offload-ram-50,offload-ram-25,hf-eager --predictor pregate \
    --out "$OUT_DIR/bench_decode-cuda.json"
sed -n '/^| configuration | decode tok/,/^$/p' "$OUT_DIR/bench_decode-cuda.log" | cut -c1-160 | sed 's/^/   /' \
    | tee -a "$SUMMARY"

# 4. hybrid: misses the cost model sends to the CPU are computed from the RAM tier's host copies
step "bench_decode --device cuda --hybrid auto" 90 "$OUT_DIR/bench_decode-cuda-hybrid.log" "${BENCH[@]}" \
    --repeats 1 --configs offload-ram-50,offload-ram-25 --hybrid auto \
    --out "$OUT_DIR/bench_decode-cuda-hybrid.json"

note "results in $OUT_DIR after $SECONDS s; GPU tests exit $tests_rc"
exit $((tests_rc == 0 ? 0 : 1))
