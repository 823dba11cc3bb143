//! GPU launcher of the ASL op (`kernels/asl.cu`): loss and gradient in one launch, fused with
//! the sigmoid, the loss summed by a deterministic two-level block reduction.

use super::AslConfig;
use crate::gpu::kernels::asl;
use crate::gpu::launch::{check_len, grid_stride_blocks, BLOCK};
use crate::gpu::view::check_dense;
use crate::gpu::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, GpuContext, GpuError, Tensor};
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// Most blocks one ASL launch uses (the size of the workspace's partial sums).
///
/// ```
/// use mlvpt::ops::asl::cuda::MAX_BLOCKS;
/// assert_eq!(MAX_BLOCKS, 1024); // partial sums in an AslWorkspace
/// ```
pub const MAX_BLOCKS: u32 = 1024;

/// Scratch an ASL launch needs: one partial sum per block and the counter that elects the block
/// which adds them. The kernel resets the counter, so one workspace serves any number of
/// launches in order on one stream (not concurrent launches on different streams).
///
/// ```
/// use mlvpt::gpu::GpuContext;
/// use mlvpt::ops::asl::{asl_forward_backward, cuda, AslConfig};
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let cfg = AslConfig::default();
/// let mut ws = cuda::AslWorkspace::new(&gpu)?; // made once, used by every launch in order
/// let targets = gpu.upload(&[1.0f32, 0.0, 0.0, 1.0])?;
/// let mut loss = gpu.zeros::<f32>(1)?;
/// for logits in [[0.5f32, -1.0, 2.0, 0.0], [3.0, -3.0, 0.5, 1.5]] {
///     cuda::forward_backward(&gpu, gpu.stream(), &mut ws, &gpu.upload(&logits)?, &targets, &cfg, 1.0, None, &mut loss, 4)?;
///     let want = asl_forward_backward(&logits, &[1.0, 0.0, 0.0, 1.0], &cfg, None);
///     assert!((gpu.download(&loss)?[0] - want).abs() <= 1e-5 * want.abs(), "{want}");
/// }
/// # Ok(()) }
/// ```
pub struct AslWorkspace {
    partials: CudaSlice<f64>,
    counter: CudaSlice<u32>,
}

impl AslWorkspace {
    /// Allocates the workspace on `gpu`'s stream.
    ///
    /// ```
    /// use mlvpt::gpu::GpuContext;
    /// use mlvpt::ops::asl::cuda::AslWorkspace;
    /// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
    /// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let gpu = GpuContext::new(0)?;
    /// let ws = AslWorkspace::new(&gpu)?; // about 8 KB of device memory
    /// # drop(ws);
    /// # Ok(()) }
    /// ```
    pub fn new(gpu: &GpuContext) -> Result<Self, GpuError> {
        Ok(Self {
            partials: gpu.zeros(MAX_BLOCKS as usize)?,
            counter: gpu.zeros(1)?,
        })
    }
}

/// ASL over `n` logits (f32) against targets (f32, 0/1 or in [0, 1]): writes
/// `loss[0] = scale * sum_i l_i` and, if `grad` is given, `grad[i] = scale * dl_i/dx_i`, the
/// same function as the CPU reference [`super::asl_forward_backward`] times `scale`.
///
/// ```
/// use mlvpt::gpu::{GpuContext, GpuError};
/// use mlvpt::ops::asl::{cuda, AslConfig};
/// # fn main() -> Result<(), GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let logits = gpu.upload(&[2.0f32, -1.0, 0.5])?;
/// let targets = gpu.upload(&[1.0f32, 0.0, 1.0])?;
/// let mut grad = gpu.zeros::<f32>(3)?;
/// let mut loss = gpu.zeros::<f32>(1)?;
/// let mut ws = cuda::AslWorkspace::new(&gpu)?;
/// cuda::forward_backward(&gpu, gpu.stream(), &mut ws, &logits, &targets, &AslConfig::default(),
///                        1.0, Some(&mut grad), &mut loss, 3)?;
/// println!("loss {}", gpu.download(&loss)?[0]);
/// # Ok(()) }
/// ```
#[allow(clippy::too_many_arguments)]
pub fn forward_backward<'a>(
    gpu: &GpuContext,
    stream: &CudaStream,
    ws: &mut AslWorkspace,
    logits: &'a impl DevicePtr<f32>,
    targets: &impl DevicePtr<f32>,
    cfg: &AslConfig,
    scale: f32,
    grad: Option<&'a mut dyn DevicePtrMut<f32>>,
    loss: &mut impl DevicePtrMut<f32>,
    n: usize,
) -> Result<(), GpuError> {
    // One term of the multi-term kernel: the same launch shape and summation order.
    let mut terms = [AslTerm { logits, grad }];
    forward_backward_terms(gpu, stream, ws, &mut terms, targets, cfg, scale, loss, n)
}

/// One term of [`forward_backward_terms`]: its logits and, optionally, where its gradient goes.
///
/// ```
/// use mlvpt::gpu::{DevicePtrMut, GpuContext};
/// use mlvpt::ops::asl::{cuda, AslConfig};
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let (pos, neg) = (gpu.upload(&[1.0f32, -2.0])?, gpu.upload(&[0.5f32, 0.25])?);
/// let mut dpos = gpu.zeros::<f32>(2)?;
/// // Two logit buffers against the same targets; a gradient for the first only.
/// let mut terms = [
///     cuda::AslTerm { logits: &pos, grad: Some(&mut dpos as &mut dyn DevicePtrMut<f32>) },
///     cuda::AslTerm { logits: &neg, grad: None },
/// ];
/// let (targets, mut loss) = (gpu.upload(&[1.0f32, 0.0])?, gpu.zeros::<f32>(1)?);
/// let mut ws = cuda::AslWorkspace::new(&gpu)?;
/// cuda::forward_backward_terms(&gpu, gpu.stream(), &mut ws, &mut terms, &targets, &AslConfig::default(), 1.0, &mut loss, 2)?;
/// assert!(gpu.download(&loss)?[0] > 0.0);
/// # Ok(()) }
/// ```
pub struct AslTerm<'a> {
    pub logits: &'a dyn DevicePtr<f32>,
    pub grad: Option<&'a mut dyn DevicePtrMut<f32>>,
}

/// Most terms one [`forward_backward_terms`] launch takes (the training loss has four).
///
/// ```
/// use mlvpt::ops::asl::cuda::MAX_TERMS;
/// assert_eq!(MAX_TERMS, 4); // the training loss's four terms in one launch
/// ```
pub const MAX_TERMS: usize = crate::contract::asl::ASL_MAX_TERMS;

/// ASL of up to [`MAX_TERMS`] logit buffers (`n` each) against the same targets in one launch:
/// `loss[0] = scale * sum over terms and elements`, and each term's `grad[i] = scale * dl/dx_i`
/// where given. The training loss `ASL(y+) + ASL(y-) + ASL(m+) + ASL(m-)`
/// (docs/MODEL.md#the-training-loss) is one call with `scale = factor / (B K)`; per term it is
/// [`forward_backward`].
///
/// ```
/// use mlvpt::gpu::{DevicePtrMut, GpuContext};
/// use mlvpt::ops::asl::{asl_forward_backward, cuda, AslConfig};
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let cfg = AslConfig::default();
/// let (y, m, t) = ([2.0f32, -1.0, 0.5], [0.0f32, 1.0, -3.0], [1.0f32, 0.0, 1.0]);
/// let (yd, md, td) = (gpu.upload(&y)?, gpu.upload(&m)?, gpu.upload(&t)?);
/// let (mut dy, mut dm, mut loss) = (gpu.zeros::<f32>(3)?, gpu.zeros::<f32>(3)?, gpu.zeros::<f32>(1)?);
/// let scale = 0.5;
/// let mut terms = [
///     cuda::AslTerm { logits: &yd, grad: Some(&mut dy as &mut dyn DevicePtrMut<f32>) },
///     cuda::AslTerm { logits: &md, grad: Some(&mut dm as &mut dyn DevicePtrMut<f32>) },
/// ];
/// let mut ws = cuda::AslWorkspace::new(&gpu)?;
/// cuda::forward_backward_terms(&gpu, gpu.stream(), &mut ws, &mut terms, &td, &cfg, scale, &mut loss, 3)?;
/// // The CPU twin per term: the loss is the scaled sum of both, each gradient scaled.
/// let (mut gy, mut gm) = ([0.0f32; 3], [0.0f32; 3]);
/// let want = scale * (asl_forward_backward(&y, &t, &cfg, Some(&mut gy[..])) + asl_forward_backward(&m, &t, &cfg, Some(&mut gm[..])));
/// assert!((gpu.download(&loss)?[0] - want).abs() <= 1e-5 * want.abs());
/// for (got, want) in gpu.download(&dm)?.iter().zip(gm) {
///     assert!((got - scale * want).abs() <= 1e-5 * (1.0 + want.abs()), "{got} vs {want}");
/// }
/// # Ok(()) }
/// ```
#[allow(clippy::too_many_arguments)]
pub fn forward_backward_terms(
    gpu: &GpuContext,
    stream: &CudaStream,
    ws: &mut AslWorkspace,
    terms: &mut [AslTerm<'_>],
    targets: &impl DevicePtr<f32>,
    cfg: &AslConfig,
    scale: f32,
    loss: &mut impl DevicePtrMut<f32>,
    n: usize,
) -> Result<(), GpuError> {
    const OP: &str = "asl (terms)";
    cfg.validate().map_err(|m| GpuError::invalid(OP, m))?;
    if terms.is_empty() || terms.len() > MAX_TERMS {
        return Err(GpuError::invalid(OP, format!("{} terms, expected 1..={MAX_TERMS}", terms.len())));
    }
    check_len(OP, "targets", targets, n)?;
    check_len(OP, "loss", loss, 1)?;
    for (i, t) in terms.iter().enumerate() {
        if t.logits.len() < n {
            return Err(GpuError::invalid(
                OP,
                format!("logits of term {i} have {} elements, need {n}", t.logits.len()),
            ));
        }
        if let Some(g) = t.grad.as_deref() {
            if g.len() < n {
                return Err(GpuError::invalid(
                    OP,
                    format!("grad of term {i} has {} elements, need {n}", g.len()),
                ));
            }
        }
    }
    let f = gpu.kernel(asl::ASL_TERMS_FWD_BWD_F32)?;
    let blocks = grid_stride_blocks(gpu, (n * terms.len()) as u64, BLOCK as u64).min(MAX_BLOCKS);
    let mut arg = crate::contract::asl::AslParams {
        n: n as u64,
        nterms: terms.len() as u32,
        scale,
        ..Default::default()
    };
    let mut guards = Vec::with_capacity(2 * terms.len());
    for (i, t) in terms.iter_mut().enumerate() {
        let (p, g) = t.logits.device_ptr(stream);
        arg.logits[i] = p;
        guards.push(g);
        if let Some(gr) = t.grad.as_deref_mut() {
            let (p, g) = gr.device_ptr_mut(stream);
            arg.grad[i] = p;
            guards.push(g);
        }
    }
    let (tp, _g2) = targets.device_ptr(stream);
    let (pp, _g3) = ws.partials.device_ptr_mut(stream);
    let (cp, _g4) = ws.counter.device_ptr_mut(stream);
    let (op, _g5) = loss.device_ptr_mut(stream);
    (arg.targets, arg.partials, arg.counter, arg.loss_out) = (tp, pp, cp, op);
    (arg.gamma_pos, arg.gamma_neg, arg.clip) = (cfg.gamma_pos as f32, cfg.gamma_neg as f32, cfg.clip as f32);
    arg.log_eps = cfg.eps.ln() as f32;
    arg.exact_grad = cfg.exact_grad as i32;
    let launch = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut l = stream.launch_builder(&f);
    l.arg(&arg);
    // SAFETY: every term's logits (and grad, where given) hold n elements, the targets n, the
    // loss one, `blocks` <= MAX_BLOCKS partials; unused pointer slots are null and never read
    // (nterms bounds them); AslParams is the kernel's one argument (src/contract.rs).
    unsafe { l.launch(launch) }.map_err(GpuError::driver("launching asl_terms_fwd_bwd_f32"))?;
    drop(guards);
    Ok(())
}

/// What [`loss`] returns: the summed loss (one f32 on the device, `scale * sum`) and its
/// gradient with respect to the logits (`scale * dl/dx`, the logits' shape, dense).
///
/// ```
/// use mlvpt::gpu::{GpuContext, Tensor};
/// use mlvpt::ops::asl::{cuda, AslConfig};
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let (logits, targets) = (gpu.upload(&[0.0f32; 4])?, gpu.upload(&[1.0f32, 0.0, 0.0, 1.0])?);
/// let out: cuda::AslOutput = cuda::loss(&gpu, &Tensor::new(&logits, [2, 2]), &Tensor::new(&targets, [2, 2]), &AslConfig::default(), 0.25)?;
/// assert_eq!((out.loss.len(), out.grad.len()), (1, 4));
/// let grad = gpu.download(&out.grad)?; // at p = 1/2: positives pull up, negatives down
/// assert!(grad[0] < 0.0 && grad[1] > 0.0);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct AslOutput {
    pub loss: CudaSlice<f32>,
    pub grad: CudaSlice<f32>,
}

/// The asymmetric loss of a batch in one call: logits and targets `[B, K]` (f32, dense; targets
/// 0/1 or in [0, 1]), the loss `scale * sum_i l_i` and its gradient allocated and returned
/// (for the mean over the batch's labels, `scale = 1 / (B K)`). The twin of
/// [`super::asl_forward_backward`] times `scale`.
///
/// ```
/// use mlvpt::gpu::{GpuContext, Tensor};
/// use mlvpt::ops::asl::{asl_forward_backward, cuda, AslConfig};
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let (x, t) = ([2.0f32, -1.0, 0.5, 3.0, -2.0, 0.0], [1.0f32, 0.0, 1.0, 0.0, 0.0, 1.0]);
/// let (logits, targets) = (gpu.upload(&x)?, gpu.upload(&t)?);
/// let cfg = AslConfig::default();
/// let out = cuda::loss(&gpu, &Tensor::new(&logits, [2, 3]), &Tensor::new(&targets, [2, 3]), &cfg, 1.0)?;
/// let want = asl_forward_backward(&x, &t, &cfg, None);
/// assert!((gpu.download(&out.loss)?[0] - want).abs() < 1e-4 * want.abs().max(1.0));
/// # Ok(()) }
/// ```
pub fn loss(
    gpu: &GpuContext,
    logits: &Tensor<f32, 2>,
    targets: &Tensor<f32, 2>,
    cfg: &AslConfig,
    scale: f32,
) -> Result<AslOutput, GpuError> {
    const OP: &str = "asl";
    let shape = logits.shape();
    check_dense(OP, "logits", logits.layout(), shape, "[B, K]")?;
    check_dense(OP, "targets", targets.layout(), shape, "[B, K], as logits")?;
    let n = shape[0] * shape[1];
    if n == 0 {
        return Err(GpuError::invalid(OP, "no logits: the loss of an empty batch is undefined"));
    }
    let mut out = AslOutput {
        loss: gpu.zeros(1)?,
        grad: gpu.zeros(n)?,
    };
    let mut ws = AslWorkspace::new(gpu)?;
    forward_backward(
        gpu,
        gpu.stream(),
        &mut ws,
        logits,
        targets,
        cfg,
        scale,
        Some(&mut out.grad),
        &mut out.loss,
        n,
    )?;
    Ok(out)
}
