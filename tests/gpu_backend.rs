//! The CUDA backend against the CPU reference backend: every token op against its CPU twin
//! (awkward sizes, outputs pre-filled with the same random values on both sides, or NaN where
//! the op writes everything; moves of values bit for bit), in fp32 storage, in bf16 storage
//! (which also takes the casts around kernels of the other type) and in the mixes the bf16 step
//! uses, the storage each [`BufRole`] gets, and whole training
//! steps (loss, logits, every parameter gradient, a few AdamW steps) on tiny, fused-attention
//! and demo shapes in both precisions ([`Precision::Bf16`], the default, and `F32`). They need a device: `cargo test --features cuda -- --ignored` on a GPU machine
//! (tools/gpu-runner.sh runs them). Three tests run without one: the NaN poisoning's soundness
//! and the whole-step yardstick's own bounds (bf16 storage emulated on the CPU).
#![cfg(all(feature = "cuda", feature = "train"))]

mod common_model;
mod common_step;
mod gpu_common;

use common_model::{random_crops, tiny_config, trainer_on};
use common_step::{step_metrics, Bf16Emu};
use gpu_common::{bf16_values, rng, uniform};
use mlvpt::backend::{
    AslConfig, AttnShape, AugmentLayout, AugmentShape, Backend, BufRole, CpuBackend, Crop, CudaBackend, DevBuf, Grad, LinearShape,
    PatchShape, Precision, Residual, Rows, TokenCopy, TokenRange, TokenShape,
};
use mlvpt::model::{Method, ModelConfig, PromptDepth, VitConfig};
use mlvpt::ops::attention;
use mlvpt::train::{Crops, Trainer};
use rand_chacha::ChaCha8Rng;

/// The backend as `mlvpt train --device cuda` opens it (bf16 precision).
fn cuda() -> CudaBackend {
    CudaBackend::new(0).unwrap_or_else(|e| panic!("this test requires a CUDA device: {e}"))
}

fn cuda_in(p: Precision) -> CudaBackend {
    CudaBackend::with_precision(0, p).unwrap_or_else(|e| panic!("this test requires a CUDA device: {e}"))
}

/// One token op with its sizes; inputs and outputs are `bufs` (same order on both backends).
#[derive(Clone, Copy, Debug)]
enum Op {
    Patchify {
        b: usize,
        c: usize,
        h: usize,
        w: usize,
        p: usize,
    },
    Embed {
        b: usize,
        np: usize,
        prompts: usize,
        d: usize,
    },
    SetPrompts {
        layer: usize,
        b: usize,
        n: usize,
        p: usize,
        d: usize,
    },
    PromptGrad {
        layer: usize,
        b: usize,
        n: usize,
        p: usize,
        d: usize,
        zero: bool,
    },
    CopyTokens {
        sn: usize,
        ss: usize,
        dn: usize,
        ds: usize,
        count: usize,
        b: usize,
        d: usize,
    },
    Residual {
        rows: usize,
        d: usize,
        ls: bool,
    },
    MulCols {
        rows: usize,
        d: usize,
    },
    Axpby {
        len: usize,
    },
    Fill {
        len: usize,
    },
    Copy {
        len: usize,
    },
    Attention {
        sh: AttnShape,
    },
}

/// The layout of `n` tokens per image with `p` prompts (`n >= 1 + p`).
fn prompt_layout(batch: usize, n: usize, p: usize, dim: usize) -> TokenShape {
    TokenShape {
        batch,
        prompts: p,
        num_patches: n - 1 - p,
        dim,
    }
}

impl Op {
    /// Lengths of the buffers: inputs first, then outputs; and how many are outputs.
    fn buffers(&self) -> (Vec<usize>, usize) {
        match *self {
            Op::Patchify { b, c, h, w, .. } => (vec![b * c * h * w, b * c * h * w], 1),
            Op::Embed { b, np, prompts, d } => (vec![b * np * d, d, (1 + np) * d, b * (1 + prompts + np) * d], 1),
            Op::SetPrompts { layer, b, n, p, d } => (vec![(layer + 2) * p * d, b * n * d], 1),
            Op::PromptGrad { layer, b, n, p, d, .. } => (vec![b * n * d, (layer + 2) * p * d], 2),
            Op::CopyTokens { sn, dn, b, d, .. } => (vec![b * sn * d, b * dn * d], 1),
            Op::Residual { rows, d, .. } => (vec![rows * d, rows * d, d, rows * d], 1),
            Op::MulCols { rows, d } => (vec![rows * d, d, rows * d], 1),
            Op::Axpby { len } => (vec![len, len], 1),
            Op::Fill { len } => (vec![len + 3], 1),
            Op::Copy { len } => (vec![len, len + 5], 1),
            Op::Attention { sh } => {
                let (b, n, d) = (sh.batch, sh.tokens, sh.dim());
                // qkv, dout -> out, lse, dqkv
                (
                    vec![
                        b * n * 3 * d,
                        b * sh.q_len * d,
                        b * sh.q_len * d,
                        b * sh.heads * sh.q_len,
                        b * n * 3 * d,
                    ],
                    3,
                )
            }
        }
    }

    /// Whether every element of the outputs is written without being read (so NaN poison
    /// must disappear). Not `Axpby`: it reads `y` (`y = a y + b x`), so poison would stay.
    fn writes_all(&self) -> bool {
        matches!(
            self,
            Op::Patchify { .. } | Op::Residual { .. } | Op::MulCols { .. } | Op::Attention { .. }
        )
    }

    /// Whether the GPU must match the CPU bit for bit: moves of values, and in fp32 storage
    /// also a single add or multiply per element (one rounding on both sides).
    fn exact(&self, fp32: bool) -> bool {
        match self {
            Op::Patchify { .. } | Op::SetPrompts { .. } | Op::CopyTokens { .. } | Op::Fill { .. } | Op::Copy { .. } => true,
            Op::Embed { .. } | Op::Residual { ls: false, .. } | Op::MulCols { .. } => fp32,
            _ => false,
        }
    }
}

/// Runs `op` on `be` from the host values `init` in buffers allocated as `role`, returning
/// every buffer afterwards.
fn run<B: Backend>(be: &mut B, op: Op, init: &[Vec<f32>], role: BufRole) -> Vec<Vec<f32>> {
    run_as(be, op, init, &vec![role; init.len()])
}

/// [`run`] with buffer `i` allocated as `roles[i]`.
fn run_as<B: Backend>(be: &mut B, op: Op, init: &[Vec<f32>], roles: &[BufRole]) -> Vec<Vec<f32>> {
    assert_eq!(roles.len(), init.len(), "{op:?}: a role per buffer");
    let mut bufs: Vec<B::Buf> = init
        .iter()
        .zip(roles)
        .map(|(v, &role)| {
            let mut b = be.alloc_as(v.len(), role);
            be.upload(v, &mut b);
            b
        })
        .collect();
    match op {
        Op::Patchify { b, c, h, w, p } => {
            let [i, o] = &mut bufs[..] else { unreachable!() };
            let shape = PatchShape {
                batch: b,
                channels: c,
                height: h,
                width: w,
                patch: p,
            };
            be.patchify(i, o, &shape)
        }
        Op::Embed { b, np, prompts, d } => {
            let [pa, cls, pos, x] = &mut bufs[..] else { unreachable!() };
            let shape = TokenShape {
                batch: b,
                prompts,
                num_patches: np,
                dim: d,
            };
            be.embed_tokens(pa, cls, pos, x, &shape)
        }
        Op::SetPrompts { layer, b, n, p, d } => {
            let [pr, x] = &mut bufs[..] else { unreachable!() };
            be.set_prompts(pr, layer, x, &prompt_layout(b, n, p, d))
        }
        Op::PromptGrad { layer, b, n, p, d, zero } => {
            let [dx, dp] = &mut bufs[..] else { unreachable!() };
            be.prompt_grad(dx, dp, layer, &prompt_layout(b, n, p, d), zero)
        }
        Op::CopyTokens {
            sn,
            ss,
            dn,
            ds,
            count,
            b,
            d,
        } => {
            let [s, t] = &mut bufs[..] else { unreachable!() };
            let copy = TokenCopy {
                batch: b,
                dim: d,
                count,
                src: TokenRange { tokens: sn, start: ss },
                dst: TokenRange { tokens: dn, start: ds },
            };
            be.copy_tokens(s, t, &copy)
        }
        Op::Residual { rows, d, ls } => {
            let [x, f, l, o] = &mut bufs[..] else { unreachable!() };
            let res = Residual {
                x,
                f,
                ls: if ls { Some(&*l) } else { None },
            };
            be.residual(res, o, Rows { rows, dim: d })
        }
        Op::MulCols { rows, d } => {
            let [s, v, o] = &mut bufs[..] else { unreachable!() };
            be.mul_cols(s, v, o, Rows { rows, dim: d })
        }
        Op::Axpby { len } => {
            let [x, y] = &mut bufs[..] else { unreachable!() };
            be.axpby(0.75, y, -1.25, x, len)
        }
        Op::Fill { len } => be.fill(&mut bufs[0], len, 0.375),
        Op::Copy { len } => {
            let [s, t] = &mut bufs[..] else { unreachable!() };
            be.copy(s, t, len)
        }
        Op::Attention { sh } => {
            let [qkv, dout, out, lse, dqkv] = &mut bufs[..] else {
                unreachable!()
            };
            be.attention_forward(qkv, out, lse, &sh);
            be.attention_backward(qkv, out, lse, dout, dqkv, &sh);
        }
    }
    be.check().expect("backend error");
    bufs.iter()
        .zip(init)
        .map(|(b, v)| {
            let mut h = vec![0.0f32; v.len()];
            be.download(b, &mut h);
            h
        })
        .collect()
}

/// Runs `op` on both backends from the same random values (rounded to bf16 first with
/// `bf16_inputs`, for ops the GPU stores in bf16) and compares every buffer. The GPU's buffers
/// are allocated as `role` (bf16 storage for `Activation` on a bf16 backend).
#[allow(clippy::too_many_arguments)]
fn compare(op: Op, rng: &mut ChaCha8Rng, seed: u64, gpu: &mut CudaBackend, atol: f32, rtol: f32, bf16_inputs: bool, role: BufRole) {
    compare_as(op, rng, seed, gpu, atol, rtol, bf16_inputs, &vec![role; op.buffers().0.len()]);
}

/// [`compare`] with the GPU's buffer `i` allocated as `roles[i]` (mixed storage).
#[allow(clippy::too_many_arguments)]
fn compare_as(op: Op, rng: &mut ChaCha8Rng, seed: u64, gpu: &mut CudaBackend, atol: f32, rtol: f32, bf16_inputs: bool, roles: &[BufRole]) {
    let (lens, outs) = op.buffers();
    let first_out = lens.len() - outs;
    let init: Vec<Vec<f32>> = lens
        .iter()
        .map(|&n| {
            let v = uniform(rng, n, -2.0, 2.0);
            if bf16_inputs {
                bf16_values(&v).1
            } else {
                v
            }
        })
        .collect();
    let want = run(&mut CpuBackend::<f32>::new(), op, &init, BufRole::State);
    let mut gpu_init = init.clone();
    if op.writes_all() {
        for v in &mut gpu_init[first_out..] {
            v.fill(f32::NAN);
        }
    }
    let got = run_as(gpu, op, &gpu_init, roles);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        for (j, (&a, &b)) in g.iter().zip(w).enumerate() {
            assert!(
                (a - b).abs() <= atol + rtol * b.abs(),
                "{op:?}: buffer {i} element {j}: GPU {a}, CPU {b} (MLVPT_TEST_SEED={seed})"
            );
        }
    }
}

/// The token ops [`token_ops_match_their_cpu_twins`] runs, at awkward sizes.
const TOKEN_OPS: [Op; 15] = [
    Op::Patchify {
        b: 3,
        c: 3,
        h: 12,
        w: 20,
        p: 4,
    },
    Op::Patchify {
        b: 1,
        c: 1,
        h: 14,
        w: 14,
        p: 7,
    },
    Op::Embed {
        b: 3,
        np: 15,
        prompts: 7,
        d: 24,
    },
    Op::Embed {
        b: 2,
        np: 4,
        prompts: 0,
        d: 5,
    },
    Op::SetPrompts {
        layer: 1,
        b: 3,
        n: 13,
        p: 5,
        d: 9,
    },
    Op::PromptGrad {
        layer: 1,
        b: 5,
        n: 13,
        p: 5,
        d: 9,
        zero: true,
    },
    Op::PromptGrad {
        layer: 0,
        b: 3,
        n: 11,
        p: 3,
        d: 17,
        zero: false,
    },
    Op::CopyTokens {
        sn: 13,
        ss: 1,
        dn: 5,
        ds: 0,
        count: 5,
        b: 3,
        d: 7,
    },
    Op::CopyTokens {
        sn: 5,
        ss: 0,
        dn: 13,
        ds: 1,
        count: 5,
        b: 3,
        d: 7,
    },
    Op::Residual { rows: 37, d: 19, ls: true },
    Op::Residual {
        rows: 37,
        d: 19,
        ls: false,
    },
    Op::MulCols { rows: 29, d: 23 },
    Op::Axpby { len: 1001 },
    Op::Fill { len: 777 },
    Op::Copy { len: 333 },
];

#[test]
#[ignore = "requires a CUDA device"]
fn token_ops_match_their_cpu_twins() {
    let (mut r, seed) = rng("token_ops_match_their_cpu_twins");
    let mut gpu = cuda();
    let ops = TOKEN_OPS;
    // Moves and single roundings exactly ([`Op::exact`]), the rest within fp32 rounding.
    let tol = |op: Op, fp32: bool, loose: f32| if op.exact(fp32) { 0.0 } else { loose };
    for op in ops {
        let t = tol(op, true, 1e-6);
        compare(op, &mut r, seed, &mut gpu, t, t, false, BufRole::State);
    }
    // Every buffer bf16 (inputs bf16-exact): the `_bf16` kernel instantiations where an op has
    // them, casts around the fp32-only ones; outputs are rounded to bf16 (2^-8 relative) and
    // sums (prompt_grad) round their terms' sum once.
    let mut bf = cuda_in(Precision::Bf16);
    for op in ops {
        let t = tol(op, false, 1e-2);
        compare(op, &mut r, seed, &mut bf, t, t, true, BufRole::Activation);
    }
}

/// The token kernels' mixed-storage instantiations, as the bf16 training step mixes fp32 state
/// (`State`) with bf16 activations (`Activation`): `axpby` of each output type from the other
/// input type (`tok_axpby_f32_bf16`, `tok_axpby_bf16_f32`), the residual add of a bf16 branch
/// to the fp32 stream, `mul_cols` from fp32 into bf16, bf16 patches embedded into the fp32
/// stream, token copies and patchify across the types (exact: the values are bf16-exact).
#[test]
#[ignore = "requires a CUDA device"]
fn token_ops_on_mixed_storage_match_their_cpu_twins() {
    use BufRole::{Activation as B, State as F};
    let (mut r, seed) = rng("token_ops_on_mixed_storage_match_their_cpu_twins");
    let mut bf = cuda_in(Precision::Bf16);
    // (op, role of each buffer, atol, rtol): fp32 results within fp32 rounding, bf16 results
    // within one bf16 rounding (2^-8 relative, with room for an fma's last bit).
    let (f32_tol, bf16_tol, exact) = ((1e-6, 1e-6), (1e-5, 1.0 / 128.0), (0.0, 0.0));
    let cases: &[(Op, &[BufRole], (f32, f32))] = &[
        (Op::Axpby { len: 1001 }, &[B, F], f32_tol),
        (Op::Axpby { len: 1001 }, &[F, B], bf16_tol),
        (Op::Residual { rows: 37, d: 19, ls: true }, &[F, B, F, F], f32_tol),
        (
            Op::Residual {
                rows: 37,
                d: 19,
                ls: false,
            },
            &[F, B, F, F],
            exact,
        ),
        (Op::MulCols { rows: 29, d: 23 }, &[F, F, B], bf16_tol),
        (
            Op::Embed {
                b: 3,
                np: 15,
                prompts: 7,
                d: 24,
            },
            &[B, F, F, F],
            exact,
        ),
        (
            Op::CopyTokens {
                sn: 13,
                ss: 1,
                dn: 5,
                ds: 0,
                count: 5,
                b: 3,
                d: 7,
            },
            &[F, B],
            exact,
        ),
        (
            Op::CopyTokens {
                sn: 5,
                ss: 0,
                dn: 13,
                ds: 1,
                count: 5,
                b: 3,
                d: 7,
            },
            &[B, F],
            exact,
        ),
        (
            Op::Patchify {
                b: 3,
                c: 3,
                h: 12,
                w: 20,
                p: 4,
            },
            &[F, B],
            exact,
        ),
        (
            Op::Patchify {
                b: 3,
                c: 3,
                h: 12,
                w: 20,
                p: 4,
            },
            &[B, F],
            exact,
        ),
    ];
    for &(op, roles, (atol, rtol)) in cases {
        compare_as(op, &mut r, seed, &mut bf, atol, rtol, true, roles);
    }
}

/// The harness's NaN poisoning is only sound for ops whose result does not depend on the
/// outputs' old values: checked here on the CPU backend (no device needed), so a GPU run does
/// not fail on a poisoned buffer the op reads.
#[test]
fn poisoned_outputs_are_only_those_an_op_overwrites() {
    let (mut r, _) = rng("poisoned_outputs_are_only_those_an_op_overwrites");
    let attn = AttnShape {
        batch: 2,
        tokens: 9,
        heads: 2,
        head_dim: 4,
        prompt_start: 1,
        prompt_end: 4,
        q_start: 1,
        q_len: 3,
    };
    for op in TOKEN_OPS.into_iter().chain([Op::Attention { sh: attn }]).filter(Op::writes_all) {
        let (lens, outs) = op.buffers();
        let init: Vec<Vec<f32>> = lens.iter().map(|&n| uniform(&mut r, n, -2.0, 2.0)).collect();
        let mut poisoned = init.clone();
        for v in &mut poisoned[lens.len() - outs..] {
            v.fill(f32::NAN);
        }
        let want = run(&mut CpuBackend::<f32>::new(), op, &init, BufRole::State);
        let got = run(&mut CpuBackend::<f32>::new(), op, &poisoned, BufRole::State);
        assert!(got == want, "{op:?}: the result depends on the outputs' old values");
    }
}

#[test]
#[ignore = "requires a CUDA device"]
fn storage_follows_the_role_and_the_precision() {
    let roles = [BufRole::State, BufRole::Frozen, BufRole::Activation];
    let mut bf = cuda_in(Precision::Bf16);
    assert!(bf.name().starts_with("cuda-bf16"), "{}", bf.name());
    for role in roles {
        let b = bf.alloc_as(37, role);
        assert_eq!(b.len(), 37);
        let want_bf16 = role != BufRole::State;
        assert_eq!(b.is_bf16(), want_bf16, "{role:?} in bf16 mode: {b:?}");
        assert_eq!(matches!(b, DevBuf::Bf16(_)), want_bf16);
    }
    assert!(!bf.alloc(5).is_bf16(), "alloc is State: fp32");
    let mut f = cuda_in(Precision::F32);
    for role in roles {
        assert!(!f.alloc_as(9, role).is_bf16(), "{role:?} in f32 mode");
    }
    // Uploads round into bf16 storage; downloads widen exactly; copies between the types cast.
    let v: Vec<f32> = (0..37).map(|i| 1.0 + i as f32 / 300.0).collect();
    let (_, rounded) = bf16_values(&v);
    let mut act = bf.alloc_as(37, BufRole::Activation);
    bf.upload(&v, &mut act);
    let mut state = bf.alloc(37);
    bf.copy(&act, &mut state, 37);
    let (mut h1, mut h2) = (vec![0.0f32; 37], vec![0.0f32; 37]);
    bf.download(&act, &mut h1);
    bf.download(&state, &mut h2);
    bf.check().unwrap();
    assert_eq!(h1, rounded);
    assert_eq!(h2, rounded);
    assert_ne!(rounded, v, "the test values must not all be bf16-exact");
}

/// `buf` of `v` on `be`, stored in bf16 (an `Activation` on a bf16 backend) or fp32.
fn upload_as(be: &mut CudaBackend, v: &[f32], bf16: bool) -> DevBuf {
    let mut d = be.alloc_as(v.len(), if bf16 { BufRole::Activation } else { BufRole::State });
    be.upload(v, &mut d);
    d
}

/// `linear_forward` and `linear_backward_input` (accumulating) for every mix of fp32 and bf16
/// storage of the operands and the result, against the CPU on bf16-exact inputs. The step
/// uses only some mixes; fp32 operands with a bf16 result go through fp32 scratch (cuBLAS has
/// no such GEMM).
#[test]
#[ignore = "requires a CUDA device"]
fn linear_ops_accept_every_storage_mix() {
    let (mut r, seed) = rng("linear_ops_accept_every_storage_mix");
    let mut gpu = cuda_in(Precision::Bf16);
    let (rows, d_in, d_out) = (37, 48, 20);
    let mut vals = |n: usize| bf16_values(&uniform(&mut r, n, -1.0, 1.0)).1;
    let (x, w, b, dy, dx0) = (
        vals(rows * d_in),
        vals(d_out * d_in),
        vals(d_out),
        vals(rows * d_out),
        vals(rows * d_in),
    );
    let mut cpu = CpuBackend::<f32>::new();
    let (mut want_y, mut want_dx) = (vec![0.0f32; rows * d_out], dx0.clone());
    let shape = LinearShape { rows, d_in, d_out };
    cpu.linear_forward(&x, &w, Some(&b), &mut want_y, &shape);
    cpu.linear_backward_input(&dy, &w, Grad::Add(&mut want_dx), &shape);
    for mask in 0..8u32 {
        let (xb, wb, ob) = (mask & 1 != 0, mask & 2 != 0, mask & 4 != 0);
        let (xd, wd, bd) = (
            upload_as(&mut gpu, &x, xb),
            upload_as(&mut gpu, &w, wb),
            upload_as(&mut gpu, &b, false),
        );
        let dyd = upload_as(&mut gpu, &dy, xb);
        let mut yd = upload_as(&mut gpu, &vec![f32::NAN; rows * d_out], ob);
        let mut dxd = upload_as(&mut gpu, &dx0, ob);
        gpu.linear_forward(&xd, &wd, Some(&bd), &mut yd, &shape);
        gpu.linear_backward_input(&dyd, &wd, Grad::Add(&mut dxd), &shape);
        gpu.check()
            .unwrap_or_else(|e| panic!("x bf16 {xb}, w bf16 {wb}, out bf16 {ob}: {e:#}"));
        for (what, d, want) in [("y", &yd, &want_y), ("dx", &dxd, &want_dx)] {
            let mut got = vec![0.0f32; want.len()];
            gpu.download(d, &mut got);
            for (i, (&g, &e)) in got.iter().zip(want.iter()).enumerate() {
                assert!(
                    (g - e).abs() <= 1e-2 + 1e-2 * e.abs(),
                    "{what} (x bf16 {xb}, w bf16 {wb}, out bf16 {ob}) [{i}]: GPU {g}, CPU {e} (MLVPT_TEST_SEED={seed})"
                );
            }
        }
    }
}

#[test]
#[ignore = "requires a CUDA device"]
fn attention_paths_match_the_cpu_reference() {
    let (mut r, seed) = rng("attention_paths_match_the_cpu_reference");
    let mut gpu = cuda();
    // Head dims 4 and 24 take the plain fp32 kernels (tight tolerance), 32 and 64 the fused
    // bf16 ones (bf16 tolerance); full and prompt-row query ranges.
    for (hd, atol, rtol) in [(4usize, 2e-5f32, 1e-4f32), (24, 2e-5, 1e-4), (32, 3e-2, 3e-2), (64, 3e-2, 3e-2)] {
        for (q_start, q_len) in [(0usize, 23usize), (1, 6)] {
            let sh = AttnShape {
                batch: 2,
                tokens: 23,
                heads: 2,
                head_dim: hd,
                prompt_start: 1,
                prompt_end: 7,
                q_start,
                q_len,
            };
            compare(Op::Attention { sh }, &mut r, seed, &mut gpu, atol, rtol, hd >= 32, BufRole::State);
        }
    }
}

/// The yardstick itself, without a device: the bf16 storage roundings [`Bf16Emu`] emulates on
/// the CPU (every `Frozen` and `Activation` buffer of `train::step` rounded to bf16) keep a
/// step within `grad_bound` of fp32 on seeded shapes where bf16 is well-conditioned, and do
/// round something. A coarse guard on the roles, not a sharp one: putting the residual stream
/// and its gradient in bf16 too raises the worst gradient distance here by only about a
/// quarter (by ~1.8x on a 10-block model), within these bounds. The demo shape with the
/// test's deliberately large backbone weights is ill-conditioned in bf16 (its prompt gradient
/// moves by ~20%), so it is left to [`whole_step`]'s relative yardstick.
fn check_bf16_emulation(name: &str, cfg: &ModelConfig, branches: usize, batch: usize, grad_bound: f64) {
    let m = step_metrics(Bf16Emu::bf16_storage(), cfg, branches, batch);
    eprintln!("{name}: {m:#?}");
    assert!(
        m.logits <= 3e-2,
        "{name}: logits differ by {:.3e} (relative L2) with bf16 storage",
        m.logits
    );
    assert!(
        m.loss <= 2e-2,
        "{name}: loss differs by {:.3e} (relative) with bf16 storage",
        m.loss
    );
    let worst = m.grads.iter().map(|g| g.1).fold(0.0, f64::max);
    for (t, r) in &m.grads {
        assert!(
            *r <= grad_bound,
            "{name}: gradient of {t} differs by {r:.3e} (relative L2) with bf16 storage"
        );
    }
    // Not vacuous: the roles did put buffers in bf16.
    assert!(worst > 1e-5, "{name}: bf16 storage changed no gradient ({worst:.1e})");
    for (t, r) in &m.params_apart {
        assert!(
            *r <= 0.5,
            "{name}: after 3 AdamW steps {t} is {r:.3} of its movement away from the fp32 run's"
        );
    }
}

/// Runs without a device (see [`check_bf16_emulation`]).
#[test]
fn tiny_steps_with_emulated_bf16_storage_stay_within_3e_2_of_fp32() {
    check_bf16_emulation("tiny ml-vpt deep", &tiny_config(), 2, 3, 3e-2);
    let vpt = ModelConfig {
        method: Method::Vpt,
        prompt_depth: PromptDepth::Shallow,
        ..tiny_config()
    };
    check_bf16_emulation("tiny vpt shallow", &vpt, 1, 3, 3e-2);
}

/// Runs without a device (see [`check_bf16_emulation`]). Head dim 32 and D 64 (the shape of
/// [`fused_attention_training_step_matches_the_cpu`]): larger activations through LayerScale,
/// 4.6e-2 at most here.
#[test]
fn layer_scale_step_with_emulated_bf16_storage_stays_within_6e_2_of_fp32() {
    let vit = VitConfig {
        image_size: 16,
        patch: 4,
        channels: 3,
        dim: 64,
        depth: 2,
        heads: 2,
        mlp_dim: 128,
        layer_scale: true,
        final_norm: true,
    };
    check_bf16_emulation("head dim 32, layer scale", &ModelConfig { vit, ..tiny_config() }, 2, 4, 6e-2);
}

/// Fixed bounds on the distances of [`common_step::StepMetrics`]: (logits, loss, gradient, step loss,
/// parameters apart/moved after three AdamW steps).
fn floors(p: Precision) -> [f64; 5] {
    match p {
        // bf16 storage: each gradient tensor within 3e-2 (relative L2).
        Precision::Bf16 => [3e-2, 2e-2, 3e-2, 3e-2, 0.5],
        // fp32 storage: the bounds from before bf16 storage (its LayerNorm, GELU, fused
        // attention and head kernels still read bf16 casts).
        Precision::F32 => [3e-2, 2e-2, 6e-2, 3e-2, 0.5],
    }
}

/// Loss, logits and every gradient of one step, then three AdamW steps, GPU vs CPU, in both
/// precisions. Each distance must be within the larger of its fixed floor ([`floors`]) and 3x
/// the distance the same precision's roundings emulated on the CPU ([`Bf16Emu`], which leaves
/// out the kernels' internal roundings) give: a well-conditioned shape is held to the floor,
/// an ill-conditioned one (the demo with the test's large backbone weights, whose prompt
/// gradient bf16 storage alone moves by ~20%) to what bf16 does to it.
fn whole_step(name: &str, cfg: &ModelConfig, branches: usize, batch: usize) {
    whole_step_on(name, cfg, branches, batch, &cuda_in);
}

/// [`whole_step`] on the backends `make` opens per precision.
fn whole_step_on(name: &str, cfg: &ModelConfig, branches: usize, batch: usize, make: &dyn Fn(Precision) -> CudaBackend) {
    for p in [Precision::Bf16, Precision::F32] {
        let name = format!("{name} ({})", p.as_str());
        let emu = match p {
            Precision::Bf16 => Bf16Emu::bf16_storage(),
            Precision::F32 => Bf16Emu::casts_only(),
        };
        let want = step_metrics(emu, cfg, branches, batch);
        let got = step_metrics(make(p), cfg, branches, batch);
        eprintln!("{name}: GPU {got:#?}\nCPU emulation {want:#?}");
        let [fl, fo, fg, fs, fa] = floors(p);
        let bound = |floor: f64, emulated: f64| floor.max(3.0 * emulated);
        let within = |what: &str, g: f64, e: f64, floor: f64| {
            let b = bound(floor, e);
            assert!(
                g <= b,
                "{name}: {what} differs from the CPU's by {g:.3e}, above {b:.3e} (emulated bf16 roundings: {e:.3e})"
            );
        };
        within("logits (relative L2)", got.logits, want.logits, fl);
        within("loss (relative)", got.loss, want.loss, fo);
        for ((t, g), (_, e)) in got.grads.iter().zip(&want.grads) {
            within(&format!("gradient of {t} (relative L2)"), *g, *e, fg);
        }
        for (s, (g, e)) in got.step_losses.iter().zip(&want.step_losses).enumerate() {
            within(&format!("loss of AdamW step {s}"), *g, *e, fs);
        }
        // AdamW's first steps move each element by about lr * sign(g), so elements whose
        // gradient is within bf16 noise of zero may move the other way.
        for ((t, g), (_, e)) in got.params_apart.iter().zip(&want.params_apart) {
            within(&format!("{t} after 3 AdamW steps (apart/moved)"), *g, *e, fa);
        }
    }
}

#[test]
#[ignore = "requires a CUDA device"]
fn tiny_training_step_matches_the_cpu() {
    whole_step("tiny ml-vpt deep", &tiny_config(), 2, 3);
    let vpt = ModelConfig {
        method: Method::Vpt,
        prompt_depth: PromptDepth::Shallow,
        ..tiny_config()
    };
    whole_step("tiny vpt shallow", &vpt, 1, 3);
}

#[test]
#[ignore = "requires a CUDA device"]
fn fused_attention_training_step_matches_the_cpu() {
    // Head dim 32: the fused bf16 attention kernels; D 64 for the head kernels (D % 8 == 0).
    let vit = VitConfig {
        image_size: 16,
        patch: 4,
        channels: 3,
        dim: 64,
        depth: 2,
        heads: 2,
        mlp_dim: 128,
        layer_scale: true,
        final_norm: true,
    };
    let cfg = ModelConfig { vit, ..tiny_config() };
    whole_step("head dim 32, layer scale", &cfg, 2, 4);
}

#[test]
#[ignore = "requires a CUDA device"]
fn alternative_attention_kernels_in_a_training_step_match_the_cpu() {
    // Head dim 64 (D 128, 2 heads): every alternative pair of FWD_TILES/BWD_TILES through
    // CudaBackend::set_attention_tiles, as `mlvpt bench-step --attention-kernels` uses them.
    let vit = VitConfig {
        image_size: 16,
        patch: 4,
        channels: 3,
        dim: 128,
        depth: 2,
        heads: 2,
        mlp_dim: 256,
        layer_scale: false,
        final_norm: true,
    };
    let cfg = ModelConfig { vit, ..tiny_config() };
    let fwds: Vec<_> = attention::FWD_TILES.iter().copied().filter(|t| t.head_dim == 64).collect();
    let bwds: Vec<_> = attention::BWD_TILES.iter().copied().filter(|t| t.head_dim == 64).collect();
    for k in 1..fwds.len().max(bwds.len()) {
        let (f, b) = (fwds[k.min(fwds.len() - 1)], bwds[k.min(bwds.len() - 1)]);
        let make = |p: Precision| {
            let mut be = cuda_in(p);
            be.set_attention_tiles(Some(f), Some(b));
            be
        };
        whole_step_on(&format!("head dim 64, {} + {}", f.kernel, b.kernel), &cfg, 2, 4, &make);
    }
}

#[test]
#[ignore = "requires a CUDA device"]
fn fp32_head_kernels_in_a_training_step_match_the_cpu() {
    // The demo model with the head's fp32 CUDA-core kernels (the default is tensor cores),
    // as `mlvpt bench-step --head-kernels fp32` uses them.
    let make = |p: Precision| {
        let mut be = cuda_in(p);
        be.set_head_kernels(mlvpt::ops::head::HeadKernels::Fp32);
        be
    };
    whole_step_on("demo, fp32 head kernels", &ModelConfig::demo(), 2, 8, &make);
}

#[test]
#[ignore = "requires a CUDA device"]
fn demo_training_step_matches_the_cpu() {
    whole_step("demo", &ModelConfig::demo(), 2, 8);
}

#[test]
#[ignore = "requires a CUDA device"]
fn bad_shapes_are_errors_not_panics() {
    let mut be = cuda();
    let mut small = be.alloc(4);
    let big = be.alloc(100);
    be.copy(&big, &mut small, 50);
    let err = be.check().expect_err("copying 50 values into 4 must fail");
    assert!(err.to_string().contains("GPU") || format!("{err:#}").contains("copy"), "{err:#}");
    // The error is reported once; the backend works again afterwards.
    be.fill(&mut small, 4, 2.0);
    be.check().unwrap();
    let mut h = [0.0f32; 4];
    be.download(&small, &mut h);
    assert_eq!(h, [2.0; 4]);
}

/// The input staging of `--augment-on device`: crops staged through pinned memory and the copy
/// stream, areas reused and grown, against the CPU twin of the augment op.
#[test]
#[ignore = "requires a CUDA device"]
fn staged_crops_augment_like_the_cpu_twin() {
    let cfg = tiny_config();
    let (mean, std) = ([0.5f32, 0.4, 0.3], [0.2f32, 0.25, 0.3]);
    for p in [Precision::F32, Precision::Bf16] {
        let mut gpu = cuda_in(p);
        let mut cpu = CpuBackend::<f32>::new();
        let (mut ga, mut ca) = ([gpu.alloc_staging(), gpu.alloc_staging()], cpu.alloc_staging());
        // Small, large, small again: the areas grow and are reused; two batches in flight.
        let batches: Vec<_> = [(3, 1), (7, 2), (2, 3), (5, 4)]
            .into_iter()
            .map(|(b, seed)| random_crops(&cfg, b, seed))
            .collect();
        for (i, (pixels, crops, _)) in batches.iter().enumerate() {
            gpu.stage(&mut ga[i % 2], pixels, crops);
        }
        gpu.check().unwrap();
        // Staging batch 2 and 3 reused the areas of 0 and 1: augment the last two.
        for (i, (pixels, crops, _)) in batches.iter().enumerate().skip(2) {
            for layout in [AugmentLayout::Images, AugmentLayout::Patches { patch: 4 }] {
                let shape = AugmentShape {
                    batch: crops.len(),
                    size: 8,
                    layout,
                    mean,
                    std,
                };
                let mut out = gpu.alloc_as(shape.out_len(), BufRole::Activation);
                gpu.augment(&ga[i % 2], &mut out, &shape);
                let mut got = vec![0.0f32; shape.out_len()];
                gpu.download(&out, &mut got);
                gpu.check().unwrap();
                cpu.stage(&mut ca, pixels, crops);
                let mut want = cpu.alloc(shape.out_len());
                cpu.augment(&ca, &mut want, &shape);
                let tol = if p == Precision::Bf16 { 1e-2 } else { 1e-5 };
                for (j, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= tol * (1.0 + w.abs()),
                        "{p:?} batch {i} {layout:?} value {j}: {g} vs {w}"
                    );
                }
            }
        }
        // Stage and augment in turn with no host synchronisation in between: the copy into an
        // area waits (on the device) for the augment that last read it. Outputs read at the end.
        let shape = |crops: &[Crop]| AugmentShape {
            batch: crops.len(),
            size: 8,
            layout: AugmentLayout::Patches { patch: 4 },
            mean,
            std,
        };
        // (Allocated first: an allocation synchronises the device, which would order them too.)
        let mut outs: Vec<DevBuf> = batches
            .iter()
            .map(|(_, crops, _)| gpu.alloc_as(shape(crops).out_len(), BufRole::Activation))
            .collect();
        for (i, ((pixels, crops, _), out)) in batches.iter().zip(&mut outs).enumerate() {
            gpu.stage(&mut ga[i % 2], pixels, crops);
            gpu.augment(&ga[i % 2], out, &shape(crops));
        }
        for (i, ((pixels, crops, _), out)) in batches.iter().zip(&outs).enumerate() {
            let mut got = vec![0.0f32; shape(crops).out_len()];
            gpu.download(out, &mut got);
            gpu.check().unwrap();
            cpu.stage(&mut ca, pixels, crops);
            let mut want = cpu.alloc(got.len());
            cpu.augment(&ca, &mut want, &shape(crops));
            let tol = if p == Precision::Bf16 { 1e-2 } else { 1e-5 };
            for (j, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= tol * (1.0 + w.abs()),
                    "{p:?} in turn, batch {i} value {j}: {g} vs {w}"
                );
            }
        }
        // A table that does not fit its pixels is refused before any copy.
        let (pixels, mut crops, _) = random_crops(&cfg, 2, 9);
        crops[1].width += 50;
        gpu.stage(&mut ga[0], &pixels, &crops);
        let err = format!("{:#}", gpu.check().expect_err("a crop past the pixels must fail"));
        assert!(err.contains("crop 1"), "{err}");
    }
}

/// Training steps on staged crops (one batch staged ahead, as `mlvpt train --augment-on device`
/// feeds them) equal the steps on the CPU twin's images on the same device.
#[test]
#[ignore = "requires a CUDA device"]
fn staged_training_steps_match_steps_on_the_twins_images() {
    let cfg = tiny_config();
    let (mean, std) = ([0.485f32, 0.456, 0.406], [0.229f32, 0.224, 0.225]);
    for p in [Precision::F32, Precision::Bf16] {
        let mut a = trainer_on(cuda_in(p), &cfg, 2, AslConfig::default(), 3, 7);
        let mut b = trainer_on(cuda_in(p), &cfg, 2, AslConfig::default(), 3, 7);
        let batches: Vec<_> = (0..3).map(|i| random_crops(&cfg, 3 - i % 2, 20 + i as u64)).collect();
        let stage = |t: &mut Trainer<CudaBackend>, (pixels, crops, _): &(Vec<u8>, Vec<Crop>, Vec<f32>)| {
            t.stage(Crops { pixels, crops, mean, std }).unwrap()
        };
        let mut next = Some(stage(&mut a, &batches[0]));
        for (i, batch) in batches.iter().enumerate() {
            let current = next.take().unwrap();
            if i + 1 < batches.len() {
                next = Some(stage(&mut a, &batches[i + 1]));
            }
            let la = a.step_staged(current, &batch.2, 1e-2).unwrap();
            let shape = AugmentShape {
                batch: batch.1.len(),
                size: 8,
                layout: AugmentLayout::Images,
                mean,
                std,
            };
            let mut images = vec![0.0f32; shape.out_len()];
            mlvpt::ops::augment::cpu::augment(&batch.0, &batch.1, &mut images, &shape);
            let lb = b.step(&images, &batch.2, 1e-2).unwrap();
            let tol = if p == Precision::Bf16 { 1e-3 } else { 1e-5 };
            assert!((la - lb).abs() <= tol * lb.abs(), "{p:?} step {i}: staged {la} vs images {lb}");
        }
    }
}
