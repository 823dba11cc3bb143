//! LayerNorm (`src/ops/layernorm`): the forward against its formula and the input gradient
//! against finite differences (f64 CPU twin); on a device, every kernel (bf16 and fp32 storage,
//! the fused residual add, the scalar fallback) against the twin.

use crate::common::*;
use mlvpt::ops::layernorm::{self, LayerNormShape, Norm, NormStats};
use mlvpt::ops::Grad;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

#[test]
fn layernorm_forward_and_input_gradient() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let (rows, d) = (37, 6);
    let x = rand_vec(&mut rng, rows * d, 2.0);
    let g: Vec<f64> = rand_vec(&mut rng, d, 0.5).iter().map(|v| 1.0 + v).collect();
    let bt = rand_vec(&mut rng, d, 0.5);
    let r = rand_vec(&mut rng, rows * d, 1.0);
    let fwd = |x: &[f64]| {
        let (mut y, mut m, mut s) = (vec![0.0; rows * d], vec![0.0; rows], vec![0.0; rows]);
        layernorm::cpu::forward(
            x,
            Norm {
                gamma: &g[..],
                beta: &bt[..],
            },
            &mut y,
            NormStats {
                mean: &mut m[..],
                rstd: &mut s[..],
            },
            &LayerNormShape { rows, dim: d, eps: 1e-6 },
        );
        (y, m, s)
    };
    let (y, m, s) = fwd(&x);
    for i in 0..rows {
        let xr = &x[i * d..(i + 1) * d];
        let mu = xr.iter().sum::<f64>() / d as f64;
        let var = xr.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / d as f64;
        for j in 0..d {
            let want = (xr[j] - mu) / (var + 1e-6).sqrt() * g[j] + bt[j];
            assert!((y[i * d + j] - want).abs() < 1e-12);
        }
    }
    let mut dx = vec![0.0; rows * d];
    layernorm::cpu::backward(
        &r,
        &x,
        &g,
        NormStats {
            mean: &m[..],
            rstd: &s[..],
        },
        Grad::Write(&mut dx[..]),
        &LayerNormShape { rows, dim: d, eps: 0.0 },
    );
    fd_check("layernorm dx", &x, &dx, |x| dot(&fwd(x).0, &r));
}

// ---------------------------------------------------------------- device

#[cfg(feature = "cuda")]
mod gpu {
    use crate::gpu_common::*;
    use mlvpt::gpu::{bf16, GpuError};
    use mlvpt::ops::layernorm::{self, LayerNormShape, Norm, NormStats};
    use mlvpt::ops::Grad;
    use rand::Rng;

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
                Norm {
                    gamma: &to_f64(&gamma)[..],
                    beta: &to_f64(&beta)[..],
                },
                &mut y64,
                NormStats {
                    mean: &mut mean64[..],
                    rstd: &mut rstd64[..],
                },
                &LayerNormShape { rows, dim: d, eps },
            );

            let (xd, gd, bd, dyd) = (
                gpu.upload(&xb).unwrap(),
                gpu.upload(&gamma).unwrap(),
                gpu.upload(&beta).unwrap(),
                gpu.upload(&dyb).unwrap(),
            );
            let mut y = nan_bf16(&gpu, rows * d);
            let (mut mean, mut rstd) = (nan_f32(&gpu, rows), nan_f32(&gpu, rows));
            layernorm::cuda::forward(
                &gpu,
                gpu.stream(),
                &xd,
                Norm { gamma: &gd, beta: &bd },
                &mut y,
                NormStats {
                    mean: &mut mean,
                    rstd: &mut rstd,
                },
                &LayerNormShape { rows, dim: d, eps },
            )
            .unwrap();
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
                    NormStats {
                        mean: &mean64[..],
                        rstd: &rstd64[..],
                    },
                    Grad::new(accumulate, &mut dx64[..]),
                    &LayerNormShape { rows, dim: d, eps: 0.0 },
                );
                let mut dx = if accumulate {
                    gpu.upload(&prevb).unwrap()
                } else {
                    nan_bf16(&gpu, rows * d)
                };
                layernorm::cuda::backward(
                    &gpu,
                    gpu.stream(),
                    &dyd,
                    &xd,
                    &gd,
                    NormStats { mean: &mean, rstd: &rstd },
                    Grad::new(accumulate, &mut dx),
                    &LayerNormShape { rows, dim: d, eps: 0.0 },
                )
                .unwrap();
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
            Norm {
                gamma: &to_f64(&gamma)[..],
                beta: &to_f64(&beta)[..],
            },
            &mut y64,
            NormStats {
                mean: &mut m64[..],
                rstd: &mut r64[..],
            },
            &LayerNormShape { rows, dim: d, eps },
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
            Norm { gamma: &gd, beta: &bd },
            &mut ys,
            NormStats {
                mean: &mut mean,
                rstd: &mut rstd,
            },
            &LayerNormShape { rows, dim: d, eps },
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
                Norm {
                    gamma: &to_f64(&gamma)[..],
                    beta: &to_f64(&beta)[..],
                },
                &mut y64,
                NormStats {
                    mean: &mut mean64[..],
                    rstd: &mut rstd64[..],
                },
                &LayerNormShape { rows, dim: d, eps },
            );

            let (xd, gd, bd, dyd) = (
                gpu.upload(&x).unwrap(),
                gpu.upload(&gamma).unwrap(),
                gpu.upload(&beta).unwrap(),
                gpu.upload(&dyb).unwrap(),
            );
            let mut y = nan_bf16(&gpu, rows * d);
            let (mut mean, mut rstd) = (nan_f32(&gpu, rows), nan_f32(&gpu, rows));
            layernorm::cuda::forward::<f32>(
                &gpu,
                gpu.stream(),
                &xd,
                Norm { gamma: &gd, beta: &bd },
                &mut y,
                NormStats {
                    mean: &mut mean,
                    rstd: &mut rstd,
                },
                &LayerNormShape { rows, dim: d, eps },
            )
            .unwrap();
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
                    NormStats {
                        mean: &mean64[..],
                        rstd: &rstd64[..],
                    },
                    Grad::new(accumulate, &mut dx64[..]),
                    &LayerNormShape { rows, dim: d, eps: 0.0 },
                );
                let mut dx = if accumulate {
                    gpu.upload(&prev).unwrap()
                } else {
                    nan_f32(&gpu, rows * d)
                };
                layernorm::cuda::backward::<f32>(
                    &gpu,
                    gpu.stream(),
                    &dyd,
                    &xd,
                    &gd,
                    NormStats { mean: &mean, rstd: &rstd },
                    Grad::new(accumulate, &mut dx),
                    &LayerNormShape { rows, dim: d, eps: 0.0 },
                )
                .unwrap();
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
                        Norm { gamma: &gd, beta: &bd },
                        &mut y,
                        NormStats {
                            mean: &mut mean,
                            rstd: &mut rstd,
                        },
                        &LayerNormShape { rows, dim: d, eps },
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
                        Norm { gamma: &gd, beta: &bd },
                        &mut y,
                        NormStats {
                            mean: &mut mean,
                            rstd: &mut rstd,
                        },
                        &LayerNormShape { rows, dim: d, eps },
                    )
                    .unwrap();
                }
                let what = format!("{what} branch bf16={branch_bf16}");
                let got_out = gpu.download(&out).unwrap();
                assert_close(&format!("residual out {what}"), &got_out, &out64, 1e-6, 1e-6, seed);
                let (mut y64, mut m64, mut r64) = (vec![0.0; rows * d], vec![0.0; rows], vec![0.0; rows]);
                layernorm::cpu::forward(
                    &to_f64(&got_out),
                    Norm {
                        gamma: &to_f64(&gamma)[..],
                        beta: &to_f64(&beta)[..],
                    },
                    &mut y64,
                    NormStats {
                        mean: &mut m64[..],
                        rstd: &mut r64[..],
                    },
                    &LayerNormShape { rows, dim: d, eps },
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
        let err = layernorm::cuda::forward(
            &gpu,
            gpu.stream(),
            &x,
            Norm { gamma: &g, beta: &g },
            &mut y,
            NormStats {
                mean: &mut m,
                rstd: &mut r,
            },
            &LayerNormShape {
                rows: 1,
                dim: d,
                eps: 1e-6,
            },
        );
        assert!(matches!(err, Err(GpuError::Invalid { .. })), "{err:?}");
    }
}
