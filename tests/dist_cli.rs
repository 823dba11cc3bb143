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
    // The same world size resumes exactly (rank 0 sums in rank order, in f64).
    resume_with_another_world_size("cpu", 1e-5, 0.5, true);
}

#[test]
fn cpu_a_killed_rank_ends_the_other() {
    a_killed_rank_ends_the_other("cpu", 1);
    a_killed_rank_ends_the_other("cpu", 0);
}

/// Streamed images (a manifest of PNGs), augmented by the loader and on the backend: two ranks
/// track one process, the last batch of 1 image leaving rank 1 with none.
#[test]
fn cpu_streamed_images_on_two_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let imgs = dir.path().join("m");
    std::fs::create_dir_all(&imgs).unwrap();
    let mut csv = String::from("path,labels\n");
    let labels = ["a;b", "b", "c", "a", "a|c", "b;c"];
    for i in 0..17u32 {
        let img = image::ImageBuffer::from_fn(12, 12, |x, y| image::Rgb([(x * 20 + i * 7) as u8, (y * 20) as u8, (i * 13) as u8]));
        img.save(imgs.join(format!("{i}.png"))).unwrap();
        csv += &format!("{i}.png,{}\n", labels[i as usize % labels.len()]);
    }
    std::fs::write(imgs.join("list.csv"), csv).unwrap();
    let data = format!("manifest:{}", imgs.join("list.csv").display());
    for augment in ["host", "device"] {
        let run = |name: &str, gpus: Option<&str>| {
            let out = dir.path().join(format!("{name}-{augment}"));
            let mut a = vec![
                "train",
                "--quiet",
                "--device",
                "cpu",
                "--out",
                out.to_str().unwrap(),
                "--data",
                &data,
            ];
            a.extend([
                "--image-size",
                "8",
                "--patch",
                "4",
                "--dim",
                "8",
                "--depth",
                "1",
                "--heads",
                "2",
                "--groups",
                "2",
                "--experts",
                "2",
                "--batch-size",
                "4",
                "--epochs",
                "2",
                "--augment-on",
                augment,
            ]);
            if let Some(g) = gpus {
                a.extend(["--gpus", g]);
            }
            let o = mlvpt(&a, &[]);
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(o.status.success(), "{a:?}:\n{err}");
            out
        };
        let (one, two) = (run("one", None), run("two", Some("2")));
        // 13 training images (every 5th line is a test image): batches 4, 4, 4, 1.
        close(&epochs(&two), &epochs(&one), 1e-5, 0.5);
        assert!(two.join("data_report.txt").exists());
    }
}

/// The ranks of `--gpus` stop when their launcher is killed outright (Linux: /proc shows them).
#[cfg(target_os = "linux")]
#[test]
fn cpu_ranks_end_with_their_launcher() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut a = vec!["train", "--quiet", "--device", "cpu", "--out", out.to_str().unwrap()];
    a.extend_from_slice(TINY);
    a.extend(["--epochs", "100000", "--gpus", "2"]);
    let mut launcher = std::process::Command::new(bin())
        .args(&a)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while std::fs::read_to_string(out.join("metrics.jsonl")).map_or(true, |s| s.is_empty()) {
        assert!(start.elapsed() < Duration::from_secs(120), "no epoch");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = launcher.id();
    let children: Vec<u32> = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap()
        .split_whitespace()
        .map(|c| c.parse().unwrap())
        .collect();
    assert_eq!(children.len(), 2, "{children:?}");
    launcher.kill().unwrap();
    launcher.wait().unwrap();
    // Gone, or a zombie (exited, not yet reaped by its new parent).
    let running = |c: &u32| {
        std::fs::read_to_string(format!("/proc/{c}/stat"))
            .is_ok_and(|s| s.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
    };
    let killed = Instant::now();
    while children.iter().any(running) {
        assert!(killed.elapsed() < Duration::from_secs(15), "the ranks outlived their launcher");
        std::thread::sleep(Duration::from_millis(50));
    }
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
