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

    /// The f64 twin's forward: `(y, mean, rstd)` of `x` over rows of `d`.
    fn twin_forward(x: &[f32], gamma: &[f32], beta: &[f32], d: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let rows = x.len() / d;
        let (mut y, mut mean, mut rstd) = (vec![0.0; rows * d], vec![0.0; rows], vec![0.0; rows]);
        let (g, b) = (to_f64(gamma), to_f64(beta));
        let stats = NormStats {
            mean: &mut mean[..],
            rstd: &mut rstd[..],
        };
        let shape = LayerNormShape {
            rows,
            dim: d,
            eps: layernorm::VIT_EPS,
        };
        layernorm::cpu::forward(
            &to_f64(x),
            Norm {
                gamma: &g[..],
                beta: &b[..],
            },
            &mut y,
            stats,
            &shape,
        );
        (y, mean, rstd)
    }

    /// A storage the kernels read `x` from and write `dx` in: its values, and the tolerance of
    /// the input gradient (relative to the row's rstd, and to the value).
    trait Stored: mlvpt::ops::tokens::cuda::Storage + Copy {
        const NAME: &'static str;
        const DX_TOL: (f64, f64);
        fn from_f32(v: f32) -> Self;
        fn to_f32(self) -> f32;
    }
    impl Stored for bf16 {
        const NAME: &'static str = "bf16";
        const DX_TOL: (f64, f64) = (1e-4, 1.0 / 256.0);
        fn from_f32(v: f32) -> Self {
            bf16::from_f32(v)
        }
        fn to_f32(self) -> f32 {
            bf16::to_f32(self)
        }
    }
    impl Stored for f32 {
        // fp32 storage (the CUDA backend's residual stream and its gradient): only the
        // kernel's fp32 arithmetic separates it from the f64 twin.
        const NAME: &'static str = "f32";
        const DX_TOL: (f64, f64) = (1e-5, 1e-5);
        fn from_f32(v: f32) -> Self {
            v
        }
        fn to_f32(self) -> f32 {
            self
        }
    }
    /// `v` as stored in `S` (rounded), both ways.
    fn stored<S: Stored>(v: &[f32]) -> (Vec<S>, Vec<f32>) {
        let s: Vec<S> = v.iter().map(|&x| S::from_f32(x)).collect();
        let r = s.iter().map(|&x| x.to_f32()).collect();
        (s, r)
    }

    /// Forward and backward (written and accumulated) with `x` and `dx` stored as `S`, `y` bf16,
    /// against the f64 twin, over rows of every width class of the kernels.
    fn forward_and_backward_match_cpu<S: Stored>(sizes: &[(usize, usize)]) {
        let gpu = gpu();
        let (mut rng, seed) = rng(&format!("layernorm {}", S::NAME));
        let eps = layernorm::VIT_EPS;
        for &(rows, d) in sizes {
            let what = format!("{} storage rows={rows} d={d}", S::NAME);
            let shape = LayerNormShape { rows, dim: d, eps };
            let shift = rng.random_range(-3.0f32..3.0);
            let x: Vec<f32> = uniform(&mut rng, rows * d, -2.0, 2.0).iter().map(|v| v + shift).collect();
            let (xs, xr) = stored::<S>(&x);
            let (gamma, beta) = (uniform(&mut rng, d, 0.5, 1.5), uniform(&mut rng, d, -0.5, 0.5));
            let (dyb, dyr) = bf16_values(&uniform(&mut rng, rows * d, -1.0, 1.0));
            let (prevs, prevr) = stored::<S>(&uniform(&mut rng, rows * d, -1.0, 1.0));
            let (y64, mean64, rstd64) = twin_forward(&xr, &gamma, &beta, d);

            let (xd, gd, bd, dyd) = (
                gpu.upload(&xs).unwrap(),
                gpu.upload(&gamma).unwrap(),
                gpu.upload(&beta).unwrap(),
                gpu.upload(&dyb).unwrap(),
            );
            let mut y = nan_bf16(&gpu, rows * d);
            let (mut mean, mut rstd) = (nan_f32(&gpu, rows), nan_f32(&gpu, rows));
            let stats = NormStats {
                mean: &mut mean,
                rstd: &mut rstd,
            };
            layernorm::cuda::forward::<S>(&gpu, gpu.stream(), &xd, Norm { gamma: &gd, beta: &bd }, &mut y, stats, &shape).unwrap();
            let y = to_f32(&gpu.download(&y).unwrap());
            assert_close(&format!("LN y {what}"), &y, &y64, 1e-5, 2f64.powi(-8), seed);
            assert_close(&format!("LN mean {what}"), &gpu.download(&mean).unwrap(), &mean64, 1e-6, 1e-5, seed);
            assert_close(&format!("LN rstd {what}"), &gpu.download(&rstd).unwrap(), &rstd64, 0.0, 1e-4, seed);

            for accumulate in [false, true] {
                let mut dx64 = if accumulate { to_f64(&prevr) } else { vec![0.0; rows * d] };
                let stats64 = NormStats {
                    mean: &mean64[..],
                    rstd: &rstd64[..],
                };
                let (dy64, x64, g64) = (to_f64(&dyr), to_f64(&xr), to_f64(&gamma));
                layernorm::cpu::backward(&dy64, &x64, &g64, stats64, Grad::new(accumulate, &mut dx64[..]), &shape);
                let init = if accumulate {
                    prevs.clone()
                } else {
                    vec![S::from_f32(f32::NAN); rows * d]
                };
                let mut dx = gpu.upload(&init).unwrap();
                let stats = NormStats { mean: &mean, rstd: &rstd };
                layernorm::cuda::backward::<S>(&gpu, gpu.stream(), &dyd, &xd, &gd, stats, Grad::new(accumulate, &mut dx), &shape).unwrap();
                // The input gradient is a difference of O(rstd) terms: error relative to that scale.
                let tol = S::DX_TOL.0 * rstd64.iter().fold(1.0f64, |a, &r| a.max(r.min(1e3)));
                let got: Vec<f32> = gpu.download(&dx).unwrap().iter().map(|&v| v.to_f32()).collect();
                assert_close(&format!("LN dx acc={accumulate} {what}"), &got, &dx64, tol, S::DX_TOL.1, seed);
            }
        }
    }

    #[test]
    #[ignore = "requires a CUDA device"]
    fn layernorm_forward_and_backward_match_cpu() {
        // 520: the three-chunk vector kernel with one lane of its last chunk busy.
        let sizes = [
            (1, 1),
            (3, 7),
            (37, 100),
            (129, 384),
            (64, 768),
            (17, 1000),
            (33, 1024),
            (300, 96),
            (5, 520),
        ];
        forward_and_backward_match_cpu::<bf16>(&sizes);

        // The scalar kernel on rows the vector kernel would take, by misaligning the views.
        let gpu = gpu();
        let (mut rng, seed) = rng("layernorm misaligned");
        let (rows, d) = (5usize, 64usize);
        let (xb, xr) = bf16_values(&uniform(&mut rng, rows * d + 1, -1.0, 1.0));
        let (gamma, beta) = (vec![1.0f32; d], vec![0.0f32; d]);
        let (y64, _, _) = twin_forward(&xr[1..], &gamma, &beta, d);
        let xd = gpu.upload(&xb).unwrap();
        let (gd, bd) = (gpu.upload(&gamma).unwrap(), gpu.upload(&beta).unwrap());
        let mut y = nan_bf16(&gpu, rows * d + 1);
        let (mut mean, mut rstd) = (nan_f32(&gpu, rows), nan_f32(&gpu, rows));
        let stats = NormStats {
            mean: &mut mean,
            rstd: &mut rstd,
        };
        let shape = LayerNormShape {
            rows,
            dim: d,
            eps: layernorm::VIT_EPS,
        };
        let norm = Norm { gamma: &gd, beta: &bd };
        layernorm::cuda::forward(&gpu, gpu.stream(), &xd.slice(1..), norm, &mut y.slice_mut(1..), stats, &shape).unwrap();
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
        // 40: the one-chunk vector kernel; 520: three chunks, the last nearly empty.
        let sizes = [
            (1, 1),
            (3, 7),
            (5, 40),
            (37, 100),
            (129, 384),
            (5, 520),
            (64, 768),
            (17, 1000),
            (33, 1024),
        ];
        forward_and_backward_match_cpu::<f32>(&sizes);
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
                let (y64, m64, r64) = twin_forward(&got_out, &gamma, &beta, d);
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
