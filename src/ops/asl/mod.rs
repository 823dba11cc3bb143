//! Asymmetric loss (ASL, docs/MODEL.md#the-asymmetric-loss), per label, from logits.
//!
//! With p = sigmoid(x) and p_m = max(p - clip, 0):
//! `l = -y (1-p)^g+ L+ - (1-y) p_m^g- L-`, where `L+ = log(clamp(p, min=eps))` and
//! `L- = log(clamp(1 - p_m, min=eps))` as the reference implementation computes them
//! (`1 - p_m = min(1 - p + clip, 1)`). The logs come from the logit (log-sigmoid), never from a
//! rounded p, so large |x| stays finite and accurate.
//!
//! Gradient modes: by default the focusing weights `(1-p)^g+` and `p_m^g-` are constants in the
//! gradient ("disable focal gradient", the reference default); `exact_grad` differentiates them
//! too. Either way a clamped log (value at `log eps`) and the `clip` floor have zero slope.
//!
//! The op sums over all elements; the caller applies the `scale / (B*K)` factor and adds the
//! four terms of the training loss.

mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

pub use cpu::asl_forward_backward;

/// ASL hyper-parameters. `Default` is the seed's setting: g- = 2, g+ = 0, clip 0, eps 1e-5,
/// constant focusing weights in the gradient.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct AslConfig {
    /// Focusing exponent on negatives (g-).
    pub gamma_neg: f64,
    /// Focusing exponent on positives (g+).
    pub gamma_pos: f64,
    /// Probability margin subtracted on negatives: p_m = max(p - clip, 0).
    pub clip: f64,
    /// Lower clamp of the probabilities inside the logs.
    pub eps: f64,
    /// Differentiate the focusing weights too (false: treat them as constants).
    pub exact_grad: bool,
}

impl Default for AslConfig {
    fn default() -> Self {
        Self {
            gamma_neg: 2.0,
            gamma_pos: 0.0,
            clip: 0.0,
            eps: 1e-5,
            exact_grad: false,
        }
    }
}

impl AslConfig {
    /// Checks the ranges the formulas need: gammas finite and >= 0, clip in [0, 1), eps in (0, 1).
    pub fn validate(&self) -> Result<(), String> {
        if !(self.gamma_neg.is_finite() && self.gamma_neg >= 0.0) {
            return Err(format!("ASL gamma_neg must be a finite number >= 0, got {}", self.gamma_neg));
        }
        if !(self.gamma_pos.is_finite() && self.gamma_pos >= 0.0) {
            return Err(format!("ASL gamma_pos must be a finite number >= 0, got {}", self.gamma_pos));
        }
        if !(0.0..1.0).contains(&self.clip) {
            return Err(format!("ASL clip must be in [0, 1), got {}", self.clip));
        }
        if !(self.eps > 0.0 && self.eps < 1.0) {
            return Err(format!("ASL eps must be in (0, 1), got {}", self.eps));
        }
        Ok(())
    }
}
