#!/usr/bin/env bash
# The project's test command (README.md names it; .ci/run calls it). Installs what it needs.
# Without a GPU (CI) the `cuda` feature still builds: every kernel compiles with nvcc and the
# ptxas spill check runs; the GPU tests are #[ignore]d (tools/gpu-bundle.sh runs them on a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
# nvcc for the `cuda` feature: a suitable system one, or the pinned CUDA 13.0 wheels in .toolchain/.
NVCC=$(bash tools/install-cuda-toolchain.sh | sed -n 's/^nvcc: //p')
export NVCC
# The default build (no CUDA) must keep working.
cargo build --release --bins
cargo test --release --all-features --lib --bins --tests --examples
# --all-features: the CUDA launchers' doc examples compile too (they are no_run).
cargo test --release --doc --all-features
cargo bench --no-run --all-features
