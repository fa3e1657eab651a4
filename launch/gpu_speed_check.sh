#!/usr/bin/env bash
# The speed check of issue 15, on one H100/H200, inside 8 minutes, without network (nothing is installed here):
#   1. benchmarks/mfu.py: images/s and MFU of DiT-XL/2 (class-conditional, 256 px) through our Trainer (AdamW,
#      clipping, EMA, bf16) and, when a clone of facebookresearch/DiT is found, its published train.py loop on the
#      same latents (as published, fp32/TF32, and under a bf16 autocast); then DiT-XL/2-text and the SD 1.5 U-Net
#      at 512 px; then DiT-XL/2 with train.compile: blocks;
#   2. benchmarks/train_overhead.py on DiT-B/2: the train step before issue 15 against today's (no host
#      synchronisation, fused AdamW), and the EMA update loop against the foreach one;
#   3. the parallelism checks that fit one GPU: benchmarks/strategies.py under DDP and ZeRO-2 (the fixed ZeRO-2 cost
#      per step, launch/deepspeed/zero2.json), and the sequence-parallel tests (gloo, CPU processes) when present.
# Each part has its own limit and a failure does not stop the others; the whole script stops at GPU_SPEED_BUDGET_S
# (default 465 s). Parts run in order of priority — MFU, parallelism, compiled blocks, step overhead — so that a
# spent budget skips the last ones. Everything goes to $OUT/gpu_speed_check.log (OUT defaults to
# /tmp/gpu_speed_check); the table to paste into benchmarks/RESULTS.md is printed at the end (also
# $OUT/mfu_table.md).
#
# The DiT reference: DIT_REFERENCE_DIR, else shared/DiT, else .dit-reference (a clone of facebookresearch/DiT kept
# out of the project's history; e.g. `git clone https://github.com/facebookresearch/DiT .dit-reference`, or from a
# mirror `mkdir .dit-reference && git -C MIRROR archive HEAD | tar -x -C .dit-reference`; an untracked folder travels
# to the device machine with the working tree). Its models.py needs timm (on the GPU image).
#
# On the lent GPU machine (wheels carried in .whl, see shared/device/README.md):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD && bash launch/gpu_speed_check.sh
# Here, to test the script itself (tiny models on the CPU, short):  bash launch/gpu_speed_check.sh --cpu
set -uo pipefail

MODE=gpu
if [[ "${1:-}" == "--cpu" ]]; then
  MODE=cpu
fi
BUDGET=${GPU_SPEED_BUDGET_S:-465}
if [[ -z "${GPU_SPEED_INNER:-}" ]]; then  # the global limit: re-run this script under timeout
  GPU_SPEED_INNER=1 exec timeout --kill-after=10 "$((BUDGET + 15))" bash "$0" "$@"
fi

cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/gpu_speed_check}
mkdir -p "$OUT"
LOG="$OUT/gpu_speed_check.log"
: > "$LOG"
PY=${PYTHON:-python3}
if [[ $MODE == cpu ]]; then  # DeepSpeed's CPU collectives compile a shm op once: keep it where CI keeps it
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/latentloom/torch_extensions}
else
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
  local name=$1 limit=$2 rc remaining
  shift 2
  remaining=$(left)
  if ((remaining < limit)); then
    limit=$remaining
  fi
  if ((limit < 15)); then
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

REF=""
for d in "${DIT_REFERENCE_DIR:-}" shared/DiT .dit-reference; do
  if [[ -n "$d" && -f "$d/models.py" && -d "$d/diffusion" ]]; then
    REF=$d
    break
  fi
done
REF_ARGS=()
if [[ -n "$REF" ]]; then
  REF_ARGS=(--reference-dir "$REF")
fi

log "gpu_speed_check mode=$MODE date=$(date -u +%Y-%m-%dT%H:%M:%SZ) host=$(hostname) budget=${BUDGET}s reference=${REF:-none}"
if [[ $MODE == gpu ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
fi
part versions 30 "$PY" -c "
import torch
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu',
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')
print('flash SDPA', torch.backends.cuda.flash_sdp_enabled(), 'cuDNN SDPA',
      getattr(torch.backends.cuda, 'cudnn_sdp_enabled', lambda: None)())"

# 1. MFU
if [[ $MODE == gpu ]]; then
  M=(--steps 15 --warmup 5)
else
  M=(--cpu-tiny --steps 1 --warmup 1 --batch 2)
fi
part "mfu dit-xl2" 150 "$PY" benchmarks/mfu.py --models dit-xl2 "${M[@]}" "${REF_ARGS[@]}" --json "$OUT/mfu_dit.json"
part "mfu dit-xl2-text unet-sd15" 120 "$PY" benchmarks/mfu.py --models dit-xl2-text,unet-sd15 "${M[@]}" \
  --json "$OUT/mfu_other.json"
# 2. parallelism: DDP against ZeRO-2 (its fixed per-step cost), sequence parallelism tests
for s in ddp zero2; do
  if [[ $MODE == gpu ]]; then
    B=(--steps 15 --warmup 5 --batch 32 --no-resume)
  else
    B=(--cpu --steps 2 --warmup 1 --batch 4 --no-resume)
  fi
  part "strategy $s" 60 "$PY" benchmarks/strategies.py --strategy "$s" "${B[@]}" --json "$OUT/strategy_$s.json"
done
SP_TESTS=$(find tests/distributed -maxdepth 1 -name 'test_sequence_parallel*.py' 2>/dev/null | sort | tr '\n' ' ')
if [[ $MODE == gpu && -n "$SP_TESTS" ]] && "$PY" -c "import pytest" 2>/dev/null; then
  # shellcheck disable=SC2086  # the list is meant to split
  part "sequence-parallel tests" 90 "$PY" -m pytest -q -x -p no:cacheprovider $SP_TESTS
fi

# 4. lower priority (skipped first when the budget runs out): regional compilation, the train step before/after
part "mfu dit-xl2 compiled blocks" 110 "$PY" benchmarks/mfu.py --models dit-xl2 --compile blocks "${M[@]}" \
  --json "$OUT/mfu_compiled.json"

# the train step before / after, on DiT-B/2
if [[ $MODE == gpu ]]; then
  part "train step overhead" 100 "$PY" benchmarks/train_overhead.py --device cuda --model dit-b2 --batch 32 \
    --steps 10 --repeats 1 --variants before,fused
else
  part "train step overhead" 80 "$PY" benchmarks/train_overhead.py --steps 2 --repeats 1 --batch 4 \
    --variants before,fused
fi

# the table to paste into RESULTS
TABLE=$("$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| model | loop | precision | batch | images/s | TFLOP/s | MFU | ours / reference | card |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for name in ("mfu_dit.json", "mfu_other.json", "mfu_compiled.json"):
    path = out / name
    if not path.exists():
        print(f"| {name}: failed, see gpu_speed_check.log | | | | | | | | |")
        continue
    for r in json.loads(path.read_text()):
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        ratio = f"{r['ours_over_reference']:.2f}x" if "ours_over_reference" in r else ""
        print(f"| {r['model']} | {r['loop']} | {r['precision']} | {r['batch']} | {r['images_per_s']:.1f} | "
              f"{r['tflops']:.1f} | {mfu} | {ratio} | {r['device']} |")
for s in ("ddp", "zero2"):
    path = out / f"strategy_{s}.json"
    if path.exists():
        r = json.loads(path.read_text())
        print(f"\nstrategy {s}: {r.get('step_ms')} ms/step, {r.get('samples_per_s')} samples/s, peak "
              f"{r.get('peak_mem_GiB')} GiB ({r.get('params_M')}M parameters, micro-batch {r.get('micro_batch')})")
EOF
)
echo "$TABLE" > "$OUT/mfu_table.md"
log ""
log "$TABLE"
log ""
grep -h "ratio\|EMA update\|trainer \|bare loop" "$LOG" | grep -v "^==" | tail -n 12 | tee -a "$OUT/mfu_table.md"
log "gpu_speed_check done in $((SECONDS - START))s; failed parts: ${FAILED[*]:-none}"
if ((${#FAILED[@]})); then
  exit 1
fi
