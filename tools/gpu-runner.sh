#!/usr/bin/env bash
# Runs the GPU bundle (tools/gpu-bundle.sh) on a machine with an NVIDIA GPU and no Rust: finds
# libcuda and libcublas, prints the GPU, runs every bundled test binary with its ignored (GPU)
# tests included, a one-epoch `mlvpt train --device cuda` on the demo, then the benches in a
# short mode, writes one log per step into $OUT (or $MLVPT_GPU_LOGS, else bundle/logs), and
# prints a summary table last. Exits non-zero when a
# test fails or a library is missing. Budget: under 8 minutes.
#
#   bash bundle/gpu-runner.sh                 # from the repo root, bundle/ carried
#   MLVPT_GPU_SKIP_BENCH=1 bash bundle/gpu-runner.sh
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
LOGS=${MLVPT_GPU_LOGS:-${OUT:-$HERE/logs}}
mkdir -p "$LOGS"
START=$(date +%s)
DEADLINE=$((START + ${MLVPT_GPU_BUDGET_S:-450}))
SUMMARY="$LOGS/summary.txt"
: > "$SUMMARY"
status=0

log() { echo "== $*" | tee -a "$LOGS/runner.log"; }
row() { printf '%-28s %-8s %6s %6s %7s %6ss\n' "$@" >> "$SUMMARY"; }

[ -f "$HERE/MANIFEST.txt" ] && cat "$HERE/MANIFEST.txt" | tee "$LOGS/manifest.txt"

# --- libraries -------------------------------------------------------------------------------
# First directory holding one of the given file names, searched in the given roots.
find_lib() {
  local names=$1; shift
  for root in "$@"; do
    [ -d "$root" ] || continue
    for n in $names; do
      local hit
      hit=$(find -L "$root" -maxdepth 6 -name "$n" -print -quit 2>/dev/null)
      if [ -n "$hit" ]; then dirname "$hit"; return 0; fi
    done
  done
  return 1
}

py_sites=$(python3 -c 'import site, sys; print("\n".join(site.getsitepackages() + [site.getusersitepackages()] + sys.path))' 2>/dev/null | grep -E 'site-packages|dist-packages' | sort -u)
lib_roots=(/usr/lib/x86_64-linux-gnu /usr/lib64 /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/wsl/lib)
cuda_roots=(/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib)
for d in /usr/local/cuda-*/lib64; do cuda_roots+=("$d"); done

libcuda_dir=""
if ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1'; then
  libcuda_dir=$(dirname "$(ldconfig -p | grep 'libcuda\.so\.1' | head -n 1 | awk '{print $NF}')")
else
  libcuda_dir=$(find_lib "libcuda.so.1 libcuda.so" "${lib_roots[@]}") || libcuda_dir=""
fi
# pip's wheel (what PyTorch uses): site-packages/nvidia/cu13/lib or nvidia/cublas/lib.
cublas_dir=$(find_lib "libcublas.so.13" $(for s in $py_sites; do echo "$s/nvidia"; done) "${cuda_roots[@]}") ||
  cublas_dir=$(find_lib "libcublas.so.12 libcublas.so" $(for s in $py_sites; do echo "$s/nvidia"; done) "${cuda_roots[@]}") ||
  cublas_dir=""
export LD_LIBRARY_PATH="${cublas_dir:+$cublas_dir:}${libcuda_dir:+$libcuda_dir:}${LD_LIBRARY_PATH:-}"
log "libcuda: ${libcuda_dir:-NOT FOUND}"
log "libcublas: ${cublas_dir:-NOT FOUND}"
log "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
[ -n "$libcuda_dir" ] || { row "libcuda" "MISSING" - - - 0; status=1; }
[ -n "$cublas_dir" ] || { row "libcublas" "MISSING" - - - 0; status=1; }

# --- the GPU --------------------------------------------------------------------------------
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi 2>&1 | tee "$LOGS/nvidia-smi.txt"
  gpu_name=$(nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader 2>/dev/null | head -n 1)
else
  gpu_name="nvidia-smi not found"
fi
log "GPU: $gpu_name"

remaining() { echo $((DEADLINE - $(date +%s))); }

# --- tests ----------------------------------------------------------------------------------
for t in "$HERE"/tests/*; do
  [ -x "$t" ] || continue
  name=$(basename "$t")
  left=$(remaining)
  if [ "$left" -lt 20 ]; then row "test $name" "SKIPPED" - - - 0; status=1; continue; fi
  # The library's unit tests are mostly CPU tests (CI runs them): only its GPU/CUDA ones here.
  args=(--include-ignored)
  [ "$name" = lib ] && args+=(gpu cuda)
  log "test $name ${args[*]} (timeout ${left}s)"
  t0=$(date +%s)
  timeout --kill-after=5 "$left" "$t" "${args[@]}" > "$LOGS/test-$name.log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - t0 ))
  tail -n 30 "$LOGS/test-$name.log"
  res=$(grep -E '^test result:' "$LOGS/test-$name.log" | tail -n 1)
  passed=$(sed -n 's/.* \([0-9]*\) passed.*/\1/p' <<< "$res")
  failed=$(sed -n 's/.* \([0-9]*\) failed.*/\1/p' <<< "$res")
  ignored=$(sed -n 's/.* \([0-9]*\) ignored.*/\1/p' <<< "$res")
  if [ "$rc" -eq 0 ]; then st=ok; elif [ "$rc" -ge 124 ]; then st=TIMEOUT; status=1; else st=FAILED; status=1; fi
  row "test $name" "$st" "${passed:--}" "${failed:--}" "${ignored:--}" "$secs"
done

# --- a short training run on the GPU (the embedded demo, one epoch) ------------------------------
TRAIN_TABLE="$LOGS/train-summary.txt"
: > "$TRAIN_TABLE"
if [ -x "$HERE/bin/mlvpt" ]; then
  left=$(remaining)
  if [ "$left" -lt 30 ]; then
    row "train --device cuda" "SKIPPED" - - - 0; status=1
  else
    log "mlvpt train --device cuda --epochs 1 (timeout ${left}s)"
    run_dir=${TMPDIR:-/tmp}/mlvpt-train-cuda
    rm -rf "$run_dir"
    t0=$(date +%s)
    timeout --kill-after=5 "$left" "$HERE/bin/mlvpt" train --device cuda --epochs 1 --quiet --out "$run_dir" > "$LOGS/train-cuda.log" 2>&1
    rc=$?
    secs=$(( $(date +%s) - t0 ))
    tail -n 20 "$LOGS/train-cuda.log"
    if [ "$rc" -eq 0 ]; then st=ok; elif [ "$rc" -ge 124 ]; then st=TIMEOUT; status=1; else st=FAILED; status=1; fi
    row "train --device cuda" "$st" - - - "$secs"
    ips=$(sed -n 's/^ *images\/s *//p' "$LOGS/train-cuda.log" | head -n 1)
    map=$(sed -n 's/^ *test mAP *//p' "$LOGS/train-cuda.log" | head -n 1)
    dev=$(sed -n 's/^  device  *//p' "$LOGS/train-cuda.log" | head -n 1)
    echo "  mlvpt train --device cuda --epochs 1 (demo): ${ips:-?} images/s, test mAP ${map:-?}, ${dev:-?}" >> "$TRAIN_TABLE"
  fi
fi

# --- benches --------------------------------------------------------------------------------
BENCH_TABLE="$LOGS/bench-summary.txt"
: > "$BENCH_TABLE"
if [ -z "${MLVPT_GPU_SKIP_BENCH:-}" ]; then
  export CRITERION_HOME=${TMPDIR:-/tmp}/mlvpt-criterion
  # The whole training step first (the headline number), then the per-op benches.
  benches=("$HERE"/benches/gpu_step)
  for b in "$HERE"/benches/*; do [ "$(basename "$b")" = gpu_step ] || benches+=("$b"); done
  for b in "${benches[@]}"; do
    [ -x "$b" ] || continue
    name=$(basename "$b")
    left=$(remaining)
    if [ "$left" -lt 30 ]; then row "bench $name" "SKIPPED" - - - 0; continue; fi
    log "bench $name (timeout ${left}s)"
    t0=$(date +%s)
    timeout --kill-after=5 "$left" "$b" --bench --warm-up-time 0.5 --measurement-time 1 > "$LOGS/bench-$name.log" 2>&1
    rc=$?
    secs=$(( $(date +%s) - t0 ))
    # "group/name  time: [..]  thrpt: [lo mid hi]" -> name, middle time, middle throughput.
    awk '
      /^Benchmarking/ { next }
      /^[^ \t]/ { name = $0; sub(/[ \t]+time:.*/, "", name) }
      /time:/ { t = $0; sub(/.*time: *\[/, "", t); split(t, a, " "); time = a[3] " " a[4] }
      /thrpt:/ { r = $0; sub(/.*thrpt: *\[/, "", r); split(r, a, " "); printf "  %-52s %12s %14s\n", name, time, a[3] " " a[4] }
    ' "$LOGS/bench-$name.log" >> "$BENCH_TABLE"
    if [ "$rc" -ge 124 ]; then st=TIMEOUT; elif [ "$rc" -ne 0 ]; then st=FAILED
    elif grep -q 'bench skipped' "$LOGS/bench-$name.log"; then st=NO-GPU; else st=ok; fi
    row "bench $name" "$st" - - - "$secs"
  done
fi

# --- summary (last) -------------------------------------------------------------------------
{
  echo
  echo "===================== mlvpt GPU run summary ====================="
  echo "GPU: $gpu_name"
  printf '%-28s %-8s %6s %6s %7s %7s\n' step status passed failed ignored time
  cat "$SUMMARY"
  [ -s "$TRAIN_TABLE" ] && cat "$TRAIN_TABLE"
  if [ -s "$BENCH_TABLE" ]; then
    echo "benchmarks (median time, median throughput):"
    cat "$BENCH_TABLE"
  fi
  echo "total $(( $(date +%s) - START ))s; logs in $LOGS; exit $status"
} | tee "$LOGS/summary-final.txt"
# The device tool brings back at most 8 files: pack the per-step logs into one archive.
( cd "$LOGS" && tar czf logs.tar.gz --exclude=logs.tar.gz --exclude=summary-final.txt . &&
  find . -maxdepth 1 -type f ! -name logs.tar.gz ! -name summary-final.txt -delete ) || true
exit $status
