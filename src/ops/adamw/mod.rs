//! AdamW with decoupled weight decay and bias correction, over every trainable tensor in one
//! call: for step `t >= 1`,
//! `m = b1 m + (1-b1) g`, `v = b2 v + (1-b2) g^2`, `mhat = m / (1-b1^t)`, `vhat = v / (1-b2^t)`,
//! `p -= lr * (mhat / (sqrt(vhat) + eps) + wd * p)`. Elementwise, so deterministic.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

/// AdamW hyper-parameters; `Default` is the training default (docs/MODEL.md#adamw): (0.9, 0.999),
/// eps 1e-8, weight decay 1e-2.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

impl AdamWConfig {
    /// Betas in [0, 1), eps > 0, weight decay >= 0, all finite.
    pub fn validate(&self) -> Result<(), String> {
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(format!("AdamW {name} must be in [0, 1), got {b}"));
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(format!("AdamW eps must be > 0, got {}", self.eps));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(format!("AdamW weight_decay must be >= 0, got {}", self.weight_decay));
        }
        Ok(())
    }
}

/// The scalars the AdamW kernel (`kernels/adamw.cu`, struct `AdamW`) takes for one step, in its
/// argument order: `1 - lr wd`, `lr / bc1`, `1 / sqrt(bc2)`, beta1, beta2, eps, `1 - beta1`,
/// `1 - beta2`, with `bc_i = 1 - beta_i^step`; computed in f64, then rounded to f32 (in f32,
/// `1 - 0.999` is 1.3e-5 off). Used by the launcher (`cuda.rs`).
pub fn kernel_scalars(step: u64, lr: f64, cfg: &AdamWConfig) -> [f32; 8] {
    let bc1 = 1.0 - cfg.beta1.powf(step as f64);
    let bc2 = 1.0 - cfg.beta2.powf(step as f64);
    [
        (1.0 - lr * cfg.weight_decay) as f32,
        (lr / bc1) as f32,
        (1.0 / bc2.sqrt()) as f32,
        cfg.beta1 as f32,
        cfg.beta2 as f32,
        cfg.eps as f32,
        (1.0 - cfg.beta1) as f32,
        (1.0 - cfg.beta2) as f32,
    ]
}
