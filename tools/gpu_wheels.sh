#!/usr/bin/env bash
# Download into .whl/ the wheels that the lent GPU machine lacks (it has no package registry; its Python 3.12 holds
# torch 2.11, transformers 5.17, huggingface_hub 1.33 ...: docs and versions in tools/gpu_machine_requirements.txt).
# There, from the repository root:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD
# `--no-deps` there: this list must name every missing dependency too, one version each (two stop the install).
# Each version below is requirements.txt's; each one's Requires-Dist was checked against the GPU machine's versions
# (diffusers 0.42.1: huggingface-hub>=1.32,<3 and safetensors>=0.8; datasets 5.2.0: huggingface-hub>=1.31,<3).
# NUDENET=0 leaves out nudenet (10.6 MB, mostly its ONNX model; only common/nudity.py needs it, not gpu_check).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
  diffusers==0.42.1          # needs importlib_metadata, which the GPU machine lacks
  importlib_metadata==10.2.0 # needs zipp (there) and lazy-importer (not there)
  lazy-importer==0.1.0
  datasets==5.2.0            # needs dill and multiprocess (not there); pyarrow, pandas, xxhash, fsspec are there
  dill==0.4.1
  multiprocess==0.70.19
  open_clip_torch==3.3.0     # needs ftfy (not there); torch, torchvision, timm are there
  ftfy==6.3.1
  wcwidth==0.9.4             # ftfy's; a compiled abi3 wheel
)
[ "${NUDENET:-1}" = 0 ] || WHEELS+=(nudenet==3.4.2)  # needs onnxruntime and opencv-python-headless (both there)

# Up to date when the stamp names the same list: a changed list starts .whl/ afresh, so no old version lingers.
want=$(printf '%s\n' "${WHEELS[@]}" | sha256sum | cut -d' ' -f1)
if [ "$(cat .whl/.stamp 2>/dev/null)" = "$want" ]; then
  echo ".whl/ is up to date: $(du -ch .whl/*.whl | tail -1 | cut -f1) in $(ls .whl/*.whl | wc -l) wheels"
  exit 0
fi
rm -rf .whl
# The GPU machine's interpreter: CPython 3.12 on x86-64 Linux (glibc 2.28 or newer accepted).
python3 -m pip download --quiet --no-deps --no-cache-dir --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${WHEELS[@]}" \
  || { echo "gpu_wheels: pip download failed (is PyPI reachable?)" >&2; rm -rf .whl; exit 1; }
echo "$want" > .whl/.stamp
echo "downloaded into .whl/: $(du -ch .whl/*.whl | tail -1 | cut -f1) in $(ls .whl/*.whl | wc -l) wheels"
