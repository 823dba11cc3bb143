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

pub use blas::GemmType;
pub use context::GpuContext;
pub use error::GpuError;

/// cudarc, re-exported so callers name the same versions of its types.
pub use cudarc;
pub use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceSlice};
/// The bf16 type the kernels store (`half::bf16`, bit-identical to CUDA's `__nv_bfloat16`).
pub use half::bf16;

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// (module name, fatbin) for every `kernels/<module>.cu`.
pub use embedded::FATBINS;
/// The nvcc that compiled the kernels, and its `-gencode` flags.
pub use embedded::{GENCODE, NVCC};

/// ptxas's `-v` resource report for every kernel and architecture (registers, stack frame,
/// spills), one `## <file>.cu` section per source. Parse it with [`ptxas::parse`].
pub const PTXAS_REPORT: &str = include_str!(concat!(env!("OUT_DIR"), "/ptxas.txt"));
