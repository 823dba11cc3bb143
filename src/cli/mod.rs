//! One file per `mlvpt` subcommand: argument parsing and printing only; the work lives in the library.

pub mod group;
pub mod metrics;
