//! GPU launcher of AdamW (`kernels/adamw.cu`): every trainable tensor in one launch (a
//! multi-tensor apply over up to [`MAX_TENSORS`] fp32 tensors, each with its own parameter,
//! gradient and moment buffers), optionally guarded by a device scalar (the loss) so a
//! non-finite loss skips the update without the host reading the loss first.

use super::AdamWConfig;
use crate::contract::adamw::AdamWParams;
use crate::gpu::kernels::adamw;
use crate::gpu::launch::{grid_stride_blocks, BLOCK};
use crate::gpu::{CudaStream, DevicePtr, DevicePtrMut, GpuContext, GpuError};
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// Most tensors one launch takes; more take several launches.
///
/// ```
/// use mlvpt::ops::adamw::cuda::MAX_TENSORS;
/// assert_eq!(MAX_TENSORS, 32);
/// assert_eq!(100usize.div_ceil(MAX_TENSORS), 4); // launches of one step_many over 100 tensors
/// ```
pub const MAX_TENSORS: usize = crate::contract::adamw::ADAMW_MAX_TENSORS;

/// One tensor of [`step_many`]: its first `n` elements are updated.
///
/// ```
/// use mlvpt::gpu::GpuContext;
/// use mlvpt::ops::adamw::{self, cuda::AdamWTensor, AdamWConfig};
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let cfg = AdamWConfig::default();
/// // Two tensors with their own buffers; only the first 2 elements of the second are updated.
/// let (mut p1, g1, mut m1, mut v1) = (gpu.upload(&[1.0f32, -1.0])?, gpu.upload(&[0.5f32, 0.5])?, gpu.zeros::<f32>(2)?, gpu.zeros::<f32>(2)?);
/// let (mut p2, g2, mut m2, mut v2) = (gpu.upload(&[2.0f32, 3.0, 4.0])?, gpu.upload(&[-1.0f32; 3])?, gpu.zeros::<f32>(3)?, gpu.zeros::<f32>(3)?);
/// let mut ts = [
///     AdamWTensor { params: &mut p1, grads: &g1, m: &mut m1, v: &mut v1, n: 2 },
///     AdamWTensor { params: &mut p2, grads: &g2, m: &mut m2, v: &mut v2, n: 2 },
/// ];
/// adamw::cuda::step_many(&gpu, gpu.stream(), &mut ts, 1, 0.1, &cfg, None)?;
/// let (mut p, mut m, mut v) = ([2.0f32, 3.0], [0.0f32; 2], [0.0f32; 2]);
/// adamw::cpu::step(&mut p, &[-1.0, -1.0], &mut m, &mut v, 1, 0.1, &cfg); // the CPU twin
/// let got = gpu.download(&p2)?;
/// assert!((got[0] - p[0]).abs() < 1e-5 * p[0].abs() && (got[1] - p[1]).abs() < 1e-5 * p[1].abs());
/// assert_eq!(got[2], 4.0); // past n: untouched
/// # Ok(()) }
/// ```
pub struct AdamWTensor<'a> {
    pub params: &'a mut dyn DevicePtrMut<f32>,
    pub grads: &'a dyn DevicePtr<f32>,
    pub m: &'a mut dyn DevicePtrMut<f32>,
    pub v: &'a mut dyn DevicePtrMut<f32>,
    pub n: usize,
}

/// One AdamW update at step `step` (1-based) and learning rate `lr` of every tensor in
/// `tensors`, in one launch per [`MAX_TENSORS`]: the twin of [`super::cpu::step`] on each.
/// With `guard`, nothing is written unless `guard[0]` is finite (checked on the device). Bias
/// corrections and `1 - beta` are computed here in f64.
///
/// ```
/// use mlvpt::gpu::{GpuContext, GpuError};
/// use mlvpt::ops::adamw::{cuda, AdamWConfig};
/// # fn main() -> Result<(), GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let (mut p, g) = (gpu.upload(&[1.0f32, 2.0, 3.0])?, gpu.upload(&[0.1f32, -0.2, 0.3])?);
/// let (mut m, mut v) = (gpu.zeros::<f32>(3)?, gpu.zeros::<f32>(3)?);
/// let mut ts = [cuda::AdamWTensor { params: &mut p, grads: &g, m: &mut m, v: &mut v, n: 3 }];
/// cuda::step_many(&gpu, gpu.stream(), &mut ts, 1, 1e-3, &AdamWConfig::default(), None)?;
/// # Ok(()) }
/// ```
#[allow(clippy::too_many_arguments)]
pub fn step_many(
    gpu: &GpuContext,
    stream: &CudaStream,
    tensors: &mut [AdamWTensor<'_>],
    step: u64,
    lr: f64,
    cfg: &AdamWConfig,
    guard: Option<&dyn DevicePtr<f32>>,
) -> Result<(), GpuError> {
    const OP: &str = "adamw";
    cfg.validate().map_err(|e| GpuError::invalid(OP, e))?;
    if step == 0 {
        return Err(GpuError::invalid(OP, "steps count from 1"));
    }
    if !(lr.is_finite() && lr >= 0.0) {
        return Err(GpuError::invalid(OP, format!("learning rate {lr}")));
    }
    for (i, t) in tensors.iter().enumerate() {
        for (what, len) in [
            ("params", t.params.len()),
            ("grads", t.grads.len()),
            ("m", t.m.len()),
            ("v", t.v.len()),
        ] {
            if len < t.n {
                return Err(GpuError::invalid(
                    OP,
                    format!("{what} of tensor {i} has {len} elements, needs {}", t.n),
                ));
            }
        }
    }
    if guard.is_some_and(|g| g.len() == 0) {
        return Err(GpuError::invalid(OP, "the guard buffer is empty"));
    }
    let [decay, step_size, inv_sqrt_bc2, beta1, beta2, eps, one_minus_beta1, one_minus_beta2] = super::kernel_scalars(step, lr, cfg);
    let f = gpu.kernel(adamw::ADAMW_MULTI_F32)?;
    let (gp, _gg) = match guard {
        Some(g) => {
            let (p, guard) = g.device_ptr(stream);
            (p, Some(guard))
        }
        None => (0, None),
    };
    for chunk in tensors.chunks_mut(MAX_TENSORS) {
        let mut table = AdamWParams {
            guard: gp,
            decay,
            step_size,
            inv_sqrt_bc2,
            beta1,
            beta2,
            eps,
            one_minus_beta1,
            one_minus_beta2,
            ..Default::default()
        };
        let count = chunk.len();
        let mut guards = Vec::with_capacity(4 * count);
        let mut total = 0u64;
        for (i, t) in chunk.iter_mut().enumerate() {
            let (p, g1) = t.params.device_ptr_mut(stream);
            let (g, g2) = t.grads.device_ptr(stream);
            let (m, g3) = t.m.device_ptr_mut(stream);
            let (v, g4) = t.v.device_ptr_mut(stream);
            (table.p[i], table.g[i], table.m[i], table.v[i]) = (p, g, m, v);
            guards.extend([g1, g2, g3, g4]);
            table.start[i] = total;
            total += t.n as u64;
        }
        // Unused entries are empty tensors at the end (start = total), never selected.
        for s in &mut table.start[count..] {
            *s = total;
        }
        if total == 0 {
            continue;
        }
        table.count = count as u32;
        let launch = LaunchConfig {
            grid_dim: (grid_stride_blocks(gpu, total, BLOCK as u64), 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut l = stream.launch_builder(&f);
        l.arg(&table);
        // SAFETY: tensor i's four buffers hold at least n_i elements (checked above) and the
        // kernel touches elements start[i]..start[i+1] - start[i] of them; the guard is null or
        // holds one element; AdamWParams is the kernel's one argument (src/contract.rs).
        unsafe { l.launch(launch) }.map_err(GpuError::driver("launching adamw_multi_f32"))?;
        drop(guards);
    }
    Ok(())
}

/// [`step_many`] on one tensor of `n` elements, without a guard.
///
/// ```
/// use mlvpt::gpu::GpuContext;
/// use mlvpt::ops::adamw::{self, AdamWConfig};
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let cfg = AdamWConfig::default();
/// let (p0, g) = ([0.5f32, -0.25, 1.0, 2.0], [0.1f32, 0.2, -0.3, 0.0]);
/// let (mut p, gd) = (gpu.upload(&p0)?, gpu.upload(&g)?);
/// let (mut m, mut v) = (gpu.zeros::<f32>(4)?, gpu.zeros::<f32>(4)?);
/// let (mut pc, mut mc, mut vc) = (p0, [0.0f32; 4], [0.0f32; 4]);
/// for t in 1..=3 {
///     adamw::cuda::step(&gpu, gpu.stream(), &mut p, &gd, &mut m, &mut v, 4, t, 1e-2, &cfg)?;
///     adamw::cpu::step(&mut pc, &g, &mut mc, &mut vc, t, 1e-2, &cfg); // the CPU twin
/// }
/// for (got, want) in gpu.download(&p)?.iter().zip(&pc) {
///     assert!((got - want).abs() < 1e-5 * want.abs().max(1.0), "{got} vs {want}");
/// }
/// # Ok(()) }
/// ```
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
    let mut ts = [AdamWTensor { params, grads, m, v, n }];
    step_many(gpu, stream, &mut ts, step, lr, cfg, None)
}
