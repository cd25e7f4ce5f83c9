#!/usr/bin/env bash
# Download, here where the package registry is reachable, the wheels bench/gpu_check.sh installs offline on
# a GPU machine whose image lacks them: diffusers and bitsandbytes (no dependencies: the image has torch,
# transformers, huggingface-hub, numpy, safetensors and Pillow). xformers is left out: no wheel matches the
# image's torch 2.11 / CUDA 13 (the SDPA path needs none).
#
#   bash bench/fetch_wheels.sh [DIR]      # default DIR: wheels/ (git-ignored); about 50 MB
#
# Then carry the folder with the working tree (the device tool's `carry: ["wheels"]`) and run
#   bash bench/gpu_check.sh OUTDIR        # its setup stage installs what is missing from wheels/
#
# Environment: WHEEL_PYTHON (default 3.12, the GPU image's python), DIFFUSERS_VERSION (0.42.1),
# BITSANDBYTES_VERSION (0.50.2), ACCELERATE_VERSION (1.15.0), PSUTIL_VERSION (7.1.3), PYYAML_VERSION (6.0.3).
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-wheels}"
mkdir -p "$dir"
py="${PYTHON:-$(command -v python3)}"
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
fetch() {
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "${WHEEL_PYTHON:-3.12}" \
    --implementation cp "${platforms[@]}" -d "$dir" "$1"
}
fetch "diffusers==${DIFFUSERS_VERSION:-0.42.1}"
fetch "bitsandbytes==${BITSANDBYTES_VERSION:-0.50.2}"
# For the opt-in peer stage (diffusers' own textual_inversion.py needs accelerate; accelerate needs psutil
# and PyYAML, which the image may lack: the setup stage installs only what is missing).
fetch "accelerate==${ACCELERATE_VERSION:-1.15.0}"
fetch "psutil==${PSUTIL_VERSION:-7.1.3}"
fetch "pyyaml==${PYYAML_VERSION:-6.0.3}"
echo "wheels in $dir:"
ls -l "$dir"/*.whl
du -sh "$dir"
