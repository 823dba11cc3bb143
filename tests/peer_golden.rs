//! The whole model against the PyTorch peer (tools/peer/mlvpt_torch.py: timm's own
//! VisionTransformer with prompts and the prompt mask passed to timm's blocks, the head and ASL
//! written from the model's definition (docs/MODEL.md, from #deep-visual-prompts to
//! #the-asymmetric-loss), float64 autograd). Each case in tests/data/peer_golden/ is a backbone
//! saved by timm (read here by `load_timm`) and a golden file with the trainable tensors (mlvpt's
//! names), images, targets, and the peer's logits, loss and gradient of every trainable tensor.
//! Inputs are float32 values, so both sides compute from the same numbers.
//!
//! Checks, per tensor, `max |ours - peer| <= tol * max(max |peer|, 1e-12)`:
//! - CpuBackend<f32>: logits, loss and every gradient at tol 1e-4 (the target);
//! - CpuBackend<f64>: loss and every gradient at tol 1e-9 (the same function to rounding), logits
//!   at 1e-6 (they come back through f32).
//!
//! Regenerate (tools/peer/README.md): /work/venv-torch/bin/python tools/peer/export_goldens.py
#![cfg(feature = "train")]

use std::collections::HashMap;
use std::path::PathBuf;

use mlvpt::backend::{AslConfig, Backend, CpuBackend};
use mlvpt::model::timm::load_timm;
use mlvpt::model::{Backbone, ModelConfig, NamedTensor, Params};
use mlvpt::ops::real::Real;
use mlvpt::train::{AdamWConfig, Trainer};
use safetensors::tensor::{Dtype, SafeTensors};

const DIR: &str = "tests/data/peer_golden";

/// The cases the exporter writes; a golden file not listed here is an error (none is skipped).
const CASES: [&str; 4] = [
    "mlvpt_deep_label_two_branches_layerscale",
    "mlvpt_shallow_group_e3_one_branch_no_final_norm_exact_asl",
    "mlvpt_deep_label_one_expert_two_branches",
    "vpt_deep",
];

struct Golden {
    name: String,
    cfg: ModelConfig,
    backbone: Backbone,
    branches: Vec<Vec<usize>>,
    asl: AslConfig,
    tensors: HashMap<String, (Vec<usize>, Vec<f64>)>,
}

fn values(name: &str, dtype: Dtype, b: &[u8]) -> Vec<f64> {
    match dtype {
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        Dtype::F64 => b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect(),
        d => panic!("{name}: dtype {d:?}, expected F32 or F64"),
    }
}

impl Golden {
    fn load(name: &str) -> Self {
        let file = PathBuf::from(DIR).join(format!("{name}.golden.safetensors"));
        let bytes = std::fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let meta = header.metadata().clone().expect("golden file has no metadata");
        let json = |key: &str| -> serde_json::Value {
            serde_json::from_str(meta.get(key).unwrap_or_else(|| panic!("{name}: no metadata {key}"))).unwrap()
        };
        let heads: usize = meta["heads"].parse().unwrap();
        let (backbone, info) = load_timm(&PathBuf::from(DIR).join(format!("{name}.timm.safetensors")), Some(heads), None).unwrap();
        assert!(info.ignored.is_empty() && !info.resampled, "{name}: {info:?}");
        let mut cfg = json("config");
        cfg["vit"] = serde_json::to_value(backbone.config()).unwrap();
        let cfg: ModelConfig = serde_json::from_value(cfg).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let tensors = st
            .tensors()
            .into_iter()
            .map(|(k, v)| {
                let data = values(&k, v.dtype(), v.data());
                (k, (v.shape().to_vec(), data))
            })
            .collect();
        Golden {
            name: name.into(),
            cfg,
            backbone,
            branches: serde_json::from_value(json("branches")).unwrap(),
            asl: serde_json::from_value(json("asl")).unwrap(),
            tensors,
        }
    }

    fn get(&self, key: &str) -> &(Vec<usize>, Vec<f64>) {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("{}: golden has no tensor {key}", self.name))
    }

    fn f32s(&self, key: &str) -> Vec<f32> {
        self.get(key).1.iter().map(|&v| v as f32).collect()
    }

    fn trainer<T: Real>(&self) -> Trainer<CpuBackend<T>>
    where
        CpuBackend<T>: Backend,
    {
        let specs = mlvpt::model::params::param_specs(&self.cfg, self.branches.len().max(1));
        let params = Params {
            tensors: specs
                .iter()
                .map(|(n, shape)| {
                    let key = format!("param.{n}");
                    assert_eq!(&self.get(&key).0, shape, "{}: {key} shape", self.name);
                    NamedTensor {
                        name: n.clone(),
                        shape: shape.clone(),
                        data: self.f32s(&key),
                    }
                })
                .collect(),
        };
        let golden_params = self.tensors.keys().filter(|k| k.starts_with("param.")).count();
        assert_eq!(
            golden_params,
            specs.len(),
            "{}: golden has other trainable tensors than mlvpt",
            self.name
        );
        let batch = self.get("targets").0[0];
        Trainer::new(
            CpuBackend::<T>::new(),
            self.cfg.clone(),
            &self.backbone,
            params,
            self.branches.clone(),
            self.asl,
            AdamWConfig::default(),
            batch,
        )
        .unwrap()
    }
}

/// `max |got - want| / max(max |want|, 1e-12)`, asserted `<= tol`; returns the ratio.
fn check(what: &str, got: &[f64], want: &[f64], tol: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: {} values, peer has {}", got.len(), want.len());
    let scale = want.iter().fold(0f64, |m, w| m.max(w.abs())).max(1e-12);
    let (i, err) = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .enumerate()
        .fold((0, 0f64), |(bi, be), (i, e)| if e > be || e.is_nan() { (i, e) } else { (bi, be) });
    let ratio = err / scale;
    assert!(
        ratio <= tol,
        "{what}: max |ours - peer| = {err:e} at {i} ({} vs {}), {ratio:e} of max |peer| = {scale:e}, tolerance {tol:e}",
        got[i],
        want[i]
    );
    ratio
}

fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

#[test]
fn golden_files_are_the_listed_cases() {
    let mut found: Vec<String> = std::fs::read_dir(DIR)
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().into_string().ok())
        .filter_map(|f| f.strip_suffix(".golden.safetensors").map(String::from))
        .collect();
    found.sort();
    let mut listed: Vec<String> = CASES.iter().map(|s| s.to_string()).collect();
    listed.sort();
    assert_eq!(found, listed);
}

#[test]
fn cpu_f32_matches_the_pytorch_peer() {
    for name in CASES {
        let g = Golden::load(name);
        let mut tr = g.trainer::<f32>();
        let images = g.f32s("images");
        let targets = g.f32s("targets");
        let mut worst = check(
            &format!("{name}: logits"),
            &widen(&tr.predict(&images).unwrap()),
            &g.get("logits").1,
            1e-4,
        );
        let (loss, grads) = tr.loss_and_grads(&images, &targets).unwrap();
        worst = worst.max(check(&format!("{name}: loss"), &[loss as f64], &g.get("loss").1, 1e-4));
        for t in &grads.tensors {
            let (shape, want) = g.get(&format!("grad.{}", t.name));
            assert_eq!(shape, &t.shape, "{name}: grad.{} shape", t.name);
            worst = worst.max(check(&format!("{name}: grad of {}", t.name), &widen(&t.data), want, 1e-4));
        }
        eprintln!("{name}: f32 worst relative error {worst:.2e}");
    }
}

#[test]
fn cpu_f64_matches_the_pytorch_peer() {
    for name in CASES {
        let g = Golden::load(name);
        let mut tr = g.trainer::<f64>();
        let images = g.f32s("images");
        let targets = g.f32s("targets");
        check(
            &format!("{name}: logits"),
            &widen(&tr.predict(&images).unwrap()),
            &g.get("logits").1,
            1e-6,
        );
        let (loss, grads) = tr.loss_and_grads_f64(&images, &targets).unwrap();
        let mut worst = check(&format!("{name}: loss"), &[loss], &g.get("loss").1, 1e-9);
        for ((pname, shape), got) in tr.param_specs().iter().zip(&grads) {
            let (gshape, want) = g.get(&format!("grad.{pname}"));
            assert_eq!(gshape, shape, "{name}: grad.{pname} shape");
            worst = worst.max(check(&format!("{name}: grad of {pname}"), got, want, 1e-9));
        }
        eprintln!("{name}: f64 worst relative error {worst:.2e}");
    }
}
