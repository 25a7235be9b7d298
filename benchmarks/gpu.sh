#!/usr/bin/env bash
# The bench and the parity suite on one GPU, on an image that already has jax (with CUDA), flax and torch.
#
#   bash benchmarks/gpu.sh [OUT_DIR]        # default OUT_DIR: benchmarks/gpu-out
#
# 1. Checks that jax, flax, optax, numpy and torch import; nothing is downloaded (pip runs with --no-index).
# 2. Installs this checkout without dependencies (pip install --no-deps --no-build-isolation --no-index -e .),
#    unless it is importable already; where pip cannot, it runs from the checkout (PYTHONPATH).
# 3. Without a GPU visible to JAX (a CPU machine, CI): checks that `bench --device gpu` refuses with exit 2 before
#    any work, says what it skipped, and exits 0.
# 4. With one: `bench --quick --device gpu` in float32 (matmul precision pinned to full float32 on both sides)
#    and in bfloat16, JSON in OUT_DIR; then the parity suite (parity_tests/) with JAX on the GPU (torch stays on
#    the CPU: the references), test files whose imports are missing on the image left out by name.
# Each step has its own time limit; together they stay under 8 minutes (the budget of one H200 session).
# Exit status: 0 when every step that ran passed, else 1.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/gpu-out}
PY=${PYTHON:-python}
mkdir -p "$OUT"
status=0
step() { echo "== gpu.sh: $*"; }

step "requirements (nothing is downloaded)"
"$PY" - <<'EOF' || exit 1
import importlib.util, sys
missing = [m for m in ("jax", "flax", "optax", "numpy", "torch") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu.sh: missing {missing}; this script installs no dependencies")
EOF

if "$PY" -c "import os, flax_impl; assert os.path.realpath(flax_impl.__file__).startswith(os.path.realpath('flax_impl'))" \
    2>/dev/null; then
  step "flax_impl already importable from this checkout: no install"
elif "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . ; then
  step "installed this checkout (--no-deps --no-index)"
else
  step "pip could not install offline: running from the checkout (PYTHONPATH)"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

if ! "$PY" -c "import jax; jax.devices('gpu')" >/dev/null 2>&1; then
  step "no GPU visible to JAX: the GPU bench and the GPU parity run are skipped"
  "$PY" -m flax_impl bench --quick --device gpu >"$OUT/no-gpu.log" 2>&1
  rc=$?
  if [ "$rc" -eq 2 ] && grep -q -- "--device gpu" "$OUT/no-gpu.log"; then
    step "bench --device gpu refused before any work (exit 2): $(tail -n 1 "$OUT/no-gpu.log")"
    exit 0
  fi
  step "bench --device gpu should exit 2 with a clear error here; it exited $rc:"
  cat "$OUT/no-gpu.log"
  exit 1
fi

export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and torch share the GPU
"$PY" -c "import jax; d = jax.devices('gpu')[0]; print('== gpu.sh: JAX on', d.device_kind)"

run() {  # run LIMIT_S NAME CMD...: one step under a time limit
  local limit=$1 name=$2
  shift 2
  step "$name (limit ${limit} s)"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  step "$name: exit $rc in $((SECONDS - start)) s"
  [ "$rc" -eq 0 ] || status=1
}

run 150 bench-fp32 "$PY" -m flax_impl bench --quick --device gpu --matmul-precision float32 \
  --json "$OUT/gpu-quick-fp32.json"
run 120 bench-bf16 "$PY" -m flax_impl bench --quick --device gpu --precision bf16 --compile-layers 1 \
  --json "$OUT/gpu-quick-bf16.json"

ignores=$("$PY" - <<'EOF'
import ast, glob, importlib.util
for path in sorted(glob.glob("parity_tests/test_*.py")):
    tree = ast.parse(open(path).read())
    names = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom) and n.module and not n.level}
    missing = sorted(m for m in names if m != "helpers" and importlib.util.find_spec(m) is None)
    if missing:
        print(f"--ignore={path}")
        print(f"gpu.sh: {path} left out: {missing} not installed", file=__import__("sys").stderr)
EOF
)
if "$PY" -c "import pytest" 2>/dev/null; then
  xdist=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 4 --dist loadfile" || echo "-n 0")
  # shellcheck disable=SC2086
  run 200 parity "$PY" -m pytest -q -p no:cacheprovider -o addopts="" $xdist $ignores parity_tests
else
  step "pytest is not installed: the parity suite is skipped"
  status=1
fi
step "done: exit $status; logs and JSON in $OUT"
exit $status
