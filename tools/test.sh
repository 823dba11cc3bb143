#!/usr/bin/env bash
# The project's test command (README.md names it; .ci/run calls it). Installs what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins
cargo test --release --all-features --lib --bins --tests --examples
cargo test --release --doc
cargo bench --no-run
