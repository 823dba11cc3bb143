//! CPU reference of the exact GELU, elementwise in parallel chunks.

use crate::ops::par::*;
use crate::ops::real::{cast, simd, Real};

const CHUNK: usize = 4096;

/// The constants of GELU in `T`, converted once (not per element: the checked conversion
/// inside a loop keeps it from vectorizing).
#[derive(Clone, Copy)]
struct Consts<T> {
    half: T,
    inv_sqrt2: T,
    inv_sqrt_2pi: T,
}

impl<T: Real> Consts<T> {
    #[inline(always)]
    fn new() -> Self {
        Self {
            half: cast(0.5),
            inv_sqrt2: cast(std::f64::consts::FRAC_1_SQRT_2),
            inv_sqrt_2pi: cast(0.398_942_280_401_432_7),
        }
    }
    #[inline(always)]
    fn gelu(&self, x: T) -> T {
        self.half * x * (T::one() + (x * self.inv_sqrt2).erf())
    }
    #[inline(always)]
    fn grad(&self, x: T) -> T {
        self.half * (T::one() + (x * self.inv_sqrt2).erf()) + x * (-self.half * x * x).fast_exp() * self.inv_sqrt_2pi
    }
}

/// `gelu(x)` for one value.
#[inline]
pub fn gelu<T: Real>(x: T) -> T {
    Consts::new().gelu(x)
}

/// `gelu'(x)` for one value.
#[inline]
pub fn gelu_grad<T: Real>(x: T) -> T {
    Consts::new().grad(x)
}

/// `y[i] = gelu(x[i])` for the first `len` elements.
pub fn forward<T: Real>(x: &[T], y: &mut [T], len: usize) {
    assert!(x.len() >= len && y.len() >= len);
    let c = Consts::<T>::new();
    y[..len].par_chunks_mut(CHUNK).zip(x[..len].par_chunks(CHUNK)).for_each(|(yc, xc)| {
        simd(
            #[inline(always)]
            || {
                for (o, &v) in yc.iter_mut().zip(xc) {
                    *o = c.gelu(v);
                }
            },
        )
    });
}

/// In place: `d[i] *= gelu'(x[i])` (turns dL/dgelu into dL/dx).
pub fn backward<T: Real>(x: &[T], d: &mut [T], len: usize) {
    assert!(x.len() >= len && d.len() >= len);
    let c = Consts::<T>::new();
    d[..len].par_chunks_mut(CHUNK).zip(x[..len].par_chunks(CHUNK)).for_each(|(dc, xc)| {
        simd(
            #[inline(always)]
            || {
                for (o, &v) in dc.iter_mut().zip(xc) {
                    *o = *o * c.grad(v);
                }
            },
        )
    });
}
