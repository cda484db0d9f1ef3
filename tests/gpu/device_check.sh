#!/usr/bin/env bash
# The CUDA checks in one go, for a GPU machine that gets this checkout alone (no network there):
# tests/gpu (the bundles on CUDA, CPU agreement, runner cache, out-of-memory and CPU fallback),
# then bench/bench_inference.py on CUDA. Run from the repository root; finishes in under 7 minutes
# (each step has its own time limit: 45 s + 45 s + 200 s + 120 s at most). Exits non-zero when the
# tests or the benchmark failed; the benchmark runs even when a test failed.
#
# Prepare here, once (both folders are ignored through .git/info/exclude, never committed):
#   printf '/.whl/\n/shared/\n' >> .git/info/exclude
#   cp -r ../shared shared        # the test data (data/, model-zoo/), about 5 MB; tests use
#                                 # ./shared where it exists (tests/helpers/paths.py)
#   .whl/: the Python packages the tests and the benchmark need that the GPU machine lacks, as
#   cp312 manylinux wheels, one version each (pip download --no-deps --only-binary=:all:
#   --python-version 3.12 --implementation cp --platform manylinux... -d .whl NAME==VERSION):
#   monai, nibabel, pydicom, pylibjpeg, pylibjpeg-openjpeg, pylibjpeg-libjpeg, pyjpegls, pydantic,
#   pydantic_core, annotated-types, typing-inspection, typing_extensions (torch, numpy, packaging,
#   pytest and pytest-timeout are the machine's own).
# Then, with the device tool:
#   run  command: bash tests/gpu/device_check.sh   carry: [".whl", "shared"]   timeout_s: 540
# What comes back under $OUT: env.txt, gpu-tests.log, gpu-tests.xml, bench-inference-cuda.txt.
set -u
set -o pipefail

OUT="${OUT:-$(mktemp -d)}"
SITE="${SITE:-/tmp/site}"
export PYTHONUNBUFFERED=1
status=0

say() { printf '\n=== %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }

for need in .whl shared/data shared/model-zoo; do
    if [ ! -d "$need" ]; then
        echo "device_check: $need is missing here; see the top of $0" >&2
        exit 2
    fi
done

say "install .whl into $SITE"
if ! timeout -k 10 45 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$SITE" .whl/*.whl; then
    echo "device_check: installing the wheels failed" >&2
    exit 3
fi
export PYTHONPATH="$SITE:$PWD"

say "machine"
{
    nvidia-smi -L
    nvidia-smi --query-gpu=driver_version --format=csv,noheader
    python3 --version
    timeout -k 5 45 python3 - <<'EOF'
import importlib.metadata as md
import sys

import torch

cuda = torch.cuda.is_available()
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", cuda)
if cuda:
    print("device", torch.cuda.get_device_name(0))
for name in ("numpy", "monai", "pydicom", "nibabel", "pydantic", "pytest", "pytest-timeout"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "MISSING")
sys.exit(0 if cuda else 1)
EOF
} 2>&1 | tee "$OUT/env.txt"
if [ $? -ne 0 ]; then
    # tests/gpu skips itself without CUDA, which would read as a pass.
    echo "device_check: torch sees no CUDA device (or the check failed)" >&2
    exit 4
fi

say "tests/gpu"
timeout -k 10 200 python3 -m pytest tests/gpu -v -ra -p no:cacheprovider -o addopts='' \
    --timeout 150 --junitxml "$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.log"
tests_rc=$?
[ "$tests_rc" -eq 0 ] || status=1
echo "tests/gpu exit status: $tests_rc" | tee -a "$OUT/gpu-tests.log"

say "bench/bench_inference.py --devices cuda"
timeout -k 10 120 python3 bench/bench_inference.py --devices cuda 2>&1 \
    | tee "$OUT/bench-inference-cuda.txt"
bench_rc=$?
[ "$bench_rc" -eq 0 ] || status=1
echo "bench exit status: $bench_rc" | tee -a "$OUT/bench-inference-cuda.txt"

say "done: tests $tests_rc, bench $bench_rc (124: ran past its time limit)"
exit "$status"
