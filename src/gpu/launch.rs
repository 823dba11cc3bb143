//! Small helpers the typed launchers in `src/ops/<op>/cuda.rs` share: argument checks and grid
//! sizes.

use super::{bf16, DeviceSlice, GpuContext, GpuError};
use cudarc::driver::DeviceRepr;

/// An element type activations are stored in: `f32` or `bf16` (the math is fp32 either way).
/// Kernels with such operands are compiled once per type; a launcher generic over `T: Storage`
/// picks its instantiation (`<kernel>_f32` / `<kernel>_bf16` in kernels/tokens.cu).
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
pub const BLOCK: u32 = 256;

/// Fails unless `buf` holds at least `need` elements.
pub fn check_len<T>(op: &'static str, what: &str, buf: &(impl DeviceSlice<T> + ?Sized), need: usize) -> Result<(), GpuError> {
    if buf.len() < need {
        return Err(GpuError::invalid(op, format!("{what} has {} elements, needs {need}", buf.len())));
    }
    Ok(())
}

/// Blocks for a grid-stride loop over `items` work items at `per_block` items per block per
/// step: one full wave (8 blocks of 256 threads per SM, 2048 resident threads), never more
/// than the work needs, at least 1. Larger inputs loop inside the kernel.
pub fn grid_stride_blocks(gpu: &GpuContext, items: u64, per_block: u64) -> u32 {
    let need = items.div_ceil(per_block.max(1)).max(1);
    need.min(gpu.sm_count().max(1) as u64 * 8) as u32
}

/// A column count the kernels' 32-bit column walk handles (below 2^31).
pub fn check_cols(op: &'static str, cols: usize) -> Result<u32, GpuError> {
    if cols >= 1 << 31 {
        return Err(GpuError::invalid(op, format!("{cols} columns exceed the kernels' 2^31 limit")));
    }
    Ok(cols as u32)
}

/// Whether a device address is a multiple of `bytes`.
pub fn aligned(ptr: u64, bytes: u64) -> bool {
    ptr.is_multiple_of(bytes)
}

/// Fails, naming the first offender, unless every `(name, device address)` is 16-byte aligned
/// (the kernels that move 16 bytes per load or store need it).
pub fn check_aligned(op: &'static str, ptrs: &[(&str, u64)]) -> Result<(), GpuError> {
    match ptrs.iter().find(|&&(_, p)| !aligned(p, 16)) {
        Some(&(what, p)) => Err(GpuError::invalid(op, format!("{what} is not 16-byte aligned (address {p:#x}; the kernels load 16 bytes at a time)"))),
        None => Ok(()),
    }
}
