//! The ops the model is computed with (docs/MODEL.md#where-each-part-runs). Each op has a
//! folder: `mod.rs` with shapes and contract, `cpu.rs` with the reference (generic over
//! f32/f64), and later `cuda.rs` with the typed launcher for `kernels/<op>.cu`.

pub mod adamw;
pub mod asl;
pub mod attention;
pub mod augment;
pub mod cast;
pub mod gelu;
pub mod head;
pub mod layernorm;
pub mod linear;
mod par;
pub mod real;
#[cfg(feature = "fast-cpu")]
pub(crate) mod simd32;
pub mod tokens;

/// Declares a named group of one op's buffers, generic over how they are held (owned `T` in a
/// model, `&T` or `&mut T` at a call), with `as_ref`, `as_mut` and `map` (a wrapping backend
/// maps its buffers to the inner one's).
macro_rules! buffers {
    ($(#[$m:meta])* pub struct $name:ident { $($(#[$fm:meta])* $f:ident),* $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct $name<R> { $($(#[$fm])* pub $f: R),* }
        impl<R> $name<R> {
            /// Borrows every buffer.
            pub fn as_ref(&self) -> $name<&R> {
                $name { $($f: &self.$f),* }
            }
            /// Borrows every buffer mutably.
            pub fn as_mut(&mut self) -> $name<&mut R> {
                $name { $($f: &mut self.$f),* }
            }
            /// Applies `f` to every buffer, in declaration order.
            pub fn map<U>(self, mut f: impl FnMut(R) -> U) -> $name<U> {
                $name { $($f: f(self.$f)),* }
            }
        }
    };
}
pub(crate) use buffers;

/// A row-major `[rows, dim]` matrix: the shape of the row-wise ops (residuals, LayerNorm,
/// column scaling).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rows {
    pub rows: usize,
    pub dim: usize,
}

impl Rows {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.rows * self.dim
    }
    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where an op puts a gradient: overwriting the destination, or adding to it (the gradient of
/// a tensor that feeds several paths, such as the residual stream).
#[derive(Debug)]
pub enum Grad<R> {
    Write(R),
    Add(R),
}

impl<R> Grad<R> {
    /// `Add(dst)` when `accumulate`, else `Write(dst)`.
    pub fn new(accumulate: bool, dst: R) -> Self {
        if accumulate {
            Grad::Add(dst)
        } else {
            Grad::Write(dst)
        }
    }
    /// Whether the op adds to the destination.
    pub fn accumulates(&self) -> bool {
        matches!(self, Grad::Add(_))
    }
    /// The destination.
    pub fn into_inner(self) -> R {
        match self {
            Grad::Write(r) | Grad::Add(r) => r,
        }
    }
    /// The same mode with the destination mapped (a wrapping backend's inner buffer).
    pub fn map<U>(self, f: impl FnOnce(R) -> U) -> Grad<U> {
        match self {
            Grad::Write(r) => Grad::Write(f(r)),
            Grad::Add(r) => Grad::Add(f(r)),
        }
    }
}
