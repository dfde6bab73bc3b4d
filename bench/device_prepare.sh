#!/usr/bin/env bash
# Prepare a device check, here, where PyPI is reachable: the lent GPU machine is offline and its
# image (Python 3.12, x86-64) has torch, triton, transformers, peft, accelerate and pytest-timeout
# but not bitsandbytes, liger-kernel (the whole-model step's Liger runs) or jsonschema. Downloads
# their wheels into .whl/ (git-ignored through .git/info/exclude, carried with the call) and writes
# .whl/COMMIT, the commit the check measures.
#
#   bash bench/device_prepare.sh && <device tool> run(command="bash bench/device_check.sh", carry=[".whl"])
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
# The versions tested here; one version of each (two would stop the install there).
WHEELS=(bitsandbytes==0.50.2 liger-kernel==0.8.5 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==0.30.0)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
    manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
"${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "${WHEELS[@]}"
# Whatever else lies in .whl from an earlier preparation would be installed too: keep only these.
for whl in .whl/*.whl; do
    keep=0
    for spec in "${WHEELS[@]}"; do
        name=${spec%%==*}
        version=${spec##*==}
        case "$(basename "$whl")" in "${name//-/_}-${version}-"*) keep=1 ;; esac
    done
    [ "$keep" = 1 ] || rm -f "$whl"
done
commit=$(git rev-parse HEAD)
[ -z "$(git status --porcelain --untracked-files=no)" ] || commit="$commit-dirty"
echo "$commit" >.whl/COMMIT
echo "prepared .whl/ ($(du -sh .whl | cut -f1)): $(ls .whl | tr '\n' ' ')"
echo "commit measured: $commit"
