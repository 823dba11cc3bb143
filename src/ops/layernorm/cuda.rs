//! GPU launchers of LayerNorm (`kernels/layernorm.cu`): bf16 rows of length d <= 1024, fp32
//! gamma/beta and statistics, one warp per row.

use crate::gpu::launch::{aligned, check_len, BLOCK};
use crate::gpu::{bf16, CudaStream, DevicePtr, DevicePtrMut, GpuContext, GpuError};
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// Longest row the kernels hold in registers.
pub const MAX_D: usize = 1024;

fn check_shape(op: &'static str, rows: usize, d: usize) -> Result<(), GpuError> {
    if d == 0 || d > MAX_D {
        return Err(GpuError::invalid(op, format!("row length {d} outside 1..={MAX_D}")));
    }
    if rows > u32::MAX as usize {
        return Err(GpuError::invalid(op, format!("{rows} rows exceed the kernel's 32-bit row index")));
    }
    Ok(())
}

/// The kernel for a row of `d`: the vector one compiled for ceil(d / 256) chunks of 8 per lane
/// when `vec`, else the scalar one.
fn kernel_name(forward: bool, vec: bool, d: usize) -> &'static str {
    const FWD: [&str; 4] = ["layernorm_fwd_bf16_v8_c1", "layernorm_fwd_bf16_v8_c2", "layernorm_fwd_bf16_v8_c3", "layernorm_fwd_bf16_v8_c4"];
    const BWD: [&str; 4] = ["layernorm_bwd_bf16_v8_c1", "layernorm_bwd_bf16_v8_c2", "layernorm_bwd_bf16_v8_c3", "layernorm_bwd_bf16_v8_c4"];
    match (forward, vec) {
        (true, true) => FWD[d.div_ceil(256) - 1],
        (false, true) => BWD[d.div_ceil(256) - 1],
        (true, false) => "layernorm_fwd_bf16",
        (false, false) => "layernorm_bwd_bf16",
    }
}

/// One warp per row, BLOCK / 32 rows per block, as many blocks as rows need (capped; the
/// kernels loop over rows).
fn row_launch(rows: usize) -> LaunchConfig {
    let per_block = (BLOCK / 32) as usize;
    let blocks = rows.div_ceil(per_block).clamp(1, 65_535) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// `y = (x - mean) rstd gamma + beta` over `rows` rows of `d`; writes `mean[rows]`,
/// `rstd[rows]` for [`backward`]. The twin of [`super::cpu::forward`] (eps [`super::VIT_EPS`]
/// in the ViT).
///
/// ```no_run
/// use mlvpt::gpu::{bf16, GpuContext, GpuError};
/// use mlvpt::ops::layernorm::{cuda, VIT_EPS};
/// # fn main() -> Result<(), GpuError> {
/// let gpu = GpuContext::new(0)?;
/// let (rows, d) = (4, 768);
/// let x = gpu.upload(&vec![bf16::from_f32(0.5); rows * d])?;
/// let (gamma, beta) = (gpu.upload(&vec![1.0f32; d])?, gpu.zeros::<f32>(d)?);
/// let mut y = gpu.zeros::<bf16>(rows * d)?;
/// let (mut mean, mut rstd) = (gpu.zeros::<f32>(rows)?, gpu.zeros::<f32>(rows)?);
/// cuda::forward(&gpu, gpu.stream(), &x, &gamma, &beta, &mut y, &mut mean, &mut rstd, rows, d, VIT_EPS)?;
/// # Ok(()) }
/// ```
#[allow(clippy::too_many_arguments)]
pub fn forward(
    gpu: &GpuContext,
    stream: &CudaStream,
    x: &impl DevicePtr<bf16>,
    gamma: &impl DevicePtr<f32>,
    beta: &impl DevicePtr<f32>,
    y: &mut impl DevicePtrMut<bf16>,
    mean: &mut impl DevicePtrMut<f32>,
    rstd: &mut impl DevicePtrMut<f32>,
    rows: usize,
    d: usize,
    eps: f64,
) -> Result<(), GpuError> {
    const OP: &str = "layernorm forward";
    check_shape(OP, rows, d)?;
    check_len(OP, "x", x, rows * d)?;
    check_len(OP, "y", y, rows * d)?;
    check_len(OP, "gamma", gamma, d)?;
    check_len(OP, "beta", beta, d)?;
    check_len(OP, "mean", mean, rows)?;
    check_len(OP, "rstd", rstd, rows)?;
    if rows == 0 {
        return Ok(());
    }
    let (xp, _g1) = x.device_ptr(stream);
    let (gp, _g2) = gamma.device_ptr(stream);
    let (bp, _g3) = beta.device_ptr(stream);
    let (yp, _g4) = y.device_ptr_mut(stream);
    let (mp, _g5) = mean.device_ptr_mut(stream);
    let (rp, _g6) = rstd.device_ptr_mut(stream);
    let vec = d.is_multiple_of(8) && [xp, gp, bp, yp].iter().all(|&p| aligned(p, 16));
    let name = kernel_name(true, vec, d);
    let f = gpu.function("layernorm", name)?;
    let (rows32, d32, eps32) = (rows as u32, d as u32, eps as f32);
    let mut l = stream.launch_builder(&f);
    l.arg(&xp).arg(&gp).arg(&bp).arg(&yp).arg(&mp).arg(&rp).arg(&rows32).arg(&d32).arg(&eps32);
    // SAFETY: lengths checked above; the v8 kernel only runs on 16-byte aligned rows.
    unsafe { l.launch(row_launch(rows)) }.map_err(GpuError::driver(format!("launching {name}")))?;
    Ok(())
}

/// Input gradient `dx (+)= rstd (g - mean(g) - xhat mean(g xhat))`, `g = dy gamma`, from the
/// forward's saved `mean`/`rstd`; `accumulate` adds onto `dx` (a residual stream's gradient).
/// The twin of [`super::cpu::backward`].
#[allow(clippy::too_many_arguments)]
pub fn backward(
    gpu: &GpuContext,
    stream: &CudaStream,
    dy: &impl DevicePtr<bf16>,
    x: &impl DevicePtr<bf16>,
    gamma: &impl DevicePtr<f32>,
    mean: &impl DevicePtr<f32>,
    rstd: &impl DevicePtr<f32>,
    dx: &mut impl DevicePtrMut<bf16>,
    rows: usize,
    d: usize,
    accumulate: bool,
) -> Result<(), GpuError> {
    const OP: &str = "layernorm backward";
    check_shape(OP, rows, d)?;
    check_len(OP, "dy", dy, rows * d)?;
    check_len(OP, "x", x, rows * d)?;
    check_len(OP, "dx", dx, rows * d)?;
    check_len(OP, "gamma", gamma, d)?;
    check_len(OP, "mean", mean, rows)?;
    check_len(OP, "rstd", rstd, rows)?;
    if rows == 0 {
        return Ok(());
    }
    let (dyp, _g1) = dy.device_ptr(stream);
    let (xp, _g2) = x.device_ptr(stream);
    let (gp, _g3) = gamma.device_ptr(stream);
    let (mp, _g4) = mean.device_ptr(stream);
    let (rp, _g5) = rstd.device_ptr(stream);
    let (dxp, _g6) = dx.device_ptr_mut(stream);
    let vec = d.is_multiple_of(8) && [dyp, xp, gp, dxp].iter().all(|&p| aligned(p, 16));
    let name = kernel_name(false, vec, d);
    let f = gpu.function("layernorm", name)?;
    let (rows32, d32, acc) = (rows as u32, d as u32, accumulate as i32);
    let mut l = stream.launch_builder(&f);
    l.arg(&dyp).arg(&xp).arg(&gp).arg(&mp).arg(&rp).arg(&dxp).arg(&rows32).arg(&d32).arg(&acc);
    // SAFETY: lengths checked above; the v8 kernel only runs on 16-byte aligned rows.
    unsafe { l.launch(row_launch(rows)) }.map_err(GpuError::driver(format!("launching {name}")))?;
    Ok(())
}
