//! CPU reference of LayerNorm: rows in parallel, each row in a fixed order (deterministic).

use super::{LayerNormShape, Norm, NormStats};
use crate::ops::par::*;
use crate::ops::real::{cast, lane_sums, simd, Real};
use crate::ops::Grad;

/// Rows per rayon task.
const ROWS_PER_TASK: usize = 16;

/// Forward: writes `y` and the statistics for the first `rows` rows.
pub fn forward<T: Real>(x: &[T], norm: Norm<&[T]>, y: &mut [T], stats: NormStats<&mut [T]>, sh: &LayerNormShape) {
    let (Norm { gamma, beta }, NormStats { mean, rstd }) = (norm, stats);
    let &LayerNormShape { rows, dim: d, eps } = sh;
    assert!(x.len() >= rows * d && y.len() >= rows * d && mean.len() >= rows && rstd.len() >= rows);
    assert!(gamma.len() >= d && beta.len() >= d && d > 0);
    let eps: T = cast(eps);
    let (gamma, beta) = (&gamma[..d], &beta[..d]);
    let inv_d: T = cast(1.0 / d as f64);
    y[..rows * d]
        .par_chunks_mut(d * ROWS_PER_TASK)
        .zip(mean[..rows].par_chunks_mut(ROWS_PER_TASK))
        .zip(rstd[..rows].par_chunks_mut(ROWS_PER_TASK))
        .enumerate()
        .for_each(|(task, ((yc, mc), rc))| {
            simd(
                #[inline(always)]
                || {
                    let r0 = task * ROWS_PER_TASK;
                    for (i, yr) in yc.chunks_exact_mut(d).enumerate() {
                        let xr = &x[(r0 + i) * d..(r0 + i + 1) * d];
                        let [mu] = lane_sums([xr], |[v]| [v]).map(|s| s * inv_d);
                        let [var] = lane_sums([xr], |[v]| [(v - mu) * (v - mu)]).map(|s| s * inv_d);
                        let rs = T::one() / (var + eps).sqrt();
                        for j in 0..d {
                            yr[j] = (xr[j] - mu) * rs * gamma[j] + beta[j];
                        }
                        mc[i] = mu;
                        rc[i] = rs;
                    }
                },
            );
        });
}

/// Input gradient: `dx (+)= LN'(x)^T dy` (`Grad::Add` accumulates).
pub fn backward<T: Real>(dy: &[T], x: &[T], gamma: &[T], stats: NormStats<&[T]>, dx: Grad<&mut [T]>, sh: &LayerNormShape) {
    let NormStats { mean, rstd } = stats;
    let (rows, d, accumulate) = (sh.rows, sh.dim, dx.accumulates());
    let dx = dx.into_inner();
    assert!(dy.len() >= rows * d && x.len() >= rows * d && dx.len() >= rows * d);
    assert!(mean.len() >= rows && rstd.len() >= rows && gamma.len() >= d);
    let inv_d: T = cast(1.0 / d as f64);
    let gamma = &gamma[..d];
    dx[..rows * d]
        .par_chunks_mut(d * ROWS_PER_TASK)
        .enumerate()
        .for_each(|(task, dxc)| {
            simd(
                #[inline(always)]
                || {
                    let r0 = task * ROWS_PER_TASK;
                    for (i, dxr) in dxc.chunks_exact_mut(d).enumerate() {
                        let r = r0 + i;
                        let (mu, rs) = (mean[r], rstd[r]);
                        let xr = &x[r * d..(r + 1) * d];
                        let dyr = &dy[r * d..(r + 1) * d];
                        let [mg, mgx] = lane_sums([dyr, gamma, xr], |[dy, ga, v]| {
                            let g = dy * ga;
                            [g, g * (v - mu)]
                        });
                        let (mg, mgx) = (mg * inv_d, mgx * rs * inv_d);
                        for j in 0..d {
                            let xhat = (xr[j] - mu) * rs;
                            let v = rs * (dyr[j] * gamma[j] - mg - xhat * mgx);
                            dxr[j] = if accumulate { dxr[j] + v } else { v };
                        }
                    }
                },
            );
        });
}
