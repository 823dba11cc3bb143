//! Data-parallel training over several processes, one GPU each (`mlvpt train --gpus N`, or
//! one process per rank under torchrun or SLURM): the launch environment ([`mod@env`]), the
//! start-up exchange of the NCCL unique id ([`rendezvous`]), the control links that watch the
//! peers and carry small host collectives ([`control`]), which images each rank takes
//! ([`shard`]) and the gradient exchange between the backward and AdamW ([`sync`]).

pub mod control;
pub mod env;
pub mod job;
pub mod rendezvous;
pub mod shard;
pub mod sync;

pub use env::LaunchEnv;
pub use job::Job;
