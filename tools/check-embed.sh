#!/usr/bin/env bash
# The kernels as a library (README.md, "Embedding the kernels"): tools/embed-check is a crate
# outside the workspace that depends on mlvpt with `default-features = false, features =
# ["cuda"]`. Fails if its normal dependency tree holds any crate of the `train` feature (the
# application's: clap, image, rayon, gemm, nalgebra, ...), then `cargo check`s it. tools/test.sh
# runs it; it also runs alone.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
manifest=tools/embed-check/Cargo.toml
if [ -z "${NVCC:-}" ]; then
  NVCC=$(bash tools/install-cuda-toolchain.sh | sed -n 's/^nvcc: //p')
fi
export NVCC
# The root target dir (its own feature set gives its own artifacts there). The check needs the
# kernels to compile, not SASS for every GPU: one architecture keeps nvcc short.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"
export MLVPT_CUDA_ARCH="${MLVPT_CUDA_ARCH:-90}"
# The root's lock pins the versions (cargo drops what this crate does not use).
cp Cargo.lock tools/embed-check/Cargo.lock

tree=$(cargo tree --manifest-path "$manifest" -e normal --prefix none --format '{p}' | sed 's/ (\*)$//' | sort -u)
# What `train` adds (Cargo.toml); also their families (rayon-core, gemm-common, clap_builder, ...).
# rand is not here: cudarc's `f16` brings it through half's rand_distr.
heavy='clap|image|rayon|gemm|nalgebra|anyhow|serde|serde_json|safetensors|sha2|roxmltree|memmap2|crc32fast|font8x8|indicatif'
if bad=$(grep -E "^($heavy)([-_][A-Za-z0-9_-]*)? v" <<<"$tree"); then
  echo "error: the embedded build (default-features = false, features = [\"cuda\"]) pulls in:" >&2
  sed 's/^/  /' <<<"$bad" >&2
  for crate in $(grep -E "^($heavy) v" <<<"$bad" | awk '{print $1}' | sort -u); do
    echo "-- what brings $crate:" >&2
    cargo tree --manifest-path "$manifest" -e normal -i "$crate" >&2 || true
  done
  exit 1
fi
echo "embed-check: $(wc -l <<<"$tree") crates in the normal dependency tree, none of the application's:"
awk '{print $1}' <<<"$tree" | sort -u | paste -sd ' ' | fold -s -w 96 | sed 's/^/  /'

cargo check --manifest-path "$manifest"
