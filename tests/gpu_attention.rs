//! The fused attention kernels (`kernels/attention.cu`) against the CPU reference
//! (`ops::attention::cpu`, run in f32 on the same bf16-rounded inputs) over a grid of token
//! counts, prompt counts, batch x heads and head dims, outputs and scratch poisoned with NaN
//! before each run; the prompt mask checked structurally (a prompt's key moves nobody but the
//! non-prompt rows and itself). They need a device: `cargo test --features cuda --test
//! gpu_attention -- --ignored` on a GPU machine (tools/gpu-runner.sh runs them).
#![cfg(feature = "cuda")]

mod attention_common;
mod gpu_common;

use attention_common::{assert_rel_max, check_against_cpu, slot, KernelOut};

use gpu_common::*;
use mlvpt::gpu::{bf16, GpuContext};
use mlvpt::ops::attention::{self, cuda, AttnShape, BwdTiles, FwdTiles, BWD_TILES, FWD_TILES};

fn shape(b: usize, h: usize, n: usize, p: usize, dh: usize) -> AttnShape {
    AttnShape::full(b, n, h, dh, 1, 1 + p)
}

/// The case grid: every (N, P) with 1 + P <= N at head dim 64 over 1x1, 2x3, 3x12 (the largest
/// N only at the two small ones, to keep the run short), a few cases at each other head dim
/// (32, 80 for ViT-H, 128), and query ranges (the model's last block asks for the prompt rows
/// only).
fn cases() -> Vec<AttnShape> {
    let mut v = Vec::new();
    for n in [1usize, 31, 227, 257, 1025] {
        for p in [0usize, 1, 30, 60] {
            if 1 + p > n {
                continue;
            }
            for (b, h) in [(1usize, 1usize), (2, 3), (3, 12)] {
                if n == 1025 && (b, h) == (3, 12) {
                    continue;
                }
                v.push(shape(b, h, n, p, 64));
            }
        }
    }
    for dh in [32usize, 80, 128] {
        for (n, p) in [(1usize, 0usize), (31, 30), (227, 30), (257, 60)] {
            v.push(shape(2, 3, n, p, dh));
        }
    }
    for (b, h, n, p, dh, q_start, q_len) in [
        (2usize, 3usize, 227usize, 30usize, 64usize, 1usize, 30usize),
        (1, 12, 1025, 60, 64, 1, 60),
        (2, 3, 31, 1, 64, 1, 1),
        (3, 2, 257, 30, 32, 1, 30),
        (2, 3, 257, 60, 64, 40, 200),
        (1, 2, 31, 0, 64, 5, 0),
        (2, 16, 287, 30, 80, 1, 30),
        (1, 8, 1025, 60, 128, 1, 60),
    ] {
        v.push(AttnShape {
            q_start,
            q_len,
            ..shape(b, h, n, p, dh)
        });
    }
    v
}

struct Inputs {
    qkv: Vec<f32>,
    dout: Vec<f32>,
}

/// Q, K, V in [-2, 2) (softmax rows from flat to peaked at dh 64), dout in [-1, 1), rounded to
/// bf16 (the f32 copies are exactly what the GPU sees).
fn inputs(rng: &mut rand_chacha::ChaCha8Rng, sh: &AttnShape) -> (Inputs, Vec<bf16>, Vec<bf16>) {
    let (tok, d) = (sh.batch * sh.tokens, sh.dim());
    let (qkv_b, qkv) = bf16_values(&uniform(rng, tok * 3 * d, -2.0, 2.0));
    let (dout_b, dout) = bf16_values(&uniform(rng, sh.batch * sh.q_len * d, -1.0, 1.0));
    (Inputs { qkv, dout }, qkv_b, dout_b)
}

struct GpuOut {
    out: Vec<f32>,
    lse: Vec<f32>,
    dqkv: Vec<f32>,
    out_bits: Vec<bf16>,
}

/// Forward then backward on the device with the default kernels, every output and the
/// scratch poisoned with NaN first.
fn run_gpu(gpu: &GpuContext, sh: &AttnShape, qkv: &[bf16], dout: &[bf16]) -> GpuOut {
    let fwd = attention::fwd_tiles(sh.head_dim).unwrap();
    let bwd = attention::bwd_tiles(sh.head_dim).unwrap();
    run_gpu_with(gpu, sh, qkv, dout, &fwd, &bwd)
}

/// [`run_gpu`] with the given tile shapes.
fn run_gpu_with(gpu: &GpuContext, sh: &AttnShape, qkv: &[bf16], dout: &[bf16], fwd: &FwdTiles, bwd: &BwdTiles) -> GpuOut {
    let (tok, d) = (sh.batch * sh.tokens, sh.dim());
    let s = gpu.stream();
    let qkv_d = gpu.upload(qkv).unwrap();
    // An empty query range still gets a non-empty (unused) dout buffer to upload.
    let dout_d = if dout.is_empty() {
        gpu.zeros::<bf16>(1).unwrap()
    } else {
        gpu.upload(dout).unwrap()
    };
    let mut out = nan_bf16(gpu, (sh.batch * sh.q_len * d).max(1));
    let mut lse = nan_f32(gpu, (sh.batch * sh.heads * sh.q_len).max(1));
    cuda::forward_with(gpu, s, &qkv_d, &mut out, &mut lse, sh, fwd).unwrap();
    let mut dqkv = nan_bf16(gpu, tok * 3 * d);
    let mut scratch = nan_f32(gpu, cuda::backward_scratch_len(sh).max(1));
    cuda::backward_with(gpu, s, &qkv_d, &out, &lse, &dout_d, &mut dqkv, &mut scratch, sh, bwd).unwrap();
    let out_bits = gpu.download(&out).unwrap();
    let dqkv = to_f32(&gpu.download(&dqkv).unwrap());
    let nq = sh.batch * sh.q_len;
    let lse = gpu.download(&lse).unwrap()[..nq * sh.heads].to_vec();
    let out_bits = out_bits[..nq * d].to_vec();
    GpuOut {
        out: to_f32(&out_bits),
        lse,
        dqkv,
        out_bits,
    }
}

#[test]
#[ignore = "requires a CUDA device"]
fn attention_forward_and_backward_match_cpu_over_shapes() {
    let gpu = gpu();
    let (mut rng, seed) = rng("attention_vs_cpu");
    for sh in cases() {
        let (x, qkv_b, dout_b) = inputs(&mut rng, &sh);
        let got = run_gpu(&gpu, &sh, &qkv_b, &dout_b);
        check_against_cpu(
            &sh,
            &x.qkv,
            &x.dout,
            &KernelOut {
                out: &got.out,
                lse: &got.lse,
                dqkv: &got.dqkv,
            },
            seed,
        );
    }
}

/// Every alternative tile shape (FWD_TILES, BWD_TILES past the first of a head dim; the
/// benchmark compares them with the default) against the CPU on a few awkward shapes (one key
/// tile, tiles crossing N and the prompt block, a query range), and bit-identical over two runs
/// (out, lse, dK, dV; dQ is summed by atomics).
#[test]
#[ignore = "requires a CUDA device"]
fn attention_alternative_tiles_match_cpu() {
    let gpu = gpu();
    let (mut rng, seed) = rng("attention_alt_tiles");
    for &dh in attention::FUSED_HEAD_DIMS {
        let fwds: Vec<FwdTiles> = FWD_TILES.iter().copied().filter(|t| t.head_dim == dh).collect();
        let bwds: Vec<BwdTiles> = BWD_TILES.iter().copied().filter(|t| t.head_dim == dh).collect();
        for k in 1..fwds.len().max(bwds.len()) {
            let (f, b) = (&fwds[k.min(fwds.len() - 1)], &bwds[k.min(bwds.len() - 1)]);
            let shapes = [
                shape(2, 3, 31, 30, dh),
                shape(2, 3, 227, 30, dh),
                shape(1, 2, 257, 60, dh),
                AttnShape {
                    q_start: 1,
                    q_len: 30,
                    ..shape(2, 3, 227, 30, dh)
                },
            ];
            for sh in shapes {
                let (x, qkv_b, dout_b) = inputs(&mut rng, &sh);
                let got = run_gpu_with(&gpu, &sh, &qkv_b, &dout_b, f, b);
                check_against_cpu(
                    &sh,
                    &x.qkv,
                    &x.dout,
                    &KernelOut {
                        out: &got.out,
                        lse: &got.lse,
                        dqkv: &got.dqkv,
                    },
                    seed,
                );
                let again = run_gpu_with(&gpu, &sh, &qkv_b, &dout_b, f, b);
                let what = format!("{} + {} at N {} (seed {seed})", f.kernel, b.kernel, sh.tokens);
                assert_bits_equal(&got, &again, &sh, &what, b.dq_kernel.is_some());
            }
        }
    }
}

/// out, lse, dK and dV of two runs are bit-identical, and dQ too with `with_dq` (the split
/// backward has no atomics).
fn assert_bits_equal(a: &GpuOut, b: &GpuOut, sh: &AttnShape, what: &str, with_dq: bool) {
    assert!(
        a.out_bits.iter().zip(&b.out_bits).all(|(x, y)| x.to_bits() == y.to_bits()),
        "{what}: out differs between runs"
    );
    assert!(
        a.lse.iter().zip(&b.lse).all(|(x, y)| x.to_bits() == y.to_bits()),
        "{what}: lse differs between runs"
    );
    for k in if with_dq { 0usize..3 } else { 1..3 } {
        let (x, y) = (
            slot(&a.dqkv, sh.batch * sh.tokens, sh.dim(), k),
            slot(&b.dqkv, sh.batch * sh.tokens, sh.dim(), k),
        );
        assert!(
            x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
            "{what}: d{} differs between runs",
            ["Q", "K", "V"][k]
        );
    }
}

/// Every compiled kernel (each forward and each backward tile shape of every head dim) on one
/// small shape, all queries and the prompt rows only: a key tile past N, a prompt block across
/// tiles, dQ rows outside the query range. Small so that
/// `compute-sanitizer --tool racecheck` and `memcheck` can run it in seconds
/// (tools/gpu-runner.sh does).
#[test]
#[ignore = "requires a CUDA device"]
fn attention_every_kernel_small() {
    let gpu = gpu();
    let (mut rng, seed) = rng("attention_every_kernel_small");
    for &dh in attention::FUSED_HEAD_DIMS {
        let fwds: Vec<FwdTiles> = FWD_TILES.iter().copied().filter(|t| t.head_dim == dh).collect();
        let bwds: Vec<BwdTiles> = BWD_TILES.iter().copied().filter(|t| t.head_dim == dh).collect();
        for k in 0..fwds.len().max(bwds.len()) {
            let (f, b) = (&fwds[k.min(fwds.len() - 1)], &bwds[k.min(bwds.len() - 1)]);
            for sh in [
                shape(1, 2, 131, 30, dh),
                AttnShape {
                    q_start: 1,
                    q_len: 30,
                    ..shape(1, 2, 131, 30, dh)
                },
            ] {
                let (x, qkv_b, dout_b) = inputs(&mut rng, &sh);
                let got = run_gpu_with(&gpu, &sh, &qkv_b, &dout_b, f, b);
                check_against_cpu(
                    &sh,
                    &x.qkv,
                    &x.dout,
                    &KernelOut {
                        out: &got.out,
                        lse: &got.lse,
                        dqkv: &got.dqkv,
                    },
                    seed,
                );
            }
        }
    }
}

/// Small awkward shapes on the default kernels and, at head dim 64, on every alternative tile
/// shape: one token; N below, across and past a 64-key tile (31, 67, 97, 131); a prompt block
/// across a key tile's edge (70 prompts, keys 1..71); several images and heads; query ranges
/// starting inside the prompt block (queries 40..90 of 60 prompts at head dim 32) and the
/// prompt rows only; head dims 80 and 128 at N 75. Plus the ViT-B shapes (N 227 with 30
/// prompts, 257 with 60: not tile multiples) on one image and head, default kernels.
#[test]
#[ignore = "requires a CUDA device"]
fn attention_awkward_small_shapes_match_cpu_on_every_tile_shape() {
    let gpu = gpu();
    let (mut rng, seed) = rng("attention_awkward_small_shapes");
    let mut shapes = vec![
        shape(1, 1, 1, 0, 64),
        shape(2, 1, 31, 30, 64),
        shape(1, 2, 97, 1, 64),
        shape(1, 1, 131, 70, 64),
        shape(2, 3, 67, 10, 32),
        AttnShape {
            q_start: 1,
            q_len: 30,
            ..shape(2, 1, 90, 30, 64)
        },
        AttnShape {
            q_start: 40,
            q_len: 50,
            ..shape(1, 2, 100, 60, 32)
        },
    ];
    for &dh in attention::FUSED_HEAD_DIMS.iter().filter(|&&dh| dh != 32 && dh != 64) {
        shapes.push(shape(1, 2, 75, 10, dh));
        shapes.push(AttnShape {
            q_start: 1,
            q_len: 10,
            ..shape(1, 1, 75, 10, dh)
        });
    }
    let fwds: Vec<FwdTiles> = FWD_TILES.iter().copied().filter(|t| t.head_dim == 64).collect();
    let bwds: Vec<BwdTiles> = BWD_TILES.iter().copied().filter(|t| t.head_dim == 64).collect();
    let mut runs: Vec<(AttnShape, FwdTiles, BwdTiles)> = Vec::new();
    for sh in [shape(1, 1, 227, 30, 64), shape(1, 1, 257, 60, 64)]
        .into_iter()
        .chain(shapes.iter().copied())
    {
        runs.push((
            sh,
            attention::fwd_tiles(sh.head_dim).unwrap(),
            attention::bwd_tiles(sh.head_dim).unwrap(),
        ));
    }
    for sh in shapes.iter().filter(|s| s.head_dim == 64 && s.tokens > 1) {
        for k in 1..fwds.len().max(bwds.len()) {
            runs.push((*sh, fwds[k.min(fwds.len() - 1)], bwds[k.min(bwds.len() - 1)]));
        }
    }
    for (sh, f, b) in runs {
        let (x, qkv_b, dout_b) = inputs(&mut rng, &sh);
        let got = run_gpu_with(&gpu, &sh, &qkv_b, &dout_b, &f, &b);
        check_against_cpu(
            &sh,
            &x.qkv,
            &x.dout,
            &KernelOut {
                out: &got.out,
                lse: &got.lse,
                dqkv: &got.dqkv,
            },
            seed,
        );
    }
}

/// Perturbing one prompt's key (image 0, every head) leaves the other prompts' outputs and
/// log-sum-exps bit-identical and image 1 untouched, and moves the prompt itself and (nearly)
/// every CLS/patch row. Also: two runs of the same inputs give the same out, lse, dK, dV bits.
#[test]
#[ignore = "requires a CUDA device"]
fn attention_prompt_keys_are_invisible_to_other_prompts() {
    let gpu = gpu();
    let (mut rng, seed) = rng("attention_prompt_mask");
    let sh = shape(2, 3, 227, 30, 64);
    let (n, d, h, dh) = (sh.tokens, sh.dim(), sh.heads, sh.head_dim);
    let (_, qkv_b, dout_b) = inputs(&mut rng, &sh);
    let base = run_gpu(&gpu, &sh, &qkv_b, &dout_b);
    let again = run_gpu(&gpu, &sh, &qkv_b, &dout_b);
    assert_bits_equal(&base, &again, &sh, &format!("default kernels (seed {seed})"), false);

    let victim = 2usize; // the second prompt
    let mut qkv2 = qkv_b.clone();
    for c in 0..d {
        let x = &mut qkv2[(victim * 3 + 1) * d + c]; // image 0, K slot, every head
        *x = bf16::from_f32(if c % 2 == 0 { 4.0 } else { -4.0 });
    }
    let pert = run_gpu(&gpu, &sh, &qkv2, &dout_b);
    let row = |o: &GpuOut, b: usize, i: usize, j: usize| -> Vec<u16> {
        o.out_bits[(b * n + i) * d + j * dh..(b * n + i) * d + (j + 1) * dh]
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };
    let (mut moved, mut rows) = (0usize, 0usize);
    for j in 0..h {
        for i in 0..n {
            let same = row(&base, 0, i, j) == row(&pert, 0, i, j);
            let lse_same = base.lse[j * n + i].to_bits() == pert.lse[j * n + i].to_bits();
            let prompt = i >= sh.prompt_start && i < sh.prompt_end;
            if prompt && i != victim {
                assert!(
                    same && lse_same,
                    "prompt {i} head {j} changed when prompt {victim}'s key moved (seed {seed})"
                );
            } else if i == victim {
                assert!(!same, "prompt {victim} head {j} ignores its own key (seed {seed})");
            } else {
                rows += 1;
                moved += !same as usize;
            }
            assert!(
                row(&base, 1, i, j) == row(&pert, 1, i, j),
                "image 1 token {i} head {j} changed (seed {seed})"
            );
        }
    }
    assert!(
        moved * 10 >= rows * 9,
        "only {moved} of {rows} CLS/patch rows moved with prompt {victim}'s key (seed {seed})"
    );
}

#[test]
#[ignore = "requires a CUDA device"]
fn attention_rejects_bad_shapes_and_short_buffers() {
    let gpu = gpu();
    let s = gpu.stream();
    let sh = shape(1, 2, 10, 3, 64);
    let (fwd, bwd) = (attention::fwd_tiles(64).unwrap(), attention::bwd_tiles(64).unwrap());
    let qkv = gpu.zeros::<bf16>(10 * 3 * 128).unwrap();
    let mut out = gpu.zeros::<bf16>(10 * 128).unwrap();
    let mut lse = gpu.zeros::<f32>(2 * 10).unwrap();
    let e = cuda::forward_with(
        &gpu,
        s,
        &qkv,
        &mut out,
        &mut lse,
        &AttnShape {
            head_dim: 48,
            heads: 8,
            ..sh
        },
        &fwd,
    )
    .unwrap_err();
    assert!(e.to_string().contains("head dim 48"), "{e}");
    let mut short = gpu.zeros::<f32>(19).unwrap();
    let e = cuda::forward_with(&gpu, s, &qkv, &mut out, &mut short, &sh, &fwd).unwrap_err();
    assert!(e.to_string().contains("lse has 19 elements, needs 20"), "{e}");
    let big = gpu.zeros::<bf16>(10 * 3 * 128 + 1).unwrap();
    let view = big.slice(1..);
    let e = cuda::forward_with(&gpu, s, &view, &mut out, &mut lse, &sh, &fwd).unwrap_err();
    assert!(e.to_string().contains("not 16-byte aligned"), "{e}");
    let mut dqkv = gpu.zeros::<bf16>(10 * 3 * 128).unwrap();
    let mut scratch = gpu.zeros::<f32>(cuda::backward_scratch_len(&sh) - 1).unwrap();
    let e = cuda::backward_with(&gpu, s, &qkv, &out, &lse, &out, &mut dqkv, &mut scratch, &sh, &bwd).unwrap_err();
    assert!(e.to_string().contains("scratch has"), "{e}");
}

/// The typed one-call API names the offending argument: mismatched shapes, a view past its
/// buffer, a non-contiguous head dim, a row stride that breaks 16-byte alignment, a wrong
/// output shape, a bad query range.
#[test]
#[ignore = "requires a CUDA device"]
fn attention_typed_calls_name_the_bad_argument() {
    use cuda::{AttnOptions, Qkv};
    use mlvpt::gpu::{Tensor, TensorMut};
    let gpu = gpu();
    let (b, n, h, dh) = (2, 10, 2, 32);
    let buf = gpu.zeros::<bf16>(b * n * h * dh + 64).unwrap();
    let t = |shape: [usize; 4]| Tensor::new(&buf, shape);
    let opts = AttnOptions::default();
    let err = |q: Tensor<'_, bf16, 4>, k, v, o: &AttnOptions| cuda::forward(&gpu, &Qkv::new(q, k, v), o).unwrap_err().to_string();
    let e = err(t([b, n, h, dh]), t([b, n - 1, h, dh]), t([b, n, h, dh]), &opts);
    assert!(e.contains("k has shape [2, 9, 2, 32]"), "{e}");
    let e = err(
        t([b, n, h, dh]),
        t([b, n, h, dh]),
        Tensor::strided(&buf, 72, [b, n, h, dh], [n * h * dh, h * dh, dh, 1]),
        &opts,
    );
    assert!(e.contains("v: ") && e.contains("past the buffer"), "{e}");
    let e = err(
        Tensor::strided(&buf, 0, [b, n, h, dh], [n * h * dh, h * dh, 1, h]),
        t([b, n, h, dh]),
        t([b, n, h, dh]),
        &opts,
    );
    assert!(e.contains("q: the last dimension must be contiguous"), "{e}");
    let odd = Tensor::strided(&buf, 0, [b, n, h, dh], [n * h * dh, h * dh + 4, dh, 1]);
    let e = err(t([b, n, h, dh]), t([b, n, h, dh]), odd, &opts);
    assert!(e.contains("v: ") && e.contains("not a multiple of 8 elements"), "{e}");
    let e = err(
        t([b, n, h, dh]),
        t([b, n, h, dh]),
        t([b, n, h, dh]),
        &AttnOptions {
            prompts: None,
            queries: Some(3..12),
        },
    );
    assert!(e.contains("query range 3..12"), "{e}");
    let e = err(t([b, n, 1, 48]), t([b, n, 1, 48]), t([b, n, 1, 48]), &opts);
    assert!(e.contains("head dim 48"), "{e}");
    let (mut o, mut l) = (gpu.zeros::<bf16>(b * n * h * dh).unwrap(), gpu.zeros::<f32>(b * h * n).unwrap());
    let qkv = Qkv::new(t([b, n, h, dh]), t([b, n, h, dh]), t([b, n, h, dh]));
    let e = cuda::forward_into(
        &gpu,
        &qkv,
        &mut TensorMut::new(&mut o, [b, n - 1, h, dh]),
        &mut TensorMut::new(&mut l, [b, h, n]),
        &opts,
    )
    .unwrap_err();
    assert!(e.to_string().contains("out has shape [2, 9, 2, 32], needs [2, 10, 2, 32]"), "{e}");
}

/// Separate Q, K, V in another layout (`[B, h, N, dh]` storage, read through strides) and
/// separate gradients give what the packed `qkv [B, N, 3, h, dh]` path gives: out, lse, dK and
/// dV bit for bit (same kernels, same order of sums), dQ to fp32-atomics rounding; and a query
/// range with the prompt mask through the one-call API matches the CPU twin.
#[test]
#[ignore = "requires a CUDA device"]
fn attention_typed_views_separate_and_strided_match_the_packed_path() {
    use cuda::{AttnOptions, Qkv, QkvGrads};
    use mlvpt::gpu::{Tensor, TensorMut};
    let gpu = gpu();
    let (mut rng, seed) = rng("attention_typed_views");
    for (sh, dh) in [
        (shape(2, 3, 75, 10, 64), 64),
        (
            AttnShape {
                q_start: 1,
                q_len: 10,
                ..shape(1, 2, 40, 10, 32)
            },
            32,
        ),
    ] {
        let (b, n, h, d) = (sh.batch, sh.tokens, sh.heads, sh.dim());
        let (x, qkv_b, dout_b) = inputs(&mut rng, &sh);
        let packed = run_gpu(&gpu, &sh, &qkv_b, &dout_b);
        // [B, N, 3, h, dh] -> three [B, h, N, dh] buffers.
        let heads_major = |slot: usize| -> Vec<bf16> {
            let mut y = vec![bf16::ZERO; b * h * n * dh];
            for bi in 0..b {
                for i in 0..n {
                    for j in 0..h {
                        for c in 0..dh {
                            y[((bi * h + j) * n + i) * dh + c] = qkv_b[((bi * n + i) * 3 + slot) * d + j * dh + c];
                        }
                    }
                }
            }
            y
        };
        let bufs: Vec<_> = (0..3).map(|s| gpu.upload(&heads_major(s)).unwrap()).collect();
        let st = [h * n * dh, dh, n * dh, 1]; // [B, N, h, dh] strides of [B, h, N, dh] storage
        let view = |i: usize| Tensor::strided(&bufs[i], 0, [b, n, h, dh], st);
        let qkv = Qkv::new(view(0), view(1), view(2));
        let opts = AttnOptions {
            prompts: Some(sh.prompt_start..sh.prompt_end),
            queries: Some(sh.q_start..sh.q_start + sh.q_len),
        };
        let fwd = cuda::forward(&gpu, &qkv, &opts).unwrap();
        assert_eq!(fwd.shape, [b, sh.q_len, h, dh]);
        assert_eq!(gpu.download(&fwd.out).unwrap(), packed.out_bits, "out, seed {seed}");
        assert_eq!(gpu.download(&fwd.lse).unwrap(), packed.lse, "lse, seed {seed}");
        let dout = gpu.upload(&dout_b).unwrap();
        let mut g: Vec<_> = (0..3).map(|_| nan_bf16(&gpu, b * h * n * dh)).collect();
        let [g0, g1, g2] = &mut g[..] else { unreachable!() };
        let grads = QkvGrads::Separate {
            dq: TensorMut::strided(g0, 0, [b, n, h, dh], st),
            dk: TensorMut::strided(g1, 0, [b, n, h, dh], st),
            dv: TensorMut::strided(g2, 0, [b, n, h, dh], st),
        };
        cuda::backward(&gpu, &qkv, &fwd.out(), &fwd.lse(), &Tensor::new(&dout, fwd.shape), grads, &opts).unwrap();
        for (k_slot, (name, buf)) in [("dQ", &g[0]), ("dK", &g[1]), ("dV", &g[2])].into_iter().enumerate() {
            let got = to_f32(&gpu.download(buf).unwrap());
            let want = slot(&packed.dqkv, b * n, d, k_slot);
            let got_tokens: Vec<f32> = (0..b * n * d)
                .map(|e| {
                    let (bi, i, j, c) = (e / (n * d), (e / d) % n, (e % d) / dh, e % dh);
                    got[((bi * h + j) * n + i) * dh + c]
                })
                .collect();
            if k_slot == 0 {
                assert_rel_max(name, &got_tokens, &want, 1e-2, seed);
            } else {
                assert!(got_tokens == want, "{name} differs from the packed path (seed {seed})");
            }
        }
        // And the packed one-call API against the CPU twin.
        let qkv_d = gpu.upload(&qkv_b).unwrap();
        let fwd = cuda::forward(&gpu, &Qkv::packed(&qkv_d, b, n, h, dh), &opts).unwrap();
        let mut dqkv = nan_bf16(&gpu, b * n * 3 * d);
        cuda::backward(
            &gpu,
            &Qkv::packed(&qkv_d, b, n, h, dh),
            &fwd.out(),
            &fwd.lse(),
            &Tensor::new(&dout, fwd.shape),
            QkvGrads::Packed(&mut dqkv),
            &opts,
        )
        .unwrap();
        let out = to_f32(&gpu.download(&fwd.out).unwrap());
        let lse = gpu.download(&fwd.lse).unwrap();
        check_against_cpu(
            &sh,
            &x.qkv,
            &x.dout,
            &KernelOut {
                out: &out,
                lse: &lse,
                dqkv: &to_f32(&gpu.download(&dqkv).unwrap()),
            },
            seed,
        );
    }
}

/// The unfused peer the bench times (cuBLAS strided-batched GEMMs, bf16 score matrix) computes
/// the same function: its output and gradients match the fused kernels' within the looser
/// bound its bf16 scores allow.
#[test]
#[ignore = "requires a CUDA device"]
fn attention_unfused_peer_matches_the_fused_kernels() {
    let gpu = gpu();
    let (mut rng, seed) = rng("attention_unfused_peer");
    let sh = shape(2, 3, 227, 30, 64);
    let (b, n, h, dh, d) = (sh.batch, sh.tokens, sh.heads, sh.head_dim, sh.dim());
    let (_, qkv_b, dout_b) = inputs(&mut rng, &sh);
    let fused = run_gpu(&gpu, &sh, &qkv_b, &dout_b);

    // [B, N, h, dh] <-> [B, h, N, dh]
    let to_heads = |x: &[f32]| -> Vec<f32> {
        let mut y = vec![0.0f32; x.len()];
        for bi in 0..b {
            for i in 0..n {
                for j in 0..h {
                    for c in 0..dh {
                        y[((bi * h + j) * n + i) * dh + c] = x[(bi * n + i) * d + j * dh + c];
                    }
                }
            }
        }
        y
    };
    let per = b * h * n * dh;
    let qkv_d = gpu.upload(&qkv_b).unwrap();
    let (mut q, mut k, mut v) = (nan_bf16(&gpu, per), nan_bf16(&gpu, per), nan_bf16(&gpu, per));
    cuda::unfused::split_heads(&gpu, &qkv_d, &mut q, &mut k, &mut v, &sh).unwrap();
    let mut p = nan_bf16(&gpu, b * h * n * n);
    let mut o = nan_bf16(&gpu, per);
    cuda::unfused::forward(&gpu, &q, &k, &v, &mut p, &mut o, &sh).unwrap();
    let dout_h: Vec<bf16> = to_heads(&to_f32(&dout_b)).into_iter().map(bf16::from_f32).collect();
    let dout_d = gpu.upload(&dout_h).unwrap();
    let mut dp = nan_bf16(&gpu, b * h * n * n);
    let (mut dq, mut dk, mut dv) = (nan_bf16(&gpu, per), nan_bf16(&gpu, per), nan_bf16(&gpu, per));
    cuda::unfused::backward(&gpu, &q, &k, &v, &p, &dout_d, &mut dp, &mut dq, &mut dk, &mut dv, &sh).unwrap();

    let tol = 5e-2;
    assert_rel_max("unfused out", &to_f32(&gpu.download(&o).unwrap()), &to_heads(&fused.out), tol, seed);
    for (k_slot, (name, got)) in [("dQ", &dq), ("dK", &dk), ("dV", &dv)].into_iter().enumerate() {
        let want = to_heads(&slot(&fused.dqkv, b * n, d, k_slot));
        assert_rel_max(&format!("unfused {name}"), &to_f32(&gpu.download(got).unwrap()), &want, tol, seed);
    }
}
