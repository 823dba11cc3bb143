//! Part of the `gpu_kernels` bench: ASL forward + backward (`kernels/asl.cu`, `ops::asl::cuda`) at 512 images x 1000 labels,
//! bytes per second.

use criterion::{Criterion, Throughput};
use mlvpt::gpu::GpuContext;
use mlvpt::ops::asl;

use super::{filled, timed};

/// Every bench of this op.
pub fn bench(c: &mut Criterion, gpu: &GpuContext) {
    let s = gpu.stream();
    let mut g = c.benchmark_group("asl");
    let n = 512 * 1000;
    let logits = gpu
        .upload(&(0..n).map(|i| ((i % 61) as f32 - 30.0) / 5.0).collect::<Vec<_>>())
        .unwrap();
    let targets = gpu.upload(&(0..n).map(|i| (i % 7 == 0) as u8 as f32).collect::<Vec<_>>()).unwrap();
    let (mut grad, mut loss) = (filled(gpu, n, 0.0f32), filled(gpu, 1, 0.0f32));
    let mut ws = asl::cuda::AslWorkspace::new(gpu).unwrap();
    let acfg = asl::AslConfig::default();
    g.throughput(Throughput::Bytes((n * 12) as u64));
    g.bench_function("forward+backward 512x1000", |b| {
        b.iter_custom(|it| {
            timed(gpu, it, || {
                asl::cuda::forward_backward(gpu, s, &mut ws, &logits, &targets, &acfg, 1.0, Some(&mut grad), &mut loss, n)
            })
        })
    });
    g.finish();
}
