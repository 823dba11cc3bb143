//! mlvpt: ML-VPT multi-label visual prompt tuning.
//!
//! Layout (imports point down only: cli -> train -> backend -> ops -> gpu;
//! model, data, grouping, metrics are ground floor). See `docs/ARCHITECTURE.md`.

pub mod backend;
pub mod contract;
pub mod data;
pub mod grouping;
pub mod io;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod train;
#[cfg(feature = "cuda")]
pub mod gpu;
