//! Part of the `gpu_kernels` bench: AdamW (`kernels/adamw.cu`, `ops::adamw::cuda`) over 4 M parameters, bytes per second.

use criterion::{Criterion, Throughput};
use mlvpt::gpu::GpuContext;
use mlvpt::ops::adamw;

use super::{filled, timed};

/// Every bench of this op.
pub fn bench(c: &mut Criterion, gpu: &GpuContext) {
    let s = gpu.stream();
    let mut g = c.benchmark_group("adamw");
    let n = 4 << 20;
    let (mut p, gr, mut m, mut v) = (
        filled(gpu, n, 0.1f32),
        filled(gpu, n, 0.01f32),
        filled(gpu, n, 0.0f32),
        filled(gpu, n, 0.0f32),
    );
    let cfg = adamw::AdamWConfig::default();
    g.throughput(Throughput::Bytes((n * 28) as u64));
    g.bench_function("4M params", |b| {
        b.iter_custom(|it| {
            timed(gpu, it, || {
                adamw::cuda::step(gpu, s, &mut p, &gr, &mut m, &mut v, n, 10, 5e-4, &cfg)
            })
        })
    });
    g.finish();
}
