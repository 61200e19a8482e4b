#!/usr/bin/env bash
# Run HERE (no GPU needed), in the repository root that the device tool sends: downloads the onnxruntime-gpu wheel
# that the GPU machine lacks (1.31.1, cp312, CUDA 13) into the git-ignored .whl/ and splits it into chunks that fit
# the device tool's 64 MiB carry limit, with a manifest (wheel name, sha256, chunk count) that gpu_check.sh checks.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${ORTGPU_VERSION:-1.31.1}
CHUNK=${ORTGPU_CHUNK:-56m}
git check-ignore -q .whl/x || { echo "gpu_prep: .whl/ is not git-ignored here; add /.whl/ to .gitignore" >&2; exit 1; }
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "onnxruntime-gpu==$VERSION"
wheel=$(ls .whl/onnxruntime_gpu-"$VERSION"-cp312-*.whl | head -n 1)
rm -f .whl/ortgpu.part*
split -b "$CHUNK" -d -a 2 "$wheel" .whl/ortgpu.part
parts=$(ls .whl/ortgpu.part* | wc -l)
echo "$(basename "$wheel") $(sha256sum "$wheel" | cut -d' ' -f1) $parts" > .whl/ortgpu.manifest
ls -l .whl/ortgpu.*
echo "gpu_prep: $parts chunks; carry them one per call (see benchmarks/gpu_check.sh), the manifest with the last"
