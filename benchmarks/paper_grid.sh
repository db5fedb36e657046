#!/usr/bin/env bash
# Wall time and peak host memory of predicting the paper grid (3 models x 4 optimizers), process start
# included, and of ViT-H/14 alone. Usage: benchmarks/paper_grid.sh [python]
set -euo pipefail
py=${1:-python}
out=$(mktemp -d)
for args in "--models paper --optims paper" "--models vit-h-14 --optims adamw --jobs 1"; do
  /usr/bin/time -f "%e s wall, %M KiB max RSS (largest process)" \
    "$py" -m memprof run $args --out "$out/$RANDOM" --no-progress >/dev/null 2>"$out/err" || { cat "$out/err"; exit 1; }
  echo "memprof run $args: $(tail -n1 "$out/err")"
done
rm -rf "$out"
