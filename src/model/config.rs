//! Model configuration and its validation (clear errors before any work).

use serde::{Deserialize, Serialize};

/// The frozen ViT's shape.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VitConfig {
    pub image_size: usize,
    pub patch: usize,
    pub channels: usize,
    pub dim: usize,
    pub depth: usize,
    pub heads: usize,
    pub mlp_dim: usize,
    /// LayerScale vectors `ls1`, `ls2` in each block (else 1).
    pub layer_scale: bool,
    /// A final LayerNorm `norm` (else the raw last hidden state).
    pub final_norm: bool,
}

impl VitConfig {
    /// The demo backbone: 32 px, patch 4, D 96, 4 layers, 4 heads, MLP 384.
    pub fn demo() -> Self {
        Self {
            image_size: 32,
            patch: 4,
            channels: 3,
            dim: 96,
            depth: 4,
            heads: 4,
            mlp_dim: 384,
            layer_scale: false,
            final_norm: true,
        }
    }
    /// ViT-S/16 at 224.
    pub fn vit_s16() -> Self {
        Self {
            image_size: 224,
            patch: 16,
            channels: 3,
            dim: 384,
            depth: 12,
            heads: 6,
            mlp_dim: 1536,
            layer_scale: false,
            final_norm: true,
        }
    }
    /// ViT-B/16 at 224.
    pub fn vit_b16() -> Self {
        Self {
            image_size: 224,
            patch: 16,
            channels: 3,
            dim: 768,
            depth: 12,
            heads: 12,
            mlp_dim: 3072,
            layer_scale: false,
            final_norm: true,
        }
    }
    /// ViT-L/16 at 224.
    pub fn vit_l16() -> Self {
        Self {
            dim: 1024,
            depth: 24,
            heads: 16,
            mlp_dim: 4096,
            ..Self::vit_b16()
        }
    }
    /// Patch tokens per image, `(H/p)^2`.
    pub fn num_patches(&self) -> usize {
        let g = self.image_size / self.patch.max(1);
        g * g
    }
    /// Width of one head.
    pub fn head_dim(&self) -> usize {
        self.dim / self.heads.max(1)
    }
    /// Length of a flattened patch, `C * p * p`.
    pub fn patch_len(&self) -> usize {
        self.channels * self.patch * self.patch
    }
    /// Floats in one image `[C, H, W]`.
    pub fn image_len(&self) -> usize {
        self.channels * self.image_size * self.image_size
    }

    /// Checks the backbone shape.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (name, v) in [
            ("image_size", self.image_size),
            ("patch", self.patch),
            ("channels", self.channels),
            ("dim", self.dim),
            ("depth", self.depth),
            ("heads", self.heads),
            ("mlp_dim", self.mlp_dim),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero {
                    name: format!("vit.{name}"),
                });
            }
        }
        if !self.image_size.is_multiple_of(self.patch) {
            return Err(ConfigError::PatchDoesNotDivide {
                image_size: self.image_size,
                patch: self.patch,
            });
        }
        if !self.dim.is_multiple_of(self.heads) {
            return Err(ConfigError::HeadsDoNotDivide {
                dim: self.dim,
                heads: self.heads,
            });
        }
        Ok(())
    }
}

/// Which model is trained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// ML-VPT: grouped prompts, adapters, label-aware MoE (docs/MODEL.md#the-label-aware-mixture-of-experts-head).
    #[value(name = "mlvpt")]
    MlVpt,
    /// Plain VPT ablation: `vpt_prompts` prompts, a linear head on their mean.
    #[value(name = "vpt")]
    Vpt,
}

/// Prompts at every layer (deep) or before block 0 only (shallow).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PromptDepth {
    Deep,
    Shallow,
}

/// One gate vector per (expert, label) or per (expert, group).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum GateMode {
    Label,
    Group,
}

/// Everything that fixes the model's shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub vit: VitConfig,
    /// K.
    pub labels: usize,
    /// T, groups per branch.
    pub groups: usize,
    /// E, experts (prompt tokens) per group.
    pub experts: usize,
    /// Adapter bottleneck r.
    pub adapter_rank: usize,
    pub gate: GateMode,
    pub method: Method,
    pub prompt_depth: PromptDepth,
    /// Prompts per layer for `Method::Vpt`.
    pub vpt_prompts: usize,
    /// Loss factor: loss = loss_scale / (B*K) * sum of ASL terms (official code: 1000).
    pub loss_scale: f64,
}

impl ModelConfig {
    /// The demo model: demo backbone, K 20, T 3, E 2, r 5, label gating, deep ML-VPT.
    pub fn demo() -> Self {
        Self {
            vit: VitConfig::demo(),
            labels: 20,
            groups: 3,
            experts: 2,
            adapter_rank: 5,
            gate: GateMode::Label,
            method: Method::MlVpt,
            prompt_depth: PromptDepth::Deep,
            vpt_prompts: 10,
            loss_scale: 1000.0,
        }
    }

    /// Prompt tokens per layer: `branches * T * E` (ML-VPT) or `vpt_prompts` (VPT).
    pub fn prompts_per_layer(&self, branches: usize) -> usize {
        match self.method {
            Method::MlVpt => branches * self.groups * self.experts,
            Method::Vpt => self.vpt_prompts,
        }
    }
    /// Layers that get their own prompts (L deep, 1 shallow).
    pub fn prompt_layers(&self) -> usize {
        match self.prompt_depth {
            PromptDepth::Deep => self.vit.depth,
            PromptDepth::Shallow => 1,
        }
    }
    /// Tokens per image, `1 + P + Np`.
    pub fn tokens(&self, branches: usize) -> usize {
        1 + self.prompts_per_layer(branches) + self.vit.num_patches()
    }

    /// Checks every size for `branches` label partitions (1 or 2 for ML-VPT; ignored by VPT).
    pub fn validate(&self, branches: usize) -> Result<(), ConfigError> {
        self.vit.validate()?;
        if self.labels == 0 {
            return Err(ConfigError::Zero { name: "labels".into() });
        }
        if !(self.loss_scale.is_finite() && self.loss_scale > 0.0) {
            return Err(ConfigError::LossScale(self.loss_scale));
        }
        match self.method {
            Method::MlVpt => {
                if self.groups < 1 {
                    return Err(ConfigError::Zero { name: "groups (T)".into() });
                }
                if self.groups > self.labels {
                    return Err(ConfigError::MoreGroupsThanLabels {
                        groups: self.groups,
                        labels: self.labels,
                    });
                }
                if self.experts < 1 {
                    return Err(ConfigError::Zero {
                        name: "experts (E)".into(),
                    });
                }
                if self.adapter_rank < 1 {
                    return Err(ConfigError::Zero {
                        name: "adapter_rank".into(),
                    });
                }
                if !(1..=2).contains(&branches) {
                    return Err(ConfigError::Branches(branches));
                }
            }
            Method::Vpt => {
                if self.vpt_prompts < 1 {
                    return Err(ConfigError::Zero {
                        name: "vpt_prompts".into(),
                    });
                }
            }
        }
        Ok(())
    }
}

/// A configuration or input that cannot be run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("{name} must be at least 1, got 0")]
    Zero { name: String },
    #[error("image size {image_size} is not divisible by the patch size {patch}")]
    PatchDoesNotDivide { image_size: usize, patch: usize },
    #[error("{heads} heads do not divide the width {dim}")]
    HeadsDoNotDivide { dim: usize, heads: usize },
    #[error("groups per branch T = {groups} exceeds the number of labels K = {labels}")]
    MoreGroupsThanLabels { groups: usize, labels: usize },
    #[error("ML-VPT needs 1 or 2 label partitions (branches), got {0}")]
    Branches(usize),
    #[error("loss scale must be a finite number > 0, got {0}")]
    LossScale(f64),
    #[error("batch size must be at least 1, got 0")]
    ZeroBatch,
    #[error("branch {branch}: label-to-group table has {got} entries, expected K = {labels}")]
    BranchLength { branch: usize, got: usize, labels: usize },
    #[error("branch {branch}: label {label} is in group {group}, but there are only T = {groups} groups")]
    GroupOutOfRange {
        branch: usize,
        label: usize,
        group: usize,
        groups: usize,
    },
    #[error("backbone is {got:?}, but the model config says {expected:?}")]
    BackboneMismatch { expected: Box<VitConfig>, got: Box<VitConfig> },
    #[error("backbone tensor {name}: {problem}")]
    BackboneTensor { name: String, problem: String },
    #[error("{0}")]
    Optimizer(String),
    #[error("{0}")]
    Loss(String),
}
