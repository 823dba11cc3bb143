//! The ML-VPT head (docs/MODEL.md#the-label-aware-mixture-of-experts-head) and the plain-VPT
//! linear head, forward and backward.
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

crate::ops::buffers! {
    /// The adapters' trainable tensors: `w1 [P, r, D]`, `b1 [P, r]`, `w2 [P, D, r]`, `b2 [P, D]`.
    pub struct AdapterParams { w1, b1, w2, b2 }
}

crate::ops::buffers! {
    /// One branch's trainable tensors: the gate table `gate [rows, D]` (rows = E*K or E*T), the
    /// classifier `w [K, D]` and its bias `c [K]`.
    pub struct BranchParams { gate, w, c }
}

crate::ops::buffers! {
    /// The plain-VPT head's trainable tensors: `w [K, D]`, `c [K]`.
    pub struct VptParams { w, c }
}

crate::ops::buffers! {
    /// One branch's routing tables, `[E*K]` each: the prompt token of expert `e` of label `k`'s
    /// group (`token[e*K + k]`), and its row of the gate table (`gate_row[e*K + k]`).
    pub struct GateTables { token, gate_row }
}

crate::ops::buffers! {
    /// What the MoE ops read from the tokens: the group tokens `z [B, P, D]` and their adapted
    /// copies `adapted [B, P, D]` (and, in the backward, the gradients of both).
    pub struct HeadInputs { z, adapted }
}

crate::ops::buffers! {
    /// One branch's outputs: class logits `y [B, K]` and gate logits `m [B, K]` (the backward
    /// takes their gradients in the same shape).
    pub struct BranchLogits { y, m }
}

crate::ops::buffers! {
    /// What the MoE forward saves for the backward: gate scores `q` and classifier responses
    /// `r`, `[B, E, K]` each.
    pub struct MoeSaved { q, r }
}

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

/// Which kernels do the head's matrix contractions: the adapters' two rank-r projections
/// (forward and token gradients) and the MoE ops' three (gate scores and classifier responses;
/// token gradients; per-pair parameter-gradient rows). Both sets compute the same functions
/// with the same launch arguments; the softmax/mixture, coefficient, summing and
/// parameter-gradient kernels of the adapters are shared.
///
/// ```
/// use mlvpt::ops::head::HeadKernels;
/// assert_eq!(HeadKernels::default(), HeadKernels::Mma); // tensor cores unless asked otherwise
/// assert_eq!(HeadKernels::ALL.map(HeadKernels::name), ["mma", "fp32"]);
/// assert_eq!(HeadKernels::from_name("fp32"), Some(HeadKernels::Fp32)); // `--head-kernels fp32`
/// assert_eq!(HeadKernels::from_name("tf32"), None);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HeadKernels {
    /// `kernels/moe_mma.cu` and `kernels/adapter_mma.cu`: `mma.sync` bf16 tensor cores, the
    /// fp32 operands split into two bf16 (about 2^-17 relative each; with the tensor cores'
    /// truncating fp32 adds a dot product may differ from an fp32 one by ~2^-16 of the sum of
    /// its terms' magnitudes). The default: at
    /// Objects365's shape each MoE contraction is 215 M multiply-adds (two in the forward, four
    /// in the backward), more than fp32 FMA can do in the head's time budget, and the adapters'
    /// reductions over D need no shuffles or per-image-group barriers (docs/PERF.md).
    #[default]
    Mma,
    /// `kernels/head.cu`: fp32 CUDA cores, fp32 sums.
    Fp32,
}

impl HeadKernels {
    /// Both, default first (tests and benches run each).
    pub const ALL: [HeadKernels; 2] = [HeadKernels::Mma, HeadKernels::Fp32];

    /// The name `mlvpt bench-step --head-kernels` takes and reports.
    pub fn name(self) -> &'static str {
        match self {
            HeadKernels::Mma => "mma",
            HeadKernels::Fp32 => "fp32",
        }
    }

    /// The kernels called `name` (`mma` or `fp32`).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
}

#[cfg(test)]
mod tests {
    use super::HeadKernels;

    #[test]
    fn head_kernel_names_round_trip() {
        for k in HeadKernels::ALL {
            assert_eq!(HeadKernels::from_name(k.name()), Some(k));
        }
        assert_eq!(HeadKernels::ALL[0], HeadKernels::default());
        assert_eq!(HeadKernels::from_name("tf32"), None);
    }
}
