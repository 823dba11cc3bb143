#!/usr/bin/env bash
# The project's test command (README.md names it; .ci/run calls it). Installs what it needs.
# Without a GPU (CI) the CUDA path still runs: every kernel compiles with nvcc (ptxas spill
# check included), and the virtual CUDA device of tools/vgpu (libcuda.so/libcublas.so that
# interpret the kernels' PTX on the CPU under sanitizer checks) runs every GPU test
# (`#[ignore = "requires a CUDA device"]`), the GPU doc examples, examples/ and a short
# `mlvpt train --device cuda` against the CPU run. On a GPU, tools/gpu-bundle.sh runs the same
# tests on the card.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n== %s (%s)\n' "$1" "$(date -u +%T)"; }
# nvcc for the `cuda` feature: a suitable system one, or the pinned CUDA 13.0 wheels in .toolchain/.
NVCC=$(bash tools/install-cuda-toolchain.sh | sed -n 's/^nvcc: //p')
export NVCC

step "formatting (rustfmt.toml; cargo fmt --all fixes it)"
# rustfmt and clippy come with the toolchain; a minimal rustup profile may lack them.
if command -v rustup >/dev/null 2>&1; then
  rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
fi
cargo fmt --all --check
(cd tools/embed-check && cargo fmt --check)

step "default build (no CUDA)"
cargo build --release --bins

step "the virtual CUDA device: build and its own tests (PTX, driver, cuBLAS, each check on broken kernels)"
VGPU_LIB=$(bash tools/vgpu/install.sh | sed -n 's/^vgpu: //p')
cargo test --release -p vgpu

# From here on cudarc finds the virtual device's libcuda.so/libcublas.so.
export LD_LIBRARY_PATH="$VGPU_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# Data-parallel training (tests/dist_cli.rs, tests/gpu_dist.rs) runs its ranks as processes; the
# GPU ones see VGPU_DEVICE_COUNT=2 virtual GPUs and the virtual device's libnccl.so (install.sh links it).
step "every test, GPU tests included (on the virtual device)"
cargo test --release --all-features --lib --bins --tests --examples -- --include-ignored

step "the CUDA backend and training again with stream-ordered allocation, as an H100 reports it (VGPU_MEMORY_POOLS=1: frees are cuMemFreeAsync on their stream, checked by streamcheck)"
VGPU_MEMORY_POOLS=1 cargo test --release --all-features --test gpu_backend --test gpu_train_cli --test gpu_dist -- --include-ignored --skip cuda_the_demo

step "clippy, warnings as errors (every target, every feature)"
cargo clippy --release --all-targets --all-features -- -D warnings

step "doc tests (the CUDA launchers' examples run on the virtual device)"
cargo test --release --doc --all-features

step "rustdoc builds warning-free (broken intra-doc links and the like fail)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --all-features

step "examples on the virtual device"
for ex in examples/*.rs; do
  cargo run --release --all-features --example "$(basename "$ex" .rs)"
done

step "the kernels as a library: a crate with default-features = false, features = [\"cuda\"] (tools/check-embed.sh)"
bash tools/check-embed.sh
# Its CPU twins without rayon and the gemm crate (sequential, the plain matmul) against finite
# differences and the definition (tests/ops: the GPU cases compile out without `cuda`).
cargo test --release --no-default-features --lib --test ops

step "the published crate: packs, fits crates.io, builds alone with default features and cuda (tools/check-package.sh)"
bash tools/check-package.sh

step "benches compile"
cargo bench --no-run --all-features
