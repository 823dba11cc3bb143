//! Throughput of each CUDA kernel (bytes moved per second; GEMM in flop/s as "elements") at
//! ViT-B/16 training sizes: batch 64 x 227 tokens, D 768, MLP 3072, 1000 labels; the token
//! kernels and the plain fp32 attention at batch 128 (`gpu_kernels/tokens.rs`). Prints a
//! message and exits cleanly when there is no device. Short run (tools/gpu-runner.sh):
//! `cargo bench --features cuda --bench gpu_kernels -- --warm-up-time 0.5 --measurement-time 1`.
//!
//! Each sample queues `iters` launches and waits once, so launch latency is amortised the way
//! a training step sees it.

use criterion::{Criterion, Throughput};
use mlvpt::gpu::{bf16, CudaSlice, GpuContext};
use mlvpt::ops::{adamw, asl, cast, gelu, layernorm};

const ROWS: usize = 64 * 227;
const D: usize = 768;
const MLP: usize = 3072;

mod gpu_common;
use gpu_common::timed;
// A crate root looks for `benches/tokens.rs`, which cargo would take for a bench of its own.
#[path = "gpu_kernels/tokens.rs"]
mod tokens;

fn filled<T: cudarc::driver::DeviceRepr + Copy>(gpu: &GpuContext, n: usize, v: T) -> CudaSlice<T> {
    gpu.upload(&vec![v; n]).unwrap()
}

fn ramp_bf16(gpu: &GpuContext, n: usize) -> CudaSlice<bf16> {
    gpu.upload(&(0..n).map(|i| bf16::from_f32(((i % 97) as f32 - 48.0) / 16.0)).collect::<Vec<_>>())
        .unwrap()
}

fn bench_all(c: &mut Criterion, gpu: &GpuContext) {
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

    let mut g = c.benchmark_group("layernorm");
    let x = ramp_bf16(gpu, ROWS * D);
    let (gamma, beta) = (filled(gpu, D, 1.0f32), filled(gpu, D, 0.0f32));
    let mut y = filled(gpu, ROWS * D, bf16::ZERO);
    let (mut mean, mut rstd) = (filled(gpu, ROWS, 0.0f32), filled(gpu, ROWS, 0.0f32));
    g.throughput(Throughput::Bytes((ROWS * D * 4) as u64));
    g.bench_function("forward 14528x768", |b| {
        b.iter_custom(|it| {
            timed(gpu, it, || {
                layernorm::cuda::forward(gpu, s, &x, &gamma, &beta, &mut y, &mut mean, &mut rstd, ROWS, D, 1e-6)
            })
        })
    });
    let mut dx = filled(gpu, ROWS * D, bf16::ZERO);
    g.throughput(Throughput::Bytes((ROWS * D * 6) as u64));
    g.bench_function("backward 14528x768", |b| {
        b.iter_custom(|it| {
            timed(gpu, it, || {
                layernorm::cuda::backward(gpu, s, &y, &x, &gamma, &mean, &rstd, &mut dx, ROWS, D, false)
            })
        })
    });
    // The CUDA backend's case: the fp32 residual stream read directly (bytes: x f32, y bf16).
    let xf = filled(gpu, ROWS * D, 0.5f32);
    g.throughput(Throughput::Bytes((ROWS * D * 6) as u64));
    g.bench_function("forward fp32 stream 14528x768", |b| {
        b.iter_custom(|it| {
            timed(gpu, it, || {
                layernorm::cuda::forward::<f32>(gpu, s, &xf, &gamma, &beta, &mut y, &mut mean, &mut rstd, ROWS, D, 1e-6)
            })
        })
    });
    // Accumulating into the fp32 residual gradient (dy bf16, x f32, dx f32 read and written).
    let mut dxf = filled(gpu, ROWS * D, 0.0f32);
    g.throughput(Throughput::Bytes((ROWS * D * 14) as u64));
    g.bench_function("backward fp32 stream 14528x768", |b| {
        b.iter_custom(|it| {
            timed(gpu, it, || {
                layernorm::cuda::backward::<f32>(gpu, s, &y, &xf, &gamma, &mean, &rstd, &mut dxf, ROWS, D, true)
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
                    &gamma,
                    &beta,
                    &mut y,
                    &mut mean,
                    &mut rstd,
                    ROWS,
                    D,
                    1e-6,
                )
            })
        })
    });
    g.finish();

    let mut g = c.benchmark_group("gelu");
    let h = ramp_bf16(gpu, ROWS * MLP);
    let bias = filled(gpu, MLP, 0.1f32);
    let mut out = filled(gpu, ROWS * MLP, bf16::ZERO);
    g.throughput(Throughput::Bytes((ROWS * MLP * 4) as u64));
    g.bench_function("bias forward 14528x3072", |b| {
        b.iter_custom(|it| timed(gpu, it, || gelu::cuda::forward(gpu, s, &h, Some(&bias), &mut out, ROWS, MLP)))
    });
    g.throughput(Throughput::Bytes((ROWS * MLP * 6) as u64));
    g.bench_function("bias backward in place 14528x3072", |b| {
        b.iter_custom(|it| {
            timed(gpu, it, || {
                gelu::cuda::backward_in_place(gpu, s, &h, Some(&bias), &mut out, ROWS, MLP)
            })
        })
    });
    g.finish();

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

    let mut g = c.benchmark_group("gemm");
    let (xa, w) = (ramp_bf16(gpu, ROWS * D), ramp_bf16(gpu, MLP * D));
    let b32 = filled(gpu, MLP, 0.0f32);
    let mut ya = filled(gpu, ROWS * MLP, bf16::ZERO);
    g.throughput(Throughput::Elements((2 * ROWS * MLP * D) as u64));
    g.bench_function("bf16 linear+bias 14528x768 -> 3072 (flop/s)", |b| {
        b.iter_custom(|it| {
            timed(gpu, it, || {
                mlvpt::ops::linear::cuda::forward(gpu, &xa, &w, Some(&b32), &mut ya, ROWS, MLP, D, false)
            })
        })
    });
    g.finish();
}

fn main() {
    let Some(gpu) = gpu_common::open("gpu_kernels") else {
        return;
    };
    let mut c = Criterion::default().configure_from_args();
    bench_all(&mut c, &gpu);
    tokens::bench(&mut c, &gpu);
    c.final_summary();
}
