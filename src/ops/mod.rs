//! The ops of SPEC section 7. Each op has a folder: `mod.rs` with shapes and contract,
//! `cpu.rs` with the reference (generic over f32/f64), and later `cuda.rs` with the typed
//! launcher for `kernels/<op>.cu`.

pub mod asl;
pub mod cast;
