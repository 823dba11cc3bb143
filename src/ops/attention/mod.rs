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

/// Launch geometry of the fused kernels (`kernels/attention.cu`, `attn::Tiles<DH>`) for one
/// head dim: the forward takes `fwd_rows` query rows per block, the backward `bwd_keys` keys
/// per block and steps over the queries `bwd_rows` at a time; keys come in tiles of
/// [`FusedTiles::KEY_TILE`]. Shared memory is dynamic and sized from these figures (the emulator
/// test checks them against the kernel source's own).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FusedTiles {
    pub head_dim: usize,
    pub fwd_rows: usize,
    pub bwd_keys: usize,
    pub bwd_rows: usize,
}

impl FusedTiles {
    /// Keys per forward tile and per backward block.
    pub const KEY_TILE: usize = 64;
    /// Threads per block of the forward and the backward.
    pub const THREADS: usize = 128;

    /// The tiles of head dim `head_dim`, if the fused kernels are compiled for it.
    pub fn of(head_dim: usize) -> Option<Self> {
        FUSED_TILES.iter().copied().find(|t| t.head_dim == head_dim)
    }
    /// Bytes of a shared-memory row: `head_dim` bf16 padded by 16 bytes (no bank conflicts).
    fn row_bytes(&self) -> usize {
        (self.head_dim + 8) * 2
    }
    /// Dynamic shared memory of the forward: Q rows, a K tile and a V tile.
    pub fn fwd_smem_bytes(&self) -> usize {
        (self.fwd_rows + 2 * Self::KEY_TILE) * self.row_bytes()
    }
    /// Dynamic shared memory of the backward: K, V of the block's keys, Q and dO of a step,
    /// dS^T `[keys][bwd_rows + 8]` bf16, and the step's log-sum-exps and row sums (f32).
    pub fn bwd_smem_bytes(&self) -> usize {
        (2 * self.bwd_keys + 2 * self.bwd_rows) * self.row_bytes() + self.bwd_keys * (self.bwd_rows + 8) * 2 + 2 * self.bwd_rows * 4
    }
}

const fn tiles(head_dim: usize, fwd_rows: usize, bwd_rows: usize) -> FusedTiles {
    FusedTiles { head_dim, fwd_rows, bwd_keys: FusedTiles::KEY_TILE, bwd_rows }
}

/// Every head dim the fused kernels are compiled for (ViT-S/B/L: 64; ViT-H: 80; 32 and 128
/// for narrow and wide heads). The smaller tiles at 80 and 128 keep the accumulators in
/// registers without spilling.
pub const FUSED_TILES: &[FusedTiles] = &[tiles(32, 128, 64), tiles(64, 128, 64), tiles(80, 64, 32), tiles(128, 64, 16)];

/// Head dims the fused kernels are compiled for (those of [`FUSED_TILES`]); the CUDA backend
/// runs any other head dim through a plain fp32 attention.
pub const FUSED_HEAD_DIMS: &[usize] = &[32, 64, 80, 128];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_head_dims_are_the_tiled_ones() {
        let dims: Vec<usize> = FUSED_TILES.iter().map(|t| t.head_dim).collect();
        assert_eq!(dims, FUSED_HEAD_DIMS);
        // The ViT-B backward fits the 48 KB a kernel gets without opting in; head dim 128's
        // forward does not.
        assert!(FusedTiles::of(64).unwrap().bwd_smem_bytes() <= 48 * 1024);
        assert!(FusedTiles::of(128).unwrap().fwd_smem_bytes() > 48 * 1024);
        assert_eq!(FusedTiles::of(48), None);
    }
}
