#!/usr/bin/env bash
# Runs the GPU bundle (tools/gpu-bundle.sh) on a machine with an NVIDIA GPU and no Rust: finds
# libcuda and libcublas, prints the GPU, runs every bundled test binary with its ignored (GPU)
# tests included, compute-sanitizer's racecheck and memcheck over every attention kernel and
# every head kernel, a
# one-epoch `mlvpt train --device cuda` on the demo, the training-step comparison with the
# PyTorch/timm peer on the same card (`mlvpt bench-step` against peer/step_bench.py, eager and
# torch.compile), then the benches in a short mode (PyTorch's attention kernels right after
# ours), and, while time is left, the step again with each alternative pair of attention
# kernels and with the fp32 head kernels. Writes one log per step into $OUT (or $MLVPT_GPU_LOGS, else bundle/logs) and prints
# a summary table last.
# Exits non-zero when a test fails, our step benchmark fails or a library is missing.
# Budget: under 8 minutes (MLVPT_GPU_BUDGET_S, default 450 s).
#
#   bash bundle/gpu-runner.sh                 # from the repo root, bundle/ carried
#   MLVPT_GPU_SKIP_BENCH=1 bash bundle/gpu-runner.sh
#   MLVPT_GPU_SKIP_PEER=1 bash bundle/gpu-runner.sh     # ours only in the step comparison
#   MLVPT_GPU_SKIP_SANITIZER=1 bash bundle/gpu-runner.sh  # no compute-sanitizer pass
#   MLVPT_GPU_FOCUS=attention bash bundle/gpu-runner.sh   # only what tunes the fused attention
#   MLVPT_GPU_FOCUS=head bash bundle/gpu-runner.sh        # only what measures the head kernels
#   bash tools/gpu-runner.sh --compare-table FILE       # the comparison table of JSON lines, only
set -uo pipefail

# --- the step comparison table ------------------------------------------------------------------
# One field of a flat one-line JSON object (serde's `"k":v` or Python's `"k": v`); strings
# unquoted, empty when absent.
json_field() {
  local s
  s=$(sed -n 's/.*"'"$2"'": *"\(\([^"\\]\|\\.\)*\)".*/\1/p' <<< "$1" | head -n 1)
  [ -n "$s" ] || s=$(sed -n 's/.*"'"$2"'": *\([-+0-9.eE][-+0-9.eE]*\).*/\1/p' <<< "$1" | head -n 1)
  sed 's/\\\(.\)/\1/g' <<< "$s"
}

# Prints the comparison of the JSON lines in FILE (ours: impl mlvpt-*, the peer's:
# torch-eager-*, torch-compile-*; a line with an "error" key shows the error): images/s,
# ms/step and TFLOP/s (ours: against the FLOPs our step needs) per implementation, then the
# ratios ours/eager and ours/compile of images per second.
compare_table() {
  local file=$1 line impl ips ms tf err model batch ours="" eager="" compiled=""
  echo "training step, same card (images/s; ratio = ours / peer):"
  printf '  %-34s %10s %10s %8s\n' impl images/s ms/step TFLOP/s
  while IFS= read -r line; do
    case "$line" in "{"*) ;; *) continue ;; esac
    impl=$(json_field "$line" impl); ips=$(json_field "$line" images_per_s)
    ms=$(json_field "$line" ms_per_step); tf=$(json_field "$line" tflops); err=$(json_field "$line" error)
    model=$(json_field "$line" model); batch=$(json_field "$line" batch)
    if [ -n "$err" ] || [ -z "$ips" ]; then
      # The first 150 characters (the log has the rest).
      printf '  %-34s %s\n' "${impl:-?}" "error: $(cut -c1-150 <<< "${err:-no images_per_s}")"
      continue
    fi
    printf '  %-34s %10.1f %10.2f %8s   (%s, batch %s)\n' "$impl" "$ips" "${ms:-0}" "${tf:+$(printf '%.1f' "$tf")}" "${model:-?}" "${batch:-?}"
    case "$impl" in
      mlvpt-*) ours=$ips ;;
      torch-eager*) eager=$ips ;;
      torch-compile*) compiled=$ips ;;
    esac
  done < "$file"
  ratio() { if [ -n "$1" ] && [ -n "$2" ]; then awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "n/a" }'; else echo n/a; fi; }
  printf '  %-34s %10s\n' "ours / torch eager (target 1.5x)" "$(ratio "$ours" "$eager")"
  printf '  %-34s %10s\n' "ours / torch.compile (target >1x)" "$(ratio "$ours" "$compiled")"
}

if [ "${1:-}" = --compare-table ]; then
  [ -r "${2:-}" ] || { echo "usage: $0 --compare-table FILE_OF_JSON_LINES" >&2; exit 2; }
  compare_table "$2"
  exit 0
fi

FOCUS=${MLVPT_GPU_FOCUS:-}
case "$FOCUS" in ""|attention|head) ;; *) echo "MLVPT_GPU_FOCUS: unknown '$FOCUS' (expected attention or head)" >&2; exit 2 ;; esac

HERE=$(cd "$(dirname "$0")" && pwd)
# tests/gpu_train_cli.rs runs the bundle's mlvpt.
export MLVPT_BIN="$HERE/bin/mlvpt"
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
# The peer (PyTorch) keeps the library path it was given: it brings its own CUDA libraries.
PEER_LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}
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
# MLVPT_GPU_FOCUS=attention: only what decides the fused attention's defaults (its tests and
# sanitizer pass, our step, the attention bench with PyTorch's kernels, the step per
# alternative pair), for a short device session. MLVPT_GPU_FOCUS=head: the head's tests and
# sanitizer pass, our step, the head bench (with its copy peer), the step per head kernel set.
# focus_skips NAME: true when the focus leaves out the test or bench binary NAME. The ops'
# tests are one binary (`ops`, tests/ops/): a focus runs only its op's module there.
focus_skips() {
  case "$FOCUS" in
    attention) [ "$1" != gpu_attention ] && [ "$1" != ops ] ;;
    head) [ "$1" != gpu_head ] && [ "$1" != ops ] ;;
    *) return 1 ;;
  esac
}
# Tests and the training run leave this much of the budget to the step comparison, the
# headline number (ours ~30 s, the peer's eager ~60 s and compiled ~150 s on an H100).
COMPARE_RESERVE=${MLVPT_GPU_COMPARE_RESERVE_S:-180}
[ -x "$HERE/bin/mlvpt" ] || COMPARE_RESERVE=0
before_compare() { local l=$(( $(remaining) - COMPARE_RESERVE )); echo $(( l < 0 ? 0 : l )); }

# --- tests ----------------------------------------------------------------------------------
for t in "$HERE"/tests/*; do
  [ -x "$t" ] || continue
  name=$(basename "$t")
  focus_skips "$name" && continue
  left=$(before_compare)
  if [ "$left" -lt 20 ]; then row "test $name" "SKIPPED" - - - 0; status=1; continue; fi
  # The library's unit tests are mostly CPU tests (CI runs them): only its GPU/CUDA ones here.
  args=(--include-ignored)
  [ "$name" = lib ] && args+=(gpu cuda)
  [ "$name" = ops ] && [ -n "$FOCUS" ] && args+=("$FOCUS::")
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

# --- the embedding examples (another program's use of the kernels, checked against the CPU) ----
for ex in "$HERE"/examples/*; do
  [ -x "$ex" ] || continue
  name=$(basename "$ex")
  [ -n "$FOCUS" ] && continue
  left=$(before_compare); cap=60; [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -lt 10 ]; then row "example $name" "SKIPPED" - - - 0; status=1; continue; fi
  log "example $name (timeout ${cap}s)"
  t0=$(date +%s)
  timeout --kill-after=5 "$cap" "$ex" > "$LOGS/example-$name.log" 2>&1
  rc=$?
  tail -n 12 "$LOGS/example-$name.log"
  if [ "$rc" -eq 0 ]; then st=ok; elif [ "$rc" -ge 124 ]; then st=TIMEOUT; status=1; else st=FAILED; status=1; fi
  row "example $name" "$st" - - - "$(( $(date +%s) - t0 ))"
done

# --- compute-sanitizer on the tensor-core kernels (shared-memory races, out-of-bounds accesses) --
# The real hardware's own checks, beside the models of them the virtual device (tools/vgpu) runs
# on the CPU. One small test per op (attention, head; binary tests/ops) launches every compiled
# attention kernel, every head kernel of both sets.
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1 || true)
for target in ops:attention::gpu::attention_every_kernel_small ops:head::gpu::head_every_kernel_small; do
  bin=${target%%:*}; test=${target#*:}; what=${test%%::*}
  [ -n "$FOCUS" ] && [ "$what" != "$FOCUS" ] && continue
  if [ -n "${MLVPT_GPU_SKIP_SANITIZER:-}" ]; then
    row "sanitizer $what" "SKIPPED" - - - 0; continue
  elif [ -z "$sanitizer" ] || [ ! -x "$HERE/tests/$bin" ]; then
    row "sanitizer $what" "MISSING" - - - 0; continue
  fi
  for tool in racecheck memcheck; do
    left=$(before_compare); cap=${MLVPT_GPU_SANITIZER_S:-90}; [ "$left" -lt "$cap" ] && cap=$left
    if [ "$cap" -lt 20 ]; then row "sanitizer $tool $what" "SKIPPED" - - - 0; continue; fi
    log "$sanitizer --tool $tool $bin $test (timeout ${cap}s)"
    t0=$(date +%s)
    timeout --kill-after=5 "$cap" "$sanitizer" --tool "$tool" --error-exitcode 3 \
      "$HERE/tests/$bin" --include-ignored --exact "$test" > "$LOGS/sanitizer-$tool-$what.log" 2>&1
    rc=$?
    tail -n 8 "$LOGS/sanitizer-$tool-$what.log"
    if [ "$rc" -eq 0 ]; then st=ok; elif [ "$rc" -ge 124 ]; then st=TIMEOUT; status=1; else st=FAILED; status=1; fi
    row "sanitizer $tool $what" "$st" - - - "$(( $(date +%s) - t0 ))"
  done
done

# --- a short training run on the GPU (the embedded demo, one epoch) ------------------------------
TRAIN_TABLE="$LOGS/train-summary.txt"
: > "$TRAIN_TABLE"
if [ -x "$HERE/bin/mlvpt" ] && [ -z "$FOCUS" ]; then
  left=$(before_compare)
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

# --- the training step against the PyTorch/timm peer on this card -------------------------------
# Ours (`mlvpt bench-step`) and the peer (tools/peer/step_bench.py: timm ViT-B/16 with the same
# prompts and head, bf16 autocast, eager and torch.compile) at ViT-B/16 224, batch 128, 3
# warm-up and 10 timed steps, one after the other; each capped in time. JSON lines to
# $LOGS/step-compare.jsonl, the table into the summary.
COMPARE_JSON="$LOGS/step-compare.jsonl"
COMPARE_TABLE="$LOGS/compare-summary.txt"
: > "$COMPARE_JSON"; : > "$COMPARE_TABLE"
STEP_ARGS=(--batch "${MLVPT_COMPARE_BATCH:-128}" --warmup 3 --steps 10 --json)
# Runs "$@" with a time cap of min($1, what is left), appending its JSON lines; sets rc, secs.
capped_json() {
  local cap=$1 log=$2; shift 2
  local left; left=$(remaining)
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -lt 15 ]; then rc=125; secs=0; echo "skipped: ${left}s left" > "$log"; return; fi
  log "$* (timeout ${cap}s)"
  local t0; t0=$(date +%s)
  timeout --kill-after=5 "$cap" "$@" > "$log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - t0 ))
  tail -n 5 "$log"
  grep '^{' "$log" >> "$COMPARE_JSON"
}
step_status() { if [ "$rc" -eq 0 ]; then echo ok; elif [ "$rc" -eq 125 ]; then echo SKIPPED; elif [ "$rc" -ge 124 ]; then echo TIMEOUT; else echo FAILED; fi; }
if [ -x "$HERE/bin/mlvpt" ]; then
  capped_json "${MLVPT_COMPARE_OURS_S:-120}" "$LOGS/bench-step-ours.log" \
    "$HERE/bin/mlvpt" bench-step --device cuda --model vit-b16 "${STEP_ARGS[@]}"
  st=$(step_status); [ "$st" = ok ] || status=1
  row "bench-step (ours)" "$st" - - - "$secs"
  grep -q '^{' "$LOGS/bench-step-ours.log" ||
    echo "{\"impl\": \"mlvpt\", \"error\": \"$st: $(grep -m1 '^error' "$LOGS/bench-step-ours.log" | tr -d '"\\')\"}" >> "$COMPARE_JSON"

  # The peer: its script in the bundle (else the repository's), a python that imports torch.
  peer=""
  for f in "$HERE/peer/step_bench.py" "$HERE/../tools/peer/step_bench.py"; do [ -f "$f" ] && { peer=$f; break; }; done
  py=""
  for c in "${MLVPT_PEER_PYTHON:-}" /opt/torch/.venv/bin/python $(command -v python3 python 2>/dev/null); do
    [ -n "$c" ] && [ -x "$c" ] || continue
    if LD_LIBRARY_PATH=$PEER_LD_LIBRARY_PATH timeout 60 "$c" -c 'import torch' > /dev/null 2>&1; then py=$c; break; fi
  done
  if [ -n "${MLVPT_GPU_SKIP_PEER:-}" ] || [ -n "$FOCUS" ]; then
    row "peer step" "SKIPPED" - - - 0
  elif [ -z "$peer" ] || [ -z "$py" ]; then
    log "peer: ${peer:-no step_bench.py}, ${py:-no python with torch}"
    row "peer step" "MISSING" - - - 0
    echo "{\"impl\": \"torch\", \"error\": \"peer not run: ${peer:-no peer/step_bench.py} ${py:-no python with torch}\"}" >> "$COMPARE_JSON"
  else
    log "peer: $py $peer ($(LD_LIBRARY_PATH=$PEER_LD_LIBRARY_PATH "$py" -c 'import torch; print("torch", torch.__version__)' 2>&1 | tail -n 1))"
    # One process per mode, so a slow compile cannot take the eager figure with it.
    for mode in eager compile; do
      if [ "$mode" = eager ]; then cap=${MLVPT_COMPARE_EAGER_S:-120}; else cap=${MLVPT_COMPARE_COMPILE_S:-240}; fi
      LD_LIBRARY_PATH=$PEER_LD_LIBRARY_PATH HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 \
        TORCHINDUCTOR_CACHE_DIR=${TMPDIR:-/tmp}/mlvpt-inductor \
        capped_json "$cap" "$LOGS/peer-$mode.log" \
        "$py" "$peer" --model vit_base_patch16_224 --device cuda --mode "$mode" "${STEP_ARGS[@]}"
      st=$(step_status)
      row "peer step $mode" "$st" - - - "$secs"
      grep -q '^{' "$LOGS/peer-$mode.log" ||
        echo "{\"impl\": \"torch-$mode\", \"error\": \"$st (log peer-$mode.log)\"}" >> "$COMPARE_JSON"
    done
  fi
  compare_table "$COMPARE_JSON" > "$COMPARE_TABLE"
  cat "$COMPARE_TABLE"
fi

# --- benches --------------------------------------------------------------------------------
BENCH_TABLE="$LOGS/bench-summary.txt"
: > "$BENCH_TABLE"
# Right after our attention bench: PyTorch's attention kernels (FlashAttention-2, the
# memory-efficient kernel with the prompt mask, cuDNN, then the compiled FlexAttention with the
# prompt mask) at the same shapes on the same card (peer/attention_bench.py), one line each
# into the bench table.
attention_peer() {
  local apeer="" f
  for f in "$HERE/peer/attention_bench.py" "$HERE/../tools/peer/attention_bench.py"; do [ -f "$f" ] && { apeer=$f; break; }; done
  if [ -n "${MLVPT_GPU_SKIP_PEER:-}" ]; then row "peer attention" "SKIPPED" - - - 0; return; fi
  if [ -z "${py:-}" ] || [ -z "$apeer" ]; then row "peer attention" "MISSING" - - - 0; return; fi
  local cap=${MLVPT_ATTENTION_PEER_S:-60} left; left=$(remaining)
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -lt 15 ]; then row "peer attention" "SKIPPED" - - - 0; return; fi
  log "peer attention: $py $apeer (timeout ${cap}s)"
  local t0; t0=$(date +%s)
  LD_LIBRARY_PATH=$PEER_LD_LIBRARY_PATH PYTHONUNBUFFERED=1 timeout --kill-after=5 "$cap" \
    "$py" "$apeer" --device cuda > "$LOGS/attention-peer.log" 2>&1
  local rc=$? st
  sed -n 's/^torch-sdpa/  torch-sdpa/p' "$LOGS/attention-peer.log" | tee -a "$BENCH_TABLE"
  if [ "$rc" -eq 0 ]; then st=ok; elif [ "$rc" -ge 124 ]; then st=TIMEOUT; else st=FAILED; fi
  row "peer attention" "$st" - - - "$(( $(date +%s) - t0 ))"
}
if [ -z "${MLVPT_GPU_SKIP_BENCH:-}" ]; then
  export CRITERION_HOME=${TMPDIR:-/tmp}/mlvpt-criterion
  # The whole training step first (the headline number), then the per-op benches.
  benches=("$HERE"/benches/gpu_step)
  for b in "$HERE"/benches/*; do [ "$(basename "$b")" = gpu_step ] || benches+=("$b"); done
  for b in "${benches[@]}"; do
    [ -x "$b" ] || continue
    name=$(basename "$b")
    focus_skips "$name" && continue
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
    # The benches' own summary lines (attention: TFLOP/s and "x the default"; head: GiB/s, % of
    # the copy peer, "x the fp32 kernels").
    # (Criterion's own result lines start with the group name too: match the summaries' words.)
    grep -E '^attention .*TFLOP/s|^head .*% of the copy|^head copy peer:' "$LOGS/bench-$name.log" | sed 's/^/  /' >> "$BENCH_TABLE"
    if [ "$rc" -ge 124 ]; then st=TIMEOUT; elif [ "$rc" -ne 0 ]; then st=FAILED
    elif grep -q 'bench skipped' "$LOGS/bench-$name.log"; then st=NO-GPU; else st=ok; fi
    row "bench $name" "$st" - - - "$secs"
    [ "$name" = gpu_attention ] && attention_peer
  done
fi

# step_variant ROW LOG LABEL TABLE FLAG...: our step (`bench-step (ours)`) again with FLAG...,
# capped in time; its images/s under LABEL in TABLE, its status as ROW of the summary.
step_variant() {
  local row_name=$1 logf=$2 label=$3 table=$4; shift 4
  local left cap t0 rc ips st
  left=$(remaining); cap=${MLVPT_COMPARE_OURS_S:-120}; [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -lt 20 ]; then row "$row_name" "SKIPPED" - - - 0; return; fi
  log "mlvpt bench-step $* (timeout ${cap}s)"
  t0=$(date +%s)
  timeout --kill-after=5 "$cap" "$HERE/bin/mlvpt" bench-step --device cuda --model vit-b16 "${STEP_ARGS[@]}" "$@" > "$LOGS/$logf" 2>&1
  rc=$?
  ips=$(json_field "$(grep -m1 '^{' "$LOGS/$logf")" images_per_s)
  printf '  %-44s %10s\n' "$label" "${ips:-error (log $logf)}" >> "$table"
  if [ "$rc" -eq 0 ]; then st=ok; elif [ "$rc" -ge 124 ]; then st=TIMEOUT; else st=FAILED; fi
  row "$row_name" "$st" - - - "$(( $(date +%s) - t0 ))"
}

# variant_table TABLE WHAT LABEL: starts TABLE with our default step's images/s under LABEL.
variant_table() {
  local ours_ips
  ours_ips=$(json_field "$(grep -m1 '^{' "$LOGS/bench-step-ours.log" 2>/dev/null)" images_per_s)
  echo "training step by $2 (vit-b16, images/s):" >> "$1"
  printf '  %-44s %10s\n' "$3" "${ours_ips:-?}" >> "$1"
}

# --- the training step with the alternative fused attention kernels -----------------------------
# The step of `bench-step (ours)` again with each alternative pair of attention kernels
# (`mlvpt bench-step --attention-kernels FWD,BWD`), while time is left: which pair the
# launcher's defaults should be (src/ops/attention/mod.rs, FWD_TILES and BWD_TILES).
VARIANTS_TABLE="$LOGS/attention-step-summary.txt"
: > "$VARIANTS_TABLE"
if [ -x "$HERE/bin/mlvpt" ] && [ -z "${MLVPT_GPU_SKIP_BENCH:-}" ] && [ "$FOCUS" != head ]; then
  variant_table "$VARIANTS_TABLE" "fused attention kernels" "default (attn_fwd_d64, attn_bwd_d64)"
  i=0
  for pair in ${MLVPT_GPU_ATTENTION_VARIANTS:-attn_fwd_d64_r64,attn_bwd_d64_q32 attn_fwd_d64_r64p,attn_bwd_d64_k128 attn_fwd_d64_r64p,attn_bwd_d64_split}; do
    i=$((i + 1))
    step_variant "step attention variant $i" "bench-step-attention-$i.log" "$pair" "$VARIANTS_TABLE" --attention-kernels "$pair"
  done
fi

# --- the training step with the fp32 head kernels -------------------------------------------------
# The step of `bench-step (ours)` (tensor-core adapter and MoE kernels, the default) again with
# the fp32 CUDA-core ones (`--head-kernels fp32`): whether the default should stay (HeadKernels).
HEAD_TABLE="$LOGS/head-step-summary.txt"
: > "$HEAD_TABLE"
if [ -x "$HERE/bin/mlvpt" ] && [ -z "${MLVPT_GPU_SKIP_BENCH:-}" ] && [ "$FOCUS" != attention ]; then
  variant_table "$HEAD_TABLE" "head kernels" "default (mma)"
  step_variant "step head fp32" "bench-step-head-fp32.log" "fp32" "$HEAD_TABLE" --head-kernels fp32
fi

# --- summary (last) -------------------------------------------------------------------------
{
  echo
  echo "===================== mlvpt GPU run summary ====================="
  echo "GPU: $gpu_name"
  printf '%-28s %-8s %6s %6s %7s %7s\n' step status passed failed ignored time
  cat "$SUMMARY"
  [ -s "$TRAIN_TABLE" ] && cat "$TRAIN_TABLE"
  [ -s "$COMPARE_TABLE" ] && cat "$COMPARE_TABLE"
  [ -s "$VARIANTS_TABLE" ] && cat "$VARIANTS_TABLE"
  [ -s "$HEAD_TABLE" ] && cat "$HEAD_TABLE"
  if [ -s "$BENCH_TABLE" ]; then
    echo "benchmarks (median time, median throughput):"
    cat "$BENCH_TABLE"
  fi
  echo "total $(( $(date +%s) - START ))s; logs in $LOGS; exit $status"
} | tee "$LOGS/summary-final.txt"
# The device tool brings back at most 8 files: pack the per-step logs into one archive.
# (Written elsewhere first: tar complains when the folder it reads changes under it.)
tmp_tar=${TMPDIR:-/tmp}/mlvpt-logs.$$.tar.gz
( cd "$LOGS" && tar czf "$tmp_tar" --exclude=logs.tar.gz --exclude=summary-final.txt . && mv "$tmp_tar" logs.tar.gz &&
  find . -maxdepth 1 -type f ! -name logs.tar.gz ! -name summary-final.txt -delete ) || true
exit $status
