//! GPU launchers of bias + exact GELU (`kernels/gelu.cu`) over a row-major bf16 `[rows, cols]`
//! matrix with an optional fp32 bias per column: the fused epilogue of a linear layer.

use crate::gpu::kernels::gelu;
use crate::gpu::launch::{aligned, check_cols, check_len, grid_stride_blocks, BLOCK};
use crate::gpu::{bf16, CudaStream, DevicePtr, DevicePtrMut, GpuContext, GpuError};
use crate::ops::Rows;
use cudarc::driver::{LaunchConfig, PushKernelArg};

struct Args {
    rows: u64,
    cols: u32,
    vec: bool,
}

fn shape(op: &'static str, rows: usize, cols: usize, ptrs: &[u64], bias: u64) -> Result<Args, GpuError> {
    let cols32 = check_cols(op, cols)?;
    let vec = cols.is_multiple_of(8) && ptrs.iter().all(|&p| aligned(p, 16)) && aligned(bias, 16);
    Ok(Args {
        rows: rows as u64,
        cols: cols32,
        vec,
    })
}

fn config(gpu: &GpuContext, a: &Args) -> LaunchConfig {
    let n = a.rows * a.cols as u64;
    let items = if a.vec { n / 8 } else { n };
    LaunchConfig {
        grid_dim: (grid_stride_blocks(gpu, items, BLOCK as u64), 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `y = gelu(x + bias[col])` (exact erf, fp32 math, bf16 result); `x` is the pre-bias input
/// (e.g. a GEMM output), which [`backward`] needs again. The twin of
/// [`super::cpu::forward`] applied to `x + bias`.
///
/// ```
/// use mlvpt::gpu::{bf16, GpuContext};
/// use mlvpt::ops::gelu;
/// use mlvpt::ops::Rows;
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let (rows, cols) = (2, 8);
/// let x: Vec<f32> = (0..rows * cols).map(|i| i as f32 * 0.25 - 2.0).collect();
/// let b: Vec<f32> = (0..cols).map(|j| j as f32 * 0.1).collect();
/// let x16: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
/// let mut y = gpu.zeros::<bf16>(rows * cols)?;
/// gelu::cuda::forward(&gpu, gpu.stream(), &gpu.upload(&x16)?, Some(&gpu.upload(&b)?), &mut y, Rows { rows, dim: cols })?;
/// for (i, got) in gpu.download(&y)?.iter().enumerate() {
///     let want = gelu::cpu::gelu(x16[i].to_f64() + b[i % cols] as f64); // the CPU twin on x + b
///     assert!((got.to_f64() - want).abs() <= 1e-2 * want.abs() + 1e-3, "{i}: {got} vs {want}");
/// }
/// # Ok(()) }
/// ```
pub fn forward(
    gpu: &GpuContext,
    stream: &CudaStream,
    x: &impl DevicePtr<bf16>,
    bias: Option<&dyn DevicePtr<f32>>,
    y: &mut impl DevicePtrMut<bf16>,
    sh: Rows,
) -> Result<(), GpuError> {
    let Rows { rows, dim: cols } = sh;
    const OP: &str = "gelu forward";
    check_len(OP, "x", x, rows * cols)?;
    check_len(OP, "y", y, rows * cols)?;
    if let Some(b) = bias {
        check_len(OP, "bias", b, cols)?;
    }
    if rows * cols == 0 {
        return Ok(());
    }
    let (xp, _g1) = x.device_ptr(stream);
    let (yp, _g2) = y.device_ptr_mut(stream);
    let (bp, _g3) = match bias {
        Some(b) => {
            let (p, g) = b.device_ptr(stream);
            (p, Some(g))
        }
        None => (0, None),
    };
    let a = shape(OP, rows, cols, &[xp, yp], bp)?;
    let name = if a.vec {
        gelu::GELU_BIAS_FWD_BF16_V8
    } else {
        gelu::GELU_BIAS_FWD_BF16
    };
    let f = gpu.kernel(name)?;
    let cfg = config(gpu, &a);
    let mut l = stream.launch_builder(&f);
    l.arg(&xp).arg(&bp).arg(&yp).arg(&a.rows).arg(&a.cols);
    // SAFETY: lengths checked above; the v8 kernel only runs on 16-byte aligned data.
    unsafe { l.launch(cfg) }.map_err(GpuError::driver(format!("launching {name}")))?;
    Ok(())
}

/// `dx = dy * gelu'(x + bias[col])`, the gradient with respect to the pre-bias input (and so,
/// summed over rows, to the bias). The twin of [`super::cpu::backward`] applied to `x + bias`;
/// [`backward_in_place`] overwrites `dy` instead, as the CPU twin does.
///
/// ```
/// use mlvpt::gpu::{bf16, GpuContext};
/// use mlvpt::ops::gelu;
/// use mlvpt::ops::Rows;
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let (rows, cols) = (3, 5); // not a multiple of 8: the scalar kernel
/// let x: Vec<bf16> = (0..rows * cols).map(|i| bf16::from_f32(i as f32 * 0.3 - 2.0)).collect();
/// let dy: Vec<bf16> = (0..rows * cols).map(|i| bf16::from_f32(1.0 - i as f32 * 0.1)).collect();
/// let mut dx = gpu.zeros::<bf16>(rows * cols)?;
/// gelu::cuda::backward(&gpu, gpu.stream(), &gpu.upload(&x)?, None, &gpu.upload(&dy)?, &mut dx, Rows { rows, dim: cols })?;
/// for (i, got) in gpu.download(&dx)?.iter().enumerate() {
///     let want = dy[i].to_f64() * gelu::cpu::gelu_grad(x[i].to_f64());
///     assert!((got.to_f64() - want).abs() <= 1e-2 * want.abs() + 1e-3, "{i}: {got} vs {want}");
/// }
/// # Ok(()) }
/// ```
pub fn backward(
    gpu: &GpuContext,
    stream: &CudaStream,
    x: &impl DevicePtr<bf16>,
    bias: Option<&dyn DevicePtr<f32>>,
    dy: &impl DevicePtr<bf16>,
    dx: &mut impl DevicePtrMut<bf16>,
    sh: Rows,
) -> Result<(), GpuError> {
    let Rows { rows, dim: cols } = sh;
    check_len("gelu backward", "dy", dy, rows * cols)?;
    check_len("gelu backward", "dx", dx, rows * cols)?;
    let (dyp, _g1) = dy.device_ptr(stream);
    let (dxp, _g2) = dx.device_ptr_mut(stream);
    launch_backward(gpu, stream, x, bias, dyp, dxp, Rows { rows, dim: cols })
}

/// [`backward`] overwriting `d` (dL/dy in, dL/dx out).
///
/// ```
/// use mlvpt::gpu::{bf16, GpuContext};
/// use mlvpt::ops::gelu;
/// use mlvpt::ops::Rows;
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let x = gpu.upload(&[bf16::from_f32(-1.0), bf16::from_f32(0.0), bf16::from_f32(2.0)])?;
/// let mut d = gpu.upload(&[bf16::ONE; 3])?; // dL/dy in, dL/dx out
/// gelu::cuda::backward_in_place(&gpu, gpu.stream(), &x, None, &mut d, Rows { rows: 1, dim: 3 })?;
/// let got: Vec<f64> = gpu.download(&d)?.iter().map(|v| v.to_f64()).collect();
/// for (g, x) in got.iter().zip([-1.0, 0.0, 2.0]) {
///     assert!((g - gelu::cpu::gelu_grad(x)).abs() < 1e-2, "{g}");
/// }
/// assert_eq!(got[1], 0.5); // gelu'(0) = 1/2
/// # Ok(()) }
/// ```
pub fn backward_in_place(
    gpu: &GpuContext,
    stream: &CudaStream,
    x: &impl DevicePtr<bf16>,
    bias: Option<&dyn DevicePtr<f32>>,
    d: &mut impl DevicePtrMut<bf16>,
    sh: Rows,
) -> Result<(), GpuError> {
    let Rows { rows, dim: cols } = sh;
    check_len("gelu backward", "d", d, rows * cols)?;
    let (dp, _g) = d.device_ptr_mut(stream);
    // The kernel reads dy[i] before writing dx[i] in the same thread: aliasing is safe.
    launch_backward(gpu, stream, x, bias, dp, dp, Rows { rows, dim: cols })
}

/// Launches the backward kernel on raw `dy`/`dx` addresses whose lengths the caller checked.
fn launch_backward(
    gpu: &GpuContext,
    stream: &CudaStream,
    x: &impl DevicePtr<bf16>,
    bias: Option<&dyn DevicePtr<f32>>,
    dyp: u64,
    dxp: u64,
    sh: Rows,
) -> Result<(), GpuError> {
    let Rows { rows, dim: cols } = sh;
    const OP: &str = "gelu backward";
    check_len(OP, "x", x, rows * cols)?;
    if let Some(b) = bias {
        check_len(OP, "bias", b, cols)?;
    }
    if rows * cols == 0 {
        return Ok(());
    }
    let (xp, _g1) = x.device_ptr(stream);
    let (bp, _g3) = match bias {
        Some(b) => {
            let (p, g) = b.device_ptr(stream);
            (p, Some(g))
        }
        None => (0, None),
    };
    let a = shape(OP, rows, cols, &[xp, dyp, dxp], bp)?;
    let name = if a.vec {
        gelu::GELU_BIAS_BWD_BF16_V8
    } else {
        gelu::GELU_BIAS_BWD_BF16
    };
    let f = gpu.kernel(name)?;
    let cfg = config(gpu, &a);
    let mut l = stream.launch_builder(&f);
    l.arg(&xp).arg(&bp).arg(&dyp).arg(&dxp).arg(&a.rows).arg(&a.cols);
    // SAFETY: lengths checked above and by the callers; the v8 kernel only runs on 16-byte
    // aligned data.
    unsafe { l.launch(cfg) }.map_err(GpuError::driver(format!("launching {name}")))?;
    Ok(())
}
