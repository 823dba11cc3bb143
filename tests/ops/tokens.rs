//! Token assembly (`src/ops/tokens`): the CPU twins against index-by-index definitions at
//! awkward sizes and their gradients against finite differences (f64); on a device, every
//! launcher of `kernels/tokens.cu` against its twin in fp32 and bf16 storage. (The CUDA
//! backend's casts around these ops are tested through the `Backend` in tests/gpu_backend.rs.)

use crate::common::*;
use mlvpt::ops::tokens::{cpu, PatchShape, TokenCopy, TokenRange, TokenShape};
use mlvpt::ops::Rows;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// 2 images of 3 x 10 x 6 pixels in 2 x 2 patches: a 5 x 3 grid, 15 patches of 12 values.
const PATCHES: PatchShape = PatchShape {
    batch: 2,
    channels: 3,
    height: 10,
    width: 6,
    patch: 2,
};
/// 3 images, 4 prompts, 5 patches, width 7 (N = 10).
const TOKENS: TokenShape = TokenShape {
    batch: 3,
    prompts: 4,
    num_patches: 5,
    dim: 7,
};

#[test]
fn patchify_matches_the_definition() {
    let s = PATCHES;
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let images = rand_vec(&mut rng, s.image_len(), 1.0);
    let mut out = vec![f64::NAN; s.image_len()];
    cpu::patchify(&images, &mut out, &s);
    let (gw, row) = (s.width / s.patch, s.channels * s.patch * s.patch);
    let np = (s.height / s.patch) * gw;
    for b in 0..s.batch {
        for i in 0..np {
            for c in 0..s.channels {
                for ky in 0..s.patch {
                    for kx in 0..s.patch {
                        let (y, x) = ((i / gw) * s.patch + ky, (i % gw) * s.patch + kx);
                        let want = images[((b * s.channels + c) * s.height + y) * s.width + x];
                        let got = out[(b * np + i) * row + (c * s.patch + ky) * s.patch + kx];
                        assert_eq!(got, want, "image {b} patch {i} channel {c} pixel ({ky}, {kx})");
                    }
                }
            }
        }
    }
}

#[test]
fn embed_and_prompts_match_the_definition() {
    let s = TOKENS;
    let (n, d, p) = (s.tokens(), s.dim, s.prompts);
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let patches = rand_vec(&mut rng, s.batch * s.num_patches * d, 1.0);
    let (cls, pos) = (rand_vec(&mut rng, d, 1.0), rand_vec(&mut rng, (1 + s.num_patches) * d, 1.0));
    let prompts = rand_vec(&mut rng, 3 * p * d, 1.0); // [L = 3, P, D]
    let mut x = vec![f64::NAN; s.len()];
    cpu::embed_tokens(&patches, &cls, &pos, &mut x, &s);
    cpu::set_prompts(&prompts, 2, &mut x, &s);
    for b in 0..s.batch {
        for t in 0..n {
            for j in 0..d {
                // Stored [CLS, patches, prompts].
                let np = s.num_patches;
                let want = match t {
                    0 => cls[j] + pos[j],
                    t if t <= np => patches[(b * np + t - 1) * d + j] + pos[t * d + j],
                    t => prompts[(2 * p + t - 1 - np) * d + j],
                };
                assert_eq!(x[(b * n + t) * d + j], want, "image {b} token {t} column {j}");
            }
        }
    }
}

#[test]
fn prompt_grad_is_the_gradient_of_set_prompts() {
    let s = TOKENS;
    let (p, d) = (s.prompts, s.dim);
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let r = rand_vec(&mut rng, s.len(), 1.0);
    let x0 = rand_vec(&mut rng, s.len(), 1.0);
    let prompts = rand_vec(&mut rng, 2 * p * d, 1.0); // [L = 2, P, D], layer 1 set
    let loss = |pr: &[f64]| {
        let mut x = x0.clone();
        cpu::set_prompts(pr, 1, &mut x, &s);
        dot(&x, &r)
    };
    for zero_rows in [false, true] {
        let (mut dx, mut dprompts) = (r.clone(), vec![0.0; 2 * p * d]);
        cpu::prompt_grad(&mut dx, &mut dprompts, 1, &s, zero_rows);
        assert!(dprompts[..p * d].iter().all(|&g| g == 0.0), "layer 0 untouched");
        fd_check("prompt_grad", &prompts, &dprompts, loss);
        for (i, (&got, &was)) in dx.iter().zip(&r).enumerate() {
            let prompt_row = (s.tokens() - p..s.tokens()).contains(&((i / d) % s.tokens()));
            let want = if zero_rows && prompt_row { 0.0 } else { was };
            assert_eq!(got, want, "dx[{i}] with zero_rows {zero_rows}");
        }
    }
}

#[test]
fn copy_tokens_moves_exactly_the_named_rows() {
    let mut rng = ChaCha8Rng::seed_from_u64(14);
    let c = TokenCopy {
        batch: 3,
        dim: 5,
        count: 4,
        src: TokenRange { tokens: 9, start: 2 },
        dst: TokenRange { tokens: 6, start: 1 },
    };
    let src = rand_vec(&mut rng, c.batch * c.src.tokens * c.dim, 1.0);
    let mut dst = vec![-7.0; c.batch * c.dst.tokens * c.dim];
    cpu::copy_tokens(&src, &mut dst, &c);
    for b in 0..c.batch {
        for t in 0..c.dst.tokens {
            for j in 0..c.dim {
                let got = dst[(b * c.dst.tokens + t) * c.dim + j];
                let want = if (c.dst.start..c.dst.start + c.count).contains(&t) {
                    src[(b * c.src.tokens + t - c.dst.start + c.src.start) * c.dim + j]
                } else {
                    -7.0
                };
                assert_eq!(got, want, "image {b} row {t} column {j}");
            }
        }
    }
}

#[test]
fn residual_and_mul_cols_match_the_definition_and_their_gradients() {
    let sh = Rows { rows: 11, dim: 13 };
    let mut rng = ChaCha8Rng::seed_from_u64(15);
    let (x, f, ls, r) = (
        rand_vec(&mut rng, sh.len(), 1.0),
        rand_vec(&mut rng, sh.len(), 1.0),
        rand_vec(&mut rng, sh.dim, 1.0),
        rand_vec(&mut rng, sh.len(), 1.0),
    );
    let mut out = vec![f64::NAN; sh.len()];
    cpu::residual(&x, &f, Some(&ls), &mut out, sh);
    for i in 0..sh.len() {
        assert_eq!(out[i], x[i] + ls[i % sh.dim] * f[i], "residual[{i}]");
    }
    cpu::residual(&x, &f, None, &mut out, sh);
    for i in 0..sh.len() {
        assert_eq!(out[i], x[i] + f[i], "residual without LayerScale[{i}]");
    }
    // d<r, x + ls * f>/df = ls * r: what mul_cols computes in the backward.
    let mut df = vec![f64::NAN; sh.len()];
    cpu::mul_cols(&r, &ls, &mut df, sh);
    fd_check("residual d/df", &f, &df, |f| {
        let mut o = vec![0.0; sh.len()];
        cpu::residual(&x, f, Some(&ls), &mut o, sh);
        dot(&o, &r)
    });
}

// Hand-worked cases.

#[test]
fn patchify_then_embed_places_every_pixel_and_prompt_row() {
    // One 2-channel 4x4 image, 2x2 patches: patch (py, px) row holds channel 0's four
    // pixels, then channel 1's.
    let (c, h, w, p) = (2, 4, 4, 2);
    let img: Vec<f64> = (0..c * h * w).map(|i| i as f64).collect();
    let mut rows = vec![0.0; 4 * c * p * p];
    let shape = PatchShape {
        batch: 1,
        channels: c,
        height: h,
        width: w,
        patch: p,
    };
    cpu::patchify(&img, &mut rows, &shape);
    assert_eq!(&rows[..8], &[0.0, 1.0, 4.0, 5.0, 16.0, 17.0, 20.0, 21.0]);
    assert_eq!(&rows[24..32], &[10.0, 11.0, 14.0, 15.0, 26.0, 27.0, 30.0, 31.0]);
    // Two patches of width 3, one prompt row, then the prompts set and their gradient.
    let (np, d) = (2, 3);
    let patches = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    let (cls, pos) = (vec![10.0; 3], vec![0.5; 9]);
    let mut x = vec![-1.0; (1 + 1 + np) * d];
    let tokens = TokenShape {
        batch: 1,
        prompts: 1,
        num_patches: np,
        dim: d,
    };
    cpu::embed_tokens(&patches, &cls, &pos, &mut x, &tokens);
    // Stored [CLS, patches, prompts].
    assert_eq!(x, [10.5, 10.5, 10.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, -1.0, -1.0, -1.0]);
    cpu::set_prompts(&[7.0, 8.0, 9.0], 0, &mut x, &tokens);
    assert_eq!(&x[9..12], &[7.0, 8.0, 9.0]);
    let mut dp = vec![0.0; 3];
    cpu::prompt_grad(&mut x, &mut dp, 0, &tokens, true);
    assert_eq!((dp.as_slice(), &x[9..12]), (&[7.0, 8.0, 9.0][..], &[0.0, 0.0, 0.0][..]));
}

#[test]
fn residual_mul_cols_and_copy_tokens() {
    let (x, f, ls) = (vec![1.0, 2.0, 3.0, 4.0], vec![10.0, 20.0, 30.0, 40.0], vec![0.5, 2.0]);
    let mut out = vec![0.0; 4];
    cpu::residual(&x, &f, Some(&ls), &mut out, Rows { rows: 2, dim: 2 });
    assert_eq!(out, [6.0, 42.0, 18.0, 84.0]);
    cpu::residual(&x, &f, None, &mut out, Rows { rows: 2, dim: 2 });
    assert_eq!(out, [11.0, 22.0, 33.0, 44.0]);
    cpu::mul_cols(&f, &ls, &mut out, Rows { rows: 2, dim: 2 });
    assert_eq!(out, [5.0, 40.0, 15.0, 80.0]);
    // Rows 1..3 of [2 images, 3 tokens, 1] into rows 0..2 of [2, 2, 1].
    let src = [0.0, 1.0, 2.0, 10.0, 11.0, 12.0];
    let mut dst = [0.0; 4];
    let copy = TokenCopy {
        batch: 2,
        dim: 1,
        count: 2,
        src: TokenRange { tokens: 3, start: 1 },
        dst: TokenRange { tokens: 2, start: 0 },
    };
    cpu::copy_tokens(&src, &mut dst, &copy);
    assert_eq!(dst, [1.0, 2.0, 11.0, 12.0]);
}

// ---------------------------------------------------------------- launchers (device)

#[cfg(feature = "cuda")]
mod gpu {
    use super::{PATCHES, TOKENS};
    use crate::gpu_common::*;
    use mlvpt::gpu::{bf16, DevicePtr, GpuContext};
    use mlvpt::ops::tokens::cuda::Storage;
    use mlvpt::ops::tokens::{cpu, cuda, TokenCopy, TokenRange};
    use mlvpt::ops::Rows;

    /// A storage type the tests convert to and from f32.
    trait Elem: Storage + Copy {
        fn from_f32(v: f32) -> Self;
        fn to_f32(self) -> f32;
    }
    impl Elem for f32 {
        fn from_f32(v: f32) -> Self {
            v
        }
        fn to_f32(self) -> f32 {
            self
        }
    }
    impl Elem for bf16 {
        fn from_f32(v: f32) -> Self {
            bf16::from_f32(v)
        }
        fn to_f32(self) -> f32 {
            bf16::to_f32(self)
        }
    }

    /// `v` stored as `T` on the device (rounded to it).
    fn upload_as<T: Elem>(gpu: &GpuContext, v: &[f32]) -> mlvpt::gpu::CudaSlice<T> {
        let t: Vec<T> = v.iter().map(|&x| T::from_f32(x)).collect();
        gpu.upload(&t).unwrap()
    }
    fn download_f32<T: Elem>(gpu: &GpuContext, d: &mlvpt::gpu::CudaSlice<T>) -> Vec<f32> {
        gpu.download(d).unwrap().iter().map(|&x| x.to_f32()).collect()
    }

    /// The moves (patchify, copy_tokens) and the embedding in both storages, exactly: inputs are
    /// bf16 values, so both storages hold them exactly and each output is one fp32 sum.
    fn moves_and_embedding<T: Elem>(name: &str) {
        let gpu = gpu();
        let (mut rng, seed) = rng(name);
        let s = PATCHES;
        let (_, images) = bf16_values(&uniform(&mut rng, s.image_len(), -2.0, 2.0));
        let mut want = vec![0.0f32; s.image_len()];
        cpu::patchify(&images, &mut want, &s);
        let mut out = upload_as::<T>(&gpu, &vec![f32::NAN; s.image_len()]);
        cuda::patchify::<T>(&gpu, gpu.stream(), &upload_as::<T>(&gpu, &images), &mut out, &s).unwrap();
        assert_eq!(download_f32(&gpu, &out), want, "{name}: patchify (seed {seed})");

        let t = TOKENS;
        let (_, patches) = bf16_values(&uniform(&mut rng, t.batch * t.num_patches * t.dim, -2.0, 2.0));
        let (cls, pos) = (
            uniform(&mut rng, t.dim, -1.0, 1.0),
            uniform(&mut rng, (1 + t.num_patches) * t.dim, -1.0, 1.0),
        );
        let x0 = uniform(&mut rng, t.len(), -1.0, 1.0);
        let mut want = x0.clone();
        cpu::embed_tokens(&patches, &cls, &pos, &mut want, &t);
        let mut x = gpu.upload(&x0).unwrap();
        let (cd, pd) = (gpu.upload(&cls).unwrap(), gpu.upload(&pos).unwrap());
        cuda::embed_tokens::<T>(&gpu, gpu.stream(), &upload_as::<T>(&gpu, &patches), &cd, &pd, &mut x, &t).unwrap();
        assert_eq!(gpu.download(&x).unwrap(), want, "{name}: embed_tokens (seed {seed})");

        let c = TokenCopy {
            batch: 3,
            dim: 13,
            count: 4,
            src: TokenRange { tokens: 9, start: 3 },
            dst: TokenRange { tokens: 5, start: 1 },
        };
        let (_, src) = bf16_values(&uniform(&mut rng, c.batch * c.src.tokens * c.dim, -2.0, 2.0));
        let (_, dst0) = bf16_values(&uniform(&mut rng, c.batch * c.dst.tokens * c.dim, -2.0, 2.0));
        let mut want = dst0.clone();
        cpu::copy_tokens(&src, &mut want, &c);
        let mut dst = upload_as::<T>(&gpu, &dst0);
        cuda::copy_tokens::<T>(&gpu, gpu.stream(), &upload_as::<T>(&gpu, &src), &mut dst, &c).unwrap();
        assert_eq!(download_f32(&gpu, &dst), want, "{name}: copy_tokens (seed {seed})");
        let bad = TokenCopy {
            count: 7,
            ..c // rows 3..10 of 9
        };
        assert!(cuda::copy_tokens::<T>(&gpu, gpu.stream(), &upload_as::<T>(&gpu, &src), &mut dst, &bad).is_err());
    }

    #[test]
    #[ignore = "requires a CUDA device"]
    fn patchify_embed_and_copy_match_cpu_in_fp32() {
        moves_and_embedding::<f32>("tokens fp32");
    }

    #[test]
    #[ignore = "requires a CUDA device"]
    fn patchify_embed_and_copy_match_cpu_in_bf16() {
        moves_and_embedding::<bf16>("tokens bf16");
    }

    #[test]
    #[ignore = "requires a CUDA device"]
    fn prompts_and_their_gradient_match_cpu() {
        let gpu = gpu();
        let (mut rng, seed) = rng("prompts");
        let t = TOKENS;
        let (p, d) = (t.prompts, t.dim);
        let prompts = uniform(&mut rng, 3 * p * d, -1.0, 1.0);
        let x0 = uniform(&mut rng, t.len(), -1.0, 1.0);
        let mut want = x0.clone();
        cpu::set_prompts(&prompts, 2, &mut want, &t);
        let mut x = gpu.upload(&x0).unwrap();
        cuda::set_prompts(&gpu, gpu.stream(), &gpu.upload(&prompts).unwrap(), 2, &mut x, &t).unwrap();
        assert_eq!(gpu.download(&x).unwrap(), want, "set_prompts (seed {seed})");
        for zero_rows in [false, true] {
            let (mut want_dx, mut want_dp) = (x0.clone(), vec![0.0f32; 3 * p * d]);
            cpu::prompt_grad(&mut want_dx, &mut want_dp, 1, &t, zero_rows);
            let mut dx = gpu.upload(&x0).unwrap();
            let mut dp = nan_f32(&gpu, 3 * p * d);
            cuda::fill::<f32>(&gpu, gpu.stream(), &mut dp, 3 * p * d, 0.0).unwrap();
            cuda::prompt_grad(&gpu, gpu.stream(), &mut dx, &mut dp, 1, &t, zero_rows).unwrap();
            assert_eq!(
                gpu.download(&dx).unwrap(),
                want_dx,
                "prompt_grad dx, zero_rows {zero_rows} (seed {seed})"
            );
            // Images summed in order on both sides: the same fp32 sums.
            assert_eq!(
                gpu.download(&dp).unwrap(),
                want_dp,
                "prompt_grad dprompts, zero_rows {zero_rows} (seed {seed})"
            );
        }
    }

    /// residual (branch in `T`), mul_cols (output in `T`), axpby and fill against the twins.
    fn elementwise<T: Elem>(name: &str) {
        let gpu = gpu();
        let (mut rng, seed) = rng(name);
        let sh = Rows { rows: 37, dim: 19 };
        let (x, ls) = (uniform(&mut rng, sh.len(), -2.0, 2.0), uniform(&mut rng, sh.dim, -1.0, 1.0));
        let (_, f) = bf16_values(&uniform(&mut rng, sh.len(), -2.0, 2.0));
        let (xd, fd, lsd) = (gpu.upload(&x).unwrap(), upload_as::<T>(&gpu, &f), gpu.upload(&ls).unwrap());
        for with_ls in [true, false] {
            let mut want = vec![0.0f32; sh.len()];
            cpu::residual(&x, &f, with_ls.then_some(&ls[..]), &mut want, sh);
            let mut out = nan_f32(&gpu, sh.len());
            let l: Option<&dyn DevicePtr<f32>> = if with_ls { Some(&lsd) } else { None };
            cuda::residual::<T>(&gpu, gpu.stream(), &xd, &fd, l, &mut out, sh).unwrap();
            // One fp32 multiply-add per element, fused or not: within an ulp of its terms.
            let scale = |i: usize| if with_ls { ls[i % sh.dim] } else { 1.0 };
            let exact: Vec<f64> = (0..sh.len()).map(|i| x[i] as f64 + scale(i) as f64 * f[i] as f64).collect();
            let bound = |i: usize| 2f64.powi(-23) * (x[i].abs() + (scale(i) * f[i]).abs()) as f64;
            assert_within(
                &format!("{name}: residual ls {with_ls}"),
                &gpu.download(&out).unwrap(),
                &exact,
                bound,
                seed,
            );
            assert_within(&format!("{name}: residual twin ls {with_ls}"), &want, &exact, bound, seed);
        }
        let mut want = vec![0.0f32; sh.len()];
        cpu::mul_cols(&x, &ls, &mut want, sh);
        let want: Vec<f32> = want.iter().map(|&v| T::from_f32(v).to_f32()).collect(); // rounded once into T
        let mut out = upload_as::<T>(&gpu, &vec![f32::NAN; sh.len()]);
        cuda::mul_cols::<T>(&gpu, gpu.stream(), &xd, &lsd, &mut out, sh).unwrap();
        assert_eq!(download_f32(&gpu, &out), want, "{name}: mul_cols (seed {seed})");

        let (_, y0) = bf16_values(&uniform(&mut rng, sh.len(), -2.0, 2.0));
        let mut y = upload_as::<T>(&gpu, &y0);
        cuda::axpby::<T, T>(&gpu, gpu.stream(), 0.75, &mut y, -1.25, &fd, sh.len()).unwrap();
        let exact: Vec<f64> = y0.iter().zip(&f).map(|(&a, &b)| 0.75 * a as f64 - 1.25 * b as f64).collect();
        // fp32 arithmetic, then (bf16) one rounding of the result: relative to the terms' size.
        let ulp = if T::INDEX == 0 { 2f64.powi(-23) } else { 2f64.powi(-8) };
        let bound = |i: usize| ulp * (0.75 * y0[i].abs() as f64 + 1.25 * f[i].abs() as f64);
        assert_within(&format!("{name}: axpby"), &download_f32(&gpu, &y), &exact, bound, seed);
        cuda::fill::<T>(&gpu, gpu.stream(), &mut y, sh.len() - 3, 0.375).unwrap();
        let got = download_f32(&gpu, &y);
        assert!(got[..sh.len() - 3].iter().all(|&v| v == 0.375), "{name}: fill (seed {seed})");
        assert!(got[sh.len() - 3..].iter().all(|&v| v != 0.375), "{name}: fill past its length");
    }

    #[test]
    #[ignore = "requires a CUDA device"]
    fn elementwise_ops_match_cpu_in_fp32() {
        elementwise::<f32>("elementwise fp32");
    }

    #[test]
    #[ignore = "requires a CUDA device"]
    fn elementwise_ops_match_cpu_in_bf16() {
        elementwise::<bf16>("elementwise bf16");
    }
}
