//! For the fused attention tests (tests/gpu_attention.rs): the CPU reference run on the same
//! bf16-rounded inputs and the error bounds the kernels' outputs must meet against it.

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
