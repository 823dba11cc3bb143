//! CPU reference of the exact GELU, elementwise in parallel chunks. In f32 on AVX2 or AVX-512
//! the chunks run `ops::simd32::gelu_map` (the same function with fused multiply-adds: a few
//! ulp apart).

use crate::ops::par::*;
#[cfg(feature = "fast-cpu")]
use crate::ops::real::{as_f32, as_f32_mut};
use crate::ops::real::{cast, simd, Real};
#[cfg(feature = "fast-cpu")]
use crate::ops::simd32::{self, Isa};

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
    if f32_map(x, y, len, false) {
        return;
    }
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
    if f32_map(x, d, len, true) {
        return;
    }
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

/// The f32 vector path of [`forward`] (`grad` false) and [`backward`] (`grad` true), where it
/// applies (f32 on AVX2 or AVX-512): true when it ran.
fn f32_map<T: Real>(x: &[T], y: &mut [T], len: usize, grad: bool) -> bool {
    #[cfg(feature = "fast-cpu")]
    if let (Some(x), Some(y), Some(isa)) = (as_f32(&x[..len]), as_f32_mut(&mut y[..len]), Isa::best()) {
        y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(yc, xc)| {
            // SAFETY: `Isa::best` is supported by this CPU.
            unsafe { simd32::gelu_map(isa, xc, yc, grad) }
        });
        return true;
    }
    let _ = (x, y, len, grad);
    false
}
