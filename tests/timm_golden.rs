//! Our backbone against timm itself: a tiny ViT built, saved (safetensors, timm's names, with
//! its classifier head) and run by timm 1.0 (tools/peer/timm_golden.py, float64, timm's own
//! Block modules on [CLS, prompts, patches] with the prompt mask), loaded here by
//! `load_timm` and run by the CPU backend. Also timm's `resample_abs_pos_embed` (antialiased bicubic) to 24 and 8 px.
//!
//! Regenerate: /work/venv-torch/bin/python tools/peer/timm_golden.py tests/data/timm_tiny
#![cfg(feature = "train")]

use std::path::Path;

use mlvpt::backend::{AslConfig, CpuBackend};
use mlvpt::model::timm::load_timm;
use mlvpt::model::{GateMode, Method, ModelConfig, Params, PromptDepth};
use mlvpt::train::{AdamWConfig, Trainer};

fn golden() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string("tests/data/timm_tiny/timm_tiny.json").unwrap()).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn close(name: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let scale = want.iter().fold(0f64, |m, w| m.max(w.abs()));
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= tol * scale.max(1.0),
            "{name}[{i}]: {g} vs timm {w} (scale {scale})"
        );
    }
}

#[test]
fn forward_matches_timm_on_a_timm_saved_checkpoint() {
    let g = golden();
    let file = Path::new("tests/data/timm_tiny/timm_tiny.safetensors");
    let (bb, info) = load_timm(file, Some(2), None).unwrap();
    let vit = bb.config().clone();
    assert_eq!((vit.image_size, vit.patch, vit.dim, vit.depth, vit.mlp_dim), (16, 4, 16, 2, 32));
    assert!(vit.layer_scale && vit.final_norm);
    assert!(info.ignored.iter().any(|s| s.starts_with("head.weight")), "{:?}", info.ignored);

    let cfg = ModelConfig {
        vit,
        labels: 5,
        groups: 1,
        experts: 1,
        adapter_rank: 1,
        gate: GateMode::Label,
        method: Method::Vpt,
        prompt_depth: PromptDepth::Shallow,
        vpt_prompts: 3,
        loss_scale: 1.0,
    };
    let mut params = Params::init(&cfg, 1, 0);
    let prompts = floats(&g["prompts"]);
    let t = params.tensors.iter_mut().find(|t| t.name == "prompts").unwrap();
    assert_eq!(t.data.len(), prompts.len());
    t.data = prompts.iter().map(|&v| v as f32).collect();
    let mut tr = Trainer::new(
        CpuBackend::<f32>::new(),
        cfg,
        &bb,
        params,
        Vec::new(),
        AslConfig::default(),
        AdamWConfig::default(),
        2,
    )
    .unwrap();
    let images: Vec<f32> = floats(&g["images"]).iter().map(|&v| v as f32).collect();
    let states = tr.hidden_states(&images).unwrap();
    close("block 0 output", &states[0], &floats(&g["block0"]), 2e-5);
    close("block 1 output at the prompts", &states[1], &floats(&g["block1_prompt_rows"]), 2e-5);
}

#[test]
fn position_embedding_resampling_matches_timm() {
    for (size, key) in [(24, "pos_embed_24"), (8, "pos_embed_8")] {
        let (bb, info) = load_timm(Path::new("tests/data/timm_tiny/timm_tiny.safetensors"), Some(2), Some(size)).unwrap();
        assert!(info.resampled);
        close(key, &bb.get("pos_embed").unwrap().data, &floats(&golden()[key]), 1e-6);
    }
}
