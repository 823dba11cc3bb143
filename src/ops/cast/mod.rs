//! f32 <-> bf16 conversion (round to nearest even), the storage change between the fp32
//! masters and the bf16 activations/weights of the GPU path. The CPU twin is `half`'s slice
//! conversion; `cuda.rs` launches `kernels/cast.cu`.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
