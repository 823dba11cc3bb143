//! The fp32 <-> bf16 casts (`src/ops/cast`): on a device, bit for bit against the CPU twin
//! (the `half` crate's rounding) on values that stress rounding. The CPU twin itself is
//! `half`'s conversion.
#![cfg(feature = "cuda")]

use crate::gpu_common::*;
use mlvpt::gpu::bf16;
use mlvpt::ops::cast;
use rand::Rng;

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
