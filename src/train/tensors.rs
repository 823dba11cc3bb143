//! The step's tensors, named as the model names them (llm.c's parameter and activation
//! structs): the frozen backbone's weights, the trainable tensors, the sizes, and every
//! activation the backward needs, each with its shape. A private module of `train`.

use super::layers::{BlockShape, Queries};
use crate::backend::{
    AdapterParams, AdapterShape, Backend, BranchLogits, BranchParams, BufRole, GateTables, MoeSaved, MoeShape, Norm, NormStats, PatchShape,
    TokenShape, VptHeadShape, VptParams,
};
use crate::model::backbone::Backbone;
use crate::model::config::{ConfigError, GateMode, Method, ModelConfig, PromptDepth};
use anyhow::{Context, Result};

/// A dense layer's frozen weights (timm's `nn.Linear`): `w [out, in]`, `b [out]`.
pub struct Linear<T> {
    pub w: T,
    pub b: T,
}

/// One block's frozen weights (timm's `Block`), `D` the width and `Dm` the MLP width.
pub struct BlockWeights<T> {
    /// LayerNorm before attention, `[D]`.
    pub norm1: Norm<T>,
    /// `[3D, D]`, `[3D]`: Q, K and V of every head in one GEMM.
    pub qkv: Linear<T>,
    /// Attention output projection, `[D, D]`, `[D]`.
    pub proj: Linear<T>,
    /// LayerScale after attention, `[D]` (DINOv2), if the model has it.
    pub ls1: Option<T>,
    /// LayerNorm before the MLP, `[D]`.
    pub norm2: Norm<T>,
    /// `[Dm, D]`, `[Dm]`.
    pub fc1: Linear<T>,
    /// `[D, Dm]`, `[D]`.
    pub fc2: Linear<T>,
    /// LayerScale after the MLP, `[D]`, if the model has it.
    pub ls2: Option<T>,
}

/// The frozen backbone.
pub struct Weights<T> {
    /// The patch embedding as a linear map of flattened patches: `[D, C*p*p]`, `[D]`.
    pub patch: Linear<T>,
    /// Class token `[D]` and position embeddings `[1 + Np, D]` (CLS first; prompts have none).
    pub cls: T,
    pub pos: T,
    pub blocks: Vec<BlockWeights<T>>,
    /// The final LayerNorm, `[D]`; without it the group tokens are the raw last hidden state.
    pub norm: Option<Norm<T>>,
}

impl<T> Weights<T> {
    /// Puts the backbone's tensors on `be`: GEMM weight matrices as `Frozen`, the vectors
    /// kernels read (biases, norms, LayerScale, embeddings) as `State`.
    pub fn upload<B: Backend<Buf = T>>(be: &mut B, bb: &Backbone) -> Result<Self> {
        let v = bb.config();
        Ok(Weights {
            patch: upload_linear(be, bb, "patch_embed.proj")?,
            cls: upload_vector(be, bb, "cls_token")?,
            pos: upload_vector(be, bb, "pos_embed")?,
            blocks: (0..v.depth)
                .map(|i| {
                    let name = |s: &str| format!("blocks.{i}.{s}");
                    let layer_scale = |be: &mut B, s: &str| v.layer_scale.then(|| upload_vector(be, bb, &name(s))).transpose();
                    Ok(BlockWeights {
                        norm1: upload_norm(be, bb, &name("norm1"))?,
                        qkv: upload_linear(be, bb, &name("attn.qkv"))?,
                        proj: upload_linear(be, bb, &name("attn.proj"))?,
                        ls1: layer_scale(be, "ls1.gamma")?,
                        norm2: upload_norm(be, bb, &name("norm2"))?,
                        fc1: upload_linear(be, bb, &name("mlp.fc1"))?,
                        fc2: upload_linear(be, bb, &name("mlp.fc2"))?,
                        ls2: layer_scale(be, "ls2.gamma")?,
                    })
                })
                .collect::<Result<_>>()?,
            norm: v.final_norm.then(|| upload_norm(be, bb, "norm")).transpose()?,
        })
    }
}

/// The trainable tensors by name (docs/MODEL.md), each a buffer of the flat list in
/// [`Params`](crate::model::params::Params) order that the optimizer updates: `R` is `&Buf` for the parameters and
/// `&mut Buf` for their gradients.
pub struct Trainable<R> {
    /// `[L, P, D]` (deep prompts, one set per block) or `[1, P, D]` (shallow).
    pub prompts: R,
    pub head: Head<R>,
}

pub enum Head<R> {
    /// Adapters, then per branch (correlative, discriminative) gates and a classifier.
    MlVpt {
        adapter: AdapterParams<R>,
        branches: Vec<BranchParams<R>>,
    },
    /// Mean of the prompt outputs and a linear classifier.
    Vpt(VptParams<R>),
}

impl<R> Trainable<R> {
    /// Names the tensors of `flat`, which lists them in the order of
    /// `model::params::param_specs`.
    pub fn name(flat: impl IntoIterator<Item = R>, method: Method) -> Self {
        let mut it = flat.into_iter();
        let mut next = || it.next().expect("a tensor for every name in param_specs");
        let prompts = next();
        let head = match method {
            Method::MlVpt => {
                let adapter = AdapterParams {
                    w1: next(),
                    b1: next(),
                    w2: next(),
                    b2: next(),
                };
                let mut branches = Vec::new();
                while let Some(gate) = it.next() {
                    let (w, c) = (it.next().expect("head weight"), it.next().expect("head bias"));
                    branches.push(BranchParams { gate, w, c });
                }
                Head::MlVpt { adapter, branches }
            }
            Method::Vpt => Head::Vpt(VptParams { w: next(), c: next() }),
        };
        Self { prompts, head }
    }
}

/// Sizes used by the step.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub max_batch: usize,
    pub channels: usize,
    pub image: usize,
    pub patch: usize,
    pub image_len: usize,
    pub patch_len: usize,
    pub num_patches: usize,
    pub dim: usize,
    pub mlp: usize,
    pub heads: usize,
    pub depth: usize,
    /// Prompts per layer (P).
    pub prompts: usize,
    /// Tokens per image (N).
    pub tokens: usize,
    pub labels: usize,
    pub experts: usize,
    pub rank: usize,
    pub gate_rows: usize,
    pub branches: usize,
    pub deep: bool,
    pub method: Method,
}

impl Dims {
    pub fn new(cfg: &ModelConfig, nbranch: usize, max_batch: usize) -> Self {
        let (k, t, e) = (cfg.labels, cfg.groups, cfg.experts);
        let v = &cfg.vit;
        let prompts = cfg.prompts_per_layer(nbranch);
        Dims {
            max_batch,
            channels: v.channels,
            image: v.image_size,
            patch: v.patch,
            image_len: v.image_len(),
            patch_len: v.patch_len(),
            num_patches: v.num_patches(),
            dim: v.dim,
            mlp: v.mlp_dim,
            heads: v.heads,
            depth: v.depth,
            prompts,
            tokens: 1 + prompts + v.num_patches(),
            labels: k,
            experts: e,
            rank: cfg.adapter_rank,
            gate_rows: match cfg.gate {
                GateMode::Label => e * k,
                GateMode::Group => e * t,
            },
            branches: nbranch,
            deep: cfg.prompt_depth == PromptDepth::Deep,
            method: cfg.method,
        }
    }
    pub fn patch_shape(&self, batch: usize) -> PatchShape {
        PatchShape {
            batch,
            channels: self.channels,
            height: self.image,
            width: self.image,
            patch: self.patch,
        }
    }
    pub fn token_shape(&self, batch: usize) -> TokenShape {
        TokenShape {
            batch,
            prompts: self.prompts,
            num_patches: self.num_patches,
            dim: self.dim,
        }
    }
    /// The rows every block but the last computes past attention in training and prediction:
    /// deep prompts' outputs are replaced by the next block's prompts, so only CLS and the
    /// patches; shallow prompts' outputs flow on, so every row.
    pub fn queries(&self) -> Queries {
        if self.deep {
            Queries::Image
        } else {
            Queries::All
        }
    }
    pub fn block_shape(&self, batch: usize) -> BlockShape {
        BlockShape {
            batch,
            tokens: self.tokens,
            prompts: self.prompts,
            dim: self.dim,
            mlp: self.mlp,
            heads: self.heads,
        }
    }
    pub fn adapter_shape(&self, batch: usize) -> AdapterShape {
        AdapterShape {
            batch,
            tokens: self.prompts,
            dim: self.dim,
            rank: self.rank,
        }
    }
    pub fn moe_shape(&self, batch: usize) -> MoeShape {
        MoeShape {
            batch,
            tokens: self.prompts,
            dim: self.dim,
            labels: self.labels,
            experts: self.experts,
            gate_rows: self.gate_rows,
        }
    }
    pub fn vpt_shape(&self, batch: usize) -> VptHeadShape {
        VptHeadShape {
            batch,
            tokens: self.prompts,
            dim: self.dim,
            labels: self.labels,
        }
    }
}

/// What one block saves for its backward, sized for `max_batch`. `Nq` is the block's query
/// rows (`layers::Queries`): `N`, `1 + Np`, or `P` in the last block.
pub struct LayerActs<T> {
    /// LN1 statistics, `[B*N]` each.
    pub ln1: NormStats<T>,
    /// `[B, N, 3D]`.
    pub qkv: T,
    /// Attention output `[B, Nq, D]` and its log-sum-exps `[B, h, Nq]`.
    pub att: T,
    pub lse: T,
    /// The residual stream after attention, `[B, Nq, D]`.
    pub xmid: T,
    /// LN2 statistics, `[B*Nq]` each.
    pub ln2: NormStats<T>,
    /// The MLP's pre-GELU activations, `[B, Nq, Dm]`.
    pub pre_gelu: T,
}

/// Buffers every block reuses, forward and backward.
pub struct Work<T> {
    /// Normalised tokens and the projection / fc2 output, `[B, N, D]` each.
    pub normed: T,
    pub branch_out: T,
    /// GELU output, `[B, N, Dm]`.
    pub hidden: T,
    /// The residual stream (forward) or its gradient (backward) at a block's query rows,
    /// compacted: `[B, Nq, D]`, up to `[B, N, D]`.
    pub xq: T,
    /// Backward: `[B, N, D]`, `[B, N, D]`, `[B, N, Dm]` (at least `[B, P, 3D]`), `[B, N, 3D]`.
    pub dtmp: T,
    pub dtmp2: T,
    pub dhidden: T,
    pub dqkv: T,
}

/// The head's activations and gradients, `[B, P, D]` unless noted.
pub struct HeadActs<T> {
    /// The last block's output at the prompts, its final norm (the group tokens `Z`) and the
    /// norm's statistics (`[B*P]` each).
    pub zin: T,
    pub z: T,
    pub zstats: NormStats<T>,
    /// ML-VPT: the adapters' pre-GELU `u [B, P, r]` and output.
    pub adapter_u: T,
    pub adapted: T,
    /// Per branch (VPT: one, without gate logits) the logits `[B, K]` and their gradients.
    pub logits: Vec<BranchLogits<T>>,
    pub dlogits: Vec<BranchLogits<T>>,
    /// ML-VPT, per branch: what the mixture saves, `[B, E, K]` each.
    pub saved: Vec<MoeSaved<T>>,
    /// VPT: the mean prompt output, `[B, D]`.
    pub zbar: T,
    pub dz: T,
    pub dadapted: T,
    pub dzin: T,
}

/// Every activation the step keeps, sized for `max_batch`. Storage roles ([`BufRole`]): the
/// per-token GEMM/attention/GELU operands and results and their gradients are `Activation`s;
/// the residual stream and its gradient, statistics, the head's small tensors and gradient
/// sums are `State`.
pub struct Acts<T> {
    /// `[B, C, H, W]`, `[B, Np, C*p*p]`, `[B, Np, D]`.
    pub images: T,
    pub patches: T,
    pub patch_emb: T,
    /// Block inputs, `[B, N, D]` each (the last block's output is `head.zin`).
    pub xs: Vec<T>,
    pub layers: Vec<LayerActs<T>>,
    pub work: Work<T>,
    pub head: HeadActs<T>,
    /// The model's logits `[B, K]` (mean over branches), the targets and the loss `[1]` (left on
    /// the device until the step's end).
    pub logits: T,
    pub targets: T,
    pub loss: T,
    /// The residual stream's gradient, `[B, N, D]`.
    pub dx: T,
}

pub fn upload_new<B: Backend>(be: &mut B, data: &[f32], role: BufRole) -> B::Buf {
    let mut b = be.alloc_as(data.len(), role);
    be.upload(data, &mut b);
    b
}

pub fn backbone_tensor<'a>(bb: &'a Backbone, name: &str) -> Result<&'a [f32]> {
    Ok(bb
        .get(name)
        .with_context(|| format!("backbone has no tensor {name}"))?
        .data
        .as_slice())
}

/// A frozen vector kernels read in full precision (bias, norm weight, LayerScale, embedding).
pub fn upload_vector<B: Backend>(be: &mut B, bb: &Backbone, name: &str) -> Result<B::Buf> {
    Ok(upload_new(be, backbone_tensor(bb, name)?, BufRole::State))
}

/// `{name}.weight` (a GEMM operand: `Frozen` storage) and `{name}.bias`.
pub fn upload_linear<B: Backend>(be: &mut B, bb: &Backbone, name: &str) -> Result<Linear<B::Buf>> {
    Ok(Linear {
        w: upload_new(be, backbone_tensor(bb, &format!("{name}.weight"))?, BufRole::Frozen),
        b: upload_vector(be, bb, &format!("{name}.bias"))?,
    })
}

pub fn upload_norm<B: Backend>(be: &mut B, bb: &Backbone, name: &str) -> Result<Norm<B::Buf>> {
    Ok(Norm {
        gamma: upload_vector(be, bb, &format!("{name}.weight"))?,
        beta: upload_vector(be, bb, &format!("{name}.bias"))?,
    })
}

impl<T> Acts<T> {
    pub fn new<B: Backend<Buf = T>>(be: &mut B, d: &Dims) -> Self {
        let bm = d.max_batch;
        let nd = bm * d.tokens * d.dim;
        let rows = bm * d.tokens;
        let pd = bm * d.prompts * d.dim;
        let bk = bm * d.labels;
        let (mlvpt, nb) = match d.method {
            Method::MlVpt => (true, d.branches),
            Method::Vpt => (false, 1),
        };
        let bek = bm * d.experts * d.labels;
        let act = |be: &mut B, len: usize| be.alloc_as(len, BufRole::Activation);
        let stats = |be: &mut B, len: usize| NormStats {
            mean: be.alloc(len),
            rstd: be.alloc(len),
        };
        let layers = (0..d.depth)
            .map(|_| LayerActs {
                ln1: stats(be, rows),
                qkv: act(be, 3 * nd),
                att: act(be, nd),
                lse: be.alloc(bm * d.heads * d.tokens),
                xmid: be.alloc(nd),
                ln2: stats(be, rows),
                pre_gelu: act(be, rows * d.mlp),
            })
            .collect();
        // VPT has no gate logits: zero-length `m` buffers.
        let logits = |be: &mut B| -> Vec<BranchLogits<T>> {
            (0..nb)
                .map(|_| BranchLogits {
                    y: be.alloc(bk),
                    m: be.alloc(if mlvpt { bk } else { 0 }),
                })
                .collect()
        };
        let head = HeadActs {
            zin: be.alloc(pd),
            z: act(be, pd),
            zstats: stats(be, bm * d.prompts),
            adapter_u: be.alloc(if mlvpt { bm * d.prompts * d.rank } else { 0 }),
            adapted: act(be, if mlvpt { pd } else { 0 }),
            logits: logits(be),
            dlogits: logits(be),
            saved: (0..if mlvpt { nb } else { 0 })
                .map(|_| MoeSaved {
                    q: be.alloc(bek),
                    r: be.alloc(bek),
                })
                .collect(),
            zbar: be.alloc(if mlvpt { 0 } else { bm * d.dim }),
            dz: be.alloc(pd),
            dadapted: be.alloc(if mlvpt { pd } else { 0 }),
            dzin: be.alloc(pd),
        };
        Self {
            images: act(be, bm * d.image_len),
            patches: act(be, bm * d.num_patches * d.patch_len),
            patch_emb: act(be, bm * d.num_patches * d.dim),
            xs: (0..d.depth).map(|_| be.alloc(nd)).collect(),
            layers,
            work: Work {
                normed: act(be, nd),
                branch_out: act(be, nd),
                hidden: act(be, rows * d.mlp),
                xq: be.alloc(nd),
                dtmp: act(be, nd),
                dtmp2: act(be, nd),
                // Also block 0's compacted qkv gradient at the prompts, `[B, P, 3D]`.
                dhidden: act(be, (rows * d.mlp).max(3 * pd)),
                dqkv: act(be, 3 * nd),
            },
            head,
            logits: be.alloc(bk),
            targets: be.alloc(bk),
            loss: be.alloc(1),
            dx: be.alloc(nd),
        }
    }
}

/// Per branch, the routing tables of docs/MODEL.md#gate-tables (`branches[s][k]` = group of
/// label `k` in branch `s`): expert `e` of label `k` reads prompt token `s*T*E + T*e + g(k)` and
/// gate row `e*K + k` (label gating) or `e*T + g(k)` (group gating).
pub fn gate_tables(cfg: &ModelConfig, branches: &[Vec<usize>]) -> Result<Vec<GateTables<Vec<u32>>>, ConfigError> {
    let (k, t, e) = (cfg.labels, cfg.groups, cfg.experts);
    let mut tables = Vec::with_capacity(branches.len());
    for (s, table) in branches.iter().enumerate() {
        if table.len() != k {
            return Err(ConfigError::BranchLength {
                branch: s,
                got: table.len(),
                labels: k,
            });
        }
        if let Some((label, &group)) = table.iter().enumerate().find(|(_, &g)| g >= t) {
            return Err(ConfigError::GroupOutOfRange {
                branch: s,
                label,
                group,
                groups: t,
            });
        }
        let mut token = vec![0u32; e * k];
        let mut gate_row = vec![0u32; e * k];
        for ei in 0..e {
            for (ki, &g) in table.iter().enumerate() {
                token[ei * k + ki] = (s * t * e + t * ei + g) as u32;
                gate_row[ei * k + ki] = match cfg.gate {
                    GateMode::Label => ei * k + ki,
                    GateMode::Group => ei * t + g,
                } as u32;
            }
        }
        tables.push(GateTables { token, gate_row });
    }
    Ok(tables)
}

#[cfg(test)]
mod tests {
    use super::{Head, Trainable};
    use crate::model::config::{Method, ModelConfig};
    use crate::model::params::param_specs;

    /// `Trainable::name` gives each tensor the name `param_specs` gives it.
    #[test]
    fn trainable_names_follow_param_specs() {
        for (method, branches) in [(Method::MlVpt, 1), (Method::MlVpt, 2), (Method::Vpt, 1)] {
            let cfg = ModelConfig {
                method,
                ..ModelConfig::demo()
            };
            let names: Vec<String> = param_specs(&cfg, branches).into_iter().map(|(n, _)| n).collect();
            let t = Trainable::name(names.iter().map(String::as_str), method);
            assert_eq!(t.prompts, "prompts");
            match t.head {
                Head::MlVpt { adapter, branches: b } => {
                    assert_eq!(
                        [adapter.w1, adapter.b1, adapter.w2, adapter.b2],
                        ["adapter.w1", "adapter.b1", "adapter.w2", "adapter.b2"]
                    );
                    assert_eq!(b.len(), branches);
                    for (s, p) in b.iter().enumerate() {
                        assert_eq!(
                            [p.gate, p.w, p.c],
                            [format!("head{s}.gate"), format!("head{s}.weight"), format!("head{s}.bias")]
                        );
                    }
                }
                Head::Vpt(p) => assert_eq!([p.w, p.c], ["head.weight", "head.bias"]),
            }
        }
    }
}
