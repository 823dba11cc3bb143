//! Data-parallel training over several processes, one GPU each (`mlvpt train --gpus N`, or
//! one process per rank under torchrun or SLURM): the launch environment ([`env`]), the
//! start-up exchange of the NCCL unique id ([`rendezvous`]), the control links that watch the
//! peers and carry small host collectives ([`control`]), which images each rank takes
//! ([`shard`]).

pub mod control;
pub mod env;
pub mod rendezvous;
pub mod shard;
