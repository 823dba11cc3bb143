//! Part of the `gpu_kernels` bench: The linear layer's bf16 GEMM with its bias (`ops::linear::cuda`: cuBLAS and
//! `kernels/linear.cu`), FLOP/s as criterion "elements".

use criterion::{Criterion, Throughput};
use mlvpt::gpu::bf16;
use mlvpt::gpu::GpuContext;
use mlvpt::ops::linear::LinearShape;

use super::{filled, ramp_bf16, timed, D, MLP, ROWS};

/// Every bench of this op.
pub fn bench(c: &mut Criterion, gpu: &GpuContext) {
    let mut g = c.benchmark_group("gemm");
    let (xa, w) = (ramp_bf16(gpu, ROWS * D), ramp_bf16(gpu, MLP * D));
    let b32 = filled(gpu, MLP, 0.0f32);
    let mut ya = filled(gpu, ROWS * MLP, bf16::ZERO);
    g.throughput(Throughput::Elements((2 * ROWS * MLP * D) as u64));
    g.bench_function("bf16 linear+bias 14528x768 -> 3072 (flop/s)", |b| {
        b.iter_custom(|it| {
            timed(gpu, it, || {
                mlvpt::ops::linear::cuda::forward(
                    gpu,
                    &xa,
                    &w,
                    Some(&b32),
                    &mut ya,
                    &LinearShape {
                        rows: ROWS,
                        d_in: D,
                        d_out: MLP,
                    },
                )
            })
        })
    });
    g.finish();
}
