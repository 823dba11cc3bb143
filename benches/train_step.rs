//! One CPU training step (forward, ASL, backward, AdamW) at the demo shape and at ViT-S/16 224,
//! reported as images/s (criterion `Throughput::Elements(batch)`: read "elem/s" as images/s).
//!
//!     cargo bench --bench train_step              # both shapes
//!     cargo bench --bench train_step -- demo      # one shape

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mlvpt::backend::{AslConfig, CpuBackend};
use mlvpt::model::{Backbone, ModelConfig, Params, VitConfig};
use mlvpt::train::{AdamWConfig, Trainer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Duration;

fn setup(cfg: &ModelConfig, batch: usize) -> (Trainer<CpuBackend<f32>>, Vec<f32>, Vec<f32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let bb = Backbone::random(&cfg.vit, 1);
    let params = Params::init(cfg, 2, 2);
    let tables: Vec<Vec<usize>> = (0..2).map(|s| (0..cfg.labels).map(|k| (k * (s + 1) + s) % cfg.groups).collect()).collect();
    let tr = Trainer::new(CpuBackend::<f32>::new(), cfg.clone(), &bb, params, tables, AslConfig::default(), AdamWConfig::default(), batch).unwrap();
    let images = (0..batch * cfg.vit.image_len()).map(|_| rng.random_range(-2.0f32..2.0)).collect();
    let targets = (0..batch * cfg.labels).map(|_| if rng.random_bool(0.15) { 1.0 } else { 0.0 }).collect();
    (tr, images, targets)
}

fn bench(c: &mut Criterion) {
    let demo = ModelConfig::demo();
    let vits = ModelConfig { vit: VitConfig::vit_s16(), labels: 80, groups: 5, experts: 3, ..ModelConfig::demo() };
    for (name, cfg, batch, secs) in [("demo b64", demo, 64usize, 8u64), ("vit-s16-224 b8", vits, 8, 20)] {
        // Built on first use, so a filtered run does not pay for the other shape's setup.
        let mut state = None;
        let mut g = c.benchmark_group("train_step");
        g.throughput(Throughput::Elements(batch as u64));
        g.sample_size(10);
        g.warm_up_time(Duration::from_secs(2));
        g.measurement_time(Duration::from_secs(secs));
        g.bench_function(name, |b| {
            let (tr, images, targets) = state.get_or_insert_with(|| setup(&cfg, batch));
            b.iter(|| tr.step(images, targets, 1e-4).unwrap())
        });
        g.bench_function(format!("{name} predict"), |b| {
            let (tr, images, _) = state.get_or_insert_with(|| setup(&cfg, batch));
            b.iter(|| tr.predict(images).unwrap())
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
