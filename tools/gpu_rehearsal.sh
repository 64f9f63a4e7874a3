#!/usr/bin/env bash
# Rehearse here, on the CPU, what the lent GPU machine will run: its package versions (tools/gpu_machine_requirements.txt)
# in a Python 3.12 virtual environment, plus the wheels it lacks (.whl/, tools/gpu_wheels.sh) installed as it installs
# them (--no-index --no-deps --target a site dir, then PYTHONPATH=site:repo root; no editable install there).
#   tools/gpu_rehearsal.sh               # python -m tools.gpu_check --rehearse --json $DIR/gpu_check.json
#   tools/gpu_rehearsal.sh CMD [ARG...]  # any other command in that environment, e.g. python -m pytest -q tests/...
# GPU_REHEARSAL_DIR (default /tmp/gpu-rehearsal) holds the environment; it is rebuilt when the pin list changes and
# removed after the run unless GPU_REHEARSAL_KEEP=1.
# GPU_REHEARSAL_PTH=1 also puts the site dir in the environment through a .pth file: for the test suite, whose launched
# scripts get PYTHONPATH=<repo root> alone (tests/conftest.launch_env) and would not see the site dir otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DIR=${GPU_REHEARSAL_DIR:-/tmp/gpu-rehearsal}
VENV=$DIR/venv SITE=$DIR/site PINS=tools/gpu_machine_requirements.txt
# Pulled in by pip as dependencies, yet absent on the GPU machine (KINDS.md's package list): removed to match it.
ABSENT="pydantic pydantic-core annotated-types typing-inspection tzdata"

# The GPU machine runs Python 3.12 (3.12.3): pyenv's 3.12, else a python3.12 on PATH that runs.
PY=
for cand in "$(pyenv root 2>/dev/null || echo /nonexistent)"/versions/3.12*/bin/python3.12 python3.12; do
  if "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then PY=$cand; break; fi
done
[ -n "$PY" ] || { echo "gpu_rehearsal: no Python 3.12 found (pyenv install 3.12, or put python3.12 on PATH)" >&2; exit 1; }

# The environment, as the Makefile's venv target: rebuilt when the stamp (sha256 of the pins) differs. No pip cache:
# torch from PyPI is the CUDA build (several GB; PyTorch's own CPU index is not reachable from here).
want=$({ cat "$PINS"; echo "$ABSENT $PY"; } | sha256sum | cut -d' ' -f1)
if [ "$(cat "$VENV/.pins.sha256" 2>/dev/null)" != "$want" ]; then
  echo "gpu_rehearsal: building $VENV from $PINS with $PY"
  rm -rf "$VENV" && mkdir -p "$DIR" && "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --no-cache-dir --upgrade pip
  "$VENV/bin/python" -m pip install --quiet --no-cache-dir -r "$PINS"
  "$VENV/bin/python" -m pip uninstall --quiet --yes $ABSENT
  echo "$want" > "$VENV/.pins.sha256"
fi

# The carried wheels, installed with the GPU machine's own command (into a fresh site dir, so nothing stale stays).
tools/gpu_wheels.sh
rm -rf "$SITE"
"$VENV/bin/python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
pth=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/gpu-rehearsal-site.pth
if [ "${GPU_REHEARSAL_PTH:-0}" = 1 ]; then echo "$SITE" > "$pth"; else rm -f "$pth"; fi

export PATH=$VENV/bin:$PATH PYTHONPATH=$SITE:$ROOT HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
[ $# -gt 0 ] || set -- python -m tools.gpu_check --rehearse --json "$DIR/gpu_check.json"
status=0
"$@" || status=$?
# The environment is 5.5 GB (a second torch with its CUDA libraries): removed after the run unless
# GPU_REHEARSAL_KEEP=1 (several runs in a row; the next build takes a minute or two and downloads it again).
if [ "${GPU_REHEARSAL_KEEP:-0}" != 1 ]; then
  rm -rf "$VENV" "$SITE"
  echo "gpu_rehearsal: removed $VENV and $SITE (GPU_REHEARSAL_KEEP=1 keeps them)"
fi
exit "$status"
