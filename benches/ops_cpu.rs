//! Per-op CPU benches at the demo shape and a ViT-B-like shape. Linear and attention report
//! FLOP/s ("elem/s" = FLOP/s), LayerNorm bytes/s of input read, augmentation bytes/s moved
//! (uint8 pixels read and f32 patch rows written).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mlvpt::ops::attention::{cpu as attn, AttnShape};
use mlvpt::ops::augment::{self, AugmentShape, Layout};
use mlvpt::ops::layernorm::{LayerNormShape, Norm, NormStats};
use mlvpt::ops::linear::LinearShape;
use mlvpt::ops::{gelu, layernorm, linear, Grad, Rows};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Duration;

fn rv(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn bench(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut g = c.benchmark_group("ops_cpu");
    g.sample_size(10);
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(2));
    // (name, rows, in, out): demo qkv (64 x 77 tokens, 96 -> 288), ViT-B-like qkv (4 x 227, 768 -> 2304)
    for (name, rows, din, dout) in [("demo", 64 * 77, 96, 288), ("vitb", 4 * 227, 768, 2304)] {
        let x = rv(&mut rng, rows * din);
        let w = rv(&mut rng, dout * din);
        let b = rv(&mut rng, dout);
        let mut y = vec![0.0f32; rows * dout];
        let mut dx = vec![0.0f32; rows * din];
        g.throughput(Throughput::Elements((2 * rows * din * dout) as u64));
        g.bench_function(format!("linear fwd {name} {rows}x{din}->{dout}"), |bch| {
            bch.iter(|| {
                linear::cpu::forward(
                    &x,
                    &w,
                    Some(&b),
                    &mut y,
                    &LinearShape {
                        rows,
                        d_in: din,
                        d_out: dout,
                    },
                )
            })
        });
        g.bench_function(format!("linear dX {name} {rows}x{din}->{dout}"), |bch| {
            bch.iter(|| {
                linear::cpu::backward_input(
                    &y,
                    &w,
                    Grad::Write(&mut dx[..]),
                    &LinearShape {
                        rows,
                        d_in: din,
                        d_out: dout,
                    },
                )
            })
        });
    }
    for (name, rows, d) in [("demo", 64 * 77, 96), ("vitb", 4 * 227, 768)] {
        let x = rv(&mut rng, rows * d);
        let gm = rv(&mut rng, d);
        let bt = rv(&mut rng, d);
        let (mut y, mut m, mut s, mut dx) = (
            vec![0.0f32; rows * d],
            vec![0.0f32; rows],
            vec![0.0f32; rows],
            vec![0.0f32; rows * d],
        );
        g.throughput(Throughput::Bytes((rows * d * 4) as u64));
        g.bench_function(format!("layernorm fwd {name} {rows}x{d}"), |bch| {
            bch.iter(|| {
                layernorm::cpu::forward(
                    &x,
                    Norm {
                        gamma: &gm[..],
                        beta: &bt[..],
                    },
                    &mut y,
                    NormStats {
                        mean: &mut m[..],
                        rstd: &mut s[..],
                    },
                    &LayerNormShape { rows, dim: d, eps: 1e-6 },
                )
            })
        });
        g.bench_function(format!("layernorm bwd {name} {rows}x{d}"), |bch| {
            bch.iter(|| {
                layernorm::cpu::backward(
                    &y,
                    &x,
                    &gm,
                    NormStats {
                        mean: &m[..],
                        rstd: &s[..],
                    },
                    Grad::Write(&mut dx[..]),
                    &LayerNormShape { rows, dim: d, eps: 0.0 },
                )
            })
        });
    }
    // GELU over the demo MLP activations (64 x 77 x 384), bytes/s of input read.
    {
        let n = 64 * 77 * 384;
        let x = rv(&mut rng, n);
        let d0 = rv(&mut rng, n);
        let (mut y, mut d) = (vec![0.0f32; n], d0.clone());
        g.throughput(Throughput::Bytes((n * 4) as u64));
        let sh = Rows { rows: 64 * 77, dim: 384 };
        g.bench_function("gelu fwd demo 64x77x384", |bch| {
            bch.iter(|| gelu::cpu::forward(&x, None, &mut y, sh))
        });
        g.bench_function("gelu bwd demo 64x77x384", |bch| {
            bch.iter(|| {
                // fresh gradient each time (repeated in-place products would decay to denormals)
                d.copy_from_slice(&d0);
                gelu::cpu::backward(&x, None, &mut d, sh)
            })
        });
        // As the model runs it: fc1's bias added inside (forward and backward).
        let b = rv(&mut rng, 384);
        g.bench_function("gelu+bias fwd demo 64x77x384", |bch| {
            bch.iter(|| gelu::cpu::forward(&x, Some(&b), &mut y, sh))
        });
        g.bench_function("gelu+bias bwd demo 64x77x384", |bch| {
            bch.iter(|| {
                d.copy_from_slice(&d0);
                gelu::cpu::backward(&x, Some(&b), &mut d, sh)
            })
        });
    }
    // Augmentation into the patch rows: the demo's 32 x 32 images in 4 x 4 patches from 40 x 36
    // crops (B 64); ViT-B-like 224 x 224 in 16 x 16 patches from 400 x 300 crops (B 4).
    for (name, b, size, patch, w, h) in [("demo", 64, 32, 4, 40u32, 36u32), ("vitb", 4, 224, 16, 400, 300)] {
        let (crops, bytes) = augment::pack((0..b).map(|i| (w, h, i % 2 == 1)));
        let pixels: Vec<u8> = (0..bytes).map(|_| rng.random()).collect();
        let shape = AugmentShape {
            batch: b,
            size,
            layout: Layout::Patches { patch },
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        };
        let mut out = vec![0.0f32; shape.out_len()];
        g.throughput(Throughput::Bytes((bytes + 4 * shape.out_len()) as u64));
        g.bench_function(format!("augment {name} {b}x{size}x{size} p{patch} from {w}x{h}"), |bch| {
            bch.iter(|| augment::cpu::augment(&pixels, &crops, &mut out, &shape))
        });
    }
    // demo: B 64, N 77 (P 12), 4 heads of 24; ViT-B-like: B 4, N 227 (P 30), 12 heads of 64
    for (name, b, n, h, dh, p) in [("demo", 64, 77, 4, 24, 12), ("vitb", 4, 227, 12, 64, 30)] {
        let sh = AttnShape::full(b, n, h, dh, 1, 1 + p);
        let d = h * dh;
        let qkv = rv(&mut rng, b * n * 3 * d);
        let (mut out, mut lse, mut dq) = (vec![0.0f32; b * n * d], vec![0.0f32; b * h * n], vec![0.0f32; b * n * 3 * d]);
        let dout = rv(&mut rng, b * n * d);
        let mut scratch = Vec::new();
        g.throughput(Throughput::Elements((4 * b * h * n * n * dh) as u64));
        g.bench_function(format!("attention fwd {name} B{b} N{n} h{h}"), |bch| {
            bch.iter(|| attn::forward(&qkv, &mut out, &mut lse, &sh, &mut scratch))
        });
        g.throughput(Throughput::Elements((10 * b * h * n * n * dh) as u64));
        g.bench_function(format!("attention bwd {name} B{b} N{n} h{h}"), |bch| {
            bch.iter(|| attn::backward(&qkv, &out, &lse, &dout, &mut dq, &sh, &mut scratch))
        });
        // Block 0 with deep prompts (the model's layout: prompts last, queries CLS and the
        // patches): dK and dV at the prompt keys alone, four products of nq x P x dh.
        let nq = n - p;
        let block0 = AttnShape {
            q_start: 0,
            q_len: nq,
            ..AttnShape::full(b, n, h, dh, nq, n)
        };
        attn::forward(&qkv, &mut out, &mut lse, &block0, &mut scratch);
        g.throughput(Throughput::Elements((8 * b * h * nq * p * dh) as u64));
        g.bench_function(format!("attention bwd at the prompt keys {name} B{b} N{n} h{h} P{p}"), |bch| {
            bch.iter(|| attn::backward_keys(&qkv, &out, &lse, &dout, &mut dq, &block0, nq..n, &mut scratch))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
