#!/usr/bin/env bash
# Compile-check the CUDA sources of imp_fast._C (csrc/cuda/*.cu) against a CUDA build of
# torch, without a GPU and without touching the main checkout's build.
#
# 1. a second venv (default /tmp/imp_fast_cuda_venv) with a CUDA build of torch;
# 2. a copy of the tracked + untracked-not-ignored source tree in a temp dir;
# 3. `python setup.py build_ext --inplace` there with CUDA_HOME and TORCH_CUDA_ARCH_LIST.
# Exits non-zero if anything fails, or if the built module lacks the CUDA objects.
#
# Env: VENV (venv path), TORCH_SPEC (pip requirement, default torch==2.14.1),
#      CUDA_HOME (default /usr/local/cuda), TORCH_CUDA_ARCH_LIST (default 9.0),
#      KEEP_BUILD=1 keeps the temp build dir.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-/tmp/imp_fast_cuda_venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
export PATH="$CUDA_HOME/bin:$PATH"

if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
    echo "cuda_compile: no nvcc at $CUDA_HOME/bin/nvcc" >&2
    exit 2
fi
if ! ls "$REPO"/csrc/cuda/*.cu >/dev/null 2>&1; then
    echo "cuda_compile: no CUDA sources in $REPO/csrc/cuda" >&2
    exit 2
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating venv $VENV"
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
    echo "== installing $TORCH_SPEC (CUDA build) into $VENV"
    "$PY" -m pip install --quiet "$TORCH_SPEC" setuptools wheel numpy
fi
"$PY" -m pip install --quiet setuptools wheel >/dev/null 2>&1 || true
"$PY" -c "import torch; print('== torch', torch.__version__, 'cuda', torch.version.cuda)"
"$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" || {
    echo "cuda_compile: torch in $VENV has no CUDA" >&2; exit 2; }

WORK="$(mktemp -d /tmp/imp_fast_cuda_build.XXXXXX)"
if [ "${KEEP_BUILD:-0}" != "1" ]; then
    trap 'rm -rf "$WORK"' EXIT
fi
echo "== copying sources to $WORK"
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
        | xargs -0 -I{} sh -c 'test -e "{}" && printf "%s\0" "{}"' \
        | tar --null -T - -cf -) | tar -xf - -C "$WORK"
else
    cp -r "$REPO"/. "$WORK"/
    rm -rf "$WORK"/build "$WORK"/imp_fast/_C*.so
fi

echo "== building (CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
start=$(date +%s)
(cd "$WORK" && "$PY" setup.py build_ext --inplace)
echo "== build took $(( $(date +%s) - start )) s"

SO="$(ls "$WORK"/imp_fast/_C*.so 2>/dev/null | head -n1 || true)"
if [ -z "$SO" ]; then
    echo "cuda_compile: no imp_fast/_C*.so produced" >&2
    exit 1
fi
# The CUDA kernels must be in the module (not a CPU-only fallback build).
if ! ls "$WORK"/build/temp*/csrc/cuda/*.o >/dev/null 2>&1; then
    echo "cuda_compile: csrc/cuda was not compiled (CPU-only build?)" >&2
    exit 1
fi
echo "== OK: built $(basename "$SO") with CUDA objects:"
ls "$WORK"/build/temp*/csrc/cuda/
