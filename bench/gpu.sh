#!/usr/bin/env bash
# One GPU's checks in one go (about 8 minutes on an H200; docs/benchmarks.md holds the results):
# the grouped matmuls side by side, the ~1B-active V4 step with the defaults and a profile of
# its busiest kernels, then the same step with Muon's Newton-Schulz in bfloat16.
#   bash bench/gpu.sh            # on the GPU host, in the repository root
#   TINY=1 bash bench/gpu.sh     # the same sequence at tiny shapes (runs on a CPU)
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
quiet() { grep -v '^[WIE][0-9]\{4\} ' || true; }  # absl's log lines
# the project's own dependencies (a GPU image may hold jax and flax but not these): say which
missing=$("$PY" -c "import importlib.util as u; print(' '.join(m for m in ('jax', 'flax', 'optax', 'orbax.checkpoint', 'grain', 'yaml') if u.find_spec(m.split('.')[0]) is None))")
if [ -n "$missing" ]; then
    echo "bench/gpu.sh: not installed here: $missing (pip install -e . installs them)" >&2
    exit 1
fi
if [ "${TINY:-0}" = 1 ]; then
    shapes="1024,256,256,8"; train=(--tiny --batch 2 --seq 64 --steps 2 --warmup 1)
else
    shapes="8192,2048,1408,32;196608,2048,1408,32;196608,1408,2048,32"; train=(--steps 5 --warmup 2)
fi
echo "== grouped matmuls, bfloat16 (ms per call: forward / forward + gradient)"
timeout 150 "$PY" bench/gmm.py --reps 5 --dtype bfloat16 --impls batched,blocked,ragged --shapes "$shapes" 2>&1 | quiet
echo "== the ~1B-active step, defaults, and its busiest kernels"
timeout 260 "$PY" bench/gpu_train.py "${train[@]}" --profile 2 2>&1 | quiet
echo "== the same step, Muon's Newton-Schulz in bfloat16"
timeout 200 "$PY" bench/gpu_train.py "${train[@]}" --set optim.muon_dtype=bfloat16 2>&1 | quiet
