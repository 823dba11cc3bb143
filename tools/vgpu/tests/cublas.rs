//! cuBLAS GEMMs against a naive f64 reference, on device memory from `vgpu::mem`.
#![allow(non_snake_case, clippy::too_many_arguments)]

use std::ffi::c_void;
use std::ptr::null_mut;
use vgpu::cublas::*;

struct Dev {
    base: u64,
}
impl Dev {
    fn new(bytes: usize) -> Dev {
        Dev {
            base: vgpu::mem::alloc(bytes as u64, 0).unwrap(),
        }
    }
    fn from_f32(v: &[f32]) -> Dev {
        let d = Dev::new(v.len() * 4);
        // SAFETY: the allocation holds v.len() f32s.
        unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), d.base as *mut f32, v.len()) };
        d
    }
    fn from_u16(v: &[u16]) -> Dev {
        let d = Dev::new(v.len() * 2);
        // SAFETY: the allocation holds v.len() u16s.
        unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), d.base as *mut u16, v.len()) };
        d
    }
    fn f32s(&self, n: usize) -> Vec<f32> {
        // SAFETY: the caller reads within the allocation.
        unsafe { std::slice::from_raw_parts(self.base as *const f32, n).to_vec() }
    }
    fn u16s(&self, n: usize) -> Vec<u16> {
        // SAFETY: the caller reads within the allocation.
        unsafe { std::slice::from_raw_parts(self.base as *const u16, n).to_vec() }
    }
    fn p(&self) -> *mut c_void {
        self.base as *mut c_void
    }
}
impl Drop for Dev {
    fn drop(&mut self) {
        vgpu::mem::free(self.base);
    }
}

fn handle() -> cublasHandle_t {
    let mut h = null_mut();
    // SAFETY: valid out-pointer.
    assert_eq!(unsafe { cublasCreate_v2(&mut h) }, CUBLAS_STATUS_SUCCESS);
    h
}

/// Deterministic pseudo-random values in [-1, 1).
fn rnd(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Column-major reference: C = alpha op(A) op(B) + beta C in f64.
fn reference(
    ta: bool,
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f64,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    beta: f64,
    c: &[f32],
    ldc: usize,
) -> Vec<f64> {
    let mut out: Vec<f64> = c.iter().map(|&x| x as f64).collect();
    for j in 0..n {
        for i in 0..m {
            let mut s = 0f64;
            for p in 0..k {
                let av = if ta { a[p + i * lda] } else { a[i + p * lda] } as f64;
                let bv = if tb { b[j + p * ldb] } else { b[p + j * ldb] } as f64;
                s += av * bv;
            }
            let old = if beta == 0.0 { 0.0 } else { beta * c[i + j * ldc] as f64 };
            out[i + j * ldc] = alpha * s + old;
        }
    }
    out
}

fn op(t: bool) -> i32 {
    if t {
        CUBLAS_OP_T
    } else {
        CUBLAS_OP_N
    }
}

#[test]
fn sgemm_all_transposes_odd_sizes() {
    let h = handle();
    let (m, n, k) = (7usize, 13usize, 5usize);
    for &(ta, tb) in &[(false, false), (false, true), (true, false), (true, true)] {
        for &extra in &[0usize, 3] {
            let lda = if ta { k } else { m } + extra;
            let ldb = if tb { n } else { k } + extra;
            let ldc = m + extra;
            let acols = if ta { m } else { k };
            let bcols = if tb { k } else { n };
            let a = rnd(lda * acols, 1);
            let b = rnd(ldb * bcols, 2);
            let c0 = rnd(ldc * n, 3);
            let (da, db, dc) = (Dev::from_f32(&a), Dev::from_f32(&b), Dev::from_f32(&c0));
            let (alpha, beta) = (1.5f32, -0.5f32);
            // SAFETY: operands are live device allocations of the sizes given.
            let r = unsafe {
                cublasGemmEx(
                    h,
                    op(ta),
                    op(tb),
                    m as i32,
                    n as i32,
                    k as i32,
                    &alpha as *const f32 as *const c_void,
                    da.p(),
                    CUDA_R_32F,
                    lda as i32,
                    db.p(),
                    CUDA_R_32F,
                    ldb as i32,
                    &beta as *const f32 as *const c_void,
                    dc.p(),
                    CUDA_R_32F,
                    ldc as i32,
                    CUBLAS_COMPUTE_32F,
                    -1,
                )
            };
            assert_eq!(r, CUBLAS_STATUS_SUCCESS);
            let want = reference(ta, tb, m, n, k, alpha as f64, &a, lda, &b, ldb, beta as f64, &c0, ldc);
            let got = dc.f32s(ldc * n);
            for j in 0..n {
                for i in 0..ldc {
                    let idx = i + j * ldc;
                    if i < m {
                        assert!(
                            (got[idx] as f64 - want[idx]).abs() < 1e-5,
                            "ta={ta} tb={tb} ({i},{j}): {} vs {}",
                            got[idx],
                            want[idx]
                        );
                    } else {
                        assert_eq!(got[idx], c0[idx], "padding rows untouched");
                    }
                }
            }
            // Same through cublasSgemm_v2.
            let dc2 = Dev::from_f32(&c0);
            // SAFETY: as above.
            let r = unsafe {
                cublasSgemm_v2(
                    h,
                    op(ta),
                    op(tb),
                    m as i32,
                    n as i32,
                    k as i32,
                    &alpha,
                    da.p() as *const f32,
                    lda as i32,
                    db.p() as *const f32,
                    ldb as i32,
                    &beta,
                    dc2.p() as *mut f32,
                    ldc as i32,
                )
            };
            assert_eq!(r, CUBLAS_STATUS_SUCCESS);
            assert_eq!(dc2.f32s(ldc * n), got, "Sgemm and GemmEx agree bit for bit");
        }
    }
    // SAFETY: handle from cublasCreate_v2.
    unsafe { assert_eq!(cublasDestroy_v2(h), CUBLAS_STATUS_SUCCESS) };
}

#[test]
fn beta_zero_ignores_nan_c() {
    let h = handle();
    let (m, n, k) = (4usize, 3usize, 6usize);
    let a = rnd(m * k, 4);
    let b = rnd(k * n, 5);
    let (da, db, dc) = (Dev::from_f32(&a), Dev::from_f32(&b), Dev::from_f32(&vec![f32::NAN; m * n]));
    let (alpha, beta) = (1f32, 0f32);
    // SAFETY: live device allocations.
    let r = unsafe {
        cublasGemmEx(
            h,
            CUBLAS_OP_N,
            CUBLAS_OP_N,
            m as i32,
            n as i32,
            k as i32,
            &alpha as *const f32 as *const c_void,
            da.p(),
            CUDA_R_32F,
            m as i32,
            db.p(),
            CUDA_R_32F,
            k as i32,
            &beta as *const f32 as *const c_void,
            dc.p(),
            CUDA_R_32F,
            m as i32,
            CUBLAS_COMPUTE_32F,
            -1,
        )
    };
    assert_eq!(r, CUBLAS_STATUS_SUCCESS);
    let want = reference(false, false, m, n, k, 1.0, &a, m, &b, k, 0.0, &vec![0.0; m * n], m);
    for (g, w) in dc.f32s(m * n).iter().zip(&want) {
        assert!(!g.is_nan() && (*g as f64 - w).abs() < 1e-5);
    }
    // k == 0: C = beta C (beta 0 gives zeros even over NaN).
    let dc = Dev::from_f32(&vec![f32::NAN; m * n]);
    // SAFETY: as above.
    let r = unsafe {
        cublasSgemm_v2(
            h,
            CUBLAS_OP_N,
            CUBLAS_OP_N,
            m as i32,
            n as i32,
            0,
            &alpha,
            std::ptr::null(),
            m as i32,
            std::ptr::null(),
            1,
            &beta,
            dc.p() as *mut f32,
            m as i32,
        )
    };
    assert_eq!(r, CUBLAS_STATUS_SUCCESS);
    assert!(dc.f32s(m * n).iter().all(|&x| x == 0.0));
    // SAFETY: handle from cublasCreate_v2.
    unsafe { cublasDestroy_v2(h) };
}

fn bf(v: &[f32]) -> Vec<u16> {
    v.iter().map(|&x| f32_to_bf16(x)).collect()
}

#[test]
fn bf16_in_bf16_and_f32_out() {
    let h = handle();
    let (m, n, k) = (9usize, 11usize, 17usize);
    let a16 = bf(&rnd(k * m, 6)); // stored k x m (op T)
    let b16 = bf(&rnd(k * n, 7)); // stored k x n (op N)
    let a: Vec<f32> = a16.iter().map(|&x| bf16_to_f32(x)).collect();
    let b: Vec<f32> = b16.iter().map(|&x| bf16_to_f32(x)).collect();
    let c0 = rnd(m * n, 8);
    let c016 = bf(&c0);
    let c0r: Vec<f32> = c016.iter().map(|&x| bf16_to_f32(x)).collect();
    let (da, db) = (Dev::from_u16(&a16), Dev::from_u16(&b16));
    let (alpha, beta) = (0.75f32, 2f32);
    // bf16 out.
    let dc = Dev::from_u16(&c016);
    // SAFETY: live device allocations.
    let r = unsafe {
        cublasGemmEx(
            h,
            CUBLAS_OP_T,
            CUBLAS_OP_N,
            m as i32,
            n as i32,
            k as i32,
            &alpha as *const f32 as *const c_void,
            da.p(),
            CUDA_R_16BF,
            k as i32,
            db.p(),
            CUDA_R_16BF,
            k as i32,
            &beta as *const f32 as *const c_void,
            dc.p(),
            CUDA_R_16BF,
            m as i32,
            CUBLAS_COMPUTE_32F,
            -1,
        )
    };
    assert_eq!(r, CUBLAS_STATUS_SUCCESS);
    let want = reference(true, false, m, n, k, alpha as f64, &a, k, &b, k, beta as f64, &c0r, m);
    for (g, w) in dc.u16s(m * n).iter().zip(&want) {
        let g = bf16_to_f32(*g) as f64;
        assert!((g - w).abs() <= w.abs() * (1.0 / 128.0) + 1e-5, "{g} vs {w}");
    }
    // f32 out.
    let dc = Dev::from_f32(&c0);
    // SAFETY: as above.
    let r = unsafe {
        cublasGemmEx(
            h,
            CUBLAS_OP_T,
            CUBLAS_OP_N,
            m as i32,
            n as i32,
            k as i32,
            &alpha as *const f32 as *const c_void,
            da.p(),
            CUDA_R_16BF,
            k as i32,
            db.p(),
            CUDA_R_16BF,
            k as i32,
            &beta as *const f32 as *const c_void,
            dc.p(),
            CUDA_R_32F,
            m as i32,
            CUBLAS_COMPUTE_32F,
            -1,
        )
    };
    assert_eq!(r, CUBLAS_STATUS_SUCCESS);
    let want = reference(true, false, m, n, k, alpha as f64, &a, k, &b, k, beta as f64, &c0, m);
    for (g, w) in dc.f32s(m * n).iter().zip(&want) {
        assert!((*g as f64 - w).abs() < 1e-5, "{g} vs {w}");
    }
    // Mixed A/B types and bf16 inputs with TF32 compute are not supported.
    let fa = Dev::from_f32(&a);
    // SAFETY: as above.
    let r = unsafe {
        cublasGemmEx(
            h,
            CUBLAS_OP_T,
            CUBLAS_OP_N,
            m as i32,
            n as i32,
            k as i32,
            &alpha as *const f32 as *const c_void,
            fa.p(),
            CUDA_R_32F,
            k as i32,
            db.p(),
            CUDA_R_16BF,
            k as i32,
            &beta as *const f32 as *const c_void,
            dc.p(),
            CUDA_R_32F,
            m as i32,
            CUBLAS_COMPUTE_32F,
            -1,
        )
    };
    assert_eq!(r, CUBLAS_STATUS_NOT_SUPPORTED);
    // SAFETY: as above.
    let r = unsafe {
        cublasGemmEx(
            h,
            CUBLAS_OP_T,
            CUBLAS_OP_N,
            m as i32,
            n as i32,
            k as i32,
            &alpha as *const f32 as *const c_void,
            da.p(),
            CUDA_R_16BF,
            k as i32,
            db.p(),
            CUDA_R_16BF,
            k as i32,
            &beta as *const f32 as *const c_void,
            dc.p(),
            CUDA_R_32F,
            m as i32,
            CUBLAS_COMPUTE_32F_FAST_TF32,
            -1,
        )
    };
    assert_eq!(r, CUBLAS_STATUS_NOT_SUPPORTED);
    // SAFETY: handle from cublasCreate_v2.
    unsafe { cublasDestroy_v2(h) };
}

#[test]
fn strided_batched() {
    let h = handle();
    let (m, n, k, batch) = (5usize, 6usize, 7usize, 3usize);
    let (sa, sb, sc) = (m * k + 3, k * n + 1, m * n + 2);
    let a = rnd(sa * batch, 9);
    let b = rnd(sb * batch, 10);
    let c0 = rnd(sc * batch, 11);
    let (da, db, dc) = (Dev::from_f32(&a), Dev::from_f32(&b), Dev::from_f32(&c0));
    let (alpha, beta) = (1f32, 1f32);
    // SAFETY: live device allocations covering every batch.
    let r = unsafe {
        cublasGemmStridedBatchedEx(
            h,
            CUBLAS_OP_N,
            CUBLAS_OP_T,
            m as i32,
            n as i32,
            k as i32,
            &alpha as *const f32 as *const c_void,
            da.p(),
            CUDA_R_32F,
            m as i32,
            sa as i64,
            db.p(),
            CUDA_R_32F,
            n as i32,
            sb as i64,
            &beta as *const f32 as *const c_void,
            dc.p(),
            CUDA_R_32F,
            m as i32,
            sc as i64,
            batch as i32,
            CUBLAS_COMPUTE_32F,
            -1,
        )
    };
    assert_eq!(r, CUBLAS_STATUS_SUCCESS);
    let got = dc.f32s(sc * batch);
    for i in 0..batch {
        let want = reference(
            false,
            true,
            m,
            n,
            k,
            1.0,
            &a[i * sa..],
            m,
            &b[i * sb..],
            n,
            1.0,
            &c0[i * sc..i * sc + m * n],
            m,
        );
        for (g, w) in got[i * sc..i * sc + m * n].iter().zip(&want) {
            assert!((*g as f64 - w).abs() < 1e-5);
        }
        assert_eq!(got[i * sc + m * n..(i + 1) * sc], c0[i * sc + m * n..(i + 1) * sc], "gap untouched");
    }
    // The legacy cublasSgemmStridedBatched agrees bit for bit.
    let dc2 = Dev::from_f32(&c0);
    // SAFETY: as above.
    let r = unsafe {
        cublasSgemmStridedBatched(
            h,
            CUBLAS_OP_N,
            CUBLAS_OP_T,
            m as i32,
            n as i32,
            k as i32,
            &alpha,
            da.p() as *const f32,
            m as i32,
            sa as i64,
            db.p() as *const f32,
            n as i32,
            sb as i64,
            &beta,
            dc2.p() as *mut f32,
            m as i32,
            sc as i64,
            batch as i32,
        )
    };
    assert_eq!(r, CUBLAS_STATUS_SUCCESS);
    assert_eq!(dc2.f32s(sc * batch), got);
    // A batch running past the end of C is refused before anything is written.
    let dc3 = Dev::from_f32(&c0);
    // SAFETY: ranges are validated by the call.
    let r = unsafe {
        cublasGemmStridedBatchedEx(
            h,
            CUBLAS_OP_N,
            CUBLAS_OP_T,
            m as i32,
            n as i32,
            k as i32,
            &alpha as *const f32 as *const c_void,
            da.p(),
            CUDA_R_32F,
            m as i32,
            sa as i64,
            db.p(),
            CUDA_R_32F,
            n as i32,
            sb as i64,
            &beta as *const f32 as *const c_void,
            dc3.p(),
            CUDA_R_32F,
            m as i32,
            sc as i64,
            batch as i32 + 1,
            CUBLAS_COMPUTE_32F,
            -1,
        )
    };
    assert_eq!(r, CUBLAS_STATUS_EXECUTION_FAILED);
    assert_eq!(dc3.f32s(sc * batch), c0);
    // SAFETY: handle from cublasCreate_v2.
    unsafe { cublasDestroy_v2(h) };
}

#[test]
fn validation() {
    let h = handle();
    let d = Dev::new(4096);
    let one = 1f32;
    let o = &one as *const f32 as *const c_void;
    let call = |h: cublasHandle_t,
                ta: i32,
                tb: i32,
                m: i32,
                n: i32,
                k: i32,
                lda: i32,
                ldb: i32,
                ldc: i32,
                at: i32,
                ct: i32,
                comp: i32,
                p: *mut c_void| {
        // SAFETY: device ranges are validated by the call itself.
        unsafe { cublasGemmEx(h, ta, tb, m, n, k, o, p, at, lda, p, at, ldb, o, p, ct, ldc, comp, -1) }
    };
    let (N, T, F, B) = (CUBLAS_OP_N, CUBLAS_OP_T, CUDA_R_32F, CUDA_R_16BF);
    let C = CUBLAS_COMPUTE_32F;
    let p = d.p();
    assert_eq!(call(null_mut(), N, N, 4, 4, 4, 4, 4, 4, F, F, C, p), CUBLAS_STATUS_NOT_INITIALIZED);
    assert_eq!(
        call(0x1234 as cublasHandle_t, N, N, 4, 4, 4, 4, 4, 4, F, F, C, p),
        CUBLAS_STATUS_NOT_INITIALIZED
    );
    assert_eq!(call(h, N, N, 4, 4, 4, 4, 4, 4, F, F, C, p), CUBLAS_STATUS_SUCCESS);
    assert_eq!(call(h, N, N, -1, 4, 4, 4, 4, 4, F, F, C, p), CUBLAS_STATUS_INVALID_VALUE);
    assert_eq!(call(h, N, N, 4, -1, 4, 4, 4, 4, F, F, C, p), CUBLAS_STATUS_INVALID_VALUE);
    assert_eq!(call(h, N, N, 4, 4, -1, 4, 4, 4, F, F, C, p), CUBLAS_STATUS_INVALID_VALUE);
    assert_eq!(call(h, N, N, 4, 4, 4, 3, 4, 4, F, F, C, p), CUBLAS_STATUS_INVALID_VALUE, "lda < m");
    assert_eq!(
        call(h, T, N, 4, 4, 5, 4, 5, 4, F, F, C, p),
        CUBLAS_STATUS_INVALID_VALUE,
        "lda < k for op T"
    );
    assert_eq!(call(h, N, N, 4, 4, 5, 4, 4, 4, F, F, C, p), CUBLAS_STATUS_INVALID_VALUE, "ldb < k");
    assert_eq!(
        call(h, N, T, 4, 6, 4, 4, 5, 4, F, F, C, p),
        CUBLAS_STATUS_INVALID_VALUE,
        "ldb < n for op T"
    );
    assert_eq!(call(h, N, N, 4, 4, 4, 4, 4, 3, F, F, C, p), CUBLAS_STATUS_INVALID_VALUE, "ldc < m");
    assert_eq!(call(h, N, N, 0, 4, 4, 1, 4, 0, F, F, C, p), CUBLAS_STATUS_INVALID_VALUE, "ldc < 1");
    assert_eq!(
        call(h, N, N, 0, 4, 4, 1, 4, 1, F, F, C, p),
        CUBLAS_STATUS_SUCCESS,
        "m == 0 quick return"
    );
    assert_eq!(call(h, 7, N, 4, 4, 4, 4, 4, 4, F, F, C, p), CUBLAS_STATUS_INVALID_VALUE, "bad op");
    assert_eq!(
        call(h, N, N, 4, 4, 4, 4, 4, 4, 3, F, C, p),
        CUBLAS_STATUS_NOT_SUPPORTED,
        "int8-ish type"
    );
    assert_eq!(
        call(h, N, N, 4, 4, 4, 4, 4, 4, F, B, C, p),
        CUBLAS_STATUS_NOT_SUPPORTED,
        "f32 in, bf16 out"
    );
    assert_eq!(
        call(h, N, N, 4, 4, 4, 4, 4, 4, F, F, 70, p),
        CUBLAS_STATUS_NOT_SUPPORTED,
        "64F compute"
    );
    assert_eq!(
        call(h, N, N, 4, 4, 4, 4, 4, 4, F, F, 0, p),
        CUBLAS_STATUS_SUCCESS,
        "legacy CUDA_R_32F compute"
    );
    // Ranges outside live allocations: EXECUTION_FAILED.
    assert_eq!(
        call(h, N, N, 33, 33, 33, 33, 33, 33, F, F, C, p),
        CUBLAS_STATUS_EXECUTION_FAILED,
        "past the end"
    );
    assert_eq!(
        call(h, N, N, 4, 4, 4, 4, 4, 4, F, F, C, 0x1000 as *mut c_void),
        CUBLAS_STATUS_EXECUTION_FAILED
    );
    // Handle state.
    // SAFETY: valid handle and out-pointers.
    unsafe {
        let mut mode = -1;
        assert_eq!(cublasGetMathMode(h, &mut mode), CUBLAS_STATUS_SUCCESS);
        assert_eq!(mode, CUBLAS_DEFAULT_MATH);
        assert_eq!(cublasSetMathMode(h, CUBLAS_TF32_TENSOR_OP_MATH), CUBLAS_STATUS_SUCCESS);
        assert_eq!(cublasGetMathMode(h, &mut mode), CUBLAS_STATUS_SUCCESS);
        assert_eq!(mode, CUBLAS_TF32_TENSOR_OP_MATH);
        assert_eq!(cublasSetStream_v2(h, 0x40 as *mut c_void), CUBLAS_STATUS_SUCCESS);
        let mut s = null_mut();
        assert_eq!(cublasGetStream_v2(h, &mut s), CUBLAS_STATUS_SUCCESS);
        assert_eq!(s as usize, 0x40);
        assert_eq!(cublasSetPointerMode_v2(h, 5), CUBLAS_STATUS_INVALID_VALUE);
        let name = std::ffi::CStr::from_ptr(cublasGetStatusName(CUBLAS_STATUS_EXECUTION_FAILED));
        assert_eq!(name.to_str().unwrap(), "CUBLAS_STATUS_EXECUTION_FAILED");
        assert_eq!(cublasDestroy_v2(h), CUBLAS_STATUS_SUCCESS);
        assert_eq!(cublasDestroy_v2(h), CUBLAS_STATUS_NOT_INITIALIZED);
        assert_eq!(cublasSetStream_v2(h, null_mut()), CUBLAS_STATUS_NOT_INITIALIZED);
    }
}

#[test]
fn tf32_rounds_inputs() {
    let h = handle();
    // 1 + 2^-12 is not representable in TF32 (rounds to 1); 1 + 2^-10 is.
    let a = vec![1.0 + 2f32.powi(-12), 1.0 + 2f32.powi(-10)];
    let b = vec![1.0f32, 1.0];
    let (da, db) = (Dev::from_f32(&a), Dev::from_f32(&b));
    let run = |comp: i32| {
        let dc = Dev::from_f32(&[0.0]);
        let (one, zero) = (1f32, 0f32);
        // SAFETY: live device allocations; 1x1 result of a length-2 dot.
        let r = unsafe {
            cublasGemmEx(
                h,
                CUBLAS_OP_N,
                CUBLAS_OP_N,
                1,
                1,
                2,
                &one as *const f32 as *const c_void,
                da.p(),
                CUDA_R_32F,
                1,
                db.p(),
                CUDA_R_32F,
                2,
                &zero as *const f32 as *const c_void,
                dc.p(),
                CUDA_R_32F,
                1,
                comp,
                -1,
            )
        };
        assert_eq!(r, CUBLAS_STATUS_SUCCESS);
        dc.f32s(1)[0]
    };
    assert_eq!(run(CUBLAS_COMPUTE_32F), 2.0 + 2f32.powi(-12) + 2f32.powi(-10));
    assert_eq!(run(CUBLAS_COMPUTE_32F_FAST_TF32), 2.0 + 2f32.powi(-10));
    assert!(round_tf32(f32::NAN).is_nan());
    // SAFETY: handle from cublasCreate_v2.
    unsafe { cublasDestroy_v2(h) };
}

#[test]
fn conversions() {
    assert_eq!(f32_to_bf16(1.0), 0x3f80);
    assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8000)), 0x3f80, "tie to even (down)");
    assert_eq!(f32_to_bf16(f32::from_bits(0x3f81_8000)), 0x3f82, "tie to even (up)");
    assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
    assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
    assert_eq!(f32_to_bf16(f32::INFINITY), 0x7f80);
    assert_eq!(f32_to_f16(1.0), 0x3c00);
    assert_eq!(f32_to_f16(65504.0), 0x7bff);
    assert_eq!(f32_to_f16(65520.0), 0x7c00);
    assert_eq!(f32_to_f16(2f32.powi(-24)), 0x0001);
    assert_eq!(f32_to_f16(-2.0), 0xc000);
    assert!(f16_to_f32(f32_to_f16(f32::NAN)).is_nan());
    for h in 0..0x7c00u16 {
        assert_eq!(f32_to_f16(f16_to_f32(h)), h, "f16 round trip {h:#x}");
    }
}

#[test]
fn large_product_is_threaded_and_reproducible() {
    let h = handle();
    let (m, n, k) = (96usize, 200usize, 300usize); // 1.15e7 flops: two threads
    let a = rnd(m * k, 12);
    let b = rnd(k * n, 13);
    let (da, db) = (Dev::from_f32(&a), Dev::from_f32(&b));
    let run = || {
        let dc = Dev::from_f32(&vec![0.0; m * n]);
        let (one, zero) = (1f32, 0f32);
        // SAFETY: live device allocations.
        let r = unsafe {
            cublasGemmEx(
                h,
                CUBLAS_OP_N,
                CUBLAS_OP_N,
                m as i32,
                n as i32,
                k as i32,
                &one as *const f32 as *const c_void,
                da.p(),
                CUDA_R_32F,
                m as i32,
                db.p(),
                CUDA_R_32F,
                k as i32,
                &zero as *const f32 as *const c_void,
                dc.p(),
                CUDA_R_32F,
                m as i32,
                CUBLAS_COMPUTE_32F,
                -1,
            )
        };
        assert_eq!(r, CUBLAS_STATUS_SUCCESS);
        dc.f32s(m * n)
    };
    let x = run();
    assert_eq!(x, run());
    let want = reference(false, false, m, n, k, 1.0, &a, m, &b, k, 0.0, &vec![0.0; m * n], m);
    for (g, w) in x.iter().zip(&want) {
        assert!((*g as f64 - w).abs() < 1e-4);
    }
    // SAFETY: handle from cublasCreate_v2.
    unsafe { cublasDestroy_v2(h) };
}
