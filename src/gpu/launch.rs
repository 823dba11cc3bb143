//! Small helpers the typed launchers in `src/ops/<op>/cuda.rs` share: argument checks and grid
//! sizes.
//!
//! A launcher of one's own, of an embedded kernel (`tok_fill_f32(float* y, float value,
//! uint64_t n)`, a grid-stride loop):
//!
//! ```
//! use mlvpt::gpu::cudarc::driver::{LaunchConfig, PushKernelArg};
//! use mlvpt::gpu::launch::{check_len, grid_stride_blocks, BLOCK};
//! use mlvpt::gpu::{kernels, DevicePtrMut, GpuContext, GpuError};
//!
//! fn fill(gpu: &GpuContext, y: &mut impl DevicePtrMut<f32>, n: usize, value: f32) -> Result<(), GpuError> {
//!     check_len("fill", "y", y, n)?; // an error, not an out-of-bounds launch
//!     let f = gpu.kernel(kernels::tokens::TOK_FILL_F32)?;
//!     let n64 = n as u64;
//!     let blocks = grid_stride_blocks(gpu, n64, BLOCK as u64);
//!     let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
//!     let stream = gpu.stream();
//!     let (yp, _guard) = y.device_ptr_mut(stream);
//!     let mut l = stream.launch_builder(&f);
//!     l.arg(&yp).arg(&value).arg(&n64);
//!     // SAFETY: y holds n floats (checked above); the arguments match the kernel's signature.
//!     unsafe { l.launch(cfg) }.map_err(GpuError::driver("launching tok_fill_f32"))?;
//!     Ok(())
//! }
//! # fn main() -> Result<(), mlvpt::gpu::GpuError> {
//! # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
//! let gpu = GpuContext::new(0)?;
//! let mut y = gpu.zeros::<f32>(1000)?;
//! fill(&gpu, &mut y, 1000, 0.25)?;
//! assert!(gpu.download(&y)?.iter().all(|&v| v == 0.25));
//! assert!(fill(&gpu, &mut y, 1001, 0.25).is_err());
//! # Ok(()) }
//! ```

use super::{bf16, DeviceSlice, GpuContext, GpuError};
use cudarc::driver::DeviceRepr;

/// An element type activations are stored in: `f32` or `bf16` (the math is fp32 either way).
/// Kernels with such operands are compiled once per type; a launcher generic over `T: Storage`
/// picks its instantiation (`<kernel>_f32` / `<kernel>_bf16` in kernels/tokens.cu).
///
/// ```
/// use mlvpt::gpu::launch::Storage;
/// use mlvpt::gpu::{bf16, CudaSlice, GpuContext, GpuError};
/// use mlvpt::ops::tokens;
/// // Code generic over the storage type calls the launchers generic over it.
/// fn ones<T: Storage>(gpu: &GpuContext, x: &mut CudaSlice<T>) -> Result<(), GpuError> {
///     let n = x.len();
///     tokens::cuda::fill::<T>(gpu, gpu.stream(), x, n, 1.0)
/// }
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// // Each type picks its instantiation of a kernel pair.
/// assert_eq!(<f32 as Storage>::pick(["k_f32", "k_bf16"]), "k_f32");
/// assert_eq!(<bf16 as Storage>::pick(["k_f32", "k_bf16"]), "k_bf16");
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let (mut a, mut b) = (gpu.zeros::<f32>(3)?, gpu.zeros::<bf16>(3)?);
/// ones(&gpu, &mut a)?;
/// ones(&gpu, &mut b)?;
/// assert_eq!(gpu.download(&a)?, [1.0; 3]);
/// assert_eq!(gpu.download(&b)?, [bf16::ONE; 3]);
/// # Ok(()) }
/// ```
pub trait Storage: DeviceRepr {
    /// 0 for f32, 1 for bf16: the index into a kernel's `[f32 kernel, bf16 kernel]`.
    const INDEX: usize;
    /// This type's instantiation of a kernel, from its two.
    fn pick<K: Copy>(kernels: [K; 2]) -> K {
        kernels[Self::INDEX]
    }
}
impl Storage for f32 {
    const INDEX: usize = 0;
}
impl Storage for bf16 {
    const INDEX: usize = 1;
}

/// Threads per block of the elementwise and row kernels (they read `blockDim`, so this is the
/// launchers' choice alone).
///
/// ```
/// use mlvpt::gpu::launch::BLOCK;
/// assert_eq!(BLOCK, 256);
/// assert_eq!(BLOCK % 32, 0); // whole warps
/// ```
pub const BLOCK: u32 = 256;

/// Fails unless `buf` holds at least `need` elements.
///
/// ```
/// use mlvpt::gpu::launch::check_len;
/// use mlvpt::gpu::{GpuContext, GpuError};
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// let x = gpu.zeros::<f32>(6)?;
/// check_len("my op", "x", &x, 6)?;
/// let e = check_len("my op", "x", &x, 8).unwrap_err();
/// assert_eq!(e.to_string(), "my op: x has 6 elements, needs 8");
/// # Ok(()) }
/// ```
pub fn check_len<T>(op: &'static str, what: &str, buf: &(impl DeviceSlice<T> + ?Sized), need: usize) -> Result<(), GpuError> {
    if buf.len() < need {
        return Err(GpuError::invalid(op, format!("{what} has {} elements, needs {need}", buf.len())));
    }
    Ok(())
}

/// Blocks for a grid-stride loop over `items` work items at `per_block` items per block per
/// step: one full wave (8 blocks of 256 threads per SM, 2048 resident threads), never more
/// than the work needs, at least 1. Larger inputs loop inside the kernel.
///
/// ```
/// use mlvpt::gpu::launch::{grid_stride_blocks, BLOCK};
/// use mlvpt::gpu::GpuContext;
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// # if !mlvpt::gpu::GpuContext::driver_present() { return Ok(()); } // needs a device (a GPU or tools/vgpu)
/// let gpu = GpuContext::new(0)?;
/// assert_eq!(grid_stride_blocks(&gpu, 1000, BLOCK as u64), 4); // what the work needs
/// assert_eq!(grid_stride_blocks(&gpu, 0, BLOCK as u64), 1); // at least one
/// assert_eq!(grid_stride_blocks(&gpu, 1 << 40, BLOCK as u64), 8 * gpu.sm_count()); // one wave
/// # Ok(()) }
/// ```
pub fn grid_stride_blocks(gpu: &GpuContext, items: u64, per_block: u64) -> u32 {
    let need = items.div_ceil(per_block.max(1)).max(1);
    need.min(gpu.sm_count().max(1) as u64 * 8) as u32
}

/// A column count the kernels' 32-bit column walk handles (below 2^31).
///
/// ```
/// use mlvpt::gpu::launch::check_cols;
/// # fn main() -> Result<(), mlvpt::gpu::GpuError> {
/// assert_eq!(check_cols("my op", 768)?, 768u32);
/// assert!(check_cols("my op", 1 << 31).is_err());
/// # Ok(()) }
/// ```
pub fn check_cols(op: &'static str, cols: usize) -> Result<u32, GpuError> {
    if cols >= 1 << 31 {
        return Err(GpuError::invalid(op, format!("{cols} columns exceed the kernels' 2^31 limit")));
    }
    Ok(cols as u32)
}

/// Whether a device address is a multiple of `bytes`.
///
/// ```
/// use mlvpt::gpu::launch::aligned;
/// assert!(aligned(0x7f00_0000_1000, 16));
/// assert!(!aligned(0x7f00_0000_1008, 16));
/// assert!(aligned(0x7f00_0000_1008, 8));
/// ```
pub fn aligned(ptr: u64, bytes: u64) -> bool {
    ptr.is_multiple_of(bytes)
}

/// Fails, naming the first offender, unless every `(name, device address)` is 16-byte aligned
/// (the kernels that move 16 bytes per load or store need it).
///
/// ```
/// use mlvpt::gpu::launch::check_aligned;
/// assert!(check_aligned("demo", &[("x", 0x7f00_0000_1000), ("y", 0x7f00_0000_2010)]).is_ok());
/// let e = check_aligned("demo", &[("x", 0x7f00_0000_1000), ("y", 0x7f00_0000_2008)]).unwrap_err();
/// assert!(e.to_string().contains("y is not 16-byte aligned"), "{e}");
/// ```
pub fn check_aligned(op: &'static str, ptrs: &[(&str, u64)]) -> Result<(), GpuError> {
    match ptrs.iter().find(|&&(_, p)| !aligned(p, 16)) {
        Some(&(what, p)) => Err(GpuError::invalid(
            op,
            format!("{what} is not 16-byte aligned (address {p:#x}; the kernels load 16 bytes at a time)"),
        )),
        None => Ok(()),
    }
}
