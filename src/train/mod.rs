//! Training: the step (forward, loss, backward, AdamW) written once for any backend, and
//! (from the training driver) schedule, EMA, the epoch loop and checkpoints.

pub mod bench;
pub mod checkpoint;
pub mod ema;
pub mod flops;
mod layers;
pub mod peak;
pub mod preset;
pub mod run;
pub mod schedule;
pub mod step;
mod tensors;

pub use step::{AdamWConfig, Crops, GradSync, Shard, Staged, Trainer};
