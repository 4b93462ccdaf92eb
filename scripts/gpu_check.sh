#!/usr/bin/env bash
# One call of a lent GPU machine for the GPU issue: install what the machine lacks, then, within a
# time budget, every bench row of the issue's table (bench fit for both paper presets with the
# step options as variants and torch.profiler summaries of 20 steps each, bench search for both
# shapes with the kernel-configuration sweep, bench encode) and the CUDA tests; everything under
# $OUT, packed into at most 3 files (the device tool returns 8 at most).
#
#   device tool: command "bash scripts/gpu_check.sh", carry [".whl"] (scripts/fetch_gpu_wheels.sh
#                fills it), timeout_s 560; the last lines printed are the summary.
#   second call, to measure a change: bash scripts/gpu_check.sh --only fit-512T,search-262k
#   CPU dry run (tiny shapes, the same sections and files): bash scripts/gpu_check.sh --cpu
#
# Sections run in order while the budget lasts (GPU_CHECK_BUDGET_S, default 450 s); each has its own
# time limit, its log, and its line in summary.txt; a section that fails or runs out of time does
# not stop the next. Sections: env install fit-512T fit-262k search-262k search-512T encode tests
# extra (extra: max-autotune fit variant and the compiled encoder, if time is left).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

MODE=gpu
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) MODE=cpu ;;
    --only) ONLY=",$2,"; shift ;;
    *) echo "usage: $0 [--cpu] [--only SECTION,...]" >&2; exit 2 ;;
  esac
  shift
done

OUT=${OUT:-$REPO/gpu-check-out}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
WORK=$(mktemp -d /tmp/gpu-check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT  # everything worth keeping is packed into $OUT
mkdir -p "$OUT" "$WORK/logs" "$WORK/profiles"
START=$(date +%s)
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1 TRITON_CACHE_DIR=$WORK/triton-cache
# revq_pipe is the repository root under its import name, as in development.
mkdir -p "$WORK/path" && ln -sfn "$REPO" "$WORK/path/revq_pipe"
export PYTHONPATH=$WORK/path:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
PY=python3
SUMMARY=$WORK/summary.txt
: > "$SUMMARY"

if [ "$MODE" = gpu ]; then
  FIT_ARGS_512="--preset 512T_NC=16384 --steps 50"
  FIT_ARGS_262="--preset 256T_NC=262144 --steps 50"
  FIT_VARIANTS_512="fused-quantize+fused-adamw,fused-quantize+fused-adamw+cuda-graph,channels-last"
  FIT_VARIANTS_262="fused-quantize+fused-adamw,fused-quantize+fused-adamw+screen-search,fused-quantize+fused-adamw+cuda-graph"
  SEARCH_262="--shape 256T_NC=262144 --candidates"
  SEARCH_512="--shape 512T_NC=16384"
  ENCODE="--images 2048 --batch-size 256"
  # The CUDA tests, and test_encode_feed's torchvision ones (decode_jpeg on the CPU: the dev venv has
  # no torchvision that imports).
  FEED=tests/test_encode_feed.py
  TESTS="tests/test_cuda_step.py tests/test_cuda_encode.py $FEED::test_device_decoding_keeps_and_skips_the_samples_the_workers_do $FEED::test_an_encode_decoding_on_the_device_stores_the_workers_rows"
else
  FIT_ARGS_512="--preset tiny --device cpu --steps 2 --batch-size 8"
  FIT_ARGS_262="--preset tiny --device cpu --steps 2 --batch-size 4"
  FIT_VARIANTS_512="fused-quantize+fused-adamw,fused-quantize+fused-adamw+cuda-graph,channels-last"
  FIT_VARIANTS_262="fused-quantize+fused-adamw"
  SEARCH_262="--shape 2,8,300,8 --device cpu --candidates"  # under the interpreter, below
  SEARCH_512="--shape 8,16,512,4 --device cpu"
  TESTS="tests/test_cuda_step.py tests/test_cuda_encode.py tests/test_step_options.py"
  ENCODE=""
fi
PROFILE_STEPS=$([ "$MODE" = gpu ] && echo 20 || echo 2)

elapsed() { echo $(( $(date +%s) - START )); }

# Pack what there is into $OUT after every section, so a call cut short still returns it.
pack() {
  cp "$SUMMARY" "$OUT/summary.txt"
  tar czf "$OUT/results.tar.gz" -C "$WORK" summary.txt logs $(cd "$WORK" && ls profiles/*.txt 2>/dev/null) 2>/dev/null
  local traces=($(cd "$WORK" && ls -Sr profiles/*.json.gz 2>/dev/null))  # smallest first
  if [ ${#traces[@]} -gt 0 ]; then
    tar cf "$OUT/traces.tar" -C "$WORK" "${traces[@]}"
    # The device tool returns files up to 16 MiB: leave out the largest traces until it fits.
    while [ "$(stat -c %s "$OUT/traces.tar")" -gt 15000000 ] && [ ${#traces[@]} -gt 1 ]; do
      traces=("${traces[@]:0:${#traces[@]}-1}")
      tar cf "$OUT/traces.tar" -C "$WORK" "${traces[@]}"
    done
  fi
}

# section NAME LIMIT_S COMMAND...: run unless --only leaves it out or the budget cannot hold it.
section() {
  local name=$1 limit=$2; shift 2
  # env and install always run: a fresh machine needs its wheels whatever --only asks for.
  if [ -n "$ONLY" ] && [[ "$ONLY" != *",$name,"* ]] && [ "$name" != env ] && [ "$name" != install ]; then return; fi
  local left=$(( BUDGET - $(elapsed) ))
  if [ "$left" -lt 20 ]; then
    printf '%-12s skipped: %ss of the %ss budget left\n' "$name" "$left" "$BUDGET" | tee -a "$SUMMARY"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local began=$(date +%s) log=$WORK/logs/$name.log
  echo "== $name (limit ${limit}s) at $(elapsed)s: $*" | tee "$log"
  # timeout signals the command's whole process group (DataLoader workers, compile workers too).
  timeout --kill-after=10 "$limit" bash -c '"$@"' section "$@" >> "$log" 2>&1
  local status=$?
  local took=$(( $(date +%s) - began ))
  local verdict
  case $status in 0) verdict=ok ;; 124|137) verdict="TIMED OUT" ;; *) verdict="FAILED ($status)" ;; esac
  printf '%-12s %-12s %4ss\n' "$name" "$verdict" "$took" | tee -a "$SUMMARY"
  pack
}

revq() { $PY -m revq_pipe.cli "$@"; }

env_report() {
  date -u
  nvidia-smi 2>&1 || echo "no nvidia-smi"
  nproc; df -h /dev/shm  # decode workers hand blocks over in shared memory (about 50 MB each at batch 256)
  $PY - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton missing")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(torch.cuda.get_device_name(0), f"{p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
EOF
}

install_missing() {
  local probe="import diffusers, zarr, numcodecs, dask.array, webdataset, braceexpand, typer"
  if $PY -c "$probe" 2>/dev/null; then echo "all there"; return 0; fi
  ls .whl/*.whl >/dev/null 2>&1 || { echo "no .whl/ wheels: run scripts/fetch_gpu_wheels.sh here and carry .whl"; return 1; }
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
  $PY -c "$probe" && echo "installed: $(ls .whl)"
}

fit_bench() {  # fit_bench LABEL "ARGS" "VARIANTS"
  revq bench fit $2 --variants "$3" --profile "$WORK/profiles" --profile-steps "$PROFILE_STEPS"
}

search_bench() {
  if [ "$MODE" = cpu ] && [[ "$1" == *--candidates* ]]; then
    TRITON_INTERPRET=1 revq bench search $1
  else
    revq bench search $1
  fi
}

encode_bench() {
  if [ "$MODE" = gpu ]; then
    revq bench encode $ENCODE "$@"
  else  # the real DC-AE encoder takes seconds per image on a CPU: a tiny AutoencoderDC instead
    $PY -c "import sys; sys.path.insert(0, 'tests'); from conftest import TINY_DC_CONFIG
from revq_pipe.stages.bench.encode import bench_encode
print(bench_encode('cpu', images=16, batch_size=8, vae_config=TINY_DC_CONFIG).report())"
  fi
}

extra_runs() {
  revq bench fit $FIT_ARGS_512 --variants max-autotune && revq bench encode $ENCODE --compile
}

# The sections run in child shells (under timeout): they need these.
export -f revq env_report install_missing fit_bench search_bench encode_bench extra_runs
export PY MODE WORK PROFILE_STEPS ENCODE FIT_ARGS_512

section env 30 env_report
section install 90 install_missing
section fit-512T 170 fit_bench 512T "$FIT_ARGS_512" "$FIT_VARIANTS_512"
section fit-262k 130 fit_bench 262k "$FIT_ARGS_262" "$FIT_VARIANTS_262"
section search-262k 100 search_bench "$SEARCH_262"
section search-512T 45 search_bench "$SEARCH_512"
section encode 120 encode_bench
section tests 150 $PY -m pytest -q -p no:cacheprovider -rs $TESTS
[ "$MODE" = gpu ] && section extra 200 extra_runs

# summary.txt: each section's output (bench tables whole, each profile's head), then the verdicts.
VERDICTS=$(cat "$SUMMARY")
: > "$SUMMARY"
for name in env install fit-512T fit-262k search-262k search-512T encode tests extra; do
  log=$WORK/logs/$name.log
  [ -f "$log" ] || continue
  echo "---- $name"
  grep -v -e '^USDT' -e 'Warning' -e 'warn_once' -e 'warnings.warn' "$log" |
    awk '/^profile:/ {inside = 1; shown = 0} inside && ++shown > 12 {next} /^[^ ]/ && !/^profile:/ {inside = 0} {print}' |
    tail -n 150
  echo
done >> "$SUMMARY"
{
  echo "gpu_check ($MODE) done in $(elapsed)s of a ${BUDGET}s budget; in $OUT: summary.txt, results.tar.gz (logs, profile"
  echo "summaries), traces.tar (chrome traces of the default steps)"
  echo "$VERDICTS"
} >> "$SUMMARY"
pack
tail -c 11000 "$SUMMARY"
