#!/usr/bin/env bash
# The GPU path on one CUDA device of a bare node (a vendor PyTorch image, no internet), in under 8 minutes with the
# install (time limit per stage in brackets; the whole is the sum):
#   0. install: the wheelhouse into a scratch venv over the node's python3, --no-index [45 s]
#   1. the tests marked `cuda` [90 s]: every attention path vs the dense mask (fp32, 1e-5), the bf16 grouped GEMM
#      vs the per-expert loop without a host sync, a whole bf16 step (flex block mask, grouped GEMM, fused AdamW)
#      under torch.cuda.set_sync_debug_mode("error"), the Trainer's step likewise (no sync in a micro-batch's
#      forward, backward or bookkeeping; at most 2 in its optimizer step), bf16 vs fp32 loss curves over 50 steps
#      of the tiny model; then export of a bf16 run equals its fp32 master weights (it trains on the GPU when
#      there is one) [60 s]
#   2. MFU of base and large, bf16, 4096-point packed windows, the installed trainer on one process [2 x 70 s]
#   3. the bf16 benches on the device: attention paths [40 s], the MoE block [35 s], forecasting with the exported
#      code vs the released-style code [60 s] (its CPU fp32 comparison runs first)
# One summary line per stage; a failed stage does not stop the next ones (a short lease still measures the rest),
# the exit status says whether all passed. Everything is also written under $OUT when it is set.
#
#   make wheelhouse                       # on a machine with PyPI: wheelhouse/ for Python 3.12, manylinux x86-64
#   bash bench/gpu_check.sh               # on the node, from a copy of the checkout holding wheelhouse/
#   bash bench/gpu_check.sh --cpu-dry-run # every stage at tiny sizes on this machine's CPU, before a lease
# PY: the interpreter that holds torch (default python3); WHEELHOUSE: default wheelhouse/ (for a dry run, one built
# for this machine's Python: make wheelhouse WHEELHOUSE_ARGS="--python 3.11 --out .cache/wheelhouse-cpu").
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[[ "${1:-}" == "--cpu-dry-run" ]] && DRY=1
PY=${PY:-python3}
WHEELHOUSE=${WHEELHOUSE:-wheelhouse}
OUT=${OUT:-$(mktemp -d)}
SCRATCH=$(mktemp -d)
VENV=$SCRATCH/venv
mkdir -p "$OUT"
export DS_BUILD_OPS=0 WANDB_MODE=offline PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$SCRATCH/torch_extensions}
START=$SECONDS
STATUS=0

summary() {  # one line per stage, on the terminal and in $OUT/summary.txt
  echo "$1" | tee -a "$OUT/summary.txt"
}

stage() {  # stage NAME LOG LIMIT CMD...: runs CMD under the limit, its output to LOG; returns CMD's status
  local name=$1 log=$2 limit=$(($3 * LIMIT_SCALE))
  shift 3
  timeout "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  [[ $rc == 124 ]] && echo "$name: stopped at its ${limit} s limit" >>"$log"
  return $rc
}

LIMIT_SCALE=1
if ((DRY)); then
  # The limits are the GPU run's budget; a CPU (a shared one, too) also JIT-builds DeepSpeed's CPU ops on first use.
  LIMIT_SCALE=10
  DEVICE=cpu
  ATTN=(--device cpu --dtype float32 --tokens 128 --rows 1 --repeats 1 --warmup 0 --preset tiny)
  MOE=(--device cpu --dtype float32 --tokens 256 --repeats 1 --warmup 0 --preset tiny)
  FORECAST=(--preset tiny --batches 2 --context-length 64 --repeats 1)
  MFU_ARGS=(data.max_length=128 data.max_pieces=4 trainer.max_steps=6 trainer.global_batch_size=2
            trainer.micro_batch_size=2 trainer.peak_flops_per_device=1e12)
  SIZES=(tiny tiny)
else
  DEVICE=cuda
  ATTN=(--device cuda --dtype bfloat16 --rows 8 --repeats 10 --warmup 3)
  MOE=(--device cuda --dtype bfloat16 --tokens 32768)
  FORECAST=(--batches 8 --repeats 1)  # base; CPU fp32 first (its own figure), then CUDA bf16
  MFU_ARGS=(data.max_length=4096 data.max_pieces=8 trainer.max_steps=12 trainer.global_batch_size=8
            trainer.micro_batch_size=8)
  SIZES=(base large)
fi

# --- 0: install ----------------------------------------------------------------------------------------------
if ! stage install "$OUT/install.log" 45 "$PY" "$WHEELHOUSE/wheelhouse.py" install --venv "$VENV"; then
  tail -5 "$OUT/install.log"
  summary "[0/3] install: FAILED ($WHEELHOUSE into $VENV over $PY; $OUT/install.log)"
  exit 1
fi
VPY=$VENV/bin/python
# -P: the checkout is not on sys.path, so the tests and benches import the installed wheel and its configs.
"$VPY" -P - "$DEVICE" <<'EOF' | tee -a "$OUT/summary.txt"
import sys, torch, timemoe_train
if sys.argv[1] == "cuda":
    assert torch.cuda.is_available(), "bench/gpu_check.sh needs a CUDA device (or --cpu-dry-run)"
    p = torch.cuda.get_device_properties(0)
    where = f"{p.name}, SM {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB"
else:
    where = "CPU dry run"
print(f"[0/3] install: ok; {where}; torch {torch.__version__}; timemoe_train from {timemoe_train.__path__[0]}")
EOF

# --- 1: tests marked cuda (on the CPU they are collected and skipped), and the bf16 export test -----------------
t0=$SECONDS
lines=()
for tests in "90 -m cuda tests/test_attention.py tests/test_moe_paths.py tests/test_bf16_cuda.py tests/test_host_syncs.py" \
             "60 tests/test_checkpoint_export.py"; do
  read -r -a argv <<<"$tests"
  stage tests "$OUT/tests.log" "${argv[0]}" "$VPY" -P -m pytest -q -p no:cacheprovider "${argv[@]:1}"
  rc=$?
  ((DRY && rc == 5)) && rc=0  # a CPU deselects every test marked cuda
  ((rc)) && STATUS=1
  lines+=("$(grep -E "passed|failed|skipped|error|deselected" "$OUT/tests.log" | tail -1)")
done
summary "[1/3] cuda tests: $(IFS=';'; echo "${lines[*]}" | sed 's/;/; /g') ($((SECONDS - t0)) s)"

# --- 2: MFU ---------------------------------------------------------------------------------------------------
t0=$SECONDS
results=()
for size in "${SIZES[@]}"; do
  run_dir=$SCRATCH/mfu-$size-${#results[@]}
  if stage "mfu $size" "$OUT/mfu.log" 70 "$VPY" -P -m timemoe_train.train "model=$size" data=synthetic \
      "${MFU_ARGS[@]}" logger=none logger.progress=false checkpoint.save_at_end=false checkpoint.interval=0 \
      "hydra.run.dir=$run_dir"; then
    results+=("$("$VPY" -P - "$size" "$run_dir/metrics.jsonl" <<'EOF'
import json, statistics, sys
size, path = sys.argv[1], sys.argv[2]
records = [json.loads(line) for line in open(path)]
steady = records[len(records) // 3:]  # the first steps compile FlexAttention
mfu = statistics.median(r["mfu"] for r in steady)
rate = statistics.median(r["tokens_per_s"] for r in steady)
print(f"{size} MFU {100 * mfu:.1f}% ({rate:,.0f} points/s, median of steps {len(records) - len(steady) + 1}-{len(records)})")
EOF
)")
  else
    STATUS=1
    results+=("$size FAILED")
  fi
done
summary "[2/3] MFU: $(IFS=';'; echo "${results[*]}" | sed 's/;/; /g') ($((SECONDS - t0)) s)"

# --- 3: benches -----------------------------------------------------------------------------------------------
t0=$SECONDS
results=()
for bench in "attention.py 40 ${ATTN[*]}" "moe_layer.py 35 ${MOE[*]}" "forecast.py 60 ${FORECAST[*]}"; do
  read -r -a argv <<<"$bench"
  log=$SCRATCH/${argv[0]}.log
  stage "${argv[0]}" "$log" "${argv[1]}" "$VPY" -P "bench/${argv[0]}" "${argv[@]:2}"
  rc=$?
  { echo "== bench/${argv[0]} ${argv[*]:2}"; cat "$log"; } >>"$OUT/benches.log"
  # Its last line; forecast.py's is the CPU figure, so its CUDA bf16 rows (exported vs released-style) go first.
  line=$(awk '/^cuda/ {c = 1} c && /batch/ {r = r " b" $2 "/h" $4 " " $NF} END {if (r) print "cuda bf16" r ";"}' "$log")
  ((rc)) && STATUS=1
  results+=("${argv[0]%.py}: $( ((rc)) && echo FAILED || echo "$line $(tail -1 "$log")")")
done
summary "[3/3] benches: $(IFS=';'; echo "${results[*]}" | sed 's/;/; /g') ($((SECONDS - t0)) s)"

summary "gpu check $([[ $STATUS == 0 ]] && echo passed || echo FAILED) in $((SECONDS - START)) s (logs: $OUT)"
rm -rf "$SCRATCH"
exit $STATUS
