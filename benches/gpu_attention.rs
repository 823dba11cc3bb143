//! FLOP/s of the fused attention kernels (`kernels/attention.cu`) next to the unfused path
//! (cuBLAS strided-batched GEMMs around a materialised bf16 score matrix and row-softmax
//! kernels, `ops::attention::cuda::unfused`), both in the same run, at the ViT-B training shape
//! (B 128, 12 heads of 64, N 227 = CLS + 30 prompts + 196 patches), at N 1025 (B 32) and at
//! ViT-H/14 (B 64, 16 heads of 80, N 287). Every compiled tile shape of the head dim
//! (`FWD_TILES`, `BWD_TILES`) is measured, the alternatives against the launcher's default.
//! FLOPs as FlashAttention counts them: forward 4 B h N^2 dh, backward 2.5x that (criterion
//! reports them as "elements"). The unfused path's per-head Q, K, V copies are made once,
//! outside the timed region. Then the plain fp32 attention (head dims without a fused kernel),
//! forward and backward, at the ViT-B shape. Prints a message and exits cleanly when there is no device.
//! Short run (tools/gpu-runner.sh):
//! `cargo bench --features cuda --bench gpu_attention -- --warm-up-time 0.5 --measurement-time 1`.

use criterion::{Criterion, Throughput};
use mlvpt::gpu::{bf16, CudaSlice, GpuContext};
use mlvpt::ops::attention::{self, cuda, AttnShape, BWD_TILES, FWD_TILES};
use mlvpt::train::flops::attention_pairs;
use std::time::Duration;

mod gpu_common;
use gpu_common::timed;

/// Deterministic values in [-1, 1) (a multiplicative hash of the index).
fn noise(gpu: &GpuContext, n: usize, amp: f32) -> CudaSlice<bf16> {
    let v: Vec<bf16> = (0..n)
        .map(|i| {
            let hsh = (i as u32).wrapping_mul(2_654_435_761) >> 16;
            bf16::from_f32(((hsh & 1023) as f32 / 512.0 - 1.0) * amp)
        })
        .collect();
    gpu.upload(&v).unwrap()
}

fn zeros_bf16(gpu: &GpuContext, n: usize) -> CudaSlice<bf16> {
    gpu.zeros::<bf16>(n).unwrap()
}

fn bench_shape(c: &mut Criterion, gpu: &GpuContext, label: &str, sh: AttnShape) {
    let s = gpu.stream();
    let (b, n, h, dh, d) = (sh.batch, sh.tokens, sh.heads, sh.head_dim, sh.dim());
    let fwd_flop = 4 * b * h * n * n * dh;
    let bwd_flop = fwd_flop * 5 / 2;

    let qkv = noise(gpu, b * n * 3 * d, 2.0);
    let dout = noise(gpu, b * n * d, 0.5);
    let mut out = zeros_bf16(gpu, b * n * d);
    let mut lse = gpu.zeros::<f32>(b * h * n).unwrap();
    let mut dqkv = zeros_bf16(gpu, b * n * 3 * d);
    let mut scratch = gpu.zeros::<f32>(cuda::backward_scratch_len(&sh)).unwrap();
    let fwd_default = attention::fwd_tiles(dh).expect("a compiled head dim");
    let bwd_default = attention::bwd_tiles(dh).expect("a compiled head dim");

    // Unfused peer: per-head copies (untimed), the N x N probabilities and their gradient.
    let per = b * h * n * dh;
    let (mut q, mut k, mut v) = (zeros_bf16(gpu, per), zeros_bf16(gpu, per), zeros_bf16(gpu, per));
    cuda::unfused::split_heads(gpu, &qkv, &mut q, &mut k, &mut v, &sh).unwrap();
    let dout_h = noise(gpu, per, 0.5);
    let mut p = zeros_bf16(gpu, b * h * n * n);
    let mut dp = zeros_bf16(gpu, b * h * n * n);
    let mut o = zeros_bf16(gpu, per);
    let (mut dq, mut dk, mut dv) = (zeros_bf16(gpu, per), zeros_bf16(gpu, per), zeros_bf16(gpu, per));

    let mut g = c.benchmark_group(format!("attention {label}"));
    // Milliseconds per call: 10 samples keep the short mode short (criterion's 100 would take
    // 5050 calls per function).
    g.sample_size(10);
    g.throughput(Throughput::Elements(fwd_flop as u64));
    g.bench_function("fused forward (flop/s)", |bn| {
        bn.iter_custom(|it| timed(gpu, it, || cuda::forward_with(gpu, s, &qkv, &mut out, &mut lse, &sh, &fwd_default)))
    });
    g.bench_function("unfused forward (flop/s)", |bn| {
        bn.iter_custom(|it| timed(gpu, it, || cuda::unfused::forward(gpu, &q, &k, &v, &mut p, &mut o, &sh)))
    });
    g.throughput(Throughput::Elements(bwd_flop as u64));
    g.bench_function("fused backward (flop/s)", |bn| {
        bn.iter_custom(|it| {
            timed(gpu, it, || {
                cuda::backward_with(gpu, s, &qkv, &out, &lse, &dout, &mut dqkv, &mut scratch, &sh, &bwd_default)
            })
        })
    });
    g.bench_function("unfused backward (flop/s)", |bn| {
        bn.iter_custom(|it| {
            timed(gpu, it, || {
                cuda::unfused::backward(gpu, &q, &k, &v, &p, &dout_h, &mut dp, &mut dq, &mut dk, &mut dv, &sh)
            })
        })
    });
    // The alternative tile shapes of this head dim (the first of each list is the default,
    // measured above as "fused").
    let alt_fwd: Vec<_> = FWD_TILES.iter().filter(|t| t.head_dim == dh).skip(1).collect();
    let alt_bwd: Vec<_> = BWD_TILES.iter().filter(|t| t.head_dim == dh).skip(1).collect();
    g.throughput(Throughput::Elements(fwd_flop as u64));
    for t in &alt_fwd {
        g.bench_function(format!("fused forward {} (flop/s)", t.kernel), |bn| {
            bn.iter_custom(|it| timed(gpu, it, || cuda::forward_with(gpu, s, &qkv, &mut out, &mut lse, &sh, t)))
        });
    }
    g.throughput(Throughput::Elements(bwd_flop as u64));
    for t in &alt_bwd {
        g.bench_function(format!("fused backward {} (flop/s)", t.kernel), |bn| {
            bn.iter_custom(|it| {
                timed(gpu, it, || {
                    cuda::backward_with(gpu, s, &qkv, &out, &lse, &dout, &mut dqkv, &mut scratch, &sh, t)
                })
            })
        });
    }
    g.finish();

    // One plain summary line per shape in TFLOP/s (10 calls each, after criterion's warm-up).
    let tflops = |flop: usize, t: Duration| flop as f64 * 10.0 / t.as_secs_f64() / 1e12;
    let ff = tflops(
        fwd_flop,
        timed(gpu, 10, || cuda::forward_with(gpu, s, &qkv, &mut out, &mut lse, &sh, &fwd_default)),
    );
    let uf = tflops(
        fwd_flop,
        timed(gpu, 10, || cuda::unfused::forward(gpu, &q, &k, &v, &mut p, &mut o, &sh)),
    );
    let fb = tflops(
        bwd_flop,
        timed(gpu, 10, || {
            cuda::backward_with(gpu, s, &qkv, &out, &lse, &dout, &mut dqkv, &mut scratch, &sh, &bwd_default)
        }),
    );
    let ub = tflops(
        bwd_flop,
        timed(gpu, 10, || {
            cuda::unfused::backward(gpu, &q, &k, &v, &p, &dout_h, &mut dp, &mut dq, &mut dk, &mut dv, &sh)
        }),
    );
    eprintln!(
        "attention {label}: forward fused {ff:.1} TFLOP/s, unfused {uf:.1} ({:.2}x); backward fused {fb:.1}, unfused {ub:.1} ({:.2}x)",
        ff / uf,
        fb / ub
    );
    for t in &alt_fwd {
        let v = tflops(
            fwd_flop,
            timed(gpu, 10, || cuda::forward_with(gpu, s, &qkv, &mut out, &mut lse, &sh, t)),
        );
        eprintln!(
            "attention {label}: forward {} {v:.1} TFLOP/s ({:.2}x the default)",
            t.kernel,
            v / ff
        );
    }
    for t in &alt_bwd {
        let v = tflops(
            bwd_flop,
            timed(gpu, 10, || {
                cuda::backward_with(gpu, s, &qkv, &out, &lse, &dout, &mut dqkv, &mut scratch, &sh, t)
            }),
        );
        eprintln!(
            "attention {label}: backward {} {v:.1} TFLOP/s ({:.2}x the default)",
            t.kernel,
            v / fb
        );
    }
}

/// The plain fp32 attention (`ops::attention::cuda::plain_forward`/`plain_backward`, the path
/// of head dims without a fused kernel) at the ViT-B/16 shape with B 128, for the whole mask and
/// the last block's prompt queries. FLOPs: 2 per multiply-add over the (query, key) pairs the
/// prompt mask allows (`train::flops::attention_pairs`), 2 products forward, 5 backward.
fn bench_plain(c: &mut Criterion, gpu: &GpuContext) {
    const B: usize = 128;
    const D: usize = 768;
    const HEADS: usize = 12;
    const P: usize = 30;
    const N: usize = 1 + P + 196;
    let s = gpu.stream();
    // Stored as the model stores its tokens: [CLS, patches, prompts].
    let full = AttnShape::full(B, N, HEADS, D / HEADS, N - P, N);
    // The last block: queries at the prompt rows only.
    let tail = AttnShape {
        q_start: N - P,
        q_len: P,
        ..full
    };
    let qkv = noise_f32(gpu, B * N * 3 * D, 2.0);
    let mut out = zeros_f32(gpu, B * N * D);
    let mut lse = zeros_f32(gpu, B * HEADS * N);
    let dout = noise_f32(gpu, B * N * D, 0.5);
    let mut dqkv = zeros_f32(gpu, B * N * 3 * D);

    let mut g = c.benchmark_group("attention plain fp32 (flop/s)");
    // Tens of milliseconds per call: 10 samples keep the short mode short.
    g.sample_size(10);
    for (label, sh) in [("128x227 h12x64 masked", full), ("128x227 h12x64 prompt queries", tail)] {
        let madds = (B as u64) * attention_pairs(&sh) * D as u64;
        g.throughput(Throughput::Elements(2 * 2 * madds));
        g.bench_function(format!("forward {label}"), |b| {
            b.iter_custom(|it| timed(gpu, it, || cuda::plain_forward(gpu, s, &qkv, &mut out, &mut lse, &sh)))
        });
        // The backward reads the forward's lse: computed once for this shape, untimed.
        cuda::plain_forward(gpu, s, &qkv, &mut out, &mut lse, &sh).unwrap();
        g.throughput(Throughput::Elements(5 * 2 * madds));
        g.bench_function(format!("backward {label}"), |b| {
            b.iter_custom(|it| timed(gpu, it, || cuda::plain_backward(gpu, s, &qkv, &out, &lse, &dout, &mut dqkv, &sh)))
        });
    }
    g.finish();
}

/// Deterministic fp32 values in [-amp, amp).
fn noise_f32(gpu: &GpuContext, n: usize, amp: f32) -> CudaSlice<f32> {
    let v: Vec<f32> = (0..n)
        .map(|i| {
            let hsh = (i as u32).wrapping_mul(2_654_435_761) >> 16;
            ((hsh & 1023) as f32 / 512.0 - 1.0) * amp
        })
        .collect();
    gpu.upload(&v).unwrap()
}

fn zeros_f32(gpu: &GpuContext, n: usize) -> CudaSlice<f32> {
    gpu.zeros::<f32>(n).unwrap()
}

fn main() {
    let Some(gpu) = gpu_common::open("gpu_attention") else {
        return;
    };
    let mut c = Criterion::default().configure_from_args();
    let vit_b = AttnShape::full(128, 227, 12, 64, 1, 31);
    bench_shape(&mut c, &gpu, "B128 h12 N227 P30 dh64", vit_b);
    let long = AttnShape::full(32, 1025, 12, 64, 1, 31);
    bench_shape(&mut c, &gpu, "B32 h12 N1025 P30 dh64", long);
    // ViT-H/14 at 224 (16 heads of 80): the smaller tiles of the wider head dims.
    let vit_h = AttnShape::full(64, 287, 16, 80, 1, 31);
    bench_shape(&mut c, &gpu, "B64 h16 N287 P30 dh80", vit_h);
    bench_plain(&mut c, &gpu);
    c.final_summary();
}
