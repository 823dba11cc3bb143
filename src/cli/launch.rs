//! Data-parallel `mlvpt train`: `--gpus N|LIST` starts one process per GPU on this machine
//! (this binary again, with the torchrun variables set), and a process started by torchrun,
//! SLURM or `--gpus` joins its job as one rank.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context};

use super::Device;
use mlvpt::dist::{env::DEVICE_VAR, rendezvous, Job, LaunchEnv};

/// Set by the launcher for its children: their stdin is a pipe from it, which closes when it
/// ends, however it ends.
const WATCH_VAR: &str = "MLVPT_DIST_LAUNCHER";

/// A child of `--gpus` ends (with an error) when its launcher does: a launcher killed
/// outright cannot stop its ranks itself, and they must not keep training on their own.
fn watch_launcher() {
    if std::env::var_os(WATCH_VAR).is_none() {
        return;
    }
    std::thread::spawn(|| {
        let mut sink = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
        eprintln!("error: the launcher (mlvpt ... --gpus) ended: this rank stops");
        std::process::exit(1);
    });
}

/// `--gpus`: a count N (GPUs 0..N) or a comma-separated list of device ordinals.
pub fn parse_gpus(s: &str) -> anyhow::Result<Vec<usize>> {
    let s = s.trim();
    let bad = || format!("--gpus {s:?}: expected a count (4) or a list of device numbers (0,2,3)");
    let list: Vec<usize> = if s.contains(',') {
        s.split(',')
            .filter(|p| !p.trim().is_empty())
            .map(|p| p.trim().parse::<usize>().with_context(bad))
            .collect::<anyhow::Result<_>>()?
    } else {
        (0..s.parse::<usize>().with_context(bad)?).collect()
    };
    ensure!(!list.is_empty(), "--gpus {s:?}: at least one GPU");
    let mut seen = list.clone();
    seen.sort_unstable();
    seen.dedup();
    ensure!(seen.len() == list.len(), "--gpus {s:?}: a GPU is listed twice");
    Ok(list)
}

/// CUDA devices this machine shows (0 without the `cuda` feature or a driver).
pub fn device_count() -> usize {
    #[cfg(feature = "cuda")]
    {
        mlvpt::dist::sync::device_count()
    }
    #[cfg(not(feature = "cuda"))]
    {
        0
    }
}

/// The arguments of this command without `--gpus VALUE` (what each child runs).
pub fn child_args() -> Vec<OsString> {
    let mut out = Vec::new();
    let mut skip = false;
    for a in std::env::args_os().skip(1) {
        if skip {
            skip = false;
            continue;
        }
        match a.to_str() {
            Some("--gpus") => skip = true,
            Some(s) if s.starts_with("--gpus=") => {}
            _ => out.push(a),
        }
    }
    out
}

/// The arguments that make the job (its token): all but those only rank 0 or each process
/// alone uses (`--out`, `--quiet`, `--dist-timeout`).
fn job_args(args: impl Iterator<Item = String>) -> Vec<String> {
    const LOCAL: [&str; 3] = ["--out", "--quiet", "--dist-timeout"];
    let mut out = Vec::new();
    let mut skip = false;
    for a in args {
        if std::mem::take(&mut skip) {
            continue;
        }
        match LOCAL.iter().find(|o| a == **o || a.starts_with(&format!("{o}="))) {
            Some(&"--quiet") => {}
            Some(o) => skip = a == *o,
            None => out.push(a),
        }
    }
    out
}

/// Copies `from` to our stdout or stderr, each line prefixed.
fn forward(from: impl Read + Send + 'static, prefix: String, to_stderr: bool) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { return };
            if to_stderr {
                let _ = writeln!(std::io::stderr().lock(), "{prefix}{line}");
            } else {
                let _ = writeln!(std::io::stdout().lock(), "{prefix}{line}");
            }
        }
    })
}

/// `mlvpt train --gpus LIST`: one child per GPU on 127.0.0.1; their output forwarded (stderr
/// prefixed `[rank r]`, rank 0's stdout as is); the first child to fail ends the others, and
/// its failure is the command's.
pub fn launch(gpus: &[usize], device: Device) -> anyhow::Result<()> {
    launch_with(gpus, device, child_args(), false).map(|_| ())
}

/// [`launch`] with the children's arguments `args`; with `capture`, rank 0's stdout is
/// returned instead of printed.
pub fn launch_with(gpus: &[usize], device: Device, args: Vec<OsString>, capture: bool) -> anyhow::Result<Option<String>> {
    ensure!(
        device != Device::Auto,
        "--gpus needs --device cuda (or --device cpu, which runs the ranks on the CPU and exchanges gradients \
         through the host, for tests)"
    );
    // The ranks' LD_LIBRARY_PATH when libnccl opens only through a link (super::nccl_lib).
    #[cfg_attr(not(feature = "cuda"), allow(unused_mut))]
    let mut library_path: Option<OsString> = None;
    if device == Device::Cuda {
        let count = device_count();
        if let Some(&g) = gpus.iter().find(|&&g| g >= count) {
            bail!("--gpus asks for CUDA device {g}, but this machine shows {count} device(s)");
        }
        #[cfg(feature = "cuda")]
        {
            library_path = super::nccl_lib::library_path()?;
        }
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("finding a free port for the start-up exchange")?
        .port();
    let exe = std::env::current_exe().context("finding this program to start the ranks")?;
    let world = gpus.len();
    let mut children: Vec<(usize, Child)> = Vec::new();
    let mut pipes = Vec::new();
    let mut captured = None;
    for (rank, &gpu) in gpus.iter().enumerate() {
        let mut c = Command::new(&exe);
        c.args(&args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env(DEVICE_VAR, gpu.to_string())
            .env(WATCH_VAR, "1")
            .envs(library_path.iter().map(|p| ("LD_LIBRARY_PATH", p)))
            // Never written: the child sees its end when this process is gone (see `watch_launcher`).
            .stdin(Stdio::piped())
            .stdout(if rank == 0 && !capture { Stdio::inherit() } else { Stdio::piped() })
            .stderr(Stdio::piped());
        let mut child = match c.spawn() {
            Ok(ch) => ch,
            Err(e) => {
                for (_, ch) in &mut children {
                    let _ = ch.kill();
                    let _ = ch.wait();
                }
                bail!("starting rank {rank}: {e}");
            }
        };
        if let Some(mut o) = child.stdout.take() {
            if rank == 0 && capture {
                captured = Some(std::thread::spawn(move || {
                    let mut text = String::new();
                    let _ = o.read_to_string(&mut text);
                    text
                }));
            } else {
                pipes.push(forward(o, format!("[rank {rank}] "), false));
            }
        }
        if let Some(e) = child.stderr.take() {
            pipes.push(forward(e, format!("[rank {rank}] "), true));
        }
        children.push((rank, child));
    }
    // The first failure ends the others.
    let mut failed: Option<String> = None;
    let mut running = children.len();
    let mut done = vec![false; children.len()];
    while running > 0 {
        for (i, (rank, ch)) in children.iter_mut().enumerate() {
            if done[i] {
                continue;
            }
            if let Some(status) = ch.try_wait().context("waiting for a rank")? {
                done[i] = true;
                running -= 1;
                if !status.success() && failed.is_none() {
                    failed = Some(format!("rank {rank} (GPU {}) failed ({status})", gpus[*rank]));
                }
            }
        }
        if failed.is_some() {
            // Give the others a moment to stop by themselves (their links report the failure),
            // then end them.
            let until = std::time::Instant::now() + Duration::from_secs(15);
            while std::time::Instant::now() < until && children.iter_mut().any(|(_, c)| matches!(c.try_wait(), Ok(None))) {
                std::thread::sleep(Duration::from_millis(100));
            }
            for (_, ch) in &mut children {
                if matches!(ch.try_wait(), Ok(None)) {
                    let _ = ch.kill();
                }
                let _ = ch.wait();
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in pipes {
        let _ = p.join();
    }
    let out = captured.map(|c| c.join().unwrap_or_default());
    match failed {
        Some(f) => bail!("{f}; the other ranks were stopped (their output above says why)"),
        None => Ok(out),
    }
}

/// This process's job when the environment names one (torchrun, SLURM or `--gpus`): the
/// launch checked, the start-up exchange done. `None` for a single process.
pub fn join_job(device: Device, timeout: Duration) -> anyhow::Result<Option<Arc<Job>>> {
    let Some(env) = LaunchEnv::from_env()? else {
        return Ok(None);
    };
    ensure!(
        device != Device::Auto,
        "a data-parallel job (rank {} of {}, from {}) needs --device cuda (or --device cpu, which exchanges gradients \
         through the host, for tests)",
        env.rank,
        env.world,
        env.launcher
    );
    let cuda = device == Device::Cuda;
    let nccl_id = match cuda {
        true => {
            env.check_devices(device_count())?;
            #[cfg(feature = "cuda")]
            super::nccl_lib::reexec_if_needed()?;
            nccl_id(&env)?
        }
        false => None,
    };
    watch_launcher();
    let args = job_args(child_args().iter().map(|a| a.to_string_lossy().into_owned()));
    let token = rendezvous::job_token(&format!("{}\u{1f}{}", env.world, args.join("\u{1f}")));
    let job = Job::start(env, token, nccl_id, cuda, timeout)?;
    Ok(Some(Arc::new(job)))
}

/// Rank 0: a new NCCL unique id; another rank: `None`, once NCCL is known to open (checked
/// before the exchange so that every rank says it, not only rank 0).
#[cfg(feature = "cuda")]
fn nccl_id(env: &LaunchEnv) -> anyhow::Result<Option<[u8; rendezvous::PAYLOAD]>> {
    use mlvpt::dist::sync::Nccl;
    match env.rank {
        0 => Ok(Some(Nccl::unique_id()?)),
        _ => Nccl::require().map(|()| None),
    }
}

#[cfg(not(feature = "cuda"))]
fn nccl_id(_env: &LaunchEnv) -> anyhow::Result<Option<[u8; rendezvous::PAYLOAD]>> {
    bail!("this mlvpt was built without CUDA support (rebuild with `cargo build --release --features cuda`)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_job_token_ignores_per_process_options() {
        let a = |v: &[&str]| job_args(v.iter().map(|s| s.to_string()));
        assert_eq!(
            a(&["train", "--out", "x", "--quiet", "--lr", "1", "--dist-timeout=5"]),
            a(&["train", "--lr", "1", "--out=y"])
        );
        assert_ne!(a(&["train", "--lr", "1"]), a(&["train", "--lr", "2"]));
    }

    #[test]
    fn gpus_counts_and_lists() {
        assert_eq!(parse_gpus("2").unwrap(), vec![0, 1]);
        assert_eq!(parse_gpus("3,1").unwrap(), vec![3, 1]);
        assert_eq!(parse_gpus("5,").unwrap(), vec![5]);
        for bad in ["0", "x", "1,1", "1,x"] {
            assert!(parse_gpus(bad).is_err(), "{bad}");
        }
    }
}
