//! Launchers of `kernels/tokens.cu`: the token-assembly ops of the CUDA backend, and a plain
//! fp32 attention for head dims the fused kernels do not cover. Each checks buffer lengths
//! against its shape and returns a [`GpuError`] instead of launching out of bounds.
//!
//! The activation operands of most kernels may be stored in fp32 or bf16 ([`Storage`]; the
//! math is fp32 either way): a launcher generic over `T: Storage` picks the kernel's `_f32` or
//! `_bf16` instantiation. Parameters, the residual stream and its gradient are fp32.

use crate::contract::tokens::{CopyTokensParams, PlainAttnParams};
use crate::gpu::kernels::tokens;
use crate::gpu::launch::{check_len, grid_stride_blocks, BLOCK};
use crate::gpu::{CudaStream, DevicePtr, DevicePtrMut, GpuContext, GpuError};
use crate::ops::attention::AttnShape;
use cudarc::driver::{LaunchConfig, PushKernelArg};

pub use crate::gpu::launch::Storage;

fn u32_of(op: &'static str, what: &str, v: usize) -> Result<u32, GpuError> {
    u32::try_from(v).map_err(|_| GpuError::invalid(op, format!("{what} = {v} exceeds 32 bits")))
}

fn grid(gpu: &GpuContext, n: u64) -> LaunchConfig {
    LaunchConfig { grid_dim: (grid_stride_blocks(gpu, n, BLOCK as u64), 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// Launches kernel `$name` of `kernels/tokens.cu` over `$n` elements with the given arguments
/// (a macro because cudarc's argument list borrows every argument for the launch).
macro_rules! launch {
    ($gpu:expr, $stream:expr, $name:expr, $n:expr, $($arg:expr),*) => {{
        if $n == 0 {
            Ok(())
        } else {
            let f = $gpu.kernel($name)?;
            let mut l = $stream.launch_builder(&f);
            $(l.arg($arg);)*
            // SAFETY: every caller checked the buffers against the shape before launching.
            unsafe { l.launch(grid($gpu, $n)) }.map(|_| ()).map_err(GpuError::driver(format!("launching {}", $name)))
        }
    }};
}

/// Twin of `CpuBackend::patchify`: images `[B, C, H, W]` into `out [B, Np, C*p*p]` (both `T`).
#[allow(clippy::too_many_arguments)]
pub fn patchify<T: Storage>(gpu: &GpuContext, stream: &CudaStream, images: &impl DevicePtr<T>, out: &mut impl DevicePtrMut<T>, batch: usize, channels: usize, height: usize, width: usize, patch: usize) -> Result<(), GpuError> {
    const OP: &str = "patchify";
    if patch == 0 || !height.is_multiple_of(patch) || !width.is_multiple_of(patch) {
        return Err(GpuError::invalid(OP, format!("image {height}x{width} is not a multiple of patch {patch}")));
    }
    let n = batch * channels * height * width;
    check_len(OP, "images", images, n)?;
    check_len(OP, "out", out, n)?;
    let (c, h, w, p) = (u32_of(OP, "channels", channels)?, u32_of(OP, "height", height)?, u32_of(OP, "width", width)?, u32_of(OP, "patch", patch)?);
    let (ip, _g1) = images.device_ptr(stream);
    let (op, _g2) = out.device_ptr_mut(stream);
    let n = n as u64;
    launch!(gpu, stream, T::pick([tokens::TOK_PATCHIFY_F32, tokens::TOK_PATCHIFY_BF16]), n, &ip, &op, &n, &c, &h, &w, &p)
}

/// Twin of `CpuBackend::embed_tokens` (`patches` stored as `T`, the rest fp32).
#[allow(clippy::too_many_arguments)]
pub fn embed_tokens<T: Storage>(gpu: &GpuContext, stream: &CudaStream, patches: &impl DevicePtr<T>, cls: &impl DevicePtr<f32>, pos: &impl DevicePtr<f32>, x: &mut impl DevicePtrMut<f32>, batch: usize, num_patches: usize, prompts: usize, dim: usize) -> Result<(), GpuError> {
    const OP: &str = "embed_tokens";
    check_len(OP, "patches", patches, batch * num_patches * dim)?;
    check_len(OP, "cls", cls, dim)?;
    check_len(OP, "pos", pos, (1 + num_patches) * dim)?;
    check_len(OP, "x", x, batch * (1 + prompts + num_patches) * dim)?;
    let (np, pr, d) = (u32_of(OP, "patches", num_patches)?, u32_of(OP, "prompts", prompts)?, u32_of(OP, "dim", dim)?);
    let (pp, _g1) = patches.device_ptr(stream);
    let (cp, _g2) = cls.device_ptr(stream);
    let (qp, _g3) = pos.device_ptr(stream);
    let (xp, _g4) = x.device_ptr_mut(stream);
    let n = (batch * (1 + num_patches) * dim) as u64;
    launch!(gpu, stream, T::pick([tokens::TOK_EMBED_F32, tokens::TOK_EMBED_BF16]), n, &pp, &cp, &qp, &xp, &n, &np, &pr, &d)
}

/// Twin of `CpuBackend::set_prompts` (`prompts [L, P, D]`, row block `layer`).
#[allow(clippy::too_many_arguments)]
pub fn set_prompts(gpu: &GpuContext, stream: &CudaStream, prompts: &impl DevicePtr<f32>, layer: usize, x: &mut impl DevicePtrMut<f32>, batch: usize, tokens: usize, count: usize, dim: usize) -> Result<(), GpuError> {
    const OP: &str = "set_prompts";
    if count >= tokens {
        return Err(GpuError::invalid(OP, format!("{count} prompts do not fit {tokens} tokens")));
    }
    check_len(OP, "prompts", prompts, (layer + 1) * count * dim)?;
    check_len(OP, "x", x, batch * tokens * dim)?;
    let (t, c, d) = (u32_of(OP, "tokens", tokens)?, u32_of(OP, "count", count)?, u32_of(OP, "dim", dim)?);
    let (pp, _g1) = prompts.device_ptr(stream);
    let pp = pp + (layer * count * dim * 4) as u64;
    let (xp, _g2) = x.device_ptr_mut(stream);
    let n = (batch * count * dim) as u64;
    launch!(gpu, stream, tokens::TOK_SET_PROMPTS, n, &pp, &xp, &n, &t, &c, &d)
}

/// Twin of `CpuBackend::prompt_grad`: `dprompts[layer] = sum_b dx[b, 1..1+P]` (image order),
/// then with `zero_rows` those rows of `dx` are zeroed.
#[allow(clippy::too_many_arguments)]
pub fn prompt_grad(gpu: &GpuContext, stream: &CudaStream, dx: &mut impl DevicePtrMut<f32>, dprompts: &mut impl DevicePtrMut<f32>, layer: usize, batch: usize, tokens: usize, count: usize, dim: usize, zero_rows: bool) -> Result<(), GpuError> {
    const OP: &str = "prompt_grad";
    if count >= tokens {
        return Err(GpuError::invalid(OP, format!("{count} prompts do not fit {tokens} tokens")));
    }
    check_len(OP, "dx", dx, batch * tokens * dim)?;
    check_len(OP, "dprompts", dprompts, (layer + 1) * count * dim)?;
    let (bt, t, c, d) = (u32_of(OP, "batch", batch)?, u32_of(OP, "tokens", tokens)?, u32_of(OP, "count", count)?, u32_of(OP, "dim", dim)?);
    let (xp, _g1) = dx.device_ptr_mut(stream);
    let (pp, _g2) = dprompts.device_ptr_mut(stream);
    let pp = pp + (layer * count * dim * 4) as u64;
    let n = (count * dim) as u64;
    launch!(gpu, stream, tokens::TOK_PROMPT_GRAD, n, &xp, &pp, &n, &bt, &t, &d)?;
    if zero_rows {
        let n = (batch * count * dim) as u64;
        launch!(gpu, stream, tokens::TOK_ZERO_PROMPTS, n, &xp, &n, &t, &c, &d)?;
    }
    Ok(())
}

/// Twin of `CpuBackend::copy_tokens` (`src` and `dst` both `T`).
#[allow(clippy::too_many_arguments)]
pub fn copy_tokens<T: Storage>(gpu: &GpuContext, stream: &CudaStream, src: &impl DevicePtr<T>, src_tokens: usize, src_start: usize, dst: &mut impl DevicePtrMut<T>, dst_tokens: usize, dst_start: usize, count: usize, batch: usize, dim: usize) -> Result<(), GpuError> {
    const OP: &str = "copy_tokens";
    if src_start + count > src_tokens || dst_start + count > dst_tokens {
        return Err(GpuError::invalid(OP, format!("rows {src_start}+{count} of {src_tokens} into {dst_start}+{count} of {dst_tokens}")));
    }
    check_len(OP, "src", src, batch * src_tokens * dim)?;
    check_len(OP, "dst", dst, batch * dst_tokens * dim)?;
    u32_of(OP, "rows", batch * src_tokens.max(dst_tokens))?;
    let [src_tokens, src_start, dst_tokens, dst_start, count, d] = [src_tokens, src_start, dst_tokens, dst_start, count, dim].map(|v| v as u32);
    let (sp, _g1) = src.device_ptr(stream);
    let (dp, _g2) = dst.device_ptr_mut(stream);
    let n = batch as u64 * count as u64 * d as u64;
    let p = CopyTokensParams { src: sp, dst: dp, n, src_tokens, src_start, dst_tokens, dst_start, count, d };
    launch!(gpu, stream, T::pick([tokens::TOK_COPY_TOKENS_F32, tokens::TOK_COPY_TOKENS_BF16]), n, &p)
}

/// Twin of `CpuBackend::residual`: `out = x + ls * f` over `[rows, dim]` (`f` stored as `T`;
/// `x`, `out` and `ls` fp32).
#[allow(clippy::too_many_arguments)]
pub fn residual<T: Storage>(gpu: &GpuContext, stream: &CudaStream, x: &impl DevicePtr<f32>, f: &impl DevicePtr<T>, ls: Option<&dyn DevicePtr<f32>>, out: &mut impl DevicePtrMut<f32>, rows: usize, dim: usize) -> Result<(), GpuError> {
    const OP: &str = "residual";
    let n = rows * dim;
    check_len(OP, "x", x, n)?;
    check_len(OP, "f", f, n)?;
    check_len(OP, "out", out, n)?;
    if let Some(l) = ls {
        check_len(OP, "ls", l, dim)?;
    }
    let d = u32_of(OP, "dim", dim)?;
    let (xp, _g1) = x.device_ptr(stream);
    let (fp, _g2) = f.device_ptr(stream);
    let lsg = ls.map(|l| l.device_ptr(stream));
    let lp: u64 = lsg.as_ref().map_or(0, |g| g.0);
    let (op, _g4) = out.device_ptr_mut(stream);
    let n = n as u64;
    launch!(gpu, stream, T::pick([tokens::TOK_RESIDUAL_F32, tokens::TOK_RESIDUAL_BF16]), n, &xp, &fp, &lp, &op, &n, &d)
}

/// Twin of `CpuBackend::mul_cols`: `out = src * v` (`v [dim]` per row; `out` stored as `T`,
/// `src` and `v` fp32).
pub fn mul_cols<T: Storage>(gpu: &GpuContext, stream: &CudaStream, src: &impl DevicePtr<f32>, v: &impl DevicePtr<f32>, out: &mut impl DevicePtrMut<T>, rows: usize, dim: usize) -> Result<(), GpuError> {
    const OP: &str = "mul_cols";
    let n = rows * dim;
    check_len(OP, "src", src, n)?;
    check_len(OP, "v", v, dim)?;
    check_len(OP, "out", out, n)?;
    let d = u32_of(OP, "dim", dim)?;
    let (sp, _g1) = src.device_ptr(stream);
    let (vp, _g2) = v.device_ptr(stream);
    let (op, _g3) = out.device_ptr_mut(stream);
    let n = n as u64;
    launch!(gpu, stream, T::pick([tokens::TOK_MUL_COLS_F32, tokens::TOK_MUL_COLS_BF16]), n, &sp, &vp, &op, &n, &d)
}

/// Twin of `CpuBackend::axpby`: `y = a y + b x` over `len`, in fp32 whatever `y` (`Y`) and
/// `x` (`X`) store.
pub fn axpby<Y: Storage, X: Storage>(gpu: &GpuContext, stream: &CudaStream, a: f32, y: &mut impl DevicePtrMut<Y>, b: f32, x: &impl DevicePtr<X>, len: usize) -> Result<(), GpuError> {
    check_len("axpby", "y", y, len)?;
    check_len("axpby", "x", x, len)?;
    let (yp, _g1) = y.device_ptr_mut(stream);
    let (xp, _g2) = x.device_ptr(stream);
    let n = len as u64;
    const NAMES: [[crate::gpu::Kernel; 2]; 2] = [[tokens::TOK_AXPBY_F32_F32, tokens::TOK_AXPBY_F32_BF16], [tokens::TOK_AXPBY_BF16_F32, tokens::TOK_AXPBY_BF16_BF16]];
    launch!(gpu, stream, NAMES[Y::INDEX][X::INDEX], n, &a, &yp, &b, &xp, &n)
}

/// Twin of `CpuBackend::fill`: `y[..len] = value` (rounded to `T`).
pub fn fill<T: Storage>(gpu: &GpuContext, stream: &CudaStream, y: &mut impl DevicePtrMut<T>, len: usize, value: f32) -> Result<(), GpuError> {
    check_len("fill", "y", y, len)?;
    let (yp, _g1) = y.device_ptr_mut(stream);
    let n = len as u64;
    launch!(gpu, stream, T::pick([tokens::TOK_FILL_F32, tokens::TOK_FILL_BF16]), n, &yp, &value, &n)
}

fn attn_dims(op: &'static str, sh: &AttnShape) -> Result<PlainAttnParams, GpuError> {
    if sh.q_start + sh.q_len > sh.tokens || sh.prompt_start > sh.prompt_end || sh.prompt_end > sh.tokens {
        return Err(GpuError::invalid(op, format!("{sh:?} is not a valid attention shape")));
    }
    if sh.batch * sh.heads > 65_535 || sh.q_len > i32::MAX as usize || sh.tokens * 3 * sh.dim() > i32::MAX as usize {
        return Err(GpuError::invalid(op, format!("{sh:?} exceeds the plain kernels' grid")));
    }
    let [n, h, dh, ps, pe, q0, nq] = [sh.tokens, sh.heads, sh.head_dim, sh.prompt_start, sh.prompt_end, sh.q_start, sh.q_len].map(|v| v as i32);
    Ok(PlainAttnParams { n, h, dh, ps, pe, q0, nq, scale: 1.0 / (sh.head_dim as f32).sqrt(), ..PlainAttnParams::default() })
}

fn attn_cfg(sh: &AttnShape, floats: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (sh.q_len as u32, (sh.batch * sh.heads) as u32, 1), block_dim: (128, 1, 1), shared_mem_bytes: ((floats + 32) * 4) as u32 }
}

/// Plain fp32 masked attention forward (any head dim; the fused bf16 kernels of
/// `ops::attention::cuda` cover [`crate::ops::attention::cuda::HEAD_DIMS`]). Layouts as
/// `ops::attention::cpu::forward`.
pub fn attention_forward(gpu: &GpuContext, stream: &CudaStream, qkv: &impl DevicePtr<f32>, out: &mut impl DevicePtrMut<f32>, lse: &mut impl DevicePtrMut<f32>, sh: &AttnShape) -> Result<(), GpuError> {
    const OP: &str = "attention forward (plain)";
    let mut a = attn_dims(OP, sh)?;
    check_len(OP, "qkv", qkv, sh.batch * sh.tokens * 3 * sh.dim())?;
    check_len(OP, "out", out, sh.batch * sh.q_len * sh.dim())?;
    check_len(OP, "lse", lse, sh.batch * sh.heads * sh.q_len)?;
    if sh.batch * sh.heads * sh.q_len == 0 {
        return Ok(());
    }
    let f = gpu.kernel(tokens::ATTN_SIMPLE_FWD)?;
    let (qp, _g1) = qkv.device_ptr(stream);
    let (op, _g2) = out.device_ptr_mut(stream);
    let (lp, _g3) = lse.device_ptr_mut(stream);
    (a.qkv, a.out, a.lse) = (qp, op, lp);
    let mut l = stream.launch_builder(&f);
    l.arg(&a);
    // SAFETY: lengths checked above; shared memory holds N scores and 32 reduction slots.
    unsafe { l.launch(attn_cfg(sh, sh.tokens)) }.map_err(GpuError::driver("launching attn_simple_fwd"))?;
    Ok(())
}

/// Backward of [`attention_forward`]: writes `dqkv [B, N, 3D]` (zeroed first; Q rows outside
/// the query range stay zero).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(gpu: &GpuContext, stream: &CudaStream, qkv: &impl DevicePtr<f32>, out: &impl DevicePtr<f32>, lse: &impl DevicePtr<f32>, dout: &impl DevicePtr<f32>, dqkv: &mut impl DevicePtrMut<f32>, sh: &AttnShape) -> Result<(), GpuError> {
    const OP: &str = "attention backward (plain)";
    let mut a = attn_dims(OP, sh)?;
    let total = sh.batch * sh.tokens * 3 * sh.dim();
    check_len(OP, "qkv", qkv, total)?;
    check_len(OP, "out", out, sh.batch * sh.q_len * sh.dim())?;
    check_len(OP, "dout", dout, sh.batch * sh.q_len * sh.dim())?;
    check_len(OP, "lse", lse, sh.batch * sh.heads * sh.q_len)?;
    check_len(OP, "dqkv", dqkv, total)?;
    fill::<f32>(gpu, stream, dqkv, total, 0.0)?;
    if sh.batch * sh.heads * sh.q_len == 0 {
        return Ok(());
    }
    let f = gpu.kernel(tokens::ATTN_SIMPLE_BWD)?;
    let (qp, _g1) = qkv.device_ptr(stream);
    let (op, _g2) = out.device_ptr(stream);
    let (lp, _g3) = lse.device_ptr(stream);
    let (gp, _g4) = dout.device_ptr(stream);
    let (dp, _g5) = dqkv.device_ptr_mut(stream);
    (a.qkv, a.out, a.lse, a.dout, a.dqkv) = (qp, op, lp, gp, dp);
    let mut l = stream.launch_builder(&f);
    l.arg(&a);
    // SAFETY: lengths checked above; shared memory holds 2N floats and 32 reduction slots.
    unsafe { l.launch(attn_cfg(sh, 2 * sh.tokens)) }.map_err(GpuError::driver("launching attn_simple_bwd"))?;
    Ok(())
}
