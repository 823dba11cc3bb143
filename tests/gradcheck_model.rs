//! Whole-model gradients against central finite differences in f64 (every trainable tensor;
//! deep and shallow prompts, both gate modes, LayerScale, one and two branches, plain VPT).
#![cfg(feature = "train")]

mod common_model;
use common_model::*;
use mlvpt::backend::AslConfig;
use mlvpt::model::{GateMode, Method, ModelConfig, PromptDepth};

/// Checks up to `per_tensor` entries of every tensor; returns the worst relative error.
fn check(cfg: &ModelConfig, branches: usize, per_tensor: usize) -> f64 {
    let asl = AslConfig {
        exact_grad: true,
        ..AslConfig::default()
    };
    let mut tr = trainer::<f64>(cfg, branches, asl, 2, 7);
    let (images, targets) = images_targets(cfg, 2, 11);
    let base: Vec<Vec<f64>> = tr
        .params()
        .tensors
        .iter()
        .map(|t| t.data.iter().map(|&v| v as f64).collect())
        .collect();
    tr.set_params_f64(&base).unwrap();
    let (_, grads) = tr.loss_and_grads_f64(&images, &targets).unwrap();
    let specs = tr.param_specs().to_vec();
    let h = 1e-5;
    let mut worst: f64 = 0.0;
    for (ti, (name, _)) in specs.iter().enumerate() {
        let n = base[ti].len();
        let step = (n / per_tensor).max(1);
        let gmax = grads[ti].iter().fold(0.0f64, |a, &g| a.max(g.abs()));
        assert!(gmax > 0.0, "{name}: all gradients are zero");
        for i in (0..n).step_by(step) {
            let mut p = base.clone();
            p[ti][i] = base[ti][i] + h;
            tr.set_params_f64(&p).unwrap();
            let (lp, _) = tr.loss_and_grads_f64(&images, &targets).unwrap();
            p[ti][i] = base[ti][i] - h;
            tr.set_params_f64(&p).unwrap();
            let (lm, _) = tr.loss_and_grads_f64(&images, &targets).unwrap();
            let fd = (lp - lm) / (2.0 * h);
            let an = grads[ti][i];
            // Relative to the entry, floored at 1e-3 of the tensor's largest gradient so that
            // entries that are zero up to rounding do not divide by ~0.
            let rel = (an - fd).abs() / an.abs().max(fd.abs()).max(1e-3 * gmax);
            assert!(
                rel <= 1e-6,
                "{name}[{i}]: analytic {an:e}, finite difference {fd:e}, relative error {rel:e}"
            );
            worst = worst.max(rel);
        }
    }
    tr.set_params_f64(&base).unwrap();
    worst
}

#[test]
fn deep_label_gate_two_branches() {
    check(&tiny_config(), 2, 40);
}

#[test]
fn deep_label_gate_one_branch() {
    check(&tiny_config(), 1, 40);
}

#[test]
fn shallow_group_gate() {
    let cfg = ModelConfig {
        prompt_depth: PromptDepth::Shallow,
        gate: GateMode::Group,
        ..tiny_config()
    };
    check(&cfg, 2, 40);
}

#[test]
fn deep_group_gate_layer_scale_no_final_norm() {
    let mut cfg = ModelConfig {
        gate: GateMode::Group,
        ..tiny_config()
    };
    cfg.vit.layer_scale = true;
    cfg.vit.final_norm = false;
    check(&cfg, 2, 40);
}

#[test]
fn layer_scale_label_gate_three_experts() {
    let mut cfg = ModelConfig {
        experts: 3,
        ..tiny_config()
    };
    cfg.vit.layer_scale = true;
    check(&cfg, 2, 30);
}

#[test]
fn plain_vpt_deep_and_shallow() {
    for depth in [PromptDepth::Deep, PromptDepth::Shallow] {
        let cfg = ModelConfig {
            method: Method::Vpt,
            prompt_depth: depth,
            ..tiny_config()
        };
        check(&cfg, 1, 40);
    }
}

#[test]
fn single_block_and_three_blocks() {
    for depth in [1, 3] {
        for pd in [PromptDepth::Deep, PromptDepth::Shallow] {
            let mut cfg = ModelConfig {
                prompt_depth: pd,
                ..tiny_config()
            };
            cfg.vit.depth = depth;
            check(&cfg, 2, 15);
        }
    }
}
