//! Decoding (stub; being written).
use crate::exec::Kernel;
use crate::ptx::{Entry, Module};

#[derive(Debug, Clone, Default)]
pub struct Decoded {}

pub fn decode_entry(_m: &Module, e: &Entry) -> Result<Kernel, String> {
    Err(format!("decode of {} not implemented yet", e.name))
}
