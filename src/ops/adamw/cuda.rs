//! GPU launcher of AdamW (`kernels/adamw.cu`) over one flat fp32 buffer holding every
//! trainable tensor (parameters, gradients and both moments laid out alike).

use super::AdamWConfig;
use crate::gpu::launch::{aligned, check_len, grid_stride_blocks, BLOCK};
use crate::gpu::{CudaStream, DevicePtr, DevicePtrMut, GpuContext, GpuError};
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// One AdamW update of the first `n` elements at step `step` (1-based) and learning rate `lr`:
/// the twin of [`super::cpu::step`]. Bias corrections are computed here in f64.
#[allow(clippy::too_many_arguments)]
pub fn step(
    gpu: &GpuContext,
    stream: &CudaStream,
    params: &mut impl DevicePtrMut<f32>,
    grads: &impl DevicePtr<f32>,
    m: &mut impl DevicePtrMut<f32>,
    v: &mut impl DevicePtrMut<f32>,
    n: usize,
    step: u64,
    lr: f64,
    cfg: &AdamWConfig,
) -> Result<(), GpuError> {
    const OP: &str = "adamw";
    cfg.validate().map_err(|e| GpuError::invalid(OP, e))?;
    if step == 0 {
        return Err(GpuError::invalid(OP, "steps count from 1"));
    }
    check_len(OP, "params", params, n)?;
    check_len(OP, "grads", grads, n)?;
    check_len(OP, "m", m, n)?;
    check_len(OP, "v", v, n)?;
    if n == 0 {
        return Ok(());
    }
    let bc1 = 1.0 - cfg.beta1.powf(step as f64);
    let bc2 = 1.0 - cfg.beta2.powf(step as f64);
    let decay = (1.0 - lr * cfg.weight_decay) as f32;
    let step_size = (lr / bc1) as f32;
    let inv_sqrt_bc2 = (1.0 / bc2.sqrt()) as f32;
    let (b1, b2, eps) = (cfg.beta1 as f32, cfg.beta2 as f32, cfg.eps as f32);
    let (omb1, omb2) = ((1.0 - cfg.beta1) as f32, (1.0 - cfg.beta2) as f32);
    let (pp, _g1) = params.device_ptr_mut(stream);
    let (gp, _g2) = grads.device_ptr(stream);
    let (mp, _g3) = m.device_ptr_mut(stream);
    let (vp, _g4) = v.device_ptr_mut(stream);
    let vec = [pp, gp, mp, vp].iter().all(|&p| aligned(p, 16));
    let name = if vec { "adamw_f32_v4" } else { "adamw_f32" };
    let f = gpu.function("adamw", name)?;
    let n64 = n as u64;
    let items = if vec { n64.div_ceil(4) } else { n64 };
    let cfg = LaunchConfig { grid_dim: (grid_stride_blocks(gpu, items, BLOCK as u64), 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    let mut l = stream.launch_builder(&f);
    l.arg(&pp).arg(&gp).arg(&mp).arg(&vp).arg(&n64);
    l.arg(&decay).arg(&step_size).arg(&inv_sqrt_bc2).arg(&b1).arg(&b2).arg(&eps).arg(&omb1).arg(&omb2);
    // SAFETY: all four buffers hold n elements; `_v4` only runs on 16-byte aligned buffers.
    unsafe { l.launch(cfg) }.map_err(GpuError::driver(format!("launching {name}")))?;
    Ok(())
}
