//! Token assembly and small elementwise ops (patchify, token embedding, prompts, residuals) on
//! the GPU. Their CPU twins are the [`crate::backend::CpuBackend`] ops of the same names; the
//! contract of each is the [`crate::backend::Backend`] method it implements.

#[cfg(feature = "cuda")]
pub mod cuda;
