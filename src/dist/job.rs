//! One rank's handle on a data-parallel job: its place ([`LaunchEnv`]), the control links to
//! the other ranks and the NCCL unique id they share (CUDA), made by the start-up exchange.

use std::time::{Duration, Instant};

use anyhow::Context;

use super::control::Control;
use super::env::LaunchEnv;
use super::rendezvous::{self, PAYLOAD};

/// How long a process whose peer failed may take to stop by itself before it is ended (see
/// [`super::control`]).
pub const EXIT_GRACE: Duration = Duration::from_secs(10);

/// A started data-parallel job, seen from one rank.
pub struct Job {
    pub env: LaunchEnv,
    pub control: Control,
    /// The NCCL unique id, when the job runs on CUDA.
    pub nccl_id: Option<[u8; PAYLOAD]>,
    /// The longest wait for a peer: at start-up and in every collective.
    pub timeout: Duration,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("env", &self.env)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Job {
    /// The start-up exchange: rank 0 listens on the master address until every rank joined and
    /// hands out `nccl_id` (`Some` on rank 0 when the job runs on CUDA); the others connect and
    /// receive it. `token` identifies the job (the same settings on every rank). Errors after
    /// `timeout`.
    pub fn start(env: LaunchEnv, token: u64, nccl_id: Option<[u8; PAYLOAD]>, cuda: bool, timeout: Duration) -> anyhow::Result<Self> {
        let deadline = Instant::now() + timeout;
        let (streams, id) = if env.rank == 0 {
            let listener = rendezvous::bind(&env.listen_addr())?;
            let payload = nccl_id.unwrap_or([0; PAYLOAD]);
            let joined = rendezvous::host(listener, env.world, token, &payload, deadline, &mut |m| eprintln!("warning: {m}"))?;
            let streams = joined.into_iter().enumerate().filter_map(|(r, s)| s.map(|s| (r, s))).collect();
            (streams, nccl_id)
        } else {
            let (payload, s) = rendezvous::join(&env.master(), env.rank, env.world, token, deadline)?;
            (vec![(0, s)], cuda.then_some(payload))
        };
        let control = Control::new(env.rank, env.world, streams, timeout, Some(EXIT_GRACE)).context("starting the control links")?;
        Ok(Self {
            env,
            control,
            nccl_id: id,
            timeout,
        })
    }

    pub fn rank(&self) -> usize {
        self.env.rank
    }
    pub fn world(&self) -> usize {
        self.env.world
    }
    pub fn is_root(&self) -> bool {
        self.env.rank == 0
    }
}
