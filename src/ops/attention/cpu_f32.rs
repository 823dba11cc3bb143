//! The f32 CPU attention on the register-blocked products of `ops::simd32` (AVX2 or
//! AVX-512): the same per-(image, head) tasks, masks and saved log-sum-exp as the generic twin
//! in `cpu.rs`, with `K^T` (and `V^T` in the backward) copied once per task into a zero-padded
//! scratch so that every product reads its `B` operand row by row; `Q`, `K`, `V`, `dO` and the
//! outputs stay where they are in the qkv layout. Each output element's sum runs in a fixed
//! order inside one task, so results do not depend on the thread count, nor a query row on the
//! query range it is computed in.

use super::cpu::mask_keys;
use super::AttnShape;
use crate::ops::par::*;
use crate::ops::real::SyncPtr;
use crate::ops::simd32::{self, Isa, Mm};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The vector width of every product and row loop, where this path applies: the widest this
/// CPU runs, for a head width that is a multiple of 8 (the transposes' blocks; a product's
/// last vector narrower than the lanes goes masked).
pub(super) fn isa(head_dim: usize) -> Option<Isa> {
    if !head_dim.is_multiple_of(8) {
        return None;
    }
    Isa::best()
}

/// Keys rounded up to 16 lanes: the row stride of the padded scratch.
fn padded(n: usize) -> usize {
    n.div_ceil(16) * 16
}

/// Sets a row of scaled scores at the keys `k0 .. k0 + nk` up for the vector softmax: the keys
/// query `i` may not see, and the padding past them, to `-inf`.
fn mask_scores(row: &mut [f32], i: usize, k0: usize, nk: usize, sh: &AttnShape) {
    mask_keys(&mut row[..nk], i, k0, sh, f32::NEG_INFINITY);
    row[nk..].fill(f32::NEG_INFINITY);
}

/// `dst[i, :] = src[i, :dh]` for `rows` rows at stride `rs`: a head's columns packed, so the
/// products read them contiguously (the qkv row stride, `3D` floats, makes every row of a
/// head fall in the same few L1 sets).
///
/// # Safety
/// `src` must address `rows` rows of `dh` elements at stride `rs`.
unsafe fn pack_rows(dst: &mut [f32], src: *const f32, rs: usize, rows: usize, dh: usize) {
    for (i, row) in dst.chunks_exact_mut(dh).take(rows).enumerate() {
        row.copy_from_slice(std::slice::from_raw_parts(src.add(i * rs), dh));
    }
}

/// `C[m, w] = alpha A B` (overwritten): the [`Mm`] of every product here.
#[allow(clippy::too_many_arguments)]
fn mm(
    m: usize,
    w: usize,
    k: usize,
    a: *const f32,
    a_rs: usize,
    a_cs: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    alpha: f32,
) -> Mm {
    Mm {
        m,
        w,
        k,
        a,
        a_rs,
        a_cs,
        b,
        ldb,
        c,
        ldc,
        alpha,
        accumulate: false,
    }
}

/// Runs `task(i, scratch)` for the `total` (image, head) tasks on one `per_task`-float slot of
/// `slots` (from [`reserve`]) per thread: each slot's worker takes the next task until none is
/// left, so a task's scratch is the one its core just used, still in its L2 (a slot per task
/// cycled megabytes through memory). Every task overwrites what it reads of its slot, so its
/// results do not depend on the slot or on which tasks ran there before.
fn in_tasks(total: usize, per_task: usize, slots: &mut [f32], task: impl Fn(usize, &mut [f32]) + Sync) {
    let n = task_slots(total);
    let next = AtomicUsize::new(0);
    slots[..n * per_task].par_chunks_mut(per_task).for_each(|buf| loop {
        let t = next.fetch_add(1, Ordering::Relaxed);
        if t >= total {
            break;
        }
        task(t, buf);
    });
}

/// Threads that run tasks at once (one scratch slot each).
fn task_slots(total: usize) -> usize {
    current_num_threads().clamp(1, total.max(1))
}

/// Grows `scratch` for `reserved` floats of the call's own and [`in_tasks`]'s slots, and splits
/// it there.
fn reserve(scratch: &mut Vec<f32>, reserved: usize, total: usize, per_task: usize) -> (&mut [f32], &mut [f32]) {
    let len = reserved + task_slots(total) * per_task;
    if scratch.len() < len {
        scratch.resize(len, 0.0);
    }
    scratch.split_at_mut(reserved)
}

/// Forward (see `cpu::forward`); `isa` from [`isa`].
pub(super) fn forward(qkv: &[f32], out: &mut [f32], lse: &mut [f32], sh: &AttnShape, scratch: &mut Vec<f32>, isa: Isa) {
    let (b, n, h, dh) = (sh.batch, sh.tokens, sh.heads, sh.head_dim);
    let (q0, nq) = (sh.q_start, sh.q_len);
    let d = sh.dim();
    let ld = padded(n);
    let per_task = (dh + nq) * ld + (n + nq) * dh;
    let scale = 1.0 / (dh as f32).sqrt();
    let out_p = SyncPtr(out.as_mut_ptr());
    let lse_p = SyncPtr(lse.as_mut_ptr());
    let (_, slots) = reserve(scratch, 0, b * h, per_task);
    in_tasks(b * h, per_task, slots, |task, buf| {
        let (bi, hi) = (task / h, task % h);
        let (kt, rest) = buf.split_at_mut(dh * ld);
        let (vp, rest) = rest.split_at_mut(n * dh);
        let (qp, s) = rest.split_at_mut(nq * dh);
        let base = qkv[bi * n * 3 * d + hi * dh..].as_ptr();
        // SAFETY: every index stays inside qkv/out/lse (the caller asserted their sizes);
        // each task writes only its own head's columns of `out`, its own `lse` row and its
        // own scratch; the ISA comes from `isa` (supported; the head width a multiple of 8).
        unsafe {
            let q = base.add(q0 * 3 * d);
            let k = base.add(d);
            let v = base.add(2 * d);
            simd32::transpose(kt, ld, k, 3 * d, n, dh);
            pack_rows(vp, v, 3 * d, n, dh);
            pack_rows(qp, q, 3 * d, nq, dh);
            simd32::matmul(isa, &mm(nq, ld, dh, qp.as_ptr(), dh, 1, kt.as_ptr(), ld, s.as_mut_ptr(), ld, scale));
            let lse_row = std::slice::from_raw_parts_mut(lse_p.get().add(task * nq), nq);
            for (r, row) in s.chunks_exact_mut(ld).enumerate() {
                mask_scores(row, q0 + r, 0, n, sh);
                lse_row[r] = simd32::softmax_row(isa, row);
            }
            let o = out_p.get().add(bi * nq * d + hi * dh);
            simd32::matmul(isa, &mm(nq, dh, n, s.as_ptr(), ld, 1, vp.as_ptr(), dh, o, d, 1.0));
        }
    });
}

/// Backward (see `cpu::backward_rows`) into `dqkv` at the key rows `keys` (every token: dQ at
/// the queries too), whose Q rows outside the query range the caller zeroed; `isa` from
/// [`isa`].
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    qkv: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    dqkv: &mut [f32],
    sh: &AttnShape,
    keys: std::ops::Range<usize>,
    scratch: &mut Vec<f32>,
    isa: Isa,
) {
    let (b, n, h, dh) = (sh.batch, sh.tokens, sh.heads, sh.head_dim);
    let (q0, nq) = (sh.q_start, sh.q_len);
    let d = sh.dim();
    let all_keys = keys == (0..n);
    let (k0, nk) = (keys.start, keys.len());
    let ld = padded(nk);
    let per_task = 2 * (dh + nq) * ld + (n + 2 * nq) * dh;
    let scale = 1.0 / (dh as f32).sqrt();
    let dqkv_p = SyncPtr(dqkv.as_mut_ptr());
    // rowsum(dO * O) of every (image, head, query) in one pass over both in memory order, an
    // image per task: inside the (image, head) tasks each row of O is a gather at stride D
    // that the dot product waited on.
    let (dis, slots) = reserve(scratch, b * h * nq, b * h, per_task);
    dis.par_chunks_mut(h * nq).enumerate().for_each(|(bi, di)| {
        for r in 0..nq {
            let row = (bi * nq + r) * d;
            for hi in 0..h {
                let (o, g) = (&out[row + hi * dh..][..dh], &dout[row + hi * dh..][..dh]);
                // SAFETY: the ISA comes from `isa` (supported).
                di[hi * nq + r] = unsafe { simd32::dot(isa, o, g) };
            }
        }
    });
    let dis = &*dis;
    in_tasks(b * h, per_task, slots, |task, buf| {
        let (bi, hi) = (task / h, task % h);
        let (kt, rest) = buf.split_at_mut(dh * ld);
        let (vt, rest) = rest.split_at_mut(dh * ld);
        let (p, rest) = rest.split_at_mut(nq * ld);
        let (dp, rest) = rest.split_at_mut(nq * ld);
        let (kp, rest) = rest.split_at_mut(n * dh);
        let (qp, gp) = rest.split_at_mut(nq * dh);
        let base = bi * n * 3 * d + hi * dh;
        let o_off = bi * nq * d + hi * dh;
        let lse_row = &lse[task * nq..(task + 1) * nq];
        // SAFETY: as in `forward`; each task writes only its own head's Q, K, V columns of
        // dqkv.
        unsafe {
            let all = qkv[base..].as_ptr();
            let q = all.add(q0 * 3 * d);
            let k = all.add(d + k0 * 3 * d);
            let v = all.add(2 * d + k0 * 3 * d);
            let go = dout[o_off..].as_ptr();
            simd32::transpose(kt, ld, k, 3 * d, nk, dh);
            simd32::transpose(vt, ld, v, 3 * d, nk, dh);
            pack_rows(qp, q, 3 * d, nq, dh);
            pack_rows(gp, go, d, nq, dh);
            // P = exp(scale Q K^T - lse), masked entries 0; dP = dO V^T (the saved lse
            // normalizes over every key, so the columns of any key range come out the same).
            simd32::matmul(isa, &mm(nq, ld, dh, qp.as_ptr(), dh, 1, kt.as_ptr(), ld, p.as_mut_ptr(), ld, scale));
            simd32::matmul(isa, &mm(nq, ld, dh, gp.as_ptr(), dh, 1, vt.as_ptr(), ld, dp.as_mut_ptr(), ld, 1.0));
            // P (masked and padded entries 0), then dS = P * (dP - rowsum(dO * O)) in
            // place of dP.
            let di = &dis[task * nq..(task + 1) * nq];
            for (r, (prow, dprow)) in p.chunks_exact_mut(ld).zip(dp.chunks_exact_mut(ld)).enumerate() {
                mask_scores(prow, q0 + r, k0, nk, sh);
                simd32::softmax_grad_row(isa, prow, dprow, lse_row[r], di[r]);
            }
            let dall = dqkv_p.get().add(base);
            let dk = dall.add(d + k0 * 3 * d);
            let dv = dall.add(2 * d + k0 * 3 * d);
            // dQ = scale dS K (every key needed) ; dK = scale dS^T Q ; dV = P^T dO
            if all_keys {
                pack_rows(kp, k, 3 * d, n, dh);
                let dq = dall.add(q0 * 3 * d);
                simd32::matmul(isa, &mm(nq, dh, n, dp.as_ptr(), ld, 1, kp.as_ptr(), dh, dq, 3 * d, scale));
            }
            simd32::matmul(isa, &mm(nk, dh, nq, dp.as_ptr(), 1, ld, qp.as_ptr(), dh, dk, 3 * d, scale));
            simd32::matmul(isa, &mm(nk, dh, nq, p.as_ptr(), 1, ld, gp.as_ptr(), dh, dv, 3 * d, 1.0));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::attention::cpu as generic;

    fn values(len: usize, seed: usize, scale: f64) -> Vec<f64> {
        (0..len)
            .map(|i| (((i * 2_654_435_761 + seed * 40_503) % 10_007) as f64 / 5003.5 - 1.0) * scale)
            .collect()
    }

    /// Both widths this CPU runs, at head widths on and off the 16 lanes, token counts off
    /// the padding, with and without prompts and on a query sub-range, against the f64 twin.
    #[test]
    fn matches_the_f64_twin_at_every_width() {
        let Some(best) = Isa::best() else { return };
        let mut widths = vec![Isa::Avx2];
        if best == Isa::Avx512 {
            widths.push(Isa::Avx512);
        }
        for &isa in &widths {
            for (dh, n, prompts, range) in [
                (8usize, 5usize, 0usize, None),
                (16, 17, 3, None),
                (24, 67, 12, None),
                (64, 33, 5, Some((1, 5))),
                (32, 40, 7, Some((9, 31))),
            ] {
                let full = AttnShape::full(2, n, 3, dh, 1, 1 + prompts);
                let sh = range.map_or(full, |(q_start, q_len)| AttnShape { q_start, q_len, ..full });
                let (d, nq) = (sh.dim(), sh.q_len);
                let qkv = values(2 * n * 3 * d, dh + n, 1.5);
                let dout = values(2 * nq * d, 7 * n, 1.0);
                let (mut out, mut lse, mut dqkv, mut sc) =
                    (vec![0.0; 2 * nq * d], vec![0.0; 2 * 3 * nq], vec![0.0; 2 * n * 3 * d], Vec::new());
                generic::forward(&qkv, &mut out, &mut lse, &sh, &mut sc);
                generic::backward(&qkv, &out, &lse, &dout, &mut dqkv, &sh, &mut sc);

                let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
                let (q32, g32) = (f32s(&qkv), f32s(&dout));
                let (mut o32, mut l32, mut sc32) = (vec![0.0f32; out.len()], vec![0.0f32; lse.len()], Vec::new());
                // NaN where the backward must write: every element it leaves is a failure.
                let mut d32 = vec![f32::NAN; dqkv.len()];
                for row in d32
                    .chunks_exact_mut(3 * d)
                    .enumerate()
                    .filter(|(t, _)| t % n < sh.q_start || t % n >= sh.q_start + nq)
                    .map(|(_, r)| r)
                {
                    row[..d].fill(0.0);
                }
                forward(&q32, &mut o32, &mut l32, &sh, &mut sc32, isa);
                backward(&q32, &o32, &l32, &g32, &mut d32, &sh, 0..n, &mut sc32, isa);
                for (what, got, want) in [("out", &o32, &out), ("lse", &l32, &lse), ("dqkv", &d32, &dqkv)] {
                    let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
                    let err = got
                        .iter()
                        .zip(want.iter())
                        .map(|(&g, &w)| (g as f64 - w).abs())
                        .fold(0.0f64, |m, e| if e.is_nan() || m.is_nan() { f64::NAN } else { m.max(e) });
                    assert!(
                        err <= 1e-5 * scale,
                        "{isa:?} dh {dh} N {n} P {prompts} {range:?}: {what} off by {err:e} (scale {scale})"
                    );
                }
            }
        }
    }

    /// A query row's output does not depend on the range it is computed in (the last block
    /// computes the prompt rows alone): the same bits as in the full call.
    #[test]
    fn a_query_row_is_the_same_in_any_range() {
        let Some(best) = Isa::best() else { return };
        // A head width off the 16 lanes: the products' last vector masked on AVX-512.
        let (n, dh, p) = (41, 24, 6);
        let full = AttnShape::full(2, n, 2, dh, 1, 1 + p);
        let part = AttnShape {
            q_start: 1,
            q_len: p,
            ..full
        };
        let d = full.dim();
        let qkv: Vec<f32> = values(2 * n * 3 * d, 3, 2.0).iter().map(|&x| x as f32).collect();
        let mut sc = Vec::new();
        let (mut o_full, mut l_full) = (vec![0.0f32; 2 * n * d], vec![0.0f32; 2 * 2 * n]);
        forward(&qkv, &mut o_full, &mut l_full, &full, &mut sc, best);
        let (mut o_part, mut l_part) = (vec![0.0f32; 2 * p * d], vec![0.0f32; 2 * 2 * p]);
        forward(&qkv, &mut o_part, &mut l_part, &part, &mut sc, best);
        for b in 0..2 {
            for i in 0..p {
                let f = &o_full[(b * n + 1 + i) * d..(b * n + 2 + i) * d];
                let g = &o_part[(b * p + i) * d..(b * p + i + 1) * d];
                assert_eq!(f, g, "image {b} prompt {i}");
            }
        }
    }
}
