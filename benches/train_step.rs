//! One CPU training step (forward, ASL, backward, AdamW) at the demo shape and at ViT-S/16 224,
//! reported as images/s (criterion `Throughput::Elements(batch)`: read "elem/s" as images/s).
//!
//!     cargo bench --bench train_step              # both shapes
//!     cargo bench --bench train_step -- demo      # one shape
//!
//! The machine is shared, so before criterion's samples each shape also prints a summary of
//! single steps: median and best wall time per step (as `mlvpt bench-step` and the PyTorch peer
//! tools/peer/step_bench.py report them), images per CPU-second (process CPU time from
//! /proc/self/stat), and the same for predict (forward only).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mlvpt::backend::CpuBackend;
use mlvpt::model::{ModelConfig, VitConfig};
use mlvpt::train::bench::RandomProblem;
use mlvpt::train::Trainer;
use std::time::Duration;

fn setup(cfg: &ModelConfig, batch: usize) -> (Trainer<CpuBackend<f32>>, Vec<f32>, Vec<f32>) {
    let p = RandomProblem::new(cfg, batch, 0);
    (p.trainer(CpuBackend::<f32>::new(), cfg).unwrap(), p.images, p.targets)
}

/// User + system CPU seconds of this process so far (Linux; None elsewhere).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime) are 11 and 12 after the command name.
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0) // USER_HZ is 100 on Linux
}

/// Median and best of `steps` timings of `f`, and CPU seconds per call.
fn time_calls(steps: usize, mut f: impl FnMut()) -> (f64, f64, Option<f64>) {
    f();
    let cpu0 = cpu_seconds();
    let mut times = Vec::with_capacity(steps);
    for _ in 0..steps {
        let t = std::time::Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64());
    }
    let cpu = cpu_seconds().zip(cpu0).map(|(a, b)| (a - b) / steps as f64);
    times.sort_by(|a, b| a.total_cmp(b));
    (times[steps / 2], times[0], cpu)
}

/// Prints the peer-style summary of `steps` single training steps and predicts.
fn summary(name: &str, tr: &mut Trainer<CpuBackend<f32>>, images: &[f32], targets: &[f32], batch: usize, steps: usize) {
    let b = batch as f64;
    let (med, best, cpu) = time_calls(steps, || {
        tr.step(images, targets, 1e-4).unwrap();
    });
    let (pmed, pbest, _) = time_calls(steps, || {
        tr.predict(images).unwrap();
    });
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!(
        "# {name}: train {:.1} images/s median, {:.1} best ({steps} steps, {} images per CPU-second); inference {:.1} median, {:.1} best; load average {}",
        b / med,
        b / best,
        cpu.map_or("n/a".into(), |c| format!("{:.1}", b / c)),
        b / pmed,
        b / pbest,
        load.split_whitespace().next().unwrap_or("?"),
    );
}

fn bench(c: &mut Criterion) {
    let demo = ModelConfig::demo();
    let vits = ModelConfig {
        vit: VitConfig::vit_s16(),
        labels: 80,
        groups: 5,
        experts: 3,
        ..ModelConfig::demo()
    };
    for (name, cfg, batch, secs, steps) in [("demo b64", demo, 64usize, 8u64, 30usize), ("vit-s16-224 b8", vits, 8, 20, 8)] {
        // Built on first use, so a filtered run does not pay for the other shape's setup.
        let mut state = None;
        let mut g = c.benchmark_group("train_step");
        g.throughput(Throughput::Elements(batch as u64));
        g.sample_size(10);
        g.warm_up_time(Duration::from_secs(2));
        g.measurement_time(Duration::from_secs(secs));
        g.bench_function(name, |b| {
            let (tr, images, targets) = state.get_or_insert_with(|| {
                let (mut tr, images, targets) = setup(&cfg, batch);
                summary(name, &mut tr, &images, &targets, batch, steps);
                (tr, images, targets)
            });
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
