#!/usr/bin/env bash
# The Triton kernels' checks on a GPU machine, in one short run (the device tool lends one for
# minutes, to some sessions only; it has CUDA PyTorch, Triton, pytest and transformers, but not
# the packages the engine imports beside them, and no network).
#
#   tools/gpu_check.sh wheels   here: those packages as cp312 wheels in .whl/ (kept out of git),
#                               at the versions of .venv
#   tools/gpu_check.sh run      there (carry .whl): install them, run tests/kernels/test_triton.py
#                               compiled, then bench/attention.py: grouped vs ungrouped
#                               shared-prefix decodes (32- and 9-head shapes) and every case;
#                               logs and records under $OUT (default gpu-out/)
#
# About 3 minutes on an H200. The engine-level tests skip on CUDA, and the greedy-equality one
# needs the bundled model package, which is too large to carry: expect it to fail there.
set -u
cd "$(dirname "$0")/.."

case "${1:-}" in
wheels)
    py=${PYTHON:-.venv/bin/python}
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
    mkdir -p .whl
    for pkg in pydantic pydantic_core pydantic-settings python-dotenv annotated-types \
        typing-inspection xgrammar apache-tvm-ffi; do
        version=$("$py" -m pip show "$pkg" 2>/dev/null | sed -n 's/^Version: //p')
        [ -n "$version" ] || { echo "$pkg is not installed in $py's environment" >&2; exit 1; }
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux_2_28_x86_64 \
            --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .whl "$pkg==$version" || exit 1
    done
    du -sh .whl
    ;;
run)
    out=${OUT:-gpu-out}
    mkdir -p "$out"
    export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1 PYTHONPATH=$PWD
    if compgen -G '.whl/*.whl' >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || exit 1
        export PYTHONPATH=/tmp/site:$PWD
    fi
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
    timeout 240 python3 -m pytest tests/kernels/test_triton.py -q -p no:cacheprovider \
        -o filterwarnings= -o timeout=0 -rs >"$out/tests.log" 2>&1
    echo "tests: exit $?"
    tail -4 "$out/tests.log"
    # bring the card out of idle before anything is timed
    python3 -c 'import torch
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
for _ in range(300): a @ a
torch.cuda.synchronize()'
    for args in "--triton-shared" "--triton-shared --heads 9 --kv-heads 3 --head-dim 64" ""; do
        # shellcheck disable=SC2086
        timeout 120 python3 bench/attention.py $args --record-dir "$out" 2>&1 | tee -a "$out/bench.log"
    done
    ;;
*)
    sed -n '2,15p' "$0"
    exit 2
    ;;
esac
