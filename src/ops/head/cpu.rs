//! CPU reference of the head ops. Parallel over images for per-image outputs and over
//! parameter rows for parameter gradients, each sum in a fixed order (deterministic).

use super::{AdapterShape, MoeShape, VptHeadShape};
use crate::ops::gelu::cpu::{gelu, gelu_grad};
use crate::ops::linear::cpu::matmul;
use crate::ops::linear::LinearShape;
use crate::ops::par::*;
use crate::ops::real::{cast, lane_sums, simd, Real, SyncPtr};
use crate::ops::Grad;

/// Dot product over the shorter length, in `lane_sums`' fixed order (vectorizes).
#[inline(always)]
pub(crate) fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let n = a.len().min(b.len());
    let [s] = lane_sums([&a[..n], &b[..n]], |[x, y]| [x * y]);
    s
}

/// `y += alpha * x`.
#[inline(always)]
fn axpy<T: Real>(alpha: T, x: &[T], y: &mut [T]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o = *o + alpha * v;
    }
}

/// Adapter forward: `out[b,t] = z + W2_t gelu(u) + b2_t`, `u = W1_t z + b1_t` (saved).
/// `scratch` holds `gelu(u)`.
#[allow(clippy::too_many_arguments)]
pub fn adapter_forward<T: Real>(
    z: &[T],
    w1: &[T],
    b1: &[T],
    w2: &[T],
    b2: &[T],
    u: &mut [T],
    out: &mut [T],
    s: &AdapterShape,
    scratch: &mut Vec<T>,
) {
    let (bn, p, d, r) = (s.batch, s.tokens, s.dim, s.rank);
    assert!(z.len() >= bn * p * d && out.len() >= bn * p * d && u.len() >= bn * p * r);
    assert!(w1.len() >= p * r * d && b1.len() >= p * r && w2.len() >= p * d * r && b2.len() >= p * d);
    if scratch.len() < bn * p * r {
        scratch.resize(bn * p * r, T::zero());
    }
    let up = SyncPtr(u.as_mut_ptr());
    let op = SyncPtr(out.as_mut_ptr());
    scratch[..bn * p * r]
        .par_chunks_mut(bn * r.max(1))
        .take(p)
        .enumerate()
        .for_each(|(t, gu)| {
            simd(
                #[inline(always)]
                || {
                    // SAFETY: token t's rows of u/out ([b, t, :]) are written by this task only.
                    unsafe {
                        let ut = up.get().add(t * r);
                        let ot = op.get().add(t * d);
                        for b in 0..bn {
                            std::ptr::copy_nonoverlapping(b1[t * r..].as_ptr(), ut.add(b * p * r), r);
                            for j in 0..d {
                                *ot.add(b * p * d + j) = z[b * p * d + t * d + j] + b2[t * d + j];
                            }
                        }
                        matmul(
                            bn,
                            r,
                            d,
                            ut,
                            p * r,
                            1,
                            true,
                            z[t * d..].as_ptr(),
                            p * d,
                            1,
                            w1[t * r * d..].as_ptr(),
                            1,
                            d,
                            T::one(),
                            false,
                        );
                        for b in 0..bn {
                            for j in 0..r {
                                gu[b * r + j] = gelu(*ut.add(b * p * r + j));
                            }
                        }
                        matmul(
                            bn,
                            d,
                            r,
                            ot,
                            p * d,
                            1,
                            true,
                            gu.as_ptr(),
                            r,
                            1,
                            w2[t * d * r..].as_ptr(),
                            1,
                            r,
                            T::one(),
                            false,
                        );
                    }
                },
            );
        });
}

/// Adapter backward: from `dout [B, P, D]` accumulates `dz += dout + W1^T du` and writes the
/// parameter gradients. `scratch` holds `gelu(u)` and `du`.
#[allow(clippy::too_many_arguments)]
pub fn adapter_backward<T: Real>(
    dout: &[T],
    z: &[T],
    u: &[T],
    w1: &[T],
    w2: &[T],
    dz: &mut [T],
    dw1: &mut [T],
    db1: &mut [T],
    dw2: &mut [T],
    db2: &mut [T],
    s: &AdapterShape,
    scratch: &mut Vec<T>,
) {
    let (bn, p, d, r) = (s.batch, s.tokens, s.dim, s.rank);
    assert!(dout.len() >= bn * p * d && z.len() >= bn * p * d && dz.len() >= bn * p * d);
    assert!(u.len() >= bn * p * r && w1.len() >= p * r * d && w2.len() >= p * d * r);
    assert!(dw1.len() >= p * r * d && db1.len() >= p * r && dw2.len() >= p * d * r && db2.len() >= p * d);
    if scratch.len() < 2 * bn * p * r {
        scratch.resize(2 * bn * p * r, T::zero());
    }
    let dzp = SyncPtr(dz.as_mut_ptr());
    let dw1p = SyncPtr(dw1.as_mut_ptr());
    let db1p = SyncPtr(db1.as_mut_ptr());
    let dw2p = SyncPtr(dw2.as_mut_ptr());
    let db2p = SyncPtr(db2.as_mut_ptr());
    scratch[..2 * bn * p * r]
        .par_chunks_mut(2 * bn * r.max(1))
        .take(p)
        .enumerate()
        .for_each(|(t, buf)| {
            simd(
                #[inline(always)]
                || {
                    let (gu, du) = buf.split_at_mut(bn * r);
                    // SAFETY: token t's parameter-gradient rows and its rows of dz belong to this task.
                    unsafe {
                        let dout_t = dout[t * d..].as_ptr();
                        // db2_t = sum_b dout[b, t]
                        let db2t = std::slice::from_raw_parts_mut(db2p.get().add(t * d), d);
                        db2t.fill(T::zero());
                        for b in 0..bn {
                            axpy(T::one(), &dout[b * p * d + t * d..b * p * d + (t + 1) * d], db2t);
                        }
                        for b in 0..bn {
                            for j in 0..r {
                                gu[b * r + j] = gelu(u[b * p * r + t * r + j]);
                            }
                        }
                        // dgu = dout_t W2_t  [B, r]  (into du), then du *= gelu'(u)
                        matmul(
                            bn,
                            r,
                            d,
                            du.as_mut_ptr(),
                            r,
                            1,
                            false,
                            dout_t,
                            p * d,
                            1,
                            w2[t * d * r..].as_ptr(),
                            r,
                            1,
                            T::one(),
                            false,
                        );
                        for b in 0..bn {
                            for j in 0..r {
                                du[b * r + j] = du[b * r + j] * gelu_grad(u[b * p * r + t * r + j]);
                            }
                        }
                        // dW2_t [D, r] = dout_t^T gu ; dW1_t [r, D] = du^T z_t
                        matmul(
                            d,
                            r,
                            bn,
                            dw2p.get().add(t * d * r),
                            r,
                            1,
                            false,
                            dout_t,
                            1,
                            p * d,
                            gu.as_ptr(),
                            r,
                            1,
                            T::one(),
                            false,
                        );
                        matmul(
                            r,
                            d,
                            bn,
                            dw1p.get().add(t * r * d),
                            d,
                            1,
                            false,
                            du.as_ptr(),
                            1,
                            r,
                            z[t * d..].as_ptr(),
                            p * d,
                            1,
                            T::one(),
                            false,
                        );
                        let db1t = std::slice::from_raw_parts_mut(db1p.get().add(t * r), r);
                        for j in 0..r {
                            db1t[j] = (0..bn).map(|b| du[b * r + j]).fold(T::zero(), |a, v| a + v);
                        }
                        // dz_t += dout_t + du W1_t
                        for b in 0..bn {
                            let row = std::slice::from_raw_parts_mut(dzp.get().add(b * p * d + t * d), d);
                            axpy(T::one(), &dout[b * p * d + t * d..b * p * d + (t + 1) * d], row);
                        }
                        matmul(
                            bn,
                            d,
                            r,
                            dzp.get().add(t * d),
                            p * d,
                            1,
                            true,
                            du.as_ptr(),
                            r,
                            1,
                            w1[t * r * d..].as_ptr(),
                            d,
                            1,
                            T::one(),
                            false,
                        );
                    }
                },
            );
        });
}

/// Gating, expert mixture and classifier of one branch (forward). Writes `y, m [B, K]` and
/// saves `q, r [B, E, K]`.
#[allow(clippy::too_many_arguments)]
pub fn moe_forward<T: Real>(
    z: &[T],
    adapted: &[T],
    gate: &[T],
    w: &[T],
    c: &[T],
    tok: &[u32],
    grow: &[u32],
    y: &mut [T],
    m: &mut [T],
    q: &mut [T],
    r: &mut [T],
    s: &MoeShape,
) {
    let (bn, p, d, k, e) = (s.batch, s.tokens, s.dim, s.labels, s.experts);
    assert!(z.len() >= bn * p * d && adapted.len() >= bn * p * d && gate.len() >= s.gate_rows * d);
    assert!(w.len() >= k * d && c.len() >= k && tok.len() >= e * k && grow.len() >= e * k);
    assert!(y.len() >= bn * k && m.len() >= bn * k && q.len() >= bn * e * k && r.len() >= bn * e * k);
    y[..bn * k]
        .par_chunks_mut(k)
        .zip(m[..bn * k].par_chunks_mut(k))
        .zip(q[..bn * e * k].par_chunks_mut(e * k))
        .zip(r[..bn * e * k].par_chunks_mut(e * k))
        .enumerate()
        .for_each(|(b, (((yb, mb), qb), rb))| {
            simd(
                #[inline(always)]
                || {
                    let zb = &z[b * p * d..(b + 1) * p * d];
                    let ab = &adapted[b * p * d..(b + 1) * p * d];
                    for ei in 0..e {
                        for ki in 0..k {
                            let t = tok[ei * k + ki] as usize;
                            let g = grow[ei * k + ki] as usize;
                            qb[ei * k + ki] = dot(&gate[g * d..(g + 1) * d], &zb[t * d..(t + 1) * d]);
                            rb[ei * k + ki] = dot(&w[ki * d..(ki + 1) * d], &ab[t * d..(t + 1) * d]);
                        }
                    }
                    for ki in 0..k {
                        let mx = (0..e).map(|ei| qb[ei * k + ki]).fold(T::neg_infinity(), T::max);
                        let mut den = T::zero();
                        let (mut num_m, mut num_y) = (T::zero(), T::zero());
                        for ei in 0..e {
                            let a = (qb[ei * k + ki] - mx).exp();
                            den = den + a;
                            num_m = num_m + a * qb[ei * k + ki];
                            num_y = num_y + a * rb[ei * k + ki];
                        }
                        mb[ki] = num_m / den;
                        yb[ki] = num_y / den + c[ki];
                    }
                },
            );
        });
}

/// Backward of [`moe_forward`]: from `dy, dm [B, K]` accumulates into `dz` and `dadapted`
/// `[B, P, D]` and writes `dgate [rows, D]`, `dw [K, D]`, `dc [K]`. `scratch` holds `dq`, `dr`
/// and the per-(e, k) gate gradients before they are summed into gate rows.
#[allow(clippy::too_many_arguments)]
pub fn moe_backward<T: Real>(
    dy: &[T],
    dm: &[T],
    z: &[T],
    adapted: &[T],
    gate: &[T],
    w: &[T],
    tok: &[u32],
    grow: &[u32],
    q: &[T],
    r: &[T],
    dz: &mut [T],
    dadapted: &mut [T],
    dgate: &mut [T],
    dw: &mut [T],
    dc: &mut [T],
    s: &MoeShape,
    scratch: &mut Vec<T>,
) {
    let (bn, p, d, k, e) = (s.batch, s.tokens, s.dim, s.labels, s.experts);
    assert!(dy.len() >= bn * k && dm.len() >= bn * k && q.len() >= bn * e * k && r.len() >= bn * e * k);
    assert!(dz.len() >= bn * p * d && dadapted.len() >= bn * p * d && dgate.len() >= s.gate_rows * d);
    assert!(dw.len() >= k * d && dc.len() >= k && gate.len() >= s.gate_rows * d && w.len() >= k * d);
    let need = 2 * bn * e * k + e * k * d;
    if scratch.len() < need {
        scratch.resize(need, T::zero());
    }
    let (dqr, tmpg) = scratch[..need].split_at_mut(2 * bn * e * k);
    let (dq, dr) = dqr.split_at_mut(bn * e * k);
    // Pass 1, per image: dq, dr and the token gradients.
    dq.par_chunks_mut(e * k)
        .zip(dr.par_chunks_mut(e * k))
        .zip(dz[..bn * p * d].par_chunks_mut(p * d))
        .zip(dadapted[..bn * p * d].par_chunks_mut(p * d))
        .enumerate()
        .for_each(|(b, (((dqb, drb), dzb), dab))| {
            simd(
                #[inline(always)]
                || {
                    let qb = &q[b * e * k..(b + 1) * e * k];
                    let rb = &r[b * e * k..(b + 1) * e * k];
                    for ki in 0..k {
                        let mx = (0..e).map(|ei| qb[ei * k + ki]).fold(T::neg_infinity(), T::max);
                        let den: T = (0..e).map(|ei| (qb[ei * k + ki] - mx).exp()).fold(T::zero(), |a, v| a + v);
                        let (gy, gm) = (dy[b * k + ki], dm[b * k + ki]);
                        // dL/dA_e = gy r_e + gm q_e ; abar = sum_e A_e dL/dA_e
                        let mut abar = T::zero();
                        for ei in 0..e {
                            let a = (qb[ei * k + ki] - mx).exp() / den;
                            abar = abar + a * (gy * rb[ei * k + ki] + gm * qb[ei * k + ki]);
                        }
                        for ei in 0..e {
                            let idx = ei * k + ki;
                            let a = (qb[idx] - mx).exp() / den;
                            let ga = gy * rb[idx] + gm * qb[idx];
                            dqb[idx] = a * (ga - abar + gm);
                            drb[idx] = gy * a;
                            let t = tok[idx] as usize;
                            let g = grow[idx] as usize;
                            axpy(dqb[idx], &gate[g * d..(g + 1) * d], &mut dzb[t * d..(t + 1) * d]);
                            axpy(drb[idx], &w[ki * d..(ki + 1) * d], &mut dab[t * d..(t + 1) * d]);
                        }
                    }
                },
            );
        });
    let (dq, dr) = (&*dq, &*dr);
    // Pass 2, per (e, k): the gate gradient of that pair, summed over images in order.
    tmpg.par_chunks_mut(d).enumerate().for_each(|(idx, row)| {
        simd(
            #[inline(always)]
            || {
                row.fill(T::zero());
                let t = tok[idx] as usize;
                for b in 0..bn {
                    axpy(dq[b * e * k + idx], &z[b * p * d + t * d..b * p * d + (t + 1) * d], row);
                }
            },
        );
    });
    // Per label: classifier weight and bias gradients.
    dw[..k * d]
        .par_chunks_mut(d)
        .zip(dc[..k].par_iter_mut())
        .enumerate()
        .for_each(|(ki, (row, dcv))| {
            simd(
                #[inline(always)]
                || {
                    row.fill(T::zero());
                    let mut sc = T::zero();
                    for b in 0..bn {
                        sc = sc + dy[b * k + ki];
                        for ei in 0..e {
                            let idx = ei * k + ki;
                            let t = tok[idx] as usize;
                            axpy(dr[b * e * k + idx], &adapted[b * p * d + t * d..b * p * d + (t + 1) * d], row);
                        }
                    }
                    *dcv = sc;
                },
            );
        });
    // Pass 3: (e, k) pairs into gate rows, in (e, k) order (several labels share a row under
    // group gating).
    dgate[..s.gate_rows * d].fill(T::zero());
    for idx in 0..e * k {
        let g = grow[idx] as usize;
        axpy(T::one(), &tmpg[idx * d..(idx + 1) * d], &mut dgate[g * d..(g + 1) * d]);
    }
}

/// Plain-VPT head forward: `zbar = mean_t z[b, t]` (saved), `y = zbar W^T + c`.
pub fn vpt_forward<T: Real>(z: &[T], w: &[T], c: &[T], zbar: &mut [T], y: &mut [T], s: &VptHeadShape) {
    let (bn, p, d, k) = (s.batch, s.tokens, s.dim, s.labels);
    assert!(z.len() >= bn * p * d && w.len() >= k * d && c.len() >= k && zbar.len() >= bn * d && y.len() >= bn * k);
    let inv: T = cast(1.0 / p as f64);
    for b in 0..bn {
        let zb = &mut zbar[b * d..(b + 1) * d];
        zb.fill(T::zero());
        for t in 0..p {
            axpy(T::one(), &z[b * p * d + t * d..b * p * d + (t + 1) * d], zb);
        }
        for v in zb.iter_mut() {
            *v = *v * inv;
        }
    }
    crate::ops::linear::cpu::forward(
        zbar,
        w,
        Some(c),
        y,
        &LinearShape {
            rows: bn,
            d_in: d,
            d_out: k,
        },
    );
}

/// Plain-VPT head backward: writes `dz [B, P, D]`, `dw`, `dc`. `scratch` holds `dzbar`.
#[allow(clippy::too_many_arguments)]
pub fn vpt_backward<T: Real>(
    dy: &[T],
    zbar: &[T],
    w: &[T],
    dz: &mut [T],
    dw: &mut [T],
    dc: &mut [T],
    s: &VptHeadShape,
    scratch: &mut Vec<T>,
) {
    let (bn, p, d, k) = (s.batch, s.tokens, s.dim, s.labels);
    assert!(dy.len() >= bn * k && zbar.len() >= bn * d && w.len() >= k * d && dz.len() >= bn * p * d);
    assert!(dw.len() >= k * d && dc.len() >= k);
    if scratch.len() < bn * d {
        scratch.resize(bn * d, T::zero());
    }
    // SAFETY: sizes asserted; dw is a distinct slice.
    unsafe {
        matmul(
            k,
            d,
            bn,
            dw.as_mut_ptr(),
            d,
            1,
            false,
            dy.as_ptr(),
            1,
            k,
            zbar.as_ptr(),
            d,
            1,
            T::one(),
            true,
        );
    }
    for (ki, v) in dc[..k].iter_mut().enumerate() {
        *v = (0..bn).map(|b| dy[b * k + ki]).fold(T::zero(), |a, x| a + x);
    }
    let dzbar = &mut scratch[..bn * d];
    crate::ops::linear::cpu::backward_input(
        dy,
        w,
        Grad::Write(dzbar),
        &LinearShape {
            rows: bn,
            d_in: d,
            d_out: k,
        },
    );
    let inv: T = cast(1.0 / p as f64);
    for b in 0..bn {
        for t in 0..p {
            for j in 0..d {
                dz[b * p * d + t * d + j] = dzbar[b * d + j] * inv;
            }
        }
    }
}
