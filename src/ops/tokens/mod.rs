//! Token assembly and small elementwise ops (patchify, token embedding, prompts, residuals) on
//! the GPU. Their CPU twins are the `backend::CpuBackend` ops of the same names; the contract
//! of each is the `backend::Backend` method it implements (both need the `train` feature).

#[cfg(feature = "cuda")]
pub mod cuda;
