//! The CUDA runtime layer (feature `cuda`): a context with one stream, the kernels that build.rs
//! compiled from `kernels/*.cu` and embedded, device buffers, and a cuBLAS GEMM wrapper. It knows
//! nothing of ML-VPT; the typed kernel launchers live beside their CPU twins in
//! `src/ops/<op>/cuda.rs`. See docs/GPU.md.
//!
//! Nothing here needs a GPU to build: cudarc opens libcuda and libcublas when a [`GpuContext`] is
//! made, and a missing driver, device, library or loadable kernel is a [`GpuError`] that says
//! what is missing, never a panic.

mod blas;
mod context;
mod error;
pub mod launch;
pub mod ptxas;
pub(crate) mod view;

pub use blas::GemmType;
pub use context::GpuContext;
pub use error::GpuError;
pub use view::{Layout, Tensor, TensorMut};

/// cudarc, re-exported so callers name the same versions of its types.
///
/// ```
/// use mlvpt::gpu::{cudarc, GpuContext};
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// // cudarc's types as this crate uses them, e.g. to build a context of your own.
/// let ctx: &std::sync::Arc<cudarc::driver::CudaContext> = gpu.context();
/// assert_eq!(ctx.ordinal(), 0);
/// # Ok(()) }
/// ```
pub use cudarc;
/// cudarc's device buffers and the traits the launchers take them by, re-exported.
///
/// A launcher's input is any `&impl DevicePtr<T>` and its output any `&mut impl DevicePtrMut<T>`,
/// so a whole [`CudaSlice`], a [`CudaView`] or [`CudaViewMut`] of part of one, or a [`Tensor`]
/// all go in ([`DeviceSlice`] gives their length; [`CudaStream`] is what the work is queued on).
///
/// ```
/// use mlvpt::gpu::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceSlice, GpuContext, GpuError};
/// use mlvpt::ops::tokens;
/// // Any buffer or view in, any buffer or view out.
/// fn halve(gpu: &GpuContext, x: &impl DevicePtr<f32>, y: &mut impl DevicePtrMut<f32>) -> Result<(), GpuError> {
///     let n = DeviceSlice::len(x);
///     tokens::cuda::axpby::<f32, f32>(gpu, gpu.stream(), 0.0, y, 0.5, x, n)
/// }
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let stream: &std::sync::Arc<CudaStream> = gpu.stream();
/// let x: CudaSlice<f32> = gpu.upload(&[2.0, 4.0, 6.0, 8.0])?;
/// let mut y: CudaSlice<f32> = gpu.zeros(4)?;
/// {
///     let tail: CudaView<f32> = x.slice(2..);
///     let mut head: CudaViewMut<f32> = y.slice_mut(..2);
///     halve(&gpu, &tail, &mut head)?;
/// }
/// assert_eq!(stream.clone_dtoh(&y).map_err(GpuError::driver("reading y"))?, [3.0, 4.0, 0.0, 0.0]);
/// # Ok(()) }
/// ```
pub use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceSlice};
/// The bf16 type the kernels store (`half::bf16`, bit-identical to CUDA's `__nv_bfloat16`).
///
/// ```
/// use mlvpt::gpu::bf16;
/// let x = bf16::from_f32(1.5);
/// assert_eq!(x.to_f32(), 1.5);
/// assert_eq!(bf16::from_f32(1.0 + 1.0 / 512.0), bf16::ONE); // 8 significant bits, round to nearest even
/// ```
pub use half::bf16;

/// A compiled kernel: its module (`kernels/<module>.cu`) and entry function. Every kernel the
/// build compiled has a constant in [`kernels`], generated from nvcc's output, so a launcher
/// cannot name one that does not exist; [`GpuContext::kernel`] loads it.
///
/// ```
/// use mlvpt::gpu::{kernels, GpuContext, Kernel};
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// let k: Kernel = kernels::layernorm::LAYERNORM_FWD_BF16;
/// assert_eq!((k.module, k.name), ("layernorm", "layernorm_fwd_bf16"));
/// assert_eq!(k.to_string(), "layernorm_fwd_bf16");
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let _function = gpu.kernel(k)?; // cudarc's loaded function, for a launch of your own
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Kernel {
    /// The module: the stem of `kernels/<module>.cu`.
    pub module: &'static str,
    /// The `extern "C"` entry function.
    pub name: &'static str,
}

/// The entry function's name.
impl std::fmt::Display for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

impl Kernel {
    pub(crate) const fn new(module: &'static str, name: &'static str) -> Self {
        Self { module, name }
    }
}

// SAFETY: the contract's parameter structs are #[repr(C)] plain data (integers, floats, device
// addresses), laid out as their C twins in contract.cuh (build.rs asserts every offset).
unsafe impl cudarc::driver::DeviceRepr for crate::contract::adamw::AdamWParams {}
unsafe impl cudarc::driver::DeviceRepr for crate::contract::asl::AslParams {}
unsafe impl cudarc::driver::DeviceRepr for crate::contract::attention::AttnParams {}
unsafe impl cudarc::driver::DeviceRepr for crate::contract::attention::PlainAttnParams {}
unsafe impl cudarc::driver::DeviceRepr for crate::contract::augment::AugmentParams {}
// Not a parameter but a table entry (uploaded as an array; `kernels/augment.cu` reads entry b):
// four u32, #[repr(C)], laid out as its C twin too.
unsafe impl cudarc::driver::DeviceRepr for crate::contract::augment::Crop {}
unsafe impl cudarc::driver::DeviceRepr for crate::contract::head::MoeParams {}
unsafe impl cudarc::driver::DeviceRepr for crate::contract::tokens::CopyTokensParams {}

/// Every compiled kernel, one module per `kernels/<module>.cu` with a constant per kernel
/// (`kernels::layernorm::LAYERNORM_FWD_BF16`), and the embedded fatbins; generated by build.rs.
///
/// ```
/// use mlvpt::gpu::{kernels, FATBINS};
/// let k = kernels::gelu::GELU_BIAS_FWD_BF16;
/// assert_eq!((k.module, k.name), ("gelu", "gelu_bias_fwd_bf16"));
/// assert!(FATBINS.iter().any(|(module, _)| *module == k.module));
/// ```
pub mod kernels {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// (module name, fatbin) for every `kernels/<module>.cu`.
///
/// ```
/// use mlvpt::gpu::FATBINS;
/// for (module, fatbin) in FATBINS {
///     assert!(!fatbin.is_empty(), "{module}");
/// }
/// assert!(FATBINS.iter().any(|(module, _)| *module == "attention"));
/// ```
pub use kernels::FATBINS;
/// The nvcc that compiled the kernels, and its `-gencode` flags.
///
/// ```
/// use mlvpt::gpu::{GENCODE, NVCC};
/// println!("kernels built by {NVCC} with {GENCODE}");
/// assert!(!NVCC.is_empty());
/// assert!(GENCODE.starts_with("-gencode=arch=compute_"));
/// ```
pub use kernels::{GENCODE, NVCC};

/// ptxas's `-v` resource report for every kernel and architecture (registers, stack frame,
/// spills), one `## <file>.cu` section per source. Parse it with [`ptxas::parse`].
///
/// ```
/// use mlvpt::gpu::{ptxas, PTXAS_REPORT};
/// assert!(PTXAS_REPORT.contains("## layernorm.cu"));
/// let kernels = ptxas::parse(PTXAS_REPORT);
/// let widest = kernels.iter().max_by_key(|k| k.registers).expect("the report lists the kernels");
/// println!("most registers: {} ({}, {})", widest.function, widest.registers, widest.arch);
/// ```
pub const PTXAS_REPORT: &str = include_str!(concat!(env!("OUT_DIR"), "/ptxas.txt"));
