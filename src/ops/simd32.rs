//! f32 vector kernels of the CPU ops on AVX2 + FMA or AVX-512F: for the attention
//! (`ops::attention::cpu_f32`), register-blocked products for small operands, where a general
//! GEMM's packing and dispatch cost as much as the arithmetic (a 227 x 227 x 64 product is 6.6
//! MFLOP, about 30 us on one core), and the softmax rows with a vector `exp`; for GELU
//! (`ops::gelu::cpu`), `erf` and `exp` per lane with fused multiply-adds.
//!
//! `C[m, w] (+)= alpha * A[m, k] B[k, w]`: `B` row-major with any row stride, any `w` (a last
//! vector narrower than the lanes is loaded and stored under a mask), `A` read one element at a
//! time (broadcast) by any row and column strides, so `A^T` costs nothing. A tile of 6 rows by
//! up to `NV` vectors of `C` sits in registers for the whole `k` loop; each element's sum runs
//! over `p = 0..k` in order, so a row of `C` does not depend on the other rows or on how the
//! work is split. AVX-512F (16 lanes, with the crate's `avx512` feature) or AVX2 + FMA (8
//! lanes), picked at run time.

#[cfg(target_arch = "x86_64")]
use crate::ops::real::{ERF_P, ERF_Q, EXP_P, LN2_HI, LN2_LO, ROUND};
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Which vector width a product runs at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// AVX2 + FMA, 8 lanes.
    Avx2,
    /// AVX-512F, 16 lanes.
    Avx512,
}

impl Isa {
    /// Lanes per vector.
    pub(crate) fn lanes(self) -> usize {
        match self {
            Isa::Avx2 => 8,
            Isa::Avx512 => 16,
        }
    }

    /// The widest this CPU and build run (AVX-512 only with the `avx512` feature), if any.
    pub(crate) fn best() -> Option<Isa> {
        #[cfg(target_arch = "x86_64")]
        {
            if cfg!(feature = "avx512") && std::arch::is_x86_feature_detected!("avx512f") {
                return Some(Isa::Avx512);
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                return Some(Isa::Avx2);
            }
        }
        None
    }
}

/// Operands of one product (strides in elements).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mm {
    pub m: usize,
    /// Columns of `B` and `C`.
    pub w: usize,
    pub k: usize,
    /// `A[i, p]` at `a + i * a_rs + p * a_cs`.
    pub a: *const f32,
    pub a_rs: usize,
    pub a_cs: usize,
    /// `B[p, j]` at `b + p * ldb + j`.
    pub b: *const f32,
    pub ldb: usize,
    /// `C[i, j]` at `c + i * ldc + j`.
    pub c: *mut f32,
    pub ldc: usize,
    pub alpha: f32,
    /// Add to `C` instead of overwriting it.
    pub accumulate: bool,
}

/// Runs the product at `isa`.
///
/// # Safety
/// `isa` must be supported by the CPU ([`Isa::best`] or narrower); every addressed element in
/// bounds; `C` must not overlap `A` or `B`.
pub(crate) unsafe fn matmul(isa: Isa, mm: &Mm) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        Isa::Avx2 => avx2(mm),
        Isa::Avx512 => avx512(mm),
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = mm;
        unreachable!("simd32: no SIMD product on this architecture");
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2(mm: &Mm) {
    run::<Y>(mm)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn avx512(mm: &Mm) {
    run::<Z>(mm)
}

/// A vector of f32 lanes.
#[cfg(target_arch = "x86_64")]
trait Vf: Copy {
    const L: usize;
    /// Widest column panel, in vectors: its `TILE_ROWS x NV` accumulators, `NV` loads and a
    /// broadcast must fit the register file.
    const NV: usize;
    /// The first `lanes` lanes of a vector.
    type Mask: Copy;
    unsafe fn mask(lanes: usize) -> Self::Mask;
    unsafe fn load_m(p: *const f32, m: Self::Mask) -> Self;
    unsafe fn store_m(self, p: *mut f32, m: Self::Mask);
    unsafe fn zero() -> Self;
    unsafe fn splat(p: *const f32) -> Self;
    unsafe fn set1(x: f32) -> Self;
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn store(self, p: *mut f32);
    /// `a * b + self`, fused.
    unsafe fn fma(self, a: Self, b: Self) -> Self;
    unsafe fn mul(self, b: Self) -> Self;
    unsafe fn add(self, b: Self) -> Self;
    unsafe fn sub(self, b: Self) -> Self;
    unsafe fn max(self, b: Self) -> Self;
    unsafe fn min(self, b: Self) -> Self;
    unsafe fn div(self, b: Self) -> Self;
    /// `self * 2^n` where `x >= lim`, 0 elsewhere: `n` an integer in -127..=128, also held
    /// as `t = 1.5 * 2^23 + n` in `t`'s low mantissa bits (AVX2 builds `2^n` from those bits;
    /// AVX-512 scales by `n` in one instruction, with the mask folded in).
    unsafe fn scale2_where(self, n: Self, t: Self, x: Self, lim: Self) -> Self;
    /// The lanes' maximum, reduced in a fixed order.
    unsafe fn hmax(self) -> f32;
    /// The lanes' sum, reduced in a fixed order.
    unsafe fn hsum(self) -> f32;
}

/// AVX2: 8 lanes.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Y(__m256);

#[cfg(target_arch = "x86_64")]
impl Vf for Y {
    const L: usize = 8;
    // 16 registers: 6 x 2 (12 accumulators, 2 loads, a broadcast). A 4 x 3 tile for a
    // panel of 3 vectors (24 columns) measured slower than 6 x 2 then 6 x 1.
    const NV: usize = 2;
    type Mask = __m256i;
    #[inline(always)]
    unsafe fn mask(lanes: usize) -> __m256i {
        let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes as i32), idx)
    }
    #[inline(always)]
    unsafe fn load_m(p: *const f32, m: __m256i) -> Self {
        Y(_mm256_maskload_ps(p, m))
    }
    #[inline(always)]
    unsafe fn store_m(self, p: *mut f32, m: __m256i) {
        _mm256_maskstore_ps(p, m, self.0)
    }
    #[inline(always)]
    unsafe fn zero() -> Self {
        Y(_mm256_setzero_ps())
    }
    #[inline(always)]
    unsafe fn splat(p: *const f32) -> Self {
        Y(_mm256_broadcast_ss(&*p))
    }
    #[inline(always)]
    unsafe fn set1(x: f32) -> Self {
        Y(_mm256_set1_ps(x))
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        Y(_mm256_loadu_ps(p))
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        _mm256_storeu_ps(p, self.0)
    }
    #[inline(always)]
    unsafe fn fma(self, a: Self, b: Self) -> Self {
        Y(_mm256_fmadd_ps(a.0, b.0, self.0))
    }
    #[inline(always)]
    unsafe fn mul(self, b: Self) -> Self {
        Y(_mm256_mul_ps(self.0, b.0))
    }
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        Y(_mm256_add_ps(self.0, b.0))
    }
    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        Y(_mm256_sub_ps(self.0, b.0))
    }
    #[inline(always)]
    unsafe fn max(self, b: Self) -> Self {
        Y(_mm256_max_ps(self.0, b.0))
    }
    #[inline(always)]
    unsafe fn min(self, b: Self) -> Self {
        Y(_mm256_min_ps(self.0, b.0))
    }
    #[inline(always)]
    unsafe fn div(self, b: Self) -> Self {
        Y(_mm256_div_ps(self.0, b.0))
    }
    #[inline(always)]
    unsafe fn scale2_where(self, _n: Self, t: Self, x: Self, lim: Self) -> Self {
        let bits = _mm256_sub_epi32(_mm256_castps_si256(t.0), _mm256_set1_epi32(ROUND.to_bits() as i32 - 127));
        let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(bits));
        Y(_mm256_and_ps(_mm256_mul_ps(self.0, pow2), _mm256_cmp_ps::<_CMP_GE_OQ>(x.0, lim.0)))
    }
    #[inline(always)]
    unsafe fn hmax(self) -> f32 {
        let m = _mm_max_ps(_mm256_castps256_ps128(self.0), _mm256_extractf128_ps::<1>(self.0));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)))
    }
    #[inline(always)]
    unsafe fn hsum(self) -> f32 {
        // Lanes (i, i + 4), then (i, i + 2), then (0, 1): a fixed tree.
        let s = _mm_add_ps(_mm256_castps256_ps128(self.0), _mm256_extractf128_ps::<1>(self.0));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }
}

/// AVX-512F: 16 lanes.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Z(__m512);

#[cfg(target_arch = "x86_64")]
impl Vf for Z {
    const L: usize = 16;
    // 32 registers: 6 x 4 (24 accumulators, 4 loads, a broadcast: 24 FMAs per 10 loads).
    const NV: usize = 4;
    type Mask = __mmask16;
    #[inline(always)]
    unsafe fn mask(lanes: usize) -> __mmask16 {
        ((1u32 << lanes) - 1) as __mmask16
    }
    #[inline(always)]
    unsafe fn load_m(p: *const f32, m: __mmask16) -> Self {
        Z(_mm512_maskz_loadu_ps(m, p))
    }
    #[inline(always)]
    unsafe fn store_m(self, p: *mut f32, m: __mmask16) {
        _mm512_mask_storeu_ps(p, m, self.0)
    }
    #[inline(always)]
    unsafe fn zero() -> Self {
        Z(_mm512_setzero_ps())
    }
    #[inline(always)]
    unsafe fn splat(p: *const f32) -> Self {
        Z(_mm512_set1_ps(*p))
    }
    #[inline(always)]
    unsafe fn set1(x: f32) -> Self {
        Z(_mm512_set1_ps(x))
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        Z(_mm512_loadu_ps(p))
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        _mm512_storeu_ps(p, self.0)
    }
    #[inline(always)]
    unsafe fn fma(self, a: Self, b: Self) -> Self {
        Z(_mm512_fmadd_ps(a.0, b.0, self.0))
    }
    #[inline(always)]
    unsafe fn mul(self, b: Self) -> Self {
        Z(_mm512_mul_ps(self.0, b.0))
    }
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        Z(_mm512_add_ps(self.0, b.0))
    }
    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        Z(_mm512_sub_ps(self.0, b.0))
    }
    #[inline(always)]
    unsafe fn max(self, b: Self) -> Self {
        Z(_mm512_max_ps(self.0, b.0))
    }
    #[inline(always)]
    unsafe fn min(self, b: Self) -> Self {
        Z(_mm512_min_ps(self.0, b.0))
    }
    #[inline(always)]
    unsafe fn div(self, b: Self) -> Self {
        Z(_mm512_div_ps(self.0, b.0))
    }
    #[inline(always)]
    unsafe fn scale2_where(self, n: Self, _t: Self, x: Self, lim: Self) -> Self {
        Z(_mm512_maskz_scalef_ps(_mm512_cmp_ps_mask::<_CMP_GE_OQ>(x.0, lim.0), self.0, n.0))
    }
    #[inline(always)]
    unsafe fn hmax(self) -> f32 {
        _mm512_reduce_max_ps(self.0)
    }
    #[inline(always)]
    unsafe fn hsum(self) -> f32 {
        // Lanes (i, i + 8), then AVX2's tree: fixed, written out rather than left to the
        // compiler's reduction.
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(self.0)));
        Y(_mm256_add_ps(_mm512_castps512_ps256(self.0), hi)).hsum()
    }
}

/// Vector `v` of a tile's `VECS`: the last one under `tail` when `MASKED`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn load<V: Vf, const VECS: usize, const MASKED: bool>(p: *const f32, v: usize, tail: V::Mask) -> V {
    if MASKED && v == VECS - 1 {
        V::load_m(p, tail)
    } else {
        V::load(p)
    }
}

/// One `ROWS x VECS` tile at `C[i0.., j0..]`; with `MASKED` its last vector covers only the
/// lanes in `tail` (the product's last columns), loaded and stored under that mask.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn tile<V: Vf, const ROWS: usize, const VECS: usize, const MASKED: bool>(mm: &Mm, i0: usize, j0: usize, tail: V::Mask) {
    let mut acc = [[V::zero(); VECS]; ROWS];
    let a0 = mm.a.add(i0 * mm.a_rs);
    let b0 = mm.b.add(j0);
    for p in 0..mm.k {
        let bp = b0.add(p * mm.ldb);
        let mut bv = [V::zero(); VECS];
        for (v, b) in bv.iter_mut().enumerate() {
            *b = load::<V, VECS, MASKED>(bp.add(v * V::L), v, tail);
        }
        let ap = a0.add(p * mm.a_cs);
        for (r, row) in acc.iter_mut().enumerate() {
            let a = V::splat(ap.add(r * mm.a_rs));
            for (v, c) in row.iter_mut().enumerate() {
                *c = c.fma(a, bv[v]);
            }
        }
    }
    let alpha = V::set1(mm.alpha);
    for (r, row) in acc.iter().enumerate() {
        let cp = mm.c.add((i0 + r) * mm.ldc + j0);
        for (v, c) in row.iter().enumerate() {
            let mut out = c.mul(alpha);
            if mm.accumulate {
                out = out.add(load::<V, VECS, MASKED>(cp.add(v * V::L), v, tail));
            }
            if MASKED && v == VECS - 1 {
                out.store_m(cp.add(v * V::L), tail);
            } else {
                out.store(cp.add(v * V::L));
            }
        }
    }
}

/// Rows of a product's tile (see [`Vf::NV`]).
#[cfg(target_arch = "x86_64")]
const TILE_ROWS: usize = 6;

/// Column panels of up to `V::NV` vectors outside, tiles of up to `TILE_ROWS` rows inside,
/// so a panel of `B` stays in L1 while every row tile streams past it; a last vector narrower
/// than the lanes goes masked.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn run<V: Vf>(mm: &Mm) {
    macro_rules! rows {
        ($vecs:literal, $masked:literal, $i0:expr, $rows:expr, $j0:expr, $tail:expr) => {
            match $rows {
                6 => tile::<V, 6, $vecs, $masked>(mm, $i0, $j0, $tail),
                5 => tile::<V, 5, $vecs, $masked>(mm, $i0, $j0, $tail),
                4 => tile::<V, 4, $vecs, $masked>(mm, $i0, $j0, $tail),
                3 => tile::<V, 3, $vecs, $masked>(mm, $i0, $j0, $tail),
                2 => tile::<V, 2, $vecs, $masked>(mm, $i0, $j0, $tail),
                _ => tile::<V, 1, $vecs, $masked>(mm, $i0, $j0, $tail),
            }
        };
    }
    macro_rules! panel {
        ($masked:literal, $vecs:expr, $i0:expr, $rows:expr, $j0:expr, $tail:expr) => {
            match $vecs {
                4 => rows!(4, $masked, $i0, $rows, $j0, $tail),
                3 => rows!(3, $masked, $i0, $rows, $j0, $tail),
                2 => rows!(2, $masked, $i0, $rows, $j0, $tail),
                _ => rows!(1, $masked, $i0, $rows, $j0, $tail),
            }
        };
    }
    let tail_lanes = mm.w % V::L;
    let tail = V::mask(tail_lanes);
    let mut j0 = 0;
    while j0 < mm.w {
        let vecs = (mm.w - j0).div_ceil(V::L).min(V::NV);
        let masked = tail_lanes != 0 && j0 + vecs * V::L > mm.w;
        let mut i0 = 0;
        while i0 < mm.m {
            let rows = (mm.m - i0).min(TILE_ROWS);
            if masked {
                panel!(true, vecs, i0, rows, j0, tail);
            } else {
                panel!(false, vecs, i0, rows, j0, tail);
            }
            i0 += rows;
        }
        j0 += vecs * V::L;
    }
}

/// `exp` per lane for `x <= 0` (the shifted scores of a softmax, above 0 only by rounding,
/// so no overflow clamp): `ops::real::exp_f32`'s reduction and polynomial with fused
/// multiply-adds (so a few ulp apart from it); 0 below -87 and for `-inf`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn exp<V: Vf>(x: V) -> V {
    let lo = V::set1(-87.0);
    let xc = x.max(lo);
    let t = V::set1(ROUND).fma(xc, V::set1(std::f32::consts::LOG2_E));
    let n = t.sub(V::set1(ROUND));
    let r = xc.fma(n, V::set1(-LN2_HI));
    let r = r.fma(n, V::set1(-LN2_LO));
    // Loops rather than folds: a closure is compiled outside the target feature.
    let mut p = V::set1(EXP_P[0]);
    for c in &EXP_P[1..] {
        p = V::set1(*c).fma(p, r);
    }
    let e = r.add(V::set1(1.0)).fma(p, r.mul(r));
    e.scale2_where(n, t, x, lo)
}

/// `erf` per lane: `ops::real::erf_f32`'s rational approximation (clamped to [-4, 4]) with
/// fused multiply-adds, so a few ulp apart from it.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn erf<V: Vf>(x: V) -> V {
    let x = x.max(V::set1(-4.0)).min(V::set1(4.0));
    let x2 = x.mul(x);
    let (mut p, mut q) = (V::set1(ERF_P[0]), V::set1(ERF_Q[0]));
    for c in &ERF_P[1..] {
        p = V::set1(*c).fma(p, x2);
    }
    for c in &ERF_Q[1..] {
        q = V::set1(*c).fma(q, x2);
    }
    p.mul(x).div(q)
}

/// `y = gelu(x + b)` (`grad` false) or `y *= gelu'(x + b)` (`grad` true) over equal lengths
/// (`b` none, or as long as `x`), the exact GELU of `ops::gelu` (`0.5 x (1 + erf(x / sqrt 2))`,
/// derivative `Phi(x) + x phi(x)`); a last partial vector masked.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn gelu<V: Vf>(x: &[f32], b: Option<&[f32]>, y: &mut [f32], grad: bool) {
    let (px, py) = (x.as_ptr(), y.as_mut_ptr());
    let pb = b.map(|b| b.as_ptr());
    let full = x.len() / V::L * V::L;
    for i in (0..full).step_by(V::L) {
        let v = V::load(px.add(i));
        let g = gelu_vec(pb.map_or(v, |pb| v.add(V::load(pb.add(i)))), grad);
        if grad { V::load(py.add(i)).mul(g) } else { g }.store(py.add(i));
    }
    if full < x.len() {
        let m = V::mask(x.len() - full);
        let v = V::load_m(px.add(full), m);
        let g = gelu_vec(pb.map_or(v, |pb| v.add(V::load_m(pb.add(full), m))), grad);
        if grad { V::load_m(py.add(full), m).mul(g) } else { g }.store_m(py.add(full), m);
    }
}

/// `gelu(x)`, or `gelu'(x)` with `grad`, per lane.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn gelu_vec<V: Vf>(x: V, grad: bool) -> V {
    let half = V::set1(0.5);
    let e = erf(x.mul(V::set1(std::f32::consts::FRAC_1_SQRT_2)));
    if grad {
        let pdf = exp(x.mul(x).mul(V::set1(-0.5))).mul(V::set1(0.398_942_3));
        half.fma(half, e).fma(x, pdf)
    } else {
        let h = x.mul(half);
        h.fma(h, e)
    }
}

/// `y = gelu(x + b)`, or with `grad` `y *= gelu'(x + b)` (a gradient through GELU), at
/// `isa`; equal lengths (`b` none, or as long as `x`).
///
/// # Safety
/// `isa` must be supported by the CPU.
pub(crate) unsafe fn gelu_map(isa: Isa, x: &[f32], b: Option<&[f32]>, y: &mut [f32], grad: bool) {
    assert!(x.len() == y.len() && b.is_none_or(|b| b.len() == x.len()));
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn y8(x: &[f32], b: Option<&[f32]>, y: &mut [f32], grad: bool) {
            gelu::<Y>(x, b, y, grad)
        }
        #[target_feature(enable = "avx512f")]
        unsafe fn z16(x: &[f32], b: Option<&[f32]>, y: &mut [f32], grad: bool) {
            gelu::<Z>(x, b, y, grad)
        }
        match isa {
            Isa::Avx2 => y8(x, b, y, grad),
            Isa::Avx512 => z16(x, b, y, grad),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (x, b, y, grad);
        unreachable!("simd32: no SIMD on this architecture");
    }
}

/// Softmax of a row in place, `row.len()` a multiple of the lanes (pad with `-inf`); returns
/// its log-sum-exp. The row's maximum must be finite.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn softmax<V: Vf>(row: &mut [f32]) -> f32 {
    let p = row.as_mut_ptr();
    // Four independent maxima: one chain would wait out the latency of every `max`.
    let mut mx = [V::set1(f32::NEG_INFINITY); 4];
    let mut i = 0;
    while i + 4 * V::L <= row.len() {
        for (a, m) in mx.iter_mut().enumerate() {
            *m = m.max(V::load(p.add(i + a * V::L)));
        }
        i += 4 * V::L;
    }
    while i < row.len() {
        mx[0] = mx[0].max(V::load(p.add(i)));
        i += V::L;
    }
    let mx = mx[0].max(mx[1]).max(mx[2].max(mx[3]));
    let m = mx.hmax();
    let mv = V::set1(m);
    let mut sum = V::zero();
    for i in (0..row.len()).step_by(V::L) {
        let e = exp(V::load(p.add(i)).sub(mv));
        e.store(p.add(i));
        sum = sum.add(e);
    }
    let s = sum.hsum();
    let inv = V::set1(1.0 / s);
    for i in (0..row.len()).step_by(V::L) {
        V::load(p.add(i)).mul(inv).store(p.add(i));
    }
    m + s.ln()
}

/// `p = exp(p - lse)` then `dp = p * (dp - di)`, in place, over rows of a multiple of the lanes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn softmax_grad<V: Vf>(p: &mut [f32], dp: &mut [f32], lse: f32, di: f32) {
    let (pp, dpp) = (p.as_mut_ptr(), dp.as_mut_ptr());
    let (l, dv) = (V::set1(lse), V::set1(di));
    for i in (0..p.len()).step_by(V::L) {
        let e = exp(V::load(pp.add(i)).sub(l));
        e.store(pp.add(i));
        e.mul(V::load(dpp.add(i)).sub(dv)).store(dpp.add(i));
    }
}

/// Softmax of `row` in place at `isa`; returns the row's log-sum-exp. `row.len()` must be a
/// multiple of the lanes (padded with `-inf`, which come out 0) and its maximum finite.
///
/// # Safety
/// `isa` must be supported by the CPU.
pub(crate) unsafe fn softmax_row(isa: Isa, row: &mut [f32]) -> f32 {
    debug_assert_eq!(row.len() % isa.lanes(), 0);
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn y(row: &mut [f32]) -> f32 {
            softmax::<Y>(row)
        }
        #[target_feature(enable = "avx512f")]
        unsafe fn z(row: &mut [f32]) -> f32 {
            softmax::<Z>(row)
        }
        match isa {
            Isa::Avx2 => y(row),
            Isa::Avx512 => z(row),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = row;
        unreachable!("simd32: no SIMD on this architecture");
    }
}

/// The attention backward's row step at `isa`: `p = exp(p - lse)` (the probabilities from the
/// scaled scores), then `dp = p * (dp - di)` (the scores' gradient). Equal lengths, a multiple
/// of the lanes.
///
/// # Safety
/// `isa` must be supported by the CPU.
pub(crate) unsafe fn softmax_grad_row(isa: Isa, p: &mut [f32], dp: &mut [f32], lse: f32, di: f32) {
    debug_assert!(p.len() == dp.len() && p.len().is_multiple_of(isa.lanes()));
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn y(p: &mut [f32], dp: &mut [f32], lse: f32, di: f32) {
            softmax_grad::<Y>(p, dp, lse, di)
        }
        #[target_feature(enable = "avx512f")]
        unsafe fn z(p: &mut [f32], dp: &mut [f32], lse: f32, di: f32) {
            softmax_grad::<Z>(p, dp, lse, di)
        }
        match isa {
            Isa::Avx2 => y(p, dp, lse, di),
            Isa::Avx512 => z(p, dp, lse, di),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (p, dp, lse, di);
        unreachable!("simd32: no SIMD on this architecture");
    }
}

/// `a . b` at `isa` (equal lengths): one vector accumulator over the elements in order (a
/// last partial vector masked), then [`Vf::hsum`]'s fixed tree (a scalar loop would wait out
/// one add's latency per element).
///
/// # Safety
/// `isa` must be supported by the CPU.
pub(crate) unsafe fn dot(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    {
        #[inline(always)]
        unsafe fn run<V: Vf>(a: &[f32], b: &[f32]) -> f32 {
            let (pa, pb) = (a.as_ptr(), b.as_ptr());
            let full = a.len() / V::L * V::L;
            let mut acc = V::zero();
            for i in (0..full).step_by(V::L) {
                acc = acc.fma(V::load(pa.add(i)), V::load(pb.add(i)));
            }
            if full < a.len() {
                let m = V::mask(a.len() - full);
                acc = acc.fma(V::load_m(pa.add(full), m), V::load_m(pb.add(full), m));
            }
            acc.hsum()
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn y(a: &[f32], b: &[f32]) -> f32 {
            run::<Y>(a, b)
        }
        #[target_feature(enable = "avx512f")]
        unsafe fn z(a: &[f32], b: &[f32]) -> f32 {
            run::<Z>(a, b)
        }
        match isa {
            Isa::Avx2 => y(a, b),
            Isa::Avx512 => z(a, b),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (a, b);
        unreachable!("simd32: no SIMD on this architecture");
    }
}

/// `dst[p * ld + j] = src[j * rs + p]` for `j < n`, `p < dh`, and 0 for `n <= j < ld`: `dh`
/// columns of `n` rows transposed into a zero-padded `[dh, ld]`. Blocks of 8 x 8 go through
/// AVX2 registers (unpack, shuffle, lane permute); the last `n % 8` rows one element at a
/// time.
///
/// # Safety
/// The CPU must have AVX2 (any [`Isa`] it supports); `dh` a multiple of 8; `src` must address
/// `n` rows of `dh` elements at stride `rs`; `dst` at least `dh * ld` long with `ld >= n`.
pub(crate) unsafe fn transpose(dst: &mut [f32], ld: usize, src: *const f32, rs: usize, n: usize, dh: usize) {
    debug_assert!(dh.is_multiple_of(8) && ld >= n && dst.len() >= dh * ld);
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        unsafe fn run(dst: *mut f32, ld: usize, src: *const f32, rs: usize, n: usize, dh: usize) {
            let full = n / 8 * 8;
            for j in (0..full).step_by(8) {
                for p in (0..dh).step_by(8) {
                    let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add((j + i) * rs + p)));
                    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
                    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
                    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
                    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
                    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
                    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
                    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
                    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
                    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
                    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
                    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
                    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
                    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
                    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
                    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
                    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
                    let out = [
                        _mm256_permute2f128_ps::<0x20>(u0, u4),
                        _mm256_permute2f128_ps::<0x20>(u1, u5),
                        _mm256_permute2f128_ps::<0x20>(u2, u6),
                        _mm256_permute2f128_ps::<0x20>(u3, u7),
                        _mm256_permute2f128_ps::<0x31>(u0, u4),
                        _mm256_permute2f128_ps::<0x31>(u1, u5),
                        _mm256_permute2f128_ps::<0x31>(u2, u6),
                        _mm256_permute2f128_ps::<0x31>(u3, u7),
                    ];
                    for (i, v) in out.iter().enumerate() {
                        _mm256_storeu_ps(dst.add((p + i) * ld + j), *v);
                    }
                }
            }
            for p in 0..dh {
                let row = dst.add(p * ld);
                for j in full..n {
                    *row.add(j) = *src.add(j * rs + p);
                }
                std::ptr::write_bytes(row.add(n), 0, ld - n);
            }
        }
        run(dst.as_mut_ptr(), ld, src, rs, n, dh)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (dst, ld, src, rs, n, dh);
        unreachable!("simd32: no SIMD on this architecture");
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// Every tile shape and tail at every width this CPU runs, against the definition.
    #[test]
    fn products_match_the_definition() {
        let Some(best) = Isa::best() else { return };
        let isas: &[Isa] = if best == Isa::Avx512 {
            &[Isa::Avx2, Isa::Avx512]
        } else {
            &[Isa::Avx2]
        };
        let val = |i: usize, s: usize| ((i * 2_654_435_761 + s * 97) % 1000) as f32 / 500.0 - 1.0;
        for &isa in isas {
            let l = isa.lanes();
            // Widths in whole vectors and with a masked last vector (a head width of 24).
            for (m, w, k) in [
                (1, l, 1),
                (7, 3 * l, 5),
                (13, 2 * l, 64),
                (6, 4 * l, 17),
                (29, 5 * l, 3),
                (9, 24, 7),
                (5, l + 3, 4),
                (11, 3, 2),
                (8, 5 * l - 5, 6),
            ] {
                for (transposed, accumulate) in [(false, false), (true, true)] {
                    let a: Vec<f32> = (0..m * k).map(|i| val(i, 1)).collect();
                    let ldb = w + 3;
                    let b: Vec<f32> = (0..k * ldb).map(|i| val(i, 2)).collect();
                    let ldc = w + 1;
                    let c0: Vec<f32> = (0..m * ldc).map(|i| val(i, 3)).collect();
                    let mut c = c0.clone();
                    // A as [m, k] row-major, or as the transpose of a [k, m] one.
                    let (a_rs, a_cs) = if transposed { (1, m) } else { (k, 1) };
                    let mm = Mm {
                        m,
                        w,
                        k,
                        a: a.as_ptr(),
                        a_rs,
                        a_cs,
                        b: b.as_ptr(),
                        ldb,
                        c: c.as_mut_ptr(),
                        ldc,
                        alpha: 0.75,
                        accumulate,
                    };
                    // SAFETY: isa is supported; sizes as allocated.
                    unsafe { matmul(isa, &mm) };
                    for i in 0..m {
                        for j in 0..ldc {
                            let got = c[i * ldc + j];
                            if j >= w {
                                assert_eq!(got, c0[i * ldc + j], "{isa:?}: column {j} past w written");
                                continue;
                            }
                            let s: f64 = (0..k).map(|p| a[i * a_rs + p * a_cs] as f64 * b[p * ldb + j] as f64).sum();
                            let want = 0.75 * s + if accumulate { c0[i * ldc + j] as f64 } else { 0.0 };
                            assert!(
                                (got as f64 - want).abs() <= 1e-5 * (1.0 + s.abs()),
                                "{isa:?} m {m} w {w} k {k} ({i}, {j}): {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Every block and tail of the transpose, with the padding zeroed, against the definition.
    #[test]
    fn transpose_matches_the_definition() {
        if Isa::best().is_none() {
            return;
        }
        for (n, dh, rs, ld) in [
            (1, 8, 8, 16),
            (7, 8, 11, 7),
            (8, 16, 16, 16),
            (17, 24, 29, 32),
            (227, 64, 1152, 240),
        ] {
            let src: Vec<f32> = (0..n * rs).map(|i| i as f32).collect();
            let mut dst = vec![f32::NAN; dh * ld];
            // SAFETY: AVX2 present (Isa::best); sizes as allocated.
            unsafe { transpose(&mut dst, ld, src.as_ptr(), rs, n, dh) };
            for p in 0..dh {
                for j in 0..ld {
                    let want = if j < n { src[j * rs + p] } else { 0.0 };
                    assert_eq!(dst[p * ld + j], want, "n {n} dh {dh}: ({p}, {j})");
                }
            }
        }
    }

    /// The softmax's `exp` on every width against libm over the range a softmax feeds it
    /// (x <= 0), with `-inf` and anything below -87 exactly 0.
    #[test]
    fn exp_matches_libm_where_softmax_uses_it() {
        let Some(best) = Isa::best() else { return };
        let isas: &[Isa] = if best == Isa::Avx512 {
            &[Isa::Avx2, Isa::Avx512]
        } else {
            &[Isa::Avx2]
        };
        let mut xs: Vec<f32> = (0..4096).map(|i| -(i as f32) * 0.0213).collect();
        xs.extend([f32::NEG_INFINITY, -87.5, -100.0, -1e30, 0.0, -0.0, 1e-7]);
        xs.resize(xs.len().div_ceil(16) * 16, -1.0);
        for &isa in isas {
            // lse 0, dp 1, di 0: `p` becomes exp(p) and `dp` the same.
            let (mut p, mut dp) = (xs.clone(), vec![1.0f32; xs.len()]);
            // SAFETY: isa is supported.
            unsafe { softmax_grad_row(isa, &mut p, &mut dp, 0.0, 0.0) };
            for ((&x, &e), &g) in xs.iter().zip(&p).zip(&dp) {
                assert_eq!(e, g, "{isa:?}: dp at {x}");
                if x < -87.0 {
                    assert_eq!(e, 0.0, "{isa:?}: exp({x})");
                } else {
                    let want = (x as f64).exp();
                    assert!(((e as f64) - want).abs() <= 4e-7 * want, "{isa:?}: exp({x}) = {e}, libm {want}");
                }
            }
        }
    }

    /// GELU and its derivative on every width against the f64 definition (`ops::gelu`), with
    /// and without a bias, at lengths off the lanes (a masked last vector, which must leave
    /// the elements past it alone), over the clamp of `erf` and past it.
    #[test]
    fn gelu_matches_the_f64_definition() {
        use crate::ops::gelu::cpu::{gelu, gelu_grad};
        let Some(best) = Isa::best() else { return };
        let isas: &[Isa] = if best == Isa::Avx512 {
            &[Isa::Avx2, Isa::Avx512]
        } else {
            &[Isa::Avx2]
        };
        for &isa in isas {
            for len in [1usize, 7, 16, 37, 1000] {
                let xs: Vec<f32> = (0..len).map(|i| ((i * 7919) % 1201) as f32 / 100.0 - 6.0).collect();
                let bs: Vec<f32> = (0..len).map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0).collect();
                let d0: Vec<f32> = (0..len + 3).map(|i| 1.0 - (i % 5) as f32 * 0.3).collect();
                for bias in [None, Some(&bs[..])] {
                    let mut y = vec![f32::NAN; len + 3];
                    let mut d = d0.clone();
                    // SAFETY: isa is supported.
                    unsafe {
                        gelu_map(isa, &xs, bias, &mut y[..len], false);
                        gelu_map(isa, &xs, bias, &mut d[..len], true);
                    }
                    for (i, &x) in xs.iter().enumerate() {
                        let h = x as f64 + bias.map_or(0.0, |b| b[i] as f64);
                        let (want_y, want_d) = (gelu(h), d0[i] as f64 * gelu_grad(h));
                        let tol = |w: f64| 1e-6 * (1.0 + w.abs());
                        let what = format!("{isa:?} len {len} bias {}: at {h}", bias.is_some());
                        assert!(
                            ((y[i] as f64) - want_y).abs() <= tol(want_y),
                            "{what}: gelu {}, want {want_y}",
                            y[i]
                        );
                        assert!(
                            ((d[i] as f64) - want_d).abs() <= tol(want_d),
                            "{what}: d gelu' {}, want {want_d}",
                            d[i]
                        );
                    }
                    assert!(y[len..].iter().all(|v| v.is_nan()), "{isa:?} len {len}: wrote past the end");
                    assert_eq!(d[len..], d0[len..], "{isa:?} len {len}: wrote past the end");
                }
            }
        }
    }

    /// The dot product against the definition at both widths, with and without a partial
    /// last vector.
    #[test]
    fn dot_matches_the_definition() {
        let Some(best) = Isa::best() else { return };
        let isas: &[Isa] = if best == Isa::Avx512 {
            &[Isa::Avx2, Isa::Avx512]
        } else {
            &[Isa::Avx2]
        };
        for len in [0, 3, 8, 24, 96, 101] {
            let a: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..len).map(|i| (i as f32 * 0.11).cos()).collect();
            let want: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            for &isa in isas {
                // SAFETY: isa is supported.
                let got = unsafe { dot(isa, &a, &b) };
                assert!((got as f64 - want).abs() <= 1e-5, "{isa:?} length {len}: {got} vs {want}");
            }
        }
    }
}
