//! The frozen ViT's weights under timm's tensor names (so a timm checkpoint maps one to one).

use super::config::{ConfigError, VitConfig};
use super::params::NamedTensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// LayerScale value of a randomly initialised backbone with `layer_scale` on (timm takes it
/// from the model definition, e.g. 1e-5 for DeiT III; 0.1 keeps the blocks visible in tests).
pub const RANDOM_LAYER_SCALE: f32 = 0.1;

/// Frozen f32 ViT weights with timm names:
/// `cls_token [1,1,D]`, `pos_embed [1,1+Np,D]`, `patch_embed.proj.{weight [D,C,p,p], bias [D]}`,
/// per block `blocks.{i}.norm1.{weight,bias}`, `attn.qkv.{weight [3D,D], bias}`,
/// `attn.proj.{weight [D,D], bias}`, `ls1.gamma [D]`, `norm2.*`, `mlp.fc1.{weight [Dm,D], bias}`,
/// `mlp.fc2.{weight [D,Dm], bias}`, `ls2.gamma`, and `norm.{weight,bias}`.
#[derive(Clone, Debug)]
pub struct Backbone {
    cfg: VitConfig,
    tensors: Vec<NamedTensor>,
}

/// The names and shapes a backbone of `cfg` must have, in a fixed order.
pub fn expected_tensors(cfg: &VitConfig) -> Vec<(String, Vec<usize>)> {
    let (d, dm, np) = (cfg.dim, cfg.mlp_dim, cfg.num_patches());
    let mut v: Vec<(String, Vec<usize>)> = vec![
        ("cls_token".into(), vec![1, 1, d]),
        ("pos_embed".into(), vec![1, 1 + np, d]),
        ("patch_embed.proj.weight".into(), vec![d, cfg.channels, cfg.patch, cfg.patch]),
        ("patch_embed.proj.bias".into(), vec![d]),
    ];
    for i in 0..cfg.depth {
        let p = format!("blocks.{i}.");
        v.push((p.clone() + "norm1.weight", vec![d]));
        v.push((p.clone() + "norm1.bias", vec![d]));
        v.push((p.clone() + "attn.qkv.weight", vec![3 * d, d]));
        v.push((p.clone() + "attn.qkv.bias", vec![3 * d]));
        v.push((p.clone() + "attn.proj.weight", vec![d, d]));
        v.push((p.clone() + "attn.proj.bias", vec![d]));
        if cfg.layer_scale {
            v.push((p.clone() + "ls1.gamma", vec![d]));
        }
        v.push((p.clone() + "norm2.weight", vec![d]));
        v.push((p.clone() + "norm2.bias", vec![d]));
        v.push((p.clone() + "mlp.fc1.weight", vec![dm, d]));
        v.push((p.clone() + "mlp.fc1.bias", vec![dm]));
        v.push((p.clone() + "mlp.fc2.weight", vec![d, dm]));
        v.push((p.clone() + "mlp.fc2.bias", vec![d]));
        if cfg.layer_scale {
            v.push((p.clone() + "ls2.gamma", vec![d]));
        }
    }
    if cfg.final_norm {
        v.push(("norm.weight".into(), vec![d]));
        v.push(("norm.bias".into(), vec![d]));
    }
    v
}

/// A standard normal sample (Box-Muller; rand_distr is not a dependency).
fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Normal(0, std) truncated to two standard deviations (redrawn outside).
fn trunc_normal(rng: &mut ChaCha8Rng, std: f64) -> f32 {
    loop {
        let x = normal(rng);
        if x.abs() <= 2.0 {
            return (x * std) as f32;
        }
    }
}

impl Backbone {
    /// A seeded random backbone, timm-like: weights, tokens and position embeddings
    /// trunc-normal(std 0.02), biases 0, LayerNorm weights 1, LayerScale [`RANDOM_LAYER_SCALE`].
    pub fn random(cfg: &VitConfig, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let tensors = expected_tensors(cfg)
            .into_iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let data: Vec<f32> = if name.ends_with(".gamma") {
                    vec![RANDOM_LAYER_SCALE; n]
                } else if name.starts_with("norm") || name.contains(".norm") {
                    vec![if name.ends_with("weight") { 1.0 } else { 0.0 }; n]
                } else if name.ends_with("bias") {
                    vec![0.0; n]
                } else {
                    (0..n).map(|_| trunc_normal(&mut rng, 0.02)).collect()
                };
                NamedTensor { name, shape, data }
            })
            .collect();
        Self { cfg: cfg.clone(), tensors }
    }

    /// A backbone from named tensors (e.g. a checkpoint); every expected name must be present
    /// with its shape (extra tensors, like a classifier head, are ignored).
    pub fn from_tensors(cfg: &VitConfig, tensors: Vec<NamedTensor>) -> Result<Self, ConfigError> {
        cfg.validate()?;
        let mut out = Vec::new();
        for (name, shape) in expected_tensors(cfg) {
            let t = tensors.iter().find(|t| t.name == name).ok_or_else(|| ConfigError::BackboneTensor {
                name: name.clone(),
                problem: "missing".into(),
            })?;
            if t.shape.iter().product::<usize>() != shape.iter().product::<usize>() || t.data.len() != shape.iter().product::<usize>() {
                return Err(ConfigError::BackboneTensor {
                    name,
                    problem: format!("shape {:?} with {} values, expected {:?}", t.shape, t.data.len(), shape),
                });
            }
            out.push(NamedTensor {
                name,
                shape,
                data: t.data.clone(),
            });
        }
        Ok(Self {
            cfg: cfg.clone(),
            tensors: out,
        })
    }

    pub fn config(&self) -> &VitConfig {
        &self.cfg
    }
    /// All tensors in the order of [`expected_tensors`].
    pub fn tensors(&self) -> &[NamedTensor] {
        &self.tensors
    }
    /// The tensor named `name`.
    pub fn get(&self, name: &str) -> Option<&NamedTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }
    /// Mutable access to one tensor's values (tests, checkpoint surgery); the shape is fixed.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut [f32]> {
        self.tensors.iter_mut().find(|t| t.name == name).map(|t| t.data.as_mut_slice())
    }
}
