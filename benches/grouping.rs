//! Grouping speed: the whole spectral grouping (both graphs, T = 5) at K = 80, 365 and 1000
//! labels on synthetic counts, and co-occurrence counting from sparse label lists (images/s).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mlvpt::grouping::{branches, Cooccurrence, GroupingConfig, GroupingMode};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `n` images over `k` labels in blocks of 8: each image picks a block, holds each of its labels
/// with probability 0.4 and one random other label (about 4 labels per image, COCO-like).
fn synthetic_lists(k: usize, n: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let b = rng.random_range(0..k.div_ceil(8)) * 8;
            let mut l: Vec<usize> = (b..(b + 8).min(k)).filter(|_| rng.random::<f64>() < 0.4).collect();
            l.push(rng.random_range(0..k));
            l
        })
        .collect()
}

fn grouping(c: &mut Criterion) {
    let mut g = c.benchmark_group("grouping_T5");
    g.sample_size(10);
    for k in [80, 365, 1000] {
        let lists = synthetic_lists(k, 50 * k, 1);
        let co = Cooccurrence::from_label_lists(k, lists.iter().map(|l| l.as_slice()));
        let cfg = GroupingConfig {
            groups: 5,
            ..Default::default()
        };
        g.bench_with_input(BenchmarkId::new("both_graphs", k), &co, |b, co| {
            b.iter(|| branches(co, GroupingMode::Both, &cfg).unwrap())
        });
    }
    g.finish();
}

fn counting(c: &mut Criterion) {
    let mut g = c.benchmark_group("cooccurrence_counting");
    g.sample_size(10);
    let (k, n) = (1000, 500_000);
    let lists = synthetic_lists(k, n, 2);
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function(BenchmarkId::new("label_lists_K1000", n), |b| {
        b.iter(|| Cooccurrence::from_label_lists(k, lists.iter().map(|l| l.as_slice())))
    });
    g.finish();
}

criterion_group!(benches, grouping, counting);
criterion_main!(benches);
