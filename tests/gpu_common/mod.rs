//! Shared by the GPU tests: the device, fresh random inputs (seed printed, `MLVPT_TEST_SEED`
//! replays one), NaN-poisoned outputs, and tolerance checks that name the worst element.
#![allow(dead_code)]

use mlvpt::gpu::{bf16, CudaSlice, GpuContext};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Device 0, or a panic that says the test needs one (these tests are `#[ignore]`d).
pub fn gpu() -> GpuContext {
    GpuContext::new(0).unwrap_or_else(|e| panic!("this test requires a CUDA device: {e}"))
}

/// Whether the tests run on the virtual CUDA device (tools/vgpu), which interprets PTX on the
/// CPU: case grids shrink there to what CI's two cores can run, keeping the awkward sizes.
pub fn on_virtual_device() -> bool {
    GpuContext::new(0).map(|g| g.is_virtual()).unwrap_or(false)
}

/// A fresh generator per test; its seed is printed so a failure can be replayed.
pub fn rng(test: &str) -> (ChaCha8Rng, u64) {
    let seed = std::env::var("MLVPT_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("{test}: MLVPT_TEST_SEED={seed}");
    (ChaCha8Rng::seed_from_u64(seed), seed)
}

pub fn uniform(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// Values rounded to bf16, as the GPU will see them (returned both ways).
pub fn bf16_values(v: &[f32]) -> (Vec<bf16>, Vec<f32>) {
    let b: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
    let f = b.iter().map(|x| x.to_f32()).collect();
    (b, f)
}

pub fn nan_f32(gpu: &GpuContext, n: usize) -> CudaSlice<f32> {
    gpu.upload(&vec![f32::NAN; n]).expect("upload")
}
pub fn nan_bf16(gpu: &GpuContext, n: usize) -> CudaSlice<bf16> {
    gpu.upload(&vec![bf16::NAN; n]).expect("upload")
}

pub fn to_f32(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}
pub fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Fails unless every |got - want| <= atol + rtol |want| (NaN in `got`, e.g. an element the
/// kernel never wrote over the poison, fails too), naming the worst element and the seed.
pub fn assert_close(what: &str, got: &[f32], want: &[f64], atol: f64, rtol: f64, seed: u64) {
    assert_within(
        &format!("{what} (atol {atol:e}, rtol {rtol:e})"),
        got,
        want,
        |i| atol + rtol * want[i].abs(),
        seed,
    );
}

/// Fails unless every |got[i] - want[i]| <= bound(i) (NaN in `got` fails), naming the worst
/// element, its bound and the seed.
pub fn assert_within(what: &str, got: &[f32], want: &[f64], bound: impl Fn(usize) -> f64, seed: u64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst: Option<(usize, f64)> = None;
    let mut bad = 0usize;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        let excess = if err.is_nan() { f64::INFINITY } else { err - bound(i) };
        if excess > 0.0 {
            bad += 1;
            if worst.is_none_or(|(_, e)| excess > e) {
                worst = Some((i, excess));
            }
        }
    }
    if let Some((i, _)) = worst {
        panic!(
            "{what}: {bad} of {} elements off; worst [{i}]: got {}, want {}, bound {} (MLVPT_TEST_SEED={seed})",
            got.len(),
            got[i],
            want[i],
            bound(i)
        );
    }
}

/// Logits in [-14, 14] kept 1e-3 away from where a clamp or the clip switches on (p = eps,
/// 1 - p = eps, p = clip): there the f32 and f64 evaluations may take different branches, and
/// the gradient jumps.
pub fn asl_logits(rng: &mut ChaCha8Rng, n: usize, cfg: &mlvpt::ops::asl::AslConfig) -> Vec<f32> {
    let logit = |p: f64| (p / (1.0 - p)).ln();
    let mut edges = vec![logit(cfg.eps), -logit(cfg.eps)];
    if cfg.clip > 0.0 {
        edges.push(logit(cfg.clip));
        edges.push(logit(cfg.clip + cfg.eps));
    }
    (0..n)
        .map(|_| loop {
            let x = rng.random_range(-14.0f32..14.0);
            if edges.iter().all(|e| (x as f64 - e).abs() > 1e-3) {
                break x;
            }
        })
        .collect()
}
