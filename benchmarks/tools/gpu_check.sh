#!/usr/bin/env bash
# The GPU check (issue 10): the CUDA cases of the test suite, then RefLoRA's hook against a
# LLaMA-7B-shape training step (benchmarks/gpu_overhead.py). About 6-8 minutes on one H200.
# Usage: bash benchmarks/tools/gpu_check.sh [extra gpu_overhead.py arguments]
# Needs reflora importable (pip install -e ., or PYTHONPATH plus the reflora/adapters layout).
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: the GPU check needs one')" || exit 2
"$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
echo "== CUDA cases of the test suite"
timeout 300 "$PY" -m pytest -q -p no:cacheprovider -k cuda tests/ -W ignore::DeprecationWarning
tests=$?
echo "== hook vs LLaMA-7B-shape training step"
timeout 360 "$PY" benchmarks/gpu_overhead.py --device cuda "$@"
bench=$?
exit $(( tests != 0 ? tests : bench ))
