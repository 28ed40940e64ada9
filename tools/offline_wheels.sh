#!/usr/bin/env bash
# Wheels for a GPU machine that has a CUDA build of torch but no internet (a cluster image, a
# sealed benchmark box): DeepSpeed, built here into a pure-Python wheel (its CUDA ops are JIT-built
# on use, and this project uses none of them), plus the DeepSpeed requirements such images
# usually lack (pydantic and its parts, hjson). Everything else the GPU report needs (torch,
# numpy, tiktoken, tqdm, psutil, einops, msgpack, ninja, py-cpuinfo, nvidia-ml-py) is expected
# there; tools/gpu_report.sh checks the imports first and names what is missing.
#
#   bash tools/offline_wheels.sh [DIR] [PYTHON_VERSION]     # defaults: .whl 3.12
#   # copy DIR along with the repository, then on the GPU machine:
#   WHEELS=DIR bash tools/gpu_report.sh                      # installs DIR/*.whl privately first
#
# Environment: PYTHON (default ./.venv/bin/python), the interpreter whose pip downloads and
# builds (it needs torch installed to build DeepSpeed's wheel).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$ROOT/.whl}"
PYVER="${2:-3.12}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
mkdir -p "$DIR"
pins() {  # name==version of each package, as installed next to the pinned DeepSpeed here
  "$PYTHON" - "$@" <<'PY'
import sys
from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in sys.argv[1:]))
PY
}
read -r -a PKGS <<< "$(pins pydantic pydantic_core annotated_types typing_inspection hjson)"
DS="deepspeed==$(pins deepspeed | cut -d= -f3)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "downloading ${PKGS[*]} for CPython $PYVER (manylinux x86_64)"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$DIR" "${PKGS[@]}"
echo "building a wheel of $DS (DS_BUILD_OPS=0: no compiled ops)"
"$PYTHON" -m pip download -q --no-deps --no-binary=:all: -d "$tmp" "$DS"
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$DIR" "$tmp"/deepspeed-*.tar.gz
ls -1 "$DIR"
du -sh "$DIR"
