//! CPU reference of AdamW (one tensor; the backend loops over tensors in order).

use super::AdamWConfig;
use crate::ops::par::*;
use crate::ops::real::{cast, simd, Real};

const CHUNK: usize = 4096;

/// One AdamW update of `p` with gradient `g` at step `step` (1-based) and learning rate `lr`.
pub fn step<T: Real>(p: &mut [T], g: &[T], m: &mut [T], v: &mut [T], step: u64, lr: f64, cfg: &AdamWConfig) {
    assert!(step >= 1, "AdamW steps count from 1");
    let n = p.len();
    assert!(g.len() >= n && m.len() >= n && v.len() >= n);
    let b1: T = cast(cfg.beta1);
    let b2: T = cast(cfg.beta2);
    let c1: T = cast(1.0 / (1.0 - cfg.beta1.powf(step as f64)));
    let c2: T = cast(1.0 / (1.0 - cfg.beta2.powf(step as f64)));
    let eps: T = cast(cfg.eps);
    let wd: T = cast(cfg.weight_decay);
    let lr: T = cast(lr);
    p.par_chunks_mut(CHUNK)
        .zip(m[..n].par_chunks_mut(CHUNK))
        .zip(v[..n].par_chunks_mut(CHUNK))
        .zip(g[..n].par_chunks(CHUNK))
        .for_each(|(((pc, mc), vc), gc)| {
            simd(
                #[inline(always)]
                || {
                    for i in 0..pc.len() {
                        let gi = gc[i];
                        mc[i] = b1 * mc[i] + (T::one() - b1) * gi;
                        vc[i] = b2 * vc[i] + (T::one() - b2) * gi * gi;
                        let mhat = mc[i] * c1;
                        let vhat = vc[i] * c2;
                        pc[i] = pc[i] - lr * (mhat / (vhat.sqrt() + eps) + wd * pc[i]);
                    }
                },
            );
        });
}
