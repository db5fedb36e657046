#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py says what it measures and writes). On a lent GPU machine, from the
# repository root, with .whl/ (scripts/fetch_gpu_wheels.sh) carried:
#   scripts/gpu_check.sh              # measures, grades, writes 8 files to $OUT after every stage
#   scripts/gpu_check.sh --plan       # the stages and their planned device time
# Without a GPU it rehearses itself (test-vit on the cpu backend).
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if [ -d .whl ] && ! $py -c "import open_clip" 2>/dev/null; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
$py -c "import open_clip, timm, tabulate, tqdm, memprof.cli" || { echo "gpu_check: a dependency does not import"; exit 1; }
export PYTHONUNBUFFERED=1
exec $py scripts/gpu_check.py "$@"
