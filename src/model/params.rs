//! The trainable tensors (f32 masters on the host side), by name, in a fixed order.

use super::config::{GateMode, Method, ModelConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// A named f32 tensor, row-major.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Trainable parameters. ML-VPT order: `prompts [Lp, P, D]`, `adapter.w1 [P, r, D]`,
/// `adapter.b1 [P, r]`, `adapter.w2 [P, D, r]`, `adapter.b2 [P, D]`, then per branch `s`:
/// `head{s}.gate [E, K or T, D]`, `head{s}.weight [K, D]`, `head{s}.bias [K]`.
/// VPT order: `prompts [Lp, Pv, D]`, `head.weight [K, D]`, `head.bias [K]`.
/// (`Lp` = depth for deep prompts, 1 for shallow.)
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Params {
    pub tensors: Vec<NamedTensor>,
}

/// Names and shapes of the trainable tensors, in [`Params`] order.
pub fn param_specs(cfg: &ModelConfig, branches: usize) -> Vec<(String, Vec<usize>)> {
    let d = cfg.vit.dim;
    let k = cfg.labels;
    let p = cfg.prompts_per_layer(branches);
    let mut v = vec![("prompts".to_string(), vec![cfg.prompt_layers(), p, d])];
    match cfg.method {
        Method::MlVpt => {
            let r = cfg.adapter_rank;
            v.push(("adapter.w1".into(), vec![p, r, d]));
            v.push(("adapter.b1".into(), vec![p, r]));
            v.push(("adapter.w2".into(), vec![p, d, r]));
            v.push(("adapter.b2".into(), vec![p, d]));
            let rows = match cfg.gate {
                GateMode::Label => k,
                GateMode::Group => cfg.groups,
            };
            for s in 0..branches {
                v.push((format!("head{s}.gate"), vec![cfg.experts, rows, d]));
                v.push((format!("head{s}.weight"), vec![k, d]));
                v.push((format!("head{s}.bias"), vec![k]));
            }
        }
        Method::Vpt => {
            v.push(("head.weight".into(), vec![k, d]));
            v.push(("head.bias".into(), vec![k]));
        }
    }
    v
}

impl Params {
    /// Seeded initialisation: prompts U(-v, v) with v = sqrt(6 / (3 p^2 + D)) (VPT's rule);
    /// adapters as PyTorch's `nn.Linear` default (U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight
    /// and bias); gates, classifier weights and biases U(-1/sqrt(D), 1/sqrt(D)).
    pub fn init(cfg: &ModelConfig, branches: usize, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let d = cfg.vit.dim as f64;
        let pp = (cfg.vit.patch * cfg.vit.patch) as f64;
        let tensors = param_specs(cfg, branches)
            .into_iter()
            .map(|(name, shape)| {
                let bound = match name.as_str() {
                    "prompts" => (6.0 / (3.0 * pp + d)).sqrt(),
                    "adapter.w1" | "adapter.b1" => 1.0 / d.sqrt(),
                    "adapter.w2" | "adapter.b2" => 1.0 / (cfg.adapter_rank as f64).sqrt(),
                    _ => 1.0 / d.sqrt(),
                };
                let n: usize = shape.iter().product();
                let data = (0..n).map(|_| rng.random_range(-bound..bound) as f32).collect();
                NamedTensor { name, shape, data }
            })
            .collect();
        Self { tensors }
    }

    /// The same names and shapes, all zeros.
    pub fn zeros_like(&self) -> Self {
        Self {
            tensors: self
                .tensors
                .iter()
                .map(|t| NamedTensor {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                    data: vec![0.0; t.data.len()],
                })
                .collect(),
        }
    }

    /// The tensor named `name`.
    pub fn get(&self, name: &str) -> Option<&NamedTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Total number of values.
    pub fn num_values(&self) -> usize {
        self.tensors.iter().map(|t| t.data.len()).sum()
    }
}
