//! Data-parallel `mlvpt train` end to end through the built binary, on the CPU backend
//! (gradients exchanged through the host): ranks as processes on this machine, launched by
//! `--gpus` or with the torchrun variables. The same runs on CUDA with NCCL: tests/gpu_dist.rs.
#![cfg(feature = "train")]

mod dist_common;

use std::time::{Duration, Instant};

use dist_common::*;

#[test]
fn cpu_two_ranks_track_one_process() {
    // f64 sums in rank order: equal up to float rounding of the per-rank means.
    ranks_track_one_process("cpu", 2, 1e-5, 0.5);
}

#[test]
fn cpu_resume_with_another_world_size() {
    resume_with_another_world_size("cpu", 1e-5, 0.5);
}

#[test]
fn cpu_a_killed_rank_ends_the_other() {
    a_killed_rank_ends_the_other("cpu");
}

#[test]
fn cpu_bench_step_reports_scaling() {
    bench_step_scaling("cpu", "2");
}

#[test]
fn bad_launch_environments_fail_before_work() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x");
    let base = ["train", "--quiet", "--out", out.to_str().unwrap(), "--epochs", "1"];
    let job = [("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")];
    let full = [
        ("RANK", "0"),
        ("WORLD_SIZE", "2"),
        ("LOCAL_RANK", "0"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "1"),
    ];
    for (extra, env, want) in [
        (&["--device", "cpu"][..], &job[..], "MASTER_ADDR is not set"),
        (
            &["--device", "cpu"],
            &[("RANK", "0"), ("WORLD_SIZE", "2")][..],
            "LOCAL_RANK is not set",
        ),
        (&["--device", "cpu"], &[("WORLD_SIZE", "2")][..], "RANK is not"),
        (&[], &full[..], "needs --device cuda"),
        (&["--gpus", "2"], &[][..], "--gpus needs --device cuda"),
        (&["--gpus", "1,1", "--device", "cpu"], &[][..], "listed twice"),
        (&["--gpus", "5,7", "--device", "cuda"], &[][..], "asks for CUDA device 5"),
        (
            &["--device", "cuda"],
            &[
                ("RANK", "3"),
                ("WORLD_SIZE", "4"),
                ("LOCAL_RANK", "3"),
                ("MASTER_ADDR", "127.0.0.1"),
                ("MASTER_PORT", "1"),
            ][..],
            "needs CUDA device 3",
        ),
    ] {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        let o = mlvpt(&a, env);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{a:?} {env:?} succeeded");
        assert!(!err.contains("panicked"), "{err}");
        assert!(err.contains(want), "{a:?} {env:?}: expected {want:?} in:\n{err}");
        assert!(!out.join("checkpoint.safetensors").exists(), "{a:?} {env:?} did work");
    }
}

#[test]
fn a_rank_alone_gives_up_at_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    for (rank, want) in [("0", "rank(s) 1 never joined"), ("1", "cannot reach rank 0")] {
        let out = dir.path().join(rank);
        let t = Instant::now();
        let o = mlvpt(
            &[
                "train",
                "--quiet",
                "--device",
                "cpu",
                "--dist-timeout",
                "2",
                "--out",
                out.to_str().unwrap(),
            ],
            &[
                ("RANK", rank),
                ("WORLD_SIZE", "2"),
                ("LOCAL_RANK", rank),
                ("MASTER_ADDR", "127.0.0.1"),
                ("MASTER_PORT", &port),
            ],
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success());
        assert!(err.contains(want), "{err}");
        assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    }
}
