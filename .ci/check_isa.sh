#!/usr/bin/env bash
# The CPU loops are compiled for AVX-512, AVX2 and baseline x86-64 (GCC target_clones) and only the best
# clone runs on a given machine: on this AVX-512 CI machine the other two would never run. This builds
# the extension once per other ISA (ROBUST_EXT_CPU_ISA=avx2, =baseline: every loop for that ISA alone, no
# hand-written AVX-512 code) in a scratch copy of the tree and runs the kernel tests against it: every op
# against the reference (bit-exact, or the L2 ops' stated bound), Philox known answers, both fused
# layers. Run from the venv the README sets up (torch installed). Skips an ISA the CPU cannot run
# (exit 0, says so).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

tests=(tests/test_ops.py tests/test_l2_ops.py tests/test_apgd_update_op.py tests/test_ops_properties.py tests/test_random_init.py
       tests/test_op_errors.py tests/test_pooling.py tests/test_batchnorm.py)
work=$(mktemp -d "${TMPDIR:-/tmp}/check_isa.XXXXXX")
trap 'rm -rf "$work"' EXIT

for isa in ${ISAS:-avx2 baseline}; do
  if [[ $isa == avx2 ]] && ! grep -qw avx2 /proc/cpuinfo; then
    echo "check_isa: $isa: this CPU has no AVX2, skipped"
    continue
  fi
  t=$(date +%s)
  tree="$work/$isa"
  mkdir -p "$tree"
  # The tracked files plus untracked, not ignored ones: the tree as it stands, without build outputs
  # (and without tracked files deleted in the working tree).
  git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do [[ -e $f ]] && printf '%s\0' "$f"; done \
    | xargs -0 cp --parents -t "$tree"
  (cd "$tree" && ROBUST_EXT_CPU_ISA=$isa python setup.py -q build_ext --inplace >build.log 2>&1) \
    || { tail -30 "$tree/build.log"; echo "check_isa: $isa: build FAILED" >&2; exit 1; }
  # From the scratch tree, `python -m` puts it first on sys.path: its robust_ext, not the installed one.
  info=$(cd "$tree" && python -c "import robust_ext; print(robust_ext.__file__); print(robust_ext.build_info())")
  if [[ $info != "$tree/robust_ext/"* || $info != *"only, forced by ROBUST_EXT_CPU_ISA"* ]]; then
    echo "check_isa: $isa: the scratch build is not the one imported, or not a single-ISA build" \
         "(ROBUST_EXT_CPU_ISA needs GCC on x86-64): $info" >&2
    exit 1
  fi
  # -m "": the slow ones too (the > 2**31-element tests), which pyproject.toml's addopts leaves out.
  (cd "$tree" && python -m pytest -q -p no:cacheprovider -m "" "${tests[@]}")
  echo "check_isa: $isa: kernel tests passed ($(( $(date +%s) - t )) s)"
done
