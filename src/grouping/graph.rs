//! The two label graphs (docs/MODEL.md#the-two-label-graphs): correlative M+ and discriminative M-.

use nalgebra::DMatrix;

use super::cooccurrence::Cooccurrence;

/// M+ = (R + R^T) / 2 with R = S^(1/tau), S_ij = C_ij / c_i, self-loops removed
/// (docs/MODEL.md#the-two-label-graphs).
///
/// K x K; the rows and columns of labels that never occur are zero (they have no edges).
/// Every entry lies in [0, 1] when C_ij <= min(c_i, c_j).
pub fn correlative_affinity(co: &Cooccurrence, tau: f64) -> DMatrix<f64> {
    let k = co.k;
    let inv_tau = 1.0 / tau;
    // R_ij = (C_ij / c_i)^(1/tau); the diagonal (S_ii = 1) is dropped with the self-loops.
    let r = DMatrix::from_fn(k, k, |i, j| {
        if i == j || co.counts[i] == 0 || co.counts[j] == 0 {
            0.0
        } else {
            (co.pair(i, j) as f64 / co.counts[i] as f64).powf(inv_tau)
        }
    });
    DMatrix::from_fn(k, k, |i, j| 0.5 * (r[(i, j)] + r[(j, i)]))
}

/// M- = 11^T - M+ (docs/MODEL.md#the-two-label-graphs), built from M+ with its own tau,
/// self-loops removed.
///
/// The seed paper writes `I - M+`. With the identity, every off-diagonal weight would be
/// `-M+_ij <= 0`: a graph of negative weights with no valid degree matrix, so no Laplacian
/// embedding. The seed's Algorithm 1 states `1 = G+ + G-`, i.e. the two graphs are
/// complements under the all-ones matrix, so `11^T` is what is meant: two labels that rarely
/// co-occur get a strong dis-occurrence edge. Labels that never occur keep no edges.
pub fn discriminative_affinity(co: &Cooccurrence, tau: f64) -> DMatrix<f64> {
    let plus = correlative_affinity(co, tau);
    let k = co.k;
    DMatrix::from_fn(k, k, |i, j| {
        if i == j || co.counts[i] == 0 || co.counts[j] == 0 {
            0.0
        } else {
            1.0 - plus[(i, j)]
        }
    })
}
