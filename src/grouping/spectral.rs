//! Spectral embedding of a graph (docs/MODEL.md#spectral-embedding), as scikit-learn's
//! `spectral_embedding` does it: eigenvectors of the normalized Laplacian's smallest
//! eigenvalues, rows scaled by 1/sqrt(d_i).

use nalgebra::{DMatrix, SymmetricEigen};

/// The embedding of the chosen nodes and the spectrum it came from.
#[derive(Debug, Clone)]
pub struct Embedding {
    /// Row-major `nodes x dims`: row r is node `nodes[r]` of the graph.
    pub points: Vec<f64>,
    pub dims: usize,
    /// The smallest `n_eigenvalues` eigenvalues of L_sym, ascending.
    pub eigenvalues: Vec<f64>,
}

/// L_sym = I - D^-1/2 M D^-1/2 of the subgraph on `nodes`, with self-loops removed and
/// d_i = sum_j M_ij. An isolated node (d_i = 0) gets a zero row, as scipy's `laplacian(normed=True)`
/// does: it is a component of its own (eigenvalue 0). Also returns sqrt(d) with isolated nodes at 1.
pub fn normalized_laplacian(m: &DMatrix<f64>, nodes: &[usize]) -> (DMatrix<f64>, Vec<f64>) {
    let n = nodes.len();
    let w = |a: usize, b: usize| if a == b { 0.0 } else { m[(nodes[a], nodes[b])] };
    let degree: Vec<f64> = (0..n).map(|a| (0..n).map(|b| w(a, b)).sum()).collect();
    let sqrt_d: Vec<f64> = degree.iter().map(|&d| if d > 0.0 { d.sqrt() } else { 1.0 }).collect();
    let lap = DMatrix::from_fn(n, n, |a, b| match (a == b, degree[a] > 0.0) {
        (true, true) => 1.0,
        (true, false) => 0.0,
        (false, _) => -w(a, b) / (sqrt_d[a] * sqrt_d[b]),
    });
    (lap, sqrt_d)
}

/// Embeds `nodes` of graph `m` into `dims` dimensions and reports the `n_eigenvalues` smallest
/// eigenvalues of L_sym (all of them when there are fewer nodes).
///
/// Each eigenvector's sign is fixed so that its largest-magnitude entry is positive (as
/// scikit-learn's `_deterministic_vector_sign_flip`); k-means distances do not depend on it,
/// but a printed embedding then does not either.
pub fn embed(m: &DMatrix<f64>, nodes: &[usize], dims: usize, n_eigenvalues: usize) -> Embedding {
    let n = nodes.len();
    let (lap, sqrt_d) = normalized_laplacian(m, nodes);
    let eig = SymmetricEigen::new(lap);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| eig.eigenvalues[a].total_cmp(&eig.eigenvalues[b]).then(a.cmp(&b)));
    let dims = dims.min(n);
    let mut points = vec![0.0; n * dims];
    for (c, &col) in order.iter().take(dims).enumerate() {
        let v = eig.eigenvectors.column(col);
        let mut big = 0;
        for r in 0..n {
            if v[r].abs() > v[big].abs() {
                big = r;
            }
        }
        let sign = if v[big] < 0.0 { -1.0 } else { 1.0 };
        for r in 0..n {
            points[r * dims + c] = sign * v[r] / sqrt_d[r];
        }
    }
    let eigenvalues = order.iter().take(n_eigenvalues.min(n)).map(|&i| eig.eigenvalues[i]).collect();
    Embedding { points, dims, eigenvalues }
}
