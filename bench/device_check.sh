#!/usr/bin/env bash
# The device check: one call on a bare, offline H100 or H200 that runs the GPU test tier, times
# the layer steps, the kernels and a whole model, and finishes within 480 s, leaving at most 6
# files directly under $OUT. Steps, budgets and estimates: bench/device_check.py.
#
# Before the call, here (network): bash bench/device_prepare.sh     (wheels + commit file in .whl/)
# The call (device tool):          run(command="bash bench/device_check.sh", carry=[".whl"], timeout_s=540)
# On the CPU, same steps, tiny sizes: DRY_RUN=1 OUT=/tmp/check bash bench/device_check.sh
set -u
cd "$(dirname "$0")/.."
export DEVICE_CHECK_START=${DEVICE_CHECK_START:-$(date +%s.%N)}  # the 480 s count from here
export OUT=${OUT:-/tmp/fura-device-check}
# The copied tree is not installed: run the package and the benchmarks from it, unbuffered.
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Progress bars would fill the log with carriage returns; the log has a line per step instead.
export TQDM_DISABLE=1
exec "${PYTHON:-python3}" -m bench.device_check
