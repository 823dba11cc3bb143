//! ASL (docs/MODEL.md#the-asymmetric-loss, `src/ops/asl`) against an independent f64 reference
//! written here, and its gradients against f64 central finite differences: the exact mode
//! against FD of the full loss, the default (constant focusing weights) mode against FD of the
//! loss with the weights frozen at the point. On a device, the single-term and the multi-term
//! launchers against the CPU twin.

use mlvpt::ops::asl::{asl_forward_backward, AslConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The reference implementation's formula, literally: log(clamp(p, min=eps)) and
/// log(clamp(min(1-p+clip, 1), min=eps)). In f64 with q = 1/(1+e^x) both probabilities keep full
/// relative precision for |x| <= 30, so this is an accurate oracle there.
fn parts(x: f64, cfg: &AslConfig) -> (f64, f64, f64, f64) {
    let p = 1.0 / (1.0 + (-x).exp());
    let q = 1.0 / (1.0 + x.exp());
    let lp = p.max(cfg.eps).ln();
    let neg = if cfg.clip > 0.0 { (q + cfg.clip).min(1.0) } else { q };
    let ln = neg.max(cfg.eps).ln();
    let wp = q.powf(cfg.gamma_pos);
    let wn = (p - cfg.clip).max(0.0).powf(cfg.gamma_neg);
    (wp, lp, wn, ln)
}

fn ref_loss(x: f64, y: f64, cfg: &AslConfig) -> f64 {
    let (wp, lp, wn, ln) = parts(x, cfg);
    -y * wp * lp - (1.0 - y) * wn * ln
}

/// The loss with the focusing weights frozen at `x0`, as a function of `x`.
fn ref_loss_frozen(x: f64, x0: f64, y: f64, cfg: &AslConfig) -> f64 {
    let (wp, _, wn, _) = parts(x0, cfg);
    let (_, lp, _, ln) = parts(x, cfg);
    -y * wp * lp - (1.0 - y) * wn * ln
}

fn logit(p: f64) -> f64 {
    (p / (1.0 - p)).ln()
}

/// Points within `d` of a kink (clamp edge or the clip floor) have no derivative to check.
fn near_kink(x: f64, cfg: &AslConfig, d: f64) -> bool {
    let mut kinks = vec![logit(cfg.eps)];
    if cfg.clip > 0.0 {
        kinks.push(logit(cfg.clip));
    } else {
        kinks.push(logit(1.0 - cfg.eps));
    }
    kinks.iter().any(|k| (x - k).abs() < d)
}

fn sample(seed: u64, n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // Fixed extremes (the stability cases) then random logits over the useful range.
    let mut x = vec![30.0, -30.0, 29.5, -29.5, 15.0, -15.0, 0.0, 3.0, -3.0, 11.0, -11.0];
    while x.len() < n {
        x.push(rng.random_range(-9.0..9.0));
    }
    let mut y: Vec<f64> = (0..x.len())
        .map(|i| if i < 11 { (i % 2) as f64 } else { rng.random_range(0..2) as f64 })
        .collect();
    // The extremes with both labels.
    y[0] = 1.0;
    y[1] = 1.0;
    y[2] = 0.0;
    y[3] = 0.0;
    (x, y)
}

fn configs() -> Vec<AslConfig> {
    let d = AslConfig::default();
    vec![
        d,
        AslConfig {
            gamma_neg: 4.0,
            gamma_pos: 1.0,
            clip: 0.05,
            ..d
        },
        AslConfig {
            gamma_neg: 1.5,
            gamma_pos: 0.5,
            clip: 0.2,
            ..d
        },
        AslConfig {
            gamma_neg: 3.0,
            gamma_pos: 2.0,
            clip: 0.0,
            eps: 1e-8,
            ..d
        },
        AslConfig {
            gamma_neg: 0.0,
            gamma_pos: 0.0,
            clip: 0.0,
            ..d
        },
    ]
}

#[test]
fn default_config_is_the_seed_setting() {
    let c = AslConfig::default();
    assert_eq!(
        (c.gamma_neg, c.gamma_pos, c.clip, c.eps, c.exact_grad),
        (2.0, 0.0, 0.0, 1e-5, false)
    );
    assert!(c.validate().is_ok());
    assert!(AslConfig { clip: 1.0, ..c }.validate().is_err());
    assert!(AslConfig { gamma_neg: -1.0, ..c }.validate().is_err());
    assert!(AslConfig { eps: 0.0, ..c }.validate().is_err());
}

#[test]
fn hand_values_at_zero_logit() {
    // x = 0: p = 1/2. Positive: -(1/2)^0 * ln(1/2) = ln 2. Negative (g- = 2): -(1/2)^2 ln(1/2) = ln2 / 4.
    let c = AslConfig::default();
    let mut g = [0.0f64; 2];
    let l = asl_forward_backward(&[0.0, 0.0], &[1.0, 0.0], &c, Some(&mut g));
    let ln2 = std::f64::consts::LN_2;
    assert!((l - 1.25 * ln2).abs() < 1e-15, "{l}");
    // Constant weights: d/dx of -ln p = -(1-p) = -1/2; of -w ln(1-p) with w = 1/4: 1/4 * p = 1/8.
    assert!((g[0] + 0.5).abs() < 1e-15 && (g[1] - 0.125).abs() < 1e-15, "{g:?}");
    // Exact: the negative term adds -d(p^2)/dx * ln(1-p) = -(2 p * p(1-p)) ln(1/2) = ln2 / 4.
    let ce = AslConfig { exact_grad: true, ..c };
    asl_forward_backward(&[0.0, 0.0], &[1.0, 0.0], &ce, Some(&mut g));
    assert!((g[0] + 0.5).abs() < 1e-15 && (g[1] - 0.125 - ln2 / 4.0).abs() < 1e-15, "{g:?}");
}

#[test]
fn clip_shifts_the_negative_probability() {
    // clip 0.05, x = 0 (p = 0.5), y = 0, g- = 2: p_m = 0.45, 1 - p_m = 0.55; loss = -0.45^2 ln 0.55.
    let c = AslConfig {
        clip: 0.05,
        ..AslConfig::default()
    };
    let l = asl_forward_backward(&[0.0f64], &[0.0], &c, None);
    assert!((l + 0.45f64.powi(2) * 0.55f64.ln()).abs() < 1e-15, "{l}");
    // p below the clip: p_m = 0, the negative term and its gradient vanish.
    let mut g = [1.0f64];
    let l = asl_forward_backward(&[logit(0.04)], &[0.0], &c, Some(&mut g));
    assert_eq!((l, g[0]), (0.0, 0.0));
}

#[test]
fn values_match_reference() {
    let (x, y) = sample(1, 300);
    for cfg in configs() {
        let l = asl_forward_backward(&x, &y, &cfg, None);
        let r: f64 = x.iter().zip(&y).map(|(&x, &y)| ref_loss(x, y, &cfg)).sum();
        assert!((l - r).abs() <= 1e-12 * r.abs().max(1.0), "{cfg:?}: {l} vs {r}");
    }
}

#[test]
fn exact_gradient_matches_finite_differences() {
    let (x, y) = sample(2, 400);
    let h = 1e-6;
    for cfg in configs() {
        let cfg = AslConfig { exact_grad: true, ..cfg };
        let mut g = vec![0.0; x.len()];
        asl_forward_backward(&x, &y, &cfg, Some(&mut g));
        let mut checked = 0;
        for i in 0..x.len() {
            if near_kink(x[i], &cfg, 1e-3) {
                continue;
            }
            let fd = (ref_loss(x[i] + h, y[i], &cfg) - ref_loss(x[i] - h, y[i], &cfg)) / (2.0 * h);
            assert!(
                (g[i] - fd).abs() <= 1e-6 * g[i].abs().max(1.0),
                "{cfg:?} x={} y={}: grad {} fd {}",
                x[i],
                y[i],
                g[i],
                fd
            );
            checked += 1;
        }
        assert!(checked > 350);
    }
}

#[test]
fn constant_weight_gradient_matches_frozen_finite_differences() {
    let (x, y) = sample(3, 400);
    let h = 1e-6;
    for cfg in configs() {
        assert!(!cfg.exact_grad);
        let mut g = vec![0.0; x.len()];
        asl_forward_backward(&x, &y, &cfg, Some(&mut g));
        let mut differs_from_exact = false;
        for i in 0..x.len() {
            if near_kink(x[i], &cfg, 1e-3) {
                continue;
            }
            let fd = (ref_loss_frozen(x[i] + h, x[i], y[i], &cfg) - ref_loss_frozen(x[i] - h, x[i], y[i], &cfg)) / (2.0 * h);
            assert!(
                (g[i] - fd).abs() <= 1e-6 * g[i].abs().max(1.0),
                "{cfg:?} x={} y={}: grad {} fd {}",
                x[i],
                y[i],
                g[i],
                fd
            );
            let full = (ref_loss(x[i] + h, y[i], &cfg) - ref_loss(x[i] - h, y[i], &cfg)) / (2.0 * h);
            differs_from_exact |= (full - fd).abs() > 1e-3;
        }
        // With a non-zero gamma the two modes must really differ somewhere.
        if cfg.gamma_neg > 0.0 || cfg.gamma_pos > 0.0 {
            assert!(differs_from_exact, "{cfg:?}");
        }
    }
}

#[test]
fn f32_agrees_with_f64_and_stays_finite_at_extremes() {
    let (mut x, mut y) = sample(4, 200);
    x.extend([100.0, -100.0, 1e4, -1e4, 88.0, -88.0, 1e30, -1e30]);
    y.extend([1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0]);
    let xf: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    let yf: Vec<f32> = y.iter().map(|&v| v as f32).collect();
    for cfg in configs() {
        for exact in [false, true] {
            let cfg = AslConfig { exact_grad: exact, ..cfg };
            let mut g64 = vec![0.0f64; x.len()];
            let mut g32 = vec![0.0f32; x.len()];
            let l64 = asl_forward_backward(&x, &y, &cfg, Some(&mut g64));
            let l32 = asl_forward_backward(&xf, &yf, &cfg, Some(&mut g32));
            assert!(l64.is_finite() && l32.is_finite());
            assert!((l32 as f64 - l64).abs() <= 1e-5 * l64.abs().max(1.0), "{cfg:?}: {l32} vs {l64}");
            for i in 0..x.len() {
                assert!(g32[i].is_finite() && g64[i].is_finite(), "x={}", x[i]);
                if near_kink(x[i], &cfg, 1e-3) {
                    continue;
                }
                assert!(
                    (g32[i] as f64 - g64[i]).abs() <= 1e-5 * g64[i].abs().max(1.0),
                    "{cfg:?} x={}: {} vs {}",
                    x[i],
                    g32[i],
                    g64[i]
                );
            }
        }
    }
}

#[test]
fn clamped_logs_have_zero_gradient_and_eps_loss() {
    // x = -30, y = 1: log p = -30 < ln 1e-5, clamped: loss = -ln 1e-5, gradient 0 (as in torch).
    let c = AslConfig::default();
    let mut g = [1.0f64];
    let l = asl_forward_backward(&[-30.0], &[1.0], &c, Some(&mut g));
    assert!((l + 1e-5f64.ln()).abs() < 1e-12);
    assert_eq!(g[0], 0.0);
}

#[test]
fn matches_official_pytorch_asl_in_f64() {
    // Produced by tools/peer/asl_golden.py with torch 2.15.0 (float64, autograd): a literal copy of the official
    // AsymmetricLoss.forward (Alibaba-MIIL/ASL losses.py): disable_torch_grad_focal_loss=True is
    // our default mode, False our exact mode. The official code computes 1 - pt as 1 - (1 - p),
    // which loses relative precision for tiny p, hence the 1e-7 relative tolerance.
    const X: [f64; 12] = [-13.0, -6.5, -2.25, -0.7, 0.0, 0.3, 1.1, 2.9, 5.0, 12.0, -1.4, 0.05];
    const Y: [f64; 12] = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0];
    #[rustfmt::skip]
    let cases: [(AslConfig, f64, [f64; 12]); 6] = [
        (AslConfig { gamma_neg: 2.0, gamma_pos: 0.0, clip: 0.0, eps: 1e-05, exact_grad: false }, 30.020031785365234, [0.0, 3.3829865244167192e-09, -0.9046505351008906, 0.03653231211234121, -0.5, 0.1895569572977521, -0.24973989440488234, 0.8515574358040245, -0.006692850924284732, -0.0, 0.00774078457874107, -0.48750260351578967]),
        (AslConfig { gamma_neg: 2.0, gamma_pos: 0.0, clip: 0.0, eps: 1e-05, exact_grad: true }, 30.020031785365234, [0.0, 1.0143878550754741e-08, -0.9046505351008906, 0.09585472244050611, -0.5, 0.42950646858575053, -0.24973989440488234, 1.1283383565103342, -0.006692850924284732, 0.00014147310999095027, 0.021578778853373084, -0.48750260351578967]),
        (AslConfig { gamma_neg: 4.0, gamma_pos: 1.0, clip: 0.05, eps: 1e-05, exact_grad: false }, 18.364010054992796, [0.0, -0.0, -0.8183925906583276, 0.0019471178428304406, -0.25, 0.03888600787141199, -0.06237001485736176, 0.3144681754850316, -4.479425349469899e-05, 0.00010007387060658428, 8.889746348522641e-05, -0.2376587884346732]),
        (AslConfig { gamma_neg: 4.0, gamma_pos: 1.0, clip: 0.05, eps: 1e-05, exact_grad: true }, 18.364010054992796, [-2.6022886348129748e-05, 0.0, -1.0211165774459154, 0.008517493125913605, -0.42328679513998635, 0.1437203634254228, -0.11620800011398766, 0.64095553766047, -8.943827081445932e-05, 0.0001631940821096117, 0.00041680631792468065, -0.4046692971220929]),
        (AslConfig { gamma_neg: 1.5, gamma_pos: 0.5, clip: 0.2, eps: 1e-08, exact_grad: false }, 18.493179085832313, [-0.9999966095154691, -0.0, -0.8604413373738271, 0.012221114019436173, -0.3535533905932738, 0.08953963463271841, -0.12480497155365433, 0.12678722603004858, -0.0005475411043060061, 2.1981003746006847e-05, -0.0, -0.34038107777946686]),
        (AslConfig { gamma_neg: 1.5, gamma_pos: 0.5, clip: 0.2, eps: 1e-08, exact_grad: true }, 18.493179085832313, [-1.0000113016093555, 0.0, -0.9670112772170936, 0.029287729929782687, -0.4760856585268422, 0.19480008821745914, -0.1786709858060636, 0.21513171377709062, -0.0008203934529539285, 3.524765775319537e-05, 0.0, -0.4599794678115419]),
    ];
    for (cfg, loss, grad) in cases {
        let mut g = [0.0f64; 12];
        let l = asl_forward_backward(&X, &Y, &cfg, Some(&mut g));
        assert!((l - loss).abs() <= 1e-12 * loss.abs(), "{cfg:?}: {l} vs {loss}");
        for i in 0..12 {
            assert!(
                (g[i] - grad[i]).abs() <= 1e-12 + 1e-7 * grad[i].abs(),
                "{cfg:?} x={}: {} vs {}",
                X[i],
                g[i],
                grad[i]
            );
        }
    }
}

// ---------------------------------------------------------------- device

#[cfg(feature = "cuda")]
mod gpu {
    use crate::gpu_common::*;
    use mlvpt::gpu::{CudaSlice, GpuError};
    use mlvpt::ops::asl;
    use rand::Rng;

    fn asl_configs() -> Vec<asl::AslConfig> {
        let d = asl::AslConfig::default();
        vec![
            d,
            asl::AslConfig { exact_grad: true, ..d },
            asl::AslConfig {
                gamma_pos: 1.0,
                gamma_neg: 4.0,
                clip: 0.05,
                ..d
            },
            asl::AslConfig {
                gamma_pos: 0.5,
                gamma_neg: 3.0,
                clip: 0.05,
                exact_grad: true,
                eps: 1e-4,
            },
        ]
    }

    #[test]
    #[ignore = "requires a CUDA device"]
    fn asl_matches_cpu_and_is_deterministic() {
        let gpu = gpu();
        let (mut rng, seed) = rng("asl");
        let mut ws = asl::cuda::AslWorkspace::new(&gpu).unwrap();
        for cfg in asl_configs() {
            for (b, k) in [(1usize, 1usize), (1, 7), (3, 80), (17, 997), (64, 81), (512, 1000)] {
                let n = b * k;
                let x = asl_logits(&mut rng, n, &cfg);
                let y: Vec<f32> = (0..n).map(|_| if rng.random::<f32>() < 0.2 { 1.0 } else { 0.0 }).collect();
                let (x64, y64) = (to_f64(&x), to_f64(&y));
                let mut want_g = vec![0.0f64; n];
                let want = asl::asl_forward_backward(&x64, &y64, &cfg, Some(&mut want_g));
                let scale = 1000.0 / n as f32;

                let (xd, yd) = (gpu.upload(&x).unwrap(), gpu.upload(&y).unwrap());
                let mut losses = Vec::new();
                for _run in 0..2 {
                    let mut g = nan_f32(&gpu, n);
                    let mut loss = nan_f32(&gpu, 1);
                    asl::cuda::forward_backward(&gpu, gpu.stream(), &mut ws, &xd, &yd, &cfg, scale, Some(&mut g), &mut loss, n).unwrap();
                    let got_g = gpu.download(&g).unwrap();
                    let got = gpu.download(&loss).unwrap()[0];
                    let what = format!("asl {cfg:?} b={b} k={k}");
                    let want_gs: Vec<f64> = want_g.iter().map(|v| v * scale as f64).collect();
                    assert_close(&format!("{what} grad"), &got_g, &want_gs, 1e-7 * scale as f64, 2e-5, seed);
                    assert_close(&format!("{what} loss"), &[got], &[want * scale as f64], 1e-6, 1e-5, seed);
                    losses.push(got.to_bits());
                }
                assert_eq!(losses[0], losses[1], "asl loss differs between two runs (seed {seed})");
                // Loss only, no gradient buffer.
                let mut loss = nan_f32(&gpu, 1);
                asl::cuda::forward_backward(&gpu, gpu.stream(), &mut ws, &xd, &yd, &cfg, scale, None, &mut loss, n).unwrap();
                assert_eq!(
                    gpu.download(&loss).unwrap()[0].to_bits(),
                    losses[0],
                    "loss without grad (seed {seed})"
                );
            }
        }
    }

    #[test]
    #[ignore = "requires a CUDA device"]
    fn asl_rejects_short_buffers_and_bad_config() {
        let gpu = gpu();
        let mut ws = asl::cuda::AslWorkspace::new(&gpu).unwrap();
        let x = gpu.upload(&[0.0f32; 4]).unwrap();
        let mut loss = gpu.zeros::<f32>(1).unwrap();
        let err = asl::cuda::forward_backward(&gpu, gpu.stream(), &mut ws, &x, &x, &Default::default(), 1.0, None, &mut loss, 5);
        assert!(matches!(err, Err(GpuError::Invalid { .. })), "{err:?}");
        let bad = asl::AslConfig {
            eps: 0.0,
            ..Default::default()
        };
        let err = asl::cuda::forward_backward(&gpu, gpu.stream(), &mut ws, &x, &x, &bad, 1.0, None, &mut loss, 4);
        assert!(err.unwrap_err().to_string().contains("eps"));
    }

    #[test]
    #[ignore = "requires a CUDA device"]
    fn asl_terms_match_the_sum_of_single_terms_in_both_gradient_modes() {
        let gpu = gpu();
        let s_ = gpu.stream();
        let (mut rng, seed) = rng("asl_terms");
        let mut ws = asl::cuda::AslWorkspace::new(&gpu).unwrap();
        let base = asl::AslConfig::default();
        for cfg in [
            base,
            asl::AslConfig { exact_grad: true, ..base },
            asl::AslConfig {
                gamma_pos: 1.0,
                clip: 0.05,
                exact_grad: true,
                ..base
            },
        ] {
            for (bn, k) in [(1usize, 1usize), (64, 80), (256, 365), (3, 1000)] {
                let n = bn * k;
                let scale = 1000.0 / n as f32;
                let xs: Vec<Vec<f32>> = (0..4).map(|_| asl_logits(&mut rng, n, &cfg)).collect();
                let y: Vec<f32> = (0..n).map(|_| if rng.random::<f32>() < 0.2 { 1.0 } else { 0.0 }).collect();
                let xd: Vec<CudaSlice<f32>> = xs.iter().map(|x| gpu.upload(x).unwrap()).collect();
                let yd = gpu.upload(&y).unwrap();
                let mut grads: Vec<CudaSlice<f32>> = (0..3).map(|_| nan_f32(&gpu, n)).collect();
                let mut loss = nan_f32(&gpu, 1);
                {
                    let (g0, rest) = grads.split_at_mut(1);
                    let (g1, g2) = rest.split_at_mut(1);
                    let mut terms = [
                        asl::cuda::AslTerm {
                            logits: &xd[0],
                            grad: Some(&mut g0[0]),
                        },
                        asl::cuda::AslTerm {
                            logits: &xd[1],
                            grad: Some(&mut g1[0]),
                        },
                        asl::cuda::AslTerm {
                            logits: &xd[2],
                            grad: Some(&mut g2[0]),
                        },
                        asl::cuda::AslTerm {
                            logits: &xd[3],
                            grad: None,
                        },
                    ];
                    asl::cuda::forward_backward_terms(&gpu, s_, &mut ws, &mut terms, &yd, &cfg, scale, &mut loss, n).unwrap();
                }
                let y64 = to_f64(&y);
                let mut want = 0.0;
                for (i, x) in xs.iter().enumerate() {
                    let mut g = vec![0.0f64; n];
                    want += asl::asl_forward_backward(&to_f64(x), &y64, &cfg, Some(&mut g));
                    if i < 3 {
                        let g: Vec<f64> = g.iter().map(|v| v * scale as f64).collect();
                        assert_close(
                            &format!("asl term {i} grad n={n} {cfg:?}"),
                            &gpu.download(&grads[i]).unwrap(),
                            &g,
                            1e-6,
                            1e-4,
                            seed,
                        );
                    }
                }
                want *= scale as f64;
                assert_close(
                    &format!("asl terms loss n={n} {cfg:?}"),
                    &gpu.download(&loss).unwrap(),
                    &[want],
                    1e-5,
                    1e-4,
                    seed,
                );
                // The term without a gradient buffer, alone through the single-term launcher.
                let (mut loss1, mut g3) = (nan_f32(&gpu, 1), nan_f32(&gpu, n));
                asl::cuda::forward_backward(&gpu, s_, &mut ws, &xd[3], &yd, &cfg, scale, Some(&mut g3), &mut loss1, n).unwrap();
                let mut want_g3 = vec![0.0f64; n];
                let w3 = asl::asl_forward_backward(&to_f64(&xs[3]), &y64, &cfg, Some(&mut want_g3)) * scale as f64;
                let want_g3: Vec<f64> = want_g3.iter().map(|v| v * scale as f64).collect();
                assert_close("asl single term grad", &gpu.download(&g3).unwrap(), &want_g3, 1e-6, 1e-4, seed);
                assert_close("asl single term loss", &gpu.download(&loss1).unwrap(), &[w3], 1e-5, 1e-4, seed);
            }
        }
        // Bad term counts are errors, not launches.
        let x = gpu.upload(&[0.0f32; 4]).unwrap();
        let mut loss = nan_f32(&gpu, 1);
        let err = asl::cuda::forward_backward_terms(&gpu, s_, &mut ws, &mut [], &x, &base, 1.0, &mut loss, 4).unwrap_err();
        assert!(err.to_string().contains("terms"), "{err}");
    }
}
