#!/usr/bin/env bash
# The GPU suite in one command: benchmarks/gpu_suite.py, after installing what the GPU
# machine lacks, with no network.
#
# The GPU machines' image has torch, triton and transformers but no diffusers: a diffusers
# wheel travels with the working tree and is installed from the first folder of
# $FEWSTEP_WHEELS, shared/wheels/ and .whl/ that holds one (fetch it where there is a
# network: `pip download --no-deps diffusers==0.42.1 -d .whl`). Then fewstep itself,
# editable and without dependencies. Both steps are skipped when the imports already work.
# The JSON and the log go to $OUT (else benchmarks/results/); FEWSTEP_COMMIT names the commit
# sent (a copy's .git may be older than its tree). Arguments go to gpu_suite.py (--small: CPU, tiny
# models; --sections unet,turbo; --compile-mode none; --sdxl-compile; ...).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
start=$SECONDS

if ! "$py" -c "import diffusers" 2>/dev/null; then
  wheel=""
  for dir in "${FEWSTEP_WHEELS:-}" shared/wheels .whl; do
    [ -n "$dir" ] && [ -d "$dir" ] || continue
    wheel=$(find "$dir" -maxdepth 1 -name 'diffusers-*.whl' | sort | tail -n 1)
    [ -n "$wheel" ] && break
  done
  if [ -z "$wheel" ]; then
    echo "gpu_suite.sh: diffusers is missing and no diffusers-*.whl is in" \
      "\$FEWSTEP_WHEELS, shared/wheels/ or .whl/" >&2
    exit 2
  fi
  "$py" -m pip install -q --no-index --no-deps --no-cache-dir "$wheel"
fi
if ! "$py" -c "import fewstep.kernels, fewstep.backends.torch_backend, fewstep.benchmarks.harness, \
  fewstep.benchmarks.gpu_report" 2>/dev/null; then
  if ! "$py" -m pip install -q --no-deps --no-build-isolation --no-cache-dir -e .; then
    # An old setuptools there cannot build this pyproject (PEP 639 license field): lay the
    # packages out as installed (runtime/ is fewstep; kernels/, export/ and benchmarks/,
    # without its results, inside it).
    echo "gpu_suite.sh: editable install failed; running from a source tree on PYTHONPATH"
    src="$(mktemp -d)"
    cp -r runtime "$src/fewstep"
    cp -r kernels "$src/fewstep/kernels"
    cp -r export "$src/fewstep/export"
    mkdir "$src/fewstep/benchmarks"
    cp benchmarks/*.py "$src/fewstep/benchmarks/"
    export PYTHONPATH="$src${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
echo "gpu_suite.sh: setup took $((SECONDS - start)) s"

export PYTHONUNBUFFERED=1
# The test suite's GPU tests first (CUDA graphs, fp16, kernels against eager on tiny models);
# their result is logged, and the suite runs either way. tests/test_gpu_checks.py is left to
# the suite's checks section, which runs the same checks and records them in the JSON.
if "$py" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  TRITON_INTERPRET=0 "$py" -m pytest -q -m gpu -p no:cacheprovider \
    --ignore=tests/test_gpu_checks.py tests 2>&1 \
    | tee "$out/gpu_tests.log" || echo "gpu_suite.sh: GPU tests failed (see gpu_tests.log)"
fi
"$py" benchmarks/gpu_suite.py --output "$out/gpu_suite.json" "$@" 2>&1 | tee "$out/gpu_suite.log"
