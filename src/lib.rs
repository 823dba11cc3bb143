//! mlvpt: ML-VPT multi-label visual prompt tuning.
//!
//! Layout (imports point down only: cli -> train -> backend -> ops -> gpu;
//! model, data, grouping, metrics are ground floor). See `docs/ARCHITECTURE.md`.
//!
//! Features: `train` (default) is the application: model, training, data, grouping, metrics
//! and the CLI's pieces. Without it the crate is [`ops`] (each op's contract and CPU twin),
//! [`contract`] (what the kernels and their launchers share) and, with `cuda`, `gpu` and the
//! ops' CUDA launchers, for other projects to embed (README.md, "Embedding the kernels").

// docs.rs (Cargo.toml's `rustdoc-args`): each item shows the features it needs.
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "train")]
pub mod backend;
pub mod contract;
#[cfg(feature = "train")]
pub mod data;
#[cfg(feature = "train")]
pub mod dist;
#[cfg(feature = "cuda")]
pub mod gpu;
#[cfg(feature = "train")]
pub mod grouping;
#[cfg(feature = "train")]
pub mod io;
#[cfg(feature = "train")]
pub mod metrics;
#[cfg(feature = "train")]
pub mod model;
pub mod ops;
#[cfg(feature = "train")]
pub mod train;
