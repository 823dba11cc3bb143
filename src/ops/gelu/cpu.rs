//! CPU reference of the exact GELU, elementwise in parallel chunks. In f32 on AVX2 or AVX-512
//! the chunks run `ops::simd32::gelu_map` (the same function with fused multiply-adds: a few
//! ulp apart).

use crate::ops::par::*;
#[cfg(feature = "fast-cpu")]
use crate::ops::real::{as_f32, as_f32_mut};
use crate::ops::real::{cast, simd, Real};
#[cfg(feature = "fast-cpu")]
use crate::ops::simd32::{self, Isa};
use crate::ops::Rows;

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

/// `y = gelu(x + b)` over `[rows, dim]` (`b [dim]` broadcast over the rows, or none).
pub fn forward<T: Real>(x: &[T], bias: Option<&[T]>, y: &mut [T], sh: Rows) {
    map(x, bias, y, sh, false);
}

/// In place: `d *= gelu'(x + b)` over `[rows, dim]` (turns dL/dgelu into dL/dx).
pub fn backward<T: Real>(x: &[T], bias: Option<&[T]>, d: &mut [T], sh: Rows) {
    map(x, bias, d, sh, true);
}

/// [`forward`] (`grad` false) or [`backward`] (`grad` true): tasks of about [`CHUNK`]
/// elements, whole rows where there is a bias (so each row lines up with it).
fn map<T: Real>(x: &[T], bias: Option<&[T]>, y: &mut [T], sh: Rows, grad: bool) {
    let Rows { rows, dim } = sh;
    let len = rows * dim;
    assert!(x.len() >= len && y.len() >= len);
    if len == 0 {
        return;
    }
    let bias = bias.map(|b| &b[..dim]);
    let (x, y) = (&x[..len], &mut y[..len]);
    let task = if bias.is_some() { dim * (CHUNK / dim).max(1) } else { CHUNK };
    #[cfg(feature = "fast-cpu")]
    if let (Some(x), Some(y), Some(isa)) = (as_f32(x), as_f32_mut(y), Isa::best()) {
        let bias = bias.map(|b| as_f32(b).expect("T is f32"));
        y.par_chunks_mut(task).zip(x.par_chunks(task)).for_each(|(yc, xc)| match bias {
            // SAFETY (both): `Isa::best` is supported by this CPU.
            None => unsafe { simd32::gelu_map(isa, xc, None, yc, grad) },
            Some(b) => {
                for (yr, xr) in yc.chunks_exact_mut(dim).zip(xc.chunks_exact(dim)) {
                    unsafe { simd32::gelu_map(isa, xr, Some(b), yr, grad) }
                }
            }
        });
        return;
    }
    let c = Consts::<T>::new();
    y.par_chunks_mut(task).zip(x.par_chunks(task)).for_each(|(yc, xc)| {
        simd(
            #[inline(always)]
            || match bias {
                None => {
                    for (o, &v) in yc.iter_mut().zip(xc) {
                        *o = if grad { *o * c.grad(v) } else { c.gelu(v) };
                    }
                }
                Some(b) => {
                    for (yr, xr) in yc.chunks_exact_mut(dim).zip(xc.chunks_exact(dim)) {
                        for ((o, &v), &bj) in yr.iter_mut().zip(xr).zip(b) {
                            let v = v + bj;
                            *o = if grad { *o * c.grad(v) } else { c.gelu(v) };
                        }
                    }
                }
            },
        )
    });
}
