#!/usr/bin/env bash
# Downloads, here, the wheels the GPU machine lacks (it has torch, NVML bindings, tabulate, matplotlib,
# tqdm, but no open_clip and no internet; timm and regex come along so their versions are known) into
# .whl/, which the device call carries.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
py=${PYTHON:-python3}
$py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl open_clip_torch==3.3.0 timm==1.0.31 ftfy wcwidth regex
ls .whl
