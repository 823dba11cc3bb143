//! The training step: prompt isolation, f32/f64 agreement, determinism, AdamW against a
//! scalar reference, resuming from optimizer state, and clear errors on bad input.
#![cfg(feature = "train")]

mod common_model;
use common_model::*;
use mlvpt::backend::{AslConfig, CpuBackend};
use mlvpt::backend::{AugmentLayout, AugmentShape, Crop};
use mlvpt::model::{Backbone, ConfigError, Method, ModelConfig, Params, PromptDepth};
use mlvpt::ops::adamw::{cpu as adamw_cpu, AdamWConfig};
use mlvpt::ops::augment;
use mlvpt::train::{Crops, Trainer};

#[test]
fn a_prompt_is_invisible_to_the_other_prompts_of_its_layer() {
    let mut cfg = tiny_config();
    cfg.vit.depth = 3;
    let mut tr = trainer::<f32>(&cfg, 2, AslConfig::default(), 2, 3);
    let (images, _) = images_targets(&cfg, 2, 4);
    let base = tr.hidden_states(&images).unwrap();
    assert_eq!(base.len(), 3);
    assert_eq!(
        base[2].len(),
        2 * cfg.prompts_per_layer(2) * cfg.vit.dim,
        "last block: prompt rows only"
    );
    let (p, d, n) = (cfg.prompts_per_layer(2), cfg.vit.dim, cfg.tokens(2));
    let (layer, j) = (1usize, 2usize);
    let mut params = tr.params();
    // Not a constant shift: LayerNorm would remove it.
    for (i, v) in params.tensors[0].data[(layer * p + j) * d..(layer * p + j + 1) * d]
        .iter_mut()
        .enumerate()
    {
        *v += if i % 2 == 0 { 0.5 } else { -0.3 };
    }
    tr.set_params(&params).unwrap();
    let moved = tr.hidden_states(&images).unwrap();
    assert_eq!(base[0], moved[0], "layer 0 must not depend on layer 1's prompts");
    for b in 0..2 {
        let row = |h: &Vec<f32>, t: usize| h[(b * n + t) * d..(b * n + t + 1) * d].to_vec();
        for other in (0..p).filter(|&o| o != j) {
            let dd = row(&base[layer], 1 + other)
                .iter()
                .zip(row(&moved[layer], 1 + other))
                .fold(0.0f32, |m, (a, c)| m.max((a - c).abs()));
            assert!(dd == 0.0, "prompt {other} saw prompt {j}: {dd}");
        }
        assert_ne!(row(&base[layer], 1 + j), row(&moved[layer], 1 + j));
        for t in std::iter::once(0).chain(1 + p..n) {
            let diff = row(&base[layer], t)
                .iter()
                .zip(row(&moved[layer], t))
                .fold(0.0f32, |m, (a, c)| m.max((a - c).abs()));
            assert!(diff > 1e-6, "token {t} did not see prompt {j}");
        }
    }
    // Same at the last block (its output holds the P prompt rows), perturbing prompt j there.
    let mut params = tr.params();
    for (i, v) in params.tensors[0].data[(2 * p + j) * d..(2 * p + j + 1) * d].iter_mut().enumerate() {
        *v += if i % 3 == 0 { 0.4 } else { -0.2 };
    }
    tr.set_params(&params).unwrap();
    let last = tr.hidden_states(&images).unwrap();
    for b in 0..2 {
        for o in 0..p {
            let (x, y) = (
                &moved[2][(b * p + o) * d..(b * p + o + 1) * d],
                &last[2][(b * p + o) * d..(b * p + o + 1) * d],
            );
            assert_eq!(x == y, o != j, "last block, prompt {o}");
        }
    }
}

#[test]
fn f32_and_f64_forwards_agree() {
    for method in [Method::MlVpt, Method::Vpt] {
        let cfg = ModelConfig { method, ..tiny_config() };
        let mut t32 = trainer::<f32>(&cfg, 2, AslConfig::default(), 3, 5);
        let mut t64 = trainer::<f64>(&cfg, 2, AslConfig::default(), 3, 5);
        let (images, targets) = images_targets(&cfg, 3, 6);
        let (a, b) = (t32.predict(&images).unwrap(), t64.predict(&images).unwrap());
        let scale = b.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        let diff = a.iter().zip(&b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff <= 1e-4 * scale, "{method:?}: f32 and f64 logits differ by {diff}");
        let (l32, g32) = t32.loss_and_grads(&images, &targets).unwrap();
        let (l64, g64) = t64.loss_and_grads_f64(&images, &targets).unwrap();
        assert!(((l32 as f64) - l64).abs() <= 1e-4 * l64.abs(), "loss {l32} vs {l64}");
        for (t, g) in g32.tensors.iter().zip(&g64) {
            let gm = g.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            let diff = t.data.iter().zip(g).fold(0.0f64, |m, (x, y)| m.max((*x as f64 - y).abs()));
            assert!(diff <= 1e-3 * gm, "{}: f32 and f64 gradients differ by {diff} (max {gm})", t.name);
        }
    }
}

fn run_steps(cfg: &ModelConfig, steps: usize) -> (Params, Vec<f32>) {
    let mut tr = trainer::<f32>(cfg, 2, AslConfig::default(), 8, 21);
    let mut losses = Vec::new();
    for s in 0..steps {
        let (images, targets) = images_targets(cfg, 8, 100 + s as u64);
        losses.push(tr.step(&images, &targets, 1e-3).unwrap());
    }
    (tr.params(), losses)
}

#[test]
fn identical_runs_give_bit_identical_parameters() {
    // The demo backbone (wider, so the parallel paths run) with a small batch.
    let cfg = ModelConfig::demo();
    let (p1, l1) = run_steps(&cfg, 3);
    let (p2, l2) = run_steps(&cfg, 3);
    assert_eq!(l1, l2);
    assert_eq!(p1, p2);
}

#[test]
fn step_applies_adamw_to_the_gradients() {
    let cfg = tiny_config();
    let opt = AdamWConfig::default();
    let mut tr = trainer::<f32>(&cfg, 2, AslConfig::default(), 2, 9);
    let (images, targets) = images_targets(&cfg, 2, 10);
    let p0 = tr.params();
    let (_, g) = tr.loss_and_grads(&images, &targets).unwrap();
    let lr = 0.01f32;
    tr.step(&images, &targets, lr).unwrap();
    let p1 = tr.params();
    let (m, v, steps) = tr.optimizer_state();
    assert_eq!(steps, 1);
    for (((a, b), gt), (mt, vt)) in p0
        .tensors
        .iter()
        .zip(&p1.tensors)
        .zip(&g.tensors)
        .zip(m.tensors.iter().zip(&v.tensors))
    {
        for i in 0..a.data.len() {
            let (p, gr) = (a.data[i] as f64, gt.data[i] as f64);
            // step 1: mhat = g, vhat = g^2
            let want = p - lr as f64 * (gr / (gr.abs() + opt.eps) + opt.weight_decay * p);
            assert!((b.data[i] as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()), "{}[{i}]", a.name);
            assert!((mt.data[i] as f64 - 0.1 * gr).abs() <= 1e-6 * (1.0 + gr.abs()));
            assert!((vt.data[i] as f64 - 0.001 * gr * gr).abs() <= 1e-6 * (1.0 + gr * gr));
        }
    }
}

#[test]
fn adamw_matches_a_scalar_reference() {
    let cfg = AdamWConfig {
        beta1: 0.8,
        beta2: 0.95,
        eps: 1e-6,
        weight_decay: 0.05,
    };
    let mut p = vec![0.5f64, -1.5, 2.0, 0.0];
    let (mut m, mut v) = (vec![0.0; 4], vec![0.0; 4]);
    let mut rp = p.clone();
    let (mut rm, mut rv) = (vec![0.0f64; 4], vec![0.0f64; 4]);
    for t in 1..=5u64 {
        let g: Vec<f64> = (0..4).map(|i| ((i as f64 + 1.0) * t as f64).sin()).collect();
        let lr = 0.1 / t as f64;
        adamw_cpu::step(&mut p, &g, &mut m, &mut v, t, lr, &cfg);
        for i in 0..4 {
            rm[i] = cfg.beta1 * rm[i] + (1.0 - cfg.beta1) * g[i];
            rv[i] = cfg.beta2 * rv[i] + (1.0 - cfg.beta2) * g[i] * g[i];
            let mhat = rm[i] / (1.0 - cfg.beta1.powi(t as i32));
            let vhat = rv[i] / (1.0 - cfg.beta2.powi(t as i32));
            rp[i] -= lr * (mhat / (vhat.sqrt() + cfg.eps) + cfg.weight_decay * rp[i]);
        }
        for i in 0..4 {
            assert!((p[i] - rp[i]).abs() < 1e-14 && (m[i] - rm[i]).abs() < 1e-14 && (v[i] - rv[i]).abs() < 1e-14);
        }
    }
}

#[test]
fn resuming_from_optimizer_state_continues_the_same_run() {
    let cfg = tiny_config();
    let data: Vec<_> = (0..4).map(|s| images_targets(&cfg, 2, 50 + s)).collect();
    let mut a = trainer::<f32>(&cfg, 2, AslConfig::default(), 2, 13);
    for (x, y) in &data {
        a.step(x, y, 1e-2).unwrap();
    }
    let mut b = trainer::<f32>(&cfg, 2, AslConfig::default(), 2, 13);
    for (x, y) in &data[..2] {
        b.step(x, y, 1e-2).unwrap();
    }
    let (params, (m, v, n)) = (b.params(), b.optimizer_state());
    let mut c = trainer::<f32>(&cfg, 2, AslConfig::default(), 2, 99);
    c.set_params(&params).unwrap();
    c.set_optimizer_state(&m, &v, n).unwrap();
    // c has a different random backbone (seed 99): rebuild it with b's backbone instead.
    let bb = lively_backbone(&cfg.vit, 13);
    let mut c2 = Trainer::new(
        CpuBackend::<f32>::new(),
        cfg.clone(),
        &bb,
        params,
        tables(5, 2, 2),
        AslConfig::default(),
        AdamWConfig::default(),
        2,
    )
    .unwrap();
    c2.set_optimizer_state(&m, &v, n).unwrap();
    for (x, y) in &data[2..] {
        c2.step(x, y, 1e-2).unwrap();
    }
    assert_eq!(a.params(), c2.params());
    assert_eq!(c.optimizer_state().2, 2);
}

#[test]
fn training_lowers_the_loss_on_a_fixed_batch() {
    for (method, depth) in [(Method::MlVpt, PromptDepth::Deep), (Method::Vpt, PromptDepth::Shallow)] {
        let cfg = ModelConfig {
            method,
            prompt_depth: depth,
            ..tiny_config()
        };
        let mut tr = trainer::<f32>(&cfg, 2, AslConfig::default(), 4, 17);
        let (images, targets) = images_targets(&cfg, 4, 18);
        let first = tr.step(&images, &targets, 1e-2).unwrap();
        let mut last = first;
        for _ in 0..30 {
            last = tr.step(&images, &targets, 1e-2).unwrap();
        }
        assert!(last < 0.7 * first, "{method:?}: loss {first} -> {last}");
    }
}

#[test]
fn bad_configurations_are_clear_errors() {
    let ok = tiny_config();
    assert!(ok.validate(2).is_ok());
    let mut c = ok.clone();
    c.vit.heads = 3;
    assert!(matches!(c.validate(2), Err(ConfigError::HeadsDoNotDivide { dim: 8, heads: 3 })));
    let mut c = ok.clone();
    c.vit.patch = 3;
    assert!(matches!(c.validate(2), Err(ConfigError::PatchDoesNotDivide { .. })));
    let mut c = ok.clone();
    c.vit.depth = 0;
    assert!(matches!(c.validate(2), Err(ConfigError::Zero { .. })));
    let c = ModelConfig { groups: 6, ..ok.clone() };
    let e = c.validate(2).unwrap_err();
    assert!(matches!(e, ConfigError::MoreGroupsThanLabels { groups: 6, labels: 5 }));
    assert!(e.to_string().contains("T = 6") && e.to_string().contains("K = 5"));
    assert!(matches!(
        ModelConfig { groups: 0, ..ok.clone() }.validate(2),
        Err(ConfigError::Zero { .. })
    ));
    assert!(matches!(
        ModelConfig { experts: 0, ..ok.clone() }.validate(2),
        Err(ConfigError::Zero { .. })
    ));
    assert!(matches!(ok.validate(3), Err(ConfigError::Branches(3))));
    assert!(matches!(ok.validate(0), Err(ConfigError::Branches(0))));
    assert!(matches!(
        ModelConfig {
            loss_scale: 0.0,
            ..ok.clone()
        }
        .validate(2),
        Err(ConfigError::LossScale(_))
    ));

    let bb = Backbone::random(&ok.vit, 1);
    let params = Params::init(&ok, 2, 1);
    let new = |cfg: &ModelConfig, bb: &Backbone, params: Params, tables: Vec<Vec<usize>>, max_batch: usize| {
        Trainer::new(
            CpuBackend::<f32>::new(),
            cfg.clone(),
            bb,
            params,
            tables,
            AslConfig::default(),
            AdamWConfig::default(),
            max_batch,
        )
        .err()
        .map(|e| e.to_string())
    };
    let err = new(&ok, &bb, params.clone(), tables(5, 2, 2), 0).unwrap();
    assert!(err.contains("batch size"), "{err}");
    let err = new(&ok, &bb, params.clone(), vec![vec![0; 4], vec![0; 5]], 2).unwrap();
    assert!(err.contains("4 entries"), "{err}");
    let err = new(&ok, &bb, params.clone(), vec![vec![0, 1, 2, 0, 1], vec![0; 5]], 2).unwrap();
    assert!(err.contains("group 2"), "{err}");
    let err = new(&ok, &bb, Params::init(&ok, 1, 1), tables(5, 2, 2), 2).unwrap();
    assert!(err.contains("parameters"), "{err}");
    let mut other = ok.vit.clone();
    other.mlp_dim = 24;
    let err = new(&ok, &Backbone::random(&other, 1), params.clone(), tables(5, 2, 2), 2).unwrap();
    assert!(err.contains("backbone"), "{err}");
}

#[test]
fn wrong_input_lengths_are_errors_not_panics() {
    let cfg = tiny_config();
    let mut tr = trainer::<f32>(&cfg, 2, AslConfig::default(), 2, 1);
    let (images, targets) = images_targets(&cfg, 2, 2);
    assert!(tr.step(&images[1..], &targets, 1e-3).is_err());
    assert!(tr.step(&images, &targets[1..], 1e-3).is_err());
    assert!(tr.step(&images, &targets, f32::NAN).is_err());
    let (big, big_t) = images_targets(&cfg, 3, 2);
    let e = tr.step(&big, &big_t, 1e-3).unwrap_err().to_string();
    assert!(e.contains("max_batch"), "{e}");
    assert!(tr.predict(&[]).is_err());
    assert!(tr.predict(&images[..images.len() / 2]).is_ok());
    let mut p = tr.params();
    p.tensors[0].data.pop();
    assert!(tr.set_params(&p).is_err());
    assert!(tr.set_params_f64(&[vec![0.0; 3]]).is_err());
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let cfg = ModelConfig::demo();
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| run_steps(&cfg, 2))
    };
    let (p1, l1) = run(1);
    let (p3, l3) = run(3);
    assert_eq!(l1, l3);
    assert_eq!(p1, p3);
}

const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// The f32 images `[B, 3, S, S]` the CPU twin of `ops::augment` makes of the crops.
fn twin_images(cfg: &ModelConfig, pixels: &[u8], crops: &[Crop]) -> Vec<f32> {
    let shape = AugmentShape {
        batch: crops.len(),
        size: cfg.vit.image_size,
        layout: AugmentLayout::Images,
        mean: MEAN,
        std: STD,
    };
    let mut out = vec![f32::NAN; shape.out_len()];
    augment::cpu::augment(pixels, crops, &mut out, &shape);
    out
}

#[test]
fn a_staged_step_is_the_step_on_the_augmented_images() {
    let cfg = tiny_config();
    let mut a = trainer::<f32>(&cfg, 2, AslConfig::default(), 3, 5);
    let mut b = trainer::<f32>(&cfg, 2, AslConfig::default(), 3, 5);
    let batches: Vec<_> = (0..3).map(|i| random_crops(&cfg, 3 - i % 2, 40 + i as u64)).collect();
    // Staged one batch ahead, as `mlvpt train --augment-on device` feeds them.
    let mut next = Some(a.stage(batch(&batches[0].1, &batches[0].0)).unwrap());
    for (i, crops) in batches.iter().enumerate() {
        let current = next.take().unwrap();
        assert_eq!(current.len(), crops.1.len());
        if i + 1 < batches.len() {
            next = Some(a.stage(batch(&batches[i + 1].1, &batches[i + 1].0)).unwrap());
        }
        let la = a.step_staged(current, &crops.2, 1e-2).unwrap();
        let lb = b.step(&twin_images(&cfg, &crops.0, &crops.1), &crops.2, 1e-2).unwrap();
        assert_eq!(la, lb, "step {i}");
    }
    assert_eq!(a.params(), b.params());
}

/// The batch with the ImageNet normalization.
fn batch<'a>(crops: &'a [Crop], pixels: &'a [u8]) -> Crops<'a> {
    Crops {
        pixels,
        crops,
        mean: MEAN,
        std: STD,
    }
}

#[test]
fn bad_staged_batches_are_errors_not_panics() {
    let cfg = tiny_config();
    let mut t = trainer::<f32>(&cfg, 2, AslConfig::default(), 2, 5);
    let (pixels, crops, targets) = random_crops(&cfg, 2, 1);
    let err = |r: anyhow::Result<mlvpt::train::Staged>| r.expect_err("an error").to_string();
    assert!(err(t.stage(batch(&[], &pixels))).contains("empty"));
    let (p3, c3, _) = random_crops(&cfg, 3, 2);
    assert!(err(t.stage(batch(&c3, &p3))).contains("exceeds max_batch 2"));
    let mut bad = crops.clone();
    bad[1].offset = pixels.len() as u32 - 2;
    assert!(err(t.stage(batch(&bad, &pixels))).contains("crop 1"));
    bad = crops.clone();
    bad[0].flip = 2;
    assert!(err(t.stage(batch(&bad, &pixels))).contains("flip 2"));
    let zero_std = Crops {
        std: [0.2, 0.0, 0.2],
        ..batch(&crops, &pixels)
    };
    assert!(err(t.stage(zero_std)).contains("std"));
    // Two areas: a third batch waits for a step.
    let s1 = t.stage(batch(&crops, &pixels)).unwrap();
    let s2 = t.stage(batch(&crops, &pixels)).unwrap();
    assert!(err(t.stage(batch(&crops, &pixels))).contains("two staged batches"));
    // Targets must match the staged batch; the area is free again after the failed step.
    let e = t.step_staged(s1, &targets[..cfg.labels], 1e-2).err().unwrap().to_string();
    assert!(e.contains("staged images"), "{e}");
    t.step_staged(s2, &targets, 1e-2).unwrap();
    let s3 = t.stage(batch(&crops, &pixels)).unwrap();
    t.step_staged(s3, &targets, 1e-2).unwrap();
}
