//! CPU reference of masked attention: one task per (image, head), rayon across tasks, the
//! products through `matmul` (strided reads of Q, K, V straight from the qkv buffer).

use super::AttnShape;
use crate::ops::linear::cpu::matmul;
use crate::ops::real::{cast, Real, SyncPtr};
use rayon::prelude::*;

/// How many (image, head) tasks share the scratch at once: enough to keep every thread busy,
/// few enough that the `N x N` scratch stays small at large batch.
fn tasks_per_round(total: usize) -> usize {
    total.min(8 * rayon::current_num_threads().max(1))
}

/// Masks and softmaxes the rows of `s [n, n]` (scaled scores) in place; returns nothing, writes
/// `lse[i]`.
fn softmax_rows<T: Real>(s: &mut [T], lse: &mut [T], sh: &AttnShape) {
    let n = sh.tokens;
    for (i, row) in s.chunks_exact_mut(n).enumerate() {
        if i >= sh.prompt_start && i < sh.prompt_end {
            for (j, v) in row[sh.prompt_start..sh.prompt_end].iter_mut().enumerate() {
                if sh.prompt_start + j != i {
                    *v = T::neg_infinity();
                }
            }
        }
        let mx = row.iter().copied().fold(T::neg_infinity(), T::max);
        let mut sum = T::zero();
        for v in row.iter_mut() {
            *v = (*v - mx).exp();
            sum = sum + *v;
        }
        let inv = T::one() / sum;
        for v in row.iter_mut() {
            *v = *v * inv;
        }
        lse[i] = mx + sum.ln();
    }
}

/// Forward: `out = softmax(mask(scale Q K^T)) V` per head; saves `lse [B, h, N]`.
/// `scratch` grows once to the size the shape needs and is reused.
pub fn forward<T: Real>(qkv: &[T], out: &mut [T], lse: &mut [T], sh: &AttnShape, scratch: &mut Vec<T>) {
    let (b, n, h, dh) = (sh.batch, sh.tokens, sh.heads, sh.head_dim);
    let d = sh.dim();
    assert!(qkv.len() >= b * n * 3 * d && out.len() >= b * n * d && lse.len() >= b * h * n);
    let total = b * h;
    if total == 0 || n == 0 {
        return;
    }
    let per = tasks_per_round(total);
    if scratch.len() < per * n * n {
        scratch.resize(per * n * n, T::zero());
    }
    let scale: T = cast(1.0 / (dh as f64).sqrt());
    let out_p = SyncPtr(out.as_mut_ptr());
    let lse_p = SyncPtr(lse.as_mut_ptr());
    let mut first = 0;
    while first < total {
        let count = per.min(total - first);
        scratch[..count * n * n].par_chunks_mut(n * n).enumerate().for_each(|(t, s)| {
            let task = first + t;
            let (bi, hi) = (task / h, task % h);
            let q = qkv[bi * n * 3 * d + hi * dh..].as_ptr();
            // SAFETY: every index below stays inside qkv/out/lse (asserted sizes); each task
            // writes only its own head's columns of `out` and its own `lse` row.
            unsafe {
                let k = q.add(d);
                let v = q.add(2 * d);
                matmul(n, n, dh, s.as_mut_ptr(), n, 1, false, q, 3 * d, 1, k, 1, 3 * d, scale, false);
                let lse_row = std::slice::from_raw_parts_mut(lse_p.get().add(task * n), n);
                softmax_rows(s, lse_row, sh);
                let o = out_p.get().add(bi * n * d + hi * dh);
                matmul(n, dh, n, o, d, 1, false, s.as_ptr(), n, 1, v, 3 * d, 1, T::one(), false);
            }
        });
        first += count;
    }
}

/// Backward: from `dout [B, N, D]` writes `dqkv [B, N, 3D]` (overwritten).
pub fn backward<T: Real>(
    qkv: &[T],
    out: &[T],
    lse: &[T],
    dout: &[T],
    dqkv: &mut [T],
    sh: &AttnShape,
    scratch: &mut Vec<T>,
) {
    let (b, n, h, dh) = (sh.batch, sh.tokens, sh.heads, sh.head_dim);
    let d = sh.dim();
    assert!(qkv.len() >= b * n * 3 * d && out.len() >= b * n * d && dout.len() >= b * n * d);
    assert!(lse.len() >= b * h * n && dqkv.len() >= b * n * 3 * d);
    let total = b * h;
    if total == 0 || n == 0 {
        return;
    }
    let per = tasks_per_round(total);
    if scratch.len() < 2 * per * n * n {
        scratch.resize(2 * per * n * n, T::zero());
    }
    let scale: T = cast(1.0 / (dh as f64).sqrt());
    let dqkv_p = SyncPtr(dqkv.as_mut_ptr());
    let mut first = 0;
    while first < total {
        let count = per.min(total - first);
        scratch[..2 * count * n * n].par_chunks_mut(2 * n * n).enumerate().for_each(|(t, buf)| {
            let task = first + t;
            let (bi, hi) = (task / h, task % h);
            let (p, dp) = buf.split_at_mut(n * n);
            let base = bi * n * 3 * d + hi * dh;
            let q = qkv[base..].as_ptr();
            let o_off = bi * n * d + hi * dh;
            let lse_row = &lse[task * n..(task + 1) * n];
            // SAFETY: indices inside the asserted sizes; each task writes only its own head's
            // Q, K, V columns of dqkv.
            unsafe {
                let k = q.add(d);
                let v = q.add(2 * d);
                let go = dout[o_off..].as_ptr();
                // P = exp(scale Q K^T - lse), masked entries 0.
                matmul(n, n, dh, p.as_mut_ptr(), n, 1, false, q, 3 * d, 1, k, 1, 3 * d, scale, false);
                for (i, row) in p.chunks_exact_mut(n).enumerate() {
                    let l = lse_row[i];
                    for (j, x) in row.iter_mut().enumerate() {
                        *x = if sh.allowed(i, j) { (*x - l).exp() } else { T::zero() };
                    }
                }
                // dP = dO V^T
                matmul(n, n, dh, dp.as_mut_ptr(), n, 1, false, go, d, 1, v, 1, 3 * d, T::one(), false);
                // dS = P * (dP - rowsum(dO * O))
                for i in 0..n {
                    let orow = &out[o_off + i * d..o_off + i * d + dh];
                    let grow = &dout[o_off + i * d..o_off + i * d + dh];
                    let di: T = orow.iter().zip(grow).map(|(&a, &g)| a * g).sum();
                    let pr = &p[i * n..(i + 1) * n];
                    for (x, &pv) in dp[i * n..(i + 1) * n].iter_mut().zip(pr) {
                        *x = pv * (*x - di);
                    }
                }
                let dq = dqkv_p.get().add(base);
                let dk = dq.add(d);
                let dv = dq.add(2 * d);
                // dQ = scale dS K ; dK = scale dS^T Q ; dV = P^T dO
                matmul(n, dh, n, dq, 3 * d, 1, false, dp.as_ptr(), n, 1, k, 3 * d, 1, scale, false);
                matmul(n, dh, n, dk, 3 * d, 1, false, dp.as_ptr(), 1, n, q, 3 * d, 1, scale, false);
                matmul(n, dh, n, dv, 3 * d, 1, false, p.as_ptr(), 1, n, go, d, 1, T::one(), false);
            }
        });
        first += count;
    }
}
