//! CPU reference of the linear op, and the strided matrix product every CPU op uses
//! (the `gemm` crate: blocked, SIMD, optionally rayon-parallel over output tiles only, so the
//! reduction order of each output element is fixed and results are deterministic).

use crate::ops::real::Real;
use gemm::Parallelism;

/// Products smaller than this many multiply-adds run on the calling thread.
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

/// `y[rows, out] = x[rows, in] W^T + b`.
pub fn forward<T: Real>(
    x: &[T],
    w: &[T],
    bias: Option<&[T]>,
    y: &mut [T],
    rows: usize,
    d_in: usize,
    d_out: usize,
) {
    assert!(x.len() >= rows * d_in && w.len() >= d_out * d_in && y.len() >= rows * d_out);
    if let Some(b) = bias {
        assert!(b.len() >= d_out);
        for row in y[..rows * d_out].chunks_exact_mut(d_out) {
            row.copy_from_slice(&b[..d_out]);
        }
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

/// `dx[rows, in] (+)= dy[rows, out] W`.
pub fn backward_input<T: Real>(
    dy: &[T],
    w: &[T],
    dx: &mut [T],
    rows: usize,
    d_in: usize,
    d_out: usize,
    accumulate: bool,
) {
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
