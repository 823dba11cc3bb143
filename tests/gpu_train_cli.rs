//! `mlvpt train --device cuda` on the embedded demo (a short run) against the same run on the
//! CPU: the per-epoch loss and test mAP stay close. Needs a CUDA device: a GPU, or in CI the
//! virtual device of tools/vgpu (`LD_LIBRARY_PATH=<vgpu-lib> cargo test --features cuda --
//! --ignored`).
//!
//! Bounds, and why: the CUDA backend keeps activations and frozen weights in bf16 (8-bit
//! mantissa, relative rounding up to 2^-9) with fp32 accumulation, parameters and optimizer
//! state, so each step's gradients differ from the CPU's f32 ones by a fraction of a percent and
//! the two runs' parameters drift apart slowly over the 8 steps. The batch-mean loss averages
//! those differences: it must agree within 0.5% per epoch (measured: about 3e-5). mAP over 64
//! test images and 20 labels is coarse: the random backbone's scores differ little between
//! images, so rank near-ties flip with the last bits of the scores, and those bits vary from run
//! to run on CUDA (the demo's head dim, 24, takes the unfused attention, whose backward adds dK
//! and dV with float atomics). One image moving in one label's ranking moves that label's AP by
//! several points: mAP must agree within 5 points (measured: 0.1-0.6).
#![cfg(feature = "train")]

use std::path::Path;
use std::process::Command;

const RUN: &[&str] = &["--train-images", "64", "--test-images", "64", "--epochs", "2", "--quiet"];

fn train(device: &str, out: &Path) -> (String, String) {
    let mut args = vec!["train", "--device", device, "--out", out.to_str().unwrap()];
    args.extend_from_slice(RUN);
    // MLVPT_BIN: the GPU bundle's copy of mlvpt (tools/gpu-runner.sh sets it on the GPU machine).
    let bin = std::env::var("MLVPT_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_mlvpt").to_string());
    let o = Command::new(&bin).args(&args).output().unwrap_or_else(|e| panic!("run {bin}: {e}"));
    let (so, se) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    assert!(o.status.success(), "mlvpt train --device {device} failed:\n{se}");
    (so, se)
}

/// (loss, mAP) per epoch from metrics.jsonl.
fn epochs(dir: &Path) -> Vec<(f64, f64)> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).expect("metrics.jsonl");
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
            (v["loss"].as_f64().expect("loss"), v["mAP"].as_f64().expect("mAP"))
        })
        .collect()
}

#[test]
#[ignore = "requires a CUDA device"]
fn demo_training_on_cuda_tracks_the_cpu_run() {
    let dir = tempfile::tempdir().unwrap();
    let (cpu_dir, cuda_dir) = (dir.path().join("cpu"), dir.path().join("cuda"));
    train("cpu", &cpu_dir);
    let (stdout, stderr) = train("cuda", &cuda_dir);
    assert!(
        stderr.lines().any(|l| l.starts_with("device: cuda")),
        "did not run on the CUDA backend:\n{stderr}"
    );
    assert!(stdout.contains("cuda"), "the summary should name the CUDA device:\n{stdout}");
    let (cpu, cuda) = (epochs(&cpu_dir), epochs(&cuda_dir));
    assert_eq!(cpu.len(), 2, "two epochs on the CPU");
    assert_eq!(cuda.len(), 2, "two epochs on CUDA");
    for (e, ((lc, mc), (lg, mg))) in cpu.iter().zip(&cuda).enumerate() {
        eprintln!("epoch {}: loss cpu {lc:.4} cuda {lg:.4}; mAP cpu {mc:.2} cuda {mg:.2}", e + 1);
        assert!(lg.is_finite() && mg.is_finite(), "epoch {}: non-finite CUDA metrics", e + 1);
        assert!(
            (lg - lc).abs() <= 5e-3 * lc.abs(),
            "epoch {}: loss {lg} on CUDA, {lc} on the CPU (bound 0.5%)",
            e + 1
        );
        assert!(
            (mg - mc).abs() <= 5.0,
            "epoch {}: mAP {mg} on CUDA, {mc} on the CPU (bound 5 points)",
            e + 1
        );
    }
}

/// `mlvpt train --device cuda --augment-on device` on image files (crops staged through pinned
/// memory and the copy stream, the augment kernel writing the patch rows) against the same run
/// with the loader's augmentation: the images differ by the host's uint8 rounding (and bf16
/// rounding of either), so the per-epoch losses agree within 0.5%.
#[test]
#[ignore = "requires a CUDA device"]
fn device_augmentation_on_cuda_tracks_the_loaders() {
    let dir = tempfile::tempdir().unwrap();
    let imgs = dir.path().join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    let mut csv = String::from("path,labels\n");
    for i in 0..30u32 {
        let (w, h) = (40 + i % 7, 30 + i % 5);
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 6 + i * 8) as u8, (y * 8) as u8, ((x ^ y) * 5) as u8]));
        img.save(imgs.join(format!("{i}.png"))).unwrap();
        csv += &format!("{i}.png,{}\n", ["a", "b", "a;c", "c", "b;c"][i as usize % 5]);
    }
    std::fs::write(imgs.join("list.csv"), csv).unwrap();
    let data = format!("manifest:{}", imgs.join("list.csv").display());
    let bin = std::env::var("MLVPT_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_mlvpt").to_string());
    let run = |augment: &str| {
        let out = dir.path().join(augment);
        let o = Command::new(&bin)
            .args([
                "train",
                "--device",
                "cuda",
                "--data",
                &data,
                "--image-size",
                "16",
                "--patch",
                "4",
                "--dim",
                "16",
            ])
            .args([
                "--depth",
                "2",
                "--epochs",
                "2",
                "--batch-size",
                "8",
                "--quiet",
                "--augment-on",
                augment,
            ])
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "--augment-on {augment} failed:\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        epochs(&out)
    };
    let (host, device) = (run("host"), run("device"));
    assert_eq!(host.len(), 2);
    for (e, ((lh, _), (ld, _))) in host.iter().zip(&device).enumerate() {
        eprintln!("epoch {}: loss host {lh:.5} device {ld:.5}", e + 1);
        assert!(
            (lh - ld).abs() <= 5e-3 * lh.abs(),
            "epoch {}: loss {ld} (device) vs {lh} (host)",
            e + 1
        );
    }
}
