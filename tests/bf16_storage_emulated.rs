//! The CUDA backend's bf16 storage ([`Precision::Bf16`]) emulated on the CPU
//! (`common_step::Bf16Emu`): a whole training step with every `Frozen` and `Activation` buffer
//! of `train::step` rounded to bf16 stays close to the fp32 step, on seeded shapes where bf16
//! is well-conditioned. Its distances are the yardstick tests/gpu_backend.rs measures the real
//! backend against. It is a coarse guard on the roles, not a sharp one: putting the residual
//! stream and its gradient in bf16 too raises the worst gradient distance here by only about
//! a quarter (and by ~1.8x on a 10-block model), within these bounds. The demo shape with the
//! test's deliberately large backbone weights (attention logits of tens) is ill-conditioned in
//! bf16 (its prompt gradient moves by ~20%), so it is left to the GPU test's relative yardstick.
//!
//! [`Precision::Bf16`]: mlvpt::backend::Precision::Bf16

mod common_model;
mod common_step;

use common_model::tiny_config;
use common_step::{step_metrics, Bf16Emu};
use mlvpt::model::{Method, ModelConfig, PromptDepth, VitConfig};

fn check(name: &str, cfg: &ModelConfig, branches: usize, batch: usize, grad_bound: f64) {
    let m = step_metrics(Bf16Emu::bf16_storage(), cfg, branches, batch);
    eprintln!("{name}: {m:#?}");
    assert!(m.logits <= 3e-2, "{name}: logits differ by {:.3e} (relative L2) with bf16 storage", m.logits);
    assert!(m.loss <= 2e-2, "{name}: loss differs by {:.3e} (relative) with bf16 storage", m.loss);
    let worst = m.grads.iter().map(|g| g.1).fold(0.0, f64::max);
    for (t, r) in &m.grads {
        assert!(*r <= grad_bound, "{name}: gradient of {t} differs by {r:.3e} (relative L2) with bf16 storage");
    }
    // Not vacuous: the roles did put buffers in bf16.
    assert!(worst > 1e-5, "{name}: bf16 storage changed no gradient ({worst:.1e})");
    for (t, r) in &m.params_apart {
        assert!(*r <= 0.5, "{name}: after 3 AdamW steps {t} is {r:.3} of its movement away from the fp32 run's");
    }
}

#[test]
fn tiny_steps_with_bf16_storage_stay_within_3e_2_of_fp32() {
    check("tiny ml-vpt deep", &tiny_config(), 2, 3, 3e-2);
    let vpt = ModelConfig { method: Method::Vpt, prompt_depth: PromptDepth::Shallow, ..tiny_config() };
    check("tiny vpt shallow", &vpt, 1, 3, 3e-2);
}

#[test]
fn layer_scale_step_with_bf16_storage_stays_within_6e_2_of_fp32() {
    // Head dim 32 and D 64 (the fused-attention shape of tests/gpu_backend.rs): larger
    // activations through LayerScale, 4.6e-2 at most here.
    let vit = VitConfig { image_size: 16, patch: 4, channels: 3, dim: 64, depth: 2, heads: 2, mlp_dim: 128, layer_scale: true, final_norm: true };
    check("head dim 32, layer scale", &ModelConfig { vit, ..tiny_config() }, 2, 4, 6e-2);
}
