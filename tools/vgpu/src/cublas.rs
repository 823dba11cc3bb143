//! The cuBLAS v2 calls mlvpt (through cudarc 0.19) makes, computed on the CPU.
//!
//! GEMM: column-major `C = alpha op(A) op(B) + beta C`, op N or T (C = T for real types). A and
//! B share a type, f32 / bf16 / f16; C is the same type or f32; the compute type is
//! `CUBLAS_COMPUTE_32F` (68), `_PEDANTIC` (69), the legacy `CUDA_R_32F` (0), or, for f32
//! operands only, `_FAST_TF32` (77, inputs rounded to TF32: 10 mantissa bits,
//! round-to-nearest-even), `_FAST_16BF` (75) / `_FAST_16F` (74) (inputs rounded to bf16 / f16).
//! `CUBLAS_TF32_TENSOR_OP_MATH` on the handle turns 32F compute on f32 operands into TF32, as
//! cuBLAS does. Scalars (alpha, beta) are f32.
//!
//! Arithmetic: products and sums in f32; each output is a dot product over k accumulated in
//! eight partial sums (index p goes to lane p mod 8, in increasing p), combined as
//! `((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7))`, then `alpha*dot (+ beta*C)`; no FMA contraction. The
//! order does not depend on blocking or threads, so results are bit-reproducible. `beta == 0`
//! never reads C; `alpha == 0` or `k == 0` never reads A or B.
//!
//! Every operand's accessed range must lie inside one live device allocation
//! ([`crate::mem::find`]); otherwise the call reports on stderr and returns
//! `CUBLAS_STATUS_EXECUTION_FAILED`. Work runs synchronously on the calling thread (split over
//! two threads for products of at least 1e7 flops). streamcheck places each call on the
//! handle's stream, reading A, B (and C when `beta != 0`, alpha and beta in device pointer
//! mode) and writing C; a hazard is reported by the driver and fails the call with
//! `CUBLAS_STATUS_EXECUTION_FAILED` before it runs.
#![allow(non_snake_case, non_camel_case_types, clippy::missing_safety_doc, clippy::too_many_arguments)]

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void};
use std::sync::{Mutex, MutexGuard};

pub type cublasStatus_t = i32;

pub const CUBLAS_STATUS_SUCCESS: cublasStatus_t = 0;
pub const CUBLAS_STATUS_NOT_INITIALIZED: cublasStatus_t = 1;
pub const CUBLAS_STATUS_ALLOC_FAILED: cublasStatus_t = 3;
pub const CUBLAS_STATUS_INVALID_VALUE: cublasStatus_t = 7;
pub const CUBLAS_STATUS_ARCH_MISMATCH: cublasStatus_t = 8;
pub const CUBLAS_STATUS_MAPPING_ERROR: cublasStatus_t = 11;
pub const CUBLAS_STATUS_EXECUTION_FAILED: cublasStatus_t = 13;
pub const CUBLAS_STATUS_INTERNAL_ERROR: cublasStatus_t = 14;
pub const CUBLAS_STATUS_NOT_SUPPORTED: cublasStatus_t = 15;
pub const CUBLAS_STATUS_LICENSE_ERROR: cublasStatus_t = 16;

pub const CUBLAS_OP_N: i32 = 0;
pub const CUBLAS_OP_T: i32 = 1;
pub const CUBLAS_OP_C: i32 = 2;

pub const CUDA_R_32F: i32 = 0;
pub const CUDA_R_16F: i32 = 2;
pub const CUDA_R_16BF: i32 = 14;

pub const CUBLAS_COMPUTE_32F: i32 = 68;
pub const CUBLAS_COMPUTE_32F_PEDANTIC: i32 = 69;
pub const CUBLAS_COMPUTE_32F_FAST_16F: i32 = 74;
pub const CUBLAS_COMPUTE_32F_FAST_16BF: i32 = 75;
pub const CUBLAS_COMPUTE_32F_FAST_TF32: i32 = 77;

pub const CUBLAS_POINTER_MODE_HOST: i32 = 0;
pub const CUBLAS_POINTER_MODE_DEVICE: i32 = 1;

pub const CUBLAS_DEFAULT_MATH: i32 = 0;
pub const CUBLAS_TF32_TENSOR_OP_MATH: i32 = 3;

/// The opaque object behind `cublasHandle_t`; only its address is used.
#[repr(C)]
pub struct cublasContext {
    _tag: u64,
}
pub type cublasHandle_t = *mut cublasContext;

#[derive(Clone, Copy)]
struct HandleState {
    stream: usize,
    math_mode: i32,
    pointer_mode: i32,
}

fn handles() -> MutexGuard<'static, HashMap<usize, HandleState>> {
    static H: std::sync::OnceLock<Mutex<HashMap<usize, HandleState>>> = std::sync::OnceLock::new();
    H.get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

fn handle_state(h: cublasHandle_t) -> Result<HandleState, cublasStatus_t> {
    if h.is_null() {
        return Err(CUBLAS_STATUS_NOT_INITIALIZED);
    }
    handles().get(&(h as usize)).copied().ok_or(CUBLAS_STATUS_NOT_INITIALIZED)
}

macro_rules! tri {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(code) => return code,
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Handle management
// ---------------------------------------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn cublasCreate_v2(handle: *mut cublasHandle_t) -> cublasStatus_t {
    if handle.is_null() {
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    let h = Box::into_raw(Box::new(cublasContext { _tag: 0 }));
    handles().insert(
        h as usize,
        HandleState {
            stream: 0,
            math_mode: CUBLAS_DEFAULT_MATH,
            pointer_mode: 0,
        },
    );
    // SAFETY: checked non-null.
    unsafe { *handle = h };
    CUBLAS_STATUS_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cublasDestroy_v2(handle: cublasHandle_t) -> cublasStatus_t {
    if handle.is_null() || handles().remove(&(handle as usize)).is_none() {
        return CUBLAS_STATUS_NOT_INITIALIZED;
    }
    // SAFETY: created by cublasCreate_v2 and removed from the table exactly once.
    unsafe { drop(Box::from_raw(handle)) };
    CUBLAS_STATUS_SUCCESS
}

fn update(handle: cublasHandle_t, f: impl FnOnce(&mut HandleState) -> Result<(), cublasStatus_t>) -> cublasStatus_t {
    if handle.is_null() {
        return CUBLAS_STATUS_NOT_INITIALIZED;
    }
    match handles().get_mut(&(handle as usize)) {
        None => CUBLAS_STATUS_NOT_INITIALIZED,
        Some(s) => match f(s) {
            Ok(()) => CUBLAS_STATUS_SUCCESS,
            Err(e) => e,
        },
    }
}

#[no_mangle]
pub unsafe extern "C" fn cublasSetStream_v2(handle: cublasHandle_t, stream: *mut c_void) -> cublasStatus_t {
    update(handle, |s| {
        s.stream = stream as usize;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cublasGetStream_v2(handle: cublasHandle_t, stream: *mut *mut c_void) -> cublasStatus_t {
    let s = tri!(handle_state(handle));
    if stream.is_null() {
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    // SAFETY: checked non-null.
    unsafe { *stream = s.stream as *mut c_void };
    CUBLAS_STATUS_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cublasSetMathMode(handle: cublasHandle_t, mode: i32) -> cublasStatus_t {
    update(handle, |s| {
        // Low bits: DEFAULT 0, TENSOR_OP 1, PEDANTIC 2, TF32_TENSOR_OP 3; flag 16 (no reduced
        // precision reduction).
        if !(0..=3).contains(&(mode & !16)) {
            return Err(CUBLAS_STATUS_INVALID_VALUE);
        }
        s.math_mode = mode;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cublasGetMathMode(handle: cublasHandle_t, mode: *mut i32) -> cublasStatus_t {
    let s = tri!(handle_state(handle));
    if mode.is_null() {
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    // SAFETY: checked non-null.
    unsafe { *mode = s.math_mode };
    CUBLAS_STATUS_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cublasSetPointerMode_v2(handle: cublasHandle_t, mode: i32) -> cublasStatus_t {
    update(handle, |s| {
        if mode != CUBLAS_POINTER_MODE_HOST && mode != CUBLAS_POINTER_MODE_DEVICE {
            return Err(CUBLAS_STATUS_INVALID_VALUE);
        }
        s.pointer_mode = mode;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cublasGetPointerMode_v2(handle: cublasHandle_t, mode: *mut i32) -> cublasStatus_t {
    let s = tri!(handle_state(handle));
    if mode.is_null() {
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    // SAFETY: checked non-null.
    unsafe { *mode = s.pointer_mode };
    CUBLAS_STATUS_SUCCESS
}

/// The workspace is not needed (everything runs on the host); accepted and ignored.
#[no_mangle]
pub unsafe extern "C" fn cublasSetWorkspace_v2(handle: cublasHandle_t, _ws: *mut c_void, _bytes: usize) -> cublasStatus_t {
    update(handle, |_| Ok(()))
}

#[no_mangle]
pub unsafe extern "C" fn cublasGetVersion_v2(handle: cublasHandle_t, version: *mut c_int) -> cublasStatus_t {
    tri!(handle_state(handle));
    if version.is_null() {
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    // SAFETY: checked non-null.
    unsafe { *version = 130000 };
    CUBLAS_STATUS_SUCCESS
}

fn status_name_string(s: cublasStatus_t) -> (&'static [u8], &'static [u8]) {
    match s {
        0 => (b"CUBLAS_STATUS_SUCCESS\0", b"success\0"),
        1 => (b"CUBLAS_STATUS_NOT_INITIALIZED\0", b"the library was not initialized\0"),
        3 => (b"CUBLAS_STATUS_ALLOC_FAILED\0", b"the resource allocation failed\0"),
        7 => (
            b"CUBLAS_STATUS_INVALID_VALUE\0",
            b"an invalid numeric value was used as an argument\0",
        ),
        8 => (
            b"CUBLAS_STATUS_ARCH_MISMATCH\0",
            b"an absent device architectural feature is required\0",
        ),
        11 => (b"CUBLAS_STATUS_MAPPING_ERROR\0", b"an access to GPU memory space failed\0"),
        13 => (b"CUBLAS_STATUS_EXECUTION_FAILED\0", b"the GPU program failed to execute\0"),
        14 => (b"CUBLAS_STATUS_INTERNAL_ERROR\0", b"an internal operation failed\0"),
        15 => (b"CUBLAS_STATUS_NOT_SUPPORTED\0", b"the functionality requested is not supported\0"),
        16 => (b"CUBLAS_STATUS_LICENSE_ERROR\0", b"error detected trying to check the license\0"),
        _ => (b"CUBLAS_STATUS_UNKNOWN\0", b"unknown error\0"),
    }
}

#[no_mangle]
pub extern "C" fn cublasGetStatusName(status: cublasStatus_t) -> *const c_char {
    status_name_string(status).0.as_ptr() as *const c_char
}

#[no_mangle]
pub extern "C" fn cublasGetStatusString(status: cublasStatus_t) -> *const c_char {
    status_name_string(status).1.as_ptr() as *const c_char
}

// ---------------------------------------------------------------------------------------------
// Number formats
// ---------------------------------------------------------------------------------------------

/// bf16 bits to f32 (exact).
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// f32 to bf16 bits, round to nearest even; NaN stays NaN (quieted).
pub fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) as u16) | 0x0040;
    }
    let lsb = (b >> 16) & 1;
    (b.wrapping_add(0x7FFF + lsb) >> 16) as u16
}

/// f16 bits to f32 (exact).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = if exp == 0 {
        let v = man as f32 * (1.0 / 16_777_216.0);
        return if sign != 0 { -v } else { v };
    } else if exp == 31 {
        sign | 0x7f80_0000 | (man << 13)
    } else {
        sign | ((exp + 112) << 23) | (man << 13)
    };
    f32::from_bits(bits)
}

/// f32 to f16 bits, round to nearest even; NaN stays NaN.
pub fn f32_to_f16(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    if x.is_nan() {
        return sign | 0x7e00 | ((b >> 13) & 0x3ff) as u16;
    }
    let a = x.abs();
    if a >= 65520.0 {
        return sign | 0x7c00;
    }
    if a < 6.103_515_6e-5 {
        // Subnormal (or zero): units of 2^-24; scaling by 2^24 is exact.
        return sign | (a * 16_777_216.0).round_ties_even() as u16;
    }
    let exp = ((b >> 23) & 0xff) as i32 - 127 + 15;
    let man = b & 0x7f_ffff;
    let mut h = ((exp as u32) << 10) | (man >> 13);
    let rem = man & 0x1fff;
    if rem > 0x1000 || (rem == 0x1000 && h & 1 == 1) {
        h += 1;
    }
    sign | h as u16
}

/// f32 rounded to TF32 (10 explicit mantissa bits), round to nearest even.
pub fn round_tf32(x: f32) -> f32 {
    if !x.is_finite() {
        return x;
    }
    let b = x.to_bits();
    let lsb = (b >> 13) & 1;
    f32::from_bits(b.wrapping_add(0xFFF + lsb) & !0x1FFF)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Ty {
    F32,
    Bf16,
    F16,
}

impl Ty {
    fn from(t: i32) -> Option<Ty> {
        match t {
            CUDA_R_32F => Some(Ty::F32),
            CUDA_R_16BF => Some(Ty::Bf16),
            CUDA_R_16F => Some(Ty::F16),
            _ => None,
        }
    }
    fn size(self) -> usize {
        match self {
            Ty::F32 => 4,
            _ => 2,
        }
    }
    /// Element `i` of the array at `p`.
    ///
    /// # Safety
    /// `p + i*size` must be readable.
    #[inline(always)]
    unsafe fn load(self, p: *const u8, i: usize) -> f32 {
        // SAFETY: per the function's contract.
        unsafe {
            match self {
                Ty::F32 => std::ptr::read_unaligned((p as *const f32).add(i)),
                Ty::Bf16 => bf16_to_f32(std::ptr::read_unaligned((p as *const u16).add(i))),
                Ty::F16 => f16_to_f32(std::ptr::read_unaligned((p as *const u16).add(i))),
            }
        }
    }
    /// # Safety
    /// `p + i*size` must be writable.
    #[inline(always)]
    unsafe fn store(self, p: *mut u8, i: usize, v: f32) {
        // SAFETY: per the function's contract.
        unsafe {
            match self {
                Ty::F32 => std::ptr::write_unaligned((p as *mut f32).add(i), v),
                Ty::Bf16 => std::ptr::write_unaligned((p as *mut u16).add(i), f32_to_bf16(v)),
                Ty::F16 => std::ptr::write_unaligned((p as *mut u16).add(i), f32_to_f16(v)),
            }
        }
    }
}

/// How inputs are rounded before the product.
#[derive(Clone, Copy, PartialEq, Eq)]
enum InRound {
    None,
    Tf32,
    Bf16,
    F16,
}

impl InRound {
    #[inline(always)]
    fn apply(self, x: f32) -> f32 {
        match self {
            InRound::None => x,
            InRound::Tf32 => round_tf32(x),
            InRound::Bf16 => bf16_to_f32(f32_to_bf16(x)),
            InRound::F16 => f16_to_f32(f32_to_f16(x)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// GEMM core
// ---------------------------------------------------------------------------------------------

struct Gemm {
    ta: bool,
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
    lda: usize,
    ldb: usize,
    ldc: usize,
    ab: Ty,
    c: Ty,
    round: InRound,
    alpha: f32,
    beta: f32,
}

const LANES: usize = 8;

#[inline(always)]
fn reduce(l: &[f32; LANES]) -> f32 {
    ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]))
}

#[inline(always)]
fn dot1(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let full = a.len() / LANES * LANES;
    for (ca, cb) in a[..full].chunks_exact(LANES).zip(b[..full].chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] += ca[l] * cb[l];
        }
    }
    for p in full..a.len() {
        acc[p % LANES] += a[p] * b[p];
    }
    reduce(&acc)
}

/// Four dot products of rows `a0..a3` with `b`, each exactly as [`dot1`] computes it.
#[inline(always)]
fn dot4(a: [&[f32]; 4], b: &[f32]) -> [f32; 4] {
    let k = b.len();
    let mut acc = [[0f32; LANES]; 4];
    let full = k / LANES * LANES;
    let mut p = 0;
    while p < full {
        let cb = &b[p..p + LANES];
        for r in 0..4 {
            let ca = &a[r][p..p + LANES];
            for l in 0..LANES {
                acc[r][l] += ca[l] * cb[l];
            }
        }
        p += LANES;
    }
    for p in full..k {
        for r in 0..4 {
            acc[r][p % LANES] += a[r][p] * b[p];
        }
    }
    [reduce(&acc[0]), reduce(&acc[1]), reduce(&acc[2]), reduce(&acc[3])]
}

/// `out[jj*m + i] = dot(at row i, bt row j0+jj)` for the columns of `out`.
fn product_block(at: &[f32], bt: &[f32], m: usize, k: usize, j0: usize, out: &mut [f32]) {
    let cols = out.len() / m.max(1);
    // Rows of A per block: keep the block of op(A) around 256 KiB.
    let rb = ((256 * 1024 / 4) / k.max(1)).clamp(4, 4096) / 4 * 4;
    let mut i0 = 0;
    while i0 < m {
        let i1 = (i0 + rb).min(m);
        for jj in 0..cols {
            let b = &bt[(j0 + jj) * k..(j0 + jj + 1) * k];
            let o = &mut out[jj * m..(jj + 1) * m];
            let mut i = i0;
            while i + 4 <= i1 {
                let r = dot4(
                    [
                        &at[i * k..(i + 1) * k],
                        &at[(i + 1) * k..(i + 2) * k],
                        &at[(i + 2) * k..(i + 3) * k],
                        &at[(i + 3) * k..(i + 4) * k],
                    ],
                    b,
                );
                o[i..i + 4].copy_from_slice(&r);
                i += 4;
            }
            while i < i1 {
                o[i] = dot1(&at[i * k..(i + 1) * k], b);
                i += 1;
            }
        }
        i0 = i1;
    }
}

impl Gemm {
    /// One product; all ranges already validated.
    ///
    /// # Safety
    /// `a`, `b`, `c` must cover the ranges [`Gemm::extent`] gives.
    unsafe fn run(&self, a: *const u8, b: *const u8, c: *mut u8) {
        let (m, n, k) = (self.m, self.n, self.k);
        if m == 0 || n == 0 {
            return;
        }
        let mut prod = vec![0f32; m * n];
        if k > 0 && self.alpha != 0.0 {
            // op(A) as m rows of k, op(B) as n rows of k (both k-contiguous).
            let mut at = vec![0f32; m * k];
            let mut bt = vec![0f32; n * k];
            // SAFETY: indices stay within the validated extents of A and B.
            unsafe {
                if self.ta {
                    for i in 0..m {
                        for p in 0..k {
                            at[i * k + p] = self.round.apply(self.ab.load(a, p + i * self.lda));
                        }
                    }
                } else {
                    for p in 0..k {
                        for i in 0..m {
                            at[i * k + p] = self.round.apply(self.ab.load(a, i + p * self.lda));
                        }
                    }
                }
                if self.tb {
                    for p in 0..k {
                        for j in 0..n {
                            bt[j * k + p] = self.round.apply(self.ab.load(b, j + p * self.ldb));
                        }
                    }
                } else {
                    for j in 0..n {
                        for p in 0..k {
                            bt[j * k + p] = self.round.apply(self.ab.load(b, p + j * self.ldb));
                        }
                    }
                }
            }
            let flops = 2.0 * m as f64 * n as f64 * k as f64;
            if flops >= 1e7 && n >= 2 {
                let half = n.div_ceil(2);
                let (lo, hi) = prod.split_at_mut(half * m);
                let (at, bt) = (&at, &bt);
                std::thread::scope(|s| {
                    s.spawn(move || product_block(at, bt, m, k, half, hi));
                    product_block(at, bt, m, k, 0, lo);
                });
            } else {
                product_block(&at, &bt, m, k, 0, &mut prod);
            }
        }
        // SAFETY: C's extent was validated: column j holds m elements at j*ldc.
        unsafe {
            for j in 0..n {
                for i in 0..m {
                    let idx = i + j * self.ldc;
                    let v = self.alpha * prod[i + j * m];
                    let v = if self.beta == 0.0 { v } else { v + self.beta * self.c.load(c, idx) };
                    self.c.store(c, idx, v);
                }
            }
        }
    }

    /// Elements spanned by A, B, C as stored (0 when not accessed).
    fn extent(&self) -> (usize, usize, usize) {
        let span = |rows: usize, cols: usize, ld: usize| {
            if rows == 0 || cols == 0 {
                0
            } else {
                (cols - 1) * ld + rows
            }
        };
        let reads_ab = self.m > 0 && self.n > 0 && self.k > 0 && self.alpha != 0.0;
        let (ar, ac) = if self.ta { (self.k, self.m) } else { (self.m, self.k) };
        let (br, bc) = if self.tb { (self.n, self.k) } else { (self.k, self.n) };
        let a = if reads_ab { span(ar, ac, self.lda) } else { 0 };
        let b = if reads_ab { span(br, bc, self.ldb) } else { 0 };
        (a, b, span(self.m, self.n, self.ldc))
    }
}

fn check_range(what: &str, base: u64, elems: usize, size: usize) -> Result<(), cublasStatus_t> {
    if elems == 0 {
        return Ok(());
    }
    let bytes = (elems as u64).checked_mul(size as u64).ok_or(CUBLAS_STATUS_INVALID_VALUE)?;
    if crate::mem::find(base, bytes).is_none() {
        eprintln!("vgpu: cuBLAS gemm: operand {what} [{base:#x}, +{bytes} bytes) is not inside a live device allocation");
        return Err(CUBLAS_STATUS_EXECUTION_FAILED);
    }
    Ok(())
}

/// Reads a scalar argument per the handle's pointer mode.
///
/// # Safety
/// In host mode `p` must point to an f32.
unsafe fn scalar(p: *const c_void, mode: i32, what: &str) -> Result<f32, cublasStatus_t> {
    if p.is_null() {
        return Err(CUBLAS_STATUS_INVALID_VALUE);
    }
    if mode == CUBLAS_POINTER_MODE_DEVICE {
        check_range(what, p as u64, 1, 4)?;
    }
    // SAFETY: host mode: the caller's f32; device mode: checked inside a live allocation.
    Ok(unsafe { std::ptr::read_unaligned(p as *const f32) })
}

fn op(t: i32) -> Result<bool, cublasStatus_t> {
    match t {
        CUBLAS_OP_N => Ok(false),
        CUBLAS_OP_T | CUBLAS_OP_C => Ok(true),
        _ => Err(CUBLAS_STATUS_INVALID_VALUE),
    }
}

/// Validates and runs `batch` products (strides in elements).
///
/// # Safety
/// alpha / beta per the pointer mode; device pointers are validated here.
unsafe fn gemm_common(
    handle: cublasHandle_t,
    transa: i32,
    transb: i32,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const c_void,
    a: *const c_void,
    atype: i32,
    lda: c_int,
    stride_a: i64,
    b: *const c_void,
    btype: i32,
    ldb: c_int,
    stride_b: i64,
    beta: *const c_void,
    c: *mut c_void,
    ctype: i32,
    ldc: c_int,
    stride_c: i64,
    batch: c_int,
    compute: i32,
) -> cublasStatus_t {
    let hs = tri!(handle_state(handle));
    let ta = tri!(op(transa));
    let tb = tri!(op(transb));
    if m < 0 || n < 0 || k < 0 || batch < 0 {
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    let (mu, nu, ku) = (m as usize, n as usize, k as usize);
    let a_rows = if ta { ku } else { mu };
    let b_rows = if tb { nu } else { ku };
    if (lda as i64) < a_rows.max(1) as i64 || (ldb as i64) < b_rows.max(1) as i64 || (ldc as i64) < mu.max(1) as i64 {
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    let (Some(ab), Some(ct), Some(bt)) = (Ty::from(atype), Ty::from(ctype), Ty::from(btype)) else {
        return CUBLAS_STATUS_NOT_SUPPORTED;
    };
    if ab != bt {
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    let tf32_mode = hs.math_mode & 0xF == CUBLAS_TF32_TENSOR_OP_MATH;
    let round = match compute {
        CUBLAS_COMPUTE_32F | CUDA_R_32F => {
            if ct != Ty::F32 && ct != ab {
                return CUBLAS_STATUS_NOT_SUPPORTED;
            }
            if ab == Ty::F32 && tf32_mode {
                InRound::Tf32
            } else {
                InRound::None
            }
        }
        CUBLAS_COMPUTE_32F_PEDANTIC => {
            if ct != Ty::F32 && ct != ab {
                return CUBLAS_STATUS_NOT_SUPPORTED;
            }
            InRound::None
        }
        CUBLAS_COMPUTE_32F_FAST_TF32 | CUBLAS_COMPUTE_32F_FAST_16BF | CUBLAS_COMPUTE_32F_FAST_16F => {
            if ab != Ty::F32 || ct != Ty::F32 {
                return CUBLAS_STATUS_NOT_SUPPORTED;
            }
            match compute {
                CUBLAS_COMPUTE_32F_FAST_TF32 => InRound::Tf32,
                CUBLAS_COMPUTE_32F_FAST_16BF => InRound::Bf16,
                _ => InRound::F16,
            }
        }
        _ => return CUBLAS_STATUS_NOT_SUPPORTED,
    };
    if mu == 0 || nu == 0 || batch == 0 {
        return CUBLAS_STATUS_SUCCESS;
    }
    let (alpha_ptr, beta_ptr) = (alpha, beta);
    // SAFETY: per this function's contract.
    let alpha = tri!(unsafe { scalar(alpha, hs.pointer_mode, "alpha") });
    // SAFETY: per this function's contract.
    let beta = tri!(unsafe { scalar(beta, hs.pointer_mode, "beta") });
    let g = Gemm {
        ta,
        tb,
        m: mu,
        n: nu,
        k: ku,
        lda: lda as usize,
        ldb: ldb as usize,
        ldc: ldc as usize,
        ab,
        c: ct,
        round,
        alpha,
        beta,
    };
    let (ea, eb, ec) = g.extent();
    let at = |base: *const c_void, stride: i64, i: i64, size: usize| -> u64 {
        (base as u64).wrapping_add((stride.wrapping_mul(i) as u64).wrapping_mul(size as u64))
    };
    // Validate every operand of every batch before writing anything.
    for i in 0..batch as i64 {
        if ea > 0 && a.is_null() || eb > 0 && b.is_null() || c.is_null() {
            return CUBLAS_STATUS_INVALID_VALUE;
        }
        tri!(check_range("A", at(a, stride_a, i, ab.size()), ea, ab.size()));
        tri!(check_range("B", at(b, stride_b, i, ab.size()), eb, ab.size()));
        tri!(check_range("C", at(c, stride_c, i, ct.size()), ec, ct.size()));
    }
    // streamcheck: the allocations read and written, on the handle's stream.
    let mut uses = Vec::new();
    let mut add = |base: u64, elems: usize, size: usize, kind: crate::streamcheck::Kind| {
        if elems > 0 {
            if let Some(a) = crate::mem::find(base, (elems * size) as u64) {
                uses.push(crate::streamcheck::Use::of(&a, kind));
            }
        }
    };
    use crate::streamcheck::Kind::{Read, Write};
    if hs.pointer_mode == CUBLAS_POINTER_MODE_DEVICE {
        add(alpha_ptr as u64, 1, 4, Read);
        add(beta_ptr as u64, 1, 4, Read);
    }
    for i in 0..batch as i64 {
        add(at(a, stride_a, i, ab.size()), ea, ab.size(), Read);
        add(at(b, stride_b, i, ab.size()), eb, ab.size(), Read);
        if g.beta != 0.0 {
            add(at(c, stride_c, i, ct.size()), ec, ct.size(), Read);
        }
        add(at(c, stride_c, i, ct.size()), ec, ct.size(), Write);
    }
    if crate::driver::stream_op(hs.stream, "cuBLAS GEMM", &uses).is_err() {
        return CUBLAS_STATUS_EXECUTION_FAILED;
    }
    for i in 0..batch as i64 {
        // SAFETY: each operand's extent was checked inside a live allocation above.
        unsafe {
            g.run(
                at(a, stride_a, i, ab.size()) as *const u8,
                at(b, stride_b, i, ab.size()) as *const u8,
                at(c, stride_c, i, ct.size()) as *mut u8,
            )
        };
    }
    CUBLAS_STATUS_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cublasGemmEx(
    handle: cublasHandle_t,
    transa: i32,
    transb: i32,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const c_void,
    a: *const c_void,
    atype: i32,
    lda: c_int,
    b: *const c_void,
    btype: i32,
    ldb: c_int,
    beta: *const c_void,
    c: *mut c_void,
    ctype: i32,
    ldc: c_int,
    compute: i32,
    _algo: i32,
) -> cublasStatus_t {
    // SAFETY: the cuBLAS contract for the scalar pointers; device operands validated inside.
    unsafe {
        gemm_common(
            handle, transa, transb, m, n, k, alpha, a, atype, lda, 0, b, btype, ldb, 0, beta, c, ctype, ldc, 0, 1, compute,
        )
    }
}

#[no_mangle]
pub unsafe extern "C" fn cublasGemmStridedBatchedEx(
    handle: cublasHandle_t,
    transa: i32,
    transb: i32,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const c_void,
    a: *const c_void,
    atype: i32,
    lda: c_int,
    stride_a: i64,
    b: *const c_void,
    btype: i32,
    ldb: c_int,
    stride_b: i64,
    beta: *const c_void,
    c: *mut c_void,
    ctype: i32,
    ldc: c_int,
    stride_c: i64,
    batch: c_int,
    compute: i32,
    _algo: i32,
) -> cublasStatus_t {
    // SAFETY: as cublasGemmEx.
    unsafe {
        gemm_common(
            handle, transa, transb, m, n, k, alpha, a, atype, lda, stride_a, b, btype, ldb, stride_b, beta, c, ctype, ldc, stride_c, batch,
            compute,
        )
    }
}

#[no_mangle]
pub unsafe extern "C" fn cublasSgemm_v2(
    handle: cublasHandle_t,
    transa: i32,
    transb: i32,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const f32,
    a: *const f32,
    lda: c_int,
    b: *const f32,
    ldb: c_int,
    beta: *const f32,
    c: *mut f32,
    ldc: c_int,
) -> cublasStatus_t {
    // SAFETY: as cublasGemmEx.
    unsafe {
        gemm_common(
            handle,
            transa,
            transb,
            m,
            n,
            k,
            alpha as _,
            a as _,
            CUDA_R_32F,
            lda,
            0,
            b as _,
            CUDA_R_32F,
            ldb,
            0,
            beta as _,
            c as _,
            CUDA_R_32F,
            ldc,
            0,
            1,
            CUBLAS_COMPUTE_32F,
        )
    }
}

#[no_mangle]
pub unsafe extern "C" fn cublasSgemmStridedBatched(
    handle: cublasHandle_t,
    transa: i32,
    transb: i32,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const f32,
    a: *const f32,
    lda: c_int,
    stride_a: i64,
    b: *const f32,
    ldb: c_int,
    stride_b: i64,
    beta: *const f32,
    c: *mut f32,
    ldc: c_int,
    stride_c: i64,
    batch: c_int,
) -> cublasStatus_t {
    // SAFETY: as cublasGemmEx.
    unsafe {
        gemm_common(
            handle,
            transa,
            transb,
            m,
            n,
            k,
            alpha as _,
            a as _,
            CUDA_R_32F,
            lda,
            stride_a,
            b as _,
            CUDA_R_32F,
            ldb,
            stride_b,
            beta as _,
            c as _,
            CUDA_R_32F,
            ldc,
            stride_c,
            batch,
            CUBLAS_COMPUTE_32F,
        )
    }
}
