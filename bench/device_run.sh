#!/usr/bin/env bash
# One call on a lent GPU machine: install the carried wheels, then run each step given, logging
# under $OUT. Device minutes are scarce, so one call checks and times together, and a step that
# fails or runs out of time does not stop the ones after it.
#
#   bash bench/device_run.sh env
#   bash bench/device_run.sh "tests 240" "bench 300 --profile full --only kernels"
#
# A step is "tests SECONDS [pytest args]" (default: the GPU tier) or "bench SECONDS [fura-bench
# args]" (results under $OUT/results/<device>/) or "python SECONDS ARGS". Wheels (bitsandbytes: the machine has none)
# come from .whl/, carried with the call.
set -u
OUT=${OUT:-/tmp/fura-device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

summary=()
step=0
for spec in "$@"; do
    step=$((step + 1))
    read -r kind seconds rest <<<"$spec"
    log="$OUT/step${step}_${kind}.log"
    start=$(date +%s)
    case "$kind" in
    env)
        { nvidia-smi; python3 -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, torch.cuda.get_device_name())"; python3 -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)"; } >"$log" 2>&1
        ;;
    tests)
        # shellcheck disable=SC2086
        timeout "$seconds" python3 -m pytest ${rest:-tests/gpu} -q -p no:cacheprovider >"$log" 2>&1
        ;;
    bench)
        # shellcheck disable=SC2086
        timeout "$seconds" python3 -m bench $rest --out "$OUT/results" >"$log" 2>&1
        ;;
    python)
        # shellcheck disable=SC2086
        timeout "$seconds" python3 $rest >"$log" 2>&1
        ;;
    *)
        echo "device_run.sh: unknown step kind '$kind' in '$spec' (expected env, tests, bench or python)" >"$log"
        false
        ;;
    esac
    rc=$?
    summary+=("step $step [$spec]: rc=$rc in $(($(date +%s) - start)) s")
    tail -n 25 "$log"
done
printf '%s\n' "${summary[@]}"
