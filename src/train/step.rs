//! The training step, written once against [`Backend`]: forward through the frozen ViT with
//! prompts, the ML-VPT head (or the plain-VPT head), ASL, the hand-written backward (input
//! gradients through the backbone, parameter gradients for the trainable tensors) and AdamW.
//!
//! Activation buffers are allocated once for `max_batch` images in [`Trainer::new`]; a step
//! with any batch `B <= max_batch` uses their prefixes.

use super::layers::{
    block_backward, block_forward, head_backward, head_forward, linear, BlockGrad, BlockOut, FinalNorm, InputGrad, Queries,
};
use super::tensors::{gate_tables, upload_new, Acts, Dims, Trainable, Weights};
use crate::backend::{AslConfig, AugmentLayout, AugmentShape, Backend, BranchLogits, BufRole, Crop, GateTables, Grad};
use crate::model::backbone::Backbone;
use crate::model::config::{ConfigError, Method, ModelConfig};
use crate::model::params::{param_specs, NamedTensor, Params};
use anyhow::{bail, ensure, Context, Result};

pub use crate::ops::adamw::AdamWConfig;

/// Called after each block with (backend, layer, output, tokens per image in the output).
type BlockHook<'a, B> = dyn FnMut(&mut B, usize, &<B as Backend>::Buf, usize) + 'a;

/// A batch of uint8 crops for [`Trainer::stage`]: each crop's bytes in `pixels` (see [`Crop`]),
/// and the normalization `(v / 255 - mean) / std` of the model's input.
#[derive(Clone, Copy, Debug)]
pub struct Crops<'a> {
    pub pixels: &'a [u8],
    pub crops: &'a [Crop],
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// A batch [`Trainer::stage`] put on the backend, for [`Trainer::step_staged`] (once).
#[derive(Debug)]
#[must_use = "a staged batch holds one of the trainer's two staging areas until it is stepped"]
pub struct Staged {
    slot: usize,
    batch: usize,
    mean: [f32; 3],
    std: [f32; 3],
}

impl Staged {
    /// Images in the batch.
    pub fn len(&self) -> usize {
        self.batch
    }
    /// Whether it holds no image (never: staging an empty batch is an error).
    pub fn is_empty(&self) -> bool {
        self.batch == 0
    }
}

/// What a step's forward reads.
enum Input<'a> {
    /// f32 images `[B, C, H, W]`, uploaded then cut into patches.
    Images(&'a [f32]),
    /// Crops staged earlier, augmented straight into the patch rows.
    Staged(Staged),
    /// No image: zero gradients and loss (a rank of a data-parallel job whose share of the
    /// batch is empty still takes part in the exchange).
    Nothing,
}

/// This rank's share of a data-parallel step, for [`Trainer::step_shard`].
#[derive(Debug)]
pub enum Shard<'a> {
    /// f32 images `[B, C, H, W]`.
    Images(&'a [f32]),
    /// A batch [`Trainer::stage`] put on the backend.
    Staged(Staged),
    /// None of the batch's images.
    Empty,
}

/// Combines the ranks' gradients between the backward and AdamW (`crate::dist`).
pub trait GradSync<B: Backend> {
    /// `grads` (the trainable tensors, `lens` values each) and `loss` (`loss[0]`) hold the mean
    /// over this rank's `images` images (zeros for none); replaces them on every rank by the
    /// mean over all ranks' images, identical bits everywhere. Returns the images of all ranks.
    fn sync(&mut self, be: &mut B, grads: &mut [B::Buf], lens: &[usize], loss: &mut B::Buf, images: usize) -> Result<usize>;
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
    /// Two areas for staged uint8 batches (made on first use): the next batch is copied into
    /// one while the step reads the other. `busy[i]`: area `i` holds a batch not yet stepped.
    staging: Option<[B::Staging; 2]>,
    busy: [bool; 2],
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
        let host_tables = match cfg.method {
            Method::MlVpt => gate_tables(&cfg, &branches)?,
            Method::Vpt => Vec::new(),
        };
        let specs = param_specs(&cfg, nbranch);
        check_params(&specs, &params)?;

        let dims = Dims::new(&cfg, nbranch, max_batch);

        let be = &mut backend;
        let weights = Weights::upload(be, backbone)?;
        let params_dev: Vec<B::Buf> = params.tensors.iter().map(|t| upload_new(be, &t.data, BufRole::State)).collect();
        let zeros = |be: &mut B| -> Vec<B::Buf> { specs.iter().map(|(_, s)| be.alloc(s.iter().product())).collect() };
        let grads = zeros(be);
        let adam_m = zeros(be);
        let adam_v = zeros(be);
        let tables = host_tables
            .into_iter()
            .map(|t| t.map(|idx: Vec<u32>| be.upload_idx(&idx)))
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
            staging: None,
            busy: [false; 2],
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
        self.step_on(Input::Images(images), targets, lr)
    }

    /// Puts a batch of uint8 crops on the backend for [`Trainer::step_staged`], which resizes,
    /// flips and normalizes them there (`crate::ops::augment`). On a GPU the copy runs on a
    /// second stream and this returns without waiting for it: staging the next batch before
    /// stepping the current one overlaps the copy with the step. At most two batches may be
    /// staged and not yet stepped.
    pub fn stage(&mut self, batch: Crops<'_>) -> Result<Staged> {
        let d = self.dims;
        let n = batch.crops.len();
        ensure!(n > 0, "staging an empty batch");
        ensure!(n <= d.max_batch, "batch of {n} images exceeds max_batch {}", d.max_batch);
        ensure!(d.channels == 3, "staged crops are RGB; the model takes {} channels", d.channels);
        crate::ops::augment::check_crops(batch.crops, batch.pixels.len()).map_err(|e| anyhow::anyhow!("staged batch: {e}"))?;
        ensure!(
            batch.std.iter().all(|s| s.is_finite() && *s != 0.0) && batch.mean.iter().all(|m| m.is_finite()),
            "staged batch: normalization mean {:?} / std {:?}",
            batch.mean,
            batch.std
        );
        let slot = match self.busy {
            [false, _] => 0,
            [true, false] => 1,
            [true, true] => bail!("two staged batches are waiting for step_staged already"),
        };
        let be = &mut self.be;
        let areas = self.staging.get_or_insert_with(|| [be.alloc_staging(), be.alloc_staging()]);
        self.be.stage(&mut areas[slot], batch.pixels, batch.crops);
        self.busy[slot] = true;
        Ok(Staged {
            slot,
            batch: n,
            mean: batch.mean,
            std: batch.std,
        })
    }

    /// [`Trainer::step`] on a batch [`Trainer::stage`] put on the backend: its crops are
    /// augmented straight into the patch embedding's input. `targets` holds `staged.len() x K`.
    pub fn step_staged(&mut self, staged: Staged, targets: &[f32], lr: f32) -> Result<f32> {
        self.step_on(Input::Staged(staged), targets, lr)
    }

    /// One data-parallel step: this rank's share of the batch (`targets` holds its images' x
    /// K), the gradients combined with the other ranks' by `sync`, then AdamW, identical on
    /// every rank. Returns the loss of the whole batch, or `None` when no rank had an image
    /// (nothing changes, as a batch of unreadable images in one process).
    pub fn step_shard(&mut self, shard: Shard<'_>, targets: &[f32], lr: f32, sync: &mut dyn GradSync<B>) -> Result<Option<f32>> {
        let input = match shard {
            Shard::Images(x) => Input::Images(x),
            Shard::Staged(s) => Input::Staged(s),
            Shard::Empty => Input::Nothing,
        };
        match self.step_with(input, targets, lr, Some(sync)) {
            Ok(loss) => Ok(Some(loss)),
            Err(e) if e.is::<NoImages>() => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn step_on(&mut self, input: Input<'_>, targets: &[f32], lr: f32) -> Result<f32> {
        self.step_with(input, targets, lr, None)
    }

    fn step_with(&mut self, input: Input<'_>, targets: &[f32], lr: f32, sync: Option<&mut dyn GradSync<B>>) -> Result<f32> {
        if let Input::Staged(s) = &input {
            // The area is free again whatever happens below: a staged batch is used once.
            self.busy[s.slot] = false;
        }
        ensure!(lr.is_finite() && lr >= 0.0, "learning rate must be a finite number >= 0, got {lr}");
        let images = self.compute_grads(input, targets)?;
        if let Some(sync) = sync {
            let lens: Vec<usize> = self.specs.iter().map(|(_, s)| s.iter().product()).collect();
            if sync.sync(&mut self.be, &mut self.grads, &lens, &mut self.acts.loss, images)? == 0 {
                return Err(NoImages.into());
            }
        }
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
        self.compute_grads(Input::Images(images), targets)?;
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
        self.compute_grads(Input::Images(images), targets)?;
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
        self.forward(b, false, None);
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
        let (dim, p) = (self.dims.dim, self.dims.prompts);
        let mut states = Vec::new();
        let mut hook = |be: &mut B, _l, x: &B::Buf, tokens| {
            let mut h = vec![0.0f32; b * tokens * dim];
            be.download(x, &mut h);
            if tokens > p {
                // Stored [CLS, patches, prompts]; shown in the model's order [CLS, prompts,
                // patches].
                for img in h.chunks_mut(tokens * dim) {
                    img[dim..].rotate_right(p * dim);
                }
            }
            states.push(h);
        };
        self.forward(b, false, Some(&mut hook));
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
    /// waits for the device: its errors surface at the next check. Returns the batch size.
    fn compute_grads(&mut self, input: Input<'_>, targets: &[f32]) -> Result<usize> {
        let (b, patches) = match input {
            Input::Nothing => {
                for (g, (_, shape)) in self.grads.iter_mut().zip(&self.specs) {
                    self.be.fill(g, shape.iter().product(), 0.0);
                }
                self.be.fill(&mut self.acts.loss, 1, 0.0);
                return Ok(0);
            }
            Input::Images(images) => {
                let b = self.batch_of(images, Some(targets))?;
                self.be.upload(images, &mut self.acts.images);
                (b, false)
            }
            Input::Staged(s) => {
                let k = self.dims.labels;
                ensure!(
                    targets.len() == s.batch * k,
                    "targets: got {} values for {} staged images, expected B*K = {}",
                    targets.len(),
                    s.batch,
                    s.batch * k
                );
                let d = self.dims;
                let shape = AugmentShape {
                    batch: s.batch,
                    size: d.image,
                    layout: AugmentLayout::Patches { patch: d.patch },
                    mean: s.mean,
                    std: s.std,
                };
                let areas = self.staging.as_ref().context("no staging area")?;
                self.be.augment(&areas[s.slot], &mut self.acts.patches, &shape);
                (s.batch, true)
            }
        };
        self.be.upload(targets, &mut self.acts.targets);
        self.forward(b, patches, None);
        self.loss(b);
        self.backward(b);
        Ok(b)
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

/// No rank of a data-parallel step had an image.
#[derive(Debug, thiserror::Error)]
#[error("no rank had an image in this batch")]
struct NoImages;

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

impl<B: Backend> Trainer<B> {
    /// Forward for `b` images already uploaded to `acts.images` (or, if `patches`, already in
    /// `acts.patches` as patch rows); leaves logits in `acts.logits`. `hook(backend, layer,
    /// output, tokens)`, if any, sees every block's output (`[B, tokens, D]`: all N tokens,
    /// except the last block's P prompt rows); with a hook, every block but the last computes
    /// its prompt rows' outputs too, which [`Dims::queries`] otherwise skips.
    fn forward(&mut self, b: usize, patches: bool, mut hook: Option<&mut BlockHook<B>>) {
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
        // Patch embedding, then the tokens [CLS, patches, prompts] with position embeddings.
        if !patches {
            be.patchify(&a.images, &mut a.patches, &d.patch_shape(b));
        }
        let embed = linear(b * d.num_patches, d.patch_len, d.dim);
        be.linear_forward(&a.patches, &w.patch.w, Some(&w.patch.b), &mut a.patch_emb, &embed);
        be.embed_tokens(&a.patch_emb, &w.cls, &w.pos, &mut a.xs[0], &tokens);
        for l in 0..d.depth {
            // Deep prompts replace the prompt rows at every block's input; shallow ones enter once.
            if d.deep || l == 0 {
                be.set_prompts(theta.prompts, if d.deep { l } else { 0 }, &mut a.xs[l], &tokens);
            }
            let (x, next) = a.xs[l..].split_first_mut().expect("a block input per block");
            let h = &mut a.head;
            let out = match next.first_mut() {
                Some(next) => BlockOut::Tokens {
                    next,
                    q: if hook.is_some() { Queries::All } else { d.queries() },
                },
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
            if let Some(hook) = hook.as_mut() {
                match next.first() {
                    Some(o) => hook(be, l, o, d.tokens),
                    None => hook(be, l, &h.zin, d.prompts),
                }
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
                BlockGrad::Tokens {
                    dx: &mut a.dx,
                    q: d.queries(),
                }
            };
            // Block 0's input gradient is read only at the prompts (prompt_grad below).
            let need = if l == 0 { InputGrad::Prompts } else { InputGrad::All };
            block_backward(be, &w.blocks[l], &a.layers[l], &mut a.work, &a.xs[l], grad, need, &block);
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
