//! Masked attention (docs/MODEL.md#the-prompt-augmented-attention-mask, `src/ops/attention`).
//! CPU: the twin (f64) against the definition and its gradient against finite differences,
//! the f32 twin (the fast path: `fast_exp`, blocked sums) against the f64 definition, and the
//! prompt mask structurally. On a device: the fused kernels (`kernels/attention.cu`) against
//! the f32 twin on the same bf16-rounded inputs over a grid of token counts, prompt counts,
//! batch x heads and head dims, outputs and scratch poisoned with NaN before each run; the
//! prompt mask structurally; the typed one-call API; the unfused peer; and the plain fp32
//! kernels.

use crate::common::*;
use mlvpt::ops::attention::{cpu as attn, AttnShape};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Masked attention by its definition, one query at a time.
fn naive_attention(qkv: &[f64], sh: &AttnShape) -> Vec<f64> {
    let (b, n, h, dh) = (sh.batch, sh.tokens, sh.heads, sh.head_dim);
    let d = h * dh;
    let mut out = vec![0.0; b * n * d];
    let at = |bi: usize, t: usize, w: usize, hi: usize| &qkv[bi * n * 3 * d + t * 3 * d + w * d + hi * dh..][..dh];
    for bi in 0..b {
        for hi in 0..h {
            for i in 0..n {
                let keys: Vec<usize> = (0..n).filter(|&j| sh.allowed(i, j)).collect();
                let s: Vec<f64> = keys
                    .iter()
                    .map(|&j| dot(at(bi, i, 0, hi), at(bi, j, 1, hi)) / (dh as f64).sqrt())
                    .collect();
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|v| (v - mx).exp()).sum();
                for (&j, sv) in keys.iter().zip(&s) {
                    let p = (sv - mx).exp() / z;
                    for c in 0..dh {
                        out[bi * n * d + i * d + hi * dh + c] += p * at(bi, j, 2, hi)[c];
                    }
                }
            }
        }
    }
    out
}

#[test]
fn attention_mask_forward_and_gradient() {
    for (prompts, n) in [(0usize, 5usize), (1, 6), (3, 7), (3, 9)] {
        let mut rng = ChaCha8Rng::seed_from_u64(4 + prompts as u64);
        let sh = AttnShape::full(2, n, 2, 3, 1, 1 + prompts);
        let d = sh.dim();
        let qkv = rand_vec(&mut rng, 2 * n * 3 * d, 1.5);
        let r = rand_vec(&mut rng, 2 * n * d, 1.0);
        let mut scratch = Vec::new();
        let mut fwd = |qkv: &[f64]| {
            let (mut out, mut lse) = (vec![0.0; 2 * n * d], vec![0.0; 2 * 2 * n]);
            attn::forward(qkv, &mut out, &mut lse, &sh, &mut scratch);
            (out, lse)
        };
        let (out, lse) = fwd(&qkv);
        let want = naive_attention(&qkv, &sh);
        assert!(
            max_abs_diff(&out, &want) < 1e-12,
            "P={prompts}: forward differs from the definition"
        );
        let mut dqkv = vec![0.0; 2 * n * 3 * d];
        let mut scratch2 = Vec::new();
        attn::backward(&qkv, &out, &lse, &r, &mut dqkv, &sh, &mut scratch2);
        fd_check(&format!("attention dqkv (P={prompts}, N={n})"), &qkv, &dqkv, |q| dot(&fwd(q).0, &r));

        // Queries restricted to the prompt rows (the last block): the same rows as the full
        // forward, and the gradient of the full op with dout zero outside those rows.
        if prompts > 0 {
            let sub = AttnShape {
                q_start: 1,
                q_len: prompts,
                ..sh
            };
            let (mut o2, mut l2, mut sc) = (vec![0.0; 2 * prompts * d], vec![0.0; 2 * 2 * prompts], Vec::new());
            attn::forward(&qkv, &mut o2, &mut l2, &sub, &mut sc);
            let mut r_full = vec![0.0; 2 * n * d];
            let mut r_sub = vec![0.0; 2 * prompts * d];
            for b in 0..2 {
                for i in 0..prompts {
                    for c in 0..d {
                        assert!((o2[(b * prompts + i) * d + c] - out[(b * n + 1 + i) * d + c]).abs() < 1e-14);
                        r_sub[(b * prompts + i) * d + c] = r[(b * n + 1 + i) * d + c];
                        r_full[(b * n + 1 + i) * d + c] = r[(b * n + 1 + i) * d + c];
                    }
                }
            }
            let mut want = vec![0.0; 2 * n * 3 * d];
            attn::backward(&qkv, &out, &lse, &r_full, &mut want, &sh, &mut sc);
            let mut got = vec![f64::NAN; 2 * n * 3 * d];
            attn::backward(&qkv, &o2, &l2, &r_sub, &mut got, &sub, &mut sc);
            assert!(max_abs_diff(&got, &want) < 1e-12, "P={prompts}: query-subset backward differs");
        }
    }
}

/// The f32 twin, the CPU backend's fast path (`fast_exp`, eight-lane sums and maxima, `matmul`),
/// against the f64 definition ([`naive_attention`]) forward and the f64 twin (checked against
/// finite differences above) backward, on all queries and on the prompt rows only.
#[test]
fn f32_attention_matches_the_f64_definition() {
    for (prompts, n, rows) in [
        (0usize, 5usize, None),
        (3, 9, None),
        (30, 67, None),
        (30, 67, Some((1usize, 30usize))),
    ] {
        let mut rng = ChaCha8Rng::seed_from_u64(40 + n as u64);
        let full = AttnShape::full(2, n, 3, 8, 1, 1 + prompts);
        let sh = rows.map_or(full, |(q_start, q_len)| AttnShape { q_start, q_len, ..full });
        let (d, nq) = (sh.dim(), sh.q_len);
        let qkv = rand_vec(&mut rng, 2 * n * 3 * d, 1.5);
        let dout = rand_vec(&mut rng, 2 * nq * d, 1.0);
        let (mut out, mut lse, mut dqkv, mut sc) = (vec![0.0; 2 * nq * d], vec![0.0; 2 * 3 * nq], vec![0.0; 2 * n * 3 * d], Vec::new());
        attn::forward(&qkv, &mut out, &mut lse, &sh, &mut sc);
        attn::backward(&qkv, &out, &lse, &dout, &mut dqkv, &sh, &mut sc);
        let naive = naive_attention(&qkv, &full);
        let want_out: Vec<f64> = (0..2 * nq * d)
            .map(|e| naive[((e / (nq * d)) * n + sh.q_start + (e / d) % nq) * d + e % d])
            .collect();

        let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        let (q32, dout32) = (f32s(&qkv), f32s(&dout));
        let (mut o32, mut l32, mut d32, mut sc32) = (
            vec![0.0f32; out.len()],
            vec![0.0f32; lse.len()],
            vec![0.0f32; dqkv.len()],
            Vec::new(),
        );
        attn::forward(&q32, &mut o32, &mut l32, &sh, &mut sc32);
        attn::backward(&q32, &o32, &l32, &dout32, &mut d32, &sh, &mut sc32);
        let wide = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
        // f32 rounding of inputs, exp and sums: a few 1e-7 relative to the values' scale.
        for (what, got, want) in [
            ("out", wide(&o32), &want_out),
            ("lse", wide(&l32), &lse),
            ("dqkv", wide(&d32), &dqkv),
        ] {
            let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
            let err = max_abs_diff(&got, want);
            assert!(
                err <= 1e-5 * scale,
                "P={prompts} N={n} rows {rows:?}: f32 {what} off by {err:e} (scale {scale})"
            );
        }
    }
}

/// `backward_keys` (block 0 with deep prompts: dK and dV at the prompt rows, which are not
/// queries) against the full backward at those rows, in f64 (the generic twin) and in f32 (the
/// fast path at head widths on and off its vectors, and the generic one at a head width it does
/// not take): Q columns of the key rows zero, every other row untouched.
#[test]
fn the_backward_at_key_rows_is_the_full_backward_there() {
    // (batch, tokens, heads, head width, prompts at the end, key rows, query rows)
    for (b, n, h, dh, p, keys, q) in [
        (2usize, 23usize, 3usize, 8usize, 6usize, 17..23, (0usize, 17usize)),
        (3, 41, 2, 24, 9, 32..41, (0, 32)),
        (2, 37, 2, 64, 5, 32..37, (0, 32)),
        (2, 19, 2, 6, 4, 15..19, (0, 15)),
        // Keys before the queries; prompt keys that prompt queries may not see (the mask at
        // a key offset).
        (2, 29, 2, 16, 7, 0..10, (10, 19)),
        (2, 29, 2, 16, 7, 25..29, (10, 15)),
    ] {
        let mut rng = ChaCha8Rng::seed_from_u64(70 + n as u64);
        let sh = AttnShape {
            q_start: q.0,
            q_len: q.1,
            ..AttnShape::full(b, n, h, dh, n - p, n)
        };
        let (d, nq) = (sh.dim(), sh.q_len);
        let qkv = rand_vec(&mut rng, b * n * 3 * d, 1.5);
        let dout = rand_vec(&mut rng, b * nq * d, 1.0);
        let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        let wide = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
        let (mut out, mut lse, mut sc) = (vec![0.0; b * nq * d], vec![0.0; b * h * nq], Vec::new());
        attn::forward(&qkv, &mut out, &mut lse, &sh, &mut sc);
        let (q32, o32, l32, g32) = (f32s(&qkv), f32s(&out), f32s(&lse), f32s(&dout));
        let mut want = vec![0.0; b * n * 3 * d];
        attn::backward(&qkv, &out, &lse, &dout, &mut want, &sh, &mut sc);
        let mut want32 = vec![0.0f32; want.len()];
        attn::backward(&q32, &o32, &l32, &g32, &mut want32, &sh, &mut Vec::new());
        const UNTOUCHED: f64 = 12345.0;
        let mut got = vec![UNTOUCHED; want.len()];
        attn::backward_keys(&qkv, &out, &lse, &dout, &mut got, &sh, keys.clone(), &mut sc);
        let mut got32 = vec![UNTOUCHED as f32; want.len()];
        attn::backward_keys(&q32, &o32, &l32, &g32, &mut got32, &sh, keys.clone(), &mut Vec::new());
        for (what, got, want, tol) in [("f64", got, want, 1e-12), ("f32", wide(&got32), wide(&want32), 1e-5)] {
            let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
            for (t, (g, w)) in got.chunks_exact(3 * d).zip(want.chunks_exact(3 * d)).enumerate() {
                let at = format!("{what} N {n} dh {dh} keys {keys:?}: token {} of image {}", t % n, t / n);
                if keys.contains(&(t % n)) {
                    assert!(g[..d].iter().all(|&x| x == 0.0), "{at}: dQ not zero");
                    let err = max_abs_diff(&g[d..], &w[d..]);
                    assert!(err <= tol * scale, "{at}: dK/dV off by {err:e} (scale {scale})");
                } else {
                    assert!(g.iter().all(|&x| x == UNTOUCHED), "{at}: written outside the key rows");
                }
            }
        }
    }
}

#[test]
fn prompt_queries_ignore_other_prompt_keys() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let sh = AttnShape::full(1, 8, 2, 2, 1, 4);
    let d = sh.dim();
    let qkv = rand_vec(&mut rng, 8 * 3 * d, 1.0);
    let run = |qkv: &[f64]| {
        let (mut out, mut lse, mut s) = (vec![0.0; 8 * d], vec![0.0; 2 * 8], Vec::new());
        attn::forward(qkv, &mut out, &mut lse, &sh, &mut s);
        out
    };
    let base = run(&qkv);
    // Change token 2's key and value (a prompt): prompts 1 and 3 must not move, token 2,
    // CLS and the patches must.
    let mut q2 = qkv.clone();
    for c in d..3 * d {
        q2[2 * 3 * d + c] += 0.5;
    }
    let moved = run(&q2);
    let row = |v: &[f64], t: usize| v[t * d..(t + 1) * d].to_vec();
    for t in [1, 3] {
        assert_eq!(row(&base, t), row(&moved, t), "prompt {t} saw prompt 2");
    }
    for t in [0, 2, 4, 7] {
        assert!(
            max_abs_diff(&row(&base, t), &row(&moved, t)) > 1e-6,
            "token {t} did not see prompt 2"
        );
    }
}

// ---------------------------------------------------------------- device

#[cfg(feature = "cuda")]
mod gpu {
    use crate::gpu_common::*;
    use bounds::{assert_rel_max, check_against_cpu, slot, KernelOut};
    use mlvpt::gpu::{bf16, GpuContext};
    use mlvpt::ops::attention::{self, cuda, AttnShape, BwdTiles, FwdTiles, BWD_TILES, FWD_TILES};

    mod bounds {
        //! The CPU reference run on the same bf16-rounded inputs and the error bounds the kernels'
        //! outputs must meet against it.

        use mlvpt::ops::attention::{cpu, AttnShape};

        /// Error bound relative to the largest reference magnitude: bf16 storage of P, dS and the
        /// outputs (2^-8 relative) with fp32 sums.
        pub const REL_TOL: f64 = 2e-2;
        /// Absolute floor of that bound: gradients that are zero in exact arithmetic (one token, a
        /// softmax over one key) come out as fp32 rounding noise on both sides.
        pub const ABS_FLOOR: f64 = 1e-4;
        /// Absolute bound on the log-sum-exp (values of a few units, fp32 math, bf16 inputs shared).
        pub const LSE_TOL: f64 = 1e-2;

        /// Fails unless max |got - want| <= tol * max |want| + [`ABS_FLOOR`] (a NaN in `got` fails),
        /// naming the worst element.
        pub fn assert_rel_max(what: &str, got: &[f32], want: &[f32], tol: f64, seed: u64) {
            assert_eq!(got.len(), want.len(), "{what}: length");
            let scale = want.iter().fold(0.0f64, |m, &w| m.max((w as f64).abs()));
            let mut worst = (0usize, -1.0f64);
            for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
                let err = (g as f64 - w as f64).abs();
                let err = if err.is_nan() { f64::INFINITY } else { err };
                if err > worst.1 {
                    worst = (i, err);
                }
            }
            if got.is_empty() {
                return;
            }
            let (i, err) = worst;
            assert!(
                err <= tol * scale + ABS_FLOOR,
                "{what}: max error {err:e} > {tol:e} x max |ref| {scale:e} + {ABS_FLOOR:e} at [{i}]: got {}, want {} (MLVPT_TEST_SEED={seed})",
                got[i],
                want[i]
            );
        }

        /// Column block `slot` (0 = Q, 1 = K, 2 = V) of a `[B*N, 3, D]` tensor, as `[B*N, D]`.
        pub fn slot(x: &[f32], rows: usize, d: usize, slot: usize) -> Vec<f32> {
            (0..rows)
                .flat_map(|r| x[(r * 3 + slot) * d..(r * 3 + slot + 1) * d].iter().copied())
                .collect()
        }

        /// What a kernel run produced for one shape: `out [B, Nq, D]`, `lse [B, h, Nq]` and
        /// `dqkv [B, N, 3, D]`, widened to f32.
        pub struct KernelOut<'a> {
            pub out: &'a [f32],
            pub lse: &'a [f32],
            pub dqkv: &'a [f32],
        }

        /// Runs the CPU reference (f32) on `qkv` and `dout` (the bf16 values the kernels saw) and
        /// checks the kernels' outputs against it within the bounds above.
        pub fn check_against_cpu(sh: &AttnShape, qkv: &[f32], dout: &[f32], got: &KernelOut, seed: u64) {
            let (tok, d) = (sh.batch * sh.tokens, sh.dim());
            let mut scratch = Vec::new();
            let mut out = vec![0.0f32; sh.batch * sh.q_len * d];
            let mut lse = vec![0.0f32; sh.batch * sh.heads * sh.q_len];
            cpu::forward(qkv, &mut out, &mut lse, sh, &mut scratch);
            let mut dqkv = vec![0.0f32; tok * 3 * d];
            cpu::backward(qkv, &out, &lse, dout, &mut dqkv, sh, &mut scratch);
            let what = format!(
                "B={} h={} N={} prompts {}..{} dh={} queries {}..{}",
                sh.batch,
                sh.heads,
                sh.tokens,
                sh.prompt_start,
                sh.prompt_end,
                sh.head_dim,
                sh.q_start,
                sh.q_start + sh.q_len
            );
            assert_rel_max(&format!("{what} out"), got.out, &out, REL_TOL, seed);
            assert_eq!(got.lse.len(), lse.len(), "{what} lse: length");
            for (i, (&g, &w)) in got.lse.iter().zip(&lse).enumerate() {
                let ok = ((g as f64) - (w as f64)).abs() <= LSE_TOL;
                assert!(ok, "{what} lse[{i}]: got {g}, want {w} (MLVPT_TEST_SEED={seed})");
            }
            for (k, name) in ["dQ", "dK", "dV"].iter().enumerate() {
                assert_rel_max(
                    &format!("{what} {name}"),
                    &slot(got.dqkv, tok, d, k),
                    &slot(&dqkv, tok, d, k),
                    REL_TOL,
                    seed,
                );
            }
        }
    }

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

    /// The plain fp32 kernels (`attn_simple_fwd`/`_bwd`, `cuda::plain_forward`/`plain_backward`:
    /// head dims without fused kernels) against the f32 CPU twin, outputs and gradients poisoned
    /// with NaN first (the backward zeroes dqkv itself), all queries and the prompt rows only.
    #[test]
    #[ignore = "requires a CUDA device"]
    fn plain_attention_matches_cpu() {
        let gpu = gpu();
        let (mut rng, seed) = rng("plain_attention");
        let s = gpu.stream();
        for (b, h, n, p, dh) in [
            (1usize, 1usize, 1usize, 0usize, 4usize),
            (2, 3, 23, 6, 24),
            (1, 2, 37, 10, 48),
            (2, 1, 131, 30, 8),
        ] {
            let full = shape(b, h, n, p, dh);
            let ranges = if p > 0 { vec![None, Some((1, p))] } else { vec![None] };
            for rows in ranges {
                let sh = rows.map_or(full, |(q_start, q_len)| AttnShape { q_start, q_len, ..full });
                let (d, nq) = (sh.dim(), sh.q_len);
                let qkv = uniform(&mut rng, b * n * 3 * d, -2.0, 2.0);
                let dout = uniform(&mut rng, b * nq * d, -1.0, 1.0);
                let (mut out, mut lse, mut dqkv, mut sc) = (
                    vec![0.0f32; b * nq * d],
                    vec![0.0f32; b * h * nq],
                    vec![0.0f32; b * n * 3 * d],
                    Vec::new(),
                );
                attention::cpu::forward(&qkv, &mut out, &mut lse, &sh, &mut sc);
                attention::cpu::backward(&qkv, &out, &lse, &dout, &mut dqkv, &sh, &mut sc);

                let (qd, gd) = (gpu.upload(&qkv).unwrap(), gpu.upload(&dout).unwrap());
                let (mut o, mut l, mut dq) = (nan_f32(&gpu, out.len()), nan_f32(&gpu, lse.len()), nan_f32(&gpu, dqkv.len()));
                cuda::plain_forward(&gpu, s, &qd, &mut o, &mut l, &sh).unwrap();
                cuda::plain_backward(&gpu, s, &qd, &o, &l, &gd, &mut dq, &sh).unwrap();
                let what = format!("plain B={b} h={h} N={n} P={p} dh={dh} rows {rows:?}");
                assert_close(&format!("{what} out"), &gpu.download(&o).unwrap(), &to_f64(&out), 1e-5, 1e-4, seed);
                assert_close(&format!("{what} lse"), &gpu.download(&l).unwrap(), &to_f64(&lse), 1e-5, 1e-5, seed);
                assert_close(
                    &format!("{what} dqkv"),
                    &gpu.download(&dq).unwrap(),
                    &to_f64(&dqkv),
                    1e-4,
                    1e-4,
                    seed,
                );
            }
        }
        // Shapes past the kernels' grid or the buffers are errors, not launches.
        let sh = shape(1, 2, 10, 3, 4);
        let qkv = gpu.zeros::<f32>(10 * 3 * 8).unwrap();
        let (mut out, mut lse) = (gpu.zeros::<f32>(10 * 8).unwrap(), gpu.zeros::<f32>(2 * 10 - 1).unwrap());
        let e = cuda::plain_forward(&gpu, s, &qkv, &mut out, &mut lse, &sh).unwrap_err();
        assert!(e.to_string().contains("lse has 19 elements, needs 20"), "{e}");
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
}
