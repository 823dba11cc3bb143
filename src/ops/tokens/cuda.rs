//! Launchers of `kernels/tokens.cu`: the token-assembly ops of the CUDA backend. Each checks
//! buffer lengths against its shape and returns a [`GpuError`] instead of launching out of
//! bounds.
//!
//! The activation operands of most kernels may be stored in fp32 or bf16 ([`Storage`]; the
//! math is fp32 either way): a launcher generic over `T: Storage` picks the kernel's `_f32` or
//! `_bf16` instantiation. Parameters, the residual stream and its gradient are fp32.

use super::{PatchShape, TokenCopy, TokenRange, TokenShape};
use crate::contract::tokens::CopyTokensParams;
use crate::gpu::kernels::tokens;
use crate::gpu::launch::{check_len, grid_stride_blocks, BLOCK};
use crate::gpu::{CudaStream, DevicePtr, DevicePtrMut, GpuContext, GpuError};
use crate::ops::Rows;
use cudarc::driver::{LaunchConfig, PushKernelArg};

pub use crate::gpu::launch::Storage;

fn u32_of(op: &'static str, what: &str, v: usize) -> Result<u32, GpuError> {
    u32::try_from(v).map_err(|_| GpuError::invalid(op, format!("{what} = {v} exceeds 32 bits")))
}

fn grid(gpu: &GpuContext, n: u64) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid_stride_blocks(gpu, n, BLOCK as u64), 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
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

/// Twin of [`super::cpu::patchify`]: images `[B, C, H, W]` into `out [B, Np, C*p*p]` (both `T`).
///
/// ```
/// use mlvpt::gpu::GpuContext;
/// use mlvpt::ops::tokens;
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let (b, c, h, w, p) = (2, 3, 4, 6, 2); // 2 x 3 = 6 patches of 3 * 2 * 2 values
/// let images: Vec<f32> = (0..b * c * h * w).map(|i| i as f32).collect();
/// let mut out = gpu.zeros::<f32>(images.len())?;
/// let shape = tokens::PatchShape { batch: b, channels: c, height: h, width: w, patch: p };
/// tokens::cuda::patchify::<f32>(&gpu, gpu.stream(), &gpu.upload(&images)?, &mut out, &shape)?;
/// let mut want = vec![0.0f32; images.len()];
/// tokens::cpu::patchify(&images, &mut want, &shape); // the CPU twin
/// assert_eq!(gpu.download(&out)?, want);
/// # Ok(()) }
/// ```
pub fn patchify<T: Storage>(
    gpu: &GpuContext,
    stream: &CudaStream,
    images: &impl DevicePtr<T>,
    out: &mut impl DevicePtrMut<T>,
    sh: &PatchShape,
) -> Result<(), GpuError> {
    let &PatchShape {
        batch,
        channels,
        height,
        width,
        patch,
    } = sh;
    const OP: &str = "patchify";
    if patch == 0 || !height.is_multiple_of(patch) || !width.is_multiple_of(patch) {
        return Err(GpuError::invalid(
            OP,
            format!("image {height}x{width} is not a multiple of patch {patch}"),
        ));
    }
    let n = batch * channels * height * width;
    check_len(OP, "images", images, n)?;
    check_len(OP, "out", out, n)?;
    let (c, h, w, p) = (
        u32_of(OP, "channels", channels)?,
        u32_of(OP, "height", height)?,
        u32_of(OP, "width", width)?,
        u32_of(OP, "patch", patch)?,
    );
    let (ip, _g1) = images.device_ptr(stream);
    let (op, _g2) = out.device_ptr_mut(stream);
    let n = n as u64;
    launch!(
        gpu,
        stream,
        T::pick([tokens::TOK_PATCHIFY_F32, tokens::TOK_PATCHIFY_BF16]),
        n,
        &ip,
        &op,
        &n,
        &c,
        &h,
        &w,
        &p
    )
}

/// Twin of [`super::cpu::embed_tokens`] (`patches` stored as `T`, the rest fp32).
///
/// ```
/// use mlvpt::gpu::{bf16, GpuContext};
/// use mlvpt::ops::tokens;
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let (b, np, prompts, d) = (2, 3, 2, 8); // x [B, 1 + Np + P, D]
/// let patches: Vec<f32> = (0..b * np * d).map(|i| i as f32 * 0.5).collect(); // exact in bf16
/// let (cls, pos): (Vec<f32>, Vec<f32>) = ((0..d).map(|j| -(j as f32)).collect(), (0..(1 + np) * d).map(|i| i as f32 * 0.25).collect());
/// let patches16: Vec<bf16> = patches.iter().map(|&v| bf16::from_f32(v)).collect(); // the patch GEMM's bf16 output
/// let n = 1 + prompts + np;
/// let mut x = gpu.upload(&vec![7.0f32; b * n * d])?;
/// let shape = tokens::TokenShape { batch: b, prompts, num_patches: np, dim: d };
/// tokens::cuda::embed_tokens::<bf16>(&gpu, gpu.stream(), &gpu.upload(&patches16)?, &gpu.upload(&cls)?, &gpu.upload(&pos)?, &mut x, &shape)?;
/// let mut want = vec![7.0f32; b * n * d];
/// tokens::cpu::embed_tokens(&patches, &cls, &pos, &mut want, &shape); // the CPU twin
/// let x = gpu.download(&x)?;
/// assert_eq!(x, want);
/// assert_eq!(x[(1 + np) * d..n * d], [7.0; 16]); // prompt rows (the last P) untouched
/// # Ok(()) }
/// ```
pub fn embed_tokens<T: Storage>(
    gpu: &GpuContext,
    stream: &CudaStream,
    patches: &impl DevicePtr<T>,
    cls: &impl DevicePtr<f32>,
    pos: &impl DevicePtr<f32>,
    x: &mut impl DevicePtrMut<f32>,
    sh: &TokenShape,
) -> Result<(), GpuError> {
    const OP: &str = "embed_tokens";
    let &TokenShape {
        batch,
        prompts,
        num_patches,
        dim,
    } = sh;
    check_len(OP, "patches", patches, batch * num_patches * dim)?;
    check_len(OP, "cls", cls, dim)?;
    check_len(OP, "pos", pos, (1 + num_patches) * dim)?;
    check_len(OP, "x", x, batch * (1 + prompts + num_patches) * dim)?;
    let (np, pr, d) = (
        u32_of(OP, "patches", num_patches)?,
        u32_of(OP, "prompts", prompts)?,
        u32_of(OP, "dim", dim)?,
    );
    let (pp, _g1) = patches.device_ptr(stream);
    let (cp, _g2) = cls.device_ptr(stream);
    let (qp, _g3) = pos.device_ptr(stream);
    let (xp, _g4) = x.device_ptr_mut(stream);
    let n = (batch * (1 + num_patches) * dim) as u64;
    launch!(
        gpu,
        stream,
        T::pick([tokens::TOK_EMBED_F32, tokens::TOK_EMBED_BF16]),
        n,
        &pp,
        &cp,
        &qp,
        &xp,
        &n,
        &np,
        &pr,
        &d
    )
}

/// Twin of [`super::cpu::set_prompts`] (`prompts [L, P, D]`, row block `layer`).
///
/// ```
/// use mlvpt::gpu::GpuContext;
/// use mlvpt::ops::tokens;
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let (b, n, p, d) = (2, 5, 2, 4); // prompts [L = 3, P, D]; rows N-P..N of each image
/// let shape = tokens::TokenShape { batch: b, prompts: p, num_patches: n - 1 - p, dim: d };
/// let prompts: Vec<f32> = (0..3 * p * d).map(|i| i as f32).collect();
/// let mut x = gpu.zeros::<f32>(b * n * d)?;
/// tokens::cuda::set_prompts(&gpu, gpu.stream(), &gpu.upload(&prompts)?, 1, &mut x, &shape)?;
/// let x = gpu.download(&x)?;
/// for img in 0..b {
///     let rows = &x[(img * n + n - p) * d..(img + 1) * n * d];
///     assert_eq!(rows, &prompts[p * d..2 * p * d]); // layer 1's prompts
/// }
/// assert_eq!(x[..d], [0.0; 4]); // the CLS row untouched
/// # Ok(()) }
/// ```
pub fn set_prompts(
    gpu: &GpuContext,
    stream: &CudaStream,
    prompts: &impl DevicePtr<f32>,
    layer: usize,
    x: &mut impl DevicePtrMut<f32>,
    sh: &TokenShape,
) -> Result<(), GpuError> {
    const OP: &str = "set_prompts";
    let (batch, tokens, count, dim) = (sh.batch, sh.tokens(), sh.prompts, sh.dim);
    check_len(OP, "prompts", prompts, (layer + 1) * count * dim)?;
    check_len(OP, "x", x, batch * tokens * dim)?;
    let (t, c, d) = (u32_of(OP, "tokens", tokens)?, u32_of(OP, "count", count)?, u32_of(OP, "dim", dim)?);
    let (pp, _g1) = prompts.device_ptr(stream);
    let pp = pp + (layer * count * dim * 4) as u64;
    let (xp, _g2) = x.device_ptr_mut(stream);
    let n = (batch * count * dim) as u64;
    launch!(gpu, stream, tokens::TOK_SET_PROMPTS, n, &pp, &xp, &n, &t, &c, &d)
}

/// Twin of [`super::cpu::prompt_grad`]: `dprompts[layer] = sum_b dx[b, N-P..N]` (image order),
/// then with `zero_rows` those rows of `dx` are zeroed.
///
/// ```
/// use mlvpt::gpu::GpuContext;
/// use mlvpt::ops::tokens;
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let (b, n, p, d) = (2, 4, 2, 3);
/// let shape = tokens::TokenShape { batch: b, prompts: p, num_patches: n - 1 - p, dim: d };
/// let dx0: Vec<f32> = (0..b * n * d).map(|i| i as f32).collect();
/// let mut dx = gpu.upload(&dx0)?;
/// let mut dprompts = gpu.zeros::<f32>(2 * p * d)?; // [L = 2, P, D]
/// tokens::cuda::prompt_grad(&gpu, gpu.stream(), &mut dx, &mut dprompts, 0, &shape, true)?;
/// let (dx, dp) = (gpu.download(&dx)?, gpu.download(&dprompts)?);
/// for r in 0..p * d {
///     assert_eq!(dp[r], dx0[(n - p) * d + r] + dx0[(2 * n - p) * d + r]); // sum over images of rows N-P..N
/// }
/// assert_eq!(dp[p * d..], [0.0; 6]); // layer 1 untouched
/// assert!(dx[(n - p) * d..n * d].iter().chain(&dx[(2 * n - p) * d..]).all(|&v| v == 0.0)); // zero_rows
/// # Ok(()) }
/// ```
pub fn prompt_grad(
    gpu: &GpuContext,
    stream: &CudaStream,
    dx: &mut impl DevicePtrMut<f32>,
    dprompts: &mut impl DevicePtrMut<f32>,
    layer: usize,
    sh: &TokenShape,
    zero_rows: bool,
) -> Result<(), GpuError> {
    const OP: &str = "prompt_grad";
    let (batch, tokens, count, dim) = (sh.batch, sh.tokens(), sh.prompts, sh.dim);
    check_len(OP, "dx", dx, batch * tokens * dim)?;
    check_len(OP, "dprompts", dprompts, (layer + 1) * count * dim)?;
    let (bt, t, c, d) = (
        u32_of(OP, "batch", batch)?,
        u32_of(OP, "tokens", tokens)?,
        u32_of(OP, "count", count)?,
        u32_of(OP, "dim", dim)?,
    );
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

/// Twin of [`super::cpu::copy_tokens`] (`src` and `dst` both `T`).
///
/// ```
/// use mlvpt::gpu::{bf16, GpuContext};
/// use mlvpt::ops::tokens;
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let (b, d) = (2, 8);
/// // Rows 1..3 of each image's 5 tokens into rows 0..2 of a [B, 2, D] buffer (e.g. the prompts).
/// let src: Vec<bf16> = (0..b * 5 * d).map(|i| bf16::from_f32(i as f32)).collect();
/// let mut dst = gpu.zeros::<bf16>(b * 2 * d)?;
/// let copy = tokens::TokenCopy {
///     batch: b,
///     dim: d,
///     count: 2,
///     src: tokens::TokenRange { tokens: 5, start: 1 },
///     dst: tokens::TokenRange { tokens: 2, start: 0 },
/// };
/// tokens::cuda::copy_tokens::<bf16>(&gpu, gpu.stream(), &gpu.upload(&src)?, &mut dst, &copy)?;
/// let dst = gpu.download(&dst)?;
/// assert_eq!(dst[..2 * d], src[d..3 * d]);
/// assert_eq!(dst[2 * d..], src[5 * d + d..5 * d + 3 * d]);
/// # Ok(()) }
/// ```
pub fn copy_tokens<T: Storage>(
    gpu: &GpuContext,
    stream: &CudaStream,
    src: &impl DevicePtr<T>,
    dst: &mut impl DevicePtrMut<T>,
    c: &TokenCopy,
) -> Result<(), GpuError> {
    const OP: &str = "copy_tokens";
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
    if src_start + count > src_tokens || dst_start + count > dst_tokens {
        return Err(GpuError::invalid(
            OP,
            format!("rows {src_start}+{count} of {src_tokens} into {dst_start}+{count} of {dst_tokens}"),
        ));
    }
    check_len(OP, "src", src, batch * src_tokens * dim)?;
    check_len(OP, "dst", dst, batch * dst_tokens * dim)?;
    u32_of(OP, "rows", batch * src_tokens.max(dst_tokens))?;
    let [src_tokens, src_start, dst_tokens, dst_start, count, d] =
        [src_tokens, src_start, dst_tokens, dst_start, count, dim].map(|v| v as u32);
    let (sp, _g1) = src.device_ptr(stream);
    let (dp, _g2) = dst.device_ptr_mut(stream);
    let n = batch as u64 * count as u64 * d as u64;
    let p = CopyTokensParams {
        src: sp,
        dst: dp,
        n,
        src_tokens,
        src_start,
        dst_tokens,
        dst_start,
        count,
        d,
    };
    launch!(
        gpu,
        stream,
        T::pick([tokens::TOK_COPY_TOKENS_F32, tokens::TOK_COPY_TOKENS_BF16]),
        n,
        &p
    )
}

/// Twin of [`super::cpu::residual`]: `out = x + ls * f` over `[rows, dim]` (`f` stored as `T`;
/// `x`, `out` and `ls` fp32).
///
/// ```
/// use mlvpt::gpu::{bf16, DevicePtr, GpuContext};
/// use mlvpt::ops::{tokens, Rows};
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let (rows, d) = (2, 3);
/// let x = gpu.upload(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0])?;
/// let f = gpu.upload(&[bf16::from_f32(0.5); 6])?; // a branch output stored in bf16
/// let ls = gpu.upload(&[1.0f32, 2.0, 4.0])?; // LayerScale
/// let mut out = gpu.zeros::<f32>(rows * d)?;
/// let ls: &dyn DevicePtr<f32> = &ls;
/// let shape = Rows { rows, dim: d };
/// tokens::cuda::residual::<bf16>(&gpu, gpu.stream(), &x, &f, Some(ls), &mut out, shape)?;
/// assert_eq!(gpu.download(&out)?, [1.5, 3.0, 5.0, 4.5, 6.0, 8.0]);
/// tokens::cuda::residual::<bf16>(&gpu, gpu.stream(), &x, &f, None, &mut out, shape)?; // no LayerScale
/// assert_eq!(gpu.download(&out)?, [1.5, 2.5, 3.5, 4.5, 5.5, 6.5]);
/// # Ok(()) }
/// ```
pub fn residual<T: Storage>(
    gpu: &GpuContext,
    stream: &CudaStream,
    x: &impl DevicePtr<f32>,
    f: &impl DevicePtr<T>,
    ls: Option<&dyn DevicePtr<f32>>,
    out: &mut impl DevicePtrMut<f32>,
    sh: Rows,
) -> Result<(), GpuError> {
    const OP: &str = "residual";
    let (n, dim) = (sh.len(), sh.dim);
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
    launch!(
        gpu,
        stream,
        T::pick([tokens::TOK_RESIDUAL_F32, tokens::TOK_RESIDUAL_BF16]),
        n,
        &xp,
        &fp,
        &lp,
        &op,
        &n,
        &d
    )
}

/// Twin of [`super::cpu::mul_cols`]: `out = src * v` (`v [dim]` per row; `out` stored as `T`,
/// `src` and `v` fp32).
///
/// ```
/// use mlvpt::gpu::{bf16, GpuContext};
/// use mlvpt::ops::{tokens, Rows};
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let src = gpu.upload(&[1.0f32, 2.0, 3.0, 4.0])?; // [2, 2]
/// let v = gpu.upload(&[0.5f32, -2.0])?;
/// let mut out = gpu.zeros::<bf16>(4)?; // e.g. a GEMM operand in bf16
/// tokens::cuda::mul_cols::<bf16>(&gpu, gpu.stream(), &src, &v, &mut out, Rows { rows: 2, dim: 2 })?;
/// let out: Vec<f32> = gpu.download(&out)?.iter().map(|x| x.to_f32()).collect();
/// assert_eq!(out, [0.5, -4.0, 1.5, -8.0]);
/// # Ok(()) }
/// ```
pub fn mul_cols<T: Storage>(
    gpu: &GpuContext,
    stream: &CudaStream,
    src: &impl DevicePtr<f32>,
    v: &impl DevicePtr<f32>,
    out: &mut impl DevicePtrMut<T>,
    sh: Rows,
) -> Result<(), GpuError> {
    const OP: &str = "mul_cols";
    let (n, dim) = (sh.len(), sh.dim);
    check_len(OP, "src", src, n)?;
    check_len(OP, "v", v, dim)?;
    check_len(OP, "out", out, n)?;
    let d = u32_of(OP, "dim", dim)?;
    let (sp, _g1) = src.device_ptr(stream);
    let (vp, _g2) = v.device_ptr(stream);
    let (op, _g3) = out.device_ptr_mut(stream);
    let n = n as u64;
    launch!(
        gpu,
        stream,
        T::pick([tokens::TOK_MUL_COLS_F32, tokens::TOK_MUL_COLS_BF16]),
        n,
        &sp,
        &vp,
        &op,
        &n,
        &d
    )
}

/// Twin of `CpuBackend::axpby`: `y = a y + b x` over `len`, in fp32 whatever `y` (`Y`) and
/// `x` (`X`) store.
///
/// ```
/// use mlvpt::gpu::{bf16, GpuContext};
/// use mlvpt::ops::tokens;
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let mut y = gpu.upload(&[1.0f32, 2.0, 3.0])?; // an fp32 gradient...
/// let x = gpu.upload(&[bf16::from_f32(4.0); 3])?; // ... plus a bf16 one, summed in fp32
/// tokens::cuda::axpby::<f32, bf16>(&gpu, gpu.stream(), 0.5, &mut y, 2.0, &x, 3)?;
/// assert_eq!(gpu.download(&y)?, [8.5, 9.0, 9.5]);
/// # Ok(()) }
/// ```
pub fn axpby<Y: Storage, X: Storage>(
    gpu: &GpuContext,
    stream: &CudaStream,
    a: f32,
    y: &mut impl DevicePtrMut<Y>,
    b: f32,
    x: &impl DevicePtr<X>,
    len: usize,
) -> Result<(), GpuError> {
    check_len("axpby", "y", y, len)?;
    check_len("axpby", "x", x, len)?;
    let (yp, _g1) = y.device_ptr_mut(stream);
    let (xp, _g2) = x.device_ptr(stream);
    let n = len as u64;
    const NAMES: [[crate::gpu::Kernel; 2]; 2] = [
        [tokens::TOK_AXPBY_F32_F32, tokens::TOK_AXPBY_F32_BF16],
        [tokens::TOK_AXPBY_BF16_F32, tokens::TOK_AXPBY_BF16_BF16],
    ];
    launch!(gpu, stream, NAMES[Y::INDEX][X::INDEX], n, &a, &yp, &b, &xp, &n)
}

/// Twin of `CpuBackend::fill`: `y[..len] = value` (rounded to `T`).
///
/// ```
/// use mlvpt::gpu::{bf16, GpuContext};
/// use mlvpt::ops::tokens;
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let mut y = gpu.zeros::<bf16>(5)?;
/// tokens::cuda::fill::<bf16>(&gpu, gpu.stream(), &mut y, 3, 0.1)?; // rounded to bf16
/// assert_eq!(gpu.download(&y)?, [bf16::from_f32(0.1), bf16::from_f32(0.1), bf16::from_f32(0.1), bf16::ZERO, bf16::ZERO]);
/// # Ok(()) }
/// ```
pub fn fill<T: Storage>(
    gpu: &GpuContext,
    stream: &CudaStream,
    y: &mut impl DevicePtrMut<T>,
    len: usize,
    value: f32,
) -> Result<(), GpuError> {
    check_len("fill", "y", y, len)?;
    let (yp, _g1) = y.device_ptr_mut(stream);
    let n = len as u64;
    launch!(
        gpu,
        stream,
        T::pick([tokens::TOK_FILL_F32, tokens::TOK_FILL_BF16]),
        n,
        &yp,
        &value,
        &n
    )
}
