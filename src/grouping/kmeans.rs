//! k-means with greedy k-means++ seeding and many restarts (docs/MODEL.md#k-means), following
//! scikit-learn's `KMeans` (Lloyd iterations, empty clusters relocated to far points).
//!
//! Restarts run in parallel; each has its own random stream derived from (seed, restart), and the
//! winner is the lowest inertia with ties going to the lower restart index, so the result does
//! not depend on the thread count.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// A clustering of n points into k non-empty clusters.
#[derive(Debug, Clone, PartialEq)]
pub struct Clustering {
    /// Cluster of each point, numbered by first appearance (point 0 is in cluster 0).
    pub labels: Vec<usize>,
    /// Sum of squared distances of the points to their cluster centres.
    pub inertia: f64,
}

/// Most Lloyd iterations per restart (scikit-learn's default); they converge far earlier here.
const MAX_ITER: usize = 300;

fn dist2(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// Clusters `n = points.len() / dim` points (row-major) into `k` clusters, `1 <= k <= n`.
pub fn kmeans(points: &[f64], dim: usize, k: usize, restarts: usize, seed: u64) -> Clustering {
    let n = points.len().checked_div(dim).unwrap_or(0);
    assert!(k >= 1 && k <= n, "k-means: k = {k} clusters for {n} points");
    (0..restarts.max(1) as u64)
        .into_par_iter()
        .map(|r| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(r);
            let c = single_run(points, dim, k, &mut rng);
            (c, r)
        })
        .reduce_with(|a, b| if (b.0.inertia, b.1) < (a.0.inertia, a.1) { b } else { a })
        .map(|(c, _)| c)
        .expect("at least one restart")
}

/// Greedy k-means++ (scikit-learn's `_kmeans_plusplus`): each new centre is the best of
/// 2 + floor(ln k) candidates drawn with probability proportional to D(x)^2, "best" meaning
/// the one that lowers the potential (sum of D^2) most.
pub fn kmeans_plusplus(points: &[f64], dim: usize, k: usize, rng: &mut impl Rng) -> Vec<usize> {
    let n = points.len() / dim;
    let p = |i: usize| &points[i * dim..(i + 1) * dim];
    let trials = 2 + (k as f64).ln().floor() as usize;
    let mut centres = Vec::with_capacity(k);
    let first = rng.random_range(0..n);
    centres.push(first);
    let mut closest: Vec<f64> = (0..n).map(|i| dist2(p(i), p(first))).collect();
    let mut pot: f64 = closest.iter().sum();
    let mut cand_dist = vec![0.0; n];
    let mut best_dist = vec![0.0; n];
    while centres.len() < k {
        let mut best: Option<(f64, usize)> = None;
        for _ in 0..trials {
            let cand = if pot > 0.0 {
                // searchsorted(cumsum(closest), u * pot), clipped to n - 1.
                let target = rng.random::<f64>() * pot;
                let mut acc = 0.0;
                let mut pick = n - 1;
                for (i, &d) in closest.iter().enumerate() {
                    acc += d;
                    if acc > target {
                        pick = i;
                        break;
                    }
                }
                pick
            } else {
                // Every point sits on a centre: any point is as good as another.
                rng.random_range(0..n)
            };
            let mut cand_pot = 0.0;
            for i in 0..n {
                cand_dist[i] = closest[i].min(dist2(p(i), p(cand)));
                cand_pot += cand_dist[i];
            }
            if best.is_none_or(|(bp, _)| cand_pot < bp) {
                best = Some((cand_pot, cand));
                std::mem::swap(&mut best_dist, &mut cand_dist);
            }
        }
        let (bp, bc) = best.expect("trials >= 2");
        centres.push(bc);
        pot = bp;
        std::mem::swap(&mut closest, &mut best_dist);
    }
    centres
}

/// Assigns each point to its nearest centre (lowest index on ties); returns the inertia.
fn assign(points: &[f64], dim: usize, centres: &[f64], labels: &mut [usize], dists: &mut [f64]) -> f64 {
    let k = centres.len() / dim;
    let mut inertia = 0.0;
    for (i, x) in points.chunks_exact(dim).enumerate() {
        let (mut bl, mut bd) = (0, f64::INFINITY);
        for c in 0..k {
            let d = dist2(x, &centres[c * dim..(c + 1) * dim]);
            if d < bd {
                bd = d;
                bl = c;
            }
        }
        labels[i] = bl;
        dists[i] = bd;
        inertia += bd;
    }
    inertia
}

/// Centres as member means; an empty cluster takes the point farthest from its own centre
/// among clusters with more than one member (scikit-learn's relocation).
fn update(points: &[f64], dim: usize, labels: &mut [usize], dists: &[f64], centres: &mut [f64]) {
    let k = centres.len() / dim;
    let n = labels.len();
    let mut sizes = vec![0usize; k];
    for &l in labels.iter() {
        sizes[l] += 1;
    }
    let mut taken = vec![false; n];
    for c in 0..k {
        if sizes[c] > 0 {
            continue;
        }
        let far = (0..n)
            .filter(|&i| !taken[i] && sizes[labels[i]] > 1)
            .max_by(|&a, &b| dists[a].total_cmp(&dists[b]).then(b.cmp(&a)));
        if let Some(i) = far {
            sizes[labels[i]] -= 1;
            labels[i] = c;
            sizes[c] = 1;
            taken[i] = true;
        }
    }
    centres.iter_mut().for_each(|v| *v = 0.0);
    for (i, x) in points.chunks_exact(dim).enumerate() {
        let c = &mut centres[labels[i] * dim..(labels[i] + 1) * dim];
        c.iter_mut().zip(x).for_each(|(a, b)| *a += b);
    }
    for c in 0..k {
        let s = sizes[c].max(1) as f64;
        centres[c * dim..(c + 1) * dim].iter_mut().for_each(|v| *v /= s);
    }
}

/// One k-means++ seeding followed by Lloyd iterations to a fixed point.
fn single_run(points: &[f64], dim: usize, k: usize, rng: &mut impl Rng) -> Clustering {
    let n = points.len() / dim;
    let seeds = kmeans_plusplus(points, dim, k, rng);
    let mut centres: Vec<f64> = seeds.iter().flat_map(|&i| points[i * dim..(i + 1) * dim].to_vec()).collect();
    let mut labels = vec![usize::MAX; n];
    let mut next = vec![0; n];
    let mut dists = vec![0.0; n];
    for _ in 0..MAX_ITER {
        assign(points, dim, &centres, &mut next, &mut dists);
        if next == labels {
            break;
        }
        labels.copy_from_slice(&next);
        update(points, dim, &mut labels, &dists, &mut centres);
    }
    // Relocation may have moved points after the last assignment: make labels, centres and
    // inertia agree, and every cluster non-empty even when points coincide.
    update(points, dim, &mut labels, &dists, &mut centres);
    let inertia = labels
        .iter()
        .enumerate()
        .map(|(i, &l)| dist2(&points[i * dim..(i + 1) * dim], &centres[l * dim..(l + 1) * dim]))
        .sum();
    Clustering {
        labels: renumber(&labels),
        inertia,
    }
}

/// Numbers clusters by first appearance so equal partitions get equal labels.
fn renumber(labels: &[usize]) -> Vec<usize> {
    let mut map = std::collections::HashMap::new();
    labels
        .iter()
        .map(|&l| {
            let next = map.len();
            *map.entry(l).or_insert(next)
        })
        .collect()
}
