//! Loader throughput at 224 px: a batch of 64 training images decoded from JPEG files
//! (500x375, VOC-like), augmented and normalized, versus read from a prepared cache.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mlvpt::data::cache;
use mlvpt::data::loader::{ImageStore, TrainLoader};
use mlvpt::data::Norm;
use std::path::PathBuf;
use std::sync::Arc;

const N: usize = 64;
const SIZE: usize = 224;

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<PathBuf> = (0..N)
        .map(|i| {
            let img = image::RgbImage::from_fn(500, 375, |x, y| {
                image::Rgb([(x + i as u32) as u8, (y * 3) as u8, ((x ^ y) + 7 * i as u32) as u8])
            });
            let f = dir.path().join(format!("{i}.jpg"));
            img.save(&f).unwrap();
            f
        })
        .collect();
    let items: cache::Items = files.iter().map(|f| (f.clone(), vec![0])).collect();
    let cfile = dir.path().join("b.cache");
    cache::prepare(&cfile, "bench", &["a".to_string()], SIZE, &items, &Vec::new(), |_, _| {}).unwrap();
    let cache = Arc::new(cache::Cache::open(&cfile).unwrap());
    let idx: Vec<usize> = (0..N).collect();
    let mk = |store| TrainLoader {
        store,
        targets: vec![1.0; N],
        k: 1,
        size: SIZE,
        norm: Norm::Imagenet,
        seed: 0,
    };
    let from_files = mk(ImageStore::Files(files.clone()));
    let from_cache = mk(ImageStore::Cache {
        records: cache.records(mlvpt::data::Split::Train),
        cache,
    });

    let mut g = c.benchmark_group("loader_224");
    g.throughput(Throughput::Elements(N as u64));
    g.sample_size(10);
    g.bench_function("jpeg_files_batch64", |b| b.iter(|| assert_eq!(from_files.batch(&idx, 0).n, N)));
    g.bench_function("cache_batch64", |b| b.iter(|| assert_eq!(from_cache.batch(&idx, 0).n, N)));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
