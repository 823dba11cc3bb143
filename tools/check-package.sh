#!/usr/bin/env bash
# The crate as `cargo publish` would upload it (Cargo.toml's `include`): packs it, fails if it is
# over crates.io's 10 MiB, then builds the unpacked crate on its own, outside this repository,
# with its default features and `cuda` (kernels for one GPU arch): library, binary and examples,
# so a file the build needs but `include` leaves out shows up here. tools/test.sh runs it. The full build
# (`cargo package --allow-dirty --features cuda`, every arch) takes about 3 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
if [ -z "${NVCC:-}" ]; then
  NVCC=$(bash tools/install-cuda-toolchain.sh | sed -n 's/^nvcc: //p')
fi
export NVCC
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"
export MLVPT_CUDA_ARCH="${MLVPT_CUDA_ARCH:-90}"
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
crate="$CARGO_TARGET_DIR/package/mlvpt-$version.crate"

# Tests and benches are left out on purpose; cargo says so once per target.
cargo package --allow-dirty --no-verify --offline 2>&1 | { grep -v '^warning: ignoring \(test\|benchmark\) ' || true; }
size=$(stat -c %s "$crate")
echo "package: $crate, $((size / 1024)) KiB, $(tar tzf "$crate" | wc -l) files"
if [ "$size" -gt $((10 * 1024 * 1024)) ]; then
  echo "error: the package is over crates.io's 10 MiB limit; biggest files:" >&2
  tar tvzf "$crate" | sort -k3 -n -r | head -n 10 >&2
  exit 1
fi

# Unpacked outside the repository, so cargo does not take it for a member of this workspace.
unpacked=$(mktemp -d)
trap 'rm -rf "$unpacked"' EXIT
tar xzf "$crate" -C "$unpacked"
cargo build --release --offline --locked --manifest-path "$unpacked/mlvpt-$version/Cargo.toml" --features cuda --lib --bins --examples
