//! The linear layer (`src/ops/linear`): the forward against its formula and the input
//! gradient against finite differences (f64 CPU twin); on a device, the cuBLAS launchers in fp32
//! and bf16 against the f64 twin.

use crate::common::*;
use mlvpt::ops::linear::{self, LinearShape};
use mlvpt::ops::Grad;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

#[test]
fn linear_forward_and_input_gradient() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (rows, din, dout) = (5, 7, 3);
    let x = rand_vec(&mut rng, rows * din, 1.0);
    let w = rand_vec(&mut rng, dout * din, 1.0);
    let b = rand_vec(&mut rng, dout, 1.0);
    let r = rand_vec(&mut rng, rows * dout, 1.0);
    let fwd = |x: &[f64]| {
        let mut y = vec![0.0; rows * dout];
        linear::cpu::forward(
            x,
            &w,
            Some(&b),
            &mut y,
            &LinearShape {
                rows,
                d_in: din,
                d_out: dout,
            },
        );
        y
    };
    let y = fwd(&x);
    for i in 0..rows {
        for o in 0..dout {
            let want = b[o] + dot(&x[i * din..(i + 1) * din], &w[o * din..(o + 1) * din]);
            assert!((y[i * dout + o] - want).abs() < 1e-12);
        }
    }
    let mut dx = vec![0.0; rows * din];
    linear::cpu::backward_input(
        &r,
        &w,
        Grad::Write(&mut dx[..]),
        &LinearShape {
            rows,
            d_in: din,
            d_out: dout,
        },
    );
    fd_check("linear dx", &x, &dx, |x| dot(&fwd(x), &r));
    // accumulate adds
    let mut acc = vec![1.0; rows * din];
    linear::cpu::backward_input(
        &r,
        &w,
        Grad::Add(&mut acc[..]),
        &LinearShape {
            rows,
            d_in: din,
            d_out: dout,
        },
    );
    assert!(acc.iter().zip(&dx).all(|(a, d)| (a - 1.0 - d).abs() < 1e-12));
}

// ---------------------------------------------------------------- cuBLAS GEMM (device)

#[cfg(feature = "cuda")]
mod gpu {
    use crate::gpu_common::*;
    use mlvpt::ops::linear::{self, LinearShape};
    use mlvpt::ops::Grad;

    /// `y[m, n] = x[m, k] w[n, k]^T + b` by the CPU twin in f64.
    fn linear_ref(x: &[f32], w: &[f32], b: Option<&[f32]>, m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut y = vec![0.0; m * n];
        let b64 = b.map(to_f64);
        linear::cpu::forward(
            &to_f64(x),
            &to_f64(w),
            b64.as_deref(),
            &mut y,
            &LinearShape {
                rows: m,
                d_in: k,
                d_out: n,
            },
        );
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
                mlvpt::ops::linear::cuda::forward(
                    &gpu,
                    &xd,
                    &wd,
                    Some(&bd),
                    &mut y,
                    &LinearShape {
                        rows: m,
                        d_in: k,
                        d_out: n,
                    },
                )
                .unwrap();
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
                mlvpt::ops::linear::cuda::backward_input(
                    &gpu,
                    &dyd,
                    &wd,
                    Grad::Write(&mut dx),
                    &LinearShape {
                        rows: m,
                        d_in: k,
                        d_out: n,
                    },
                )
                .unwrap();
                let mut want_dx = vec![0.0; m * k];
                linear::cpu::backward_input(
                    &to_f64(&dy),
                    &to_f64(&w),
                    Grad::Write(&mut want_dx[..]),
                    &LinearShape {
                        rows: m,
                        d_in: k,
                        d_out: n,
                    },
                );
                assert_close(
                    &format!("f32 dX {what}"),
                    &gpu.download(&dx).unwrap(),
                    &want_dx,
                    atol(n, 1.0, 0.1),
                    1e-5,
                    seed,
                );
                let mut dw = nan_f32(&gpu, n * k);
                mlvpt::ops::linear::cuda::backward_weight(
                    &gpu,
                    &dyd,
                    &xd,
                    Grad::Write(&mut dw),
                    &LinearShape {
                        rows: m,
                        d_in: k,
                        d_out: n,
                    },
                )
                .unwrap();
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
                mlvpt::ops::linear::cuda::backward_weight(
                    &gpu,
                    &dyd,
                    &xd,
                    Grad::Add(&mut dw),
                    &LinearShape {
                        rows: m,
                        d_in: k,
                        d_out: n,
                    },
                )
                .unwrap();
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
                mlvpt::ops::linear::cuda::forward(
                    &gpu,
                    &xd,
                    &wd,
                    Some(&bd),
                    &mut y32,
                    &LinearShape {
                        rows: m,
                        d_in: k,
                        d_out: n,
                    },
                )
                .unwrap();
                assert_close(
                    &format!("bf16->f32 Y {what}"),
                    &gpu.download(&y32).unwrap(),
                    &want,
                    atol(k, 1.0, 0.1),
                    1e-5,
                    seed,
                );
                let mut y16 = nan_bf16(&gpu, m * n);
                mlvpt::ops::linear::cuda::forward(
                    &gpu,
                    &xd,
                    &wd,
                    Some(&bd),
                    &mut y16,
                    &LinearShape {
                        rows: m,
                        d_in: k,
                        d_out: n,
                    },
                )
                .unwrap();
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
}
