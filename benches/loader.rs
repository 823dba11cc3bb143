//! Loader throughput at 224 px: a batch of 64 training images decoded from JPEG files
//! (500x375, VOC-like; 640x480, COCO-like), augmented and normalized, versus read from a
//! prepared cache (into a fresh batch, and into a reused one as in training); and the host's
//! share with `--augment-on device`, cutting the uint8 crops only. Prints the CPU
//! model, its SIMD flags and the thread count first: images/s per core is criterion's rate
//! over that count.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mlvpt::data::cache;
use mlvpt::data::loader::{ImageStore, TrainLoader};
use mlvpt::data::Norm;
use std::path::PathBuf;
use std::sync::Arc;

const N: usize = 64;
const SIZE: usize = 224;

/// "model name" of /proc/cpuinfo (Linux), its SIMD flags that matter here, and the threads the
/// loader may use.
fn cpu_description() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |key: &str| {
        info.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.trim().to_string())
    };
    let flags = field("flags").unwrap_or_default();
    let simd: Vec<&str> = ["avx2", "fma", "avx512f"]
        .into_iter()
        .filter(|f| flags.split(' ').any(|x| x == *f))
        .collect();
    // rayon's pool (the loader's) has RAYON_NUM_THREADS threads when it is set.
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    format!(
        "{} ({}), {threads} threads",
        field("model name").unwrap_or_else(|| "unknown CPU".into()),
        simd.join(" ")
    )
}

fn bench(c: &mut Criterion) {
    eprintln!("loader bench on {}", cpu_description());
    let dir = tempfile::tempdir().unwrap();
    // N JPEG files of w x h (a smooth pattern with some detail, so they compress as photos do).
    let jpegs = |w: u32, h: u32| -> Vec<PathBuf> {
        (0..N)
            .map(|i| {
                let img = image::RgbImage::from_fn(w, h, |x, y| {
                    image::Rgb([(x + i as u32) as u8, (y * 3) as u8, ((x ^ y) + 7 * i as u32) as u8])
                });
                let f = dir.path().join(format!("{w}x{h}_{i}.jpg"));
                img.save(&f).unwrap();
                f
            })
            .collect()
    };
    let files = jpegs(500, 375); // VOC-like
    let coco_files = jpegs(640, 480); // COCO-like
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
    let from_coco_files = mk(ImageStore::Files(coco_files));
    let from_cache = mk(ImageStore::Cache {
        records: cache.records(mlvpt::data::Split::Train),
        cache,
    });

    let mut g = c.benchmark_group("loader_224");
    g.throughput(Throughput::Elements(N as u64));
    g.sample_size(10);
    g.bench_function("jpeg_files_batch64", |b| b.iter(|| assert_eq!(from_files.batch(&idx, 0).n, N)));
    g.bench_function("jpeg_files_640x480_batch64", |b| {
        b.iter(|| assert_eq!(from_coco_files.batch(&idx, 0).n, N))
    });
    g.bench_function("cache_batch64", |b| b.iter(|| assert_eq!(from_cache.batch(&idx, 0).n, N)));
    // As training runs it: each batch is written into the buffer of one handed back earlier
    // (`EpochStream::recycle`), not into freshly allocated memory.
    let mut spare = Vec::new();
    g.bench_function("cache_batch64_reused_buffer", |b| {
        b.iter(|| {
            let batch = from_cache.batch_into(&idx, 0, std::mem::take(&mut spare));
            assert_eq!(batch.n, N);
            spare = batch.images;
        })
    });
    // `--augment-on device`: the host only cuts each crop (the same draws) and packs its bytes;
    // resize, flip and normalization happen on the backend.
    g.bench_function("cache_crops_batch64", |b| {
        b.iter(|| assert_eq!(from_cache.crop_batch(&idx, 0).n, N))
    });
    g.bench_function("jpeg_files_crops_batch64", |b| {
        b.iter(|| assert_eq!(from_files.crop_batch(&idx, 0).n, N))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
