//! One file per `mlvpt` subcommand: argument parsing and printing only; the work lives in the library.

pub mod bench_step;
pub mod eval;
pub mod group;
pub mod launch;
pub mod metrics;
#[cfg(feature = "cuda")]
pub mod nccl_lib;
pub mod predict;
pub mod prepare;
pub mod train;

/// Where the work runs (`--device auto|cpu|cuda`).
#[allow(unused_imports)]
pub use mlvpt::backend::{Device, Precision};
