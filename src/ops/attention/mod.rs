//! Multi-head self-attention with the prompt-augmented mask, forward and backward
//! (docs/MODEL.md#the-prompt-augmented-attention-mask).
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
//! `N` tokens. The model stores its tokens `[CLS, patches, prompts]` and runs each block with
//! the query rows something reads (docs/MODEL.md#token-layout): its last block the prompts
//! `[1+Np, N)`, the others CLS and the patches `[0, 1+Np)` (deep prompts) or all tokens.
//!
//! Mask: tokens `prompt_start .. prompt_end` (the model's prompts, `[1+Np, N)`) are prompts. A prompt
//! query does not attend to other prompt keys (it sees CLS, itself and the patches); every
//! other query attends to all tokens. `prompt_start == prompt_end` means no mask.

pub mod cpu;
#[cfg(feature = "fast-cpu")]
mod cpu_f32;
#[cfg(feature = "cuda")]
pub mod cuda;

/// Sizes of one attention call. `scale = head_dim^-1/2`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub batch: usize,
    pub tokens: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// First prompt token (`1 + Np` in the model, which stores its prompts last).
    pub prompt_start: usize,
    /// One past the last prompt token (`N` in the model).
    pub prompt_end: usize,
    /// First query token.
    pub q_start: usize,
    /// Number of query tokens (`out` and `lse` rows per image and head).
    pub q_len: usize,
}

impl AttnShape {
    /// Every token is a query.
    pub fn full(batch: usize, tokens: usize, heads: usize, head_dim: usize, prompt_start: usize, prompt_end: usize) -> Self {
        Self {
            batch,
            tokens,
            heads,
            head_dim,
            prompt_start,
            prompt_end,
            q_start: 0,
            q_len: tokens,
        }
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

// The compiled tile shapes and their shared memory: src/contract.rs, the one definition
// kernels/attention.cu is instantiated from.
pub use crate::contract::attention::{BwdTiles, FwdTiles, BWD_TILES, FUSED_HEAD_DIMS, FWD_TILES};

/// Keys per tile of the fused forward.
pub const KEY_TILE: usize = crate::contract::attention::ATTN_KEY_TILE;
/// Threads per block of the fused forward.
pub const FUSED_THREADS: usize = crate::contract::attention::ATTN_THREADS;

/// The launcher's forward for `head_dim` (the first compiled one), if any.
pub fn fwd_tiles(head_dim: usize) -> Option<FwdTiles> {
    FWD_TILES.iter().copied().find(|t| t.head_dim == head_dim)
}

/// The launcher's backward for `head_dim` (the first compiled one), if any.
pub fn bwd_tiles(head_dim: usize) -> Option<BwdTiles> {
    BWD_TILES.iter().copied().find(|t| t.head_dim == head_dim)
}

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
