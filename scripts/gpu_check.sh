#!/usr/bin/env bash
# The GPU check: measures what the simulation predicts, on the same configurations, and grades it.
#
# On a lent GPU machine (no internet), from the repository root, with .whl/ carried:
#   scripts/gpu_check.sh            -> results under $OUT/gpu (or reports/gpu/<device>/ without $OUT)
# Measured (backend cuda, one process per configuration, whole card): the paper grid; ViT-B/16 with
# gradient checkpointing; ViT-B/16 at batch 32 with checkpointing off and on; AdamW under bf16-amp (paper
# models), fused AdamW with optimizer-in-backward off and on (paper models), ViT-B/16 fp32 vs bf16-amp at 32. Emulated 12 GB Titan-X:
# ViT-H/14 under the paper's four methods (the OOM pattern). Predicted (backend simulate) for the same
# card: the same configurations. Then Table 4 (measured), the fidelity table (predicted vs measured) and
# the NVML sampler's overhead on step time. Without a GPU only the simulate half runs (a dry run).
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
start=$(date +%s)
if [ -d .whl ] && ! $py -c "import open_clip" 2>/dev/null; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
$py -c "import open_clip, timm, tabulate, tqdm, memprof.cli" || { echo "gpu_check: a dependency does not import"; exit 1; }
export PYTHONUNBUFFERED=1
read -r gpu card < <($py - <<'PY'
import torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(p.name.replace(" ", "-"), f"{p.total_memory >> 20}MiB@{p.major}.{p.minor}")
else:
    print("no-gpu", "143771MiB@9.0")  # dry run: predict for an H200
PY
)
[ -n "${gpu:-}" ] || { echo "gpu_check: python ($py) cannot import torch"; exit 1; }
out=${OUT:+$OUT/gpu}
out=${out:-reports/gpu/$gpu}
mkdir -p "$out"
log="$out/gpu_check.log"
failures=0
m() { echo "+ memprof $*" | tee -a "$log"; $py -m memprof "$@" >>"$log" 2>&1; rc=$?; echo "  rc=$rc" | tee -a "$log"
      [ $rc -eq 0 ] || failures=$((failures + 1)); }
grids=("--models paper --optims paper"
       "--models vit-b-16 --optims paper --grad-ckpt on"
       "--models vit-b-16 --optims adamw,sgd-fe-nomom --grad-ckpt off,on --batch-size 32"
       "--models paper --optims adamw --precision bf16-amp"
       "--models paper --optims adamw --optim-impl fused --optim-in-backward off,on"
       "--models vit-b-16 --optims adamw --precision fp32,bf16-amp --batch-size 32")
echo "device: $gpu ($card); $(date -u)" | tee "$log"
for g in "${grids[@]}"; do m run --no-progress --backend simulate --budget "$card" --jobs 8 $g --out "$out/simulate" --resume; done
if [ "$gpu" != "no-gpu" ]; then
  for g in "${grids[@]}"; do m run --no-progress --backend cuda --budget device --timeout-s 150 $g --out "$out/cuda" --resume; done
  m run --no-progress --backend cuda --budget titan-x --timeout-s 150 --models vit-h-14 --optims paper --out "$out/titan-x-emulated"
  for p in 5 0; do m run --no-progress --backend cuda --budget device --steps 12 --nvml-period-ms $p --models vit-b-16 --optims sgd --out "$out/overhead-nvml-$p"; done
  m table "$out/cuda" --out "$out/cuda"
  m fidelity "$out/cuda" "$out/simulate" --out "$out"
  $py - "$out" <<'PY' | tee -a "$log"
import sys, json
from memprof.results import read_records as load
o = sys.argv[1]
on, off = (load(f"{o}/overhead-nvml-{p}")[0]["metrics"].get("step_ms_median") for p in (5, 0))
print(f"NVML sampler overhead on ViT-B/16 SGD step time: {on} ms with 5 ms sampling vs {off} ms without "
      f"({100 * (on - off) / off:+.2f}%)" if on and off else "NVML overhead: not measured")
PY
fi
# DDP and FSDP2 at world size 1: predicted on the fake process group, measured with real NCCL (short: ViT-B/16)
m run --no-progress --backend simulate --budget "$card" --models vit-b-16 --optims adamw,sgd --parallel ddp,fsdp \
  --world-size 1 --out "$out/simulate-dist" --resume
if [ "$gpu" != "no-gpu" ]; then
  echo "+ python -m memprof.simulation.distributed (NCCL, world size 1)" | tee -a "$log"
  timeout 300 $py -m memprof.simulation.distributed --models vit-b-16 --optims adamw,sgd --parallel ddp,fsdp \
    --out "$out/cuda-dist" >>"$log" 2>&1 || failures=$((failures + 1))
  m fidelity "$out/cuda-dist" "$out/simulate-dist" --out "$out/dist"
fi
# ordinary training scripts (memprof script): predicted for this card, then run for real on it and measured
scripts_=("tests/data/scripts/registry_twin.py --model vit-b-16 --batch-size 8"
          "tests/data/scripts/train_small.py --amp bf16 --batch-size 32")
for s in "${scripts_[@]}"; do m script --budget "$card" --out "$out/simulate-scripts" $s; done
if [ "$gpu" != "no-gpu" ]; then
  for s in "${scripts_[@]}"; do m script --backend cuda --budget "$card" --out "$out/cuda-scripts" $s; done
  m fidelity "$out/cuda-scripts" "$out/simulate-scripts" --out "$out/scripts"
fi
m table "$out/simulate" --out "$out/simulate"
echo "elapsed: $(( $(date +%s) - start )) s; failed steps: $failures" | tee -a "$log"
if [ -n "${OUT:-}" ]; then
  tar -czf "$OUT/gpu_check.tar.gz" -C "$out" .
  for f in "$out/fidelity.md" "$out/cuda/table4.md" "$out/dist/fidelity.md" "$out/scripts/fidelity.md"; do [ -f "$f" ] && cp "$f" "$OUT/"; done
fi
[ $failures -eq 0 ]
