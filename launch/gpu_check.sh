#!/usr/bin/env bash
# The GPU check, on one GPU, in under 7 minutes, without network:
#   1. bf16 training steps of DiT-B/2 (32x32x4 latents, synthetic in-memory batches) through the real Trainer under
#      DDP (one process), DeepSpeed ZeRO-2, ZeRO-3, ZeRO-3 with optimizer and parameter offload to CPU (DeepSpeed's
#      CPU Adam, compiled on first use) and FSDP2: step time and peak memory, one line each
#      (benchmarks/strategies.py, one process per strategy), then each run's checkpoint and consolidated export,
#      and for ZeRO-3 and FSDP2 a second trainer resuming from that sharded checkpoint;
#   2. a summary table of those lines;
#   3. the distributed tests that make sense on one GPU, on CUDA/NCCL: our DeepSpeed ZeRO-2/ZeRO-3 trainer path
#      against a run without DeepSpeed, resume, consolidated export (tests/distributed/test_sharding.py), and the
#      LoRA and DPO stages under ZeRO-2 in fp32 and bf16 (tests/distributed/test_finetune_distributed.py), with
#      LATENTLOOM_SHARDING_DEVICE=cuda. Extra test files: GPU_CHECK_TESTS="tests/a.py tests/b.py".
# Each part has its own time limit and failures do not stop the others; the whole script stops at GPU_CHECK_BUDGET_S
# (default 400 s). Everything goes to $OUT/gpu_check.log (OUT defaults to /tmp/gpu_check), the summary also to stdout.
#
# On the lent GPU machine (which lacks webdataset, open_clip, deepspeed, omegaconf; see shared/device/README.md):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD && bash launch/gpu_check.sh
# Here, to test the script itself (tiny DiT, bf16 on the CPU; FSDP2 is GPU-only in Accelerate and is skipped):
#   bash launch/gpu_check.sh --cpu
set -uo pipefail

MODE=gpu
if [[ "${1:-}" == "--cpu" ]]; then
  MODE=cpu
fi
BUDGET=${GPU_CHECK_BUDGET_S:-400}
if [[ -z "${GPU_CHECK_INNER:-}" ]]; then  # the global limit: re-run this script under timeout
  GPU_CHECK_INNER=1 exec timeout --kill-after=10 "$((BUDGET + 15))" bash "$0" "$@"
fi

cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
PY=${PYTHON:-python3}
if [[ $MODE == cpu ]]; then  # DeepSpeed's CPU collectives compile a shm op once (~2 min): keep it where CI keeps it
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/latentloom/torch_extensions}
else  # a client torch optimizer: nothing should need compiling on the GPU; if something does, it goes here
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}
fi
export TOKENIZERS_PARALLELISM=false
export PYTHONPATH="${PYTHONPATH:-}${PYTHONPATH:+:}$PWD"
START=$SECONDS
FAILED=()

log() { echo "$*" | tee -a "$LOG"; }
left() { echo $((BUDGET - (SECONDS - START))); }

# part NAME LIMIT_S COMMAND...: run with at most LIMIT_S seconds (less if the budget is nearly spent), log everything
part() {
  local name=$1 limit=$2 rc
  shift 2
  local remaining
  remaining=$(left)
  if ((remaining < limit)); then
    limit=$remaining
  fi
  if ((limit < 10)); then
    log "== $name: skipped (budget spent)"
    FAILED+=("$name(skipped)")
    return
  fi
  log "== $name (limit ${limit}s) $(date -u +%H:%M:%S)"
  timeout --kill-after=5 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  log "== $name: exit $rc after $((SECONDS - START))s in all"
  if ((rc != 0)); then
    FAILED+=("$name(exit $rc)")
  fi
}

log "gpu_check mode=$MODE date=$(date -u +%Y-%m-%dT%H:%M:%SZ) host=$(hostname) budget=${BUDGET}s"
if [[ $MODE == gpu ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
fi
part versions 30 "$PY" -c "
import torch, accelerate, deepspeed, open_clip, safetensors
print('python', __import__('sys').version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'accelerate', accelerate.__version__, 'deepspeed', deepspeed.__version__, 'open_clip', open_clip.__version__)
print('gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')"

# 1. strategies
if [[ $MODE == gpu ]]; then
  STRATS=(ddp zero2 zero3 zero3_offload fsdp2)
  BENCH=(--steps 20 --warmup 5 --batch 32)
  LIMIT=55
else
  STRATS=(ddp zero2 zero3 zero3_offload)
  BENCH=(--cpu --precision bf16 --steps 2 --warmup 1 --batch 4)  # bf16 as on the GPU
  LIMIT=90
fi
for s in "${STRATS[@]}"; do
  rm -f "$OUT/strategy_$s.json"
  EXTRA=()
  if [[ $MODE == gpu && ($s == ddp || $s == zero2) ]]; then
    EXTRA=(--no-resume)  # time: the sharded formats (ZeRO-3, FSDP2) are the ones whose resume needs the GPU check
  fi
  limit=$LIMIT
  if [[ $s == zero3_offload ]]; then
    limit=$((LIMIT + 60))  # DeepSpeed's CPU Adam is compiled on first use
  fi
  part "strategy $s" "$limit" "$PY" benchmarks/strategies.py --strategy "$s" "${BENCH[@]}" "${EXTRA[@]}" \
    --json "$OUT/strategy_$s.json"
  grep -h "^RESULT strategy=$s " "$LOG" | tail -n 1
done

# 2. summary table
SUMMARY=$("$PY" - "$OUT" "${STRATS[@]}" <<'EOF'
import json, sys
from pathlib import Path
out, names = Path(sys.argv[1]), sys.argv[2:]
cols = ["strategy", "strategy_used", "optimizer", "offload", "device", "params_M", "micro_batch", "precision", "step_ms", "samples_per_s",
        "peak_mem_GiB", "checkpoint_and_export_s", "export_ok", "resume_ok"]
print("| " + " | ".join(cols) + " |")
print("|" + " --- |" * len(cols))
for name in names:
    path = out / f"strategy_{name}.json"
    if path.exists():
        r = json.loads(path.read_text())
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    else:
        print(f"| {name} | failed: see gpu_check.log |" + " |" * (len(cols) - 2))
EOF
)
log ""
log "$SUMMARY"
log ""

# 3. distributed tests on CUDA / NCCL (one GPU)
if [[ $MODE == gpu ]]; then
  if "$PY" -c "import pytest" 2>/dev/null; then
    # shellcheck disable=SC2206  # word splitting of the list is intended
    TESTS=(tests/distributed/test_sharding.py tests/distributed/test_finetune_distributed.py ${GPU_CHECK_TESTS:-})
    part "distributed tests on CUDA" 180 env LATENTLOOM_SHARDING_DEVICE=cuda "$PY" -m pytest -q -x -m distributed \
      -p no:cacheprovider "${TESTS[@]}"
  else
    log "== distributed tests: skipped (pytest is not installed: add pytest, pluggy, iniconfig to the wheels)"
    FAILED+=("tests(no pytest)")
  fi
fi

log "gpu_check done in $((SECONDS - START))s; failed parts: ${FAILED[*]:-none}"
if ((${#FAILED[@]})); then
  exit 1
fi
