//! GELU (`src/ops/gelu`): reference values and the gradient against finite differences (f64
//! CPU twin); on a device, the bias + GELU kernels against the twin.

use crate::common::*;
use mlvpt::ops::{gelu, Rows};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

#[test]
fn gelu_values_and_gradient() {
    // Reference values of x * Phi(x).
    let cases: [(f64, f64); 4] = [
        (1.0, 0.841_344_746_068_542_9),
        (-1.0, -0.158_655_253_931_457_07),
        (2.5, 2.484_475_836_685_559_7),
        (0.0, 0.0),
    ];
    for (x, want) in cases {
        assert!((gelu::cpu::gelu(x) - want).abs() < 1e-14, "gelu({x})");
    }
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let n = 50;
    let x = rand_vec(&mut rng, n, 4.0);
    let r = rand_vec(&mut rng, n, 1.0);
    let fwd = |x: &[f64]| {
        let mut y = vec![0.0; n];
        gelu::cpu::forward(x, None, &mut y, Rows { rows: 1, dim: n });
        y
    };
    let mut d = r.clone();
    gelu::cpu::backward(&x, None, &mut d, Rows { rows: 1, dim: n });
    fd_check("gelu", &x, &d, |x| dot(&fwd(x), &r));
}

/// The bias form, `gelu(x + b)` over rows, against the plain form on `x + b` (f64 and f32;
/// f32 runs the vector path where the CPU has one), and its gradient against finite
/// differences in f64.
#[test]
fn gelu_with_a_bias_is_gelu_of_the_sum() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (rows, dim) = (5, 37);
    let n = rows * dim;
    let sh = Rows { rows, dim };
    let x = rand_vec(&mut rng, n, 3.0);
    let b = rand_vec(&mut rng, dim, 1.0);
    let r = rand_vec(&mut rng, n, 1.0);
    let h: Vec<f64> = (0..n).map(|i| x[i] + b[i % dim]).collect();
    let flat = Rows { rows: 1, dim: n };
    let (mut want_y, mut want_d) = (vec![0.0; n], r.clone());
    gelu::cpu::forward(&h, None, &mut want_y, flat);
    gelu::cpu::backward(&h, None, &mut want_d, flat);
    let (mut y, mut d) = (vec![0.0; n], r.clone());
    gelu::cpu::forward(&x, Some(&b), &mut y, sh);
    gelu::cpu::backward(&x, Some(&b), &mut d, sh);
    assert_eq!((&y, &d), (&want_y, &want_d), "f64: bias form against gelu(x + b)");
    let f32s = |v: &[f64]| v.iter().map(|&v| v as f32).collect::<Vec<f32>>();
    let (x32, b32, r32) = (f32s(&x), f32s(&b), f32s(&r));
    let (mut y32, mut d32) = (vec![0.0f32; n], r32.clone());
    gelu::cpu::forward(&x32, Some(&b32), &mut y32, sh);
    gelu::cpu::backward(&x32, Some(&b32), &mut d32, sh);
    for i in 0..n {
        let h = x32[i] as f64 + b32[i % dim] as f64;
        let (wy, wd) = (gelu::cpu::gelu(h), r32[i] as f64 * gelu::cpu::gelu_grad(h));
        assert!(
            (y32[i] as f64 - wy).abs() <= 1e-6 * (1.0 + wy.abs()),
            "f32 gelu at {i}: {} vs {wy}",
            y32[i]
        );
        assert!(
            (d32[i] as f64 - wd).abs() <= 1e-6 * (1.0 + wd.abs()),
            "f32 gelu' at {i}: {} vs {wd}",
            d32[i]
        );
    }
    let fwd = |x: &[f64]| {
        let mut y = vec![0.0; n];
        gelu::cpu::forward(x, Some(&b), &mut y, sh);
        y
    };
    fd_check("gelu with bias", &x, &d, |x| dot(&fwd(x), &r));
}

// ---------------------------------------------------------------- bias + GELU (device)

#[cfg(feature = "cuda")]
mod gpu {
    use crate::gpu_common::*;
    use mlvpt::ops::{gelu, Rows};

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
            gelu::cpu::forward(&h, None, &mut y64, Rows { rows: 1, dim: n });
            let mut dx64: Vec<f64> = to_f64(&dyr[off..]);
            gelu::cpu::backward(&h, None, &mut dx64, Rows { rows: 1, dim: n });

            let (xd, dyd, bd) = (gpu.upload(&xb).unwrap(), gpu.upload(&dyb).unwrap(), gpu.upload(&b).unwrap());
            let bias: Option<&dyn mlvpt::gpu::DevicePtr<f32>> = if with_bias { Some(&bd) } else { None };
            let xs = xd.slice(off..);
            let mut y = nan_bf16(&gpu, n + off);
            gelu::cuda::forward(&gpu, gpu.stream(), &xs, bias, &mut y.slice_mut(off..), Rows { rows, dim: cols }).unwrap();
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
                Rows { rows, dim: cols },
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
            gelu::cuda::backward_in_place(&gpu, gpu.stream(), &xs, bias, &mut d.slice_mut(off..), Rows { rows, dim: cols }).unwrap();
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
}
