//! Token assembly and small elementwise ops (patchify, token embedding, prompts, residuals):
//! `cpu.rs` holds the twins (what `CpuBackend` runs), `cuda.rs` the launchers of
//! `kernels/tokens.cu`; the contract of each is the `backend::Backend` method of the same name.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
