//! CPU twins of the token ops (`kernels/tokens.cu`), generic over the float type: the reference
//! the GPU launchers of [`super::cuda`] are tested against, and what `CpuBackend` runs.
//! Shapes as `docs/MODEL.md#the-frozen-vit` and `#deep-visual-prompts` describe them.

use super::{PatchShape, TokenCopy, TokenRange, TokenShape};
use crate::ops::par::*;
use crate::ops::real::{simd, Real};
use crate::ops::Rows;

/// Images `[B, C, H, W]` into patch rows `out [B, Np, C*p*p]` (`Np = (H/p)(W/p)`, row-major
/// over the patch grid; each row channel-major, then `p x p` pixels), the layout the patch
/// embedding's GEMM takes.
pub fn patchify<T: Real>(images: &[T], out: &mut [T], sh: &PatchShape) {
    let &PatchShape {
        batch,
        channels,
        height,
        width,
        patch,
    } = sh;
    let (gh, gw) = (height / patch, width / patch);
    let np = gh * gw;
    let row = channels * patch * patch;
    let img = channels * height * width;
    assert!(images.len() >= batch * img && out.len() >= batch * np * row);
    out[..batch * np * row].par_chunks_mut(np * row).enumerate().for_each(|(b, ob)| {
        simd(
            #[inline(always)]
            || {
                let ib = &images[b * img..(b + 1) * img];
                for py in 0..gh {
                    for px in 0..gw {
                        let o = &mut ob[(py * gw + px) * row..(py * gw + px + 1) * row];
                        for c in 0..channels {
                            for ky in 0..patch {
                                let src = c * height * width + (py * patch + ky) * width + px * patch;
                                let dst = (c * patch + ky) * patch;
                                o[dst..dst + patch].copy_from_slice(&ib[src..src + patch]);
                            }
                        }
                    }
                }
            },
        );
    });
}

/// The token sequence `x [B, 1 + Np + P, D]`: `CLS + pos[0]`, then each patch embedding
/// `+ pos[1 + i]`; the prompt rows (the last P) are left as they are (`set_prompts` fills them).
pub fn embed_tokens<T: Real>(patches: &[T], cls: &[T], pos: &[T], x: &mut [T], sh: &TokenShape) {
    let &TokenShape {
        batch, num_patches, dim, ..
    } = sh;
    let n = sh.tokens();
    assert!(patches.len() >= batch * num_patches * dim && x.len() >= batch * n * dim);
    assert!(cls.len() >= dim && pos.len() >= (1 + num_patches) * dim);
    x[..batch * n * dim].par_chunks_mut(n * dim).enumerate().for_each(|(b, xb)| {
        simd(
            #[inline(always)]
            || {
                for j in 0..dim {
                    xb[j] = cls[j] + pos[j];
                }
                for i in 0..num_patches {
                    let dst = &mut xb[(1 + i) * dim..(2 + i) * dim];
                    let src = &patches[(b * num_patches + i) * dim..(b * num_patches + i + 1) * dim];
                    let pe = &pos[(1 + i) * dim..(2 + i) * dim];
                    for j in 0..dim {
                        dst[j] = src[j] + pe[j];
                    }
                }
            },
        );
    });
}

/// Writes block `layer`'s prompts (`prompts [L, P, D]`) into the prompt rows `N - P .. N` of
/// every image of `x [B, N, D]`.
pub fn set_prompts<T: Real>(prompts: &[T], layer: usize, x: &mut [T], sh: &TokenShape) {
    let (batch, tokens, count, dim) = (sh.batch, sh.tokens(), sh.prompts, sh.dim);
    let src = &prompts[layer * count * dim..(layer + 1) * count * dim];
    assert!(x.len() >= batch * tokens * dim && count < tokens);
    for b in 0..batch {
        let o = (b * tokens + sh.prompt_start()) * dim;
        x[o..o + count * dim].copy_from_slice(src);
    }
}

/// Gradient of [`set_prompts`]: `dprompts[layer] = sum_b dx[b, N - P .. N]` (images summed in
/// order: deterministic); with `zero_rows`, those rows of `dx` are zeroed afterwards (the prompts
/// replace the previous block's outputs there, which get no gradient).
pub fn prompt_grad<T: Real>(dx: &mut [T], dprompts: &mut [T], layer: usize, sh: &TokenShape, zero_rows: bool) {
    let (batch, tokens, count, dim) = (sh.batch, sh.tokens(), sh.prompts, sh.dim);
    assert!(dx.len() >= batch * tokens * dim && count < tokens);
    let dst = &mut dprompts[layer * count * dim..(layer + 1) * count * dim];
    // Parallel over prompt elements, images summed in order inside (deterministic).
    let dx_ro: &[T] = dx;
    dst.par_chunks_mut(dim).enumerate().for_each(|(j, row)| {
        simd(
            #[inline(always)]
            || {
                row.fill(T::zero());
                for b in 0..batch {
                    let o = (b * tokens + sh.prompt_start() + j) * dim;
                    for (r, &g) in row.iter_mut().zip(&dx_ro[o..o + dim]) {
                        *r = *r + g;
                    }
                }
            },
        );
    });
    if zero_rows {
        for b in 0..batch {
            let o = (b * tokens + sh.prompt_start()) * dim;
            dx[o..o + count * dim].fill(T::zero());
        }
    }
}

/// `dst[b, dst.start + j] = src[b, src.start + j]` for `j < count` token rows of `dim` (see
/// [`TokenCopy`]).
pub fn copy_tokens<T: Real>(src: &[T], dst: &mut [T], c: &TokenCopy) {
    let &TokenCopy {
        batch,
        dim,
        count,
        src: TokenRange {
            tokens: src_tokens,
            start: src_start,
        },
        dst: TokenRange {
            tokens: dst_tokens,
            start: dst_start,
        },
    } = c;
    assert!(src_start + count <= src_tokens && dst_start + count <= dst_tokens);
    for b in 0..batch {
        let s = (b * src_tokens + src_start) * dim;
        let d = (b * dst_tokens + dst_start) * dim;
        dst[d..d + count * dim].copy_from_slice(&src[s..s + count * dim]);
    }
}

/// The residual add: `out = x + ls * f` over `[rows, dim]` (`ls [dim]`, LayerScale), or
/// `out = x + f` without it.
pub fn residual<T: Real>(x: &[T], f: &[T], ls: Option<&[T]>, out: &mut [T], sh: Rows) {
    let (len, dim) = (sh.len(), sh.dim);
    out[..len]
        .par_chunks_mut(dim)
        .zip(x[..len].par_chunks(dim))
        .zip(f[..len].par_chunks(dim))
        .with_min_len(16)
        .for_each(|((o, xr), fr)| {
            simd(
                #[inline(always)]
                || match ls {
                    Some(l) => {
                        for j in 0..dim {
                            o[j] = xr[j] + l[j] * fr[j];
                        }
                    }
                    None => {
                        for j in 0..dim {
                            o[j] = xr[j] + fr[j];
                        }
                    }
                },
            )
        });
}

/// `out = src * v` over `[rows, dim]`, `v [dim]` per row (LayerScale's input gradient).
pub fn mul_cols<T: Real>(src: &[T], v: &[T], out: &mut [T], sh: Rows) {
    let (rows, dim) = (sh.rows, sh.dim);
    out[..rows * dim]
        .par_chunks_mut(dim)
        .zip(src[..rows * dim].par_chunks(dim))
        .with_min_len(16)
        .for_each(|(o, s)| {
            simd(
                #[inline(always)]
                || {
                    for j in 0..dim {
                        o[j] = s[j] * v[j];
                    }
                },
            );
        });
}
