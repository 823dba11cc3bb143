//! GPU launchers of the linear layer: `y = x W^T + b` and its input and weight gradients on
//! cuBLAS ([`GpuContext::gemm`]), the bias broadcast by `kernels/linear.cu`. The twins of
//! [`super::cpu`].

use crate::gpu::kernels::linear;
use crate::gpu::launch::{check_cols, check_len, grid_stride_blocks, BLOCK};
use crate::gpu::{DevicePtr, DevicePtrMut, GemmType, GpuContext, GpuError};
use cudarc::cublas::sys::cudaDataType;
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// `y[m, n] = x[m, k] w[n, k]^T + bias[n]` (a linear layer; `w` row-major as PyTorch stores
/// it). The bias (f32) is broadcast into `y` first and the product added with beta = 1, so a
/// bf16 `y` sees the bias rounded to bf16 once. Without a bias, `accumulate` adds to `y`.
///
/// ```
/// use mlvpt::gpu::GpuContext;
/// use mlvpt::ops::linear;
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let (m, n, k) = (3, 2, 4);
/// let x: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.25 - 1.0).collect();
/// let w: Vec<f32> = (0..n * k).map(|i| 0.5 - i as f32 * 0.125).collect();
/// let b = [0.1f32, -0.2];
/// let mut y = gpu.zeros::<f32>(m * n)?;
/// linear::cuda::forward::<f32, f32>(&gpu, &gpu.upload(&x)?, &gpu.upload(&w)?, Some(&gpu.upload(&b)?), &mut y, m, n, k, false)?;
/// let mut want = vec![0.0f32; m * n];
/// linear::cpu::forward(&x, &w, Some(&b[..]), &mut want, m, k, n); // the CPU twin
/// for (g, c) in gpu.download(&y)?.iter().zip(&want) {
///     assert!((g - c).abs() < 1e-5, "{g} vs {c}");
/// }
/// # Ok(()) }
/// ```
#[allow(clippy::too_many_arguments)]
pub fn forward<T: GemmType, O: GemmType>(
    gpu: &GpuContext,
    x: &impl DevicePtr<T>,
    w: &impl DevicePtr<T>,
    bias: Option<&dyn DevicePtr<f32>>,
    y: &mut impl DevicePtrMut<O>,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
) -> Result<(), GpuError> {
    let mut beta = if accumulate { 1.0 } else { 0.0 };
    if let Some(b) = bias {
        if accumulate {
            return Err(GpuError::invalid(
                "linear_forward",
                "a bias and accumulate together are not supported",
            ));
        }
        bias_rows(gpu, b, y, m, n)?;
        beta = 1.0;
    }
    gpu.gemm(false, true, m, n, k, 1.0, x, w, beta, y)
}

/// `dx[m, k] (+)= dy[m, n] w[n, k]`: the input gradient of [`forward`].
///
/// ```
/// use mlvpt::gpu::GpuContext;
/// use mlvpt::ops::linear;
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let (m, n, k) = (3, 2, 4);
/// let dy: Vec<f32> = (0..m * n).map(|i| i as f32 - 2.0).collect();
/// let w: Vec<f32> = (0..n * k).map(|i| 0.5 - i as f32 * 0.125).collect();
/// let mut dx = gpu.zeros::<f32>(m * k)?;
/// linear::cuda::backward_input::<f32, f32>(&gpu, &gpu.upload(&dy)?, &gpu.upload(&w)?, &mut dx, m, n, k, false)?;
/// let mut want = vec![0.0f32; m * k];
/// linear::cpu::backward_input(&dy, &w, &mut want, m, k, n, false); // the CPU twin
/// for (g, c) in gpu.download(&dx)?.iter().zip(&want) {
///     assert!((g - c).abs() < 1e-5, "{g} vs {c}");
/// }
/// # Ok(()) }
/// ```
#[allow(clippy::too_many_arguments)]
pub fn backward_input<T: GemmType, O: GemmType>(
    gpu: &GpuContext,
    dy: &impl DevicePtr<T>,
    w: &impl DevicePtr<T>,
    dx: &mut impl DevicePtrMut<O>,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
) -> Result<(), GpuError> {
    gpu.gemm(false, false, m, k, n, 1.0, dy, w, if accumulate { 1.0 } else { 0.0 }, dx)
}

/// `dw[n, k] (+)= dy[m, n]^T x[m, k]`: the weight gradient of [`forward`].
///
/// ```
/// use mlvpt::gpu::GpuContext;
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// // dw [n=1, k=2] = dy [m=2, 1]^T x [2, 2]
/// let (dy, x) = (gpu.upload(&[1.0f32, -2.0])?, gpu.upload(&[3.0f32, 4.0, 5.0, 6.0])?);
/// let mut dw = gpu.upload(&[100.0f32, 200.0])?;
/// mlvpt::ops::linear::cuda::backward_weight::<f32, f32>(&gpu, &dy, &x, &mut dw, 2, 1, 2, false)?;
/// assert_eq!(gpu.download(&dw)?, [1.0 * 3.0 - 2.0 * 5.0, 1.0 * 4.0 - 2.0 * 6.0]);
/// mlvpt::ops::linear::cuda::backward_weight::<f32, f32>(&gpu, &dy, &x, &mut dw, 2, 1, 2, true)?; // accumulate: twice
/// assert_eq!(gpu.download(&dw)?, [-14.0, -16.0]);
/// # Ok(()) }
/// ```
#[allow(clippy::too_many_arguments)]
pub fn backward_weight<T: GemmType, O: GemmType>(
    gpu: &GpuContext,
    dy: &impl DevicePtr<T>,
    x: &impl DevicePtr<T>,
    dw: &mut impl DevicePtrMut<O>,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
) -> Result<(), GpuError> {
    gpu.gemm(true, false, n, k, m, 1.0, dy, x, if accumulate { 1.0 } else { 0.0 }, dw)
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
