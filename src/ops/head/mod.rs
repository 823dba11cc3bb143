//! The ML-VPT head (SPEC 3) and the plain-VPT linear head, forward and backward.
//!
//! Three ops, all on the group tokens `Z [B, P, D]` (final-norm outputs at the prompts):
//! - **adapter**: per prompt token `t`, `a_t(z) = z + W2_t GELU(W1_t z + b1_t) + b2_t` with
//!   `W1 [P, r, D]`, `b1 [P, r]`, `W2 [P, D, r]`, `b2 [P, D]`; saves the pre-GELU `u [B, P, r]`.
//! - **moe** (one branch): with `tok[e*K + k]` the prompt token of expert `e` of label `k`'s group
//!   and `grow[e*K + k]` its row of the gate table `G [rows, D]` (label gating: `rows = E*K`,
//!   row `e*K + k`; group gating: `rows = E*T`, row `e*T + g(k)`):
//!   `q[b,e,k] = <G[grow], Z[b,tok]>`, `A = softmax_e q`, `m[b,k] = sum_e A q`,
//!   `r[b,e,k] = <W[k], a(Z)[b,tok]>`, `y[b,k] = sum_e A r + c[k]` (the expert mixture `f` is
//!   never formed: `<W[k], sum_e A a> = sum_e A <W[k], a>`). Saves `q, r [B, E, K]`.
//! - **vpt**: `zbar[b] = mean_t Z[b,t]`, `y = zbar W^T + c` with `W [K, D]`, `c [K]`.
//!
//! Backward writes the parameter gradients (overwrites) and accumulates into the token
//! gradients (`dz`, `dadapted`), since two branches feed the same tokens' gradients.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

/// Sizes of the adapter op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdapterShape {
    pub batch: usize,
    pub tokens: usize,
    pub dim: usize,
    pub rank: usize,
}

/// Sizes of one branch's gating, mixture and classifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoeShape {
    pub batch: usize,
    /// Prompt tokens per image (P).
    pub tokens: usize,
    pub dim: usize,
    pub labels: usize,
    pub experts: usize,
    /// Rows of the gate table (E*K for label gating, E*T for group gating).
    pub gate_rows: usize,
}

/// Sizes of the plain-VPT head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VptHeadShape {
    pub batch: usize,
    pub tokens: usize,
    pub dim: usize,
    pub labels: usize,
}
