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
