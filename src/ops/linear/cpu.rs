//! CPU reference of the linear op, and the strided matrix product every CPU op uses
//! (with the `fast-cpu` feature the `gemm` crate: blocked, SIMD, optionally rayon-parallel over
//! output tiles only, so the reduction order of each output element is fixed and results are
//! deterministic; without it a plain loop on the calling thread, the same up to float rounding).

use super::LinearShape;
use crate::ops::par::*;
use crate::ops::real::Real;
use crate::ops::Grad;
#[cfg(feature = "fast-cpu")]
use gemm::Parallelism;

/// Rows per task of the bias fill.
const BIAS_ROWS: usize = 64;

/// Products smaller than this many multiply-adds run on the calling thread.
#[cfg(feature = "fast-cpu")]
const PARALLEL_MIN_MACS: usize = 1 << 18;

/// `dst[m, n] (+)= alpha * lhs[m, k] * rhs[k, n]`; every matrix is given by a pointer, a row
/// stride and a column stride (in elements), so transposes and strided views (the Q, K, V
/// slices of a `[N, 3, h, dh]` qkv row) need no copies.
///
/// # Safety
/// Every addressed element must be in bounds; `dst` must not alias `lhs` or `rhs`, and no other
/// thread may touch the addressed part of `dst` during the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    dst_rs: usize,
    dst_cs: usize,
    accumulate: bool,
    lhs: *const T,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const T,
    rhs_rs: usize,
    rhs_cs: usize,
    alpha: T,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    *dst.add(i * dst_rs + j * dst_cs) = T::zero();
                }
            }
        }
        return;
    }
    #[cfg(not(feature = "fast-cpu"))]
    {
        let _ = parallel;
        matmul_plain(
            m, n, k, dst, dst_rs, dst_cs, accumulate, lhs, lhs_rs, lhs_cs, rhs, rhs_rs, rhs_cs, alpha,
        );
    }
    #[cfg(feature = "fast-cpu")]
    {
        let par = if parallel && m * n * k >= PARALLEL_MIN_MACS && rayon::current_num_threads() > 1 {
            Parallelism::Rayon(rayon::current_num_threads())
        } else {
            Parallelism::None
        };
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs,
            lhs_cs as isize,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            T::one(),
            alpha,
            false,
            false,
            false,
            par,
        );
    }
}

/// [`matmul`] without the `gemm` crate (the `fast-cpu` feature off): each output element is
/// `alpha * sum_p lhs[i, p] rhs[p, j]` summed in order of `p`, then added to `dst` or stored.
/// The loop order follows the operands' strides; it changes the speed, never the result.
///
/// # Safety
/// As [`matmul`]'s, with `m, n, k > 0`.
#[cfg(not(feature = "fast-cpu"))]
#[allow(clippy::too_many_arguments)]
unsafe fn matmul_plain<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    dst_rs: usize,
    dst_cs: usize,
    accumulate: bool,
    lhs: *const T,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const T,
    rhs_rs: usize,
    rhs_cs: usize,
    alpha: T,
) {
    let store = |i: usize, j: usize, sum: T| {
        let d = dst.add(i * dst_rs + j * dst_cs);
        *d = if accumulate { *d + alpha * sum } else { alpha * sum };
    };
    if rhs_rs == 1 && rhs_cs != 1 {
        // Columns of rhs are contiguous (x W^T with W row-major): one dot product per element.
        for i in 0..m {
            let l = lhs.add(i * lhs_rs);
            for j in 0..n {
                let r = rhs.add(j * rhs_cs);
                let mut sum = T::zero();
                for p in 0..k {
                    sum = sum + *l.add(p * lhs_cs) * *r.add(p);
                }
                store(i, j, sum);
            }
        }
    } else {
        // Rows of rhs are contiguous (or neither is): a row of sums at a time.
        let mut row = vec![T::zero(); n];
        for i in 0..m {
            row.fill(T::zero());
            for p in 0..k {
                let a = *lhs.add(i * lhs_rs + p * lhs_cs);
                let r = rhs.add(p * rhs_rs);
                for (j, s) in row.iter_mut().enumerate() {
                    *s = *s + a * *r.add(j * rhs_cs);
                }
            }
            for (j, &sum) in row.iter().enumerate() {
                store(i, j, sum);
            }
        }
    }
}

/// `y[rows, out] = x[rows, in] W^T + b`.
pub fn forward<T: Real>(x: &[T], w: &[T], bias: Option<&[T]>, y: &mut [T], sh: &LinearShape) {
    let &LinearShape { rows, d_in, d_out } = sh;
    assert!(x.len() >= rows * d_in && w.len() >= d_out * d_in && y.len() >= rows * d_out);
    if let Some(b) = bias {
        assert!(b.len() >= d_out);
        // The product then adds to the bias; filling is a pass over all of y, so it is split
        // across the threads like the product.
        y[..rows * d_out].par_chunks_mut(d_out * BIAS_ROWS).for_each(|block| {
            for row in block.chunks_exact_mut(d_out) {
                row.copy_from_slice(&b[..d_out]);
            }
        });
    }
    // SAFETY: bounds asserted above; y is a distinct &mut slice.
    unsafe {
        matmul(
            rows,
            d_out,
            d_in,
            y.as_mut_ptr(),
            d_out,
            1,
            bias.is_some(),
            x.as_ptr(),
            d_in,
            1,
            w.as_ptr(),
            1,
            d_in,
            T::one(),
            true,
        );
    }
}

/// `dx[rows, in] (+)= dy[rows, out] W` (`Grad::Add` accumulates).
pub fn backward_input<T: Real>(dy: &[T], w: &[T], dx: Grad<&mut [T]>, sh: &LinearShape) {
    let &LinearShape { rows, d_in, d_out } = sh;
    let accumulate = dx.accumulates();
    let dx = dx.into_inner();
    assert!(dy.len() >= rows * d_out && w.len() >= d_out * d_in && dx.len() >= rows * d_in);
    // SAFETY: bounds asserted above.
    unsafe {
        matmul(
            rows,
            d_in,
            d_out,
            dx.as_mut_ptr(),
            d_in,
            1,
            accumulate,
            dy.as_ptr(),
            d_out,
            1,
            w.as_ptr(),
            d_in,
            1,
            T::one(),
            true,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::matmul;

    /// `matmul` (gemm with `fast-cpu`, the plain loop without) against the definition, on
    /// every combination of operand layouts (row- or column-major, so both of the plain loop's
    /// orders run), storing and accumulating, with an odd `alpha`.
    #[test]
    fn matmul_matches_the_definition_for_any_strides() {
        let (m, n, k) = (7usize, 5usize, 9usize);
        let lhs: Vec<f64> = (0..m * k).map(|i| ((i * 37 % 11) as f64 - 5.0) / 3.0).collect();
        let rhs: Vec<f64> = (0..k * n).map(|i| ((i * 23 % 13) as f64 - 6.0) / 7.0).collect();
        let dst0: Vec<f64> = (0..m * n).map(|i| (i % 4) as f64 - 1.5).collect();
        let alpha = 0.75;
        // (row stride, column stride) of a rows x cols matrix stored row- or column-major.
        let layout = |rows: usize, cols: usize, row_major: bool| {
            if row_major {
                (cols, 1)
            } else {
                (1, rows)
            }
        };
        for mask in 0..8 {
            let (ls, rs, ds) = (
                layout(m, k, mask & 1 == 0),
                layout(k, n, mask & 2 == 0),
                layout(m, n, mask & 4 == 0),
            );
            for accumulate in [false, true] {
                let mut dst = dst0.clone();
                // SAFETY: every operand holds rows x cols elements under its layout.
                unsafe {
                    matmul(
                        m,
                        n,
                        k,
                        dst.as_mut_ptr(),
                        ds.0,
                        ds.1,
                        accumulate,
                        lhs.as_ptr(),
                        ls.0,
                        ls.1,
                        rhs.as_ptr(),
                        rs.0,
                        rs.1,
                        alpha,
                        true,
                    );
                }
                for i in 0..m {
                    for j in 0..n {
                        let sum: f64 = (0..k).map(|p| lhs[i * ls.0 + p * ls.1] * rhs[p * rs.0 + j * rs.1]).sum();
                        let at = i * ds.0 + j * ds.1;
                        let want = if accumulate { dst0[at] + alpha * sum } else { alpha * sum };
                        assert!(
                            (dst[at] - want).abs() <= 1e-12,
                            "layouts {mask:03b}, accumulate {accumulate}, ({i}, {j}): {} vs {want}",
                            dst[at]
                        );
                    }
                }
            }
        }
    }
}
