//! What the model is: its configuration, the frozen ViT weights (timm names) and the
//! trainable parameters (prompts, adapters, gates, classifiers). The computation lives in
//! `train::step` over a `backend::Backend`.

pub mod backbone;
pub mod config;
pub mod params;
pub mod timm;

pub use backbone::Backbone;
pub use config::{ConfigError, GateMode, Method, ModelConfig, PromptDepth, VitConfig};
pub use params::{NamedTensor, Params};
