//! The seam between the training step and the hardware: the ops of
//! docs/MODEL.md#where-each-part-runs over opaque buffers. The step (`train::step`) is written
//! once against [`Backend`]; [`CpuBackend`] is the reference (and the default), a CUDA backend
//! implements the same trait op for op.
//!
//! Conventions for every op:
//! - Buffers are opaque (`Backend::Buf`, device memory on a GPU); the step never assumes host
//!   slices. A buffer may be longer than an op's shape needs; ops use the prefix.
//! - Tensors are row-major; tokens are `[B, N, D]` with `N = 1 + Np + P` stored in the order
//!   `[CLS, patches, prompts]`. See `docs/ARCHITECTURE.md`, "Storage layout".
//! - "writes" overwrites the destination; "accumulates" adds to it. Input and output buffers of
//!   one call are distinct (Rust's borrows guarantee it).
//! - Scalars (eps, lr, scales) are passed as f64 and used in the backend's float type.
//! - Buffers are allocated with a [`BufRole`] ([`Backend::alloc_as`]); a backend may store
//!   activations and frozen weights in a narrower type (the CUDA backend's bf16) and keeps
//!   every other buffer at full precision. Ops accept any mix of storage types and compute
//!   in at least fp32.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;

pub use crate::ops::adamw::AdamWConfig;
pub use crate::ops::asl::AslConfig;
pub use crate::ops::attention::AttnShape;
pub use crate::ops::augment::{AugmentShape, Crop, Layout as AugmentLayout};
pub use crate::ops::head::{
    AdapterParams, AdapterShape, BranchLogits, BranchParams, GateTables, HeadInputs, MoeSaved, MoeShape, VptHeadShape, VptParams,
};
pub use crate::ops::layernorm::{LayerNormShape, Norm, NormStats};
pub use crate::ops::linear::LinearShape;
pub use crate::ops::tokens::{PatchShape, Residual, TokenCopy, TokenRange, TokenShape};
pub use crate::ops::{Grad, Rows};
pub use cpu::CpuBackend;
#[cfg(feature = "cuda")]
pub use cuda::{CudaBackend, DevBuf};
pub use device::{select, select_on, select_with, Device, Precision, Selected};

/// What a buffer holds, so that a backend can choose its storage ([`Backend::alloc_as`]).
/// What stays at full precision follows PyTorch autocast: reductions, sums of many terms and
/// optimizer state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BufRole {
    /// Full precision always: trainable parameters, their gradients and AdamW moments,
    /// targets, logits and loss terms, LayerNorm statistics, attention log-sum-exps, the
    /// head's small internals and gradient sums, the frozen vectors kernels read in fp32
    /// (biases, norm weights, LayerScale, class token, position embeddings), and the residual
    /// stream and its gradient (sums of many terms).
    State,
    /// Frozen weight matrices (GEMM operands). They never change, so a reduced-precision copy
    /// is all the step reads; no full-precision master is kept.
    Frozen,
    /// The large per-token tensors that are GEMM, attention or GELU operands or results, and
    /// their gradients: normalised tokens, qkv, attention outputs, MLP hidden states,
    /// projection outputs, dqkv, dhidden, ...
    Activation,
}

/// The ops the training step needs. See the module docs for conventions.
pub trait Backend {
    /// A buffer of floats (the backend's precision).
    type Buf;
    /// A buffer of `u32` indices (gating tables).
    type Idx;

    /// A short name for logs ("cpu-f32", ...).
    fn name(&self) -> String;

    /// Reports the first failure of the ops since the last call, and waits for queued work
    /// (a device backend's ops run asynchronously and cannot return errors inline; the
    /// `Trainer` calls this after each phase of a step). The CPU backend never fails here.
    fn check(&mut self) -> anyhow::Result<()> {
        Ok(())
    }

    // ---- memory -------------------------------------------------------------------------
    /// A zero-filled buffer of `len` floats at full precision (a [`BufRole::State`] buffer).
    fn alloc(&mut self, len: usize) -> Self::Buf;
    /// A zero-filled buffer of `len` floats whose storage suits `role`; a backend with one
    /// precision ignores the role.
    fn alloc_as(&mut self, len: usize, role: BufRole) -> Self::Buf {
        let _ = role;
        self.alloc(len)
    }
    /// Length of a buffer in floats.
    fn buf_len(&self, buf: &Self::Buf) -> usize;
    /// Writes `src` into `dst[..src.len()]` (converted to the buffer's storage type).
    fn upload(&mut self, src: &[f32], dst: &mut Self::Buf);
    /// Like [`Backend::upload`] from f64 (gradient checks run the model in f64).
    fn upload_f64(&mut self, src: &[f64], dst: &mut Self::Buf);
    /// Reads `src[..dst.len()]` into `dst`.
    fn download(&self, src: &Self::Buf, dst: &mut [f32]);
    /// Reads `src[..dst.len()]` into `dst` as f64.
    fn download_f64(&self, src: &Self::Buf, dst: &mut [f64]);
    /// An index buffer holding `src`.
    fn upload_idx(&mut self, src: &[u32]) -> Self::Idx;
    /// `buf[..len] = value`.
    fn fill(&mut self, buf: &mut Self::Buf, len: usize, value: f64);
    /// `dst[..len] = src[..len]`.
    fn copy(&mut self, src: &Self::Buf, dst: &mut Self::Buf, len: usize);
    /// `y[..len] = a * y[..len] + b * x[..len]`.
    fn axpby(&mut self, a: f64, y: &mut Self::Buf, b: f64, x: &Self::Buf, len: usize);

    // ---- input staging and augmentation ----------------------------------------------------
    /// Where one batch of uint8 crops waits between the loader and [`Backend::augment`]: a host
    /// copy on the CPU; pinned host memory, device buffers and two events on a GPU.
    type Staging;
    /// An empty staging area; it grows to the largest batch staged into it.
    fn alloc_staging(&mut self) -> Self::Staging;
    /// Copies a batch of crops (`crops` locate each crop's bytes in `pixels`, see [`Crop`];
    /// the caller checked them with [`crate::ops::augment::check_crops`]) into `staging`. A
    /// device backend returns before the copy to the device is done: it runs on a second
    /// stream, overlapping whatever the first one is computing, after (on the device) the last
    /// [`Backend::augment`] that read `staging`; the host waits only until the pinned memory
    /// the copy comes from is free again.
    fn stage(&mut self, staging: &mut Self::Staging, pixels: &[u8], crops: &[Crop]);
    /// Resizes, flips and normalizes the crops staged in `staging` into `out` (see
    /// [`crate::ops::augment`]; `shape.batch` at most the crops staged). A device backend
    /// orders it after `stage`'s copy with an event, not by waiting on the host.
    fn augment(&mut self, staging: &Self::Staging, out: &mut Self::Buf, shape: &AugmentShape);

    // ---- tokens ---------------------------------------------------------------------------
    /// Flattens `p x p` patches of images `[B, C, H, W]` into `out [B, Np, C*p*p]` in the order
    /// of a conv weight `[D, C, p, p]` (c, ky, kx), patches row by row.
    fn patchify(&mut self, images: &Self::Buf, out: &mut Self::Buf, shape: &PatchShape);
    /// Writes `x [B, N, D]`: row 0 = `cls + pos[0]`, rows `1+i` = `patches[b, i] + pos[1+i]`
    /// (`patches [B, Np, D]`, `pos [1+Np, D]`). Prompt rows are left alone (see
    /// [`Backend::set_prompts`]).
    fn embed_tokens(&mut self, patches: &Self::Buf, cls: &Self::Buf, pos: &Self::Buf, x: &mut Self::Buf, shape: &TokenShape);
    /// `x[b, 1+Np+j] = prompts[layer, j]` for every image `b` and `j < P` (`prompts [L, P, D]`).
    fn set_prompts(&mut self, prompts: &Self::Buf, layer: usize, x: &mut Self::Buf, shape: &TokenShape);
    /// `dprompts[layer, j] = sum_b dx[b, 1+Np+j]` (images summed in order); then, if `zero_rows`,
    /// `dx[b, 1+Np+j] = 0` (the deep-prompt replacement cuts the gradient to the previous block).
    fn prompt_grad(&mut self, dx: &mut Self::Buf, dprompts: &mut Self::Buf, layer: usize, shape: &TokenShape, zero_rows: bool);
    /// `dst[b, dst.start + j] = src[b, src.start + j]` for `j < count` (see [`TokenCopy`]).
    fn copy_tokens(&mut self, src: &Self::Buf, dst: &mut Self::Buf, copy: &TokenCopy);
    /// Residual with optional LayerScale: `out = x + ls * f` over `[rows, dim]`.
    fn residual(&mut self, res: Residual<'_, Self::Buf>, out: &mut Self::Buf, shape: Rows);
    /// [`Backend::residual`] into `out`, then [`Backend::layernorm_forward`] of `out` into `y`
    /// (saving its statistics): a device backend does both in one pass over the rows.
    fn residual_layernorm_forward(
        &mut self,
        res: Residual<'_, Self::Buf>,
        out: &mut Self::Buf,
        norm: Norm<&Self::Buf>,
        y: &mut Self::Buf,
        stats: NormStats<&mut Self::Buf>,
        shape: &LayerNormShape,
    ) {
        self.residual(
            res,
            out,
            Rows {
                rows: shape.rows,
                dim: shape.dim,
            },
        );
        self.layernorm_forward(out, norm, y, stats, shape);
    }
    /// `out = src * v` with `v [dim]` broadcast over rows (LayerScale in the backward).
    fn mul_cols(&mut self, src: &Self::Buf, v: &Self::Buf, out: &mut Self::Buf, shape: Rows);

    // ---- dense ----------------------------------------------------------------------------
    /// `y [rows, out] = x [rows, in] W^T + b` with `W [out, in]`.
    fn linear_forward(&mut self, x: &Self::Buf, w: &Self::Buf, bias: Option<&Self::Buf>, y: &mut Self::Buf, shape: &LinearShape);
    /// `dx (+)= dy W` (input gradient only; the backbone is frozen).
    fn linear_backward_input(&mut self, dy: &Self::Buf, w: &Self::Buf, dx: Grad<&mut Self::Buf>, shape: &LinearShape);
    /// LayerNorm over `dim`, saving `mean, rstd [rows]`.
    fn layernorm_forward(
        &mut self,
        x: &Self::Buf,
        norm: Norm<&Self::Buf>,
        y: &mut Self::Buf,
        stats: NormStats<&mut Self::Buf>,
        shape: &LayerNormShape,
    );
    /// LayerNorm input gradient: `dx (+)= LN'(x)^T dy` (only `norm.gamma` is read).
    fn layernorm_backward(
        &mut self,
        dy: &Self::Buf,
        x: &Self::Buf,
        norm: Norm<&Self::Buf>,
        stats: NormStats<&Self::Buf>,
        dx: Grad<&mut Self::Buf>,
        shape: &LayerNormShape,
    );
    /// `y = gelu(x + b)` over `[rows, dim]` (exact erf GELU; `b [dim]` broadcast over the
    /// rows, or none): a linear layer's bias applied where its output is read, so the product
    /// writes its output without a bias pass before it.
    fn gelu_forward(&mut self, x: &Self::Buf, bias: Option<&Self::Buf>, y: &mut Self::Buf, shape: Rows);
    /// In place `d *= gelu'(x + b)` over `[rows, dim]` (`x`, `b` as in the forward).
    fn gelu_backward(&mut self, x: &Self::Buf, bias: Option<&Self::Buf>, d: &mut Self::Buf, shape: Rows);

    // ---- attention ------------------------------------------------------------------------
    /// Masked attention forward from `qkv [B, N, 3, h, dh]` into `out [B, Nq, D]` for the
    /// query range `shape.q_start .. + shape.q_len` (`Nq`; in the model, the rows a block's
    /// output is read at: docs/MODEL.md#token-layout), saving `lse [B, h, Nq]` (see
    /// `ops::attention`).
    fn attention_forward(&mut self, qkv: &Self::Buf, out: &mut Self::Buf, lse: &mut Self::Buf, shape: &AttnShape);
    /// Masked attention backward: writes `dqkv [B, N, 3D]` from `dout [B, Nq, D]` (Q rows
    /// outside the query range are written as zero).
    fn attention_backward(
        &mut self,
        qkv: &Self::Buf,
        out: &Self::Buf,
        lse: &Self::Buf,
        dout: &Self::Buf,
        dqkv: &mut Self::Buf,
        shape: &AttnShape,
    );
    /// [`attention_backward`](Backend::attention_backward) for a caller that reads `dqkv` only
    /// at the key rows `keys`, none of them a query (block 0 with deep prompts: the prompt
    /// rows; see `ops::attention::cpu::backward_keys`): those rows must come out as in the full
    /// backward (their Q columns zero), the others are unspecified. The default runs the full
    /// backward; the CPU backend computes dK and dV at `keys` alone.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward_keys(
        &mut self,
        qkv: &Self::Buf,
        out: &Self::Buf,
        lse: &Self::Buf,
        dout: &Self::Buf,
        dqkv: &mut Self::Buf,
        shape: &AttnShape,
        keys: std::ops::Range<usize>,
    ) {
        let _ = keys;
        self.attention_backward(qkv, out, lse, dout, dqkv, shape);
    }

    // ---- head -----------------------------------------------------------------------------
    /// Adapters on the group tokens `z [B, P, D]` into `out` (see `ops::head`); saves the
    /// pre-GELU `u [B, P, r]`.
    fn adapter_forward(
        &mut self,
        z: &Self::Buf,
        params: AdapterParams<&Self::Buf>,
        u: &mut Self::Buf,
        out: &mut Self::Buf,
        shape: &AdapterShape,
    );
    /// Adapter backward: accumulates `dz`, writes the four parameter gradients (only `w1` and
    /// `w2` of `params` are read).
    #[allow(clippy::too_many_arguments)]
    fn adapter_backward(
        &mut self,
        dout: &Self::Buf,
        z: &Self::Buf,
        u: &Self::Buf,
        params: AdapterParams<&Self::Buf>,
        dz: &mut Self::Buf,
        grads: AdapterParams<&mut Self::Buf>,
        shape: &AdapterShape,
    );
    /// One branch's gating, expert mixture and classifier: writes its logits, saves `q, r`.
    fn moe_forward(
        &mut self,
        inputs: HeadInputs<&Self::Buf>,
        params: BranchParams<&Self::Buf>,
        tables: &GateTables<Self::Idx>,
        logits: BranchLogits<&mut Self::Buf>,
        saved: MoeSaved<&mut Self::Buf>,
        shape: &MoeShape,
    );
    /// Backward of one branch from the gradients of its logits: accumulates the inputs'
    /// gradients (`dz`, `dadapted`), writes the parameter gradients.
    #[allow(clippy::too_many_arguments)]
    fn moe_backward(
        &mut self,
        dlogits: BranchLogits<&Self::Buf>,
        inputs: HeadInputs<&Self::Buf>,
        params: BranchParams<&Self::Buf>,
        tables: &GateTables<Self::Idx>,
        saved: MoeSaved<&Self::Buf>,
        dinputs: HeadInputs<&mut Self::Buf>,
        grads: BranchParams<&mut Self::Buf>,
        shape: &MoeShape,
    );
    /// Plain-VPT head: mean of the prompt outputs (saved in `zbar [B, D]`), then linear.
    fn vpt_head_forward(
        &mut self,
        z: &Self::Buf,
        params: VptParams<&Self::Buf>,
        zbar: &mut Self::Buf,
        y: &mut Self::Buf,
        shape: &VptHeadShape,
    );
    /// Plain-VPT head backward: writes `dz` and the parameter gradients (only `params.w` is read).
    fn vpt_head_backward(
        &mut self,
        dy: &Self::Buf,
        zbar: &Self::Buf,
        params: VptParams<&Self::Buf>,
        dz: &mut Self::Buf,
        grads: VptParams<&mut Self::Buf>,
        shape: &VptHeadShape,
    );

    // ---- loss and optimizer ---------------------------------------------------------------
    /// `scale * sum ASL(logits[..len], targets[..len])`, returned as f64; with `grad`, writes
    /// `scale * dASL/dlogit` there.
    fn asl(
        &mut self,
        logits: &Self::Buf,
        targets: &Self::Buf,
        len: usize,
        cfg: &AslConfig,
        scale: f64,
        grad: Option<&mut Self::Buf>,
    ) -> f64;
    /// The sum of [`Backend::asl`] over several logit buffers against the same targets (the
    /// training loss's terms), each term's gradient written where given. A device backend does
    /// it in one launch and one host read; the default calls `asl` per term, in order.
    #[allow(clippy::type_complexity)]
    fn asl_terms(
        &mut self,
        terms: &mut [(&Self::Buf, Option<&mut Self::Buf>)],
        targets: &Self::Buf,
        len: usize,
        cfg: &AslConfig,
        scale: f64,
    ) -> f64 {
        let mut total = 0.0;
        for (logits, grad) in terms.iter_mut() {
            total += self.asl(logits, targets, len, cfg, scale, grad.as_deref_mut());
        }
        total
    }
    /// [`Backend::asl_terms`] with the total written into `loss[0]` instead of returned: a
    /// device backend launches it and does not wait, so a training step reads its loss once,
    /// at its end. The default computes it now.
    #[allow(clippy::type_complexity)]
    fn asl_terms_into(
        &mut self,
        terms: &mut [(&Self::Buf, Option<&mut Self::Buf>)],
        targets: &Self::Buf,
        len: usize,
        cfg: &AslConfig,
        scale: f64,
        loss: &mut Self::Buf,
    ) {
        let total = self.asl_terms(terms, targets, len, cfg, scale);
        self.upload_f64(&[total], loss);
    }
    /// One AdamW update (step counts from 1) of every tensor `params[i]` with `grads[i]`. With
    /// `guard`, nothing changes unless `guard[0]` is finite (the step's loss: a non-finite one
    /// leaves weights and moments as they were, decided where the loss is, without a host read).
    #[allow(clippy::too_many_arguments)]
    fn adamw(
        &mut self,
        params: &mut [Self::Buf],
        grads: &[Self::Buf],
        m: &mut [Self::Buf],
        v: &mut [Self::Buf],
        step: u64,
        lr: f64,
        cfg: &AdamWConfig,
        guard: Option<&Self::Buf>,
    );
}
