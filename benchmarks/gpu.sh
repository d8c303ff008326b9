#!/bin/bash
# The GPU benchmark, in one run of under 5 minutes on one GPU: training images/s of each of the six
# backbones of the method, fed by the trainer's loader, by PyTorch's DataLoader and by tensors already
# on the GPU, the ratios and peak memory (batch 32, their default settings). Run from the repository root on a machine with a GPU:
#
#   bash benchmarks/gpu.sh            (installs into .venv first when it is missing)
#   PYTHON=python3 bash benchmarks/gpu.sh   (an interpreter that already has torch with CUDA and the
#                                           project's dependencies; src/ is put on its path)
#
# Its last line is JSON; the README's table of GPU figures comes from it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    [[ -x .venv/bin/python ]] || make install
    PYTHON=.venv/bin/python
else
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PYTHON" benchmarks/gpu_train_speed.py --steps "${STEPS:-30}" "$@"
