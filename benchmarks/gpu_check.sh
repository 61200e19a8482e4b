#!/usr/bin/env bash
# Run ON THE GPU MACHINE, after benchmarks/gpu_prep.sh here and one device call per chunk, back to back on the same
# warm machine (each call copies its chunk to /tmp/ortgpu; a machine given back in between loses them):
#   call k (k = 00 .. N-2):  carry [".whl/ortgpu.partk"]
#     mkdir -p /tmp/ortgpu && cp .whl/ortgpu.part* /tmp/ortgpu/ && ls -l /tmp/ortgpu
#   last call:               carry [".whl/ortgpu.partN-1", ".whl/ortgpu.manifest"]
#     mkdir -p /tmp/ortgpu && cp .whl/ortgpu.* /tmp/ortgpu/ && set -o pipefail && bash benchmarks/gpu_check.sh 2>&1 | tee $OUT/gpu_check.log
# It joins and checks the wheel, installs it beside the image's torch, and runs benchmarks/gpu_check.py: fp32 and
# fp16 bundles of a random GPT-2-small, greedy parity with PyTorch on CUDA, decode timings against PyTorch's generate.
set -euo pipefail
cd "$(dirname "$0")/.."
PARTS=${ORTGPU_PARTS:-/tmp/ortgpu}
read -r wheel sha count < "$PARTS/ortgpu.manifest"
have=$(ls "$PARTS"/ortgpu.part* 2>/dev/null | wc -l)
if [ "$have" -ne "$count" ]; then
    echo "gpu_check: $have of $count wheel chunks in $PARTS (was the machine given back between calls?)" >&2
    exit 1
fi
cat "$PARTS"/ortgpu.part* > "/tmp/$wheel"
echo "$sha  /tmp/$wheel" | sha256sum -c --quiet
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "/tmp/$wheel"
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/gpt2onnx  # the repository root is the gpt2onnx package
# onnxruntime's CUDA provider loads CUDA 13 and cuDNN 9 from the image's nvidia-* wheels (those torch uses).
nvidia_libs=$(python3 -c 'import glob, os, site; print(":".join(sorted({d for s in site.getsitepackages() for d in glob.glob(os.path.join(s, "nvidia", "*", "lib"))})))')
export LD_LIBRARY_PATH="$nvidia_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONPATH=/tmp/site:/tmp/pkg PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 benchmarks/gpu_check.py "$@"
