#!/usr/bin/env bash
# The GPU path on a bare CUDA node (a vendor PyTorch image, no internet), in about 8 minutes with the install on one
# GPU (time limit per stage in brackets; a stage stopped at its limit is reported, the next one runs):
#   0. install: the wheelhouse into a scratch venv over the node's python3, --no-index; pytest from the wheelhouse
#      where the image has none [30 s]; what every stage needs (CUDA torch, pytest, transformers) in one line [60 s]
#   1. the tests marked `cuda` [90 s]: every attention path vs the dense mask (fp32, 1e-5), the bf16 grouped GEMM
#      vs the per-expert loop without a host sync, a whole bf16 step (flex block mask, grouped GEMM, fused AdamW)
#      under torch.cuda.set_sync_debug_mode("error"), the Trainer's step likewise (no sync in a micro-batch's
#      forward, backward or bookkeeping; at most 2 in its optimizer step), bf16 vs fp32 loss curves over 50 steps
#      of the tiny model; then export of a bf16 run equals its fp32 master weights (it trains on the GPU when
#      there is one) [60 s]
#   2. MFU of base and large, bf16, 4096-point packed windows, the installed trainer on one process [2 x 70 s]
#   3. with 2 or more GPUs (skipped on one: NCCL takes one GPU per rank), the installed `timemoe-train` on 2
#      processes over NCCL, tiny model, fp32 with TF32 off, every save asynchronous, each run against the same
#      training on 1 process (losses and gradient norms of steps 1-6, weights of the step-3 and step-6 checkpoints
#      within 1e-5, as tests/test_train_parallel.py): ZeRO-1 (data parallel); EP=2 (model.moe_impl=megatron,
#      parallel=expert: the all-to-all) to step 3, then resumed in place to step 6 (same layout); the EP=2 step-3
#      checkpoint resumed at ZeRO-1 without expert parallelism (elastic) [5 x 90 s: FlexAttention compiles in each]
#   4. the benches with a CUDA path, bf16 on the device: attention paths [40 s], the MoE block [35 s], forecasting
#      with the exported code vs the released-style code [60 s] (its CPU fp32 comparison runs first). The others
#      (loader, plan, prep, checkpoint memory, host-sync counts, the CPU train step) measure the host: `make bench`
# One summary line per stage, naming the device; the exit status says whether all passed. Everything is also
# written under $OUT when it is set (at most 6 files).
#
#   make wheelhouse                       # on a machine with PyPI: wheelhouse/ for Python 3.12, manylinux x86-64
#   bash bench/gpu_check.sh               # on the node, from a copy of the checkout holding wheelhouse/
#   bash bench/gpu_check.sh --cpu-dry-run # every stage at tiny sizes on this machine's CPU (stage 3: 2 processes
#                                         # over gloo), before a lease
# PY: the interpreter that holds torch (default python3; in a dry run, a stand-in for the node's made by
# `wheelhouse.py stand-in` from .venv). WHEELHOUSE: default wheelhouse/, in a dry run .cache/wheelhouse-cpu, built
# for this machine's Python by: make wheelhouse WHEELHOUSE_ARGS="--python 3.11 --out .cache/wheelhouse-cpu".
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[[ "${1:-}" == "--cpu-dry-run" ]] && DRY=1
WHEELHOUSE=${WHEELHOUSE:-$( ((DRY)) && echo .cache/wheelhouse-cpu || echo wheelhouse)}
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
  echo "== $name: $*" >>"$log"
  timeout "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  [[ $rc == 124 ]] && echo "$name: stopped at its ${limit} s limit" | tee -a "$log"
  return $rc
}

LIMIT_SCALE=1
if ((DRY)); then
  # The limits are the GPU run's budget; a CPU (a shared one, too) also JIT-builds DeepSpeed's CPU ops on first use.
  LIMIT_SCALE=10
  ATTN=(--device cpu --dtype float32 --tokens 128 --rows 1 --repeats 1 --warmup 0 --preset tiny)
  MOE=(--device cpu --dtype float32 --tokens 256 --repeats 1 --warmup 0 --preset tiny)
  FORECAST=(--preset tiny --batches 2 --context-length 64 --repeats 1)
  MFU_ARGS=(data.max_length=128 data.max_pieces=4 trainer.max_steps=6 trainer.global_batch_size=2
            trainer.micro_batch_size=2 trainer.peak_flops_per_device=1e12 trainer.device=cpu)
  SIZES=(tiny tiny)
  MULTI=(trainer.device=cpu)
else
  ATTN=(--device cuda --dtype bfloat16 --rows 8 --repeats 10 --warmup 3)
  MOE=(--device cuda --dtype bfloat16 --tokens 32768)
  FORECAST=(--batches 8 --repeats 1)  # base; CPU fp32 first (its own figure), then CUDA bf16
  MFU_ARGS=(data.max_length=4096 data.max_pieces=8 trainer.max_steps=12 trainer.global_batch_size=8
            trainer.micro_batch_size=8)
  SIZES=(base large)
  MULTI=()
fi

# --- 0: install, and what the stages need ---------------------------------------------------------------------
fail_install() {
  summary "[0/4] install: FAILED: $1"
  summary "gpu check FAILED in $((SECONDS - START)) s (logs: $OUT)"
  exit 1
}
[[ -f $WHEELHOUSE/wheelhouse.py ]] || fail_install "$WHEELHOUSE/wheelhouse.py: not found (make wheelhouse$(
  ((DRY)) && echo ' WHEELHOUSE_ARGS="--python 3.11 --out .cache/wheelhouse-cpu"'))"
if ((DRY)) && [[ -z ${PY:-} ]]; then
  # No node: an interpreter like its, linked from this checkout's .venv, holding only what the wheelhouse assumes.
  # transformers: every GPU image we are lent has it, though nothing the wheelhouse ships requires it.
  stage stand-in "$OUT/install.log" 30 .venv/bin/python "$WHEELHOUSE/wheelhouse.py" stand-in --venv "$SCRATCH/image" \
    --also transformers ||
    fail_install "no stand-in for the node's interpreter (make setup first; $OUT/install.log)"
  PY=$SCRATCH/image/bin/python
fi
PY=${PY:-python3}
"$PY" -c "import torch" 2>/dev/null || fail_install "$PY: no such interpreter, or it has no torch (set PY=)"
if ((!DRY)) && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  version=$("$PY" -c "import torch; print(torch.__version__)")
  fail_install "$PY: its torch $version sees no CUDA device (--cpu-dry-run runs on the CPU)"
fi
if ! stage install "$OUT/install.log" 60 "$PY" "$WHEELHOUSE/wheelhouse.py" install --venv "$VENV"; then
  # wheelhouse.py prints one line per missing or too old package the image must bring: join them.
  fail_install "$(grep -E '^wheelhouse.py: |Error|error:' "$OUT/install.log" | sed 's/^wheelhouse.py: [^:]*: //' |
    tail -5 | paste -sd';' | sed 's/;/; /g') ($OUT/install.log)"
fi
VPY=$VENV/bin/python
if ! "$VPY" -c "import pytest" 2>/dev/null; then  # the image has none: the wheelhouse ships it
  stage "install pytest" "$OUT/install.log" 30 "$VPY" -m pip install -q --isolated --no-index --no-compile \
    --find-links "$WHEELHOUSE" pytest || true
fi
# -P: the checkout is not on sys.path, so the tests and benches import the installed wheel and its configs.
DEVICE=$("$VPY" -P - "$DRY" <<'EOF' 2>>"$OUT/install.log"
import importlib.util, sys, torch
needs = {"pytest": "pytest (neither the image nor the wheelhouse has it: make wheelhouse)",
         "transformers": "transformers (the image must bring it: the export test and the forecast bench load with it)",
         "timemoe_train": "timemoe_train (the install left none)"}
missing = [why for name, why in needs.items() if importlib.util.find_spec(name) is None]
if missing:
    print("missing: " + ", ".join(missing))
elif sys.argv[1] == "0":
    p = torch.cuda.get_device_properties(0)
    print(f"{torch.cuda.device_count()} x {p.name} (SM {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
else:
    print(f"CPU dry run ({torch.get_num_threads()} threads)")
EOF
)
[[ $DEVICE == missing:* || -z $DEVICE ]] &&
  fail_install "${DEVICE:-the check of what the stages need failed} ($OUT/install.log)"
GPUS=$("$VPY" -c "import torch; print(torch.cuda.device_count())")
summary "[0/4] install: ok on $DEVICE; $("$VPY" -P -c "
import pytest, torch, transformers, timemoe_train
print(f'torch {torch.__version__}, transformers {transformers.__version__}, pytest {pytest.__version__}; '
      f'timemoe_train from {timemoe_train.__path__[0]}')") ($((SECONDS - START)) s)"

# --- 1: tests marked cuda (on the CPU they are collected and skipped), and the bf16 export test -----------------
t0=$SECONDS
lines=()
for tests in "90 -m cuda tests/test_attention.py tests/test_moe_paths.py tests/test_bf16_cuda.py \
               tests/test_host_syncs.py" \
             "60 tests/test_checkpoint_export.py"; do
  read -r -a argv <<<"$tests"
  log=$SCRATCH/pytest.log
  : >"$log"
  stage tests "$log" "${argv[0]}" "$VPY" -P -m pytest -q -p no:cacheprovider "${argv[@]:1}"
  rc=$?
  cat "$log" >>"$OUT/tests.log"
  ((DRY && rc == 5)) && rc=0  # a CPU deselects every test marked cuda
  ((rc)) && STATUS=1
  # pytest's own count, else why there is none (a collection error, a timeout): its last line.
  line=$(grep -E "[0-9]+ (passed|failed|skipped|deselected|errors?)|no tests ran" "$log" | tail -1)
  lines+=("${line:-pytest exit $rc: $(tail -1 "$log")}")
done
summary "[1/4] cuda tests on $DEVICE: $(IFS=';'; echo "${lines[*]}" | sed 's/;/; /g') ($((SECONDS - t0)) s)"

# --- 2: MFU ---------------------------------------------------------------------------------------------------
t0=$SECONDS
results=()
for size in "${SIZES[@]}"; do
  run_dir=$SCRATCH/mfu-$size-${#results[@]}
  if stage "mfu $size" "$OUT/mfu.log" 70 "$VPY" -P -m timemoe_train.train "model=$size" data=synthetic \
      "${MFU_ARGS[@]}" logger=none logger.progress=false checkpoint.save_at_end=false checkpoint.interval=0 \
      "run.dir=$run_dir"; then
    results+=("$("$VPY" -P - "$size" "$run_dir/metrics.jsonl" <<'EOF'
import json, statistics, sys
size, path = sys.argv[1], sys.argv[2]
records = [json.loads(line) for line in open(path)]
steady = records[len(records) // 3:]  # the first steps compile FlexAttention
mfu = statistics.median(r["mfu"] for r in steady)
rate = statistics.median(r["tokens_per_s"] for r in steady)
print(f"{size} MFU {100 * mfu:.1f}%, {rate:,.0f} training points/s (median of steps {len(records) - len(steady) + 1}-"
      f"{len(records)})")
EOF
)")
  else
    STATUS=1
    results+=("$size FAILED")
  fi
done
summary "[2/4] MFU on $DEVICE, one process: $(IFS=';'; echo "${results[*]}" | sed 's/;/; /g') ($((SECONDS - t0)) s)"

# --- 3: multi-rank --------------------------------------------------------------------------------------------
t0=$SECONDS
LOG=$OUT/multirank.log
if ((!DRY && GPUS < 2)); then
  summary "[3/4] multi-rank: skipped: $GPUS GPU here; ZeRO-1, EP=2 and resumes over NCCL need 2 (one GPU per rank)"
else
  M=$SCRATCH/multirank
  TRAIN=$VENV/bin/timemoe-train
  # The same training at every layout: weights from one HF export, the synthetic stream, a clipping threshold every
  # step exceeds (tests/dist/train_launch.py's TINY), checkpoints at steps 3 and 6, all asynchronous.
  COMMON=(model=tiny data=synthetic data.max_length=48 logger=none logger.progress=false trainer.global_batch_size=8
          trainer.micro_batch_size=2 optim.lr=1e-3 optim.warmup_steps=2 optim.clip_grad=0.05 trainer.precision=fp32
          checkpoint.interval=3 checkpoint.async_save=true "trainer.init_from_hf=$M/start" "${MULTI[@]}")
  export NVIDIA_TF32_OVERRIDE=0  # fp32 matmuls as fp32 on the GPU (the trainer enables TF32), so 1e-5 holds
  mkdir -p "$M"
  "$VPY" -P -c "
import sys, torch
from timemoe_train.model import TimeMoeConfig, TimeMoeForPrediction
torch.manual_seed(123)
TimeMoeForPrediction(TimeMoeConfig.preset('tiny')).save_pretrained(sys.argv[1])" "$M/start" >>"$LOG" 2>&1
  failed=()
  launch() {  # launch NAME STEPS NPROC [resume] OVERRIDES...: one run of the installed command into $M/NAME
    local name=$1 steps=$2 nproc=$3 resume=0 log=$SCRATCH/launch.log rc
    shift 3
    [[ ${1:-} == resume ]] && resume=1 && shift
    : >"$log"
    stage "$name" "$log" 90 "$TRAIN" --nproc-per-node "$nproc" "${COMMON[@]}" "trainer.max_steps=$steps" \
      "run.dir=$M/$name" "$@"
    rc=$?
    cat "$log" >>"$LOG"
    if ((rc)); then
      failed+=("$name to step $steps: exit $rc")
    elif ((resume)) && ! grep -q "resuming from step 3" "$log"; then
      failed+=("$name to step $steps: did not resume from step 3")  # a fresh start would train alike, unnoticed
    fi
  }
  launch single 6 1
  launch zero1 6 2
  launch ep2 3 2 parallel=expert model.moe_impl=megatron
  cp -r "$M/ep2" "$M/elastic"
  launch ep2 6 2 resume parallel=expert model.moe_impl=megatron
  launch elastic 6 2 resume model.moe_impl=native
  if ((${#failed[@]})); then
    STATUS=1
    summary "[3/4] multi-rank on $DEVICE: FAILED: $(IFS=';'; echo "${failed[*]}" | sed 's/;/; /g') ($LOG)"
  else
    line=$("$VPY" -P - "$M" <<'EOF' 2>>"$LOG" | tee -a "$LOG" | tail -1
import json, sys
from pathlib import Path

import torch

from timemoe_train.export.cli import gather_hf_state

TOL = 1e-5  # as tests/test_train_parallel.py: fp32, TF32 off
root = Path(sys.argv[1])
RUNS = {"zero1": "ZeRO-1 DP=2", "ep2": "EP=2 megatron, resumed at step 3 (same layout)",
        "elastic": "EP=2 to step 3, then ZeRO-1 DP=2 native (elastic resume)"}


def steps(run):  # the last record of each step (a resumed run appends its own)
    return {r["step"]: r for r in map(json.loads, (root / run / "metrics.jsonl").read_text().splitlines())}


def weights(run, step):
    ckpt = root / run / "checkpoints"
    return gather_hf_state(ckpt / f"step{step:08d}", ckpt)[1]


ref = steps("single")
ref_w = {s: weights("single", s) for s in (3, 6)}
worst_all, ok = 0.0, True
for run, what in RUNS.items():
    got = steps(run)
    if sorted(got) != sorted(ref) or sorted(ref) != list(range(1, 7)):
        print(f"{what}: steps {sorted(got)}, the 1-process run {sorted(ref)}")
        ok = False
        continue
    loss = max(abs(got[s]["loss"] - ref[s]["loss"]) for s in ref)
    norm = max(abs(got[s]["grad_norm"] - ref[s]["grad_norm"]) / ref[s]["grad_norm"] for s in ref)
    w = max((a[k] - b[k]).abs().max().item() for s in (3, 6) for a, b in [(weights(run, s), ref_w[s])] for k in b)
    equal = max(loss, norm, w) <= TOL
    ok &= equal
    worst_all = max(worst_all, loss, norm, w)
    print(f"{what}: steps 1-6 loss max|Δ| {loss:.1e}, grad norm max relative Δ {norm:.1e}; weights of the step-3 "
          f"and step-6 checkpoints max|Δ| {w:.1e}: {'equal' if equal else 'DIFFERENT'} (tolerance {TOL:g})")
moved = max((ref_w[3][k] - ref_w[6][k]).abs().max().item() for k in ref_w[3])
print(f"{'equal' if ok else 'DIFFERENT'}: ZeRO-1, EP=2 (all-to-all), same-layout and elastic resume vs 1 process "
      f"within {TOL:g} (worst {worst_all:.1e}; steps 4-6 moved the weights by up to {moved:.1e})")
sys.exit(0 if ok else 1)
EOF
)
    rc=$?
    ((rc)) && STATUS=1
    backend=$( ((DRY)) && echo gloo || echo NCCL)
    summary "[3/4] multi-rank on $DEVICE, 2 processes over $backend, fp32, async saves: ${line:-comparison failed \
($LOG)} ($((SECONDS - t0)) s)"
  fi
  unset NVIDIA_TF32_OVERRIDE
fi

# --- 4: benches -----------------------------------------------------------------------------------------------
t0=$SECONDS
results=()
for bench in "attention.py 40 ${ATTN[*]}" "moe_layer.py 35 ${MOE[*]}" "forecast.py 60 ${FORECAST[*]}"; do
  read -r -a argv <<<"$bench"
  log=$SCRATCH/${argv[0]}.log
  # Without -P: a bench imports its neighbours in bench/ (reference/); the checkout root stays off sys.path.
  stage "bench/${argv[0]}" "$log" "${argv[1]}" "$VPY" "bench/${argv[0]}" "${argv[@]:2}"
  rc=$?
  cat "$log" >>"$OUT/benches.log"
  # Its last line; forecast.py's is the CPU figure alone, so its line per device (CPU fp32, CUDA bf16) instead.
  line=$(grep -E "^(cpu|cuda) [a-z0-9]+ forecast speed-up" "$log" | paste -sd';' | sed 's/;/; /g')
  ((rc)) && STATUS=1
  results+=("${argv[0]%.py}: $( ((rc)) && echo "FAILED ($(tail -1 "$log"))" || echo "${line:-$(tail -1 "$log")}")")
done
summary "[4/4] benches on $DEVICE: $(IFS=';'; echo "${results[*]}" | sed 's/;/; /g') ($((SECONDS - t0)) s)"

summary "gpu check $([[ $STATUS == 0 ]] && echo passed || echo FAILED) in $((SECONDS - START)) s (logs: $OUT)"
rm -rf "$SCRATCH"
exit $STATUS
