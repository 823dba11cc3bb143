//! Part of the `gpu_kernels` bench: LayerNorm forward, backward and the fused residual + forward (`kernels/layernorm.cu`,
//! `ops::layernorm::cuda`), in bf16 and on the fp32 residual stream, bytes per second.

use criterion::{Criterion, Throughput};
use mlvpt::gpu::bf16;
use mlvpt::gpu::GpuContext;
use mlvpt::ops::layernorm::{self, LayerNormShape, Norm, NormStats};
use mlvpt::ops::Grad;

use super::{filled, ramp_bf16, timed, D, ROWS};

/// The ViT's rows and eps (the backward does not read eps).
const SHAPE: LayerNormShape = LayerNormShape {
    rows: ROWS,
    dim: D,
    eps: 1e-6,
};

/// Every bench of this op.
pub fn bench(c: &mut Criterion, gpu: &GpuContext) {
    let s = gpu.stream();
    let mut g = c.benchmark_group("layernorm");
    let x = ramp_bf16(gpu, ROWS * D);
    let (gamma, beta) = (filled(gpu, D, 1.0f32), filled(gpu, D, 0.0f32));
    let norm = Norm {
        gamma: &gamma,
        beta: &beta,
    };
    let mut y = filled(gpu, ROWS * D, bf16::ZERO);
    let (mut mean, mut rstd) = (filled(gpu, ROWS, 0.0f32), filled(gpu, ROWS, 0.0f32));
    g.throughput(Throughput::Bytes((ROWS * D * 4) as u64));
    g.bench_function("forward 14528x768", |b| {
        b.iter_custom(|it| {
            timed(gpu, it, || {
                layernorm::cuda::forward(
                    gpu,
                    s,
                    &x,
                    norm,
                    &mut y,
                    NormStats {
                        mean: &mut mean,
                        rstd: &mut rstd,
                    },
                    &SHAPE,
                )
            })
        })
    });
    let mut dx = filled(gpu, ROWS * D, bf16::ZERO);
    g.throughput(Throughput::Bytes((ROWS * D * 6) as u64));
    g.bench_function("backward 14528x768", |b| {
        b.iter_custom(|it| {
            timed(gpu, it, || {
                layernorm::cuda::backward(
                    gpu,
                    s,
                    &y,
                    &x,
                    &gamma,
                    NormStats { mean: &mean, rstd: &rstd },
                    Grad::Write(&mut dx),
                    &SHAPE,
                )
            })
        })
    });
    // The CUDA backend's case: the fp32 residual stream read directly (bytes: x f32, y bf16).
    let xf = filled(gpu, ROWS * D, 0.5f32);
    g.throughput(Throughput::Bytes((ROWS * D * 6) as u64));
    g.bench_function("forward fp32 stream 14528x768", |b| {
        b.iter_custom(|it| {
            timed(gpu, it, || {
                layernorm::cuda::forward::<f32>(
                    gpu,
                    s,
                    &xf,
                    norm,
                    &mut y,
                    NormStats {
                        mean: &mut mean,
                        rstd: &mut rstd,
                    },
                    &SHAPE,
                )
            })
        })
    });
    // Accumulating into the fp32 residual gradient (dy bf16, x f32, dx f32 read and written).
    let mut dxf = filled(gpu, ROWS * D, 0.0f32);
    g.throughput(Throughput::Bytes((ROWS * D * 14) as u64));
    g.bench_function("backward fp32 stream 14528x768", |b| {
        b.iter_custom(|it| {
            timed(gpu, it, || {
                layernorm::cuda::backward::<f32>(
                    gpu,
                    s,
                    &y,
                    &xf,
                    &gamma,
                    NormStats { mean: &mean, rstd: &rstd },
                    Grad::Add(&mut dxf),
                    &SHAPE,
                )
            })
        })
    });
    // The residual add fused in (x f32, f bf16, ls f32 [D], out f32, y bf16).
    let (fb, ls) = (ramp_bf16(gpu, ROWS * D), filled(gpu, D, 0.1f32));
    let mut out = filled(gpu, ROWS * D, 0.0f32);
    g.throughput(Throughput::Bytes((ROWS * D * 12) as u64));
    g.bench_function("residual + forward 14528x768", |b| {
        b.iter_custom(|it| {
            timed(gpu, it, || {
                layernorm::cuda::residual_forward::<bf16>(
                    gpu,
                    s,
                    &xf,
                    &fb,
                    Some(&ls),
                    &mut out,
                    norm,
                    &mut y,
                    NormStats {
                        mean: &mut mean,
                        rstd: &mut rstd,
                    },
                    &SHAPE,
                )
            })
        })
    });
    g.finish();
}
