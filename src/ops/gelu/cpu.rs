//! CPU reference of the exact GELU, elementwise in parallel chunks.

use crate::ops::real::{cast, Real};
use rayon::prelude::*;

const CHUNK: usize = 4096;

/// `gelu(x)` for one value.
#[inline]
pub fn gelu<T: Real>(x: T) -> T {
    let half: T = cast(0.5);
    let inv_sqrt2: T = cast(std::f64::consts::FRAC_1_SQRT_2);
    half * x * (T::one() + (x * inv_sqrt2).erf())
}

/// `gelu'(x)` for one value.
#[inline]
pub fn gelu_grad<T: Real>(x: T) -> T {
    let half: T = cast(0.5);
    let inv_sqrt2: T = cast(std::f64::consts::FRAC_1_SQRT_2);
    let inv_sqrt_2pi: T = cast(0.398_942_280_401_432_7);
    half * (T::one() + (x * inv_sqrt2).erf()) + x * (-half * x * x).fast_exp() * inv_sqrt_2pi
}

/// `y[i] = gelu(x[i])` for the first `len` elements.
pub fn forward<T: Real>(x: &[T], y: &mut [T], len: usize) {
    assert!(x.len() >= len && y.len() >= len);
    y[..len].par_chunks_mut(CHUNK).zip(x[..len].par_chunks(CHUNK)).for_each(|(yc, xc)| {
        for (o, &v) in yc.iter_mut().zip(xc) {
            *o = gelu(v);
        }
    });
}

/// In place: `d[i] *= gelu'(x[i])` (turns dL/dgelu into dL/dx).
pub fn backward<T: Real>(x: &[T], d: &mut [T], len: usize) {
    assert!(x.len() >= len && d.len() >= len);
    d[..len].par_chunks_mut(CHUNK).zip(x[..len].par_chunks(CHUNK)).for_each(|(dc, xc)| {
        for (o, &v) in dc.iter_mut().zip(xc) {
            *o = *o * gelu_grad(v);
        }
    });
}
