//! Every op's tests, one file per op (`tests/ops/<op>.rs` for `src/ops/<op>`): the CPU twin
//! against its definition and finite differences, and, with `--features cuda`, the kernels
//! against the CPU twin (`#[ignore]`d: they need a device, a GPU or the virtual one of
//! tools/vgpu; tools/test.sh runs them on the latter, tools/gpu-runner.sh on a GPU).
//!
//! One test binary rather than one per op: every binary that launches kernels embeds all
//! fatbins (about 3 MiB stripped), and the GPU bundle (tools/gpu-bundle.sh) must stay under
//! 64 MiB. One op's tests: `cargo test --release --all-features --test ops -- attention::
//! --include-ignored`. Without `cuda`, `fast-cpu` and `train` the CPU checks still build
//! (tools/test.sh runs them so, on the sequential twins).

mod common;
#[cfg(feature = "cuda")]
#[path = "../gpu_common/mod.rs"]
mod gpu_common;

mod adamw;
mod asl;
mod attention;
mod augment;
mod cast;
mod gelu;
mod head;
mod layernorm;
mod linear;
mod real;
mod tokens;
