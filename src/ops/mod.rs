//! The ops the model is computed with (docs/MODEL.md#where-each-part-runs). Each op has a
//! folder: `mod.rs` with shapes and contract, `cpu.rs` with the reference (generic over
//! f32/f64), and later `cuda.rs` with the typed launcher for `kernels/<op>.cu`.

pub mod adamw;
pub mod asl;
pub mod attention;
pub mod cast;
pub mod gelu;
pub mod head;
pub mod layernorm;
pub mod linear;
mod par;
pub mod real;
pub mod tokens;
