//! Training: the step (forward, loss, backward, optimizer) written once for any backend, and
//! around it the schedule, EMA, the epoch loop and checkpoints.

pub mod checkpoint;
pub mod ema;
pub mod run;
pub mod schedule;
