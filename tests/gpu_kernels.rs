//! Every CUDA kernel against its CPU twin (`src/ops/<op>/cpu.rs`) on fresh random inputs at
//! awkward sizes, outputs poisoned with NaN before each run, tolerances per dtype. They need a
//! device: `cargo test --features cuda -- --ignored` on a GPU machine (tools/gpu-runner.sh).
#![cfg(feature = "cuda")]

mod gpu_common;

use gpu_common::*;
use mlvpt::gpu::{bf16, GpuError};
use mlvpt::ops::{adamw, asl, cast, gelu, layernorm, linear};
use rand::Rng;

// ---------------------------------------------------------------- casts

/// Values that stress rounding: ties, subnormals, infinities, NaN, huge and tiny.
fn cast_inputs(rng: &mut rand_chacha::ChaCha8Rng, n: usize) -> Vec<f32> {
    let special = [
        0.0,
        -0.0,
        1.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::MAX,
        f32::MIN_POSITIVE,
        1e-40,
        f32::from_bits(0x3f80_8000),
        f32::from_bits(0x3f81_8000),
        -3.0e38,
    ];
    (0..n)
        .map(|i| {
            if i % 17 == 5 {
                special[(i / 17) % special.len()]
            } else {
                rng.random_range(-1e4f32..1e4) * rng.random::<f32>()
            }
        })
        .collect()
}

#[test]
#[ignore = "requires a CUDA device"]
fn cast_f32_to_bf16_matches_half_bit_for_bit() {
    let gpu = gpu();
    let (mut rng, seed) = rng("cast_f32_to_bf16");
    for n in [1usize, 3, 4, 5, 1001, (1 << 22) + 3] {
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
                assert!(
                    g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                    "n={n} off={off} [{i}] x={:e}: got {g:?} want {w:?} (seed {seed})",
                    x[off + i]
                );
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
                assert!(
                    g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                    "n={n} off={off} [{i}]: {g} vs {w} (seed {seed})"
                );
            }
        }
    }
}

// ---------------------------------------------------------------- ASL

fn asl_configs() -> Vec<asl::AslConfig> {
    let d = asl::AslConfig::default();
    vec![
        d,
        asl::AslConfig { exact_grad: true, ..d },
        asl::AslConfig {
            gamma_pos: 1.0,
            gamma_neg: 4.0,
            clip: 0.05,
            ..d
        },
        asl::AslConfig {
            gamma_pos: 0.5,
            gamma_neg: 3.0,
            clip: 0.05,
            exact_grad: true,
            eps: 1e-4,
        },
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
            assert_eq!(
                gpu.download(&loss).unwrap()[0].to_bits(),
                losses[0],
                "loss without grad (seed {seed})"
            );
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
    let bad = asl::AslConfig {
        eps: 0.0,
        ..Default::default()
    };
    let err = asl::cuda::forward_backward(&gpu, gpu.stream(), &mut ws, &x, &x, &bad, 1.0, None, &mut loss, 4);
    assert!(err.unwrap_err().to_string().contains("eps"));
}

// ---------------------------------------------------------------- cuBLAS GEMM

/// `y[m, n] = x[m, k] w[n, k]^T + b` by the CPU twin in f64.
fn linear_ref(x: &[f32], w: &[f32], b: Option<&[f32]>, m: usize, n: usize, k: usize) -> Vec<f64> {
    let mut y = vec![0.0; m * n];
    let b64 = b.map(to_f64);
    linear::cpu::forward(&to_f64(x), &to_f64(w), b64.as_deref(), &mut y, m, k, n);
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
    // (600, 2304, 64): the bias broadcast takes several grid-stride steps.
    for (m, n, k) in [
        (1usize, 1usize, 1usize),
        (3, 5, 7),
        (37, 19, 100),
        (227, 96, 768),
        (65, 2304, 768),
        (600, 2304, 64),
    ] {
        let x = uniform(&mut rng, m * k, -1.0, 1.0);
        let w = uniform(&mut rng, n * k, -0.1, 0.1);
        let b = uniform(&mut rng, n, -1.0, 1.0);
        let dy = uniform(&mut rng, m * n, -1.0, 1.0);
        let what = format!("m={m} n={n} k={k}");
        // f32 accumulation error grows with the inner length K and the operands' size:
        // allow 4 units of 2^-24 per term (a wrong index or transpose is off by O(1)).
        let atol = |inner: usize, amax: f64, bmax: f64| 1e-6 + inner as f64 * 4.0 * 2f64.powi(-24) * amax * bmax;
        // f32 in, f32 out: Y = X W^T + b, dX = dY W, dW = dY^T X.
        {
            let (xd, wd, bd, dyd) = (
                gpu.upload(&x).unwrap(),
                gpu.upload(&w).unwrap(),
                gpu.upload(&b).unwrap(),
                gpu.upload(&dy).unwrap(),
            );
            let mut y = nan_f32(&gpu, m * n);
            mlvpt::ops::linear::cuda::forward(&gpu, &xd, &wd, Some(&bd), &mut y, m, n, k, false).unwrap();
            // TF32 is not enabled, so f32 GEMMs are full precision.
            assert_close(
                &format!("f32 Y {what}"),
                &gpu.download(&y).unwrap(),
                &linear_ref(&x, &w, Some(&b), m, n, k),
                atol(k, 1.0, 0.1),
                1e-5,
                seed,
            );
            let mut dx = nan_f32(&gpu, m * k);
            mlvpt::ops::linear::cuda::backward_input(&gpu, &dyd, &wd, &mut dx, m, n, k, false).unwrap();
            let mut want_dx = vec![0.0; m * k];
            linear::cpu::backward_input(&to_f64(&dy), &to_f64(&w), &mut want_dx, m, k, n, false);
            assert_close(
                &format!("f32 dX {what}"),
                &gpu.download(&dx).unwrap(),
                &want_dx,
                atol(n, 1.0, 0.1),
                1e-5,
                seed,
            );
            let mut dw = nan_f32(&gpu, n * k);
            mlvpt::ops::linear::cuda::backward_weight(&gpu, &dyd, &xd, &mut dw, m, n, k, false).unwrap();
            let want_dw = linear_ref(&transpose(&dy, m, n), &transpose(&x, m, k), None, n, k, m);
            assert_close(
                &format!("f32 dW {what}"),
                &gpu.download(&dw).unwrap(),
                &want_dw,
                atol(m, 1.0, 1.0),
                1e-5,
                seed,
            );
            // accumulate adds onto what is there.
            mlvpt::ops::linear::cuda::backward_weight(&gpu, &dyd, &xd, &mut dw, m, n, k, true).unwrap();
            let twice: Vec<f64> = want_dw.iter().map(|v| 2.0 * v).collect();
            assert_close(
                &format!("f32 dW accumulate {what}"),
                &gpu.download(&dw).unwrap(),
                &twice,
                2.0 * atol(m, 1.0, 1.0),
                1e-5,
                seed,
            );
        }
        // bf16 in (the reference sees the same rounded values), fp32 compute, bf16 and f32 out.
        {
            let (xb, xr) = bf16_values(&x);
            let (wb, wr) = bf16_values(&w);
            let (xd, wd, bd) = (gpu.upload(&xb).unwrap(), gpu.upload(&wb).unwrap(), gpu.upload(&b).unwrap());
            let want = linear_ref(&xr, &wr, Some(&b), m, n, k);
            let mut y32 = nan_f32(&gpu, m * n);
            mlvpt::ops::linear::cuda::forward(&gpu, &xd, &wd, Some(&bd), &mut y32, m, n, k, false).unwrap();
            assert_close(
                &format!("bf16->f32 Y {what}"),
                &gpu.download(&y32).unwrap(),
                &want,
                atol(k, 1.0, 0.1),
                1e-5,
                seed,
            );
            let mut y16 = nan_bf16(&gpu, m * n);
            mlvpt::ops::linear::cuda::forward(&gpu, &xd, &wd, Some(&bd), &mut y16, m, n, k, false).unwrap();
            // bias rounded to bf16 once, the result once, and cuBLAS may pick a split-K
            // algorithm whose partial sums are rounded to the output type (seen on an H100:
            // 1.2 bf16 ulps off). The f32-out path above is checked tightly; here allow 3 ulps.
            let scale: Vec<f64> = want.iter().zip(&b.repeat(m)).map(|(y, b)| y.abs() + (*b as f64).abs()).collect();
            let got = to_f32(&gpu.download(&y16).unwrap());
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g as f64 - w).abs() <= atol(k, 1.0, 0.1) + scale[i] * 3.0 * 2.0f64.powi(-8),
                    "bf16 Y {what} [{i}]: {g} vs {w} (seed {seed})"
                );
            }
        }
    }
}

// ---------------------------------------------------------------- LayerNorm

#[test]
#[ignore = "requires a CUDA device"]
fn layernorm_forward_and_backward_match_cpu() {
    let gpu = gpu();
    let (mut rng, seed) = rng("layernorm");
    let eps = layernorm::VIT_EPS;
    // 520: the three-chunk vector kernel with one lane of its last chunk busy.
    for (rows, d) in [
        (1usize, 1usize),
        (3, 7),
        (37, 100),
        (129, 384),
        (64, 768),
        (17, 1000),
        (33, 1024),
        (300, 96),
        (5, 520),
    ] {
        let what = format!("rows={rows} d={d}");
        let shift = rng.random_range(-3.0f32..3.0);
        let x: Vec<f32> = uniform(&mut rng, rows * d, -2.0, 2.0).iter().map(|v| v + shift).collect();
        let (xb, xr) = bf16_values(&x);
        let gamma = uniform(&mut rng, d, 0.5, 1.5);
        let beta = uniform(&mut rng, d, -0.5, 0.5);
        let (dyb, dyr) = bf16_values(&uniform(&mut rng, rows * d, -1.0, 1.0));
        let (prevb, prevr) = bf16_values(&uniform(&mut rng, rows * d, -1.0, 1.0));

        let (mut y64, mut mean64, mut rstd64) = (vec![0.0; rows * d], vec![0.0; rows], vec![0.0; rows]);
        layernorm::cpu::forward(
            &to_f64(&xr),
            &to_f64(&gamma),
            &to_f64(&beta),
            &mut y64,
            &mut mean64,
            &mut rstd64,
            rows,
            d,
            eps,
        );

        let (xd, gd, bd, dyd) = (
            gpu.upload(&xb).unwrap(),
            gpu.upload(&gamma).unwrap(),
            gpu.upload(&beta).unwrap(),
            gpu.upload(&dyb).unwrap(),
        );
        let mut y = nan_bf16(&gpu, rows * d);
        let (mut mean, mut rstd) = (nan_f32(&gpu, rows), nan_f32(&gpu, rows));
        layernorm::cuda::forward(&gpu, gpu.stream(), &xd, &gd, &bd, &mut y, &mut mean, &mut rstd, rows, d, eps).unwrap();
        assert_close(
            &format!("LN y {what}"),
            &to_f32(&gpu.download(&y).unwrap()),
            &y64,
            1e-5,
            2f64.powi(-8),
            seed,
        );
        assert_close(&format!("LN mean {what}"), &gpu.download(&mean).unwrap(), &mean64, 1e-6, 1e-5, seed);
        assert_close(&format!("LN rstd {what}"), &gpu.download(&rstd).unwrap(), &rstd64, 0.0, 1e-4, seed);

        for accumulate in [false, true] {
            let mut dx64 = if accumulate { to_f64(&prevr) } else { vec![0.0; rows * d] };
            layernorm::cpu::backward(
                &to_f64(&dyr),
                &to_f64(&xr),
                &to_f64(&gamma),
                &mean64,
                &rstd64,
                &mut dx64,
                rows,
                d,
                accumulate,
            );
            let mut dx = if accumulate {
                gpu.upload(&prevb).unwrap()
            } else {
                nan_bf16(&gpu, rows * d)
            };
            layernorm::cuda::backward(&gpu, gpu.stream(), &dyd, &xd, &gd, &mean, &rstd, &mut dx, rows, d, accumulate).unwrap();
            // The input gradient is a difference of O(rstd) terms: error relative to that scale.
            let tol = 1e-4 * rstd64.iter().fold(1.0f64, |a, &r| a.max(r.min(1e3)));
            assert_close(
                &format!("LN dx acc={accumulate} {what}"),
                &to_f32(&gpu.download(&dx).unwrap()),
                &dx64,
                tol,
                2f64.powi(-8),
                seed,
            );
        }
    }
    // The scalar kernel on rows the vector kernel would take, by misaligning the views.
    let (rows, d) = (5usize, 64usize);
    let (xb, xr) = bf16_values(&uniform(&mut rng, rows * d + 1, -1.0, 1.0));
    let (gamma, beta) = (vec![1.0f32; d], vec![0.0f32; d]);
    let (mut y64, mut m64, mut r64) = (vec![0.0; rows * d], vec![0.0; rows], vec![0.0; rows]);
    layernorm::cpu::forward(
        &to_f64(&xr[1..]),
        &to_f64(&gamma),
        &to_f64(&beta),
        &mut y64,
        &mut m64,
        &mut r64,
        rows,
        d,
        eps,
    );
    let xd = gpu.upload(&xb).unwrap();
    let (gd, bd) = (gpu.upload(&gamma).unwrap(), gpu.upload(&beta).unwrap());
    let mut y = nan_bf16(&gpu, rows * d + 1);
    let (mut mean, mut rstd) = (nan_f32(&gpu, rows), nan_f32(&gpu, rows));
    let mut ys = y.slice_mut(1..);
    layernorm::cuda::forward(
        &gpu,
        gpu.stream(),
        &xd.slice(1..),
        &gd,
        &bd,
        &mut ys,
        &mut mean,
        &mut rstd,
        rows,
        d,
        eps,
    )
    .unwrap();
    assert_close(
        "LN y misaligned",
        &to_f32(&gpu.download(&y).unwrap())[1..],
        &y64,
        1e-5,
        2f64.powi(-8),
        seed,
    );
}

/// The fp32-storage kernels (`layernorm_*_f32x*`: the CUDA backend's residual stream and its
/// gradient are fp32): x read and dx written/accumulated in fp32, y still bf16.
#[test]
#[ignore = "requires a CUDA device"]
fn layernorm_on_fp32_storage_matches_cpu() {
    let gpu = gpu();
    let (mut rng, seed) = rng("layernorm f32");
    let eps = layernorm::VIT_EPS;
    // 40: the one-chunk vector kernel; 520: three chunks, the last nearly empty.
    for (rows, d) in [
        (1usize, 1usize),
        (3, 7),
        (5, 40),
        (37, 100),
        (129, 384),
        (5, 520),
        (64, 768),
        (17, 1000),
        (33, 1024),
    ] {
        let what = format!("f32 storage rows={rows} d={d}");
        let shift = rng.random_range(-3.0f32..3.0);
        let x: Vec<f32> = uniform(&mut rng, rows * d, -2.0, 2.0).iter().map(|v| v + shift).collect();
        let (gamma, beta) = (uniform(&mut rng, d, 0.5, 1.5), uniform(&mut rng, d, -0.5, 0.5));
        let (dyb, dyr) = bf16_values(&uniform(&mut rng, rows * d, -1.0, 1.0));
        let prev = uniform(&mut rng, rows * d, -1.0, 1.0);
        let (mut y64, mut mean64, mut rstd64) = (vec![0.0; rows * d], vec![0.0; rows], vec![0.0; rows]);
        layernorm::cpu::forward(
            &to_f64(&x),
            &to_f64(&gamma),
            &to_f64(&beta),
            &mut y64,
            &mut mean64,
            &mut rstd64,
            rows,
            d,
            eps,
        );

        let (xd, gd, bd, dyd) = (
            gpu.upload(&x).unwrap(),
            gpu.upload(&gamma).unwrap(),
            gpu.upload(&beta).unwrap(),
            gpu.upload(&dyb).unwrap(),
        );
        let mut y = nan_bf16(&gpu, rows * d);
        let (mut mean, mut rstd) = (nan_f32(&gpu, rows), nan_f32(&gpu, rows));
        layernorm::cuda::forward::<f32>(&gpu, gpu.stream(), &xd, &gd, &bd, &mut y, &mut mean, &mut rstd, rows, d, eps).unwrap();
        assert_close(
            &format!("LN y {what}"),
            &to_f32(&gpu.download(&y).unwrap()),
            &y64,
            1e-5,
            2f64.powi(-8),
            seed,
        );
        assert_close(&format!("LN mean {what}"), &gpu.download(&mean).unwrap(), &mean64, 1e-6, 1e-5, seed);
        assert_close(&format!("LN rstd {what}"), &gpu.download(&rstd).unwrap(), &rstd64, 0.0, 1e-4, seed);
        for accumulate in [false, true] {
            let mut dx64 = if accumulate { to_f64(&prev) } else { vec![0.0; rows * d] };
            layernorm::cpu::backward(
                &to_f64(&dyr),
                &to_f64(&x),
                &to_f64(&gamma),
                &mean64,
                &rstd64,
                &mut dx64,
                rows,
                d,
                accumulate,
            );
            let mut dx = if accumulate {
                gpu.upload(&prev).unwrap()
            } else {
                nan_f32(&gpu, rows * d)
            };
            layernorm::cuda::backward::<f32>(&gpu, gpu.stream(), &dyd, &xd, &gd, &mean, &rstd, &mut dx, rows, d, accumulate).unwrap();
            // fp32 storage: only the kernel's fp32 arithmetic separates it from the f64 twin.
            let tol = 1e-5 * rstd64.iter().fold(1.0f64, |a, &r| a.max(r.min(1e3)));
            assert_close(
                &format!("LN dx acc={accumulate} {what}"),
                &gpu.download(&dx).unwrap(),
                &dx64,
                tol,
                1e-5,
                seed,
            );
        }
    }
}

/// The residual add fused into the forward (`residual_forward`): `out` and the LayerNorm of it
/// against the CPU, with and without LayerScale, branch output in bf16 and in fp32.
#[test]
#[ignore = "requires a CUDA device"]
fn residual_layernorm_forward_matches_cpu() {
    let gpu = gpu();
    let (mut rng, seed) = rng("residual layernorm");
    let eps = layernorm::VIT_EPS;
    // 40 and 520: the one-chunk and a nearly empty third chunk of the vector kernels.
    for (rows, d, with_ls) in [
        (1usize, 1usize, true),
        (3, 7, false),
        (5, 40, false),
        (37, 100, true),
        (129, 384, false),
        (5, 520, true),
        (64, 768, true),
        (33, 1024, true),
    ] {
        let what = format!("rows={rows} d={d} ls={with_ls}");
        let x = uniform(&mut rng, rows * d, 1.0, 4.0);
        let (fb, fr) = bf16_values(&uniform(&mut rng, rows * d, -2.0, 2.0));
        let ls = uniform(&mut rng, d, 0.1, 1.0);
        let (gamma, beta) = (uniform(&mut rng, d, 0.5, 1.5), uniform(&mut rng, d, -0.5, 0.5));
        let out64: Vec<f64> = (0..rows * d)
            .map(|i| x[i] as f64 + if with_ls { ls[i % d] as f64 } else { 1.0 } * fr[i] as f64)
            .collect();
        let (xd, ld, gd, bd) = (
            gpu.upload(&x).unwrap(),
            gpu.upload(&ls).unwrap(),
            gpu.upload(&gamma).unwrap(),
            gpu.upload(&beta).unwrap(),
        );
        let lsd: Option<&dyn mlvpt::gpu::DevicePtr<f32>> = if with_ls { Some(&ld) } else { None };
        let fdb = gpu.upload(&fb).unwrap();
        let fdf = gpu.upload(&fr).unwrap();
        for branch_bf16 in [true, false] {
            let mut out = nan_f32(&gpu, rows * d);
            let mut y = nan_bf16(&gpu, rows * d);
            let (mut mean, mut rstd) = (nan_f32(&gpu, rows), nan_f32(&gpu, rows));
            if branch_bf16 {
                layernorm::cuda::residual_forward::<bf16>(
                    &gpu,
                    gpu.stream(),
                    &xd,
                    &fdb,
                    lsd,
                    &mut out,
                    &gd,
                    &bd,
                    &mut y,
                    &mut mean,
                    &mut rstd,
                    rows,
                    d,
                    eps,
                )
                .unwrap();
            } else {
                layernorm::cuda::residual_forward::<f32>(
                    &gpu,
                    gpu.stream(),
                    &xd,
                    &fdf,
                    lsd,
                    &mut out,
                    &gd,
                    &bd,
                    &mut y,
                    &mut mean,
                    &mut rstd,
                    rows,
                    d,
                    eps,
                )
                .unwrap();
            }
            let what = format!("{what} branch bf16={branch_bf16}");
            let got_out = gpu.download(&out).unwrap();
            assert_close(&format!("residual out {what}"), &got_out, &out64, 1e-6, 1e-6, seed);
            let (mut y64, mut m64, mut r64) = (vec![0.0; rows * d], vec![0.0; rows], vec![0.0; rows]);
            layernorm::cpu::forward(
                &to_f64(&got_out),
                &to_f64(&gamma),
                &to_f64(&beta),
                &mut y64,
                &mut m64,
                &mut r64,
                rows,
                d,
                eps,
            );
            assert_close(
                &format!("residual LN y {what}"),
                &to_f32(&gpu.download(&y).unwrap()),
                &y64,
                1e-5,
                2f64.powi(-8),
                seed,
            );
            assert_close(
                &format!("residual LN mean {what}"),
                &gpu.download(&mean).unwrap(),
                &m64,
                1e-6,
                1e-5,
                seed,
            );
            assert_close(
                &format!("residual LN rstd {what}"),
                &gpu.download(&rstd).unwrap(),
                &r64,
                0.0,
                1e-4,
                seed,
            );
        }
    }
}

#[test]
#[ignore = "requires a CUDA device"]
fn layernorm_rejects_rows_longer_than_1024() {
    let gpu = gpu();
    let d = layernorm::cuda::MAX_D + 1;
    let x = gpu.zeros::<bf16>(d).unwrap();
    let g = gpu.zeros::<f32>(d).unwrap();
    let mut y = gpu.zeros::<bf16>(d).unwrap();
    let (mut m, mut r) = (gpu.zeros::<f32>(1).unwrap(), gpu.zeros::<f32>(1).unwrap());
    let err = layernorm::cuda::forward(&gpu, gpu.stream(), &x, &g, &g, &mut y, &mut m, &mut r, 1, d, 1e-6);
    assert!(matches!(err, Err(GpuError::Invalid { .. })), "{err:?}");
}

// ---------------------------------------------------------------- bias + GELU

#[test]
#[ignore = "requires a CUDA device"]
fn gelu_bias_forward_and_backward_match_cpu() {
    let gpu = gpu();
    let (mut rng, seed) = rng("gelu");
    for (rows, cols, with_bias, off) in [
        (1usize, 1usize, true, 0usize),
        (3, 7, true, 0),
        (37, 100, false, 0),
        (129, 3072, true, 0),
        (5, 1000, true, 0),
        (7, 384, true, 1),
        (64, 1536, false, 0),
        // Past one wave of threads (8 blocks x 256 per SM): the kernels' grid-stride loops and
        // column walk take more than one step.
        (1100, 1001, true, 0),
        (1000, 3072, true, 0),
    ] {
        let what = format!("rows={rows} cols={cols} bias={with_bias} off={off}");
        let n = rows * cols;
        let (xb, xr) = bf16_values(&uniform(&mut rng, n + off, -6.0, 6.0));
        let (dyb, dyr) = bf16_values(&uniform(&mut rng, n + off, -1.0, 1.0));
        let b = uniform(&mut rng, cols, -1.0, 1.0);
        // The twin on h = x + b.
        let h: Vec<f64> = (0..n)
            .map(|i| xr[off + i] as f64 + if with_bias { b[i % cols] as f64 } else { 0.0 })
            .collect();
        let mut y64 = vec![0.0; n];
        gelu::cpu::forward(&h, &mut y64, n);
        let mut dx64: Vec<f64> = to_f64(&dyr[off..]);
        gelu::cpu::backward(&h, &mut dx64, n);

        let (xd, dyd, bd) = (gpu.upload(&xb).unwrap(), gpu.upload(&dyb).unwrap(), gpu.upload(&b).unwrap());
        let bias: Option<&dyn mlvpt::gpu::DevicePtr<f32>> = if with_bias { Some(&bd) } else { None };
        let xs = xd.slice(off..);
        let mut y = nan_bf16(&gpu, n + off);
        gelu::cuda::forward(&gpu, gpu.stream(), &xs, bias, &mut y.slice_mut(off..), rows, cols).unwrap();
        assert_close(
            &format!("gelu y {what}"),
            &to_f32(&gpu.download(&y).unwrap())[off..],
            &y64,
            1e-6,
            2f64.powi(-8),
            seed,
        );

        let mut dx = nan_bf16(&gpu, n + off);
        gelu::cuda::backward(
            &gpu,
            gpu.stream(),
            &xs,
            bias,
            &dyd.slice(off..),
            &mut dx.slice_mut(off..),
            rows,
            cols,
        )
        .unwrap();
        assert_close(
            &format!("gelu dx {what}"),
            &to_f32(&gpu.download(&dx).unwrap())[off..],
            &dx64,
            1e-5,
            2f64.powi(-8),
            seed,
        );

        let mut d = gpu.upload(&dyb).unwrap();
        gelu::cuda::backward_in_place(&gpu, gpu.stream(), &xs, bias, &mut d.slice_mut(off..), rows, cols).unwrap();
        assert_close(
            &format!("gelu dx in place {what}"),
            &to_f32(&gpu.download(&d).unwrap())[off..],
            &dx64,
            1e-5,
            2f64.powi(-8),
            seed,
        );
    }
}

// ---------------------------------------------------------------- AdamW

#[test]
#[ignore = "requires a CUDA device"]
fn adamw_matches_cpu_over_several_steps() {
    let gpu = gpu();
    let (mut rng, seed) = rng("adamw");
    let configs = [
        adamw::AdamWConfig::default(),
        adamw::AdamWConfig {
            beta1: 0.8,
            beta2: 0.99,
            eps: 1e-6,
            weight_decay: 0.05,
        },
    ];
    for cfg in configs {
        for (n, off) in [(1usize, 0usize), (5, 0), (4099, 0), (4099, 1), (2_000_003, 0), (1_200_001, 1)] {
            let what = format!("n={n} off={off} {cfg:?}");
            let p0 = uniform(&mut rng, n + off, -1.0, 1.0);
            let (mut p64, mut m64, mut v64) = (to_f64(&p0[off..]), vec![0.0f64; n], vec![0.0f64; n]);
            let mut p = gpu.upload(&p0).unwrap();
            let (mut m, mut v) = (gpu.zeros::<f32>(n + off).unwrap(), gpu.zeros::<f32>(n + off).unwrap());
            for t in 1..=3u64 {
                let g = uniform(&mut rng, n + off, -1.0, 1.0);
                let lr = 5e-4 * t as f64;
                adamw::cpu::step(&mut p64, &to_f64(&g[off..]), &mut m64, &mut v64, t, lr, &cfg);
                let gd = gpu.upload(&g).unwrap();
                adamw::cuda::step(
                    &gpu,
                    gpu.stream(),
                    &mut p.slice_mut(off..),
                    &gd.slice(off..),
                    &mut m.slice_mut(off..),
                    &mut v.slice_mut(off..),
                    n,
                    t,
                    lr,
                    &cfg,
                )
                .unwrap();
            }
            assert_close(
                &format!("adamw p {what}"),
                &gpu.download(&p).unwrap()[off..],
                &p64,
                1e-6,
                1e-5,
                seed,
            );
            assert_close(
                &format!("adamw m {what}"),
                &gpu.download(&m).unwrap()[off..],
                &m64,
                1e-7,
                1e-5,
                seed,
            );
            assert_close(
                &format!("adamw v {what}"),
                &gpu.download(&v).unwrap()[off..],
                &v64,
                1e-9,
                1e-5,
                seed,
            );
            if off == 1 {
                assert_eq!(gpu.download(&p).unwrap()[0], p0[0], "adamw wrote before the view ({what})");
            }
        }
    }
}

/// Several tensors in one launch (`step_many`), from non-zero moments, without a guard and
/// with the loss guard: no guard or a finite one updates every tensor as the CPU does, a NaN or
/// infinite guard changes nothing (parameters and moments).
#[test]
#[ignore = "requires a CUDA device"]
fn adamw_many_tensors_in_one_launch_with_a_guard() {
    let gpu = gpu();
    let (mut rng, seed) = rng("adamw many");
    let cfg = adamw::AdamWConfig {
        weight_decay: 0.05,
        ..Default::default()
    };
    let sizes = [1usize, 0, 4099, 37, 300_001];
    let p0: Vec<Vec<f32>> = sizes.iter().map(|&n| uniform(&mut rng, n, -1.0, 1.0)).collect();
    let g0: Vec<Vec<f32>> = sizes.iter().map(|&n| uniform(&mut rng, n, -1.0, 1.0)).collect();
    // Moments as a few earlier steps leave them (the first step's zeros hide a mix-up of m and v).
    let m0: Vec<Vec<f32>> = sizes.iter().map(|&n| uniform(&mut rng, n, -0.1, 0.1)).collect();
    let v0: Vec<Vec<f32>> = sizes.iter().map(|&n| uniform(&mut rng, n, 0.0, 0.01)).collect();
    for guard in [None, Some(1.5f32), Some(f32::NAN), Some(f32::INFINITY)] {
        let applies = guard.is_none_or(f32::is_finite);
        // CUDA cannot allocate 0 bytes, so the empty tensor gets a one-element buffer the
        // kernel must leave alone (n says how much of each buffer is the tensor).
        let pad = |x: &Vec<f32>| if x.is_empty() { vec![7.0f32] } else { x.clone() };
        let mut p: Vec<_> = p0.iter().map(|x| gpu.upload(&pad(x)).unwrap()).collect();
        let g: Vec<_> = g0.iter().map(|x| gpu.upload(&pad(x)).unwrap()).collect();
        let mut m: Vec<_> = m0.iter().map(|x| gpu.upload(&pad(x)).unwrap()).collect();
        let mut v: Vec<_> = v0.iter().map(|x| gpu.upload(&pad(x)).unwrap()).collect();
        let gd = guard.map(|x| gpu.upload(&[x]).unwrap());
        {
            let mut ts: Vec<adamw::cuda::AdamWTensor> = p
                .iter_mut()
                .zip(&g)
                .zip(m.iter_mut().zip(v.iter_mut()))
                .zip(sizes)
                .map(|(((p, g), (m, v)), n)| adamw::cuda::AdamWTensor {
                    params: p,
                    grads: g,
                    m,
                    v,
                    n,
                })
                .collect();
            let gp = gd.as_ref().map(|x| x as &dyn mlvpt::gpu::DevicePtr<f32>);
            adamw::cuda::step_many(&gpu, gpu.stream(), &mut ts, 3, 1e-3, &cfg, gp).unwrap();
        }
        for (i, &n) in sizes.iter().enumerate() {
            let what = format!("tensor {i} (n={n}) guard {guard:?}");
            let (mut p64, mut m64, mut v64) = (to_f64(&p0[i]), to_f64(&m0[i]), to_f64(&v0[i]));
            if applies {
                adamw::cpu::step(&mut p64, &to_f64(&g0[i]), &mut m64, &mut v64, 3, 1e-3, &cfg);
            }
            let (pd, md, vd) = (
                gpu.download(&p[i]).unwrap(),
                gpu.download(&m[i]).unwrap(),
                gpu.download(&v[i]).unwrap(),
            );
            if n == 0 {
                assert_eq!(
                    (pd, md, vd),
                    (vec![7.0], vec![7.0], vec![7.0]),
                    "the empty tensor's padding element was written"
                );
                continue;
            }
            if !applies {
                // Unchanged.
                assert!(
                    pd == p0[i] && md == m0[i] && vd == v0[i],
                    "adamw many {what}: a non-finite guard changed something (seed {seed})"
                );
            }
            assert_close(&format!("adamw many p {what}"), &pd[..n], &p64, 1e-6, 1e-5, seed);
            assert_close(&format!("adamw many m {what}"), &md[..n], &m64, 1e-7, 1e-5, seed);
            assert_close(&format!("adamw many v {what}"), &vd[..n], &v64, 1e-9, 1e-5, seed);
        }
    }
}
