//! Every CUDA kernel against its CPU twin (`src/ops/<op>/cpu.rs`) on fresh random inputs at
//! awkward sizes, outputs poisoned with NaN before each run, tolerances per dtype. They need a
//! device: `cargo test --features cuda -- --ignored` on a GPU machine (tools/gpu-runner.sh).
#![cfg(feature = "cuda")]

mod gpu_common;

use gpu_common::*;
use mlvpt::gpu::{bf16, GpuError};
use mlvpt::ops::{asl, cast};
use rand::Rng;


// ---------------------------------------------------------------- casts

/// Values that stress rounding: ties, subnormals, infinities, NaN, huge and tiny.
fn cast_inputs(rng: &mut rand_chacha::ChaCha8Rng, n: usize) -> Vec<f32> {
    let special = [0.0, -0.0, 1.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, f32::MAX, f32::MIN_POSITIVE,
        1e-40, f32::from_bits(0x3f80_8000), f32::from_bits(0x3f81_8000), -3.0e38];
    (0..n)
        .map(|i| if i % 17 == 5 { special[(i / 17) % special.len()] } else { rng.random_range(-1e4f32..1e4) * rng.random::<f32>() })
        .collect()
}

#[test]
#[ignore = "requires a CUDA device"]
fn cast_f32_to_bf16_matches_half_bit_for_bit() {
    let gpu = gpu();
    let (mut rng, seed) = rng("cast_f32_to_bf16");
    for n in [1usize, 3, 4, 5, 1001, (1 << 20) + 3] {
        let x = cast_inputs(&mut rng, n + 1);
        let xd = gpu.upload(&x).unwrap();
        // Offset by one element: the scalar (unaligned) kernel; whole buffer: the vector one.
        for off in [0usize, 1] {
            let mut y = nan_bf16(&gpu, n + 1);
            let xs = xd.slice(off..off + n);
            let mut ys = y.slice_mut(off..off + n);
            cast::cuda::f32_to_bf16(&gpu, gpu.stream(), &xs, &mut ys, n).unwrap();
            let got = gpu.download(&y).unwrap();
            let mut want = vec![bf16::ZERO; n];
            cast::cpu::f32_to_bf16(&x[off..off + n], &mut want);
            for i in 0..n {
                let (g, w) = (got[off + i], want[i]);
                assert!(g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                    "n={n} off={off} [{i}] x={:e}: got {g:?} want {w:?} (seed {seed})", x[off + i]);
            }
        }
    }
}

#[test]
#[ignore = "requires a CUDA device"]
fn cast_bf16_to_f32_is_exact() {
    let gpu = gpu();
    let (mut rng, seed) = rng("cast_bf16_to_f32");
    for n in [1usize, 3, 4, 7, 4099, (1 << 19) + 1] {
        let x: Vec<bf16> = cast_inputs(&mut rng, n + 1).into_iter().map(bf16::from_f32).collect();
        let xd = gpu.upload(&x).unwrap();
        for off in [0usize, 1] {
            let mut y = nan_f32(&gpu, n + 1);
            let xs = xd.slice(off..off + n);
            let mut ys = y.slice_mut(off..off + n);
            cast::cuda::bf16_to_f32(&gpu, gpu.stream(), &xs, &mut ys, n).unwrap();
            let got = gpu.download(&y).unwrap();
            let mut want = vec![0.0f32; n];
            cast::cpu::bf16_to_f32(&x[off..off + n], &mut want);
            for i in 0..n {
                let (g, w) = (got[off + i], want[i]);
                assert!(g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()), "n={n} off={off} [{i}]: {g} vs {w} (seed {seed})");
            }
        }
    }
}

// ---------------------------------------------------------------- ASL

/// Logits in [-14, 14] kept 1e-3 away from where a clamp or the clip switches on (p = eps,
/// 1 - p = eps, p = clip): there the f32 and f64 evaluations may take different branches, and
/// the gradient jumps.
fn asl_logits(rng: &mut rand_chacha::ChaCha8Rng, n: usize, cfg: &asl::AslConfig) -> Vec<f32> {
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

fn asl_configs() -> Vec<asl::AslConfig> {
    let d = asl::AslConfig::default();
    vec![
        d,
        asl::AslConfig { exact_grad: true, ..d },
        asl::AslConfig { gamma_pos: 1.0, gamma_neg: 4.0, clip: 0.05, ..d },
        asl::AslConfig { gamma_pos: 0.5, gamma_neg: 3.0, clip: 0.05, exact_grad: true, eps: 1e-4 },
    ]
}

#[test]
#[ignore = "requires a CUDA device"]
fn asl_matches_cpu_and_is_deterministic() {
    let gpu = gpu();
    let (mut rng, seed) = rng("asl");
    let mut ws = asl::cuda::AslWorkspace::new(&gpu).unwrap();
    for cfg in asl_configs() {
        for (b, k) in [(1usize, 1usize), (1, 7), (3, 80), (17, 997), (64, 81), (512, 1000)] {
            let n = b * k;
            let x = asl_logits(&mut rng, n, &cfg);
            let y: Vec<f32> = (0..n).map(|_| if rng.random::<f32>() < 0.2 { 1.0 } else { 0.0 }).collect();
            let (x64, y64) = (to_f64(&x), to_f64(&y));
            let mut want_g = vec![0.0f64; n];
            let want = asl::asl_forward_backward(&x64, &y64, &cfg, Some(&mut want_g));
            let scale = 1000.0 / n as f32;

            let (xd, yd) = (gpu.upload(&x).unwrap(), gpu.upload(&y).unwrap());
            let mut losses = Vec::new();
            for _run in 0..2 {
                let mut g = nan_f32(&gpu, n);
                let mut loss = nan_f32(&gpu, 1);
                asl::cuda::forward_backward(&gpu, gpu.stream(), &mut ws, &xd, &yd, &cfg, scale, Some(&mut g), &mut loss, n).unwrap();
                let got_g = gpu.download(&g).unwrap();
                let got = gpu.download(&loss).unwrap()[0];
                let what = format!("asl {cfg:?} b={b} k={k}");
                let want_gs: Vec<f64> = want_g.iter().map(|v| v * scale as f64).collect();
                assert_close(&format!("{what} grad"), &got_g, &want_gs, 1e-7 * scale as f64, 2e-5, seed);
                assert_close(&format!("{what} loss"), &[got], &[want * scale as f64], 1e-6, 1e-5, seed);
                losses.push(got.to_bits());
            }
            assert_eq!(losses[0], losses[1], "asl loss differs between two runs (seed {seed})");
            // Loss only, no gradient buffer.
            let mut loss = nan_f32(&gpu, 1);
            asl::cuda::forward_backward(&gpu, gpu.stream(), &mut ws, &xd, &yd, &cfg, scale, None, &mut loss, n).unwrap();
            assert_eq!(gpu.download(&loss).unwrap()[0].to_bits(), losses[0], "loss without grad (seed {seed})");
        }
    }
}

#[test]
#[ignore = "requires a CUDA device"]
fn asl_rejects_short_buffers_and_bad_config() {
    let gpu = gpu();
    let mut ws = asl::cuda::AslWorkspace::new(&gpu).unwrap();
    let x = gpu.upload(&[0.0f32; 4]).unwrap();
    let mut loss = gpu.zeros::<f32>(1).unwrap();
    let err = asl::cuda::forward_backward(&gpu, gpu.stream(), &mut ws, &x, &x, &Default::default(), 1.0, None, &mut loss, 5);
    assert!(matches!(err, Err(GpuError::Invalid { .. })), "{err:?}");
    let bad = asl::AslConfig { eps: 0.0, ..Default::default() };
    let err = asl::cuda::forward_backward(&gpu, gpu.stream(), &mut ws, &x, &x, &bad, 1.0, None, &mut loss, 4);
    assert!(err.unwrap_err().to_string().contains("eps"));
}

// ---------------------------------------------------------------- cuBLAS GEMM

/// `y[m, n] = x[m, k] w[n, k]^T + b` in f64 (the oracle for the GEMM wrapper).
fn linear_ref(x: &[f32], w: &[f32], b: Option<&[f32]>, m: usize, n: usize, k: usize) -> Vec<f64> {
    let mut y = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let dot: f64 = (0..k).map(|t| x[i * k + t] as f64 * w[j * k + t] as f64).sum();
            y[i * n + j] = dot + b.map_or(0.0, |b| b[j] as f64);
        }
    }
    y
}

fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    (0..cols * rows).map(|i| a[(i % rows) * cols + i / rows]).collect()
}

#[test]
#[ignore = "requires a CUDA device"]
fn gemm_linear_shapes_match_f64_in_bf16_and_f32() {
    let gpu = gpu();
    let (mut rng, seed) = rng("gemm");
    for (m, n, k) in [(1usize, 1usize, 1usize), (3, 5, 7), (37, 19, 100), (227, 96, 768), (65, 2304, 768)] {
        let x = uniform(&mut rng, m * k, -1.0, 1.0);
        let w = uniform(&mut rng, n * k, -0.1, 0.1);
        let b = uniform(&mut rng, n, -1.0, 1.0);
        let dy = uniform(&mut rng, m * n, -1.0, 1.0);
        let what = format!("m={m} n={n} k={k}");
        // f32 in, f32 out: Y = X W^T + b, dX = dY W, dW = dY^T X.
        {
            let (xd, wd, bd, dyd) = (gpu.upload(&x).unwrap(), gpu.upload(&w).unwrap(), gpu.upload(&b).unwrap(), gpu.upload(&dy).unwrap());
            let mut y = nan_f32(&gpu, m * n);
            gpu.linear_forward(&xd, &wd, Some(&bd), &mut y, m, n, k, false).unwrap();
            // TF32 is not enabled, so f32 GEMMs are full precision.
            assert_close(&format!("f32 Y {what}"), &gpu.download(&y).unwrap(), &linear_ref(&x, &w, Some(&b), m, n, k), 1e-5, 1e-4, seed);
            let mut dx = nan_f32(&gpu, m * k);
            gpu.linear_backward_input(&dyd, &wd, &mut dx, m, n, k, false).unwrap();
            let want_dx = linear_ref(&dy, &transpose(&w, n, k), None, m, k, n);
            assert_close(&format!("f32 dX {what}"), &gpu.download(&dx).unwrap(), &want_dx, 1e-5, 1e-4, seed);
            let mut dw = nan_f32(&gpu, n * k);
            gpu.linear_backward_weight(&dyd, &xd, &mut dw, m, n, k, false).unwrap();
            let want_dw = linear_ref(&transpose(&dy, m, n), &transpose(&x, m, k), None, n, k, m);
            assert_close(&format!("f32 dW {what}"), &gpu.download(&dw).unwrap(), &want_dw, 1e-5, 1e-4, seed);
            // accumulate adds onto what is there.
            gpu.linear_backward_weight(&dyd, &xd, &mut dw, m, n, k, true).unwrap();
            let twice: Vec<f64> = want_dw.iter().map(|v| 2.0 * v).collect();
            assert_close(&format!("f32 dW accumulate {what}"), &gpu.download(&dw).unwrap(), &twice, 2e-5, 1e-4, seed);
        }
        // bf16 in (the reference sees the same rounded values), fp32 compute, bf16 and f32 out.
        {
            let (xb, xr) = bf16_values(&x);
            let (wb, wr) = bf16_values(&w);
            let (xd, wd, bd) = (gpu.upload(&xb).unwrap(), gpu.upload(&wb).unwrap(), gpu.upload(&b).unwrap());
            let want = linear_ref(&xr, &wr, Some(&b), m, n, k);
            let mut y32 = nan_f32(&gpu, m * n);
            gpu.linear_forward(&xd, &wd, Some(&bd), &mut y32, m, n, k, false).unwrap();
            assert_close(&format!("bf16->f32 Y {what}"), &gpu.download(&y32).unwrap(), &want, 1e-4, 1e-4, seed);
            let mut y16 = nan_bf16(&gpu, m * n);
            gpu.linear_forward(&xd, &wd, Some(&bd), &mut y16, m, n, k, false).unwrap();
            // bias rounded to bf16 once, the result once: two half-ulps of bf16.
            let scale: Vec<f64> = want.iter().zip(&b.repeat(m)).map(|(y, b)| y.abs() + (*b as f64).abs()).collect();
            let got = to_f32(&gpu.download(&y16).unwrap());
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                assert!((g as f64 - w).abs() <= 1e-4 + scale[i] * 2.0f64.powi(-8), "bf16 Y {what} [{i}]: {g} vs {w} (seed {seed})");
            }
        }
    }
}
