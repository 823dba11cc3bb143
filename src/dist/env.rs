//! The launch environment of a data-parallel job, read the way PyTorch jobs are launched:
//! torchrun (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`) or SLURM
//! (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, with `MASTER_ADDR`/`MASTER_PORT` set by the
//! batch script). `mlvpt train --gpus N` sets the torchrun variables for its children.

use std::fmt;

use anyhow::{bail, Context};

/// Set by `mlvpt train --gpus LIST` for each child: the CUDA device ordinal it uses (without
/// it, a rank uses device `LOCAL_RANK`). With it a world of one process is a job too (`--gpus
/// 1`: the data-parallel code on one GPU).
pub const DEVICE_VAR: &str = "MLVPT_DIST_DEVICE";
/// The port of the start-up exchange when `MASTER_PORT` is taken: torchrun's agent serves its
/// own store on `MASTER_PORT` when it sets `TORCHELASTIC_USE_AGENT_STORE=True`, and the
/// exchange then uses `MASTER_PORT + 1` unless this says otherwise.
pub const PORT_VAR: &str = "MLVPT_MASTER_PORT";

/// Where the variables came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launcher {
    /// torchrun, or `mlvpt train --gpus` (the same variables).
    Torchrun,
    Slurm,
}

impl fmt::Display for Launcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Launcher::Torchrun => "torchrun (RANK, WORLD_SIZE, LOCAL_RANK)",
            Launcher::Slurm => "SLURM (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID)",
        })
    }
}

/// One process's place in a data-parallel job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchEnv {
    pub launcher: Launcher,
    /// This process's rank, `0..world`.
    pub rank: usize,
    /// Processes (one GPU each) in the job.
    pub world: usize,
    /// Rank on this machine (the GPU it uses unless [`DEVICE_VAR`] says otherwise).
    pub local_rank: usize,
    /// Rank 0's host and port, where the start-up exchange happens.
    pub master_addr: String,
    pub master_port: u16,
    /// The CUDA device ordinal this rank uses.
    pub device: usize,
}

impl LaunchEnv {
    /// The job described by the process's environment; `None` when it names none (or a world
    /// of 1 process), so a plain `mlvpt train` is unaffected.
    pub fn from_env() -> anyhow::Result<Option<Self>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`LaunchEnv::from_env`] over any variable source (tests).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> anyhow::Result<Option<Self>> {
        let num = |name: &str| -> anyhow::Result<Option<usize>> {
            match get(name) {
                None => Ok(None),
                Some(v) => v
                    .trim()
                    .parse::<usize>()
                    .map(Some)
                    .with_context(|| format!("launch environment: {name}={v:?} is not a non-negative integer")),
            }
        };
        let (launcher, rank, world, local) = if get("WORLD_SIZE").is_some() || get("RANK").is_some() {
            let world = num("WORLD_SIZE")?.context("launch environment: RANK is set but WORLD_SIZE is not")?;
            let rank = num("RANK")?.context("launch environment: WORLD_SIZE is set but RANK is not")?;
            let local = num("LOCAL_RANK")?;
            (Launcher::Torchrun, rank, world, local)
        } else if let Some(world) = num("SLURM_NTASKS")? {
            let rank = num("SLURM_PROCID")?.context("launch environment: SLURM_NTASKS is set but SLURM_PROCID is not")?;
            (Launcher::Slurm, rank, world, num("SLURM_LOCALID")?)
        } else {
            return Ok(None);
        };
        if world == 0 {
            bail!("launch environment ({launcher}): the world size is 0");
        }
        if rank >= world {
            bail!("launch environment ({launcher}): rank {rank} is not below the world size {world}");
        }
        if world == 1 && get(DEVICE_VAR).is_none() {
            return Ok(None);
        }
        let local_rank = match local {
            Some(l) => l,
            None if launcher == Launcher::Torchrun => bail!("launch environment ({launcher}): LOCAL_RANK is not set"),
            None => bail!("launch environment ({launcher}): SLURM_LOCALID is not set"),
        };
        if local_rank > rank {
            bail!("launch environment ({launcher}): local rank {local_rank} is above the rank {rank}");
        }
        let master_addr = get("MASTER_ADDR")
            .filter(|a| !a.trim().is_empty())
            .with_context(|| format!("launch environment ({launcher}): MASTER_ADDR is not set (rank 0's host name or address)"))?;
        let port = get("MASTER_PORT")
            .with_context(|| format!("launch environment ({launcher}): MASTER_PORT is not set (a free TCP port on rank 0's host)"))?;
        let parse_port = |name: &str, v: &str| match v.trim().parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => bail!("launch environment: {name}={v:?} is not a TCP port (1-65535)"),
        };
        let mut master_port = parse_port("MASTER_PORT", &port)?;
        if let Some(p) = get(PORT_VAR) {
            master_port = parse_port(PORT_VAR, &p)?;
        } else if get("TORCHELASTIC_USE_AGENT_STORE").as_deref() == Some("True") {
            master_port = master_port
                .checked_add(1)
                .with_context(|| format!("launch environment: MASTER_PORT={port} leaves no next port (set {PORT_VAR})"))?;
        }
        let device = num(DEVICE_VAR)?.unwrap_or(local_rank);
        Ok(Some(Self {
            launcher,
            rank,
            world,
            local_rank,
            master_addr: master_addr.trim().to_string(),
            master_port,
            device,
        }))
    }

    /// `MASTER_ADDR:MASTER_PORT`.
    pub fn master(&self) -> String {
        if self.master_addr.contains(':') && !self.master_addr.starts_with('[') {
            format!("[{}]:{}", self.master_addr, self.master_port)
        } else {
            format!("{}:{}", self.master_addr, self.master_port)
        }
    }

    /// Where rank 0 listens: the master address itself when it is a loopback one (a job on one
    /// machine), else every interface on the master port, as PyTorch's store does (a host name
    /// may resolve, on its own machine, to an address the other machines cannot reach, such as
    /// Debian's 127.0.1.1).
    pub fn listen_addr(&self) -> String {
        let a = self.master_addr.trim_start_matches('[').trim_end_matches(']');
        let loopback = a == "localhost" || a.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
        match loopback {
            true => self.master(),
            false => format!("0.0.0.0:{}", self.master_port),
        }
    }

    /// An error unless this rank's device is among the `count` the machine shows.
    pub fn check_devices(&self, count: usize) -> anyhow::Result<()> {
        if self.device >= count {
            bail!(
                "rank {} (local rank {}) needs CUDA device {}, but this machine shows {count} device(s): \
                 the job runs more ranks per machine than it has GPUs",
                self.rank,
                self.local_rank,
                self.device
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(vars: &[(&str, &str)]) -> anyhow::Result<Option<LaunchEnv>> {
        let m: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        LaunchEnv::from_vars(|k| m.get(k).cloned())
    }

    const TORCHRUN: &[(&str, &str)] = &[
        ("RANK", "1"),
        ("WORLD_SIZE", "2"),
        ("LOCAL_RANK", "1"),
        ("MASTER_ADDR", "10.0.0.1"),
        ("MASTER_PORT", "29500"),
    ];

    #[test]
    fn no_job_and_a_world_of_one_are_single_process() {
        assert_eq!(parse(&[]).unwrap(), None);
        assert_eq!(parse(&[("RANK", "0"), ("WORLD_SIZE", "1")]).unwrap(), None);
        assert_eq!(parse(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1")]).unwrap(), None);
    }

    #[test]
    fn torchrun_and_slurm_variables() {
        let e = parse(TORCHRUN).unwrap().unwrap();
        assert_eq!((e.rank, e.world, e.local_rank, e.device), (1, 2, 1, 1));
        assert_eq!(e.master(), "10.0.0.1:29500");
        assert_eq!(e.launcher, Launcher::Torchrun);
        let s = parse(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("MASTER_ADDR", "node7"),
            ("MASTER_PORT", "1234"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((s.rank, s.world, s.local_rank, s.launcher), (5, 8, 1, Launcher::Slurm));
        let mut v = TORCHRUN.to_vec();
        v.push((DEVICE_VAR, "3"));
        assert_eq!(parse(&v).unwrap().unwrap().device, 3);
        // torchrun's agent store holds MASTER_PORT: the next one, or the one asked for.
        let mut v = TORCHRUN.to_vec();
        v.push(("TORCHELASTIC_USE_AGENT_STORE", "True"));
        assert_eq!(parse(&v).unwrap().unwrap().master_port, 29501);
        v.push((PORT_VAR, "4000"));
        assert_eq!(parse(&v).unwrap().unwrap().master_port, 4000);
        // One process is a job only when `--gpus` started it.
        let one = [
            ("RANK", "0"),
            ("WORLD_SIZE", "1"),
            ("LOCAL_RANK", "0"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "9"),
        ];
        assert_eq!(parse(&one).unwrap(), None);
        let e = parse(&[&one[..], &[(DEVICE_VAR, "2")]].concat()).unwrap().unwrap();
        assert_eq!((e.world, e.device), (1, 2));
    }

    #[test]
    fn bad_environments_name_the_variable() {
        let without = |name: &str| TORCHRUN.iter().copied().filter(|(k, _)| *k != name).collect::<Vec<_>>();
        let with = |name: &'static str, value: &'static str| {
            let mut v = without(name);
            v.push((name, value));
            v
        };
        for (vars, want) in [
            (without("WORLD_SIZE"), "WORLD_SIZE is not"),
            (without("RANK"), "RANK is not"),
            (without("LOCAL_RANK"), "LOCAL_RANK"),
            (without("MASTER_ADDR"), "MASTER_ADDR"),
            (without("MASTER_PORT"), "MASTER_PORT"),
            (with("RANK", "2"), "rank 2 is not below the world size 2"),
            (with("RANK", "x"), "RANK=\"x\""),
            (with("MASTER_PORT", "70000"), "MASTER_PORT=\"70000\""),
            (with("WORLD_SIZE", "0"), "world size is 0"),
        ] {
            let e = parse(&vars).unwrap_err().to_string();
            assert!(e.contains(want), "{vars:?}: {e}");
        }
        let e = parse(&TORCHRUN[..2].iter().copied().chain([("LOCAL_RANK", "0")]).collect::<Vec<_>>()).unwrap_err();
        assert!(e.to_string().contains("MASTER_ADDR"), "{e}");
    }

    #[test]
    fn rank_0_listens_on_loopback_or_every_interface() {
        let mut e = parse(TORCHRUN).unwrap().unwrap();
        assert_eq!(e.listen_addr(), "0.0.0.0:29500");
        for lo in ["127.0.0.1", "localhost", "::1"] {
            e.master_addr = lo.into();
            assert_eq!(e.listen_addr(), e.master(), "{lo}");
        }
        assert_eq!(e.master(), "[::1]:29500");
    }

    #[test]
    fn more_ranks_than_devices_is_an_error() {
        let e = parse(TORCHRUN).unwrap().unwrap();
        e.check_devices(2).unwrap();
        let err = e.check_devices(1).unwrap_err().to_string();
        assert!(err.contains("shows 1 device"), "{err}");
    }
}
