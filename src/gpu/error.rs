//! What can go wrong on the GPU side, each variant saying what is missing or which call failed.

use cudarc::cublas::result::CublasError;
use cudarc::driver::DriverError;

/// An error from the CUDA layer or a kernel launcher.
///
/// ```
/// use mlvpt::gpu::{GpuContext, GpuError};
/// // Runs anywhere: without a driver or a device the error says what is missing.
/// match GpuContext::new(0) {
///     Ok(gpu) => println!("CUDA on {}", gpu.device_name()),
///     Err(GpuError::NoDriver) => println!("no CUDA driver: using the CPU"),
///     Err(e @ GpuError::NoDevice { .. }) => println!("{e}: using the CPU"),
///     Err(e) => println!("CUDA unusable ({e}): using the CPU"),
/// }
/// // A launcher's bad arguments name the op and the argument.
/// let e = GpuError::invalid("layernorm forward", "x has 7 elements, needs 8");
/// assert_eq!(e.to_string(), "layernorm forward: x has 7 elements, needs 8");
/// ```
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// libcuda could not be opened.
    #[error(
        "no CUDA driver: libcuda.so could not be loaded (install the NVIDIA driver, or add the \
         folder holding libcuda.so.1 to LD_LIBRARY_PATH)"
    )]
    NoDriver,
    /// The driver loaded but has no device with this ordinal.
    #[error("no CUDA device {ordinal}: the driver reports {count} device(s)")]
    NoDevice { ordinal: usize, count: usize },
    /// libcublas could not be opened.
    #[error(
        "cuBLAS not found: libcublas.so.13 could not be loaded (add the CUDA 13 toolkit's lib64 or \
         pip's site-packages/nvidia/cu13/lib to LD_LIBRARY_PATH, with libcublasLt beside it)"
    )]
    NoCublas,
    /// The CUDA libraries panicked while loading (for example a driver too old for a symbol).
    #[error("CUDA initialisation failed: {0}")]
    Init(String),
    /// A driver call failed.
    #[error("CUDA driver error while {what}: {source}")]
    Driver {
        what: String,
        #[source]
        source: DriverError,
    },
    /// A cuBLAS call failed.
    #[error("cuBLAS error while {what}: {source}")]
    Cublas {
        what: String,
        #[source]
        source: CublasError,
    },
    /// An embedded kernel module did not load on this device.
    #[error(
        "cannot load kernel module `{module}` on {device} (compute capability {cc}): {source}; the \
         embedded fatbin holds {gencode} (rebuild with MLVPT_CUDA_ARCH=<arch> for other GPUs)"
    )]
    ModuleLoad {
        module: String,
        device: String,
        cc: String,
        gencode: String,
        #[source]
        source: DriverError,
    },
    /// No kernel of that name in the embedded modules.
    #[error("kernel `{function}` not found in module `{module}`")]
    NoKernel { module: String, function: String },
    /// A launcher's arguments do not fit the shapes it was given.
    #[error("{op}: {msg}")]
    Invalid { op: &'static str, msg: String },
}

impl GpuError {
    /// A driver error with a note of what was being done.
    ///
    /// ```
    /// use mlvpt::gpu::{GpuContext, GpuError};
    /// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
    /// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
    /// let gpu = GpuContext::new(0)?;
    /// // cudarc's own calls return a DriverError; this says what was being done.
    /// let scratch = gpu.stream().alloc_zeros::<f32>(16).map_err(GpuError::driver("allocating my scratch"))?;
    /// assert_eq!(scratch.len(), 16);
    /// # Ok(()) }
    /// ```
    pub fn driver(what: impl Into<String>) -> impl FnOnce(DriverError) -> GpuError {
        let what = what.into();
        move |source| GpuError::Driver { what, source }
    }
    /// A cuBLAS error with a note of what was being done.
    ///
    /// ```
    /// use mlvpt::gpu::cudarc::cublas::{result::CublasError, sys::cublasStatus_t};
    /// use mlvpt::gpu::GpuError;
    /// // What a failed cuBLAS call (here a made-up status) becomes.
    /// let status = CublasError(cublasStatus_t::CUBLAS_STATUS_INVALID_VALUE);
    /// let e = GpuError::cublas("gemm m=2 n=3 k=0")(status);
    /// assert!(matches!(&e, GpuError::Cublas { what, .. } if what == "gemm m=2 n=3 k=0"));
    /// ```
    pub fn cublas(what: impl Into<String>) -> impl FnOnce(CublasError) -> GpuError {
        let what = what.into();
        move |source| GpuError::Cublas { what, source }
    }
    /// A launcher argument error.
    ///
    /// ```
    /// use mlvpt::gpu::GpuError;
    /// fn check_rows(rows: usize) -> Result<(), GpuError> {
    ///     if rows == 0 {
    ///         return Err(GpuError::invalid("my op", "no rows"));
    ///     }
    ///     Ok(())
    /// }
    /// assert_eq!(check_rows(0).unwrap_err().to_string(), "my op: no rows");
    /// assert!(check_rows(1).is_ok());
    /// ```
    pub fn invalid(op: &'static str, msg: impl Into<String>) -> GpuError {
        GpuError::Invalid { op, msg: msg.into() }
    }
}
