//! CPU reference of the ASL op, generic over f32/f64.

use super::AslConfig;
use num_traits::Float;

fn cast<T: Float>(v: f64) -> T {
    // f64 -> f32/f64 casts always succeed (out-of-range values become +-inf).
    T::from(v).unwrap_or_else(T::nan)
}

/// sigmoid(x) without overflow for either sign.
fn sigmoid<T: Float>(x: T) -> T {
    if x >= T::zero() {
        T::one() / (T::one() + (-x).exp())
    } else {
        let e = x.exp();
        e / (T::one() + e)
    }
}

/// log(sigmoid(x)) = min(x, 0) - log(1 + exp(-|x|)), exact for large |x|.
fn log_sigmoid<T: Float>(x: T) -> T {
    x.min(T::zero()) - (-x.abs()).exp().ln_1p()
}

/// Sum over all elements of the per-label ASL (docs/MODEL.md#the-asymmetric-loss), from logits.
/// If `grad` is Some, writes d(sum)/d(logit) per element. Scaling (1000/(B*K)) and the four-term
/// sum are the caller's.
///
/// Targets are normally 0/1; other values in [0, 1] weight the two terms linearly. The sum is
/// accumulated in f64 whatever `T` is. Panics if the slice lengths differ (a caller bug).
pub fn asl_forward_backward<T: Float>(logits: &[T], targets: &[T], cfg: &AslConfig, grad: Option<&mut [T]>) -> T {
    assert_eq!(logits.len(), targets.len(), "asl: logits and targets differ in length");
    let gp: T = cast(cfg.gamma_pos);
    let gn: T = cast(cfg.gamma_neg);
    let clip: T = cast(cfg.clip);
    let log_eps: T = cast(cfg.eps.ln());
    let mut total = 0.0f64;
    let mut grad = grad;
    if let Some(g) = grad.as_deref() {
        assert_eq!(g.len(), logits.len(), "asl: grad and logits differ in length");
    }
    for (i, (&x, &y)) in logits.iter().zip(targets).enumerate() {
        let p = sigmoid(x);
        let q = sigmoid(-x); // 1 - p, accurate when p is near 1

        // Positive term: (1-p)^g+ * max(log p, log eps).
        let lp_raw = log_sigmoid(x);
        let lp_clamped = lp_raw < log_eps;
        let lp = if lp_clamped { log_eps } else { lp_raw };
        let wp = q.powf(gp);

        // Negative term: p_m^g- * max(log(1 - p_m), log eps), 1 - p_m = min(q + clip, 1).
        let (pm, ln_raw) = if clip > T::zero() {
            let pm = (p - clip).max(T::zero());
            // q + clip >= clip > 0: the log is safe; at the floor 1 - p_m = 1 exactly.
            (pm, if pm > T::zero() { (q + clip).ln() } else { T::zero() })
        } else {
            (p, log_sigmoid(-x))
        };
        let ln_clamped = ln_raw < log_eps;
        let ln = if ln_clamped { log_eps } else { ln_raw };
        let wn = pm.powf(gn);

        let yn = T::one() - y;
        let loss = -(y * wp * lp) - yn * wn * ln;
        total += loss.to_f64().unwrap_or(f64::NAN);

        if let Some(g) = grad.as_deref_mut() {
            // d log p / dx = 1 - p; zero where the clamp holds.
            let dlp = if lp_clamped { T::zero() } else { q };
            // d log(1 - p_m) / dx = -p(1-p) / (1 - p_m) while p > clip (= -p when clip = 0).
            let dln = if ln_clamped || pm <= T::zero() {
                T::zero()
            } else if clip > T::zero() {
                -(p * q) / (q + clip)
            } else {
                -p
            };
            let mut d = -(y * wp * dlp) - yn * wn * dln;
            if cfg.exact_grad {
                // d (1-p)^g+ / dx = -g+ p (1-p)^g+.
                let dwp = -(gp * p * wp);
                // d p_m^g- / dx = g- p_m^(g- - 1) p (1-p) while p > clip (= g- p^g- (1-p) at clip 0).
                let dwn = if pm <= T::zero() || gn == T::zero() {
                    T::zero()
                } else if clip > T::zero() {
                    gn * pm.powf(gn - T::one()) * p * q
                } else {
                    gn * wn * q
                };
                d = d - y * dwp * lp - yn * dwn * ln;
            }
            g[i] = d;
        }
    }
    cast(total)
}
