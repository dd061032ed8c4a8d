#!/usr/bin/env bash
# GPU check, for a machine with a CUDA GPU and a CUDA build of torch (no network needed), in at most
# about 5 minutes: builds the extension with its CUDA kernels (ROBUST_EXT_BUILD=cuda) in a scratch copy
# of the tree, runs every CUDA test case of the kernel tests (they parametrize devices; here the CUDA
# cases run instead of skipping) and `benchmarks/bench_ops.py --device cuda` (L-inf and L2 rows).
#
# Results go to $OUT (else ./gpu_check_out): build.log, tests.xml (JUnit) and tests.log,
# bench_ops_cuda.json and bench.log, and summary.json (each stage's status and seconds). Exit status:
# non-zero if the build or a test failed (a benchmark MISS is reported, never an error).
#
#   PYTHON=python3 GPU_BENCH_COMPILE=1 bash .ci/gpu_check.sh    # also time torch.compile (slower)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)
out=${OUT:-$root/gpu_check_out}
mkdir -p "$out"
out=$(cd "$out" && pwd)
py=${PYTHON:-python}
t_start=$(date +%s)
declare -A status seconds

stage() {  # stage NAME LIMIT_S COMMAND...: runs it under a time limit, records status and seconds
  local name=$1 limit=$2 t0 rc
  shift 2
  t0=$(date +%s)
  timeout "$limit" "$@"
  rc=$?
  seconds[$name]=$(( $(date +%s) - t0 ))
  if [[ $rc -eq 0 ]]; then status[$name]=ok; elif [[ $rc -eq 124 ]]; then status[$name]=timeout; else status[$name]="failed ($rc)"; fi
  echo "gpu_check: $name: ${status[$name]} (${seconds[$name]} s)"
  return $rc
}

summary() {
  {
    echo "{"
    echo "  \"total_s\": $(( $(date +%s) - t_start )),"
    local first=1
    for name in probe build tests bench; do
      [[ -n ${status[$name]:-} ]] || continue
      [[ $first -eq 1 ]] || echo ","
      first=0
      printf '  "%s": {"status": "%s", "seconds": %s}' "$name" "${status[$name]}" "${seconds[$name]}"
    done
    echo
    echo "}"
  } > "$out/summary.json"
  echo "gpu_check: wrote $out"
}
trap summary EXIT

# The GPU, torch's CUDA build and nvcc, and the architecture to compile for (this GPU's only: faster).
arch=$($py - <<'EOF' 2>"$out/probe.log"
import sys, torch
if torch.version.cuda is None or not torch.cuda.is_available():
    sys.exit(f"need a CUDA build of torch and a visible GPU: torch {torch.__version__}, "
             f"cuda {torch.version.cuda}, available {torch.cuda.is_available()}")
major, minor = torch.cuda.get_device_capability()
print(f"{major}.{minor}")
print(f"gpu_check: {torch.cuda.get_device_name()} (sm_{major}{minor}), torch {torch.__version__}", file=sys.stderr)
EOF
)
rc=$?
cat "$out/probe.log"
seconds[probe]=0
if [[ $rc -ne 0 ]]; then status[probe]="failed"; exit 1; fi
status[probe]=ok
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if [[ ! -x $CUDA_HOME/bin/nvcc ]]; then
  echo "gpu_check: no nvcc at $CUDA_HOME/bin/nvcc (set CUDA_HOME)" >&2
  status[build]="failed (no nvcc)"; seconds[build]=0
  exit 1
fi

# A scratch copy of the tree (no .git, virtual environments or earlier builds needed), built in place
# there: the tree's own build, if any, is left alone. The tests and the benchmark import it from there.
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
tar -cf - --exclude=./.git --exclude=./.venv --exclude=./build --exclude='*.so' --exclude=./gpu_check_out . \
  | tar -xf - -C "$work"
cd "$work"
export PYTHONPATH="$work${PYTHONPATH:+:$PYTHONPATH}"

stage build 180 env ROBUST_EXT_BUILD=cuda TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)" \
  "$py" setup.py -q build_ext --inplace >"$out/build.log" 2>&1
if [[ ${status[build]} != ok ]]; then tail -30 "$out/build.log"; exit 1; fi
"$py" -c "import robust_ext; print('gpu_check:', robust_ext.build_info()); print('gpu_check:', robust_ext.backend())" \
  | tee -a "$out/build.log"
if ! "$py" -c "import robust_ext, sys; sys.exit(robust_ext.backend()['cuda'] != 'extension')"; then
  echo "gpu_check: the CUDA kernels do not serve CUDA tensors" >&2
  status[build]="failed (no CUDA kernels)"
  exit 1
fi

# Every CUDA case of the kernel tests (ids carry the device), and the device-mismatch checks.
stage tests 150 "$py" -m pytest -q -p no:cacheprovider -k "cuda or device_mismatch" \
  --junitxml="$out/tests.xml" tests/test_ops.py tests/test_l2_ops.py tests/test_apgd_update_op.py tests/test_op_errors.py \
  tests/test_random_init.py >"$out/tests.log" 2>&1
tests_rc=$?
tail -15 "$out/tests.log"

bench_args=(--device cuda --dtypes fp32,bf16 --rounds 1 --min-run-time 0.1 --out "$out/bench_ops_cuda.json")
[[ ${GPU_BENCH_COMPILE:-0} == 1 ]] || bench_args+=(--no-compile)
stage bench 150 "$py" benchmarks/bench_ops.py "${bench_args[@]}" >"$out/bench.log" 2>&1
grep -A 12 "== summary" "$out/bench.log" || tail -20 "$out/bench.log"

exit $tests_rc
