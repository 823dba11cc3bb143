//! GPU launchers of the linear layer: `y = x W^T + b` and its input and weight gradients on
//! cuBLAS ([`GpuContext::gemm`]), the bias broadcast by `kernels/linear.cu`. The twins of
//! [`super::cpu`].

use super::LinearShape;
use crate::gpu::kernels::linear;
use crate::gpu::launch::{check_cols, check_len, grid_stride_blocks, BLOCK};
use crate::gpu::{DevicePtr, DevicePtrMut, GemmType, GpuContext, GpuError};
use crate::ops::Grad;
use cudarc::cublas::sys::cudaDataType;
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// `y[rows, d_out] = x[rows, d_in] w[d_out, d_in]^T + bias[d_out]` (a linear layer; `w`
/// row-major as PyTorch stores it). The bias (f32) is broadcast into `y` first and the product
/// added with beta = 1, so a bf16 `y` sees the bias rounded to bf16 once.
///
/// ```
/// use mlvpt::gpu::GpuContext;
/// use mlvpt::ops::linear::{self, LinearShape};
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let sh = LinearShape { rows: 3, d_in: 4, d_out: 2 };
/// let x: Vec<f32> = (0..sh.rows * sh.d_in).map(|i| i as f32 * 0.25 - 1.0).collect();
/// let w: Vec<f32> = (0..sh.d_out * sh.d_in).map(|i| 0.5 - i as f32 * 0.125).collect();
/// let b = [0.1f32, -0.2];
/// let mut y = gpu.zeros::<f32>(sh.rows * sh.d_out)?;
/// linear::cuda::forward::<f32, f32>(&gpu, &gpu.upload(&x)?, &gpu.upload(&w)?, Some(&gpu.upload(&b)?), &mut y, &sh)?;
/// let mut want = vec![0.0f32; sh.rows * sh.d_out];
/// linear::cpu::forward(&x, &w, Some(&b[..]), &mut want, &sh); // the CPU twin
/// for (g, c) in gpu.download(&y)?.iter().zip(&want) {
///     assert!((g - c).abs() < 1e-5, "{g} vs {c}");
/// }
/// # Ok(()) }
/// ```
pub fn forward<T: GemmType, O: GemmType>(
    gpu: &GpuContext,
    x: &impl DevicePtr<T>,
    w: &impl DevicePtr<T>,
    bias: Option<&dyn DevicePtr<f32>>,
    y: &mut impl DevicePtrMut<O>,
    sh: &LinearShape,
) -> Result<(), GpuError> {
    let &LinearShape { rows, d_in, d_out } = sh;
    let mut beta = 0.0;
    if let Some(b) = bias {
        bias_rows(gpu, b, y, rows, d_out)?;
        beta = 1.0;
    }
    gpu.gemm(false, true, rows, d_out, d_in, 1.0, x, w, beta, y)
}

/// `dx[rows, d_in] (+)= dy[rows, d_out] w[d_out, d_in]`: the input gradient of [`forward`]
/// (`Grad::Add` accumulates).
///
/// ```
/// use mlvpt::gpu::GpuContext;
/// use mlvpt::ops::linear::{self, LinearShape};
/// use mlvpt::ops::Grad;
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let sh = LinearShape { rows: 3, d_in: 4, d_out: 2 };
/// let dy: Vec<f32> = (0..sh.rows * sh.d_out).map(|i| i as f32 - 2.0).collect();
/// let w: Vec<f32> = (0..sh.d_out * sh.d_in).map(|i| 0.5 - i as f32 * 0.125).collect();
/// let mut dx = gpu.zeros::<f32>(sh.rows * sh.d_in)?;
/// linear::cuda::backward_input::<f32, f32>(&gpu, &gpu.upload(&dy)?, &gpu.upload(&w)?, Grad::Write(&mut dx), &sh)?;
/// let mut want = vec![0.0f32; sh.rows * sh.d_in];
/// linear::cpu::backward_input(&dy, &w, Grad::Write(&mut want[..]), &sh); // the CPU twin
/// for (g, c) in gpu.download(&dx)?.iter().zip(&want) {
///     assert!((g - c).abs() < 1e-5, "{g} vs {c}");
/// }
/// # Ok(()) }
/// ```
pub fn backward_input<T: GemmType, O: GemmType>(
    gpu: &GpuContext,
    dy: &impl DevicePtr<T>,
    w: &impl DevicePtr<T>,
    dx: Grad<&mut impl DevicePtrMut<O>>,
    sh: &LinearShape,
) -> Result<(), GpuError> {
    let beta = if dx.accumulates() { 1.0 } else { 0.0 };
    gpu.gemm(false, false, sh.rows, sh.d_in, sh.d_out, 1.0, dy, w, beta, dx.into_inner())
}

/// `dw[d_out, d_in] (+)= dy[rows, d_out]^T x[rows, d_in]`: the weight gradient of [`forward`]
/// (`Grad::Add` accumulates).
///
/// ```
/// use mlvpt::gpu::GpuContext;
/// use mlvpt::ops::{linear::LinearShape, Grad};
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// // dw [d_out=1, d_in=2] = dy [rows=2, 1]^T x [2, 2]
/// let sh = LinearShape { rows: 2, d_in: 2, d_out: 1 };
/// let (dy, x) = (gpu.upload(&[1.0f32, -2.0])?, gpu.upload(&[3.0f32, 4.0, 5.0, 6.0])?);
/// let mut dw = gpu.upload(&[100.0f32, 200.0])?;
/// mlvpt::ops::linear::cuda::backward_weight::<f32, f32>(&gpu, &dy, &x, Grad::Write(&mut dw), &sh)?;
/// assert_eq!(gpu.download(&dw)?, [1.0 * 3.0 - 2.0 * 5.0, 1.0 * 4.0 - 2.0 * 6.0]);
/// mlvpt::ops::linear::cuda::backward_weight::<f32, f32>(&gpu, &dy, &x, Grad::Add(&mut dw), &sh)?; // twice
/// assert_eq!(gpu.download(&dw)?, [-14.0, -16.0]);
/// # Ok(()) }
/// ```
pub fn backward_weight<T: GemmType, O: GemmType>(
    gpu: &GpuContext,
    dy: &impl DevicePtr<T>,
    x: &impl DevicePtr<T>,
    dw: Grad<&mut impl DevicePtrMut<O>>,
    sh: &LinearShape,
) -> Result<(), GpuError> {
    let beta = if dw.accumulates() { 1.0 } else { 0.0 };
    gpu.gemm(true, false, sh.d_out, sh.d_in, sh.rows, 1.0, dy, x, beta, dw.into_inner())
}

/// `y[r, c] = bias[c]` for `rows` rows of `cols` (kernels/linear.cu).
fn bias_rows<O: GemmType>(
    gpu: &GpuContext,
    bias: &dyn DevicePtr<f32>,
    y: &mut impl DevicePtrMut<O>,
    rows: usize,
    cols: usize,
) -> Result<(), GpuError> {
    const OP: &str = "linear_forward";
    check_len(OP, "bias", bias, cols)?;
    check_len(OP, "y", y, rows * cols)?;
    let n = (rows * cols) as u64;
    if n == 0 {
        return Ok(());
    }
    let f = gpu.kernel(if O::DATA_TYPE == cudaDataType::CUDA_R_16BF {
        linear::BIAS_ROWS_BF16
    } else {
        linear::BIAS_ROWS_F32
    })?;
    let stream = gpu.stream();
    let (bp, _gb) = bias.device_ptr(stream);
    let (yp, _gy) = y.device_ptr_mut(stream);
    let cols32 = check_cols(OP, cols)?;
    let cfg = LaunchConfig {
        grid_dim: (grid_stride_blocks(gpu, n, BLOCK as u64), 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut l = stream.launch_builder(&f);
    l.arg(&bp).arg(&yp).arg(&n).arg(&cols32);
    // SAFETY: lengths checked above; the kernel writes y[0..n) and reads bias[0..cols).
    unsafe { l.launch(cfg) }.map_err(GpuError::driver("launching bias_rows"))?;
    Ok(())
}
