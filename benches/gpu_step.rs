//! One whole training step (forward, ASL, backward, AdamW) on the CUDA backend, as images/s
//! (criterion `Throughput::Elements(batch)`: read "elem/s" as images/s), at the demo shape
//! (batch 64) and ViT-B/16 224 (K 80, T 5, E 3, deep prompts; batch 64 and 128), from f32
//! images and from staged uint8 crops (`--augment-on device`). The same
//! shapes on the CPU: benches/train_step.rs. Without a device it prints "bench skipped".
//!
//!     cargo bench --features cuda --bench gpu_step
//!     cargo bench --features cuda --bench gpu_step -- demo

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use mlvpt::backend::{Crop, CudaBackend};
use mlvpt::model::{ModelConfig, VitConfig};
use mlvpt::ops::augment;
use mlvpt::train::bench::RandomProblem;
use mlvpt::train::{Crops, Staged, Trainer};
use std::time::Duration;

fn setup(be: CudaBackend, cfg: &ModelConfig, batch: usize) -> anyhow::Result<(Trainer<CudaBackend>, Vec<f32>, Vec<f32>)> {
    let p = RandomProblem::new(cfg, batch, 0);
    Ok((p.trainer(be, cfg)?, p.images, p.targets))
}

/// `batch` crops of 180 x 160 RGB8 (a fixed hash), every other one mirrored.
fn cache_like_crops(batch: usize) -> (Vec<u8>, Vec<Crop>) {
    let (crops, bytes) = augment::pack((0..batch).map(|b| (180, 160, b % 2 == 1)));
    let pixels = (0..bytes).map(|i| ((i as u32).wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    (pixels, crops)
}

fn bench(c: &mut Criterion) {
    let name = match CudaBackend::new(0) {
        Ok(be) if be.gpu().is_virtual() => {
            eprintln!(
                "gpu_step bench skipped: {} is the virtual CUDA device (tools/vgpu), which has no performance meaning",
                be.gpu().device_name()
            );
            return;
        }
        Ok(be) => be.gpu().device_name().to_string(),
        Err(e) => {
            eprintln!("gpu_step bench skipped: {e}");
            return;
        }
    };
    eprintln!("# gpu_step on {name}");
    let demo = ModelConfig::demo();
    let vitb = ModelConfig {
        vit: VitConfig::vit_b16(),
        labels: 80,
        groups: 5,
        experts: 3,
        ..ModelConfig::demo()
    };
    for (label, cfg, batch) in [
        ("demo b64", &demo, 64usize),
        ("vit-b16-224 b64", &vitb, 64),
        ("vit-b16-224 b128", &vitb, 128),
    ] {
        // Built on first use (one trainer at a time: ViT-B at batch 128 holds ~11 GB).
        let mut state = None;
        let mut g = c.benchmark_group("gpu_step");
        g.throughput(Throughput::Elements(batch as u64));
        g.sample_size(10);
        // Steps of 0.1 s and more: the same iteration count per sample, not 1..10x.
        g.sampling_mode(SamplingMode::Flat);
        g.warm_up_time(Duration::from_secs(1));
        g.measurement_time(Duration::from_secs(3));
        g.bench_function(label, |b| {
            let (tr, images, targets) = state.get_or_insert_with(|| {
                let be = CudaBackend::new(0).expect("device opened above");
                setup(be, cfg, batch).unwrap_or_else(|e| panic!("{label}: {e:#}"))
            });
            b.iter(|| tr.step(images, targets, 1e-4).unwrap_or_else(|e| panic!("{label}: {e:#}")))
        });
        // The step from uint8 crops (`--augment-on device`): the next batch staged (written to
        // pinned memory, copied on the second stream) before the current one is stepped, the
        // augment kernel writing the patch rows. Crops of 180 x 160, about what a 224 px cache
        // gives; the same batch each time.
        let (pixels, crops) = cache_like_crops(batch);
        let mut pending: Option<Staged> = None;
        g.bench_function(format!("{label} staged uint8"), |b| {
            let (tr, _, targets) = state.get_or_insert_with(|| {
                let be = CudaBackend::new(0).expect("device opened above");
                setup(be, cfg, batch).unwrap_or_else(|e| panic!("{label}: {e:#}"))
            });
            let (mean, std) = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]);
            let batch = Crops {
                pixels: &pixels,
                crops: &crops,
                mean,
                std,
            };
            b.iter(|| {
                let current = match pending.take() {
                    Some(s) => s,
                    None => tr.stage(batch).unwrap_or_else(|e| panic!("{label}: {e:#}")),
                };
                pending = Some(tr.stage(batch).unwrap_or_else(|e| panic!("{label}: {e:#}")));
                tr.step_staged(current, targets, 1e-4).unwrap_or_else(|e| panic!("{label}: {e:#}"))
            })
        });
        g.bench_function(format!("{label} predict"), |b| {
            let (tr, images, _) = state.get_or_insert_with(|| {
                let be = CudaBackend::new(0).expect("device opened above");
                setup(be, cfg, batch).unwrap_or_else(|e| panic!("{label}: {e:#}"))
            });
            b.iter(|| tr.predict(images).unwrap_or_else(|e| panic!("{label}: {e:#}")))
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
