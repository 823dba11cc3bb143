//! PTX parser (stub; being written).
use super::Module;
pub fn parse(_text: &str) -> Result<Module, String> {
    Err("parser not implemented yet".into())
}
