//! The training step, written once against [`Backend`]: forward through the frozen ViT with
//! prompts, the ML-VPT head (or the plain-VPT head), ASL, the hand-written backward (input
//! gradients through the backbone, parameter gradients for the trainable tensors) and AdamW.
//!
//! Activation buffers are allocated once for `max_batch` images in [`Trainer::new`]; a step
//! with any batch `B <= max_batch` uses their prefixes.

use crate::backend::{AdapterShape, AslConfig, AttnShape, Backend, BufRole, MoeShape, VptHeadShape};
use crate::model::backbone::Backbone;
use crate::model::config::{ConfigError, GateMode, Method, ModelConfig, PromptDepth};
use crate::model::params::{param_specs, NamedTensor, Params};
use crate::ops::layernorm::VIT_EPS;
use anyhow::{bail, ensure, Context, Result};

pub use crate::ops::adamw::AdamWConfig;

/// Called after each block with (backend, layer, output, tokens per image in the output).
type BlockHook<'a, B> = dyn FnMut(&mut B, usize, &<B as Backend>::Buf, usize) + 'a;

/// One block's frozen weights on the device.
struct BlockWeights<B: Backend> {
    norm1: (B::Buf, B::Buf),
    qkv: (B::Buf, B::Buf),
    proj: (B::Buf, B::Buf),
    ls1: Option<B::Buf>,
    norm2: (B::Buf, B::Buf),
    fc1: (B::Buf, B::Buf),
    fc2: (B::Buf, B::Buf),
    ls2: Option<B::Buf>,
}

/// The frozen backbone on the device.
struct Weights<B: Backend> {
    patch: (B::Buf, B::Buf),
    cls: B::Buf,
    pos: B::Buf,
    blocks: Vec<BlockWeights<B>>,
    norm: Option<(B::Buf, B::Buf)>,
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

/// Saved activations and work buffers, sized for `max_batch`. Storage roles ([`BufRole`]):
/// the per-token GEMM/attention/GELU operands and results and their gradients are
/// `Activation`s; the residual stream (`xs`, `xmid`, `xtail`, `zin`) and its gradient (`dx`,
/// `dzin`), statistics, the head's small tensors and gradient sums (`dz`, `dadapted`) are
/// `State`.
struct Acts<B: Backend> {
    images: B::Buf,
    patches: B::Buf,
    patch_emb: B::Buf,
    /// Block inputs (`xs[l]`) and the final output (`xs[L]`), `[B, N, D]` each.
    xs: Vec<B::Buf>,
    /// After the attention residual, per block.
    xmid: Vec<B::Buf>,
    ln1: Vec<(B::Buf, B::Buf)>,
    ln2: Vec<(B::Buf, B::Buf)>,
    qkv: Vec<B::Buf>,
    att: Vec<B::Buf>,
    lse: Vec<B::Buf>,
    /// Pre-GELU MLP activations, per block.
    pre_gelu: Vec<B::Buf>,
    /// Work: normalised tokens, `[B, N, D]`.
    normed: B::Buf,
    /// Work: projection / fc2 output, `[B, N, D]`.
    branch_out: B::Buf,
    /// Work: GELU output, `[B, N, Dm]`.
    hidden: B::Buf,
    /// The last block's input at the prompt rows, `[B, P, D]`.
    xtail: B::Buf,
    /// Last hidden state at the prompts and its final norm (`Z`), `[B, P, D]`.
    zin: B::Buf,
    z: B::Buf,
    zstats: (B::Buf, B::Buf),
    adapter_u: B::Buf,
    adapted: B::Buf,
    /// Per branch (VPT: one) `y [B, K]`, gate logits `m [B, K]`, saved `q, r [B, E, K]`.
    y: Vec<B::Buf>,
    m: Vec<B::Buf>,
    q: Vec<B::Buf>,
    r: Vec<B::Buf>,
    zbar: B::Buf,
    logits: B::Buf,
    targets: B::Buf,
    /// The training loss, `[1]` (left on the device until the step's end).
    loss: B::Buf,
    dy: Vec<B::Buf>,
    dm: Vec<B::Buf>,
    dz: B::Buf,
    dadapted: B::Buf,
    dzin: B::Buf,
    dx: B::Buf,
    dtmp: B::Buf,
    dtmp2: B::Buf,
    dhidden: B::Buf,
    dqkv: B::Buf,
}

/// Forward, loss, backward and AdamW for one model on one backend.
pub struct Trainer<B: Backend> {
    be: B,
    cfg: ModelConfig,
    dims: Dims,
    asl: AslConfig,
    opt: AdamWConfig,
    specs: Vec<(String, Vec<usize>)>,
    weights: Weights<B>,
    params: Vec<B::Buf>,
    grads: Vec<B::Buf>,
    adam_m: Vec<B::Buf>,
    adam_v: Vec<B::Buf>,
    step: u64,
    /// Per branch: token of (e, k) and gate row of (e, k), `[E*K]` each.
    tables: Vec<(B::Idx, B::Idx)>,
    acts: Acts<B>,
}

fn upload_new<B: Backend>(be: &mut B, data: &[f32], role: BufRole) -> B::Buf {
    let mut b = be.alloc_as(data.len(), role);
    be.upload(data, &mut b);
    b
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

        let get = |name: &str| -> Result<&[f32]> {
            Ok(backbone
                .get(name)
                .with_context(|| format!("backbone has no tensor {name}"))?
                .data
                .as_slice())
        };
        let be = &mut backend;
        // GEMM weight matrices are `Frozen`; vectors kernels read (biases, norms) `State`.
        let mut pair = |w: &str, b: &str, role: BufRole| -> Result<(B::Buf, B::Buf)> {
            Ok((upload_new(be, get(w)?, role), upload_new(be, get(b)?, BufRole::State)))
        };
        let patch = pair("patch_embed.proj.weight", "patch_embed.proj.bias", BufRole::Frozen)?;
        let norm = if v.final_norm {
            Some(pair("norm.weight", "norm.bias", BufRole::State)?)
        } else {
            None
        };
        let mut blocks = Vec::new();
        for i in 0..v.depth {
            let p = |s: &str| format!("blocks.{i}.{s}");
            blocks.push(BlockWeights {
                norm1: pair(&p("norm1.weight"), &p("norm1.bias"), BufRole::State)?,
                qkv: pair(&p("attn.qkv.weight"), &p("attn.qkv.bias"), BufRole::Frozen)?,
                proj: pair(&p("attn.proj.weight"), &p("attn.proj.bias"), BufRole::Frozen)?,
                ls1: None,
                norm2: pair(&p("norm2.weight"), &p("norm2.bias"), BufRole::State)?,
                fc1: pair(&p("mlp.fc1.weight"), &p("mlp.fc1.bias"), BufRole::Frozen)?,
                fc2: pair(&p("mlp.fc2.weight"), &p("mlp.fc2.bias"), BufRole::Frozen)?,
                ls2: None,
            });
        }
        if v.layer_scale {
            for (i, blk) in blocks.iter_mut().enumerate() {
                blk.ls1 = Some(upload_new(&mut backend, get(&format!("blocks.{i}.ls1.gamma"))?, BufRole::State));
                blk.ls2 = Some(upload_new(&mut backend, get(&format!("blocks.{i}.ls2.gamma"))?, BufRole::State));
            }
        }
        let cls = upload_new(&mut backend, get("cls_token")?, BufRole::State);
        let pos = upload_new(&mut backend, get("pos_embed")?, BufRole::State);
        let weights = Weights {
            patch,
            cls,
            pos,
            blocks,
            norm,
        };

        let be = &mut backend;
        let params_dev: Vec<B::Buf> = params.tensors.iter().map(|t| upload_new(be, &t.data, BufRole::State)).collect();
        let zeros = |be: &mut B| -> Vec<B::Buf> { specs.iter().map(|(_, s)| be.alloc(s.iter().product())).collect() };
        let grads = zeros(be);
        let adam_m = zeros(be);
        let adam_v = zeros(be);
        let tables = host_tables.iter().map(|(a, b)| (be.upload_idx(a), be.upload_idx(b))).collect();
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

impl<B: Backend> Acts<B> {
    fn new(be: &mut B, d: &Dims) -> Self {
        let bm = d.max_batch;
        let nd = bm * d.tokens * d.dim;
        let rows = bm * d.tokens;
        let pd = bm * d.prompts * d.dim;
        let bk = bm * d.labels;
        let (mlvpt, nb) = match d.method {
            Method::MlVpt => (true, d.branches),
            Method::Vpt => (false, 1),
        };
        let bek = if mlvpt { bm * d.experts * d.labels } else { 0 };
        let per_layer = |be: &mut B, len: usize, role: BufRole| -> Vec<B::Buf> { (0..d.depth).map(|_| be.alloc_as(len, role)).collect() };
        let act = |be: &mut B, len: usize| be.alloc_as(len, BufRole::Activation);
        let xs = (0..=d.depth).map(|_| be.alloc(nd)).collect();
        let xmid = per_layer(be, nd, BufRole::State);
        let ln1 = (0..d.depth).map(|_| (be.alloc(rows), be.alloc(rows))).collect();
        let ln2 = (0..d.depth).map(|_| (be.alloc(rows), be.alloc(rows))).collect();
        let qkv = per_layer(be, 3 * nd, BufRole::Activation);
        let att = per_layer(be, nd, BufRole::Activation);
        let lse = per_layer(be, bm * d.heads * d.tokens, BufRole::State);
        let pre_gelu = per_layer(be, rows * d.mlp, BufRole::Activation);
        let many = |be: &mut B, count: usize, len: usize| -> Vec<B::Buf> { (0..count).map(|_| be.alloc(len)).collect() };
        Self {
            images: act(be, bm * d.image_len),
            patches: act(be, bm * d.num_patches * d.patch_len),
            patch_emb: act(be, bm * d.num_patches * d.dim),
            xs,
            xmid,
            ln1,
            ln2,
            qkv,
            att,
            lse,
            pre_gelu,
            normed: act(be, nd),
            branch_out: act(be, nd),
            hidden: act(be, rows * d.mlp),
            xtail: be.alloc(pd),
            zin: be.alloc(pd),
            z: act(be, pd),
            zstats: (be.alloc(bm * d.prompts), be.alloc(bm * d.prompts)),
            adapter_u: be.alloc(if mlvpt { bm * d.prompts * d.rank } else { 0 }),
            adapted: act(be, if mlvpt { pd } else { 0 }),
            y: many(be, nb, bk),
            m: many(be, if mlvpt { nb } else { 0 }, bk),
            q: many(be, if mlvpt { nb } else { 0 }, bek),
            r: many(be, if mlvpt { nb } else { 0 }, bek),
            zbar: be.alloc(if mlvpt { 0 } else { bm * d.dim }),
            logits: be.alloc(bk),
            targets: be.alloc(bk),
            loss: be.alloc(1),
            dy: many(be, nb, bk),
            dm: many(be, if mlvpt { nb } else { 0 }, bk),
            dz: be.alloc(pd),
            dadapted: be.alloc(if mlvpt { pd } else { 0 }),
            dzin: be.alloc(pd),
            dx: be.alloc(nd),
            dtmp: act(be, nd),
            dtmp2: act(be, nd),
            dhidden: act(be, rows * d.mlp),
            dqkv: act(be, 3 * nd),
        }
    }
}

/// Index of the first head tensor of branch `s` in ML-VPT parameter order (gate, weight, bias).
const fn head_index(s: usize) -> usize {
    5 + 3 * s
}

impl<B: Backend> Trainer<B> {
    fn attn_shape(&self, b: usize) -> AttnShape {
        let d = &self.dims;
        AttnShape::full(b, d.tokens, d.heads, d.dim / d.heads, 1, 1 + d.prompts)
    }

    /// Forward for `b` images already uploaded to `acts.images`; leaves logits in
    /// `acts.logits`. `hook(backend, layer, output, tokens)` sees every block's output
    /// (`[B, tokens, D]`: all N tokens, except the last block's P prompt rows).
    fn forward(&mut self, b: usize, hook: &mut BlockHook<B>) {
        let shape = self.attn_shape(b);
        let d = self.dims;
        let Self {
            be,
            weights: w,
            params,
            acts: a,
            tables,
            ..
        } = self;
        let (n, dim, p, k) = (d.tokens, d.dim, d.prompts, d.labels);
        let rows = b * n;
        be.patchify(&a.images, &mut a.patches, b, d.channels, d.image, d.image, d.patch);
        be.linear_forward(
            &a.patches,
            &w.patch.0,
            Some(&w.patch.1),
            &mut a.patch_emb,
            b * d.num_patches,
            d.patch_len,
            dim,
        );
        be.embed_tokens(&a.patch_emb, &w.cls, &w.pos, &mut a.xs[0], b, d.num_patches, p, dim);
        let tail = AttnShape {
            q_start: 1,
            q_len: p,
            ..shape
        };
        for l in 0..d.depth {
            let (lo, hi) = a.xs.split_at_mut(l + 1);
            let (x, xo) = (&mut lo[l], &mut hi[0]);
            if d.deep || l == 0 {
                be.set_prompts(&params[0], if d.deep { l } else { 0 }, x, b, n, p, dim);
            }
            let blk = &w.blocks[l];
            let (m1, r1) = &mut a.ln1[l];
            be.layernorm_forward(x, &blk.norm1.0, &blk.norm1.1, &mut a.normed, m1, r1, rows, dim, VIT_EPS);
            be.linear_forward(&a.normed, &blk.qkv.0, Some(&blk.qkv.1), &mut a.qkv[l], rows, dim, 3 * dim);
            // The last block's outputs are used only at the prompt rows (Z): after K and V of
            // every token, the rest of it runs on the P prompt rows, compacted to [B, P, D],
            // and its output is the final norm's input `zin`.
            let last = l + 1 == d.depth;
            let r = if last { b * p } else { rows };
            be.attention_forward(&a.qkv[l], &mut a.att[l], &mut a.lse[l], if last { &tail } else { &shape });
            if last {
                be.copy_tokens(x, n, 1, &mut a.xtail, p, 0, p, b, dim);
            }
            let resid_in: &B::Buf = if last { &a.xtail } else { x };
            be.linear_forward(&a.att[l], &blk.proj.0, Some(&blk.proj.1), &mut a.branch_out, r, dim, dim);
            let (m2, r2) = &mut a.ln2[l];
            be.residual_layernorm_forward(
                resid_in,
                &a.branch_out,
                blk.ls1.as_ref(),
                &mut a.xmid[l],
                &blk.norm2.0,
                &blk.norm2.1,
                &mut a.normed,
                m2,
                r2,
                r,
                dim,
                VIT_EPS,
            );
            be.linear_forward(&a.normed, &blk.fc1.0, Some(&blk.fc1.1), &mut a.pre_gelu[l], r, dim, d.mlp);
            be.gelu_forward(&a.pre_gelu[l], &mut a.hidden, r * d.mlp);
            be.linear_forward(&a.hidden, &blk.fc2.0, Some(&blk.fc2.1), &mut a.branch_out, r, d.mlp, dim);
            let (out, out_tokens) = if last { (&mut a.zin, p) } else { (xo, n) };
            match (&w.norm, last) {
                // Group tokens Z: the final norm of the last block's prompt outputs, fused
                // with the residual that makes them.
                (Some((g, beta)), true) => be.residual_layernorm_forward(
                    &a.xmid[l],
                    &a.branch_out,
                    blk.ls2.as_ref(),
                    out,
                    g,
                    beta,
                    &mut a.z,
                    &mut a.zstats.0,
                    &mut a.zstats.1,
                    r,
                    dim,
                    VIT_EPS,
                ),
                _ => be.residual(&a.xmid[l], &a.branch_out, blk.ls2.as_ref(), out, r, dim),
            }
            hook(be, l, out, out_tokens);
        }
        if w.norm.is_none() {
            be.copy(&a.zin, &mut a.z, b * p * dim);
        }
        match d.method {
            Method::MlVpt => {
                let ash = AdapterShape {
                    batch: b,
                    tokens: p,
                    dim,
                    rank: d.rank,
                };
                be.adapter_forward(
                    &a.z,
                    &params[1],
                    &params[2],
                    &params[3],
                    &params[4],
                    &mut a.adapter_u,
                    &mut a.adapted,
                    &ash,
                );
                let msh = MoeShape {
                    batch: b,
                    tokens: p,
                    dim,
                    labels: k,
                    experts: d.experts,
                    gate_rows: d.gate_rows,
                };
                be.fill(&mut a.logits, b * k, 0.0);
                for (s, (tok, grow)) in tables.iter().enumerate() {
                    let h = head_index(s);
                    be.moe_forward(
                        &a.z,
                        &a.adapted,
                        &params[h],
                        &params[h + 1],
                        &params[h + 2],
                        tok,
                        grow,
                        &mut a.y[s],
                        &mut a.m[s],
                        &mut a.q[s],
                        &mut a.r[s],
                        &msh,
                    );
                    be.axpby(1.0, &mut a.logits, 1.0 / d.branches as f64, &a.y[s], b * k);
                }
            }
            Method::Vpt => {
                let vsh = VptHeadShape {
                    batch: b,
                    tokens: p,
                    dim,
                    labels: k,
                };
                be.vpt_head_forward(&a.z, &params[1], &params[2], &mut a.zbar, &mut a.y[0], &vsh);
                be.copy(&a.y[0], &mut a.logits, b * k);
            }
        }
    }

    /// Training loss of the last forward (`acts.targets` uploaded) into `acts.loss`; writes
    /// `dy`, `dm`.
    fn loss(&mut self, b: usize) {
        let n = b * self.dims.labels;
        let scale = self.cfg.loss_scale / n as f64;
        let Self { be, acts: a, asl, .. } = self;
        // Per branch ASL(y) then (ML-VPT) ASL(m); VPT has no gate logits (`m` is empty).
        let mut terms = Vec::with_capacity(2 * a.y.len());
        let (mut ms, mut dms) = (a.m.iter(), a.dm.iter_mut());
        for (y, dy) in a.y.iter().zip(a.dy.iter_mut()) {
            terms.push((y, Some(dy)));
            if let (Some(m), Some(dm)) = (ms.next(), dms.next()) {
                terms.push((m, Some(dm)));
            }
        }
        be.asl_terms_into(&mut terms, &a.targets, n, asl, scale, &mut a.loss);
    }

    /// Backward of the last forward and loss: parameter gradients into `self.grads`.
    fn backward(&mut self, b: usize) {
        let shape = self.attn_shape(b);
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
        let (n, dim, p, k) = (d.tokens, d.dim, d.prompts, d.labels);
        let rows = b * n;
        match d.method {
            Method::MlVpt => {
                be.fill(&mut a.dz, b * p * dim, 0.0);
                be.fill(&mut a.dadapted, b * p * dim, 0.0);
                let msh = MoeShape {
                    batch: b,
                    tokens: p,
                    dim,
                    labels: k,
                    experts: d.experts,
                    gate_rows: d.gate_rows,
                };
                for (s, (tok, grow)) in tables.iter().enumerate() {
                    let h = head_index(s);
                    let [dg, dw, dc] = &mut grads[h..h + 3] else {
                        unreachable!("three head tensors per branch")
                    };
                    be.moe_backward(
                        &a.dy[s],
                        &a.dm[s],
                        &a.z,
                        &a.adapted,
                        &params[h],
                        &params[h + 1],
                        tok,
                        grow,
                        &a.q[s],
                        &a.r[s],
                        &mut a.dz,
                        &mut a.dadapted,
                        dg,
                        dw,
                        dc,
                        &msh,
                    );
                }
                let ash = AdapterShape {
                    batch: b,
                    tokens: p,
                    dim,
                    rank: d.rank,
                };
                let [dw1, db1, dw2, db2] = &mut grads[1..5] else {
                    unreachable!("four adapter tensors")
                };
                be.adapter_backward(
                    &a.dadapted,
                    &a.z,
                    &a.adapter_u,
                    &params[1],
                    &params[3],
                    &mut a.dz,
                    dw1,
                    db1,
                    dw2,
                    db2,
                    &ash,
                );
            }
            Method::Vpt => {
                let vsh = VptHeadShape {
                    batch: b,
                    tokens: p,
                    dim,
                    labels: k,
                };
                let [_, dw, dc] = &mut grads[..] else {
                    unreachable!("VPT has three tensors")
                };
                be.vpt_head_backward(&a.dy[0], &a.zbar, &params[1], &mut a.dz, dw, dc, &vsh);
            }
        }
        match &w.norm {
            Some((g, _)) => be.layernorm_backward(&a.dz, &a.zin, g, &a.zstats.0, &a.zstats.1, &mut a.dzin, b * p, dim, false),
            None => be.copy(&a.dz, &mut a.dzin, b * p * dim),
        }
        let tail = AttnShape {
            q_start: 1,
            q_len: p,
            ..shape
        };
        let dprompts = &mut grads[0];
        for l in (0..d.depth).rev() {
            let blk = &w.blocks[l];
            let last = l + 1 == d.depth;
            // The MLP and attention-output part runs on all rows, or on the P prompt rows of
            // the last block (gradient `dzin`, compact [B, P, D]).
            let (r, dres) = if last { (b * p, &mut a.dzin) } else { (rows, &mut a.dx) };
            // x_out = x_mid + ls2 * fc2(gelu(fc1(LN2(x_mid))))
            let src = match &blk.ls2 {
                Some(ls) => {
                    be.mul_cols(dres, ls, &mut a.dtmp, r, dim);
                    &a.dtmp
                }
                None => &*dres,
            };
            be.linear_backward_input(src, &blk.fc2.0, &mut a.dhidden, r, d.mlp, dim, false);
            be.gelu_backward(&a.pre_gelu[l], &mut a.dhidden, r * d.mlp);
            be.linear_backward_input(&a.dhidden, &blk.fc1.0, &mut a.dtmp2, r, dim, d.mlp, false);
            be.layernorm_backward(&a.dtmp2, &a.xmid[l], &blk.norm2.0, &a.ln2[l].0, &a.ln2[l].1, dres, r, dim, true);
            // x_mid = x + ls1 * proj(attn(qkv(LN1(x))))
            let src = match &blk.ls1 {
                Some(ls) => {
                    be.mul_cols(dres, ls, &mut a.dtmp, r, dim);
                    &a.dtmp
                }
                None => &*dres,
            };
            be.linear_backward_input(src, &blk.proj.0, &mut a.dtmp2, r, dim, dim, false);
            be.attention_backward(
                &a.qkv[l],
                &a.att[l],
                &a.lse[l],
                &a.dtmp2,
                &mut a.dqkv,
                if last { &tail } else { &shape },
            );
            be.linear_backward_input(&a.dqkv, &blk.qkv.0, &mut a.dtmp2, rows, dim, 3 * dim, false);
            if last {
                // Residual path of the prompt rows into the full-layout gradient.
                be.fill(&mut a.dx, rows * dim, 0.0);
                be.copy_tokens(&a.dzin, p, 0, &mut a.dx, n, 1, p, b, dim);
            }
            be.layernorm_backward(
                &a.dtmp2,
                &a.xs[l],
                &blk.norm1.0,
                &a.ln1[l].0,
                &a.ln1[l].1,
                &mut a.dx,
                rows,
                dim,
                true,
            );
            if d.deep {
                // Block l's input prompts are prompts[l]; the previous block's prompt outputs
                // were discarded, so their gradient is cut.
                be.prompt_grad(&mut a.dx, dprompts, l, b, n, p, dim, l > 0);
            } else if l == 0 {
                be.prompt_grad(&mut a.dx, dprompts, 0, b, n, p, dim, false);
            }
        }
    }
}
