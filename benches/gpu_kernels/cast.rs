//! Part of the `gpu_kernels` bench: fp32 <-> bf16 casts (`kernels/cast.cu`, `ops::cast::cuda`), bytes read and written per second.

use criterion::{Criterion, Throughput};
use mlvpt::gpu::bf16;
use mlvpt::gpu::GpuContext;
use mlvpt::ops::cast;

use super::{filled, timed, D, ROWS};

/// Every bench of this op.
pub fn bench(c: &mut Criterion, gpu: &GpuContext) {
    let s = gpu.stream();
    let mut g = c.benchmark_group("cast");
    let n = ROWS * D;
    let (xf, mut yb) = (filled(gpu, n, 0.5f32), filled(gpu, n, bf16::ZERO));
    g.throughput(Throughput::Bytes((n * 6) as u64));
    g.bench_function("f32_to_bf16 14528x768", |b| {
        b.iter_custom(|it| timed(gpu, it, || cast::cuda::f32_to_bf16(gpu, s, &xf, &mut yb, n)))
    });
    let mut yf = filled(gpu, n, 0.0f32);
    g.bench_function("bf16_to_f32 14528x768", |b| {
        b.iter_custom(|it| timed(gpu, it, || cast::cuda::bf16_to_f32(gpu, s, &yb, &mut yf, n)))
    });
    g.finish();
}
