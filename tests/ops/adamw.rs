//! AdamW (`src/ops/adamw`): on a device, the single-tensor and the multi-tensor launch (with
//! the loss guard) against the f64 CPU twin over several steps.
#![cfg(feature = "cuda")]

use crate::gpu_common::*;
use mlvpt::ops::adamw;

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
