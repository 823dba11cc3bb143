//! `mlvpt bench-step` through the built binary on the CPU with the tiny model: it runs, prints
//! one JSON line (or the table) with positive numbers and the FLOP count of the library, and
//! bad input is one `error:` line with exit status 1, never a panic. No timing assertions.
#![cfg(feature = "train")]

use mlvpt::model::{Method, ModelConfig, VitConfig};
use mlvpt::train::flops::step_flops;
use std::process::{Command, Output};

fn bench_step(args: &[&str]) -> (Output, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_mlvpt"))
        .arg("bench-step")
        .args(args)
        .output()
        .expect("run mlvpt");
    let (so, se) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    (o, so, se)
}

const TINY: &[&str] = &[
    "--device", "cpu", "--model", "tiny", "--batch", "2", "--warmup", "1", "--steps", "2",
];

#[test]
fn json_line_has_positive_numbers_and_the_step_flops() {
    let mut args = TINY.to_vec();
    args.extend(["--classes", "12", "--groups", "3", "--experts", "2", "--json"]);
    let (o, stdout, stderr) = bench_step(&args);
    assert!(o.status.success(), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON line on stdout: {stdout}");
    let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert!(v["impl"].as_str().unwrap().starts_with("mlvpt-cpu"), "{v}");
    assert_eq!(v["model"], "tiny");
    assert_eq!(v["batch"], 2);
    assert_eq!(v["device"], "cpu");
    assert_eq!(v["steps"], 2);
    for key in ["images_per_s", "ms_per_step", "tflops", "ms_per_step_median", "ms_per_step_min"] {
        let x = v[key].as_f64().unwrap_or_else(|| panic!("{key} missing: {v}"));
        assert!(x.is_finite() && x > 0.0, "{key} = {x}");
    }
    // images/s, ms/step and TFLOP/s describe the same mean step.
    let (ips, ms, tf) = (
        v["images_per_s"].as_f64().unwrap(),
        v["ms_per_step"].as_f64().unwrap(),
        v["tflops"].as_f64().unwrap(),
    );
    assert!((ips * ms / 1e3 / 2.0 - 1.0).abs() < 1e-9, "{ips} images/s at {ms} ms for 2 images");
    let cfg = ModelConfig {
        vit: VitConfig::demo(),
        labels: 12,
        groups: 3,
        experts: 2,
        method: Method::MlVpt,
        ..ModelConfig::demo()
    };
    let flops = step_flops(&cfg, 2, 2).total();
    assert_eq!(v["flops_per_step"].as_u64(), Some(flops));
    assert!((tf * 1e12 * ms / 1e3 / flops as f64 - 1.0).abs() < 1e-9, "{tf} TFLOP/s");
    assert_eq!(v["tokens"], 1 + 2 * 3 * 2 + 64);
    assert!(v["loss"].as_f64().unwrap().is_finite(), "{v}");
    // The FMA peak of every instruction set the CPU has, and the step's share of the products'.
    let p = &v["cpu_peak"];
    assert!(p["threads"].as_u64().unwrap() >= 1, "{p}");
    let peaks = p["fma_peak_gflops"].as_object().unwrap();
    for (isa, f) in peaks {
        assert!(f.as_f64().unwrap() > 0.0, "{isa}: {f}");
    }
    if let Some(isa) = p["gemm_isa"].as_str() {
        assert!(peaks.contains_key(isa), "{p}");
        let frac = p["step_fraction_of_gemm_peak"].as_f64().unwrap();
        let measured = tf * 1e12 / (peaks[isa].as_f64().unwrap() * 1e9);
        assert!((frac / measured - 1.0).abs() < 1e-9, "{frac} vs {measured}");
    }
}

#[test]
fn table_names_the_figures() {
    let mut args = TINY.to_vec();
    args.extend(["--method", "vpt", "--image-size", "16"]);
    let (o, stdout, stderr) = bench_step(&args);
    assert!(o.status.success(), "{stderr}");
    for key in [
        "images/s",
        "effective TFLOP/s",
        "FLOP/step",
        "ms/step",
        "VPT",
        "16 px",
        "FMA peak (measured)",
        "products on",
    ] {
        assert!(stdout.contains(key), "no {key:?} in\n{stdout}");
    }
    assert!(stderr.contains("bench-step: tiny at 16 px"), "{stderr}");
}

/// `bench-step --device cpu ARGS` fails with one `error:` line, exit status 1 and no panic;
/// the message contains `says`.
fn fails_with(args: &[&str], says: &str) {
    let mut all = vec!["--device", "cpu"];
    all.extend_from_slice(args);
    let (o, _, stderr) = bench_step(&all);
    assert_eq!(o.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{args:?}: {stderr}");
    assert!(errors[0].contains(says), "{args:?}: expected {says:?} in {stderr}");
}

#[test]
fn bad_input_is_one_error_line() {
    fails_with(&["--model", "tiny", "--batch", "0"], "--batch must be at least 1, got 0");
    fails_with(&["--model", "tiny", "--steps", "0"], "--steps must be at least 1, got 0");
    fails_with(
        &["--model", "vit-h14"],
        "unknown model 'vit-h14' (expected one of tiny, vit-s16, vit-b16, vit-l16)",
    );
    fails_with(&["--model", "tiny", "--classes", "3"], "exceeds the number of labels K = 3");
    fails_with(&["--model", "tiny", "--image-size", "30"], "not divisible by the patch size 4");
    fails_with(&["--model", "tiny", "--experts", "0"], "experts (E) must be at least 1");
    // Checked before the (large) random ViT-B is built.
    fails_with(&["--classes", "0"], "labels must be at least 1");
    fails_with(&["--attention-kernels", "attn_fwd_d64"], "expects FWD,BWD");
    fails_with(
        &["--attention-kernels", "attn_fwd_d64,attn_bwd_d80"],
        "no backward 'attn_bwd_d80' for head dim 64",
    );
    fails_with(
        &["--attention-kernels", "attn_fwd_x,attn_bwd_d64"],
        "no forward 'attn_fwd_x' for head dim 64 (compiled: attn_fwd_d64",
    );
    fails_with(
        &["--model", "tiny", "--attention-kernels", "attn_fwd_d64,attn_bwd_d64"],
        "head dim 24 has no fused attention kernels",
    );
    fails_with(
        &["--head-kernels", "tf32"],
        "--head-kernels: unknown 'tf32' (expected one of mma, fp32)",
    );
}

/// The report names the fused attention and head kernels ("default" without the flags; on the
/// CPU a given --head-kernels is noted as ignored and still reported).
#[test]
fn attention_kernels_are_reported() {
    let mut args = TINY.to_vec();
    args.extend(["--json"]);
    let (o, stdout, stderr) = bench_step(&args);
    assert!(o.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(v["attention_kernels"], "default", "{v}");
    assert_eq!(v["head_kernels"], "default", "{v}");
    args.extend(["--head-kernels", "fp32"]);
    let (o, stdout, stderr) = bench_step(&args);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("--head-kernels applies to CUDA only"), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(v["head_kernels"], "fp32", "{v}");
}

#[test]
fn device_cuda_without_one_is_an_error() {
    let args = [
        "--device", "cuda", "--model", "tiny", "--batch", "2", "--warmup", "0", "--steps", "1", "--json",
    ];
    let (o, stdout, stderr) = bench_step(&args);
    assert!(!stderr.contains("panicked"), "{stderr}");
    if o.status.success() {
        // A cuda build on a GPU machine.
        assert!(stdout.contains("\"device\":\"cuda"), "{stdout}");
    } else {
        assert_eq!(o.status.code(), Some(1));
        assert!(stderr.starts_with("error: ") && stderr.lines().count() == 1, "{stderr}");
        assert!(stderr.contains("CUDA"), "{stderr}");
    }
}
