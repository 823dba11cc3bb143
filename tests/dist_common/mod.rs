//! What the data-parallel tests share (tests/dist_cli.rs on the CPU, tests/gpu_dist.rs on CUDA):
//! ranks as processes of the built binary on this machine, launched by `--gpus` or with the
//! torchrun variables.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A model and data small enough that a run takes about a second (3 global batches of 16 per
/// epoch, the last one partial and split unevenly: 41 = 16 + 16 + 9, 5 + 4 images on two
/// ranks; 25 test images, 13 + 12).
pub const TINY: &[&str] = &[
    "--image-size",
    "16",
    "--patch",
    "4",
    "--dim",
    "16",
    "--depth",
    "1",
    "--heads",
    "2",
    "--labels",
    "8",
    "--groups",
    "2",
    "--experts",
    "2",
    "--train-images",
    "41",
    "--test-images",
    "25",
    "--batch-size",
    "16",
    "--lr",
    "5e-3",
];

/// The binary: the GPU bundle's copy on the GPU machine (tools/gpu-runner.sh sets MLVPT_BIN),
/// else the one cargo built.
pub fn bin() -> String {
    std::env::var("MLVPT_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_mlvpt").to_string())
}

pub fn mlvpt(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(bin());
    c.args(args).env("VGPU_DEVICE_COUNT", "2");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run mlvpt")
}

/// The demo as `mlvpt train` runs it (its model, dataset and default batch), on 64 training
/// and 64 test images (as tests/gpu_train_cli.rs trains it on one device).
pub const DEMO: &[&str] = &["--train-images", "64", "--test-images", "64"];

pub fn train(device: &str, out: &Path, extra: &[&str]) -> String {
    train_on(TINY, device, out, extra)
}

/// [`train`] with `base` in place of [`TINY`].
pub fn train_on(base: &[&str], device: &str, out: &Path, extra: &[&str]) -> String {
    let mut a = vec!["train", "--quiet", "--device", device, "--out", out.to_str().unwrap()];
    a.extend_from_slice(base);
    a.extend_from_slice(extra);
    let o = mlvpt(&a, &[]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "mlvpt {a:?} failed:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// (loss, mAP, CF1, OF1) of every epoch in `metrics.jsonl`.
pub fn epochs(dir: &Path) -> Vec<[f64; 4]> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            ["loss", "mAP", "CF1", "OF1"].map(|k| v[k].as_f64().unwrap())
        })
        .collect()
}

/// Loss within `loss_tol` relative, metrics within `metric_tol` points.
pub fn close(a: &[[f64; 4]], b: &[[f64; 4]], loss_tol: f64, metric_tol: f64) {
    assert_eq!(a.len(), b.len(), "{a:?}\n{b:?}");
    for (x, y) in a.iter().zip(b) {
        assert!((x[0] - y[0]).abs() <= loss_tol * y[0].abs(), "loss {} vs {}", x[0], y[0]);
        for i in 1..4 {
            assert!((x[i] - y[i]).abs() <= metric_tol, "metric {i}: {} vs {}\n{a:?}\n{b:?}", x[i], y[i]);
        }
    }
}

/// `ranks` ranks by `--gpus N` against one process with the same global batch: the parameters
/// are identical on every rank after every epoch (the run checks a SHA-256 of them and says
/// so), and the run tracks the single process's (the same steps, summed in another order).
pub fn ranks_track_one_process(device: &str, ranks: usize, loss_tol: f64, metric_tol: f64) {
    ranks_track_one_process_on(TINY, device, ranks, loss_tol, metric_tol)
}

/// [`ranks_track_one_process`] with `base` in place of [`TINY`].
pub fn ranks_track_one_process_on(base: &[&str], device: &str, ranks: usize, loss_tol: f64, metric_tol: f64) {
    let n = ranks.to_string();
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    train_on(base, device, &one, &["--epochs", "2"]);
    let err = train_on(base, device, &two, &["--epochs", "2", "--gpus", &n]);
    for e in 1..=2 {
        assert!(
            err.contains(&format!("[rank 0] epoch {e}: parameters identical on all {n} ranks")),
            "{err}"
        );
    }
    assert!(!err.contains("[rank 1] epoch"), "rank 1 reports nothing:\n{err}");
    close(&epochs(&two), &epochs(&one), loss_tol, metric_tol);
    // Rank 0 alone writes the output folder.
    let mut files: Vec<String> = std::fs::read_dir(&two)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, ["checkpoint.safetensors", "metrics.jsonl"]);
}

/// Every tensor of a checkpoint (weights, AdamW moments, EMA), by name.
fn tensors(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let (t, _) = mlvpt::train::checkpoint::read_file(&dir.join("checkpoint.safetensors")).unwrap();
    t.into_iter().map(|(k, v)| (k, v.data)).collect()
}

/// One epoch on two ranks, then resumed on one process (another world size) and, from the
/// same checkpoint, on two: both track the uninterrupted two-rank run; with `exact`, the
/// resumption on two ranks equals it bit for bit (metrics and every checkpoint tensor).
pub fn resume_with_another_world_size(device: &str, loss_tol: f64, metric_tol: f64, exact: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (full, part) = (dir.path().join("full"), dir.path().join("part"));
    train(device, &full, &["--epochs", "2", "--gpus", "2"]);
    train(device, &part, &["--epochs", "2", "--gpus", "2", "--stop-after", "1"]);
    let ck = part.join("checkpoint.safetensors");
    for (name, gpus) in [("as1", None), ("as2", Some("2"))] {
        let out = dir.path().join(name);
        std::fs::create_dir_all(&out).unwrap();
        std::fs::copy(&ck, out.join("checkpoint.safetensors")).unwrap();
        let mut a = vec!["train", "--quiet", "--device", device, "--resume", out.to_str().unwrap()];
        if let Some(g) = gpus {
            a.extend(["--gpus", g]);
        }
        let o = mlvpt(&a, &[]);
        assert!(o.status.success(), "{a:?}:\n{}", String::from_utf8_lossy(&o.stderr));
        close(&epochs(&out), &epochs(&full), loss_tol, metric_tol);
        if exact && gpus.is_some() {
            assert_eq!(epochs(&out), epochs(&full));
            assert!(tensors(&out) == tensors(&full), "the resumed run's checkpoint differs");
        }
    }
}

/// One rank (`victim`) is killed in the middle of training: the other stops with an error
/// naming what happened within a few seconds, never hangs.
pub fn a_killed_rank_ends_the_other(device: &str, victim: usize) {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let spawn = |rank: &str| {
        let out = dir.path().join(format!("r{rank}"));
        let mut a = vec!["train", "--quiet", "--device", device, "--out", out.to_str().unwrap()];
        a.extend_from_slice(TINY);
        a.extend(["--epochs", "200", "--dist-timeout", "120"]);
        Command::new(bin())
            .args(&a)
            .envs([
                ("RANK", rank),
                ("WORLD_SIZE", "2"),
                ("LOCAL_RANK", rank),
                ("MASTER_ADDR", "127.0.0.1"),
                ("MASTER_PORT", port.as_str()),
                ("VGPU_DEVICE_COUNT", "2"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut ranks = vec![spawn("0"), spawn("1")];
    // Once rank 0 has written an epoch's metrics both are mid-training.
    let log = dir.path().join("r0").join("metrics.jsonl");
    let start = Instant::now();
    while std::fs::read_to_string(&log).map_or(true, |s| s.is_empty()) {
        assert!(start.elapsed() < Duration::from_secs(300), "rank 0 wrote no epoch");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut dead = ranks.remove(victim);
    dead.kill().unwrap();
    dead.wait().unwrap();
    let killed = Instant::now();
    let o = ranks.pop().unwrap().wait_with_output().unwrap();
    let waited = killed.elapsed();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "the surviving rank succeeded:\n{err}");
    assert!(
        waited < Duration::from_secs(30),
        "the surviving rank took {waited:?} to stop:\n{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    match victim {
        1 => assert!(err.contains("the last good checkpoint"), "{err}"),
        _ => assert!(
            err.contains("rank 1: training stopped at step") || err.contains("rank 1: after epoch"),
            "{err}"
        ),
    }
    assert!(err.contains(&format!("rank {victim}")) || err.contains("ncclRemoteError"), "{err}");
}

/// `bench-step --gpus N --json` on a tiny model: the 1-GPU and N-GPU rates and their scaling.
pub fn bench_step_scaling(device: &str, gpus: &str) -> serde_json::Value {
    let args = [
        "bench-step",
        "--model",
        "tiny",
        "--image-size",
        "16",
        "--classes",
        "8",
        "--groups",
        "2",
        "--experts",
        "2",
        "--batch",
        "2",
        "--warmup",
        "1",
        "--steps",
        "2",
        "--device",
        device,
        "--gpus",
        gpus,
        "--json",
    ];
    let o = mlvpt(&args, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{args:?}:\n{err}");
    let out = String::from_utf8_lossy(&o.stdout);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    let n = v["gpus"].as_array().unwrap().len() as f64;
    let (one, all) = (v["images_per_s_1gpu"].as_f64().unwrap(), v["images_per_s"].as_f64().unwrap());
    assert!(one > 0.0 && all > 0.0, "{v}");
    assert!((v["images_per_s_per_gpu"].as_f64().unwrap() - all / n).abs() < 1e-9 * all, "{v}");
    assert!((v["scaling_efficiency"].as_f64().unwrap() - all / n / one).abs() < 1e-9, "{v}");
    assert_eq!(v["all_gpus"]["world"].as_u64(), Some(n as u64), "{v}");
    assert!(v["all_gpus"]["loss"].as_f64().unwrap().is_finite(), "{v}");
    v
}
