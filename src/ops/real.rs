//! The float type the CPU reference is generic over: f32 for training, f64 for the
//! finite-difference checks. `num_traits::Float` has no `erf`, which the exact GELU needs.

use num_traits::Float;
use std::fmt::Debug;

/// A float the CPU ops run in (f32 or f64).
pub trait Real: Float + Send + Sync + Debug + Default + std::iter::Sum + 'static {
    /// The error function (libm: correctly rounded to about one ulp).
    fn erf(self) -> Self;
}

impl Real for f32 {
    #[inline]
    fn erf(self) -> f32 {
        libm::erff(self)
    }
}

impl Real for f64 {
    #[inline]
    fn erf(self) -> f64 {
        libm::erf(self)
    }
}

/// `x` as `T` (every f64 is representable, possibly rounded).
#[inline]
pub fn cast<T: Real>(x: f64) -> T {
    T::from(x).expect("f64 converts to any Real")
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
