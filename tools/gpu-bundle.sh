#!/usr/bin/env bash
# Builds, here (no GPU needed), what the GPU machine runs: the release test binaries that hold
# GPU tests (tests/gpu_*.rs, the ops' tests/ops/ and the library's unit tests), the GPU benches (benches/gpu_*.rs), the
# embedding examples (examples/embed_*.rs) and `mlvpt`, all with `--features cuda`, stripped, plus tools/gpu-runner.sh and the PyTorch peer's
# scripts (tools/peer/*.py, for the step comparison), in the git-ignored folder bundle/
# (under 64 MiB, the most a device call carries). See docs/GPU.md.
#
#   bash tools/gpu-bundle.sh           # then, on the GPU machine from the repo root:
#                                      #   bash bundle/gpu-runner.sh
# Env: MLVPT_CUDA_ARCH (default 90: the device machines lent here are H100/H200, and SASS for
# one arch keeps the bundle under 64 MiB; every binary embeds all fatbins, and with the four
# archs + PTX of a normal build it is about 67 MiB). MLVPT_CUDA_ARCH= (empty) builds all archs.
set -euo pipefail
export MLVPT_CUDA_ARCH=${MLVPT_CUDA_ARCH-90}
# A real GPU needs no readable PTX (only the virtual device does): compressed fatbins keep the
# bundle small.
export MLVPT_COMPRESS_FATBIN=1
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BUNDLE="$ROOT/bundle"
LIMIT_MIB=64

need() { command -v "$1" >/dev/null 2>&1 || { echo "error: $1 not found ($2)" >&2; exit 1; }; }
need cargo "install Rust"
need python3 "parses cargo's JSON messages"
need strip "binutils"

# The nvcc the toolchain script settles on (a suitable system one or the pinned wheels).
nvcc_line=$(bash tools/install-cuda-toolchain.sh | tail -n 1)
echo "$nvcc_line"
NVCC=${nvcc_line#nvcc: }
export NVCC

# The executables cargo builds, from its JSON messages (one path per line).
executables() {
  python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        t = m["target"]
        print(t["kind"][0], t["name"], m["executable"], sep="\t")
'
}

echo "building (release, --features cuda) ..."
cargo build --release --features cuda --bin mlvpt
tests=$(cargo test --release --features cuda --no-run --lib --tests --message-format=json | executables)
benches=$(cargo bench --features cuda --no-run --message-format=json | executables)
examples=$(cargo build --release --features cuda --examples --message-format=json | executables)

rm -rf "$BUNDLE"
mkdir -p "$BUNDLE/tests" "$BUNDLE/benches" "$BUNDLE/bin" "$BUNDLE/examples"
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
cp "$target_dir/release/mlvpt" "$BUNDLE/bin/mlvpt"
while IFS=$'\t' read -r kind name exe; do
  [ -n "$exe" ] || continue
  case "$kind:$name" in
    lib:*) cp "$exe" "$BUNDLE/tests/lib" ;;
    test:gpu_ptxas) ;;  # a build-time check that reads the sources; CI runs it
    test:gpu_*|test:ops) cp "$exe" "$BUNDLE/tests/$name" ;;
  esac
done <<< "$tests"
while IFS=$'\t' read -r kind name exe; do
  [ -n "$exe" ] || continue
  case "$name" in gpu_*) cp "$exe" "$BUNDLE/benches/$name" ;; esac
done <<< "$benches"
# The embedding examples (each checks its results against the CPU twins and fails if they differ).
while IFS=$'\t' read -r kind name exe; do
  [ -n "$exe" ] || continue
  case "$kind:$name" in example:embed_*) cp "$exe" "$BUNDLE/examples/$name" ;; esac
done <<< "$examples"
[ -n "$(ls "$BUNDLE/tests")" ] || { echo "error: no GPU test binaries were built" >&2; exit 1; }

# Symbols too, not only debug info: every binary embeds all fatbins (~4 MiB), and with the
# symbol tables the bundle reached the 64 MiB limit; panics still print their messages.
strip --strip-all "$BUNDLE"/bin/* "$BUNDLE"/tests/* "$BUNDLE"/benches/* "$BUNDLE"/examples/*
cp tools/gpu-runner.sh "$BUNDLE/gpu-runner.sh"
# The peer (PyTorch + timm on the GPU machine): its step timing and the modules it imports.
mkdir -p "$BUNDLE/peer"
cp tools/peer/*.py "$BUNDLE/peer/"
[ -f "$BUNDLE/peer/step_bench.py" ] || echo "note: tools/peer/step_bench.py is missing: the runner's comparison will time ours only" >&2

# The newest glibc symbol version any binary needs (the GPU machine's glibc must be >= it).
glibc=$(for f in "$BUNDLE"/bin/* "$BUNDLE"/tests/* "$BUNDLE"/benches/* "$BUNDLE"/examples/*; do
          objdump -T "$f" 2>/dev/null | grep -o 'GLIBC_[0-9.]*'; done | sort -t. -k2,2n -k3,3n -u | tail -n 1)

{
  echo "mlvpt GPU bundle"
  echo "built:   $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m)"
  echo "commit:  $(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo ' (with uncommitted changes)')"
  echo "$nvcc_line"
  echo "arch:    ${MLVPT_CUDA_ARCH:-sm_80 sm_86 sm_89 sm_90 + compute_90 PTX}"
  echo "glibc:   needs ${glibc:-unknown}"
  echo "files:"
  (cd "$BUNDLE" && find . -type f ! -name MANIFEST.txt | sort | while read -r f; do
     printf '  %-32s %8d KiB\n' "${f#./}" $(( $(stat -c %s "$f") / 1024 )); done)
} > "$BUNDLE/MANIFEST.txt"
cat "$BUNDLE/MANIFEST.txt"

size=$(du -sb "$BUNDLE" | cut -f1)
echo "bundle: $BUNDLE, $(( size / 1024 / 1024 )) MiB"
if [ "$size" -ge $(( LIMIT_MIB * 1024 * 1024 )) ]; then
  echo "error: the bundle is over ${LIMIT_MIB} MiB; try MLVPT_CUDA_ARCH=90" >&2
  exit 1
fi
