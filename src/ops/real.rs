//! The float type the CPU reference is generic over: f32 for training, f64 for the
//! finite-difference checks. `num_traits::Float` has no `erf`, which the exact GELU needs.

use num_traits::Float;
use std::fmt::Debug;

/// A float the CPU ops run in (f32 or f64).
///
/// f64 (the gradient-check precision) uses libm's `erf` and `std`'s `exp`. f32 (training) uses
/// branch-free versions accurate to a few ulp that the compiler vectorizes inside loops; the
/// tests bound their error against libm.
pub trait Real: Float + Send + Sync + Debug + Default + std::iter::Sum + 'static {
    /// The error function.
    fn erf(self) -> Self;
    /// `exp`, with `exp(-inf) = 0` exactly (masked softmax entries).
    fn fast_exp(self) -> Self;
}

impl Real for f32 {
    #[inline(always)]
    fn erf(self) -> f32 {
        erf_f32(self)
    }
    #[inline(always)]
    fn fast_exp(self) -> f32 {
        exp_f32(self)
    }
}

impl Real for f64 {
    #[inline]
    fn erf(self) -> f64 {
        libm::erf(self)
    }
    #[inline]
    fn fast_exp(self) -> f64 {
        self.exp()
    }
}

/// Coefficients of [`erf_f32`]'s numerator in `x^2`, highest degree first (times `x`).
pub(crate) const ERF_P: [f32; 7] = [
    -2.726_142_3e-10,
    2.770_681_4e-8,
    -2.101_024e-6,
    -5.692_506_5e-5,
    -7.349_906_3e-4,
    -2.954_600_1e-3,
    -1.609_603_3e-2,
];
/// Coefficients of [`erf_f32`]'s denominator in `x^2`, highest degree first.
pub(crate) const ERF_Q: [f32; 5] = [-1.456_607_2e-5, -2.133_740_6e-4, -1.682_827e-3, -7.373_329e-3, -1.426_474e-2];

/// erf in f32: the rational approximation Eigen and XLA use (odd degree-13 numerator over
/// even degree-8 denominator on [-4, 4], where erf is +-1 in f32 beyond).
#[inline(always)]
pub fn erf_f32(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    // Loops rather than folds: a closure the inliner leaves out is compiled for the baseline.
    let (mut p, mut q) = (ERF_P[0], ERF_Q[0]);
    for c in &ERF_P[1..] {
        p = p * x2 + c;
    }
    for c in &ERF_Q[1..] {
        q = q * x2 + c;
    }
    p * x / q
}

/// `ln 2` split in two for [`exp_f32`]'s reduction (`LN2_HI` exact in few bits).
pub(crate) const LN2_HI: f32 = 0.693_359_4;
pub(crate) const LN2_LO: f32 = -2.121_944_4e-4;
/// `1.5 * 2^23`: adding it rounds to an integer held in the low mantissa bits.
pub(crate) const ROUND: f32 = 12_582_912.0;
/// Cephes' polynomial of [`exp_f32`] on the reduced argument, highest degree first.
pub(crate) const EXP_P: [f32; 6] = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5];

/// exp in f32 (Cephes' polynomial after reduction by ln 2; round to nearest by the 1.5 * 2^23
/// trick so no rounding instruction is needed). Inputs below -87 give 0.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    let xc = x.clamp(-87.0, 88.5);
    // t = ROUND + n exactly, so n sits in the low mantissa bits of t (no float-to-int cast,
    // which would keep the loop from vectorizing).
    let t = xc * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = EXP_P[0];
    for c in &EXP_P[1..] {
        p = p * r + c;
    }
    let e = p * r * r + r + 1.0;
    let scale = f32::from_bits((t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127)) << 23);
    // Zero below the range by a bit mask rather than a branch (keeps the loop vectorized).
    let keep = ((x >= -87.0) as u32).wrapping_neg();
    f32::from_bits((e * scale).to_bits() & keep)
}

/// `x` as an f32 slice when `T` is f32 (the f32 fast paths of the CPU ops).
#[cfg(feature = "fast-cpu")]
pub(crate) fn as_f32<T: Real>(x: &[T]) -> Option<&[f32]> {
    use std::any::TypeId;
    // SAFETY: T is f32 (same type, same layout).
    (TypeId::of::<T>() == TypeId::of::<f32>()).then(|| unsafe { std::slice::from_raw_parts(x.as_ptr().cast(), x.len()) })
}

/// `x` as a mutable f32 slice when `T` is f32.
#[cfg(feature = "fast-cpu")]
pub(crate) fn as_f32_mut<T: Real>(x: &mut [T]) -> Option<&mut [f32]> {
    use std::any::TypeId;
    // SAFETY: T is f32 (same type, same layout).
    (TypeId::of::<T>() == TypeId::of::<f32>()).then(|| unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast(), x.len()) })
}

/// `K` sums over `j` of `f([rows[0][j], rows[1][j], ..])[k]` (the rows of equal length), in a
/// fixed order that vectorizes: eight running sums per `k` (element `j` into sum `j mod 8`),
/// then a fixed tree (`s + s[4..]`, `+ s[2..]`, `+ s[1]`). One running sum in `j` order is a
/// chain of dependent adds the compiler may not reorder (no fast-math); this order is as
/// fixed, so results still do not depend on the threads.
#[inline(always)]
// Indexed loops: the zipped form clippy suggests vectorizes worse for two sums (K = 2).
#[allow(clippy::needless_range_loop)]
pub(crate) fn lane_sums<T: Real, const M: usize, const K: usize>(rows: [&[T]; M], f: impl Fn([T; M]) -> [T; K]) -> [T; K] {
    let n = rows.first().map_or(0, |r| r.len());
    assert!(rows.iter().all(|r| r.len() == n));
    // Blocks of eight as arrays, so each step is eight independent adds the compiler turns
    // into vector ones.
    let blocks = rows.map(|r| r.as_chunks::<8>());
    let mut acc = [[T::zero(); 8]; K];
    for i in 0..n / 8 {
        let vals: [&[T; 8]; M] = std::array::from_fn(|m| &blocks[m].0[i]);
        for l in 0..8 {
            let v = f(std::array::from_fn(|m| vals[m][l]));
            for k in 0..K {
                acc[k][l] = acc[k][l] + v[k];
            }
        }
    }
    for l in 0..n % 8 {
        let v = f(std::array::from_fn(|m| blocks[m].1[l]));
        for k in 0..K {
            acc[k][l] = acc[k][l] + v[k];
        }
    }
    acc.map(|a| {
        let b: [T; 4] = std::array::from_fn(|l| a[l] + a[l + 4]);
        (b[0] + b[2]) + (b[1] + b[3])
    })
}

/// `x` as `T` (every f64 is representable, possibly rounded).
#[inline]
pub fn cast<T: Real>(x: f64) -> T {
    T::from(x).expect("f64 converts to any Real")
}

/// Runs `f` compiled for AVX2 + FMA when the CPU has them, so the elementwise loops inside
/// vectorize 8 wide (the crate is built for baseline x86-64, i.e. SSE2); elsewhere runs `f`.
/// Only code inlined into `f` benefits, so callers mark the closure `#[inline(always)]`: a
/// closure the inliner leaves out of line is its own function, compiled for the baseline (SSE2,
/// 4 lanes, no FMA). Results are the same either way (no fast-math: the compiler may not
/// reorder or contract float operations).
#[inline(always)]
pub(crate) fn simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            // SAFETY: the features were detected at run time.
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// A raw pointer that rayon tasks may share; each task writes a disjoint region.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr<T>(pub *mut T);
// SAFETY: users guarantee that concurrent tasks touch disjoint elements.
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    /// The pointer (a method, so closures capture the whole Send/Sync wrapper).
    #[inline]
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::lane_sums;

    /// `lane_sums` adds in exactly the order its doc gives (bit for bit, in f32 where order
    /// shows), at lengths below, at and off multiples of eight, for two sums over two rows.
    #[test]
    fn lane_sums_add_in_the_documented_order() {
        for n in [0usize, 1, 5, 8, 13, 64, 101] {
            let a: Vec<f32> = (0..n).map(|i| ((i * 7919) % 101) as f32 * 0.37 - 17.0).collect();
            let b: Vec<f32> = (0..n).map(|i| 1.0 / (1.0 + i as f32)).collect();
            let got = lane_sums([&a[..], &b[..]], |[x, y]| [x * y, x + y]);
            let mut want = [[0.0f32; 8]; 2];
            for j in 0..n {
                want[0][j % 8] += a[j] * b[j];
                want[1][j % 8] += a[j] + b[j];
            }
            let want = want.map(|s| {
                let t: [f32; 4] = std::array::from_fn(|l| s[l] + s[l + 4]);
                (t[0] + t[2]) + (t[1] + t[3])
            });
            assert_eq!(got.map(f32::to_bits), want.map(f32::to_bits), "n {n}: {got:?} vs {want:?}");
        }
    }
}
