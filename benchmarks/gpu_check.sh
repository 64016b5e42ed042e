#!/usr/bin/env bash
# One prepared GPU check, self-contained for a bare GPU machine with torch, lightning and torchmetrics (8 minutes on an H100/H200):
#
#   bash benchmarks/gpu_check.sh [--smoke] [--out DIR] [--wheels DIR]
#
# 1. the packages the machine lacks (hydra-core, omegaconf, antlr4) from the wheel folder (default wheels/, see
#    docs/performance.md for the pip command that fills it), into a temporary folder on PYTHONPATH, and the project
#    itself from this tree (src/ on PYTHONPATH): nothing is fetched;
# 2. pytest -m gpu (tests/test_gpu.py), its log in DIR/pytest_gpu.log;
# 3. benchmarks/gpu_check.py: passes/s of the ImageNet-64 UNet (fp32, bf16, bf16 compiled), a cost matrix of 256
#    synthetic 64x64 examples at T = 4,000 with and without refinement, and the GPU-hours of docs/scaling.md's
#    settings, written to DIR/gpu_check.json.
# --smoke runs the same steps at tiny sizes on the CPU (under 2 minutes); tests/test_gpu_check.py runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
smoke=false
out=outputs/gpu_check
wheels=wheels
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) smoke=true ;;
    --out) out=$2; shift ;;
    --wheels) wheels=$2; shift ;;
    *) echo "gpu_check.sh: unknown argument '$1'; use --smoke, --out DIR or --wheels DIR" >&2; exit 2 ;;
  esac
  shift
done
py=${PYTHON:-python3}
if ! $smoke && ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check.sh: no CUDA device is visible to $py (torch.cuda.is_available() is False); run it on a GPU machine, or pass --smoke for the CPU check" >&2
  exit 2
fi
start=$(date +%s)
mkdir -p "$out"
if compgen -G "$wheels/*.whl" >/dev/null; then
  site=$(mktemp -d)
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE=offline PYTHONUNBUFFERED=1
echo "== pytest -m gpu"
set +e  # the figures are measured even when a test fails; the exit status says whether every step passed
"$py" -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/pytest_gpu.log"
tests=${PIPESTATUS[0]}
echo "== gpu_check.py"
"$py" benchmarks/gpu_check.py $($smoke && echo --smoke) --out "$out/gpu_check.json"
bench=$?
set -e
echo "gpu_check.sh: done in $(( $(date +%s) - start )) s; pytest -m gpu exit $tests, gpu_check.py exit $bench; figures in $out/gpu_check.json"
[ "$tests" -eq 0 ] || [ "$tests" -eq 5 ] || exit "$tests"  # 5: every test skipped (no CUDA with --smoke)
exit "$bench"
