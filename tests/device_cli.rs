//! `--device`: `cuda` without the feature or a device is a clear error (not a panic), `auto`
//! falls back to the CPU and says so on stderr. On a machine with a GPU and a `cuda` build
//! both run on the GPU instead, and the tests check that the summary says so.
#![cfg(feature = "train")]

use std::process::{Command, Output};

const TINY: &[&str] = &[
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
    "32",
    "--test-images",
    "16",
    "--batch-size",
    "16",
    "--epochs",
    "1",
    "--quiet",
];

fn train(device: &str) -> (Output, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut args = vec!["train", "--device", device, "--out", out.to_str().unwrap()];
    args.extend_from_slice(TINY);
    let o = Command::new(env!("CARGO_BIN_EXE_mlvpt")).args(&args).output().expect("run mlvpt");
    let (so, se) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    (o, so, se)
}

#[test]
fn device_cuda_without_a_device_is_a_clear_error() {
    let (o, stdout, stderr) = train("cuda");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    if o.status.success() {
        // A cuda build on a GPU machine.
        assert!(
            stdout.contains("cuda"),
            "ran with --device cuda but the summary names another device:\n{stdout}"
        );
    } else {
        assert!(stderr.starts_with("error: "), "{stderr}");
        assert!(stderr.contains("CUDA"), "the error should say CUDA is what is missing: {stderr}");
        assert!(
            stderr.contains("built without CUDA support") || stderr.contains("driver") || stderr.contains("device"),
            "the error should say what is missing: {stderr}"
        );
    }
}

#[test]
fn device_auto_falls_back_to_the_cpu_and_says_so() {
    let (o, stdout, stderr) = train("auto");
    assert!(o.status.success(), "auto must always run: {stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("device: "))
        .unwrap_or_else(|| panic!("no device line on stderr: {stderr}"));
    if line.starts_with("device: cpu") {
        assert!(line.contains("auto:"), "the fallback should give its reason: {line}");
        assert!(stdout.contains("cpu"), "{stdout}");
    } else {
        assert!(line.starts_with("device: cuda") && stdout.contains("cuda"), "{line}\n{stdout}");
    }
}

#[test]
fn device_cpu_is_silent_about_the_choice() {
    let (o, stdout, stderr) = train("cpu");
    assert!(o.status.success(), "{stderr}");
    assert!(!stderr.contains("device: "), "{stderr}");
    assert!(
        stdout.lines().any(|l| l.trim_start().starts_with("device") && l.contains("cpu")),
        "{stdout}"
    );
}
