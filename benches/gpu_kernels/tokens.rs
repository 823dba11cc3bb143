//! Part of the `gpu_kernels` bench (one binary: each bench binary embeds every fatbin, and the
//! GPU bundle must stay under 64 MiB). Throughput of the token kernels of `kernels/tokens.cu`
//! (launchers `ops::tokens::cuda`), in bytes moved per second, at the ViT-B/16 training shape of
//! the CUDA backend: batch 128, N 227 tokens (CLS + 30 prompts + 196 patches), D 768, images
//! 3 x 224 x 224, fp32 buffers. Bytes count each buffer read or written once (small vectors such
//! as the position embeddings or a LayerScale row once, not per image). Filter: `cargo bench
//! --features cuda --bench gpu_kernels -- tokens`.

use criterion::{Criterion, Throughput};
use mlvpt::gpu::{CudaSlice, GpuContext};
use mlvpt::ops::tokens::cuda as tok;
use mlvpt::ops::tokens::{PatchShape, TokenCopy, TokenRange, TokenShape};
use mlvpt::ops::Rows;

use super::gpu_common::timed;

const B: usize = 128;
const D: usize = 768;
const P: usize = 30;
const IMAGE: usize = 224;
const PATCH: usize = 16;
const C: usize = 3;
const NP: usize = (IMAGE / PATCH) * (IMAGE / PATCH);
const N: usize = 1 + P + NP;
const ROWS: usize = B * N;
const F32: usize = 4;
const PATCHES: PatchShape = PatchShape {
    batch: B,
    channels: C,
    height: IMAGE,
    width: IMAGE,
    patch: PATCH,
};
const TOKENS: TokenShape = TokenShape {
    batch: B,
    prompts: P,
    num_patches: NP,
    dim: D,
};
/// The prompt rows of every image out to `[B, P, D]` (the last block's residual input).
const PROMPT_ROWS: TokenCopy = TokenCopy {
    batch: B,
    dim: D,
    count: P,
    src: TokenRange { tokens: N, start: 1 },
    dst: TokenRange { tokens: P, start: 0 },
};
const WIDE: Rows = Rows { rows: ROWS, dim: D };

/// Deterministic values in [-amp, amp) (a multiplicative hash of the index).
fn noise(gpu: &GpuContext, n: usize, amp: f32) -> CudaSlice<f32> {
    let v: Vec<f32> = (0..n)
        .map(|i| {
            let h = (i as u32).wrapping_mul(2_654_435_761) >> 16;
            ((h & 1023) as f32 / 512.0 - 1.0) * amp
        })
        .collect();
    gpu.upload(&v).unwrap()
}

fn zeros(gpu: &GpuContext, n: usize) -> CudaSlice<f32> {
    gpu.zeros::<f32>(n).unwrap()
}

fn bytes(floats: usize) -> Throughput {
    Throughput::Bytes((floats * F32) as u64)
}

fn bench_tokens(c: &mut Criterion, gpu: &GpuContext) {
    let s = gpu.stream();
    let mut g = c.benchmark_group("tokens");

    let n_img = B * C * IMAGE * IMAGE;
    let images = noise(gpu, n_img, 2.0);
    let mut patches = zeros(gpu, n_img);
    g.throughput(bytes(2 * n_img));
    g.bench_function("patchify 128x3x224x224 p16", |b| {
        b.iter_custom(|it| timed(gpu, it, || tok::patchify(gpu, s, &images, &mut patches, &PATCHES)))
    });

    let patch_emb = noise(gpu, B * NP * D, 1.0);
    let (cls, pos) = (noise(gpu, D, 0.02), noise(gpu, (1 + NP) * D, 0.02));
    let mut x = zeros(gpu, ROWS * D);
    g.throughput(bytes(B * NP * D + B * (1 + NP) * D + (2 + NP) * D));
    g.bench_function("embed_tokens 128x227x768", |b| {
        b.iter_custom(|it| timed(gpu, it, || tok::embed_tokens(gpu, s, &patch_emb, &cls, &pos, &mut x, &TOKENS)))
    });

    let prompts = noise(gpu, 12 * P * D, 0.1);
    g.throughput(bytes(P * D + B * P * D));
    g.bench_function("set_prompts 128x30x768", |b| {
        b.iter_custom(|it| timed(gpu, it, || tok::set_prompts(gpu, s, &prompts, 5, &mut x, &TOKENS)))
    });

    let mut dx = noise(gpu, ROWS * D, 0.01);
    let mut dprompts = zeros(gpu, 12 * P * D);
    g.throughput(bytes(B * P * D + P * D + B * P * D));
    g.bench_function("prompt_grad + zero rows 128x30x768", |b| {
        b.iter_custom(|it| timed(gpu, it, || tok::prompt_grad(gpu, s, &mut dx, &mut dprompts, 5, &TOKENS, true)))
    });

    let mut xtail = zeros(gpu, B * P * D);
    g.throughput(bytes(2 * B * P * D));
    g.bench_function("copy_tokens 128x30x768 (prompt rows out)", |b| {
        b.iter_custom(|it| timed(gpu, it, || tok::copy_tokens(gpu, s, &x, &mut xtail, &PROMPT_ROWS)))
    });

    let f = noise(gpu, ROWS * D, 0.5);
    let ls = noise(gpu, D, 0.1);
    let mut out = zeros(gpu, ROWS * D);
    g.throughput(bytes(3 * ROWS * D));
    g.bench_function("residual 29056x768", |b| {
        b.iter_custom(|it| timed(gpu, it, || tok::residual(gpu, s, &x, &f, None, &mut out, WIDE)))
    });
    g.throughput(bytes(3 * ROWS * D + D));
    g.bench_function("residual with LayerScale 29056x768", |b| {
        b.iter_custom(|it| timed(gpu, it, || tok::residual(gpu, s, &x, &f, Some(&ls), &mut out, WIDE)))
    });

    g.throughput(bytes(2 * ROWS * D + D));
    g.bench_function("mul_cols 29056x768", |b| {
        b.iter_custom(|it| timed(gpu, it, || tok::mul_cols(gpu, s, &f, &ls, &mut out, WIDE)))
    });

    g.throughput(bytes(3 * ROWS * D));
    g.bench_function("axpby 29056x768", |b| {
        b.iter_custom(|it| timed(gpu, it, || tok::axpby(gpu, s, 0.5, &mut out, 0.25, &f, ROWS * D)))
    });

    g.throughput(bytes(ROWS * D));
    g.bench_function("fill 29056x768", |b| {
        b.iter_custom(|it| timed(gpu, it, || tok::fill(gpu, s, &mut out, ROWS * D, 0.0)))
    });
    g.finish();
}

/// Every bench of this module.
pub fn bench(c: &mut Criterion, gpu: &GpuContext) {
    bench_tokens(c, gpu);
}
