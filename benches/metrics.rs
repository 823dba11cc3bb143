//! Metrics on a COCO-val-sized score matrix, and the CPU ASL op at training batch shape.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use mlvpt::metrics::evaluate;
use mlvpt::ops::asl::{asl_forward_backward, AslConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn bench(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let (n, k) = (5000, 80);
    let scores: Vec<f32> = (0..n * k).map(|_| rng.random::<f32>()).collect();
    let targets: Vec<f32> = (0..n * k).map(|_| (rng.random::<f32>() < 0.05) as u8 as f32).collect();
    c.bench_function("evaluate 5000x80", |b| b.iter(|| evaluate(black_box(&scores), &targets, n, k, 0.5)));

    let (b_, k_) = (64, 80);
    let logits: Vec<f32> = (0..b_ * k_).map(|_| rng.random_range(-6.0..6.0)).collect();
    let t: Vec<f32> = targets[..b_ * k_].to_vec();
    let mut grad = vec![0.0f32; b_ * k_];
    let cfg = AslConfig::default();
    c.bench_function("asl fwd+bwd 64x80 f32", |b| {
        b.iter(|| asl_forward_backward(black_box(&logits), &t, &cfg, Some(&mut grad)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
