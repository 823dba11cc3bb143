//! The floating-point work of one training step ([`step_flops`]) and of a plain ViT forward
//! ([`vit_forward_flops`]), for effective TFLOP/s figures (`mlvpt bench-step`).
//!
//! Convention: **2 FLOPs per multiply-add**, counting the matrix products only: the linear
//! layers (patch embedding, QKV, output projection, MLP, the head's adapters, gates and
//! classifiers) and the two attention products (scores `Q K^T` and `P V`). Elementwise work
//! (LayerNorm, GELU, softmax exponentials, residuals, the ASL loss, AdamW) is not counted, as in
//! fvcore and torchvision; at ViT-B it is roughly 1% of the products (mostly GELU's erf and the
//! softmax exponentials). Note that fvcore, timm and torchvision report *multiply-adds* under
//! the name FLOPs: torchvision's `_ops` of `vit_b_16` is 17.564 "GFLOPS"
//! (`torchvision/models/vision_transformer.py`, `ViT_B_16_Weights`), which is 17.564 G
//! multiply-adds = 35.13 GFLOP here (fvcore counts one fused multiply-add as one flop); the tests
//! check our count against it.
//!
//! What one step of [`crate::train::Trainer`] does (`src/train/step.rs`), per image:
//! - forward through the frozen backbone: patch embedding, then L blocks that each compute Q, K,
//!   V for all `N = 1 + Np + P` tokens but attention, projection and MLP only for the rows
//!   something reads: with deep prompts, blocks `0..L-1` for CLS and the patches (the next
//!   block's prompts replace the prompt outputs); with shallow ones, all N; the last block for
//!   the P prompt rows only (only they feed the head);
//! - attention counts the (query, key) pairs the prompt mask allows: a prompt query sees CLS,
//!   itself and the patches (`N - P + 1` keys), any other query all `N`. A kernel that computes
//!   masked scores and discards them does a little more (`P (P - 1)` pairs per head, 1.7% of
//!   ViT-B's attention at P = 30);
//! - backward through the backbone: input gradients only (`dX = dY W`, one product per frozen
//!   linear layer, the same multiply-adds as its forward; no weight gradients), all L blocks
//!   (the prompts of block 0 need their gradient; block 0's QKV product only at its P prompt
//!   rows, its other input rows being the frozen embeddings), none through the patch embedding
//!   (the images need none). Attention backward is five products per allowed pair (scores recomputed from
//!   the saved log-sum-exp, `dP = dO V^T`, `dV = P^T dO`, `dQ = dS K`, `dK = dS^T Q`), i.e.
//!   2.5x its forward, FlashAttention's convention;
//! - the head (trainable): forward, and backward with weight and input gradients (2x forward).

use crate::backend::AttnShape;
use crate::model::config::{Method, ModelConfig, PromptDepth, VitConfig};

/// FLOPs (2 per multiply-add) of one training step, by part.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StepFlops {
    /// Frozen backbone forward (patch embedding and blocks).
    pub backbone_forward: u64,
    /// Frozen backbone backward: input gradients only.
    pub backbone_backward: u64,
    /// Head forward (ML-VPT adapters, gates, mixture, classifiers; or VPT's pooled linear head).
    pub head_forward: u64,
    /// Head backward: weight and input gradients.
    pub head_backward: u64,
}

impl StepFlops {
    /// All of it.
    pub fn total(&self) -> u64 {
        self.backbone_forward + self.backbone_backward + self.head_forward + self.head_backward
    }
}

/// (query, key) pairs that attention computes for `shape`'s query range under its prompt
/// mask, per image and head (see [`AttnShape::allowed`]).
pub fn attention_pairs(shape: &AttnShape) -> u64 {
    let n = shape.tokens as u64;
    let prompts = shape.prompt_end.saturating_sub(shape.prompt_start) as u64;
    let q = shape.q_start..shape.q_start + shape.q_len;
    // Queries in the prompt range see every key but the other prompts.
    let prompt_queries = (q.start.max(shape.prompt_start)..q.end.min(shape.prompt_end)).len() as u64;
    let other_queries = shape.q_len as u64 - prompt_queries;
    other_queries * n + prompt_queries * (n - prompts.saturating_sub(1))
}

/// Multiply-adds of one block's forward for one image: QKV of `kv_rows` tokens, attention over
/// `pairs` (query, key) pairs (scores and P V, each `dim` = heads x head_dim per pair), the
/// projection and the MLP on `rows` tokens.
fn block_forward_macs(vit: &VitConfig, kv_rows: u64, pairs: u64, rows: u64) -> u64 {
    let (d, dm) = (vit.dim as u64, vit.mlp_dim as u64);
    kv_rows * d * 3 * d + 2 * pairs * d + rows * (d * d + 2 * d * dm)
}

/// The same block's input-gradient backward: one product per linear layer (as many
/// multiply-adds as its forward) and five attention products per pair.
fn block_backward_macs(vit: &VitConfig, kv_rows: u64, pairs: u64, rows: u64) -> u64 {
    let (d, dm) = (vit.dim as u64, vit.mlp_dim as u64);
    kv_rows * d * 3 * d + 5 * pairs * d + rows * (d * d + 2 * d * dm)
}

/// Multiply-adds of the patch embedding for one image.
fn patch_embed_macs(vit: &VitConfig) -> u64 {
    (vit.num_patches() * vit.patch_len() * vit.dim) as u64
}

/// FLOPs of one plain ViT forward for one image: CLS and patch tokens through every block, and a
/// linear classifier of `classes` outputs on the CLS token (what timm and torchvision count;
/// ViT-B/16 at 224 with 1000 classes: 35.13 GFLOP = 17.56 G multiply-adds).
pub fn vit_forward_flops(vit: &VitConfig, classes: usize) -> u64 {
    let n = 1 + vit.num_patches() as u64;
    let blocks = vit.depth as u64 * block_forward_macs(vit, n, n * n, n);
    2 * (patch_embed_macs(vit) + blocks + (vit.dim * classes) as u64)
}

/// FLOPs of one [`crate::train::Trainer::step`] on `batch` images for `cfg` with `branches`
/// label partitions (2 for ML-VPT's default, both graphs; ignored by VPT). See the module docs
/// for what is counted.
pub fn step_flops(cfg: &ModelConfig, branches: usize, batch: usize) -> StepFlops {
    let vit = &cfg.vit;
    let branches = match cfg.method {
        Method::MlVpt => branches,
        Method::Vpt => 1,
    };
    let p = cfg.prompts_per_layer(branches);
    let n = cfg.tokens(branches);
    // Stored [CLS, patches, prompts] (src/ops/tokens/mod.rs).
    let full = AttnShape::full(1, n, vit.heads, vit.head_dim(), n - p, n);
    let inner_rows = match cfg.prompt_depth {
        PromptDepth::Deep => n - p,
        PromptDepth::Shallow => n,
    };
    let inner_q = AttnShape { q_len: inner_rows, ..full };
    let tail = AttnShape {
        q_start: n - p,
        q_len: p,
        ..full
    };
    let (n, p, rows) = (n as u64, p as u64, inner_rows as u64);
    let (inner_pairs, tail_pairs) = (attention_pairs(&inner_q), attention_pairs(&tail));
    let inner = vit.depth.saturating_sub(1) as u64;

    let forward = patch_embed_macs(vit) + inner * block_forward_macs(vit, n, inner_pairs, rows) + block_forward_macs(vit, n, tail_pairs, p);
    // Block 0's input gradient is needed at its prompt rows only (train::layers::InputGrad).
    let block0_qkv_skipped = (n - p) * 3 * (vit.dim as u64).pow(2);
    let backward = inner * block_backward_macs(vit, n, inner_pairs, rows) + block_backward_macs(vit, n, tail_pairs, p) - block0_qkv_skipped;

    let (d, k, e) = (vit.dim as u64, cfg.labels as u64, cfg.experts as u64);
    let head = match cfg.method {
        // Adapters: two rank-r products per prompt token. Per branch and label: E gate scores,
        // the mixture of E adapted tokens, one classifier dot product.
        Method::MlVpt => 2 * p * d * cfg.adapter_rank as u64 + branches as u64 * k * d * (2 * e + 1),
        // Mean of the P prompt outputs (counted as a product with a 1/P vector), then linear.
        Method::Vpt => p * d + k * d,
    };
    let b = batch as u64;
    StepFlops {
        backbone_forward: 2 * b * forward,
        backbone_backward: 2 * b * backward,
        head_forward: 2 * b * head,
        head_backward: 2 * 2 * b * head,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::GateMode;

    /// Image 8, patch 4 (Np = 4, patch length 48), D 4, 2 heads, MLP 8, 2 blocks; ML-VPT with
    /// T = E = 1 on two branches (P = 2, N = 7), K = 2, r = 1.
    fn tiny() -> ModelConfig {
        ModelConfig {
            vit: VitConfig {
                image_size: 8,
                patch: 4,
                channels: 3,
                dim: 4,
                depth: 2,
                heads: 2,
                mlp_dim: 8,
                layer_scale: false,
                final_norm: true,
            },
            labels: 2,
            groups: 1,
            experts: 1,
            adapter_rank: 1,
            gate: GateMode::Label,
            method: Method::MlVpt,
            prompt_depth: PromptDepth::Deep,
            vpt_prompts: 3,
            loss_scale: 1000.0,
        }
    }

    #[test]
    fn tiny_step_matches_a_hand_count() {
        // Multiply-adds, worked out by hand for one image:
        // patch embedding 4 patches x 48 x 4 = 768.
        // Attention pairs, block 0 (deep prompts: its prompt outputs are replaced, so only the
        // 5 non-prompt queries): 5 x 7 keys = 35; last block (2 prompt queries) 2 x 6 = 12. Each
        // pair costs D = 4 per product.
        // Block 0 forward: QKV 7x4x12 = 336, scores 35x4 = 140, PV 140, proj 5x4x4 = 80,
        //   MLP 2 x 5x4x8 = 320: 1016.
        // Block 1 forward: QKV 336, scores 12x4 = 48, PV 48, proj 2x16 = 32, MLP 2 x 2x32 = 128: 592.
        let forward = 768 + 1016 + 592;
        // Backward: block 1: MLP 128 + proj 32 + attention 5 x 48 + QKV 336 = 736;
        // block 0: 320 + 80 + 5 x 140 + QKV at its 2 prompt rows 2x4x12 = 96: 1196; nothing
        // through the patch embedding.
        let backward = 736 + 1196;
        // Head: adapters 2 tokens x (4x1 + 1x4) = 16; per branch 2 labels x 4 x (2x1 + 1) = 24, two
        // branches: 48. Total 64; backward twice that.
        let head = 16 + 48;
        let f = step_flops(&tiny(), 2, 1);
        assert_eq!(f.backbone_forward, 2 * forward);
        assert_eq!(f.backbone_backward, 2 * backward);
        assert_eq!(f.head_forward, 2 * head);
        assert_eq!(f.head_backward, 4 * head);
        assert_eq!(f.total(), 2 * (forward + backward + 3 * head));
        assert_eq!(step_flops(&tiny(), 2, 5).total(), 5 * f.total(), "linear in the batch");
    }

    #[test]
    fn tiny_vpt_head_and_prompts() {
        // VPT with 3 prompts: N = 8; block 0 pairs 5 x 8 = 40 (deep: CLS and patch queries
        // only), last block 3 x 6 = 18.
        let cfg = ModelConfig {
            method: Method::Vpt,
            ..tiny()
        };
        let forward = 768 + (8 * 48 + 2 * 40 * 4 + 5 * (16 + 64)) + (8 * 48 + 2 * 18 * 4 + 3 * (16 + 64));
        // Block 0's QKV backward at its 3 prompt rows: 3 x 48.
        let backward = (3 * 48 + 5 * 40 * 4 + 5 * 80) + (8 * 48 + 5 * 18 * 4 + 3 * 80);
        // Mean of 3 prompt rows (3 x 4) and the 2 x 4 classifier.
        let head = 12 + 8;
        let f = step_flops(&cfg, 2, 1);
        assert_eq!((f.backbone_forward, f.backbone_backward), (2 * forward, 2 * backward));
        assert_eq!((f.head_forward, f.head_backward), (2 * head, 4 * head));
        // Shallow prompts flow on: block 0 computes all 8 rows, 5 x 8 + 3 x 6 = 58 pairs.
        let shallow = ModelConfig {
            prompt_depth: PromptDepth::Shallow,
            ..cfg
        };
        let forward = 768 + (8 * 48 + 2 * 58 * 4 + 8 * (16 + 64)) + (8 * 48 + 2 * 18 * 4 + 3 * (16 + 64));
        let backward = (3 * 48 + 5 * 58 * 4 + 8 * 80) + (8 * 48 + 5 * 18 * 4 + 3 * 80);
        let f = step_flops(&shallow, 2, 1);
        assert_eq!((f.backbone_forward, f.backbone_backward), (2 * forward, 2 * backward));
    }

    #[test]
    fn attention_pairs_match_the_mask() {
        for (n, ps, pe, qs, ql) in [
            (7, 1, 3, 0, 7),
            (7, 1, 3, 1, 2),
            (10, 1, 5, 0, 10),
            (10, 1, 5, 3, 6),
            (6, 1, 1, 0, 6),
            (9, 2, 6, 4, 5),
        ] {
            let s = AttnShape {
                q_start: qs,
                q_len: ql,
                ..AttnShape::full(1, n, 1, 1, ps, pe)
            };
            let brute = (qs..qs + ql)
                .map(|i| (0..n).filter(|&j| s.allowed(i, j)).count() as u64)
                .sum::<u64>();
            assert_eq!(attention_pairs(&s), brute, "{s:?}");
        }
    }

    #[test]
    fn vit_forward_matches_torchvision() {
        // torchvision's `_ops` (G multiply-adds, which it calls GFLOPS) for vit_b_16 and vit_l_16
        // at 224 with 1000 classes: 17.564 and 61.555 (`ViT_B_16_Weights.IMAGENET1K_V1`,
        // `ViT_L_16_Weights.IMAGENET1K_V1`). We count products only; 0.1% allows their rounding.
        for (vit, gmacs) in [(VitConfig::vit_b16(), 17.564), (VitConfig::vit_l16(), 61.555)] {
            let ours = vit_forward_flops(&vit, 1000) as f64 / 2e9;
            assert!(
                (ours / gmacs - 1.0).abs() < 1e-3,
                "{vit:?}: {ours} G multiply-adds, torchvision {gmacs}"
            );
        }
    }

    #[test]
    fn vit_b16_step_parts_are_in_proportion() {
        // ML-VPT on ViT-B/16 at 224, K 80, T 5, E 3 (P 30, N 227): the backbone forward is about a
        // plain ViT-B forward (blocks 0..10 on the 197 CLS and patch rows, whose keys include the
        // 30 prompts, and QKV of the prompts; the last block on the prompt rows); the backward
        // about as much again; the head is tiny.
        let cfg = ModelConfig {
            vit: VitConfig::vit_b16(),
            labels: 80,
            groups: 5,
            experts: 3,
            ..ModelConfig::demo()
        };
        let f = step_flops(&cfg, 2, 1);
        let plain = vit_forward_flops(&VitConfig::vit_b16(), 0) as f64;
        let fwd = f.backbone_forward as f64;
        assert!(fwd > 0.95 * plain && fwd < 1.02 * plain, "forward {fwd:e} vs plain {plain:e}");
        let ratio = f.backbone_backward as f64 / fwd;
        assert!(ratio > 0.95 && ratio < 1.15, "backward / forward = {ratio}");
        assert!((f.head_forward + f.head_backward) as f64 / (f.total() as f64) < 1e-3);
    }
}
