//! CPU reference of masked attention: one task per (image, head), rayon across tasks, the
//! products through `matmul` (strided reads of Q, K, V straight from the qkv buffer). In f32
//! on AVX2 or AVX-512 with a head width that is a multiple of 8, the tasks run in `cpu_f32`
//! on register-blocked products instead (the same function up to float rounding).

use super::AttnShape;
use crate::ops::linear::cpu::matmul;
use crate::ops::par::*;
#[cfg(feature = "fast-cpu")]
use crate::ops::real::{as_f32, as_f32_mut};
use crate::ops::real::{cast, lane_sums, simd, Real, SyncPtr};
#[cfg(feature = "fast-cpu")]
use std::any::{Any, TypeId};

/// The f32 path's ISAs for this call, if it applies (f32, the `fast-cpu` feature, AVX2 or
/// AVX-512, a head width that is a multiple of 8).
#[cfg(feature = "fast-cpu")]
fn f32_path<T: Real>(sh: &AttnShape) -> Option<crate::ops::simd32::Isa> {
    if TypeId::of::<T>() != TypeId::of::<f32>() {
        return None;
    }
    super::cpu_f32::isa(sh.head_dim)
}

/// How many (image, head) tasks share the scratch at once: enough to keep every thread busy,
/// few enough that the `N x N` scratch stays small at large batch.
pub(super) fn tasks_per_round(total: usize) -> usize {
    total.min(8 * current_num_threads().max(1))
}

/// Maximum with eight lanes (vectorizes; the order of a max does not change the result).
#[inline(always)]
pub(super) fn max8<T: Real>(v: &[T]) -> T {
    let mut acc = [T::neg_infinity(); 8];
    let chunks = v.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    let mut m = acc.iter().copied().fold(T::neg_infinity(), T::max);
    for &x in rest {
        m = m.max(x);
    }
    m
}

/// In a row of query token `i`, sets the keys it may not see to `value`.
#[inline(always)]
pub(super) fn mask_row<T: Real>(row: &mut [T], i: usize, sh: &AttnShape, value: T) {
    mask_keys(row, i, 0, sh, value);
}

/// [`mask_row`] on a row that holds the keys `k0 .. k0 + row.len()`.
#[inline(always)]
pub(super) fn mask_keys<T: Real>(row: &mut [T], i: usize, k0: usize, sh: &AttnShape, value: T) {
    if i >= sh.prompt_start && i < sh.prompt_end {
        let (from, to) = (sh.prompt_start.max(k0), sh.prompt_end.min(k0 + row.len()));
        for j in (from..to).filter(|&j| j != i) {
            row[j - k0] = value;
        }
    }
}

/// Masks and softmaxes the rows of `s [q_len, n]` (scaled scores) in place; writes `lse[r]`.
#[inline(always)]
fn softmax_rows<T: Real>(s: &mut [T], lse: &mut [T], sh: &AttnShape) {
    let n = sh.tokens;
    for (r, row) in s.chunks_exact_mut(n).enumerate() {
        mask_row(row, sh.q_start + r, sh, T::neg_infinity());
        let mx = max8(row);
        for v in row.iter_mut() {
            *v = (*v - mx).fast_exp();
        }
        let [sum] = lane_sums([&row[..]], |[x]| [x]);
        let inv = T::one() / sum;
        for v in row.iter_mut() {
            *v = *v * inv;
        }
        lse[r] = mx + sum.ln();
    }
}

/// Forward: `out = softmax(mask(scale Q K^T)) V` per head for the query range; saves
/// `lse [B, h, Nq]`. `scratch` grows once to the size the shape needs and is reused.
pub fn forward<T: Real>(qkv: &[T], out: &mut [T], lse: &mut [T], sh: &AttnShape, scratch: &mut Vec<T>) {
    let (b, n, h, dh) = (sh.batch, sh.tokens, sh.heads, sh.head_dim);
    let (q0, nq) = (sh.q_start, sh.q_len);
    let d = sh.dim();
    assert!(q0 + nq <= n, "query range {q0}+{nq} exceeds {n} tokens");
    assert!(qkv.len() >= b * n * 3 * d && out.len() >= b * nq * d && lse.len() >= b * h * nq);
    let total = b * h;
    if total == 0 || nq == 0 {
        return;
    }
    #[cfg(feature = "fast-cpu")]
    if let Some(isa) = f32_path::<T>(sh) {
        let sc = (scratch as &mut dyn Any).downcast_mut::<Vec<f32>>().expect("T is f32");
        let (qkv, out, lse) = (as_f32(qkv).unwrap(), as_f32_mut(out).unwrap(), as_f32_mut(lse).unwrap());
        return super::cpu_f32::forward(qkv, out, lse, sh, sc, isa);
    }
    let per = tasks_per_round(total);
    if scratch.len() < per * nq * n {
        scratch.resize(per * nq * n, T::zero());
    }
    let scale: T = cast(1.0 / (dh as f64).sqrt());
    let out_p = SyncPtr(out.as_mut_ptr());
    let lse_p = SyncPtr(lse.as_mut_ptr());
    let mut first = 0;
    while first < total {
        let count = per.min(total - first);
        scratch[..count * nq * n].par_chunks_mut(nq * n).enumerate().for_each(|(t, s)| {
            simd(
                #[inline(always)]
                || {
                    let task = first + t;
                    let (bi, hi) = (task / h, task % h);
                    let base = qkv[bi * n * 3 * d + hi * dh..].as_ptr();
                    // SAFETY: every index below stays inside qkv/out/lse (asserted sizes); each task
                    // writes only its own head's columns of `out` and its own `lse` row.
                    unsafe {
                        let q = base.add(q0 * 3 * d);
                        let k = base.add(d);
                        let v = base.add(2 * d);
                        matmul(nq, n, dh, s.as_mut_ptr(), n, 1, false, q, 3 * d, 1, k, 1, 3 * d, scale, false);
                        let lse_row = std::slice::from_raw_parts_mut(lse_p.get().add(task * nq), nq);
                        softmax_rows(s, lse_row, sh);
                        let o = out_p.get().add(bi * nq * d + hi * dh);
                        matmul(nq, dh, n, o, d, 1, false, s.as_ptr(), n, 1, v, 3 * d, 1, T::one(), false);
                    }
                },
            );
        });
        first += count;
    }
}

/// Backward: from `dout [B, Nq, D]` writes `dqkv [B, N, 3D]` (overwritten; Q rows outside the
/// query range are zero).
pub fn backward<T: Real>(qkv: &[T], out: &[T], lse: &[T], dout: &[T], dqkv: &mut [T], sh: &AttnShape, scratch: &mut Vec<T>) {
    backward_rows(qkv, out, lse, dout, dqkv, sh, 0..sh.tokens, scratch);
}

/// [`backward`]'s gradient at the key rows `keys` alone, which must not be queries: their K and
/// V columns of `dqkv` get dK and dV, their Q columns zero (no query, no dQ), and the other rows
/// are left as they are. For a caller that reads nothing else (block 0 with deep prompts, whose
/// other input rows are the frozen embeddings and whose queries are the other rows): the
/// products run on `keys.len()` of the `N` keys and dQ not at all.
#[allow(clippy::too_many_arguments)]
pub fn backward_keys<T: Real>(
    qkv: &[T],
    out: &[T],
    lse: &[T],
    dout: &[T],
    dqkv: &mut [T],
    sh: &AttnShape,
    keys: std::ops::Range<usize>,
    scratch: &mut Vec<T>,
) {
    assert!(
        keys.start <= keys.end && keys.end <= sh.tokens,
        "key rows {keys:?} outside {} tokens",
        sh.tokens
    );
    assert!(
        keys.end <= sh.q_start || keys.start >= sh.q_start + sh.q_len || keys.is_empty(),
        "key rows {keys:?} overlap the query rows {}+{}",
        sh.q_start,
        sh.q_len
    );
    backward_rows(qkv, out, lse, dout, dqkv, sh, keys, scratch);
}

/// [`backward`] (`keys` every token) or [`backward_keys`].
#[allow(clippy::too_many_arguments)]
fn backward_rows<T: Real>(
    qkv: &[T],
    out: &[T],
    lse: &[T],
    dout: &[T],
    dqkv: &mut [T],
    sh: &AttnShape,
    keys: std::ops::Range<usize>,
    scratch: &mut Vec<T>,
) {
    let (b, n, h, dh) = (sh.batch, sh.tokens, sh.heads, sh.head_dim);
    let (q0, nq) = (sh.q_start, sh.q_len);
    let d = sh.dim();
    assert!(q0 + nq <= n, "query range {q0}+{nq} exceeds {n} tokens");
    assert!(qkv.len() >= b * n * 3 * d && out.len() >= b * nq * d && dout.len() >= b * nq * d);
    assert!(lse.len() >= b * h * nq && dqkv.len() >= b * n * 3 * d);
    let total = b * h;
    // Every key: dQ at the queries, dK and dV everywhere. Else only the rows `keys`.
    let all_keys = keys == (0..n);
    let (k0, nk) = (keys.start, keys.len());
    if total == 0 || nk == 0 {
        return;
    }
    let is_query = |t: usize| t >= q0 && t < q0 + nq;
    // Q rows outside the query range (of those written) get no gradient.
    for row in dqkv[..b * n * 3 * d]
        .chunks_exact_mut(3 * d)
        .enumerate()
        .filter(|&(t, _)| keys.contains(&(t % n)) && !is_query(t % n))
        .map(|(_, r)| r)
    {
        row[..d].fill(T::zero());
    }
    if nq == 0 {
        for row in dqkv[..b * n * 3 * d]
            .chunks_exact_mut(3 * d)
            .enumerate()
            .filter(|(t, _)| keys.contains(&(t % n)))
        {
            row.1[d..].fill(T::zero());
        }
        return;
    }
    #[cfg(feature = "fast-cpu")]
    if let Some(isa) = f32_path::<T>(sh) {
        let sc = (scratch as &mut dyn Any).downcast_mut::<Vec<f32>>().expect("T is f32");
        let (qkv, out, lse, dout) = (
            as_f32(qkv).unwrap(),
            as_f32(out).unwrap(),
            as_f32(lse).unwrap(),
            as_f32(dout).unwrap(),
        );
        return super::cpu_f32::backward(qkv, out, lse, dout, as_f32_mut(dqkv).unwrap(), sh, keys, sc, isa);
    }
    let per = tasks_per_round(total);
    if scratch.len() < 2 * per * nq * nk {
        scratch.resize(2 * per * nq * nk, T::zero());
    }
    let scale: T = cast(1.0 / (dh as f64).sqrt());
    let dqkv_p = SyncPtr(dqkv.as_mut_ptr());
    let mut first = 0;
    while first < total {
        let count = per.min(total - first);
        scratch[..2 * count * nq * nk]
            .par_chunks_mut(2 * nq * nk)
            .enumerate()
            .for_each(|(t, buf)| {
                simd(
                    #[inline(always)]
                    || {
                        let task = first + t;
                        let (bi, hi) = (task / h, task % h);
                        let (p, dp) = buf.split_at_mut(nq * nk);
                        let base = bi * n * 3 * d + hi * dh;
                        let o_off = bi * nq * d + hi * dh;
                        let lse_row = &lse[task * nq..(task + 1) * nq];
                        // SAFETY: indices inside the asserted sizes; each task writes only its own head's
                        // Q, K, V columns of dqkv.
                        unsafe {
                            let all = qkv[base..].as_ptr();
                            let q = all.add(q0 * 3 * d);
                            let k = all.add(d + k0 * 3 * d);
                            let v = all.add(2 * d + k0 * 3 * d);
                            let go = dout[o_off..].as_ptr();
                            // P = exp(scale Q K^T - lse) at the keys `k0..`, masked entries 0: the
                            // saved lse normalizes over every key, so any subset of P's columns
                            // comes out the same.
                            matmul(nq, nk, dh, p.as_mut_ptr(), nk, 1, false, q, 3 * d, 1, k, 1, 3 * d, scale, false);
                            for (r, row) in p.chunks_exact_mut(nk).enumerate() {
                                let l = lse_row[r];
                                for x in row.iter_mut() {
                                    *x = (*x - l).fast_exp();
                                }
                                mask_keys(row, q0 + r, k0, sh, T::zero());
                            }
                            // dP = dO V^T
                            matmul(nq, nk, dh, dp.as_mut_ptr(), nk, 1, false, go, d, 1, v, 1, 3 * d, T::one(), false);
                            // dS = P * (dP - rowsum(dO * O))
                            for i in 0..nq {
                                let orow = &out[o_off + i * d..o_off + i * d + dh];
                                let grow = &dout[o_off + i * d..o_off + i * d + dh];
                                let di: T = orow.iter().zip(grow).map(|(&a, &g)| a * g).sum();
                                let pr = &p[i * nk..(i + 1) * nk];
                                for (x, &pv) in dp[i * nk..(i + 1) * nk].iter_mut().zip(pr) {
                                    *x = pv * (*x - di);
                                }
                            }
                            let dall = dqkv_p.get().add(base);
                            let dk = dall.add(d + k0 * 3 * d);
                            let dv = dall.add(2 * d + k0 * 3 * d);
                            // dQ = scale dS K (every key needed) ; dK = scale dS^T Q ; dV = P^T dO
                            if all_keys {
                                let dq = dall.add(q0 * 3 * d);
                                matmul(nq, dh, n, dq, 3 * d, 1, false, dp.as_ptr(), n, 1, k, 3 * d, 1, scale, false);
                            }
                            matmul(nk, dh, nq, dk, 3 * d, 1, false, dp.as_ptr(), 1, nk, q, 3 * d, 1, scale, false);
                            matmul(nk, dh, nq, dv, 3 * d, 1, false, p.as_ptr(), 1, nk, go, d, 1, T::one(), false);
                        }
                    },
                );
            });
        first += count;
    }
}
