//! The whole model against an independent PyTorch implementation (tools/peer/model_golden.py,
//! float64 autograd, timm-style code: conv patch embedding, masked softmax attention, einsum
//! head): logits, loss and the gradient of every trainable tensor, for three variants.
//!
//! Regenerate the golden file after a deliberate change of initialisation or semantics:
//!
//!     MLVPT_GOLDEN_INPUTS=/tmp/golden_in.json cargo test --release --test golden_model -- --ignored
//!     /work/venv-torch/bin/python tools/peer/model_golden.py /tmp/golden_in.json tests/data/model_golden.json

mod common_model;
use common_model::*;
use mlvpt::backend::{AslConfig, CpuBackend};
use mlvpt::model::{Backbone, GateMode, Method, ModelConfig, Params, PromptDepth};
use mlvpt::train::{AdamWConfig, Trainer};
use serde_json::{json, Value};

struct Case {
    name: &'static str,
    cfg: ModelConfig,
    branches: usize,
}

fn cases() -> Vec<Case> {
    let mut a = tiny_config();
    a.vit.layer_scale = true;
    let mut b = ModelConfig {
        prompt_depth: PromptDepth::Shallow,
        gate: GateMode::Group,
        experts: 3,
        ..tiny_config()
    };
    b.vit.final_norm = false;
    let c = ModelConfig {
        method: Method::Vpt,
        ..tiny_config()
    };
    vec![
        Case {
            name: "mlvpt_deep_label_two_branches_layerscale",
            cfg: a,
            branches: 2,
        },
        Case {
            name: "mlvpt_shallow_group_one_branch_no_final_norm",
            cfg: b,
            branches: 1,
        },
        Case {
            name: "vpt_deep",
            cfg: c,
            branches: 1,
        },
    ]
}

struct Inputs {
    backbone: Backbone,
    params: Params,
    tables: Vec<Vec<usize>>,
    images: Vec<f32>,
    targets: Vec<f32>,
}

fn inputs(case: &Case) -> Inputs {
    let backbone = lively_backbone(&case.cfg.vit, 31);
    let params = Params::init(&case.cfg, case.branches, 32);
    let (images, targets) = images_targets(&case.cfg, 3, 33);
    Inputs {
        backbone,
        params,
        tables: tables(case.cfg.labels, case.cfg.groups, case.branches),
        images,
        targets,
    }
}

fn as_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

#[test]
#[ignore = "writes the inputs for tools/peer/model_golden.py"]
fn write_golden_inputs() {
    let path = std::env::var("MLVPT_GOLDEN_INPUTS")
        .unwrap_or_else(|_| "/tmp/mlvpt_golden_inputs.json".into());
    let mut all = Vec::new();
    for case in cases() {
        let inp = inputs(&case);
        let tensors = |ts: &[mlvpt::model::NamedTensor]| -> Value {
            ts.iter()
                .map(|t| {
                    (
                        t.name.clone(),
                        json!({"shape": t.shape, "data": as_f64(&t.data)}),
                    )
                })
                .collect::<serde_json::Map<_, _>>()
                .into()
        };
        all.push(json!({
            "name": case.name,
            "config": case.cfg,
            "branches": inp.tables,
            "backbone": tensors(inp.backbone.tensors()),
            "params": tensors(&inp.params.tensors),
            "images": as_f64(&inp.images),
            "targets": as_f64(&inp.targets),
        }));
    }
    std::fs::write(&path, serde_json::to_string(&all).unwrap()).unwrap();
    eprintln!("wrote {path}");
}

#[test]
fn matches_pytorch_float64() {
    let golden: Value = serde_json::from_str(include_str!("data/model_golden.json")).unwrap();
    for case in cases() {
        let g = &golden[case.name];
        assert!(g.is_object(), "no golden values for {}", case.name);
        let inp = inputs(&case);
        let nums = |v: &Value| -> Vec<f64> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        };
        let mut tr = Trainer::new(
            CpuBackend::<f64>::new(),
            case.cfg.clone(),
            &inp.backbone,
            inp.params.clone(),
            inp.tables.clone(),
            AslConfig::default(),
            AdamWConfig::default(),
            3,
        )
        .unwrap();
        // Logits through the f32 host API would round; compare the f64 loss and gradients, and
        // the logits to f32 precision.
        let logits = tr.predict(&inp.images).unwrap();
        let want = nums(&g["logits"]);
        for (i, (a, b)) in logits.iter().zip(&want).enumerate() {
            assert!(
                (*a as f64 - b).abs() <= 1e-6 * (1.0 + b.abs()),
                "{}: logit {i}: {a} vs PyTorch {b}",
                case.name
            );
        }
        let (loss, grads) = tr.loss_and_grads_f64(&inp.images, &inp.targets).unwrap();
        let wl = g["loss"].as_f64().unwrap();
        assert!(
            (loss - wl).abs() <= 1e-10 * wl.abs(),
            "{}: loss {loss} vs PyTorch {wl}",
            case.name
        );
        for ((name, _), got) in tr.param_specs().iter().zip(&grads) {
            let want = nums(&g["grads"][name.as_str()]);
            assert_eq!(want.len(), got.len(), "{}: {name} length", case.name);
            let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            let err = got
                .iter()
                .zip(&want)
                .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                err <= 1e-9 * scale.max(1e-12),
                "{}: {name}: max |grad - PyTorch| = {err:e} (max |grad| {scale:e})",
                case.name
            );
        }
    }
}
