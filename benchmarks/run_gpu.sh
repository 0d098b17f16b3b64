#!/usr/bin/env bash
# Run a list of step-latency benchmarks on a GPU machine with no internet, from the repo root.
#
#   bash benchmarks/run_gpu.sh [flux|flux2|qwen|qwen21] RUN... [flux|flux2|qwen|qwen21] RUN...
#   RUN = world:impl:config:compile[:extra,args]     (commas in extra become spaces)
#     1:single:-:0    2:fastusp:u2r1:1    4:fastusp:u2r2-fp8:1    2:diffusers:ulysses2:1:--backend,_native_cudnn
#     2:yunchang:u2r1:0 (yunchang's USP inside fastusp's sharding; wheel in .whl/)
#     2:cache-dit:u2r1-async:1    4:xdit:u4r1:1 (the peers in their own configuration: benchmarks/peers.py)
#   A bare model name switches the model for the runs after it (default flux).
#
# Wheels in .whl/ (diffusers and what the image lacks) are installed into /tmp/site; the checkout's fastusp is
# imported from $PWD. Each run is one torchrun (python3 -m torch.distributed.run: the same interpreter) under
# `timeout` on the first `world` GPUs, and leaves exactly one JSON record in $OUT/results.jsonl, also when it
# crashes or hangs. All stderr goes to $OUT/err.log, one "===== run N" header per run.
# Environment: OUT (default /tmp/bench-out), TIMEOUT seconds per run (300), BENCH_ARGS added to every run
# (e.g. "--steps 20 --warmup 3"), BUDGET_S for the whole script (560: the device tool stops a command at 600 s;
# runs are cut to what is left, said on stdout, and runs that no longer fit are listed as skipped, without a record).
# The peers' wheels (all py3-none-any; benchmarks/peers.py says what each one needs), fetched into .whl/ in one command:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl cache-dit==1.5.3 xfuser==0.7.0 yunchang==0.6.4 distvae==0.1.0 \
#     einops==0.8.2
set -u
[ $# -gt 0 ] || { sed -n '2,24p' "$0"; exit 2; }

# fail fast on a malformed RUN, before any GPU time is spent
check_spec() {
  local world impl config compile extra
  IFS=: read -r world impl config compile extra <<<"$1"
  [[ $world =~ ^[1-8]$ ]] && [[ $impl =~ ^(single|diffusers|fastusp|yunchang|cache-dit|xdit)$ ]] && [ -n "$config" ] \
    && [[ ${compile:-0} =~ ^[01]$ ]] && return 0
  echo "bad RUN '$1': expected world:impl:config:compile[:extra,args]," \
    "impl single|diffusers|fastusp|yunchang|cache-dit|xdit" >&2
  return 1
}

for spec in "$@"; do
  case $spec in flux|flux2|qwen|qwen-image|qwen21) ;; *) check_spec "$spec" || exit 2 ;; esac
done

OUT=${OUT:-/tmp/bench-out}
TIMEOUT=${TIMEOUT:-300}
BUDGET_S=${BUDGET_S:-560}
BENCH_ARGS=${BENCH_ARGS:-}
export OUT
mkdir -p "$OUT"
log="$OUT/err.log"
scratch=$(mktemp -d)  # per-run stdout/stderr, kept out of $OUT so it stays a handful of files

# the wheels once per machine: a second invocation on a warm machine skips the ~10 s install
stamp=/tmp/site/.installed-$(cat .whl/*.whl | cksum | cut -d' ' -f1)
if [ -e "$stamp" ]; then
  echo "wheels already installed in /tmp/site"
else
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | tail -2
  [ "${PIPESTATUS[0]}" = 0 ] && touch "$stamp"
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# NVLink multicast stays off on these shared hosts (see the device notes): keep all three set
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
python3 - <<'PY'  # one interpreter for all checks: each start imports torch, seconds of the time budget
import torch, diffusers
print("torch", torch.__version__, "diffusers", diffusers.__version__, "gpus", torch.cuda.device_count())
try:
    import fastusp
    print("fastusp", getattr(fastusp, "__version__", "?"), fastusp.__file__)
except Exception as ex:
    print(f"fastusp does not import ({type(ex).__name__}: {ex}): its runs will record the error")
PY

# first_gpus N -> "0,1,...,N-1"
first_gpus() { seq -s, 0 $(($1 - 1)); }

# the error of a run that printed no record: timeout (and the last phase rank 0 reached), else the first rank's
# STEP_LATENCY_ERR line, else the exit code
failure_text() {
  local rc=$1 err_file=$2 limit=$3 line
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    line=$(grep '^STEP_LATENCY_PHASE' "$err_file" | tail -1 | sed 's/^STEP_LATENCY_PHASE //')
    echo "timeout after ${limit} s (rc $rc) in phase: ${line:-startup}"
    return
  fi
  # a rank's own error line, else argparse's complaint about the arguments
  line=$(grep -m1 -E '^STEP_LATENCY_ERR|^step_latency.py: error:' "$err_file" | sed 's/^STEP_LATENCY_ERR //')
  [ -n "$line" ] && { echo "$line"; return; }
  # faulthandler's stack dump, 15 s before the limit, can itself crash a rank that is busy compiling (seen: SIGSEGV)
  if grep -q -E '^Timeout \([0-9:]+\)!' "$err_file"; then
    echo "still running at the stack dump 15 s before the ${limit} s limit, then exit code $rc; see err.log"
    return
  fi
  echo "exit code $rc without a record; see err.log"
}

# rank 0 often sees only the echo of another rank's crash ("connection closed", NCCL watchdog): copy the other
# ranks' own STEP_LATENCY_ERR lines into the run's record as rank_errors
attach_rank_errors() {
  grep -q '^STEP_LATENCY_ERR rank=[1-9]' "$1" || return 0
  python3 - "$OUT/results.jsonl" "$1" <<'PY'
import json, sys
results, err_log = sys.argv[1:]
lines = open(results).read().splitlines()
errors = []
for line in open(err_log, errors="replace"):
    if line.startswith("STEP_LATENCY_ERR rank=") and not line.startswith("STEP_LATENCY_ERR rank=0 "):
        text = line.split(" ", 1)[1].strip()
        if text not in errors:
            errors.append(text)
record = json.loads(lines[-1])
record["rank_errors"] = errors[:8]
lines[-1] = json.dumps(record)
open(results, "w").write("\n".join(lines) + "\n")
PY
}

run_one() {  # model world impl config compile extra n limit_s
  local model=$1 world=$2 impl=$3 config=$4 compile=$5 extra=$6 n=$7 limit=$8
  local dump_after=$((limit > 30 ? limit - 15 : 0))  # stacks of all threads into err.log just before a timeout
  local core=(--model "$model" --impl "$impl" --config "$config" --compile "$compile")
  local args=("${core[@]}" $BENCH_ARGS $extra)  # a run's own extra args come last, so they win
  echo "===== run $n: $model $world:$impl:$config:$compile -> ${args[*]} ($(date -u +%T))" >>"$log"
  CUDA_VISIBLE_DEVICES=$(first_gpus "$world") STEP_LATENCY_DUMP_AFTER_S=$dump_after timeout -k 20 "$limit" \
    python3 -m torch.distributed.run --standalone --nproc-per-node "$world" benchmarks/step_latency.py "${args[@]}" \
    >"$scratch/out" 2>"$scratch/err"
  local rc=$?
  cat "$scratch/err" >>"$log"
  if grep -q '^{' "$scratch/out"; then
    grep '^{' "$scratch/out"  # step_latency.py has appended it to $OUT/results.jsonl already
  else
    local why
    why=$(failure_text "$rc" "$scratch/err" "$limit")
    # if some args were rejected, the record is written from fewer of them (the run's extra, then BENCH_ARGS dropped)
    python3 benchmarks/step_latency.py "${args[@]}" --world "$world" --record-failure "$why" 2>>"$log" \
      || python3 benchmarks/step_latency.py "${core[@]}" $BENCH_ARGS --world "$world" --record-failure "$why" \
        2>>"$log" \
      || python3 benchmarks/step_latency.py "${core[@]}" --world "$world" --record-failure "$why" 2>>"$log"
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then  # make sure a killed run left no GPU memory behind
      sleep 5; nvidia-smi --query-compute-apps=pid,used_memory --format=csv >>"$log" 2>&1
    fi
  fi
  attach_rank_errors "$scratch/err"
}

model=flux
n=0
skipped=0
for spec in "$@"; do
  case $spec in
    flux|flux2|qwen|qwen-image|qwen21) model=$spec; continue ;;
  esac
  IFS=: read -r world impl config compile extra <<<"$spec"
  left=$((BUDGET_S - SECONDS - 15))  # 15 s kept for a failure record and the clean-up
  if [ "$left" -lt 30 ]; then
    echo "skipped (time budget): $model $spec" | tee -a "$log"; skipped=$((skipped + 1)); continue
  fi
  n=$((n + 1))
  # BUDGET_S counts this script's preamble too (~20 s on a cold machine): say when a run gets less than TIMEOUT
  [ "$left" -lt "$TIMEOUT" ] && echo "run $n ($model $spec): cut to $left s by BUDGET_S" | tee -a "$log"
  run_one "$model" "$world" "$impl" "$config" "${compile:-0}" "${extra//,/ }" "$n" $((left < TIMEOUT ? left : TIMEOUT))
done
rm -rf "$scratch"
echo "done in ${SECONDS} s: $n runs, $skipped skipped; records in $OUT/results.jsonl, stderr in $log"
