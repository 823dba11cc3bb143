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

/// Head dims the fused kernels (`kernels/attention.cu`) are compiled for; the CUDA backend
/// runs any other head dim through a plain fp32 attention.
pub const FUSED_HEAD_DIMS: &[usize] = &[32, 64];
