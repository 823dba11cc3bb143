//! Op-level checks in f64: every backward against central finite differences of its forward,
//! and the forwards against direct transcriptions of their formulas.

use mlvpt::ops::attention::{cpu as attn, AttnShape};
use mlvpt::ops::head::{cpu as head, AdapterShape, MoeShape, VptHeadShape};
use mlvpt::ops::{gelu, layernorm, linear};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn rand_vec(rng: &mut ChaCha8Rng, n: usize, scale: f64) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Compares `analytic` with central differences of `f` at `x` (every entry).
fn fd_check(name: &str, x: &[f64], analytic: &[f64], mut f: impl FnMut(&[f64]) -> f64) {
    assert_eq!(x.len(), analytic.len(), "{name}: gradient length");
    let h = 1e-6;
    let gmax = analytic.iter().fold(0.0f64, |a, g| a.max(g.abs()));
    assert!(gmax > 0.0, "{name}: gradient is identically zero");
    for i in 0..x.len() {
        let mut xp = x.to_vec();
        xp[i] = x[i] + h;
        let lp = f(&xp);
        xp[i] = x[i] - h;
        let lm = f(&xp);
        let fd = (lp - lm) / (2.0 * h);
        let rel = (analytic[i] - fd).abs() / analytic[i].abs().max(fd.abs()).max(1e-3 * gmax);
        assert!(
            rel <= 1e-6,
            "{name}[{i}]: analytic {:e}, finite difference {fd:e}, relative error {rel:e}",
            analytic[i]
        );
    }
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn linear_forward_and_input_gradient() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (rows, din, dout) = (5, 7, 3);
    let x = rand_vec(&mut rng, rows * din, 1.0);
    let w = rand_vec(&mut rng, dout * din, 1.0);
    let b = rand_vec(&mut rng, dout, 1.0);
    let r = rand_vec(&mut rng, rows * dout, 1.0);
    let fwd = |x: &[f64]| {
        let mut y = vec![0.0; rows * dout];
        linear::cpu::forward(x, &w, Some(&b), &mut y, rows, din, dout);
        y
    };
    let y = fwd(&x);
    for i in 0..rows {
        for o in 0..dout {
            let want = b[o] + dot(&x[i * din..(i + 1) * din], &w[o * din..(o + 1) * din]);
            assert!((y[i * dout + o] - want).abs() < 1e-12);
        }
    }
    let mut dx = vec![0.0; rows * din];
    linear::cpu::backward_input(&r, &w, &mut dx, rows, din, dout, false);
    fd_check("linear dx", &x, &dx, |x| dot(&fwd(x), &r));
    // accumulate adds
    let mut acc = vec![1.0; rows * din];
    linear::cpu::backward_input(&r, &w, &mut acc, rows, din, dout, true);
    assert!(acc.iter().zip(&dx).all(|(a, d)| (a - 1.0 - d).abs() < 1e-12));
}

#[test]
fn layernorm_forward_and_input_gradient() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let (rows, d) = (37, 6);
    let x = rand_vec(&mut rng, rows * d, 2.0);
    let g: Vec<f64> = rand_vec(&mut rng, d, 0.5).iter().map(|v| 1.0 + v).collect();
    let bt = rand_vec(&mut rng, d, 0.5);
    let r = rand_vec(&mut rng, rows * d, 1.0);
    let fwd = |x: &[f64]| {
        let (mut y, mut m, mut s) = (vec![0.0; rows * d], vec![0.0; rows], vec![0.0; rows]);
        layernorm::cpu::forward(x, &g, &bt, &mut y, &mut m, &mut s, rows, d, 1e-6);
        (y, m, s)
    };
    let (y, m, s) = fwd(&x);
    for i in 0..rows {
        let xr = &x[i * d..(i + 1) * d];
        let mu = xr.iter().sum::<f64>() / d as f64;
        let var = xr.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / d as f64;
        for j in 0..d {
            let want = (xr[j] - mu) / (var + 1e-6).sqrt() * g[j] + bt[j];
            assert!((y[i * d + j] - want).abs() < 1e-12);
        }
    }
    let mut dx = vec![0.0; rows * d];
    layernorm::cpu::backward(&r, &x, &g, &m, &s, &mut dx, rows, d, false);
    fd_check("layernorm dx", &x, &dx, |x| dot(&fwd(x).0, &r));
}

#[test]
fn gelu_values_and_gradient() {
    // Reference values of x * Phi(x).
    let cases: [(f64, f64); 4] = [
        (1.0, 0.841_344_746_068_542_9),
        (-1.0, -0.158_655_253_931_457_07),
        (2.5, 2.484_475_836_685_559_7),
        (0.0, 0.0),
    ];
    for (x, want) in cases {
        assert!((gelu::cpu::gelu(x) - want).abs() < 1e-14, "gelu({x})");
    }
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let n = 50;
    let x = rand_vec(&mut rng, n, 4.0);
    let r = rand_vec(&mut rng, n, 1.0);
    let fwd = |x: &[f64]| {
        let mut y = vec![0.0; n];
        gelu::cpu::forward(x, &mut y, n);
        y
    };
    let mut d = r.clone();
    gelu::cpu::backward(&x, &mut d, n);
    fd_check("gelu", &x, &d, |x| dot(&fwd(x), &r));
}

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

#[test]
fn adapter_gradients() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let s = AdapterShape {
        batch: 3,
        tokens: 4,
        dim: 5,
        rank: 2,
    };
    let (b, p, d, r) = (s.batch, s.tokens, s.dim, s.rank);
    let z = rand_vec(&mut rng, b * p * d, 1.0);
    let w1 = rand_vec(&mut rng, p * r * d, 1.0);
    let b1 = rand_vec(&mut rng, p * r, 1.0);
    let w2 = rand_vec(&mut rng, p * d * r, 1.0);
    let b2 = rand_vec(&mut rng, p * d, 1.0);
    let rr = rand_vec(&mut rng, b * p * d, 1.0);
    let fwd = |z: &[f64], w1: &[f64], b1: &[f64], w2: &[f64], b2: &[f64]| {
        let (mut u, mut out, mut sc) = (vec![0.0; b * p * r], vec![0.0; b * p * d], Vec::new());
        head::adapter_forward(z, w1, b1, w2, b2, &mut u, &mut out, &s, &mut sc);
        (u, out)
    };
    let (u, out) = fwd(&z, &w1, &b1, &w2, &b2);
    // Definition: z + W2 gelu(W1 z + b1) + b2 per token.
    for bi in 0..b {
        for t in 0..p {
            let zt = &z[(bi * p + t) * d..][..d];
            let hid: Vec<f64> = (0..r)
                .map(|j| gelu::cpu::gelu(dot(&w1[(t * r + j) * d..][..d], zt) + b1[t * r + j]))
                .collect();
            for i in 0..d {
                let want = zt[i] + dot(&w2[(t * d + i) * r..][..r], &hid) + b2[t * d + i];
                assert!((out[(bi * p + t) * d + i] - want).abs() < 1e-12);
            }
        }
    }
    let mut dz = vec![0.0; b * p * d];
    let (mut dw1, mut db1, mut dw2, mut db2) = (vec![0.0; w1.len()], vec![0.0; b1.len()], vec![0.0; w2.len()], vec![0.0; b2.len()]);
    let mut sc = Vec::new();
    head::adapter_backward(&rr, &z, &u, &w1, &w2, &mut dz, &mut dw1, &mut db1, &mut dw2, &mut db2, &s, &mut sc);
    fd_check("adapter dz", &z, &dz, |x| dot(&fwd(x, &w1, &b1, &w2, &b2).1, &rr));
    fd_check("adapter dw1", &w1, &dw1, |x| dot(&fwd(&z, x, &b1, &w2, &b2).1, &rr));
    fd_check("adapter db1", &b1, &db1, |x| dot(&fwd(&z, &w1, x, &w2, &b2).1, &rr));
    fd_check("adapter dw2", &w2, &dw2, |x| dot(&fwd(&z, &w1, &b1, x, &b2).1, &rr));
    fd_check("adapter db2", &b2, &db2, |x| dot(&fwd(&z, &w1, &b1, &w2, x).1, &rr));
}

#[test]
fn moe_head_gradients_both_gate_modes() {
    for group_gate in [false, true] {
        let mut rng = ChaCha8Rng::seed_from_u64(6 + group_gate as u64);
        let (b, k, t, e, d) = (2usize, 5usize, 2usize, 3usize, 4usize);
        let p = 2 * t * e; // two branches' worth of tokens; this is branch 1
        let groups: Vec<usize> = (0..k).map(|i| (i * 3 + 1) % t).collect();
        let tok: Vec<u32> = (0..e * k).map(|i| (t * e + t * (i / k) + groups[i % k]) as u32).collect();
        let rows = if group_gate { e * t } else { e * k };
        let grow: Vec<u32> = (0..e * k)
            .map(|i| if group_gate { (i / k) * t + groups[i % k] } else { i } as u32)
            .collect();
        let s = MoeShape {
            batch: b,
            tokens: p,
            dim: d,
            labels: k,
            experts: e,
            gate_rows: rows,
        };
        let z = rand_vec(&mut rng, b * p * d, 1.0);
        let ad = rand_vec(&mut rng, b * p * d, 1.0);
        let gate = rand_vec(&mut rng, rows * d, 1.0);
        let w = rand_vec(&mut rng, k * d, 1.0);
        let c = rand_vec(&mut rng, k, 1.0);
        let (ry, rm) = (rand_vec(&mut rng, b * k, 1.0), rand_vec(&mut rng, b * k, 1.0));
        let fwd = |z: &[f64], ad: &[f64], gate: &[f64], w: &[f64], c: &[f64]| {
            let (mut y, mut m, mut q, mut r) = (vec![0.0; b * k], vec![0.0; b * k], vec![0.0; b * e * k], vec![0.0; b * e * k]);
            head::moe_forward(z, ad, gate, w, c, &tok, &grow, &mut y, &mut m, &mut q, &mut r, &s);
            (y, m, q, r)
        };
        let loss = |o: &(Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>)| dot(&o.0, &ry) + dot(&o.1, &rm);
        let o = fwd(&z, &ad, &gate, &w, &c);
        // Definition (docs/MODEL.md#gating-and-the-expert-mixture).
        for bi in 0..b {
            for ki in 0..k {
                let g = groups[ki];
                let toks: Vec<usize> = (0..e).map(|ei| t * e + t * ei + g).collect();
                let qs: Vec<f64> = (0..e)
                    .map(|ei| {
                        let row = if group_gate { ei * t + g } else { ei * k + ki };
                        dot(&gate[row * d..][..d], &z[(bi * p + toks[ei]) * d..][..d])
                    })
                    .collect();
                let den: f64 = qs.iter().map(|v| v.exp()).sum();
                let a: Vec<f64> = qs.iter().map(|v| v.exp() / den).collect();
                let m: f64 = a.iter().zip(&qs).map(|(x, y)| x * y).sum();
                let mut f = vec![0.0; d];
                for ei in 0..e {
                    for j in 0..d {
                        f[j] += a[ei] * ad[(bi * p + toks[ei]) * d + j];
                    }
                }
                let y = dot(&w[ki * d..][..d], &f) + c[ki];
                assert!((o.0[bi * k + ki] - y).abs() < 1e-12 && (o.1[bi * k + ki] - m).abs() < 1e-12);
            }
        }
        let (mut dz, mut dad) = (vec![0.0; b * p * d], vec![0.0; b * p * d]);
        let (mut dg, mut dw, mut dc) = (vec![0.0; rows * d], vec![0.0; k * d], vec![0.0; k]);
        let mut sc = Vec::new();
        head::moe_backward(
            &ry, &rm, &z, &ad, &gate, &w, &tok, &grow, &o.2, &o.3, &mut dz, &mut dad, &mut dg, &mut dw, &mut dc, &s, &mut sc,
        );
        let tag = if group_gate { "group" } else { "label" };
        // Tokens of the other branch get no gradient.
        assert!(dz[..t * e * d].iter().all(|&v| v == 0.0));
        fd_check(&format!("moe dz ({tag})"), &z, &dz, |x| loss(&fwd(x, &ad, &gate, &w, &c)));
        fd_check(&format!("moe dadapted ({tag})"), &ad, &dad, |x| loss(&fwd(&z, x, &gate, &w, &c)));
        fd_check(&format!("moe dgate ({tag})"), &gate, &dg, |x| loss(&fwd(&z, &ad, x, &w, &c)));
        fd_check(&format!("moe dw ({tag})"), &w, &dw, |x| loss(&fwd(&z, &ad, &gate, x, &c)));
        fd_check(&format!("moe dc ({tag})"), &c, &dc, |x| loss(&fwd(&z, &ad, &gate, &w, x)));
    }
}

#[test]
fn vpt_head_gradients() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let s = VptHeadShape {
        batch: 3,
        tokens: 4,
        dim: 5,
        labels: 6,
    };
    let (b, p, d, k) = (s.batch, s.tokens, s.dim, s.labels);
    let z = rand_vec(&mut rng, b * p * d, 1.0);
    let w = rand_vec(&mut rng, k * d, 1.0);
    let c = rand_vec(&mut rng, k, 1.0);
    let r = rand_vec(&mut rng, b * k, 1.0);
    let fwd = |z: &[f64], w: &[f64], c: &[f64]| {
        let (mut zbar, mut y) = (vec![0.0; b * d], vec![0.0; b * k]);
        head::vpt_forward(z, w, c, &mut zbar, &mut y, &s);
        (zbar, y)
    };
    let (zbar, _) = fwd(&z, &w, &c);
    let (mut dz, mut dw, mut dc, mut sc) = (vec![0.0; z.len()], vec![0.0; w.len()], vec![0.0; k], Vec::new());
    head::vpt_backward(&r, &zbar, &w, &mut dz, &mut dw, &mut dc, &s, &mut sc);
    fd_check("vpt dz", &z, &dz, |x| dot(&fwd(x, &w, &c).1, &r));
    fd_check("vpt dw", &w, &dw, |x| dot(&fwd(&z, x, &c).1, &r));
    fd_check("vpt dc", &c, &dc, |x| dot(&fwd(&z, &w, x).1, &r));
}

#[test]
fn f32_erf_and_exp_are_accurate() {
    use mlvpt::ops::real::{erf_f32, exp_f32};
    let mut worst_erf = 0.0f64;
    let mut worst_exp = 0.0f64;
    for i in -200_000..=200_000 {
        let x = i as f32 * 5e-5; // [-10, 10]
        worst_erf = worst_erf.max((erf_f32(x) as f64 - libm::erf(x as f64)).abs());
        let y = i as f32 * 4.3e-4; // [-86, 86]
        let want = (y as f64).exp();
        worst_exp = worst_exp.max(((exp_f32(y) as f64 - want) / want).abs());
    }
    assert!(worst_erf < 5e-7, "erf_f32 absolute error {worst_erf:e}");
    assert!(worst_exp < 5e-7, "exp_f32 relative error {worst_exp:e}");
    assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
    assert_eq!(exp_f32(-100.0), 0.0);
}
