//! Multi-head self-attention with the prompt-augmented mask (SPEC 2), forward and backward.
//!
//! Storage (no transposes anywhere, so a GPU kernel reads the same layout):
//! - `qkv [B, N, 3, h, dh]`: the output of timm's `qkv` linear as it comes (`[B, N, 3D]`);
//!   Q, K, V of head `j` for token `i` sit at `qkv[b, i, {0,1,2}, j, :]`, read by strides.
//! - `out [B, Nq, D]` with head `j` in columns `j*dh .. (j+1)*dh` (the input of `proj`).
//! - `lse [B, h, Nq]`: log-sum-exp of each softmax row, saved by the forward; the backward
//!   recomputes the probabilities as `exp(scale * q.k - lse)` (no `N x N` matrix is kept).
//! - `dqkv [B, N, 3D]`: same layout as `qkv` (Q rows outside the query range are zero).
//!
//! Queries: tokens `q_start .. q_start + Nq` (`Nq = q_len`); keys and values are always all
//! `N` tokens. The model's last block only needs its prompt outputs, so it runs with the
//! query range `[1, 1+P)`; every other block uses all tokens (`q_start 0, q_len N`).
//!
//! Mask: tokens `prompt_start .. prompt_end` (the prompts, `[1, 1+P)`) are prompts. A prompt
//! query does not attend to other prompt keys (it sees CLS, itself and the patches); every
//! other query attends to all tokens. `prompt_start == prompt_end` means no mask.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

/// Sizes of one attention call. `scale = head_dim^-1/2`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub batch: usize,
    pub tokens: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// First prompt token (1 in the model).
    pub prompt_start: usize,
    /// One past the last prompt token (1 + P).
    pub prompt_end: usize,
    /// First query token.
    pub q_start: usize,
    /// Number of query tokens (`out` and `lse` rows per image and head).
    pub q_len: usize,
}

impl AttnShape {
    /// Every token is a query.
    pub fn full(batch: usize, tokens: usize, heads: usize, head_dim: usize, prompt_start: usize, prompt_end: usize) -> Self {
        Self { batch, tokens, heads, head_dim, prompt_start, prompt_end, q_start: 0, q_len: tokens }
    }
    /// Model width `D = heads * head_dim`.
    pub fn dim(&self) -> usize {
        self.heads * self.head_dim
    }
    /// Whether query `i` may attend to key `j`.
    #[inline]
    pub fn allowed(&self, i: usize, j: usize) -> bool {
        let p = |t: usize| t >= self.prompt_start && t < self.prompt_end;
        i == j || !(p(i) && p(j))
    }
}

/// Keys per tile of the fused forward (`kernels/attention.cu`).
pub const KEY_TILE: usize = 64;
/// Threads per block of the fused forward.
pub const FUSED_THREADS: usize = 128;

/// Bytes of a shared-memory row of the fused kernels: `head_dim` bf16 padded by 16 bytes (the
/// padding keeps `ldmatrix` free of bank conflicts).
fn smem_row_bytes(head_dim: usize) -> usize {
    (head_dim + 8) * 2
}

/// One compiled tile shape of the fused forward (`ATTN_FWD_CONFIGS` in kernels/attention.cu):
/// `rows` query rows per block of 4 warps, keys in tiles of [`KEY_TILE`]; `pipelined`: the
/// software-pipelined schedule (the next tile's Q K^T issued before this tile's softmax, K and
/// V double-buffered).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FwdTiles {
    pub head_dim: usize,
    pub rows: usize,
    pub pipelined: bool,
    pub kernel: &'static str,
}

impl FwdTiles {
    /// Dynamic shared memory: Q rows, a K tile and a V tile (two each when pipelined).
    pub fn smem_bytes(&self) -> usize {
        let kv_tiles = if self.pipelined { 4 } else { 2 };
        (self.rows + kv_tiles * KEY_TILE) * smem_row_bytes(self.head_dim)
    }
}

/// One compiled tile shape of the fused backward (`ATTN_BWD_CONFIGS`): `keys` keys per block
/// (16 per warp), the queries `rows` at a time. With `dq_kernel` (a split backward) `kernel`
/// computes dK and dV only and `dq_kernel` computes dQ in a query-stationary pass of
/// [`BwdTiles::DQ_ROWS`] rows per block, without fp32 atomics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BwdTiles {
    pub head_dim: usize,
    pub keys: usize,
    pub rows: usize,
    pub kernel: &'static str,
    pub dq_kernel: Option<&'static str>,
}

impl BwdTiles {
    /// Query rows per block of a split backward's dQ pass (4 warps of 16 rows).
    pub const DQ_ROWS: usize = 64;

    /// Threads per block: a warp per 16 keys.
    pub fn threads(&self) -> usize {
        self.keys * 2
    }
    /// Dynamic shared memory: K, V of the block's keys, Q and dO of a step, dS^T
    /// `[keys][rows + 8]` bf16, and the step's log-sum-exps and row sums (f32); a split
    /// backward has no dS^T and two of everything else of a step.
    pub fn smem_bytes(&self) -> usize {
        let row = smem_row_bytes(self.head_dim);
        if self.dq_kernel.is_some() {
            (2 * self.keys + 4 * self.rows) * row + 4 * self.rows * 4
        } else {
            (2 * self.keys + 2 * self.rows) * row + self.keys * (self.rows + 8) * 2 + 2 * self.rows * 4
        }
    }
    /// Dynamic shared memory of the dQ pass: Q and dO rows, K and V tiles twice each.
    pub fn dq_smem_bytes(&self) -> usize {
        (2 * Self::DQ_ROWS + 4 * KEY_TILE) * smem_row_bytes(self.head_dim)
    }
}

/// Every compiled forward, in the kernel source's order: the first of a head dim is the
/// launcher's default, the others are alternatives `benches/gpu_attention.rs` measures
/// against it (ViT-S/B/L: 64; ViT-H: 80; 32 and 128 for narrow and wide heads). Head dims 80
/// and 128 take 64 rows so the accumulators fit in registers without spilling.
pub const FWD_TILES: &[FwdTiles] = &[
    FwdTiles { head_dim: 32, rows: 128, pipelined: false, kernel: "attn_fwd_d32" },
    FwdTiles { head_dim: 64, rows: 128, pipelined: false, kernel: "attn_fwd_d64" },
    FwdTiles { head_dim: 64, rows: 64, pipelined: false, kernel: "attn_fwd_d64_r64" },
    FwdTiles { head_dim: 64, rows: 64, pipelined: true, kernel: "attn_fwd_d64_r64p" },
    FwdTiles { head_dim: 80, rows: 64, pipelined: false, kernel: "attn_fwd_d80" },
    FwdTiles { head_dim: 128, rows: 64, pipelined: false, kernel: "attn_fwd_d128" },
];

/// Every compiled backward, as [`FWD_TILES`]; steps of 32 and 16 queries at head dims 80 and
/// 128 keep dK, dV and the step's scores in registers. `attn_bwd_d64_k128` (8 warps, 128 keys
/// per block) halves the dQ atomics and the Q, dO reloads of the 64-key blocks;
/// `attn_bwd_d64_split` computes dQ in a pass of its own (two more matrix products, no
/// atomics, no fp32 scratch: deterministic).
pub const BWD_TILES: &[BwdTiles] = &[
    bwd(32, 64, 64, "attn_bwd_d32", None),
    bwd(64, 64, 64, "attn_bwd_d64", None),
    bwd(64, 64, 32, "attn_bwd_d64_q32", None),
    bwd(64, 128, 64, "attn_bwd_d64_k128", None),
    bwd(64, 64, 64, "attn_bwd_d64_split", Some("attn_bwd_d64_split_dq")),
    bwd(80, 64, 32, "attn_bwd_d80", None),
    bwd(128, 64, 16, "attn_bwd_d128", None),
];

const fn bwd(head_dim: usize, keys: usize, rows: usize, kernel: &'static str, dq_kernel: Option<&'static str>) -> BwdTiles {
    BwdTiles { head_dim, keys, rows, kernel, dq_kernel }
}

/// The launcher's forward for `head_dim` (the first compiled one), if any.
pub fn fwd_tiles(head_dim: usize) -> Option<FwdTiles> {
    FWD_TILES.iter().copied().find(|t| t.head_dim == head_dim)
}

/// The launcher's backward for `head_dim` (the first compiled one), if any.
pub fn bwd_tiles(head_dim: usize) -> Option<BwdTiles> {
    BWD_TILES.iter().copied().find(|t| t.head_dim == head_dim)
}

/// Head dims the fused kernels are compiled for; the CUDA backend runs any other head dim
/// through a plain fp32 attention.
pub const FUSED_HEAD_DIMS: &[usize] = &[32, 64, 80, 128];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fused_head_dim_has_a_forward_and_a_backward() {
        for &dh in FUSED_HEAD_DIMS {
            assert_eq!(fwd_tiles(dh).map(|t| t.head_dim), Some(dh));
            assert_eq!(bwd_tiles(dh).map(|t| t.head_dim), Some(dh));
        }
        assert!(FWD_TILES.iter().all(|t| FUSED_HEAD_DIMS.contains(&t.head_dim)));
        assert!(BWD_TILES.iter().all(|t| FUSED_HEAD_DIMS.contains(&t.head_dim)));
        assert_eq!(fwd_tiles(48), None);
        // The ViT-B kernels fit the 48 KB a kernel gets without opting in; head dim 128's
        // forward does not.
        assert!(fwd_tiles(64).unwrap().smem_bytes() <= 48 * 1024);
        assert!(bwd_tiles(64).unwrap().smem_bytes() <= 48 * 1024);
        assert!(fwd_tiles(128).unwrap().smem_bytes() > 48 * 1024);
    }
}
