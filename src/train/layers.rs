//! The model's layers over [`Backend`] ops: one transformer block forward and backward, and the
//! head forward and backward (docs/MODEL.md). A private module of `train`: `pub` here means
//! the step.

use super::tensors::{BlockWeights, Dims, Head, HeadActs, LayerActs, Work};
use crate::backend::{
    AttnShape, Backend, GateTables, Grad, HeadInputs, LayerNormShape, LinearShape, Norm, NormStats, Residual, Rows, TokenCopy, TokenRange,
};
use crate::ops::layernorm::VIT_EPS;

/// The sizes a block runs at, for a batch of `batch` images. Rows are stored `[CLS, patches,
/// prompts]` ([`crate::ops::tokens::TokenShape`]).
#[derive(Clone, Copy, Debug)]
pub struct BlockShape {
    pub batch: usize,
    pub tokens: usize,
    pub prompts: usize,
    pub dim: usize,
    pub mlp: usize,
    pub heads: usize,
}

/// Which rows of a block go past its attention (keys and values always cover all N tokens).
/// Rows past attention are compacted to `[B, Nq, D]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Queries {
    /// Every token: VPT-shallow's blocks (their prompt outputs flow on) and the inspection
    /// forward, which shows the prompt outputs.
    All,
    /// CLS and the patches, rows `[0, 1+Np)`: deep prompts' blocks but the last, whose prompt
    /// outputs the next block's prompts replace (SPEC §2), so nothing reads them.
    Image,
    /// The P prompt rows: the last block, whose other outputs nothing reads (the head sees the
    /// group tokens only).
    Prompts,
}

impl BlockShape {
    /// The query rows of each image: first row and count.
    fn query_range(&self, q: Queries) -> (usize, usize) {
        let image = self.tokens - self.prompts;
        match q {
            Queries::All => (0, self.tokens),
            Queries::Image => (0, image),
            Queries::Prompts => (image, self.prompts),
        }
    }
    /// Rows past attention, over the batch.
    pub fn rows(&self, q: Queries) -> usize {
        self.batch * self.query_range(q).1
    }
    pub fn attention(&self, q: Queries) -> AttnShape {
        let (q_start, q_len) = self.query_range(q);
        AttnShape {
            q_start,
            q_len,
            ..AttnShape::full(
                self.batch,
                self.tokens,
                self.heads,
                self.dim / self.heads,
                self.tokens - self.prompts,
                self.tokens,
            )
        }
    }
    pub fn norm(&self, rows: usize) -> LayerNormShape {
        LayerNormShape {
            rows,
            dim: self.dim,
            eps: VIT_EPS,
        }
    }
    pub fn width(&self, rows: usize) -> Rows {
        Rows { rows, dim: self.dim }
    }
    /// The MLP's hidden rows.
    pub fn hidden(&self, rows: usize) -> Rows {
        Rows { rows, dim: self.mlp }
    }
    /// The query rows of `[B, N, D]` to `[B, Nq, D]` (`to_compact`) or back.
    pub fn query_rows(&self, q: Queries, to_compact: bool) -> TokenCopy {
        self.rows_of_width(q, to_compact, self.dim)
    }
    /// [`Self::query_rows`] for rows of `dim` elements (the qkv rows: `3D`).
    pub fn rows_of_width(&self, q: Queries, to_compact: bool, dim: usize) -> TokenCopy {
        let (start, count) = self.query_range(q);
        let (full, compact) = (
            TokenRange {
                tokens: self.tokens,
                start,
            },
            TokenRange { tokens: count, start: 0 },
        );
        let (src, dst) = if to_compact { (full, compact) } else { (compact, full) };
        TokenCopy {
            batch: self.batch,
            dim,
            count,
            src,
            dst,
        }
    }
}

pub fn linear(rows: usize, d_in: usize, d_out: usize) -> LinearShape {
    LinearShape { rows, d_in, d_out }
}

/// The final LayerNorm fused into the last block's output: `z = LN(zin)`.
pub struct FinalNorm<'a, T> {
    pub norm: Norm<&'a T>,
    pub z: &'a mut T,
    pub stats: NormStats<&'a mut T>,
}

/// Where a block's output goes.
pub enum BlockOut<'a, T> {
    /// The next block's input `[B, N, D]`, at the rows `q` names (`All` or `Image`; with
    /// `Image` the prompt rows are left for the next block's prompts).
    Tokens { next: &'a mut T, q: Queries },
    /// The last block's prompt rows `zin [B, P, D]`, and their final norm if the model has one.
    Prompts { zin: &'a mut T, norm: Option<FinalNorm<'a, T>> },
}

/// One pre-norm transformer block (timm's `Block`, docs/MODEL.md#blocks):
/// `x_mid = x + ls1 * proj(attn(qkv(LN1(x))))`, `out = x_mid + ls2 * fc2(gelu(fc1(LN2(x_mid))))`,
/// with `x_mid` and `out` computed at the query rows only.
pub fn block_forward<B: Backend>(
    be: &mut B,
    w: &BlockWeights<B::Buf>,
    s: &mut LayerActs<B::Buf>,
    work: &mut Work<B::Buf>,
    x: &B::Buf,
    out: BlockOut<'_, B::Buf>,
    sh: &BlockShape,
) {
    let q = match out {
        BlockOut::Tokens { q, .. } => q,
        BlockOut::Prompts { .. } => Queries::Prompts,
    };
    let (all, r, d) = (sh.rows(Queries::All), sh.rows(q), sh.dim);
    be.layernorm_forward(x, w.norm1.as_ref(), &mut work.normed, s.ln1.as_mut(), &sh.norm(all));
    be.linear_forward(&work.normed, &w.qkv.w, Some(&w.qkv.b), &mut s.qkv, &linear(all, d, 3 * d));
    be.attention_forward(&s.qkv, &mut s.att, &mut s.lse, &sh.attention(q));
    // The residual stream at the query rows.
    if q != Queries::All {
        be.copy_tokens(x, &mut work.xq, &sh.query_rows(q, true));
    }
    be.linear_forward(&s.att, &w.proj.w, Some(&w.proj.b), &mut work.branch_out, &linear(r, d, d));
    let res = Residual {
        x: if q == Queries::All { x } else { &work.xq },
        f: &work.branch_out,
        ls: w.ls1.as_ref(),
    };
    be.residual_layernorm_forward(res, &mut s.xmid, w.norm2.as_ref(), &mut work.normed, s.ln2.as_mut(), &sh.norm(r));
    // fc1's bias is added inside GELU (forward and backward): `pre_gelu` holds the product
    // alone, and no pass writes the bias into it first.
    be.linear_forward(&work.normed, &w.fc1.w, None, &mut s.pre_gelu, &linear(r, d, sh.mlp));
    be.gelu_forward(&s.pre_gelu, Some(&w.fc1.b), &mut work.hidden, sh.hidden(r));
    be.linear_forward(&work.hidden, &w.fc2.w, Some(&w.fc2.b), &mut work.branch_out, &linear(r, sh.mlp, d));
    let res = Residual {
        x: &s.xmid,
        f: &work.branch_out,
        ls: w.ls2.as_ref(),
    };
    match out {
        BlockOut::Tokens { next, q: Queries::All } => be.residual(res, next, sh.width(r)),
        BlockOut::Tokens { next, q } => {
            be.residual(res, &mut work.xq, sh.width(r));
            be.copy_tokens(&work.xq, next, &sh.query_rows(q, false));
        }
        BlockOut::Prompts { zin, norm: None } => be.residual(res, zin, sh.width(r)),
        BlockOut::Prompts { zin, norm: Some(f) } => be.residual_layernorm_forward(res, zin, f.norm, f.z, f.stats, &sh.norm(r)),
    }
}

/// Where the gradient of a block's output is, and where its input's goes.
pub enum BlockGrad<'a, T> {
    /// `dx [B, N, D]` holds dL/d(out) at the rows `q` names (`All` or `Image`, the block's
    /// forward) and receives dL/d(x) in place (the residual path).
    Tokens { dx: &'a mut T, q: Queries },
    /// The last block: dL/d(out) at the prompt rows `dzin [B, P, D]`; writes `dx [B, N, D]`.
    Prompts { dzin: &'a mut T, dx: &'a mut T },
}

/// Which rows of a block's input gradient the caller reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputGrad {
    /// Every row (the previous block's output).
    All,
    /// The prompt rows only: block 0, whose other rows are the frozen patch and class
    /// embeddings. Its qkv input product then runs on the `B x P` prompt rows alone, and where
    /// the prompts are not queries (deep prompts) its attention backward computes their dK and
    /// dV alone; the other rows of `dx` are left as if no gradient flowed through the block's
    /// attention branch.
    Prompts,
}

/// The input gradient of [`block_forward`] (the backbone is frozen: no weight gradients), at
/// the rows `need` names.
#[allow(clippy::too_many_arguments)]
pub fn block_backward<B: Backend>(
    be: &mut B,
    w: &BlockWeights<B::Buf>,
    s: &LayerActs<B::Buf>,
    work: &mut Work<B::Buf>,
    x: &B::Buf,
    grad: BlockGrad<'_, B::Buf>,
    need: InputGrad,
    sh: &BlockShape,
) {
    let Work {
        xq,
        dtmp,
        dtmp2,
        dhidden,
        dqkv,
        ..
    } = work;
    // dres: dL/d(out) at the query rows, compacted; it takes the residual path's gradient.
    let (q, dres, dx_full) = match grad {
        BlockGrad::Tokens { dx, q: Queries::All } => (Queries::All, dx, None),
        BlockGrad::Tokens { dx, q } => {
            be.copy_tokens(dx, xq, &sh.query_rows(q, true));
            (q, xq, Some(dx))
        }
        BlockGrad::Prompts { dzin, dx } => (Queries::Prompts, dzin, Some(dx)),
    };
    let (all, r, d) = (sh.rows(Queries::All), sh.rows(q), sh.dim);
    // out = x_mid + ls2 * fc2(gelu(fc1(LN2(x_mid))))
    let src = match &w.ls2 {
        Some(ls) => {
            be.mul_cols(dres, ls, dtmp, sh.width(r));
            &*dtmp
        }
        None => &*dres,
    };
    be.linear_backward_input(src, &w.fc2.w, Grad::Write(dhidden), &linear(r, sh.mlp, d));
    be.gelu_backward(&s.pre_gelu, Some(&w.fc1.b), dhidden, sh.hidden(r));
    be.linear_backward_input(dhidden, &w.fc1.w, Grad::Write(dtmp2), &linear(r, d, sh.mlp));
    be.layernorm_backward(dtmp2, &s.xmid, w.norm2.as_ref(), s.ln2.as_ref(), Grad::Add(&mut *dres), &sh.norm(r));
    // x_mid = x + ls1 * proj(attn(qkv(LN1(x))))
    let src = match &w.ls1 {
        Some(ls) => {
            be.mul_cols(dres, ls, dtmp, sh.width(r));
            &*dtmp
        }
        None => &*dres,
    };
    be.linear_backward_input(src, &w.proj.w, Grad::Write(dtmp2), &linear(r, d, d));
    let ash = sh.attention(q);
    let prompts = ash.prompt_start..ash.prompt_end;
    let prompts_query = ash.q_start < prompts.end && prompts.start < ash.q_start + ash.q_len;
    if need == InputGrad::Prompts && !prompts_query {
        // Only the prompt rows' dK and dV reach the caller, and the prompts are not queries
        // (deep prompts): the rest of the attention backward is work nothing reads.
        be.attention_backward_keys(&s.qkv, &s.att, &s.lse, dtmp2, dqkv, &ash, prompts);
    } else {
        be.attention_backward(&s.qkv, &s.att, &s.lse, dtmp2, dqkv, &ash);
    }
    match need {
        InputGrad::All => be.linear_backward_input(dqkv, &w.qkv.w, Grad::Write(dtmp2), &linear(all, d, 3 * d)),
        InputGrad::Prompts => {
            // The qkv product at the prompt rows (P of N per image), compacted and back; the
            // other rows of LN1's input gradient are zero.
            let pr = sh.rows(Queries::Prompts);
            be.copy_tokens(dqkv, dhidden, &sh.rows_of_width(Queries::Prompts, true, 3 * d));
            be.linear_backward_input(dhidden, &w.qkv.w, Grad::Write(dtmp), &linear(pr, d, 3 * d));
            be.fill(dtmp2, all * d, 0.0);
            be.copy_tokens(dtmp, dtmp2, &sh.query_rows(Queries::Prompts, false));
        }
    }
    let dx = match dx_full {
        None => dres,
        Some(dx) => {
            // The query rows' residual path into the full layout; the other rows' outputs
            // were not computed, so nothing flows back through them.
            be.fill(dx, all * d, 0.0);
            be.copy_tokens(dres, dx, &sh.query_rows(q, false));
            dx
        }
    };
    be.layernorm_backward(dtmp2, x, w.norm1.as_ref(), s.ln1.as_ref(), Grad::Add(dx), &sh.norm(all));
}

/// The head on the group tokens `z` (docs/MODEL.md#the-label-aware-mixture-of-experts-head):
/// writes the model's logits (the mean over branches).
pub fn head_forward<B: Backend>(
    be: &mut B,
    params: &Head<&B::Buf>,
    tables: &[GateTables<B::Idx>],
    h: &mut HeadActs<B::Buf>,
    logits: &mut B::Buf,
    d: &Dims,
    b: usize,
) {
    let k = d.labels;
    match params {
        Head::MlVpt { adapter, branches } => {
            be.adapter_forward(&h.z, *adapter, &mut h.adapter_u, &mut h.adapted, &d.adapter_shape(b));
            be.fill(logits, b * k, 0.0);
            for (s, (branch, table)) in branches.iter().zip(tables).enumerate() {
                let inputs = HeadInputs {
                    z: &h.z,
                    adapted: &h.adapted,
                };
                be.moe_forward(inputs, *branch, table, h.logits[s].as_mut(), h.saved[s].as_mut(), &d.moe_shape(b));
                be.axpby(1.0, logits, 1.0 / d.branches as f64, &h.logits[s].y, b * k);
            }
        }
        Head::Vpt(vpt) => {
            be.vpt_head_forward(&h.z, *vpt, &mut h.zbar, &mut h.logits[0].y, &d.vpt_shape(b));
            be.copy(&h.logits[0].y, logits, b * k);
        }
    }
}

/// The backward of [`head_forward`] from `h.dlogits`: parameter gradients into `grads`,
/// dL/dz into `h.dz`.
pub fn head_backward<B: Backend>(
    be: &mut B,
    params: &Head<&B::Buf>,
    grads: Head<&mut B::Buf>,
    tables: &[GateTables<B::Idx>],
    h: &mut HeadActs<B::Buf>,
    d: &Dims,
    b: usize,
) {
    let pd = b * d.prompts * d.dim;
    match (params, grads) {
        (
            Head::MlVpt { adapter, branches },
            Head::MlVpt {
                adapter: dadapter,
                branches: dbranches,
            },
        ) => {
            be.fill(&mut h.dz, pd, 0.0);
            be.fill(&mut h.dadapted, pd, 0.0);
            for (s, ((branch, dbranch), table)) in branches.iter().zip(dbranches).zip(tables).enumerate() {
                let inputs = HeadInputs {
                    z: &h.z,
                    adapted: &h.adapted,
                };
                let dinputs = HeadInputs {
                    z: &mut h.dz,
                    adapted: &mut h.dadapted,
                };
                be.moe_backward(
                    h.dlogits[s].as_ref(),
                    inputs,
                    *branch,
                    table,
                    h.saved[s].as_ref(),
                    dinputs,
                    dbranch,
                    &d.moe_shape(b),
                );
            }
            be.adapter_backward(&h.dadapted, &h.z, &h.adapter_u, *adapter, &mut h.dz, dadapter, &d.adapter_shape(b));
        }
        (Head::Vpt(vpt), Head::Vpt(dvpt)) => be.vpt_head_backward(&h.dlogits[0].y, &h.zbar, *vpt, &mut h.dz, dvpt, &d.vpt_shape(b)),
        _ => unreachable!("parameters and gradients name the same head"),
    }
}
