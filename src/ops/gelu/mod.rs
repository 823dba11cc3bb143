//! Exact (erf) GELU: `gelu(x) = x/2 (1 + erf(x / sqrt 2))`,
//! `gelu'(x) = (1 + erf(x / sqrt 2))/2 + x exp(-x^2/2) / sqrt(2 pi)`.
//! Elementwise on any shape; the forward's input (the pre-GELU activation) is what the
//! backward needs, so the block saves it.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
