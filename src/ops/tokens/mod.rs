//! Token assembly and small elementwise ops (patchify, token embedding, prompts, residuals):
//! `cpu.rs` holds the twins (what `CpuBackend` runs), `cuda.rs` the launchers of
//! `kernels/tokens.cu`; the contract of each is the `backend::Backend` method of the same name.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

/// Images `[B, C, H, W]` cut into `patch x patch` patches (`Np = (H/p) * (W/p)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PatchShape {
    pub batch: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub patch: usize,
}

impl PatchShape {
    /// Values in the batch of images.
    pub fn image_len(&self) -> usize {
        self.batch * self.channels * self.height * self.width
    }
}

/// The token layout of a batch: `[B, N, D]`, `N = 1 + Np + P`, rows stored in the order `[CLS,
/// patches, prompts]`. The model's sequence is `[CLS, prompts, patches]` (SPEC §2); attention
/// sees every token whatever the order, so storing the prompts last leaves the image rows
/// (`0 .. 1+Np`) and the prompt rows each contiguous: a block whose prompt outputs are discarded
/// runs its queries, projection and MLP over the image rows alone, and the last block over the
/// prompt rows alone (docs/MODEL.md#token-layout).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenShape {
    pub batch: usize,
    /// Prompt rows per image (P), rows `1+Np .. N`.
    pub prompts: usize,
    /// Patch rows per image (Np).
    pub num_patches: usize,
    pub dim: usize,
}

impl TokenShape {
    /// Rows per image, `N = 1 + P + Np`.
    pub fn tokens(&self) -> usize {
        1 + self.num_patches + self.prompts
    }
    /// The first prompt row, `1 + Np`: rows before it are CLS and the patches.
    pub fn prompt_start(&self) -> usize {
        1 + self.num_patches
    }
    /// Values in the batch, `B * N * D`.
    pub fn len(&self) -> usize {
        self.batch * self.tokens() * self.dim
    }
    /// Whether the batch holds no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Rows `start .. start + count` of every image in a `[B, tokens, D]` buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenRange {
    /// Rows per image in the buffer.
    pub tokens: usize,
    /// First row copied, per image.
    pub start: usize,
}

/// A copy of `count` rows of width `dim` per image between two token layouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenCopy {
    pub batch: usize,
    pub dim: usize,
    pub count: usize,
    pub src: TokenRange,
    pub dst: TokenRange,
}

/// The operands of a residual connection with optional LayerScale, `x + ls * f`.
#[derive(Debug)]
pub struct Residual<'a, T> {
    /// The stream the branch is added to, `[rows, dim]`.
    pub x: &'a T,
    /// The branch output, `[rows, dim]`.
    pub f: &'a T,
    /// LayerScale `[dim]` (DINOv2), if the model has it.
    pub ls: Option<&'a T>,
}

impl<T> Clone for Residual<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Residual<'_, T> {}
