//! Shared by the ops' CPU checks: random f64 inputs, dot products and the central
//! finite-difference check every backward is held to.
#![allow(dead_code)]

use rand::Rng;
use rand_chacha::ChaCha8Rng;

pub fn rand_vec(rng: &mut ChaCha8Rng, n: usize, scale: f64) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Compares `analytic` with central differences of `f` at `x` (every entry).
pub fn fd_check(name: &str, x: &[f64], analytic: &[f64], mut f: impl FnMut(&[f64]) -> f64) {
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

pub fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}
