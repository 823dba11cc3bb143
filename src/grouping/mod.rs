//! Spectral label grouping (docs/MODEL.md#label-grouping): co-occurrence counts, the
//! correlative and discriminative graphs, spectral embedding and k-means.
//!
//! ```
//! use mlvpt::grouping::{correlative, Cooccurrence, GroupingConfig};
//! // Two blocks of labels that only co-occur within their block.
//! let lists: Vec<Vec<usize>> = vec![vec![0, 1], vec![1, 2], vec![0, 2], vec![3, 4], vec![4, 5], vec![3, 5]];
//! let co = Cooccurrence::from_label_lists(6, lists.iter().map(|l| l.as_slice()));
//! let p = correlative(&co, &GroupingConfig { groups: 2, ..Default::default() }).unwrap();
//! assert_eq!(p.groups, vec![vec![0, 1, 2], vec![3, 4, 5]]);
//! ```

pub mod compare;
pub mod cooccurrence;
pub mod graph;
pub mod input;
pub mod kmeans;
pub mod plot;
pub mod spectral;

pub use compare::adjusted_rand_index;
pub use cooccurrence::Cooccurrence;

use nalgebra::DMatrix;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Settings of one grouping run (docs/MODEL.md#grouping-defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct GroupingConfig {
    /// T, groups per graph.
    pub groups: usize,
    /// tau+ for the correlative graph.
    pub tau_co: f64,
    /// tau- for the discriminative graph.
    pub tau_dis: f64,
    pub seed: u64,
    /// k-means restarts; the lowest inertia wins.
    pub restarts: usize,
}

impl Default for GroupingConfig {
    fn default() -> Self {
        Self {
            groups: 5,
            tau_co: 2.0,
            tau_dis: 2.0,
            seed: 0,
            restarts: 200,
        }
    }
}

/// A partition of the labels into T non-empty groups.
#[derive(Debug, Clone, PartialEq)]
pub struct Partition {
    /// Label indices of each group, ascending; groups ordered by their smallest label.
    pub groups: Vec<Vec<usize>>,
    /// The T+1 smallest eigenvalues of the graph's L_sym, ascending (fewer when the graph has
    /// fewer nodes); empty for a random partition.
    pub eigenvalues: Vec<f64>,
}

impl Partition {
    /// Group of each label `0..k`; a label in no group gets `usize::MAX`.
    pub fn label_to_group(&self, k: usize) -> Vec<usize> {
        let mut out = vec![usize::MAX; k];
        for (g, members) in self.groups.iter().enumerate() {
            for &l in members {
                if l < k {
                    out[l] = g;
                }
            }
        }
        out
    }

    /// Builds a partition from one group id per label, in canonical order.
    pub fn from_assignment(assignment: &[usize], eigenvalues: Vec<f64>) -> Self {
        let t = assignment.iter().map(|&g| g + 1).max().unwrap_or(0);
        let mut groups = vec![Vec::new(); t];
        for (l, &g) in assignment.iter().enumerate() {
            groups[g].push(l);
        }
        groups.retain(|g| !g.is_empty());
        groups.sort_by_key(|g| g[0]);
        Self { groups, eigenvalues }
    }
}

/// Why a grouping cannot be made.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GroupingError {
    #[error("the number of groups T must be at least 1 (got {0})")]
    TooFewGroups(usize),
    #[error("{groups} groups asked for {labels} labels: T must not exceed K")]
    MoreGroupsThanLabels { groups: usize, labels: usize },
    #[error("only {used} of the {labels} labels occur in any image, fewer than the {groups} groups asked for")]
    TooFewUsedLabels { used: usize, labels: usize, groups: usize },
    #[error("{name} must be a positive finite number (got {value})")]
    BadTau { name: &'static str, value: f64 },
    #[error("restarts must be at least 1")]
    NoRestarts,
    #[error("the label matrix is empty: no label occurs in any image")]
    EmptyLabels,
}

/// Which partitions the model gets (docs/MODEL.md#branches-and-ablations, and the paper's Tab. 4
/// ablations).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GroupingMode {
    /// Correlative and discriminative (the method).
    Both,
    /// Correlative only.
    Co,
    /// Discriminative only.
    Dc,
    /// Two random partitions.
    Random,
}

impl GroupingConfig {
    /// Checks the settings for `k` labels (pass `usize::MAX` to check all but T <= K before
    /// the labels are read).
    pub fn validate(&self, k: usize) -> Result<(), GroupingError> {
        check_config(k, self)
    }
}

fn check_config(k: usize, cfg: &GroupingConfig) -> Result<(), GroupingError> {
    if cfg.groups < 1 {
        return Err(GroupingError::TooFewGroups(cfg.groups));
    }
    if cfg.groups > k {
        return Err(GroupingError::MoreGroupsThanLabels {
            groups: cfg.groups,
            labels: k,
        });
    }
    for (name, value) in [("tau_co", cfg.tau_co), ("tau_dis", cfg.tau_dis)] {
        if !(value > 0.0 && value.is_finite()) {
            return Err(GroupingError::BadTau { name, value });
        }
    }
    if cfg.restarts < 1 {
        return Err(GroupingError::NoRestarts);
    }
    Ok(())
}

/// Spectral clustering of graph `m` over the labels that occur; labels that never occur go
/// into the smallest group afterwards (docs/MODEL.md#labels-that-never-occur).
fn cluster_graph(co: &Cooccurrence, m: &DMatrix<f64>, cfg: &GroupingConfig) -> Result<Partition, GroupingError> {
    check_config(co.k, cfg)?;
    let used: Vec<usize> = (0..co.k).filter(|&i| co.counts[i] > 0).collect();
    if used.is_empty() {
        return Err(GroupingError::EmptyLabels);
    }
    let t = cfg.groups;
    if used.len() < t {
        return Err(GroupingError::TooFewUsedLabels {
            used: used.len(),
            labels: co.k,
            groups: t,
        });
    }
    let emb = spectral::embed(m, &used, t, t + 1);
    let clusters = kmeans::kmeans(&emb.points, emb.dims, t, cfg.restarts, cfg.seed);
    let mut assignment = vec![usize::MAX; co.k];
    for (r, &l) in used.iter().enumerate() {
        assignment[l] = clusters.labels[r];
    }
    let mut sizes = vec![0usize; t];
    clusters.labels.iter().for_each(|&g| sizes[g] += 1);
    let smallest = (0..t).min_by_key(|&g| (sizes[g], g)).expect("t >= 1");
    for a in assignment.iter_mut().filter(|a| **a == usize::MAX) {
        *a = smallest;
    }
    Ok(Partition::from_assignment(&assignment, emb.eigenvalues))
}

/// The correlative partition C+ (graph M+ with tau_co).
pub fn correlative(co: &Cooccurrence, cfg: &GroupingConfig) -> Result<Partition, GroupingError> {
    check_config(co.k, cfg)?;
    cluster_graph(co, &graph::correlative_affinity(co, cfg.tau_co), cfg)
}

/// The discriminative partition C- (graph M- = 11^T - M+ with tau_dis).
pub fn discriminative(co: &Cooccurrence, cfg: &GroupingConfig) -> Result<Partition, GroupingError> {
    check_config(co.k, cfg)?;
    cluster_graph(co, &graph::discriminative_affinity(co, cfg.tau_dis), cfg)
}

/// The correlative and discriminative partitions, computed side by side (the eigensolver is
/// the cost at large K, and the two graphs are independent).
pub fn both(co: &Cooccurrence, cfg: &GroupingConfig) -> (Result<Partition, GroupingError>, Result<Partition, GroupingError>) {
    rayon::join(|| correlative(co, cfg), || discriminative(co, cfg))
}

/// A random partition of `k` labels into `t` groups of near-equal size (sizes differ by at
/// most one), deterministic for a seed.
pub fn random_partition(k: usize, t: usize, seed: u64) -> Result<Partition, GroupingError> {
    if t < 1 {
        return Err(GroupingError::TooFewGroups(t));
    }
    if t > k {
        return Err(GroupingError::MoreGroupsThanLabels { groups: t, labels: k });
    }
    let mut perm: Vec<usize> = (0..k).collect();
    perm.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let mut assignment = vec![0; k];
    for (pos, &l) in perm.iter().enumerate() {
        assignment[l] = pos % t;
    }
    Ok(Partition::from_assignment(&assignment, Vec::new()))
}

/// The branches the model gets: Both -> [correlative, discriminative]; Co -> [correlative];
/// Dc -> [discriminative]; Random -> [random(seed), random(seed+1)].
pub fn branches(co: &Cooccurrence, mode: GroupingMode, cfg: &GroupingConfig) -> Result<Vec<Partition>, GroupingError> {
    check_config(co.k, cfg)?;
    match mode {
        GroupingMode::Both => {
            let (c, d) = both(co, cfg);
            Ok(vec![c?, d?])
        }
        GroupingMode::Co => Ok(vec![correlative(co, cfg)?]),
        GroupingMode::Dc => Ok(vec![discriminative(co, cfg)?]),
        GroupingMode::Random => Ok(vec![
            random_partition(co.k, cfg.groups, cfg.seed)?,
            random_partition(co.k, cfg.groups, cfg.seed.wrapping_add(1))?,
        ]),
    }
}
