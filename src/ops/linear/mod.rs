//! Linear map `y = x W^T + b` over rows (PyTorch/timm convention: `W` is `[out, in]`).
//!
//! Shapes: `x [rows, in]`, `W [out, in]`, `b [out]`, `y [rows, out]`, row-major.
//! Backward for frozen layers is the input gradient only: `dX = dY W` (`[rows, in]`).
//! Trainable linear maps (adapters, heads) are small and their weight gradients live in the
//! head op, so this op has no weight-gradient entry.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

/// Sizes of a linear map over rows: `x [rows, d_in]`, `W [d_out, d_in]`, `y [rows, d_out]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearShape {
    pub rows: usize,
    pub d_in: usize,
    pub d_out: usize,
}
