//! GPU launchers of the casts (`kernels/cast.cu`): four elements per step when the buffers are
//! aligned for it, one otherwise.

use crate::gpu::kernels::cast;
use crate::gpu::launch::{aligned, check_len, grid_stride_blocks, BLOCK};
use crate::gpu::{bf16, CudaStream, DevicePtr, DevicePtrMut, GpuContext, GpuError, Kernel};
use cudarc::driver::{LaunchConfig, PushKernelArg};

fn launch(gpu: &GpuContext, stream: &CudaStream, name: Kernel, xp: u64, yp: u64, n: usize, vec: bool) -> Result<(), GpuError> {
    if n == 0 {
        return Ok(());
    }
    let f = gpu.kernel(name)?;
    let n64 = n as u64;
    let items = if vec { n64.div_ceil(4) } else { n64 };
    let cfg = LaunchConfig {
        grid_dim: (grid_stride_blocks(gpu, items, BLOCK as u64), 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut l = stream.launch_builder(&f);
    l.arg(&xp).arg(&yp).arg(&n64);
    // SAFETY: the caller checked both buffers hold n elements (and the alignment for `_v4`).
    unsafe { l.launch(cfg) }.map_err(GpuError::driver(format!("launching {name}")))?;
    Ok(())
}

/// `y[i] = bf16(x[i])` for `i < n`, round to nearest even (as [`super::cpu::f32_to_bf16`]).
///
/// ```
/// use mlvpt::gpu::{bf16, GpuContext};
/// use mlvpt::ops::cast;
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let x = [1.0f32, 1.0 + 1.0 / 256.0, -3.3, 1e-40, f32::INFINITY];
/// let mut y = gpu.zeros::<bf16>(x.len())?;
/// cast::cuda::f32_to_bf16(&gpu, gpu.stream(), &gpu.upload(&x)?, &mut y, x.len())?;
/// let mut want = vec![bf16::ZERO; x.len()];
/// cast::cpu::f32_to_bf16(&x, &mut want); // the CPU twin: the same bits
/// assert_eq!(gpu.download(&y)?, want);
/// # Ok(()) }
/// ```
pub fn f32_to_bf16(
    gpu: &GpuContext,
    stream: &CudaStream,
    x: &impl DevicePtr<f32>,
    y: &mut impl DevicePtrMut<bf16>,
    n: usize,
) -> Result<(), GpuError> {
    check_len("cast f32->bf16", "x", x, n)?;
    check_len("cast f32->bf16", "y", y, n)?;
    let (xp, _gx) = x.device_ptr(stream);
    let (yp, _gy) = y.device_ptr_mut(stream);
    let vec = aligned(xp, 16) && aligned(yp, 8);
    launch(
        gpu,
        stream,
        if vec { cast::CAST_F32_BF16_V4 } else { cast::CAST_F32_BF16 },
        xp,
        yp,
        n,
        vec,
    )
}

/// `y[i] = f32(x[i])` for `i < n` (exact).
///
/// ```
/// use mlvpt::gpu::{bf16, GpuContext};
/// use mlvpt::ops::cast;
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let x: Vec<bf16> = [0.5f32, -2.0, 3.140625].iter().map(|&v| bf16::from_f32(v)).collect();
/// let mut y = gpu.zeros::<f32>(3)?;
/// cast::cuda::bf16_to_f32(&gpu, gpu.stream(), &gpu.upload(&x)?, &mut y, 3)?;
/// assert_eq!(gpu.download(&y)?, [0.5, -2.0, 3.140625]);
/// # Ok(()) }
/// ```
pub fn bf16_to_f32(
    gpu: &GpuContext,
    stream: &CudaStream,
    x: &impl DevicePtr<bf16>,
    y: &mut impl DevicePtrMut<f32>,
    n: usize,
) -> Result<(), GpuError> {
    check_len("cast bf16->f32", "x", x, n)?;
    check_len("cast bf16->f32", "y", y, n)?;
    let (xp, _gx) = x.device_ptr(stream);
    let (yp, _gy) = y.device_ptr_mut(stream);
    let vec = aligned(xp, 8) && aligned(yp, 16);
    launch(
        gpu,
        stream,
        if vec { cast::CAST_BF16_F32_V4 } else { cast::CAST_BF16_F32 },
        xp,
        yp,
        n,
        vec,
    )
}
