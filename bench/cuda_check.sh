#!/usr/bin/env bash
# Training on a CUDA GPU, checked and timed in one run: for a machine with an NVIDIA GPU
# (CI has none, so the CUDA tests skip there).
#
#   bash bench/cuda_check.sh [WHEEL_DIR]
#
# 1. the CUDA tests (tests/client/test_cuda_training.py: the device's update equals the
#    CPU's without DP, accounts the same with DP, the closed form equals Opacus's hooks
#    there, a round leaves no GPU memory behind) and the closed form's own tests;
# 2. bench.dp_step on the GPU (the DP step against the plain one, item 5 of issue 16),
#    and bench.train_round (one hospital's round per task, on the CPU and the GPU);
# 3. the simulation on Ray with its workers on the GPU (tests/sim/test_gpu.py), when Ray
#    is installed;
# 4. whole federations on loopback whose hospitals train on the GPU
#    (python -m fl_demo --device cuda): the tabular model with its local-only models,
#    and the pneumonia CNN; each must finish and report its accuracy.
# WHEEL_DIR: wheels of the packages that machine's Python lacks (pip install --target).
# Logs go to $OUT when set (the device tool's folder), else /tmp/cuda_check.
set -u
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/cuda_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${1:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/fl-site "$1"/*.whl || exit 2
    export PYTHONPATH="$PYTHONPATH:/tmp/fl-site"
fi
failed=()
step() {  # step NAME TIMEOUT_S COMMAND...: run, log to $out/NAME.log, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    local started=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$out/$name.log"
    echo "== $name: rc $rc in $((SECONDS - started)) s"
    [ "$rc" = 0 ] || failed+=("$name")
}
python3 - <<'EOF' 2>&1 | tee "$out/env.log"
import grpc, opacus, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, grpc {grpc.__version__}, "
      f"opacus {opacus.__version__}")
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA")
EOF
step tests 240 python3 -m pytest -q -p no:cacheprovider -o addopts= -rs \
    tests/client/test_cuda_training.py tests/client/test_linear_dp.py
step dp_step_cuda 150 python3 -m bench.dp_step --device cuda --reps 20
step train_round 240 python3 -m bench.train_round --runs 3
if python3 -c "import ray" 2>/dev/null; then
    # the simulation's workers sharing the GPU (--gpus_per_hospital), against the CPU
    step sim_gpu 600 python3 -m pytest -q -p no:cacheprovider -o addopts= -rs \
        tests/sim/test_gpu.py
else
    echo "== sim_gpu: skipped, Ray is not installed (its wheel belongs in WHEEL_DIR)"
fi
demo=$(mktemp -d)
step demo_breast_cancer 150 python3 -m fl_demo --device cuda --model_type breast_cancer \
    --out "$demo/bc" --timeout_s 140
step demo_pneumonia 240 python3 -m fl_demo --device cuda --model_type pneumonia \
    --no_baseline --out "$demo/pn" --timeout_s 230
grep -h "msg=connected" "$demo"/*/logs/hospital_1.log 2>/dev/null | head -2
for d in "$demo"/*/; do
    [ -f "$d/report.json" ] && cp "$d/report.json" "$out/report_$(basename "$d").json"
done
rm -rf "$demo"
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all CUDA checks passed"
