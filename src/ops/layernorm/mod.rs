//! LayerNorm over the last dimension: `y = (x - mean) * rstd * gamma + beta`,
//! `rstd = 1 / sqrt(var + eps)` with the biased variance (PyTorch), eps 1e-6 in the ViT.
//!
//! Shapes: `x, y [rows, d]`, `gamma, beta [d]`; forward saves `mean, rstd [rows]` for the
//! backward, which computes the input gradient only (the backbone's norms are frozen):
//! `dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`, `g = dy * gamma`.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

/// The ViT's LayerNorm epsilon (timm: `partial(nn.LayerNorm, eps=1e-6)`).
pub const VIT_EPS: f64 = 1e-6;

crate::ops::buffers! {
    /// A LayerNorm's affine parameters, `gamma, beta [D]`.
    pub struct Norm { gamma, beta }
}

crate::ops::buffers! {
    /// What the forward saves for the backward: per-row `mean, rstd [rows]`.
    pub struct NormStats { mean, rstd }
}

/// Sizes and epsilon of a LayerNorm call over `[rows, dim]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerNormShape {
    pub rows: usize,
    pub dim: usize,
    pub eps: f64,
}
