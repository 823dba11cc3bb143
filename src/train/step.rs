//! The training step, written once against [`Backend`]: forward through the frozen ViT with
//! prompts, the ML-VPT head (or the plain-VPT head), ASL, the hand-written backward (input
//! gradients through the backbone, parameter gradients for the trainable tensors) and AdamW.
//!
//! Activation buffers are allocated once for `max_batch` images in [`Trainer::new`]; a step
//! with any batch `B <= max_batch` uses their prefixes.

use crate::backend::{
    AdapterParams, AdapterShape, AslConfig, AttnShape, Backend, BranchLogits, BranchParams, BufRole, GateTables, Grad, HeadInputs,
    LayerNormShape, LinearShape, MoeSaved, MoeShape, Norm, NormStats, PatchShape, Residual, Rows, TokenCopy, TokenRange, TokenShape,
    VptHeadShape, VptParams,
};
use crate::model::backbone::Backbone;
use crate::model::config::{ConfigError, GateMode, Method, ModelConfig, PromptDepth};
use crate::model::params::{param_specs, NamedTensor, Params};
use crate::ops::layernorm::VIT_EPS;
use anyhow::{bail, ensure, Context, Result};

pub use crate::ops::adamw::AdamWConfig;

/// Called after each block with (backend, layer, output, tokens per image in the output).
type BlockHook<'a, B> = dyn FnMut(&mut B, usize, &<B as Backend>::Buf, usize) + 'a;

/// A dense layer's frozen weights (timm's `nn.Linear`): `w [out, in]`, `b [out]`.
struct Linear<T> {
    w: T,
    b: T,
}

/// One block's frozen weights (timm's `Block`), `D` the width and `Dm` the MLP width.
struct BlockWeights<T> {
    /// LayerNorm before attention, `[D]`.
    norm1: Norm<T>,
    /// `[3D, D]`, `[3D]`: Q, K and V of every head in one GEMM.
    qkv: Linear<T>,
    /// Attention output projection, `[D, D]`, `[D]`.
    proj: Linear<T>,
    /// LayerScale after attention, `[D]` (DINOv2), if the model has it.
    ls1: Option<T>,
    /// LayerNorm before the MLP, `[D]`.
    norm2: Norm<T>,
    /// `[Dm, D]`, `[Dm]`.
    fc1: Linear<T>,
    /// `[D, Dm]`, `[D]`.
    fc2: Linear<T>,
    /// LayerScale after the MLP, `[D]`, if the model has it.
    ls2: Option<T>,
}

/// The frozen backbone.
struct Weights<T> {
    /// The patch embedding as a linear map of flattened patches: `[D, C*p*p]`, `[D]`.
    patch: Linear<T>,
    /// Class token `[D]` and position embeddings `[1 + Np, D]` (CLS first; prompts have none).
    cls: T,
    pos: T,
    blocks: Vec<BlockWeights<T>>,
    /// The final LayerNorm, `[D]`; without it the group tokens are the raw last hidden state.
    norm: Option<Norm<T>>,
}

/// The trainable tensors by name (docs/MODEL.md), each a buffer of the flat list in
/// [`Params`] order that the optimizer updates: `R` is `&Buf` for the parameters and
/// `&mut Buf` for their gradients.
struct Trainable<R> {
    /// `[L, P, D]` (deep prompts, one set per block) or `[1, P, D]` (shallow).
    prompts: R,
    head: Head<R>,
}

enum Head<R> {
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
    fn name(flat: impl IntoIterator<Item = R>, method: Method) -> Self {
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
struct Dims {
    max_batch: usize,
    channels: usize,
    image: usize,
    patch: usize,
    image_len: usize,
    patch_len: usize,
    num_patches: usize,
    dim: usize,
    mlp: usize,
    heads: usize,
    depth: usize,
    /// Prompts per layer (P).
    prompts: usize,
    /// Tokens per image (N).
    tokens: usize,
    labels: usize,
    experts: usize,
    rank: usize,
    gate_rows: usize,
    branches: usize,
    deep: bool,
    method: Method,
}

impl Dims {
    fn patch_shape(&self, batch: usize) -> PatchShape {
        PatchShape {
            batch,
            channels: self.channels,
            height: self.image,
            width: self.image,
            patch: self.patch,
        }
    }
    fn token_shape(&self, batch: usize) -> TokenShape {
        TokenShape {
            batch,
            prompts: self.prompts,
            num_patches: self.num_patches,
            dim: self.dim,
        }
    }
    fn block_shape(&self, batch: usize) -> BlockShape {
        BlockShape {
            batch,
            tokens: self.tokens,
            prompts: self.prompts,
            dim: self.dim,
            mlp: self.mlp,
            heads: self.heads,
        }
    }
    fn adapter_shape(&self, batch: usize) -> AdapterShape {
        AdapterShape {
            batch,
            tokens: self.prompts,
            dim: self.dim,
            rank: self.rank,
        }
    }
    fn moe_shape(&self, batch: usize) -> MoeShape {
        MoeShape {
            batch,
            tokens: self.prompts,
            dim: self.dim,
            labels: self.labels,
            experts: self.experts,
            gate_rows: self.gate_rows,
        }
    }
    fn vpt_shape(&self, batch: usize) -> VptHeadShape {
        VptHeadShape {
            batch,
            tokens: self.prompts,
            dim: self.dim,
            labels: self.labels,
        }
    }
}

/// What one block saves for its backward, sized for `max_batch`. `Nq` is `N`, or `P` in the
/// last block (its rows past attention are the prompts only).
struct LayerActs<T> {
    /// LN1 statistics, `[B*N]` each.
    ln1: NormStats<T>,
    /// `[B, N, 3D]`.
    qkv: T,
    /// Attention output `[B, Nq, D]` and its log-sum-exps `[B, h, Nq]`.
    att: T,
    lse: T,
    /// The residual stream after attention, `[B, Nq, D]`.
    xmid: T,
    /// LN2 statistics, `[B*Nq]` each.
    ln2: NormStats<T>,
    /// The MLP's pre-GELU activations, `[B, Nq, Dm]`.
    pre_gelu: T,
}

/// Buffers every block reuses, forward and backward.
struct Work<T> {
    /// Normalised tokens and the projection / fc2 output, `[B, N, D]` each.
    normed: T,
    branch_out: T,
    /// GELU output, `[B, N, Dm]`.
    hidden: T,
    /// The last block's input at the prompt rows, `[B, P, D]`.
    xtail: T,
    /// Backward: `[B, N, D]`, `[B, N, D]`, `[B, N, Dm]`, `[B, N, 3D]`.
    dtmp: T,
    dtmp2: T,
    dhidden: T,
    dqkv: T,
}

/// The head's activations and gradients, `[B, P, D]` unless noted.
struct HeadActs<T> {
    /// The last block's output at the prompts, its final norm (the group tokens `Z`) and the
    /// norm's statistics (`[B*P]` each).
    zin: T,
    z: T,
    zstats: NormStats<T>,
    /// ML-VPT: the adapters' pre-GELU `u [B, P, r]` and output.
    adapter_u: T,
    adapted: T,
    /// Per branch (VPT: one, without gate logits) the logits `[B, K]` and their gradients.
    logits: Vec<BranchLogits<T>>,
    dlogits: Vec<BranchLogits<T>>,
    /// ML-VPT, per branch: what the mixture saves, `[B, E, K]` each.
    saved: Vec<MoeSaved<T>>,
    /// VPT: the mean prompt output, `[B, D]`.
    zbar: T,
    dz: T,
    dadapted: T,
    dzin: T,
}

/// Every activation the step keeps, sized for `max_batch`. Storage roles ([`BufRole`]): the
/// per-token GEMM/attention/GELU operands and results and their gradients are `Activation`s;
/// the residual stream and its gradient, statistics, the head's small tensors and gradient
/// sums are `State`.
struct Acts<T> {
    /// `[B, C, H, W]`, `[B, Np, C*p*p]`, `[B, Np, D]`.
    images: T,
    patches: T,
    patch_emb: T,
    /// Block inputs, `[B, N, D]` each (the last block's output is `head.zin`).
    xs: Vec<T>,
    layers: Vec<LayerActs<T>>,
    work: Work<T>,
    head: HeadActs<T>,
    /// The model's logits `[B, K]` (mean over branches), the targets and the loss `[1]` (left on
    /// the device until the step's end).
    logits: T,
    targets: T,
    loss: T,
    /// The residual stream's gradient, `[B, N, D]`.
    dx: T,
}

/// Forward, loss, backward and AdamW for one model on one backend.
pub struct Trainer<B: Backend> {
    be: B,
    cfg: ModelConfig,
    dims: Dims,
    asl: AslConfig,
    opt: AdamWConfig,
    specs: Vec<(String, Vec<usize>)>,
    weights: Weights<B::Buf>,
    params: Vec<B::Buf>,
    grads: Vec<B::Buf>,
    adam_m: Vec<B::Buf>,
    adam_v: Vec<B::Buf>,
    step: u64,
    /// Per branch, the routing of (expert, label) pairs.
    tables: Vec<GateTables<B::Idx>>,
    acts: Acts<B::Buf>,
}

fn upload_new<B: Backend>(be: &mut B, data: &[f32], role: BufRole) -> B::Buf {
    let mut b = be.alloc_as(data.len(), role);
    be.upload(data, &mut b);
    b
}

fn backbone_tensor<'a>(bb: &'a Backbone, name: &str) -> Result<&'a [f32]> {
    Ok(bb
        .get(name)
        .with_context(|| format!("backbone has no tensor {name}"))?
        .data
        .as_slice())
}

/// A frozen vector kernels read in full precision (bias, norm weight, LayerScale, embedding).
fn upload_vector<B: Backend>(be: &mut B, bb: &Backbone, name: &str) -> Result<B::Buf> {
    Ok(upload_new(be, backbone_tensor(bb, name)?, BufRole::State))
}

/// `{name}.weight` (a GEMM operand: `Frozen` storage) and `{name}.bias`.
fn upload_linear<B: Backend>(be: &mut B, bb: &Backbone, name: &str) -> Result<Linear<B::Buf>> {
    Ok(Linear {
        w: upload_new(be, backbone_tensor(bb, &format!("{name}.weight"))?, BufRole::Frozen),
        b: upload_vector(be, bb, &format!("{name}.bias"))?,
    })
}

fn upload_norm<B: Backend>(be: &mut B, bb: &Backbone, name: &str) -> Result<Norm<B::Buf>> {
    Ok(Norm {
        gamma: upload_vector(be, bb, &format!("{name}.weight"))?,
        beta: upload_vector(be, bb, &format!("{name}.bias"))?,
    })
}

impl<B: Backend> Trainer<B> {
    /// Builds a trainer: checks the configuration, the backbone, the parameters and the label
    /// partitions (`branches[s][k]` = group of label `k` in branch `s`; 1 or 2 branches; ignored
    /// by `Method::Vpt`), puts the weights on the backend and allocates every buffer for
    /// `max_batch` images. Errors are [`ConfigError`]s (inside `anyhow`) naming the problem.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        mut backend: B,
        cfg: ModelConfig,
        backbone: &Backbone,
        params: Params,
        branches: Vec<Vec<usize>>,
        asl: AslConfig,
        opt: AdamWConfig,
        max_batch: usize,
    ) -> Result<Self> {
        let nbranch = match cfg.method {
            Method::MlVpt => branches.len(),
            Method::Vpt => 1,
        };
        cfg.validate(nbranch)?;
        if max_batch == 0 {
            return Err(ConfigError::ZeroBatch.into());
        }
        if backbone.config() != &cfg.vit {
            return Err(ConfigError::BackboneMismatch {
                expected: Box::new(cfg.vit.clone()),
                got: Box::new(backbone.config().clone()),
            }
            .into());
        }
        asl.validate().map_err(ConfigError::Loss)?;
        opt.validate().map_err(ConfigError::Optimizer)?;
        let (k, t, e) = (cfg.labels, cfg.groups, cfg.experts);
        let mut host_tables = Vec::new();
        if cfg.method == Method::MlVpt {
            for (s, table) in branches.iter().enumerate() {
                if table.len() != k {
                    return Err(ConfigError::BranchLength {
                        branch: s,
                        got: table.len(),
                        labels: k,
                    }
                    .into());
                }
                if let Some((label, &group)) = table.iter().enumerate().find(|(_, &g)| g >= t) {
                    return Err(ConfigError::GroupOutOfRange {
                        branch: s,
                        label,
                        group,
                        groups: t,
                    }
                    .into());
                }
                let mut tok = vec![0u32; e * k];
                let mut grow = vec![0u32; e * k];
                for ei in 0..e {
                    for (ki, &g) in table.iter().enumerate() {
                        tok[ei * k + ki] = (s * t * e + t * ei + g) as u32;
                        grow[ei * k + ki] = match cfg.gate {
                            GateMode::Label => ei * k + ki,
                            GateMode::Group => ei * t + g,
                        } as u32;
                    }
                }
                host_tables.push((tok, grow));
            }
        }
        let specs = param_specs(&cfg, nbranch);
        check_params(&specs, &params)?;

        let v = &cfg.vit;
        let prompts = cfg.prompts_per_layer(nbranch);
        let dims = Dims {
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
        };

        let be = &mut backend;
        let bb = backbone;
        let weights = Weights {
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
        };

        let params_dev: Vec<B::Buf> = params.tensors.iter().map(|t| upload_new(be, &t.data, BufRole::State)).collect();
        let zeros = |be: &mut B| -> Vec<B::Buf> { specs.iter().map(|(_, s)| be.alloc(s.iter().product())).collect() };
        let grads = zeros(be);
        let adam_m = zeros(be);
        let adam_v = zeros(be);
        let tables = host_tables
            .iter()
            .map(|(token, gate_row)| GateTables {
                token: be.upload_idx(token),
                gate_row: be.upload_idx(gate_row),
            })
            .collect();
        let acts = Acts::new(be, &dims);
        // A device backend reports allocation failures (out of memory) here.
        backend.check().context("putting the model on the backend")?;
        Ok(Self {
            be: backend,
            cfg,
            dims,
            asl,
            opt,
            specs,
            weights,
            params: params_dev,
            grads,
            adam_m,
            adam_v,
            step: 0,
            tables,
            acts,
        })
    }

    /// The model configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }
    /// Names and shapes of the trainable tensors, in [`Params`] order.
    pub fn param_specs(&self) -> &[(String, Vec<usize>)] {
        &self.specs
    }
    /// The largest batch this trainer accepts.
    pub fn max_batch(&self) -> usize {
        self.dims.max_batch
    }
    /// The backend.
    pub fn backend(&self) -> &B {
        &self.be
    }

    /// Batch size from the input lengths, with clear errors.
    fn batch_of(&self, images: &[f32], targets: Option<&[f32]>) -> Result<usize> {
        let il = self.dims.image_len;
        ensure!(
            !images.is_empty() && images.len().is_multiple_of(il),
            "images: got {} values, expected a positive multiple of C*H*W = {il}",
            images.len()
        );
        let b = images.len() / il;
        ensure!(
            b <= self.dims.max_batch,
            "batch of {b} images exceeds max_batch {}",
            self.dims.max_batch
        );
        if let Some(t) = targets {
            let k = self.dims.labels;
            ensure!(
                t.len() == b * k,
                "targets: got {} values for {b} images, expected B*K = {}",
                t.len(),
                b * k
            );
        }
        Ok(b)
    }

    /// Forward, loss, backward, AdamW at learning rate `lr`; returns the loss.
    /// Batch = `targets.len() / K`; `images` must hold that many `[C, H, W]` images.
    pub fn step(&mut self, images: &[f32], targets: &[f32], lr: f32) -> Result<f32> {
        ensure!(lr.is_finite() && lr >= 0.0, "learning rate must be a finite number >= 0, got {lr}");
        self.compute_grads(images, targets)?;
        // AdamW runs unless the loss, still on the device, is non-finite (the kernel reads it),
        // so the host waits once per step: for the loss, after the update is queued.
        let step = self.step + 1;
        self.be.adamw(
            &mut self.params,
            &self.grads,
            &mut self.adam_m,
            &mut self.adam_v,
            step,
            lr as f64,
            &self.opt,
            Some(&self.acts.loss),
        );
        let loss = self.read_loss()?;
        self.step = step;
        Ok(loss as f32)
    }

    /// Loss and the gradient of every trainable tensor (same names and shapes as the params),
    /// without an update.
    pub fn loss_and_grads(&mut self, images: &[f32], targets: &[f32]) -> Result<(f32, Params)> {
        self.compute_grads(images, targets)?;
        let loss = self.read_loss()?;
        let mut out = Vec::with_capacity(self.specs.len());
        for (i, (name, shape)) in self.specs.iter().enumerate() {
            let mut data = vec![0.0f32; shape.iter().product()];
            self.be.download(&self.grads[i], &mut data);
            out.push(NamedTensor {
                name: name.clone(),
                shape: shape.clone(),
                data,
            });
        }
        self.be.check()?;
        Ok((loss as f32, Params { tensors: out }))
    }

    /// Like [`Trainer::loss_and_grads`] in the backend's own precision, as f64 (for the
    /// finite-difference checks on `CpuBackend<f64>`).
    pub fn loss_and_grads_f64(&mut self, images: &[f32], targets: &[f32]) -> Result<(f64, Vec<Vec<f64>>)> {
        self.compute_grads(images, targets)?;
        let loss = self.read_loss()?;
        let mut out = Vec::with_capacity(self.specs.len());
        for (i, (_, shape)) in self.specs.iter().enumerate() {
            let mut data = vec![0.0f64; shape.iter().product()];
            self.be.download_f64(&self.grads[i], &mut data);
            out.push(data);
        }
        self.be.check()?;
        Ok((loss, out))
    }

    /// Logits `[B, K]` (mean over branches) for any `B <= max_batch` images.
    pub fn predict(&mut self, images: &[f32]) -> Result<Vec<f32>> {
        let b = self.batch_of(images, None)?;
        self.be.upload(images, &mut self.acts.images);
        self.forward(b, &mut |_, _, _, _| {});
        let mut out = vec![0.0f32; b * self.dims.labels];
        self.be.download(&self.acts.logits, &mut out);
        self.be.check()?;
        Ok(out)
    }

    /// The output of every block (prompt rows included, before the next layer's prompts
    /// replace them), for inspection and tests: `[B, N, D]` for every block but the last,
    /// which is computed at its prompt rows only: `[B, P, D]`.
    pub fn hidden_states(&mut self, images: &[f32]) -> Result<Vec<Vec<f32>>> {
        let b = self.batch_of(images, None)?;
        self.be.upload(images, &mut self.acts.images);
        let dim = self.dims.dim;
        let mut states = Vec::new();
        self.forward(b, &mut |be: &mut B, _l, x: &B::Buf, tokens| {
            let mut h = vec![0.0f32; b * tokens * dim];
            be.download(x, &mut h);
            states.push(h);
        });
        self.be.check()?;
        Ok(states)
    }

    /// The current trainable parameters.
    pub fn params(&self) -> Params {
        self.download_set(&self.params)
    }

    /// Replaces the trainable parameters (names and shapes must match).
    pub fn set_params(&mut self, p: &Params) -> Result<()> {
        check_params(&self.specs, p)?;
        for (buf, t) in self.params.iter_mut().zip(&p.tensors) {
            self.be.upload(&t.data, buf);
        }
        Ok(())
    }

    /// Replaces the trainable parameters from f64 values in [`Params`] order (gradient checks).
    pub fn set_params_f64(&mut self, values: &[Vec<f64>]) -> Result<()> {
        ensure!(
            values.len() == self.specs.len(),
            "got {} tensors, expected {}",
            values.len(),
            self.specs.len()
        );
        for ((buf, v), (name, shape)) in self.params.iter_mut().zip(values).zip(&self.specs) {
            let n: usize = shape.iter().product();
            ensure!(v.len() == n, "{name}: got {} values, expected {n}", v.len());
            self.be.upload_f64(v, buf);
        }
        Ok(())
    }

    /// AdamW moments and the number of steps taken.
    pub fn optimizer_state(&self) -> (Params, Params, u64) {
        (self.download_set(&self.adam_m), self.download_set(&self.adam_v), self.step)
    }

    /// Restores AdamW moments and the step count (e.g. from a checkpoint).
    pub fn set_optimizer_state(&mut self, m: &Params, v: &Params, step: u64) -> Result<()> {
        check_params(&self.specs, m).context("AdamW first moments")?;
        check_params(&self.specs, v).context("AdamW second moments")?;
        for i in 0..self.specs.len() {
            self.be.upload(&m.tensors[i].data, &mut self.adam_m[i]);
            self.be.upload(&v.tensors[i].data, &mut self.adam_v[i]);
        }
        self.step = step;
        Ok(())
    }

    fn download_set(&self, bufs: &[B::Buf]) -> Params {
        let mut tensors = Vec::with_capacity(self.specs.len());
        for (i, (name, shape)) in self.specs.iter().enumerate() {
            let mut data = vec![0.0f32; shape.iter().product()];
            self.be.download(&bufs[i], &mut data);
            tensors.push(NamedTensor {
                name: name.clone(),
                shape: shape.clone(),
                data,
            });
        }
        Params { tensors }
    }

    /// Forward + loss + backward for one batch; leaves the gradients in `self.grads` and the
    /// loss in `acts.loss` (read by [`Self::read_loss`]). Nothing here
    /// waits for the device: its errors surface at the next check.
    fn compute_grads(&mut self, images: &[f32], targets: &[f32]) -> Result<()> {
        let b = self.batch_of(images, Some(targets))?;
        self.be.upload(images, &mut self.acts.images);
        self.be.upload(targets, &mut self.acts.targets);
        self.forward(b, &mut |_, _, _, _| {});
        self.loss(b);
        self.backward(b);
        Ok(())
    }

    /// The loss of the last [`Self::compute_grads`], after any device error is reported; an
    /// error if it is not finite (the step then left the weights as they were).
    fn read_loss(&mut self) -> Result<f64> {
        let mut loss = [0.0f64];
        self.be.download_f64(&self.acts.loss, &mut loss);
        self.be.check()?;
        let loss = loss[0];
        if !loss.is_finite() {
            bail!("loss is not finite ({loss})");
        }
        Ok(loss)
    }
}

/// Names and shapes of `p` must be `specs`, in order.
fn check_params(specs: &[(String, Vec<usize>)], p: &Params) -> Result<()> {
    ensure!(
        p.tensors.len() == specs.len(),
        "parameters: got {} tensors, expected {} ({})",
        p.tensors.len(),
        specs.len(),
        specs.iter().map(|s| s.0.as_str()).collect::<Vec<_>>().join(", ")
    );
    for (t, (name, shape)) in p.tensors.iter().zip(specs) {
        ensure!(&t.name == name, "parameters: got tensor {} where {name} was expected", t.name);
        ensure!(
            &t.shape == shape && t.data.len() == shape.iter().product::<usize>(),
            "parameter {name}: shape {:?} with {} values, expected {shape:?}",
            t.shape,
            t.data.len()
        );
    }
    Ok(())
}

impl<T> Acts<T> {
    fn new<B: Backend<Buf = T>>(be: &mut B, d: &Dims) -> Self {
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
                xtail: be.alloc(pd),
                dtmp: act(be, nd),
                dtmp2: act(be, nd),
                dhidden: act(be, rows * d.mlp),
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

/// The sizes a block runs at, for a batch of `batch` images.
#[derive(Clone, Copy, Debug)]
struct BlockShape {
    batch: usize,
    tokens: usize,
    prompts: usize,
    dim: usize,
    mlp: usize,
    heads: usize,
}

/// Which rows of a block go past its attention (keys and values always cover all N tokens).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Queries {
    /// Every token: every block but the last.
    All,
    /// The P prompt rows, compacted to `[B, P, D]`: the last block, whose other outputs
    /// nothing reads (the head sees the group tokens only).
    Prompts,
}

impl BlockShape {
    /// Rows past attention, over the batch.
    fn rows(&self, q: Queries) -> usize {
        self.batch
            * match q {
                Queries::All => self.tokens,
                Queries::Prompts => self.prompts,
            }
    }
    fn attention(&self, q: Queries) -> AttnShape {
        let full = AttnShape::full(self.batch, self.tokens, self.heads, self.dim / self.heads, 1, 1 + self.prompts);
        match q {
            Queries::All => full,
            Queries::Prompts => AttnShape {
                q_start: 1,
                q_len: self.prompts,
                ..full
            },
        }
    }
    fn norm(&self, rows: usize) -> LayerNormShape {
        LayerNormShape {
            rows,
            dim: self.dim,
            eps: VIT_EPS,
        }
    }
    fn width(&self, rows: usize) -> Rows {
        Rows { rows, dim: self.dim }
    }
    /// The prompt rows `[1, 1+P)` of `[B, N, D]` to `[B, P, D]` (`to_compact`) or back.
    fn prompt_rows(&self, to_compact: bool) -> TokenCopy {
        let (full, compact) = (
            TokenRange {
                tokens: self.tokens,
                start: 1,
            },
            TokenRange {
                tokens: self.prompts,
                start: 0,
            },
        );
        let (src, dst) = if to_compact { (full, compact) } else { (compact, full) };
        TokenCopy {
            batch: self.batch,
            dim: self.dim,
            count: self.prompts,
            src,
            dst,
        }
    }
}

fn linear(rows: usize, d_in: usize, d_out: usize) -> LinearShape {
    LinearShape { rows, d_in, d_out }
}

/// The final LayerNorm fused into the last block's output: `z = LN(zin)`.
struct FinalNorm<'a, T> {
    norm: Norm<&'a T>,
    z: &'a mut T,
    stats: NormStats<&'a mut T>,
}

/// Where a block's output goes.
enum BlockOut<'a, T> {
    /// The next block's input, `[B, N, D]`.
    Tokens(&'a mut T),
    /// The last block's prompt rows `zin [B, P, D]`, and their final norm if the model has one.
    Prompts { zin: &'a mut T, norm: Option<FinalNorm<'a, T>> },
}

/// One pre-norm transformer block (timm's `Block`, docs/MODEL.md#the-backbone):
/// `x_mid = x + ls1 * proj(attn(qkv(LN1(x))))`, `out = x_mid + ls2 * fc2(gelu(fc1(LN2(x_mid))))`.
fn block_forward<B: Backend>(
    be: &mut B,
    w: &BlockWeights<B::Buf>,
    s: &mut LayerActs<B::Buf>,
    work: &mut Work<B::Buf>,
    x: &B::Buf,
    out: BlockOut<'_, B::Buf>,
    sh: &BlockShape,
) {
    let q = match out {
        BlockOut::Tokens(_) => Queries::All,
        BlockOut::Prompts { .. } => Queries::Prompts,
    };
    let (all, r, d) = (sh.rows(Queries::All), sh.rows(q), sh.dim);
    be.layernorm_forward(x, w.norm1.as_ref(), &mut work.normed, s.ln1.as_mut(), &sh.norm(all));
    be.linear_forward(&work.normed, &w.qkv.w, Some(&w.qkv.b), &mut s.qkv, &linear(all, d, 3 * d));
    be.attention_forward(&s.qkv, &mut s.att, &mut s.lse, &sh.attention(q));
    // The residual stream at the query rows.
    let xq = match q {
        Queries::All => x,
        Queries::Prompts => {
            be.copy_tokens(x, &mut work.xtail, &sh.prompt_rows(true));
            &work.xtail
        }
    };
    be.linear_forward(&s.att, &w.proj.w, Some(&w.proj.b), &mut work.branch_out, &linear(r, d, d));
    let res = Residual {
        x: xq,
        f: &work.branch_out,
        ls: w.ls1.as_ref(),
    };
    be.residual_layernorm_forward(res, &mut s.xmid, w.norm2.as_ref(), &mut work.normed, s.ln2.as_mut(), &sh.norm(r));
    be.linear_forward(&work.normed, &w.fc1.w, Some(&w.fc1.b), &mut s.pre_gelu, &linear(r, d, sh.mlp));
    be.gelu_forward(&s.pre_gelu, &mut work.hidden, r * sh.mlp);
    be.linear_forward(&work.hidden, &w.fc2.w, Some(&w.fc2.b), &mut work.branch_out, &linear(r, sh.mlp, d));
    let res = Residual {
        x: &s.xmid,
        f: &work.branch_out,
        ls: w.ls2.as_ref(),
    };
    match out {
        BlockOut::Tokens(o) | BlockOut::Prompts { zin: o, norm: None } => be.residual(res, o, sh.width(r)),
        BlockOut::Prompts { zin, norm: Some(f) } => be.residual_layernorm_forward(res, zin, f.norm, f.z, f.stats, &sh.norm(r)),
    }
}

/// Where the gradient of a block's output is, and where its input's goes.
enum BlockGrad<'a, T> {
    /// `dx [B, N, D]` holds dL/d(out) and receives dL/d(x) in place (the residual path).
    Tokens(&'a mut T),
    /// The last block: dL/d(out) at the prompt rows `dzin [B, P, D]`; writes `dx [B, N, D]`.
    Prompts { dzin: &'a mut T, dx: &'a mut T },
}

/// The input gradient of [`block_forward`] (the backbone is frozen: no weight gradients).
fn block_backward<B: Backend>(
    be: &mut B,
    w: &BlockWeights<B::Buf>,
    s: &LayerActs<B::Buf>,
    work: &mut Work<B::Buf>,
    x: &B::Buf,
    grad: BlockGrad<'_, B::Buf>,
    sh: &BlockShape,
) {
    let (q, dres, dx_full) = match grad {
        BlockGrad::Tokens(dx) => (Queries::All, dx, None),
        BlockGrad::Prompts { dzin, dx } => (Queries::Prompts, dzin, Some(dx)),
    };
    let (all, r, d) = (sh.rows(Queries::All), sh.rows(q), sh.dim);
    // out = x_mid + ls2 * fc2(gelu(fc1(LN2(x_mid))))
    let src = match &w.ls2 {
        Some(ls) => {
            be.mul_cols(dres, ls, &mut work.dtmp, sh.width(r));
            &work.dtmp
        }
        None => &*dres,
    };
    be.linear_backward_input(src, &w.fc2.w, Grad::Write(&mut work.dhidden), &linear(r, sh.mlp, d));
    be.gelu_backward(&s.pre_gelu, &mut work.dhidden, r * sh.mlp);
    be.linear_backward_input(&work.dhidden, &w.fc1.w, Grad::Write(&mut work.dtmp2), &linear(r, d, sh.mlp));
    be.layernorm_backward(
        &work.dtmp2,
        &s.xmid,
        w.norm2.as_ref(),
        s.ln2.as_ref(),
        Grad::Add(&mut *dres),
        &sh.norm(r),
    );
    // x_mid = x + ls1 * proj(attn(qkv(LN1(x))))
    let src = match &w.ls1 {
        Some(ls) => {
            be.mul_cols(dres, ls, &mut work.dtmp, sh.width(r));
            &work.dtmp
        }
        None => &*dres,
    };
    be.linear_backward_input(src, &w.proj.w, Grad::Write(&mut work.dtmp2), &linear(r, d, d));
    be.attention_backward(&s.qkv, &s.att, &s.lse, &work.dtmp2, &mut work.dqkv, &sh.attention(q));
    be.linear_backward_input(&work.dqkv, &w.qkv.w, Grad::Write(&mut work.dtmp2), &linear(all, d, 3 * d));
    let dx = match dx_full {
        None => dres,
        Some(dx) => {
            // The prompt rows' residual path into the full layout.
            be.fill(dx, all * d, 0.0);
            be.copy_tokens(dres, dx, &sh.prompt_rows(false));
            dx
        }
    };
    be.layernorm_backward(&work.dtmp2, x, w.norm1.as_ref(), s.ln1.as_ref(), Grad::Add(dx), &sh.norm(all));
}

/// The head on the group tokens `z` (docs/MODEL.md#the-label-aware-mixture-of-experts-head):
/// writes the model's logits (the mean over branches).
fn head_forward<B: Backend>(
    be: &mut B,
    params: &Head<&B::Buf>,
    tables: &[GateTables<B::Idx>],
    h: &mut HeadActs<B::Buf>,
    logits: &mut B::Buf,
    d: &Dims,
    b: usize,
) {
    let k = d.labels;
    match params {
        Head::MlVpt { adapter, branches } => {
            be.adapter_forward(&h.z, *adapter, &mut h.adapter_u, &mut h.adapted, &d.adapter_shape(b));
            be.fill(logits, b * k, 0.0);
            for (s, (branch, table)) in branches.iter().zip(tables).enumerate() {
                let inputs = HeadInputs {
                    z: &h.z,
                    adapted: &h.adapted,
                };
                be.moe_forward(inputs, *branch, table, h.logits[s].as_mut(), h.saved[s].as_mut(), &d.moe_shape(b));
                be.axpby(1.0, logits, 1.0 / d.branches as f64, &h.logits[s].y, b * k);
            }
        }
        Head::Vpt(vpt) => {
            be.vpt_head_forward(&h.z, *vpt, &mut h.zbar, &mut h.logits[0].y, &d.vpt_shape(b));
            be.copy(&h.logits[0].y, logits, b * k);
        }
    }
}

/// The backward of [`head_forward`] from `h.dlogits`: parameter gradients into `grads`,
/// dL/dz into `h.dz`.
fn head_backward<B: Backend>(
    be: &mut B,
    params: &Head<&B::Buf>,
    grads: Head<&mut B::Buf>,
    tables: &[GateTables<B::Idx>],
    h: &mut HeadActs<B::Buf>,
    d: &Dims,
    b: usize,
) {
    let pd = b * d.prompts * d.dim;
    match (params, grads) {
        (
            Head::MlVpt { adapter, branches },
            Head::MlVpt {
                adapter: dadapter,
                branches: dbranches,
            },
        ) => {
            be.fill(&mut h.dz, pd, 0.0);
            be.fill(&mut h.dadapted, pd, 0.0);
            for (s, ((branch, dbranch), table)) in branches.iter().zip(dbranches).zip(tables).enumerate() {
                let inputs = HeadInputs {
                    z: &h.z,
                    adapted: &h.adapted,
                };
                let dinputs = HeadInputs {
                    z: &mut h.dz,
                    adapted: &mut h.dadapted,
                };
                be.moe_backward(
                    h.dlogits[s].as_ref(),
                    inputs,
                    *branch,
                    table,
                    h.saved[s].as_ref(),
                    dinputs,
                    dbranch,
                    &d.moe_shape(b),
                );
            }
            be.adapter_backward(&h.dadapted, &h.z, &h.adapter_u, *adapter, &mut h.dz, dadapter, &d.adapter_shape(b));
        }
        (Head::Vpt(vpt), Head::Vpt(dvpt)) => be.vpt_head_backward(&h.dlogits[0].y, &h.zbar, *vpt, &mut h.dz, dvpt, &d.vpt_shape(b)),
        _ => unreachable!("parameters and gradients name the same head"),
    }
}

impl<B: Backend> Trainer<B> {
    /// Forward for `b` images already uploaded to `acts.images`; leaves logits in
    /// `acts.logits`. `hook(backend, layer, output, tokens)` sees every block's output
    /// (`[B, tokens, D]`: all N tokens, except the last block's P prompt rows).
    fn forward(&mut self, b: usize, hook: &mut BlockHook<B>) {
        let d = self.dims;
        let Self {
            be,
            weights: w,
            params,
            acts: a,
            tables,
            ..
        } = self;
        let theta = Trainable::name(params.iter(), d.method);
        let (tokens, block) = (d.token_shape(b), d.block_shape(b));
        // Patch embedding, then the tokens [CLS, prompts, patches] with position embeddings.
        be.patchify(&a.images, &mut a.patches, &d.patch_shape(b));
        let embed = linear(b * d.num_patches, d.patch_len, d.dim);
        be.linear_forward(&a.patches, &w.patch.w, Some(&w.patch.b), &mut a.patch_emb, &embed);
        be.embed_tokens(&a.patch_emb, &w.cls, &w.pos, &mut a.xs[0], &tokens);
        for l in 0..d.depth {
            // Deep prompts replace rows [1, 1+P) at every block's input; shallow ones enter once.
            if d.deep || l == 0 {
                be.set_prompts(theta.prompts, if d.deep { l } else { 0 }, &mut a.xs[l], &tokens);
            }
            let (x, next) = a.xs[l..].split_first_mut().expect("a block input per block");
            let h = &mut a.head;
            let out = match next.first_mut() {
                Some(o) => BlockOut::Tokens(o),
                None => BlockOut::Prompts {
                    zin: &mut h.zin,
                    norm: w.norm.as_ref().map(|n| FinalNorm {
                        norm: n.as_ref(),
                        z: &mut h.z,
                        stats: h.zstats.as_mut(),
                    }),
                },
            };
            block_forward(be, &w.blocks[l], &mut a.layers[l], &mut a.work, x, out, &block);
            match next.first() {
                Some(o) => hook(be, l, o, d.tokens),
                None => hook(be, l, &h.zin, d.prompts),
            }
        }
        if w.norm.is_none() {
            be.copy(&a.head.zin, &mut a.head.z, b * d.prompts * d.dim);
        }
        head_forward(be, &theta.head, tables, &mut a.head, &mut a.logits, &d, b);
    }

    /// Training loss of the last forward (`acts.targets` uploaded) into `acts.loss`; writes
    /// the logits' gradients.
    fn loss(&mut self, b: usize) {
        let n = b * self.dims.labels;
        let scale = self.cfg.loss_scale / n as f64;
        let gated = self.dims.method == Method::MlVpt;
        let Self { be, acts: a, asl, .. } = self;
        // Per branch ASL(y) then (ML-VPT) ASL(m).
        let h = &mut a.head;
        let mut terms = Vec::with_capacity(2 * h.logits.len());
        for (l, dl) in h.logits.iter().zip(h.dlogits.iter_mut()) {
            let BranchLogits { y: dy, m: dm } = dl;
            terms.push((&l.y, Some(dy)));
            if gated {
                terms.push((&l.m, Some(dm)));
            }
        }
        be.asl_terms_into(&mut terms, &a.targets, n, asl, scale, &mut a.loss);
    }

    /// Backward of the last forward and loss: parameter gradients into `self.grads`.
    fn backward(&mut self, b: usize) {
        let d = self.dims;
        let Self {
            be,
            weights: w,
            params,
            grads,
            acts: a,
            tables,
            ..
        } = self;
        let theta = Trainable::name(params.iter(), d.method);
        let dtheta = Trainable::name(grads.iter_mut(), d.method);
        let (tokens, block) = (d.token_shape(b), d.block_shape(b));
        let h = &mut a.head;
        head_backward(be, &theta.head, dtheta.head, tables, h, &d, b);
        let pd = b * d.prompts;
        match &w.norm {
            Some(n) => be.layernorm_backward(
                &h.dz,
                &h.zin,
                n.as_ref(),
                h.zstats.as_ref(),
                Grad::Write(&mut h.dzin),
                &block.norm(pd),
            ),
            None => be.copy(&h.dz, &mut h.dzin, pd * d.dim),
        }
        let dprompts = dtheta.prompts;
        for l in (0..d.depth).rev() {
            let grad = if l + 1 == d.depth {
                BlockGrad::Prompts {
                    dzin: &mut h.dzin,
                    dx: &mut a.dx,
                }
            } else {
                BlockGrad::Tokens(&mut a.dx)
            };
            block_backward(be, &w.blocks[l], &a.layers[l], &mut a.work, &a.xs[l], grad, &block);
            if d.deep {
                // Block l's input prompts are prompts[l]; the previous block's prompt outputs
                // were discarded, so their gradient is cut.
                be.prompt_grad(&mut a.dx, dprompts, l, &tokens, l > 0);
            } else if l == 0 {
                be.prompt_grad(&mut a.dx, dprompts, 0, &tokens, false);
            }
        }
    }
}
