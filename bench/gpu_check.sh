#!/usr/bin/env bash
# The GPU path on one CUDA device, in under 8 minutes (budget per part in brackets):
#   1. the tests marked `cuda` [3.3 min]: every attention path vs the dense mask (fp32, 1e-5), the bf16 grouped GEMM
#      vs the per-expert loop and without a host sync, bf16 vs fp32 loss curves over 50 steps of the tiny model
#      (every step within 5%, mean gap under 2%); export of a bf16 run equals its fp32 master weights (that test
#      trains on the GPU when there is one) [+1 min]
#   2. MFU of base and large, bf16, 4096-point packed windows, timemoe-train on one process [2 x 1.5 min]
#   3. bench/attention.py and bench/moe_layer.py in bf16 on the device [1.75 min]
#   4. one micro-batch (base, bf16, flex attention, grouped GEMM: forward, backward, StepStats.add) under
#      torch.cuda.set_sync_debug_mode("error"): any host sync in the model or the bookkeeping fails it [0.5 min]
# Run from a checkout with its environment set up (make setup, plus a CUDA torch):  bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export DS_BUILD_OPS=0 WANDB_MODE=offline TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"

"$PY" - <<'EOF'
import torch
assert torch.cuda.is_available(), "bench/gpu_check.sh needs a CUDA device"
p = torch.cuda.get_device_properties(0)
print(f"device: {p.name}, SM {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB; torch {torch.__version__}")
EOF

echo "== 1/4 tests marked cuda"
timeout 200 "$PY" -m pytest -q -m cuda -p no:cacheprovider \
  tests/test_attention.py tests/test_moe_paths.py tests/test_bf16_cuda.py
timeout 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_checkpoint_export.py

echo "== 2/4 MFU at 4096-point windows (bf16, attention auto = flex, 1 process)"
for size in base large; do
  run_dir="$OUT/mfu-$size"
  timeout 90 "$PY" -m timemoe_train.train "model=$size" data=synthetic data.max_length=4096 data.max_pieces=8 \
    logger=none logger.progress=false trainer.max_steps=12 trainer.global_batch_size=8 trainer.micro_batch_size=8 \
    checkpoint.save_at_end=false checkpoint.interval=0 "hydra.run.dir=$run_dir" > "$run_dir.log" 2>&1 \
    || { tail -40 "$run_dir.log"; exit 1; }
  "$PY" - "$size" "$run_dir/metrics.jsonl" <<'EOF'
import json, statistics, sys
size, path = sys.argv[1], sys.argv[2]
records = [json.loads(line) for line in open(path)][4:]  # the first steps compile FlexAttention
mfu = statistics.median(r["mfu"] for r in records)
rate = statistics.median(r["tokens_per_s"] for r in records)
print(f"  {size}: MFU {100 * mfu:.1f}%  {rate:,.0f} points/s  (median of steps 5-12, global batch 8 x 4096)")
EOF
done

echo "== 3/4 kernels in bf16"
timeout 60 "$PY" bench/attention.py --device cuda --dtype bfloat16 --rows 8 --repeats 10 --warmup 3
timeout 45 "$PY" bench/moe_layer.py --device cuda --dtype bfloat16 --tokens 32768

echo "== 4/4 no host sync in a micro-batch (set_sync_debug_mode error)"
timeout 60 "$PY" - <<'EOF'
import sys
import torch
sys.path.insert(0, "bench")
from host_syncs import synthetic_batches
from timemoe_train.model import TimeMoeConfig, TimeMoeForPrediction
from timemoe_train.train.metrics import StepStats

config = TimeMoeConfig.preset("base", attn_impl="flex", expert_gemm="grouped_mm")
model = TimeMoeForPrediction(config).cuda().to(torch.bfloat16).train()
batch = {k: v.cuda() for k, v in synthetic_batches(1, 4, 1024)[0].items()}
stats = StepStats(config, 4, torch.device("cuda"))

def micro_batch():
    out = model(batch["inputs"].to(torch.bfloat16), batch["labels"], batch["loss_mask"], batch["sequence_ids"])
    stats.add(out, batch)
    out.loss.backward()

micro_batch()  # compiles FlexAttention, resolves the paths
torch.cuda.synchronize()
torch.cuda.set_sync_debug_mode("error")
micro_batch()
torch.cuda.set_sync_debug_mode(0)
torch.cuda.synchronize()
print("  forward + backward + StepStats.add: no host sync")
EOF
echo "gpu check done ($OUT)"
