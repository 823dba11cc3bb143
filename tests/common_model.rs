//! Shared fixtures for the model tests (tiny shapes).
#![cfg(feature = "train")]
#![allow(dead_code)]

use mlvpt::backend::{AslConfig, Backend, CpuBackend, Crop};
use mlvpt::model::{Backbone, GateMode, Method, ModelConfig, Params, PromptDepth, VitConfig};
use mlvpt::ops::real::Real;
use mlvpt::train::{AdamWConfig, Trainer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// image 8, patch 4, D 8, 2 heads, 2 layers, MLP 16, K 5, T 2, E 2, r 3.
pub fn tiny_config() -> ModelConfig {
    ModelConfig {
        vit: VitConfig {
            image_size: 8,
            patch: 4,
            channels: 3,
            dim: 8,
            depth: 2,
            heads: 2,
            mlp_dim: 16,
            layer_scale: false,
            final_norm: true,
        },
        labels: 5,
        groups: 2,
        experts: 2,
        adapter_rank: 3,
        gate: GateMode::Label,
        method: Method::MlVpt,
        prompt_depth: PromptDepth::Deep,
        vpt_prompts: 3,
        loss_scale: 1000.0,
    }
}

/// A random backbone with weights large enough (std 0.3) and norms/LayerScale random enough
/// that every path of the block matters in a gradient check.
pub fn lively_backbone(cfg: &VitConfig, seed: u64) -> Backbone {
    let mut bb = Backbone::random(cfg, seed);
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    let names: Vec<String> = bb.tensors().iter().map(|t| t.name.clone()).collect();
    for name in names {
        let data = bb.get_mut(&name).unwrap();
        for v in data.iter_mut() {
            let u: f32 = rng.random_range(-1.0..1.0);
            *v = if name.contains("norm") && name.ends_with("weight") {
                1.0 + 0.3 * u
            } else if name.ends_with(".gamma") {
                0.5 + 0.3 * u
            } else if name.ends_with("bias") {
                0.1 * u
            } else {
                *v * 15.0
            };
        }
    }
    bb
}

/// Label-to-group tables for `branches` branches (each group non-empty).
pub fn tables(k: usize, t: usize, branches: usize) -> Vec<Vec<usize>> {
    (0..branches).map(|s| (0..k).map(|i| (i * (s + 1) + s) % t).collect()).collect()
}

pub fn images_targets(cfg: &ModelConfig, batch: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let images = (0..batch * cfg.vit.image_len()).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let targets = (0..batch * cfg.labels)
        .map(|_| if rng.random_bool(0.4) { 1.0 } else { 0.0 })
        .collect();
    (images, targets)
}

pub fn trainer<T: Real>(cfg: &ModelConfig, branches: usize, asl: AslConfig, max_batch: usize, seed: u64) -> Trainer<CpuBackend<T>>
where
    CpuBackend<T>: Backend,
{
    trainer_on(CpuBackend::<T>::new(), cfg, branches, asl, max_batch, seed)
}

/// [`trainer`] on any backend: the same backbone and parameters for the same seed.
pub fn trainer_on<B: Backend>(be: B, cfg: &ModelConfig, branches: usize, asl: AslConfig, max_batch: usize, seed: u64) -> Trainer<B> {
    let bb = lively_backbone(&cfg.vit, seed);
    let params = Params::init(cfg, branches, seed + 1);
    Trainer::new(
        be,
        cfg.clone(),
        &bb,
        params,
        tables(cfg.labels, cfg.groups, branches),
        asl,
        AdamWConfig::default(),
        max_batch,
    )
    .unwrap()
}

/// A random batch of `b` uint8 crops (awkward sizes, some flipped) and targets for `cfg`.
pub fn random_crops(cfg: &ModelConfig, b: usize, seed: u64) -> (Vec<u8>, Vec<Crop>, Vec<f32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut pixels, mut crops) = (Vec::new(), Vec::new());
    for _ in 0..b {
        let (w, h) = (rng.random_range(1..23u32), rng.random_range(1..19u32));
        crops.push(Crop {
            offset: pixels.len() as u32,
            width: w,
            height: h,
            flip: rng.random_range(0..2),
        });
        pixels.extend((0..3 * w * h).map(|_| rng.random::<u8>()));
    }
    let targets = (0..b * cfg.labels).map(|_| if rng.random_bool(0.4) { 1.0 } else { 0.0 }).collect();
    (pixels, crops, targets)
}
