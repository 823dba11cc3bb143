//! GPU launchers of LayerNorm (`kernels/layernorm.cu`): rows of length d <= 1024 stored in
//! bf16 or fp32 (`S`: an fp32 residual stream is read as it is, no cast pass), bf16 output,
//! fp32 gamma/beta and statistics, one warp per row. The backward writes `dx` in `S`.

use super::{LayerNormShape, Norm, NormStats};
use crate::gpu::kernels::layernorm;
use crate::gpu::launch::{aligned, Storage, BLOCK};
use crate::gpu::{bf16, CudaStream, DevicePtr, DevicePtrMut, GpuContext, GpuError, Kernel};
use crate::ops::Grad;
use cudarc::driver::{CudaFunction, LaunchConfig, PushKernelArg};

/// Longest row the kernels hold in registers.
///
/// ```
/// use mlvpt::ops::layernorm::cuda::MAX_D;
/// assert_eq!(MAX_D, mlvpt::contract::layernorm::LN_MAX_D);
/// assert!(MAX_D >= 1024); // ViT-L's width
/// ```
pub const MAX_D: usize = crate::contract::layernorm::LN_MAX_D;

fn check_shape(op: &'static str, rows: usize, d: usize) -> Result<(), GpuError> {
    if d == 0 || d > MAX_D {
        return Err(GpuError::invalid(op, format!("row length {d} outside 1..={MAX_D}")));
    }
    if rows > u32::MAX as usize {
        return Err(GpuError::invalid(op, format!("{rows} rows exceed the kernel's 32-bit row index")));
    }
    Ok(())
}

/// Fails unless each `(what, has, needs)` holds what it needs.
fn check_lens(op: &'static str, lens: &[(&str, usize, usize)]) -> Result<(), GpuError> {
    match lens.iter().find(|(_, has, needs)| has < needs) {
        Some((what, has, needs)) => Err(GpuError::invalid(op, format!("{what} has {has} elements, needs {needs}"))),
        None => Ok(()),
    }
}

/// Of a kernel family `[scalar, v8_c1 .. v8_c4]`, the one for rows of `d` over the row
/// buffers at device addresses `ptrs`: the vector kernel compiled for ceil(d / 256) chunks of 8
/// per lane when `d % 8 == 0` and every row buffer is 16-byte aligned (its 16-byte loads need
/// both), else the scalar one; with its loaded function.
fn variant(gpu: &GpuContext, names: &[Kernel; 5], d: usize, ptrs: &[u64]) -> Result<(Kernel, CudaFunction), GpuError> {
    let vec = d.is_multiple_of(8) && ptrs.iter().all(|&p| aligned(p, 16));
    let name = names[if vec { d.div_ceil(256) } else { 0 }];
    Ok((name, gpu.kernel(name)?))
}

// Kernel families by storage: [S = f32 ("f32x") or F = f32, S/F = bf16] x [scalar, v8_c1 .. v8_c4].
const FWD: [[Kernel; 5]; 2] = [
    [
        layernorm::LAYERNORM_FWD_F32X,
        layernorm::LAYERNORM_FWD_F32X_V8_C1,
        layernorm::LAYERNORM_FWD_F32X_V8_C2,
        layernorm::LAYERNORM_FWD_F32X_V8_C3,
        layernorm::LAYERNORM_FWD_F32X_V8_C4,
    ],
    [
        layernorm::LAYERNORM_FWD_BF16,
        layernorm::LAYERNORM_FWD_BF16_V8_C1,
        layernorm::LAYERNORM_FWD_BF16_V8_C2,
        layernorm::LAYERNORM_FWD_BF16_V8_C3,
        layernorm::LAYERNORM_FWD_BF16_V8_C4,
    ],
];
const BWD: [[Kernel; 5]; 2] = [
    [
        layernorm::LAYERNORM_BWD_F32X,
        layernorm::LAYERNORM_BWD_F32X_V8_C1,
        layernorm::LAYERNORM_BWD_F32X_V8_C2,
        layernorm::LAYERNORM_BWD_F32X_V8_C3,
        layernorm::LAYERNORM_BWD_F32X_V8_C4,
    ],
    [
        layernorm::LAYERNORM_BWD_BF16,
        layernorm::LAYERNORM_BWD_BF16_V8_C1,
        layernorm::LAYERNORM_BWD_BF16_V8_C2,
        layernorm::LAYERNORM_BWD_BF16_V8_C3,
        layernorm::LAYERNORM_BWD_BF16_V8_C4,
    ],
];
const RES_FWD: [[Kernel; 5]; 2] = [
    [
        layernorm::LAYERNORM_RES_FWD_F32,
        layernorm::LAYERNORM_RES_FWD_F32_V8_C1,
        layernorm::LAYERNORM_RES_FWD_F32_V8_C2,
        layernorm::LAYERNORM_RES_FWD_F32_V8_C3,
        layernorm::LAYERNORM_RES_FWD_F32_V8_C4,
    ],
    [
        layernorm::LAYERNORM_RES_FWD_BF16,
        layernorm::LAYERNORM_RES_FWD_BF16_V8_C1,
        layernorm::LAYERNORM_RES_FWD_BF16_V8_C2,
        layernorm::LAYERNORM_RES_FWD_BF16_V8_C3,
        layernorm::LAYERNORM_RES_FWD_BF16_V8_C4,
    ],
];

/// One warp per row, BLOCK / 32 rows per block, as many blocks as rows need (capped; the
/// kernels loop over rows).
fn row_launch(rows: usize) -> LaunchConfig {
    let per_block = (BLOCK / 32) as usize;
    let blocks = rows.div_ceil(per_block).clamp(1, 65_535) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `y = (x - mean) rstd gamma + beta` over `rows` rows of `d`; writes `mean[rows]`,
/// `rstd[rows]` for [`backward`]. The twin of [`super::cpu::forward`] (eps [`super::VIT_EPS`]
/// in the ViT).
///
/// ```
/// use mlvpt::gpu::{bf16, GpuContext, GpuError};
/// use mlvpt::ops::layernorm::{cuda, LayerNormShape, Norm, NormStats, VIT_EPS};
/// # fn main() -> Result<(), GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let (rows, d) = (4, 768);
/// let x = gpu.upload(&vec![bf16::from_f32(0.5); rows * d])?;
/// let (gamma, beta) = (gpu.upload(&vec![1.0f32; d])?, gpu.zeros::<f32>(d)?);
/// let mut y = gpu.zeros::<bf16>(rows * d)?;
/// let (mut mean, mut rstd) = (gpu.zeros::<f32>(rows)?, gpu.zeros::<f32>(rows)?);
/// let shape = LayerNormShape { rows, dim: d, eps: VIT_EPS };
/// let stats = NormStats { mean: &mut mean, rstd: &mut rstd };
/// cuda::forward(&gpu, gpu.stream(), &x, Norm { gamma: &gamma, beta: &beta }, &mut y, stats, &shape)?;
/// assert!(gpu.download(&y)?.iter().all(|v| v.to_f32() == 0.0)); // a constant row normalises to beta
/// # Ok(()) }
/// ```
pub fn forward<S: Storage>(
    gpu: &GpuContext,
    stream: &CudaStream,
    x: &impl DevicePtr<S>,
    norm: Norm<&(impl DevicePtr<f32> + ?Sized)>,
    y: &mut impl DevicePtrMut<bf16>,
    stats: NormStats<&mut (impl DevicePtrMut<f32> + ?Sized)>,
    sh: &LayerNormShape,
) -> Result<(), GpuError> {
    const OP: &str = "layernorm forward";
    let (Norm { gamma, beta }, NormStats { mean, rstd }) = (norm, stats);
    let &LayerNormShape { rows, dim: d, eps } = sh;
    check_shape(OP, rows, d)?;
    let n = rows * d;
    check_lens(
        OP,
        &[
            ("x", x.len(), n),
            ("y", y.len(), n),
            ("gamma", gamma.len(), d),
            ("beta", beta.len(), d),
            ("mean", mean.len(), rows),
            ("rstd", rstd.len(), rows),
        ],
    )?;
    if rows == 0 {
        return Ok(());
    }
    let (xp, _g1) = x.device_ptr(stream);
    let (gp, _g2) = gamma.device_ptr(stream);
    let (bp, _g3) = beta.device_ptr(stream);
    let (yp, _g4) = y.device_ptr_mut(stream);
    let (mp, _g5) = mean.device_ptr_mut(stream);
    let (rp, _g6) = rstd.device_ptr_mut(stream);
    let (name, f) = variant(gpu, &FWD[S::INDEX], d, &[xp, gp, bp, yp])?;
    let (rows32, d32, eps32) = (rows as u32, d as u32, eps as f32);
    let mut l = stream.launch_builder(&f);
    l.arg(&xp)
        .arg(&gp)
        .arg(&bp)
        .arg(&yp)
        .arg(&mp)
        .arg(&rp)
        .arg(&rows32)
        .arg(&d32)
        .arg(&eps32);
    // SAFETY: lengths checked above; the v8 kernel only runs on 16-byte aligned rows.
    unsafe { l.launch(row_launch(rows)) }.map_err(GpuError::driver(format!("launching {name}")))?;
    Ok(())
}

/// Input gradient `dx (+)= rstd (g - mean(g) - xhat mean(g xhat))`, `g = dy gamma`, from the
/// forward's saved `mean`/`rstd`; `accumulate` adds onto `dx` (a residual stream's gradient).
/// The twin of [`super::cpu::backward`].
///
/// ```
/// use mlvpt::gpu::{bf16, GpuContext};
/// use mlvpt::ops::layernorm::{self, LayerNormShape, Norm, NormStats, VIT_EPS};
/// use mlvpt::ops::Grad;
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let (rows, d) = (3, 16);
/// let x: Vec<f32> = (0..rows * d).map(|i| ((i * 7) % 11) as f32 * 0.3 - 1.5).collect();
/// let gamma: Vec<f32> = (0..d).map(|j| 1.0 + j as f32 * 0.05).collect();
/// let dy: Vec<bf16> = (0..rows * d).map(|i| bf16::from_f32(((i * 5) % 9) as f32 * 0.25 - 1.0)).collect();
/// let xd = gpu.upload(&x)?; // S = f32: an fp32 residual stream, read as it is
/// let (g, beta) = (gpu.upload(&gamma)?, gpu.zeros::<f32>(d)?);
/// let mut y = gpu.zeros::<bf16>(rows * d)?;
/// let (mut mean, mut rstd) = (gpu.zeros::<f32>(rows)?, gpu.zeros::<f32>(rows)?);
/// let shape = LayerNormShape { rows, dim: d, eps: VIT_EPS };
/// let stats = NormStats { mean: &mut mean, rstd: &mut rstd };
/// layernorm::cuda::forward(&gpu, gpu.stream(), &xd, Norm { gamma: &g, beta: &beta }, &mut y, stats, &shape)?;
/// let mut dx = gpu.zeros::<f32>(rows * d)?;
/// let stats = NormStats { mean: &mean, rstd: &rstd };
/// layernorm::cuda::backward(&gpu, gpu.stream(), &gpu.upload(&dy)?, &xd, &g, stats, Grad::Write(&mut dx), &shape)?;
/// // The CPU twins, in f64.
/// let f64s = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<_>>();
/// let (x64, g64) = (f64s(&x), f64s(&gamma));
/// let dy64: Vec<f64> = dy.iter().map(|v| v.to_f64()).collect();
/// let (mut y64, mut m64, mut r64) = (vec![0.0; rows * d], vec![0.0; rows], vec![0.0; rows]);
/// let zeros = vec![0.0; d];
/// let stats = NormStats { mean: &mut m64[..], rstd: &mut r64[..] };
/// layernorm::cpu::forward(&x64, Norm { gamma: &g64[..], beta: &zeros[..] }, &mut y64, stats, &shape);
/// let mut want = vec![0.0; rows * d];
/// let stats = NormStats { mean: &m64[..], rstd: &r64[..] };
/// layernorm::cpu::backward(&dy64, &x64, &g64, stats, Grad::Write(&mut want[..]), &shape);
/// for (got, want) in gpu.download(&dx)?.iter().zip(&want) {
///     assert!((*got as f64 - want).abs() < 1e-4 * (1.0 + want.abs()), "{got} vs {want}");
/// }
/// # Ok(()) }
/// ```
#[allow(clippy::too_many_arguments)] // the op's operands, as the forward names them
pub fn backward<S: Storage>(
    gpu: &GpuContext,
    stream: &CudaStream,
    dy: &impl DevicePtr<bf16>,
    x: &impl DevicePtr<S>,
    gamma: &impl DevicePtr<f32>,
    stats: NormStats<&(impl DevicePtr<f32> + ?Sized)>,
    dx: Grad<&mut impl DevicePtrMut<S>>,
    sh: &LayerNormShape,
) -> Result<(), GpuError> {
    const OP: &str = "layernorm backward";
    let NormStats { mean, rstd } = stats;
    let (rows, d, accumulate) = (sh.rows, sh.dim, dx.accumulates());
    let dx = dx.into_inner();
    check_shape(OP, rows, d)?;
    let n = rows * d;
    check_lens(
        OP,
        &[
            ("dy", dy.len(), n),
            ("x", x.len(), n),
            ("dx", dx.len(), n),
            ("gamma", gamma.len(), d),
            ("mean", mean.len(), rows),
            ("rstd", rstd.len(), rows),
        ],
    )?;
    if rows == 0 {
        return Ok(());
    }
    let (dyp, _g1) = dy.device_ptr(stream);
    let (xp, _g2) = x.device_ptr(stream);
    let (gp, _g3) = gamma.device_ptr(stream);
    let (mp, _g4) = mean.device_ptr(stream);
    let (rp, _g5) = rstd.device_ptr(stream);
    let (dxp, _g6) = dx.device_ptr_mut(stream);
    let (name, f) = variant(gpu, &BWD[S::INDEX], d, &[dyp, xp, gp, dxp])?;
    let (rows32, d32, acc) = (rows as u32, d as u32, accumulate as i32);
    let mut l = stream.launch_builder(&f);
    l.arg(&dyp)
        .arg(&xp)
        .arg(&gp)
        .arg(&mp)
        .arg(&rp)
        .arg(&dxp)
        .arg(&rows32)
        .arg(&d32)
        .arg(&acc);
    // SAFETY: lengths checked above; the v8 kernel only runs on 16-byte aligned rows.
    unsafe { l.launch(row_launch(rows)) }.map_err(GpuError::driver(format!("launching {name}")))?;
    Ok(())
}

/// The residual add fused into [`forward`]: `out = x + ls * f` (`ls [d]`, or `out = x + f`
/// without it; `x`, `out` the fp32 residual stream, `f` a branch output stored as `F`), then
/// LayerNorm of `out` into `y` (bf16) with `mean`/`rstd` saved: one pass over the rows instead
/// of a residual kernel and a LayerNorm reading its output back. The twin of
/// `CpuBackend::residual` followed by [`super::cpu::forward`].
///
/// ```
/// use mlvpt::gpu::{bf16, DevicePtr, GpuContext};
/// use mlvpt::ops::layernorm::{self, LayerNormShape, Norm, NormStats, VIT_EPS};
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let (rows, d) = (2, 8);
/// let x: Vec<f32> = (0..rows * d).map(|i| i as f32 * 0.5).collect();
/// let f: Vec<bf16> = (0..rows * d).map(|i| bf16::from_f32(1.0 - (i % 3) as f32)).collect(); // a branch output in bf16
/// let ls = gpu.upload(&[0.5f32; 8])?; // LayerScale
/// let (gamma, beta) = (gpu.upload(&[1.0f32; 8])?, gpu.zeros::<f32>(d)?);
/// let mut out = gpu.zeros::<f32>(rows * d)?;
/// let mut y = gpu.zeros::<bf16>(rows * d)?;
/// let (mut mean, mut rstd) = (gpu.zeros::<f32>(rows)?, gpu.zeros::<f32>(rows)?);
/// let ls: &dyn DevicePtr<f32> = &ls;
/// let shape = LayerNormShape { rows, dim: d, eps: VIT_EPS };
/// let (norm, stats) = (Norm { gamma: &gamma, beta: &beta }, NormStats { mean: &mut mean, rstd: &mut rstd });
/// layernorm::cuda::residual_forward(&gpu, gpu.stream(), &gpu.upload(&x)?, &gpu.upload(&f)?, Some(ls), &mut out,
///                                   norm, &mut y, stats, &shape)?;
/// let out = gpu.download(&out)?;
/// for i in 0..rows * d {
///     assert_eq!(out[i], x[i] + 0.5 * f[i].to_f32()); // the new residual stream
/// }
/// // y is LayerNorm of it: the CPU twin on `out`.
/// let (mut want, mut m, mut r) = (vec![0.0f32; rows * d], vec![0.0f32; rows], vec![0.0f32; rows]);
/// let stats = NormStats { mean: &mut m[..], rstd: &mut r[..] };
/// layernorm::cpu::forward(&out, Norm { gamma: &[1.0; 8][..], beta: &[0.0; 8][..] }, &mut want, stats, &shape);
/// for (got, want) in gpu.download(&y)?.iter().zip(&want) {
///     assert!((got.to_f32() - want).abs() <= 1e-2 * want.abs() + 1e-3, "{got} vs {want}");
/// }
/// # Ok(()) }
/// ```
#[allow(clippy::too_many_arguments)] // the residual's operands, then the forward's
pub fn residual_forward<F: Storage>(
    gpu: &GpuContext,
    stream: &CudaStream,
    x: &impl DevicePtr<f32>,
    f: &impl DevicePtr<F>,
    ls: Option<&dyn DevicePtr<f32>>,
    out: &mut impl DevicePtrMut<f32>,
    norm: Norm<&(impl DevicePtr<f32> + ?Sized)>,
    y: &mut impl DevicePtrMut<bf16>,
    stats: NormStats<&mut (impl DevicePtrMut<f32> + ?Sized)>,
    sh: &LayerNormShape,
) -> Result<(), GpuError> {
    const OP: &str = "residual + layernorm forward";
    let (Norm { gamma, beta }, NormStats { mean, rstd }) = (norm, stats);
    let &LayerNormShape { rows, dim: d, eps } = sh;
    check_shape(OP, rows, d)?;
    let n = rows * d;
    let ls_len = ls.map_or(d, |l| l.len());
    check_lens(
        OP,
        &[
            ("x", x.len(), n),
            ("f", f.len(), n),
            ("out", out.len(), n),
            ("y", y.len(), n),
            ("ls", ls_len, d),
        ],
    )?;
    check_lens(
        OP,
        &[
            ("gamma", gamma.len(), d),
            ("beta", beta.len(), d),
            ("mean", mean.len(), rows),
            ("rstd", rstd.len(), rows),
        ],
    )?;
    if rows == 0 {
        return Ok(());
    }
    let (xp, _g1) = x.device_ptr(stream);
    let (fp, _g2) = f.device_ptr(stream);
    let (lp, _g3) = match ls {
        Some(l) => {
            let (p, g) = l.device_ptr(stream);
            (p, Some(g))
        }
        None => (0, None),
    };
    let (op, _g4) = out.device_ptr_mut(stream);
    let (gp, _g5) = gamma.device_ptr(stream);
    let (bp, _g6) = beta.device_ptr(stream);
    let (yp, _g7) = y.device_ptr_mut(stream);
    let (mp, _g8) = mean.device_ptr_mut(stream);
    let (rp, _g9) = rstd.device_ptr_mut(stream);
    // A null ls (0) counts as aligned.
    let (name, func) = variant(gpu, &RES_FWD[F::INDEX], d, &[xp, fp, op, gp, bp, yp, lp])?;
    let (rows32, d32, eps32) = (rows as u32, d as u32, eps as f32);
    let mut l = stream.launch_builder(&func);
    l.arg(&xp)
        .arg(&fp)
        .arg(&lp)
        .arg(&op)
        .arg(&gp)
        .arg(&bp)
        .arg(&yp)
        .arg(&mp)
        .arg(&rp)
        .arg(&rows32)
        .arg(&d32)
        .arg(&eps32);
    // SAFETY: lengths checked above (ls null or d long); the v8 kernel only runs on 16-byte
    // aligned rows; argument types match layernorm_res_fwd's signature.
    unsafe { l.launch(row_launch(rows)) }.map_err(GpuError::driver(format!("launching {name}")))?;
    Ok(())
}
