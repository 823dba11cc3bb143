//! Part of the `gpu_kernels` bench: Bias + GELU forward and backward (`kernels/gelu.cu`, `ops::gelu::cuda`), bytes per second.

use criterion::{Criterion, Throughput};
use mlvpt::gpu::bf16;
use mlvpt::gpu::GpuContext;
use mlvpt::ops::{gelu, Rows};

use super::{filled, ramp_bf16, timed, MLP, ROWS};

/// Every bench of this op.
pub fn bench(c: &mut Criterion, gpu: &GpuContext) {
    let s = gpu.stream();
    let mut g = c.benchmark_group("gelu");
    let h = ramp_bf16(gpu, ROWS * MLP);
    let bias = filled(gpu, MLP, 0.1f32);
    let mut out = filled(gpu, ROWS * MLP, bf16::ZERO);
    g.throughput(Throughput::Bytes((ROWS * MLP * 4) as u64));
    g.bench_function("bias forward 14528x3072", |b| {
        b.iter_custom(|it| {
            timed(gpu, it, || {
                gelu::cuda::forward(gpu, s, &h, Some(&bias), &mut out, Rows { rows: ROWS, dim: MLP })
            })
        })
    });
    g.throughput(Throughput::Bytes((ROWS * MLP * 6) as u64));
    g.bench_function("bias backward in place 14528x3072", |b| {
        b.iter_custom(|it| {
            timed(gpu, it, || {
                gelu::cuda::backward_in_place(gpu, s, &h, Some(&bias), &mut out, Rows { rows: ROWS, dim: MLP })
            })
        })
    });
    g.finish();
}
