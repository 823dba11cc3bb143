//! One file per `mlvpt` subcommand: argument parsing and printing only; the work lives in the library.

pub mod eval;
pub mod group;
pub mod metrics;
pub mod predict;
pub mod prepare;
pub mod train;

/// Where the work runs. Only the CPU reference backend exists so far; auto|cuda arrive with
/// the CUDA backend.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
}
