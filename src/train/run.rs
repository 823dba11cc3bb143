//! The training driver: builds data, groups, backbone and trainer from the configs, runs the
//! epoch loop (one-cycle schedule, optional EMA), evaluates on the test split after every
//! epoch, appends to `metrics.jsonl` and writes the checkpoint. Resuming from a checkpoint
//! continues exactly: the batch order is a function of (seed, epoch) and every piece of state
//! that changes during training is in the checkpoint.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context};
use serde::{Deserialize, Serialize};

use crate::backend::{Backend, CpuBackend, Device, Precision, Selected};
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use crate::data::crops::CropBatch;
use crate::data::loader::{EpochStream, TestLoader, TrainLoader};
use crate::data::{self, derive_seed, DataConfig, Dataset};
use crate::dist::{shard, Job};
use crate::grouping::{self, Cooccurrence, GroupingConfig, GroupingMode};
use crate::metrics::{self, Metrics};
use crate::model::{Backbone, Method, ModelConfig, Params};
use crate::ops::asl::AslConfig;
use crate::train::checkpoint::{tables, RunState};
use crate::train::ema::Ema;
use crate::train::schedule::OneCycle;
use crate::train::step::{AdamWConfig, Crops, GradSync, Shard, Staged, Trainer};

/// File names inside a run's output folder.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
pub const METRICS_FILE: &str = "metrics.jsonl";
/// Images skipped (unreadable) or noticed (no labels) while loading real data.
pub const DATA_REPORT_FILE: &str = "data_report.txt";

/// Seed streams derived from the run's seed (see `data::derive_seed`).
const BACKBONE_STREAM: u64 = 0xB0;
const PARAMS_STREAM: u64 = 0xB1;
const AUGMENT_STREAM: u64 = 0xB2;

/// The optimisation settings of a run (stored in checkpoints).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    /// Peak learning rate of the one-cycle schedule.
    pub lr: f64,
    /// Fraction of all steps spent warming up.
    pub warmup_frac: f64,
    pub weight_decay: f64,
    /// EMA decay of the trainable weights, when on.
    pub ema: Option<f64>,
    #[serde(with = "grouping_mode_name")]
    pub grouping: GroupingMode,
    /// tau for both graphs (docs/MODEL.md#grouping-defaults).
    pub tau: f64,
    pub seed: u64,
    /// Decision threshold for CP/CR/CF1/OP/OR/OF1.
    pub threshold: f32,
}

impl TrainConfig {
    /// The demo's settings. The paper's lr is 5e-4 for 40 epochs on a pretrained ViT; the demo
    /// has a few epochs on a random backbone, whose prompt outputs vary only a few percent
    /// between images, and needs larger and more steps (lr 1e-2, batch 16: measured best of
    /// 3e-3, 1e-2, 2e-2, 5e-2).
    pub fn demo(seed: u64) -> Self {
        Self {
            epochs: 8,
            batch_size: 16,
            lr: 1e-2,
            warmup_frac: 0.2,
            weight_decay: 1e-2,
            ema: None,
            grouping: GroupingMode::Both,
            tau: 2.0,
            seed,
            threshold: 0.5,
        }
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(self.epochs >= 1, "epochs must be at least 1, got 0");
        ensure!(self.batch_size >= 1, "batch size must be at least 1, got 0");
        ensure!(
            self.lr.is_finite() && self.lr > 0.0,
            "learning rate must be a finite number > 0, got {}",
            self.lr
        );
        ensure!(
            self.warmup_frac.is_finite() && (0.0..=1.0).contains(&self.warmup_frac),
            "warm-up fraction must be in [0, 1], got {}",
            self.warmup_frac
        );
        ensure!(
            self.weight_decay.is_finite() && self.weight_decay >= 0.0,
            "weight decay must be a finite number >= 0, got {}",
            self.weight_decay
        );
        if let Some(d) = self.ema {
            ensure!(d.is_finite() && (0.0..1.0).contains(&d), "EMA decay must be in [0, 1), got {d}");
        }
        ensure!(
            self.tau.is_finite() && self.tau > 0.0,
            "tau must be a finite number > 0, got {}",
            self.tau
        );
        ensure!(
            self.threshold.is_finite() && self.threshold > 0.0 && self.threshold < 1.0,
            "threshold must be in (0, 1), got {}",
            self.threshold
        );
        Ok(())
    }

    /// Partitions the model gets: 2 for both/random, 1 for co/dc.
    pub fn branches(&self) -> usize {
        match self.grouping {
            GroupingMode::Both | GroupingMode::Random => 2,
            GroupingMode::Co | GroupingMode::Dc => 1,
        }
    }
}

/// Where the frozen backbone's weights come from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BackboneSource {
    /// `Backbone::random(model.vit, seed)`.
    Random { seed: u64 },
    /// A timm-format safetensors file, identified by its SHA-256 (`model.vit.image_size` may
    /// differ from the file's own: the position embeddings are resampled).
    File { path: PathBuf, sha256: String },
}

impl BackboneSource {
    /// A timm-format file as the backbone: its config (heads from `heads` or the width,
    /// image size `image_size` or the file's own), the source with its SHA-256, and notes.
    pub fn from_file(
        path: &Path,
        heads: Option<usize>,
        image_size: Option<usize>,
    ) -> anyhow::Result<(crate::model::VitConfig, Self, crate::model::timm::TimmInfo)> {
        let (b, info) = crate::model::timm::load_timm(path, heads, image_size)?;
        let sha256 = crate::model::timm::sha256_file(path)?;
        let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        Ok((b.config().clone(), BackboneSource::File { path, sha256 }, info))
    }

    /// The backbone's weights; a file must still have the recorded SHA-256 and shape.
    pub fn build(&self, model: &ModelConfig) -> anyhow::Result<Backbone> {
        match self {
            BackboneSource::Random { seed } => Ok(Backbone::random(&model.vit, *seed)),
            BackboneSource::File { path, sha256 } => {
                let actual = crate::model::timm::sha256_file(path)?;
                ensure!(
                    &actual == sha256,
                    "backbone file {} has SHA-256 {actual}, but the checkpoint was trained with {sha256} \
                     (--allow-backbone-mismatch uses it anyway)",
                    path.display()
                );
                let (b, _) = crate::model::timm::load_timm(path, Some(model.vit.heads), Some(model.vit.image_size))?;
                ensure!(
                    b.config() == &model.vit,
                    "backbone file {}: {}",
                    path.display(),
                    crate::model::ConfigError::BackboneMismatch {
                        expected: Box::new(model.vit.clone()),
                        got: Box::new(b.config().clone())
                    }
                );
                Ok(b)
            }
        }
    }
}

/// Stores `GroupingMode` by its command-line name (both|co|dc|random).
mod grouping_mode_name {
    use crate::grouping::GroupingMode;
    use clap::ValueEnum;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(m: &GroupingMode, s: S) -> Result<S::Ok, S::Error> {
        let v = m.to_possible_value().expect("every grouping mode has a name");
        s.serialize_str(v.get_name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<GroupingMode, D::Error> {
        let name = String::deserialize(d)?;
        GroupingMode::from_str(&name, false).map_err(|_| serde::de::Error::custom(format!("unknown grouping mode {name:?}")))
    }
}

/// What to run: the three configs.
#[derive(Clone, Debug, PartialEq)]
pub struct RunSpec {
    pub model: ModelConfig,
    pub data: DataConfig,
    pub train: TrainConfig,
    /// The frozen backbone; `None`: random, seeded from the run's seed.
    pub backbone: Option<BackboneSource>,
}

impl RunSpec {
    /// The embedded demo: synthetic K = 20 data, the demo ViT, demo training settings.
    pub fn demo(seed: u64) -> Self {
        Self {
            model: ModelConfig::demo(),
            data: DataConfig::Synthetic(data::SyntheticConfig::demo(seed)),
            train: TrainConfig::demo(seed),
            backbone: None,
        }
    }

    /// Every check that can be made before any work.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.train.validate()?;
        self.data.validate()?;
        self.model.validate(self.train.branches())?;
        ensure!(
            self.model.labels == self.data.labels(),
            "the model has K = {} labels but the data has {}",
            self.model.labels,
            self.data.labels()
        );
        ensure!(
            self.model.vit.image_size == self.data.image_size(),
            "the backbone takes {} px images but the data has {} px",
            self.model.vit.image_size,
            self.data.image_size()
        );
        ensure!(
            self.model.vit.channels == 3,
            "the data has 3 channels, the backbone {}",
            self.model.vit.channels
        );
        Ok(())
    }
}

/// How to run (not part of the results).
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Output folder (created if missing).
    pub out: PathBuf,
    /// Stop after this many completed epochs, as if interrupted (the schedule stays that of
    /// the full run, so `--resume` continues it exactly).
    pub stop_after: Option<usize>,
    /// Test hook: feed a NaN image at this global step to exercise the non-finite-loss stop.
    pub nan_at_step: Option<u64>,
    /// Where training runs (`auto` says which on stderr).
    pub device: Device,
    /// Storage precision of the CUDA backend (`None`: bf16); the CPU ignores it.
    pub precision: Option<Precision>,
    /// Where streamed training images are resized, flipped and normalized.
    pub augment_on: AugmentOn,
    /// This process's rank of a data-parallel job (`None`: a single process). Every rank runs
    /// the same settings; rank 0 alone writes the output folder.
    pub dist: Option<Arc<Job>>,
}

/// Where the training augmentation of streamed images (a cache or image files) runs.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AugmentOn {
    /// The loader's threads resize, flip and normalize; f32 images go to the backend.
    #[default]
    Host,
    /// The loader only cuts the crops; their uint8 bytes go to the backend, which resizes,
    /// flips and normalizes them (`ops::augment`, a kernel on a GPU) straight into the patch
    /// embedding's input. On a GPU the copy of the next batch overlaps the current step.
    Device,
}

/// Hooks for progress display; all default to doing nothing.
pub trait Observer {
    /// Before the first step: all steps of the run, and those already done (when resuming).
    fn on_start(&mut self, _total_steps: u64, _done_steps: u64) {}
    /// After each optimizer step: its loss, training images per second so far, and how the
    /// training time so far splits between waiting for batches and the steps.
    fn on_step(&mut self, _step: u64, _loss: f32, _images_per_s: f64, _time: &TimeSplit) {}
    /// After each evaluation, with the record written to `metrics.jsonl`.
    fn on_eval(&mut self, _record: &serde_json::Value) {}
    /// Training finished or stopped; any display should be cleared.
    fn on_finish(&mut self) {}
}

/// Training time, split between waiting for the next batch (the loader, or gathering from
/// memory) and the optimizer step itself, in seconds: a large data share means the loader, not
/// the step, sets the speed.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TimeSplit {
    pub data_s: f64,
    pub step_s: f64,
}

impl TimeSplit {
    /// The share of the time spent waiting for data, in [0, 1] (0 before any time passed).
    pub fn data_fraction(&self) -> f64 {
        let total = self.data_s + self.step_s;
        if total > 0.0 {
            self.data_s / total
        } else {
            0.0
        }
    }
}

/// An observer that shows nothing.
pub struct Silent;
impl Observer for Silent {}

/// What a finished run reports.
#[derive(Clone, Debug)]
pub struct Summary {
    pub epochs: usize,
    pub steps: u64,
    /// Wall time of this process's work (data, groups, training, evaluation), seconds.
    pub seconds: f64,
    /// Training images per second of optimizer steps (evaluation excluded).
    pub images_per_s: f64,
    /// Of that training time: waiting for batches vs in the steps.
    pub time: TimeSplit,
    /// The backend that trained (`Backend::name`).
    pub device: String,
    /// Mean training loss of the last epoch.
    pub final_loss: f64,
    pub metrics: Metrics,
    pub ema_metrics: Option<Metrics>,
    /// mAP (percent) of a constant score on the test split.
    pub constant_map: f64,
    pub checkpoint: PathBuf,
    pub metrics_log: PathBuf,
    pub class_names: Vec<String>,
}

/// The trainer for a model config, its groups, backbone and weights (CPU backend).
pub fn build_trainer<B: Backend>(
    backend: B,
    model: &ModelConfig,
    partitions: &[Vec<Vec<usize>>],
    backbone: &BackboneSource,
    params: Params,
    train: &TrainConfig,
) -> anyhow::Result<Trainer<B>> {
    let backbone = backbone.build(model)?;
    let opt = AdamWConfig {
        weight_decay: train.weight_decay,
        ..AdamWConfig::default()
    };
    Trainer::new(
        backend,
        model.clone(),
        &backbone,
        params,
        tables(partitions, model.labels),
        AslConfig::default(),
        opt,
        train.batch_size,
    )
}

/// Sigmoid probabilities `[n, K]` of every image of `data`, in batches of at most `max_batch`.
pub fn predict_probabilities<B: Backend>(trainer: &mut Trainer<B>, data: &Dataset, max_batch: usize) -> anyhow::Result<Vec<f32>> {
    let mut out = Vec::with_capacity(data.n * data.k);
    let l = data.image_len();
    for start in (0..data.n).step_by(max_batch.max(1)) {
        let end = (start + max_batch).min(data.n);
        let logits = trainer.predict(&data.images[start * l..end * l])?;
        out.extend(logits.iter().map(|&x| 1.0 / (1.0 + (-x).exp())));
    }
    Ok(out)
}

/// Sigmoid probabilities `[indices.len(), K]` of test images `indices` under the trainer's
/// weights and, with `ema`, under those weights too (the trainer's own are put back), from
/// one decoding pass, in batches of at most `max_batch`.
pub fn test_probabilities<B: Backend>(
    trainer: &mut Trainer<B>,
    test: &TestData,
    indices: &[usize],
    max_batch: usize,
    ema: Option<&Params>,
) -> anyhow::Result<(Vec<f32>, Option<Vec<f32>>)> {
    let own = ema.map(|_| trainer.params());
    let sigmoid = |x: &f32| 1.0 / (1.0 + (-x).exp());
    let (mut p, mut pe) = (Vec::with_capacity(indices.len() * test.k()), Vec::new());
    test.for_each_batch(indices, max_batch, |x| {
        p.extend(trainer.predict(x)?.iter().map(sigmoid));
        if let (Some(shadow), Some(own)) = (ema, &own) {
            trainer.set_params(shadow)?;
            let logits = trainer.predict(x);
            trainer.set_params(own)?;
            pe.extend(logits?.iter().map(sigmoid));
        }
        Ok(())
    })?;
    Ok((p, ema.map(|_| pe)))
}

/// Metrics of the trainer's current weights on the test split and, with `ema`, of those
/// weights (the trainer's own are kept).
pub fn evaluate<B: Backend>(
    trainer: &mut Trainer<B>,
    test: &TestData,
    ema: Option<&Params>,
    max_batch: usize,
    threshold: f32,
) -> anyhow::Result<(Metrics, Option<Metrics>)> {
    let all: Vec<usize> = (0..test.len()).collect();
    let (p, pe) = test_probabilities(trainer, test, &all, max_batch, ema)?;
    let (n, k) = (test.len(), test.k());
    let m = metrics::evaluate(&p, test.targets(), n, k, threshold);
    Ok((m, pe.map(|pe| metrics::evaluate(&pe, test.targets(), n, k, threshold))))
}

/// [`evaluate`] split over the ranks of `job`: each scores its share of the test set (in
/// batches of at most its trainer's `max_batch`), the scores are gathered in rank order (the
/// test set's order) and every rank computes the same metrics from them.
pub fn evaluate_sharded<B: Backend>(
    trainer: &mut Trainer<B>,
    test: &TestData,
    ema: Option<&Params>,
    job: &Job,
    threshold: f32,
) -> anyhow::Result<(Metrics, Option<Metrics>)> {
    let (n, k) = (test.len(), test.k());
    let mine: Vec<usize> = shard::split(n, job.rank(), job.world()).collect();
    let max_batch = trainer.max_batch();
    let (p, pe) = test_probabilities(trainer, test, &mine, max_batch, ema)?;
    let gather = |v: &[f32]| -> anyhow::Result<Vec<f32>> {
        let parts = job.control.all_gather(bytemuck::cast_slice(v))?;
        let all: Vec<f32> = parts
            .iter()
            .flat_map(|b| b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))))
            .collect();
        ensure!(all.len() == n * k, "gathered {} scores for {n} test images x {k} labels", all.len());
        Ok(all)
    };
    let p = gather(&p)?;
    let m = metrics::evaluate(&p, test.targets(), n, k, threshold);
    let em = match pe {
        Some(pe) => Some(metrics::evaluate(&gather(&pe)?, test.targets(), n, k, threshold)),
        None => None,
    };
    Ok((m, em))
}

/// An error unless every rank of `job` holds the same trainable parameters, bit for bit (a
/// SHA-256 of them, gathered); rank 0 notes the check on stderr.
fn check_identical<B: Backend>(trainer: &Trainer<B>, job: &Job, epoch: usize) -> anyhow::Result<()> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for t in &trainer.params().tensors {
        h.update(bytemuck::cast_slice::<f32, u8>(&t.data));
    }
    let mine = h.finalize().to_vec();
    let all = job.control.all_gather(&mine)?;
    if let Some(r) = all.iter().position(|d| d != &all[0]) {
        bail!(
            "after epoch {epoch} the parameters of rank {r} differ from rank 0's: the ranks diverged (a bug, or a \
             nondeterministic device)"
        );
    }
    if job.is_root() {
        let hex: String = mine[..8].iter().map(|b| format!("{b:02x}")).collect();
        eprintln!("epoch {epoch}: parameters identical on all {} ranks (sha256 {hex}...)", job.world());
    }
    Ok(())
}

/// Groups from the training split's co-occurrence (empty for plain VPT, which has none).
pub fn make_groups(spec: &RunSpec, lists: &[Vec<usize>]) -> anyhow::Result<Vec<Vec<Vec<usize>>>> {
    if spec.model.method == Method::Vpt {
        return Ok(Vec::new());
    }
    let co = Cooccurrence::from_label_lists(spec.model.labels, lists.iter().map(|l| l.as_slice()));
    let cfg = GroupingConfig {
        groups: spec.model.groups,
        tau_co: spec.train.tau,
        tau_dis: spec.train.tau,
        seed: spec.train.seed,
        ..GroupingConfig::default()
    };
    let parts = grouping::branches(&co, spec.train.grouping, &cfg).context("label grouping of the training split")?;
    Ok(parts.into_iter().map(|p| p.groups).collect())
}

/// A fresh run: validates everything, generates the data, groups the labels, initialises the
/// weights, writes the epoch-0 checkpoint (so a failure always leaves a good one) and trains.
pub fn train(spec: &RunSpec, opts: &RunOptions, obs: &mut dyn Observer) -> anyhow::Result<Summary> {
    let started = Instant::now();
    spec.validate()?;
    std::fs::create_dir_all(&opts.out).with_context(|| format!("cannot create output folder {}", opts.out.display()))?;
    let train_data = load_train(&spec.data, spec.train.seed, &opts.out, is_root(opts))?;
    let partitions = make_groups(spec, &train_data.label_lists())?;
    let params = Params::init(&spec.model, partitions.len(), derive_seed(spec.train.seed, PARAMS_STREAM));
    let state = RunState {
        model: spec.model.clone(),
        data: spec.data.clone(),
        train: spec.train.clone(),
        backbone: spec.backbone.clone().unwrap_or(BackboneSource::Random {
            seed: derive_seed(spec.train.seed, BACKBONE_STREAM),
        }),
        partitions,
        class_names: spec.data.class_names(),
        epoch: 0,
        step: 0,
        adam_m: params.zeros_like(),
        adam_v: params.zeros_like(),
        adam_step: 0,
        ema: spec.train.ema.map(|_| (params.clone(), 0)),
        params,
        history: Vec::new(),
    };
    run_from(state, train_data, opts, obs, started)
}

/// Continues the run saved in `path` (a checkpoint file, or a run folder holding one).
pub fn resume(path: &Path, opts: &RunOptions, obs: &mut dyn Observer) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let file = checkpoint_path(path);
    let state = RunState::load(&file)?;
    std::fs::create_dir_all(&opts.out).with_context(|| format!("cannot create output folder {}", opts.out.display()))?;
    let train_data = load_train(&state.data, state.train.seed, &opts.out, is_root(opts))?;
    run_from(state, train_data, opts, obs, started)
}

/// The training split: in memory (synthetic data) or streamed from image files or a cache
/// with augmentation, batch by batch.
pub enum TrainData {
    Memory(Dataset),
    Stream(Arc<TrainLoader>),
}

impl TrainData {
    pub fn len(&self) -> usize {
        match self {
            TrainData::Memory(d) => d.n,
            TrainData::Stream(l) => l.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn label_lists(&self) -> Vec<Vec<usize>> {
        match self {
            TrainData::Memory(d) => d.label_lists(),
            TrainData::Stream(l) => l.label_lists(),
        }
    }
}

/// The test split: in memory (synthetic data) or streamed from image files or a cache with
/// the test transform, batch by batch, so evaluating holds a couple of batches of images,
/// never the whole split.
pub enum TestData {
    Memory(Dataset),
    Stream(Arc<TestLoader>),
}

impl TestData {
    /// The test split of `data` and, for image files, its load report (unreadable images
    /// are found here and left out).
    pub fn open(data: &DataConfig) -> anyhow::Result<(Self, Option<data::LoadReport>)> {
        match data {
            DataConfig::Images(c) => {
                let (loader, report) = c.test_loader()?;
                Ok((TestData::Stream(Arc::new(loader)), Some(report)))
            }
            _ => Ok((TestData::Memory(data.test_split()?), None)),
        }
    }
    pub fn len(&self) -> usize {
        match self {
            TestData::Memory(d) => d.n,
            TestData::Stream(l) => l.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn k(&self) -> usize {
        match self {
            TestData::Memory(d) => d.k,
            TestData::Stream(l) => l.k,
        }
    }
    /// 0/1 targets `len() x k()`.
    pub fn targets(&self) -> &[f32] {
        match self {
            TestData::Memory(d) => &d.targets,
            TestData::Stream(l) => &l.targets,
        }
    }
    pub fn target(&self, i: usize) -> &[f32] {
        &self.targets()[i * self.k()..(i + 1) * self.k()]
    }
    /// mAP of a constant score (see [`data::constant_predictor_map`]).
    pub fn constant_map(&self) -> f64 {
        data::constant_map(self.targets(), self.k())
    }

    /// Calls `f` on the images of `indices` (in that order) in batches of at most
    /// `max_batch`; a streamed split decodes the next batch while `f` works on this one.
    pub fn for_each_batch(
        &self,
        indices: &[usize],
        max_batch: usize,
        mut f: impl FnMut(&[f32]) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let chunks = indices.chunks(max_batch.max(1));
        match self {
            TestData::Memory(d) => {
                let (mut x, mut y) = (Vec::new(), Vec::new());
                for c in chunks {
                    d.gather(c, &mut x, &mut y);
                    f(&x)?;
                }
            }
            TestData::Stream(l) => {
                let count = chunks.len();
                let rx = l.batches(chunks.map(<[usize]>::to_vec).collect());
                for _ in 0..count {
                    f(&rx.recv().context("the test image loader thread stopped")??)?;
                }
            }
        }
        Ok(())
    }
}

/// The training split; for image files the load report starts `out/data_report.txt`.
fn load_train(data: &DataConfig, seed: u64, out: &Path, root: bool) -> anyhow::Result<TrainData> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create output folder {}", out.display()))?;
    match data {
        DataConfig::Images(c) => {
            let (loader, report) = c.train_loader(derive_seed(seed, AUGMENT_STREAM))?;
            if root {
                write_report(out, &report, false)?;
            }
            Ok(TrainData::Stream(Arc::new(loader)))
        }
        _ => Ok(TrainData::Memory(data.train_split()?)),
    }
}

/// Writes (or appends) a split's load report and warns on stderr when images were skipped.
fn write_report(out: &Path, r: &data::LoadReport, append: bool) -> anyhow::Result<()> {
    let path = out.join(DATA_REPORT_FILE);
    if !r.skipped.is_empty() {
        eprintln!(
            "warning: {} of {} {} images are unreadable and skipped (listed in {})",
            r.skipped.len(),
            r.listed,
            r.split,
            path.display()
        );
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(r.to_text().as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Whether this process writes the output folder (a single process, or rank 0).
fn is_root(opts: &RunOptions) -> bool {
    opts.dist.as_ref().is_none_or(|j| j.is_root())
}

/// `path` itself if it is a file, else `path/checkpoint.safetensors`.
pub fn checkpoint_path(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join(CHECKPOINT_FILE)
    } else {
        path.to_path_buf()
    }
}

/// The epoch loop shared by fresh and resumed runs; `started` is when the command's work began.
fn run_from(
    state: RunState,
    train_data: TrainData,
    opts: &RunOptions,
    obs: &mut dyn Observer,
    started: Instant,
) -> anyhow::Result<Summary> {
    let ordinal = opts.dist.as_ref().map_or(0, |j| j.env.device);
    let root = is_root(opts);
    let selected = crate::backend::select_on(opts.device, opts.precision, ordinal, &mut |line| {
        if root {
            eprintln!("{line}")
        }
    })?;
    let Some(job) = opts.dist.clone() else {
        return match selected {
            Selected::Cpu(be) => run_on(be, state, train_data, opts, obs, started, None),
            #[cfg(feature = "cuda")]
            Selected::Cuda(be) => run_on(*be, state, train_data, opts, obs, started, None),
        };
    };
    match selected {
        Selected::Cpu(be) => {
            let mut sync = crate::dist::sync::HostSync { control: &job.control };
            run_on(be, state, train_data, opts, obs, started, Some((&mut sync, &job)))
        }
        #[cfg(feature = "cuda")]
        Selected::Cuda(be) => {
            let id = job
                .nccl_id
                .context("this rank runs on CUDA but rank 0 does not (every rank must be given the same --device)")?;
            let nccl = crate::dist::sync::Nccl::init(be.gpu(), &id, job.rank(), job.world())?;
            let mut sync = crate::dist::sync::NcclSync::new(nccl, &job.control, job.timeout);
            run_on(*be, state, train_data, opts, obs, started, Some((&mut sync, &job)))
        }
    }
}

/// A data-parallel run's gradient exchange and job.
type Dist<'a, B> = Option<(&'a mut dyn GradSync<B>, &'a Job)>;

/// [`run_from`] on an opened backend.
fn run_on<B: Backend>(
    backend: B,
    mut state: RunState,
    train_data: TrainData,
    opts: &RunOptions,
    obs: &mut dyn Observer,
    started: Instant,
    mut dist: Dist<'_, B>,
) -> anyhow::Result<Summary> {
    let root = dist.as_ref().is_none_or(|(_, j)| j.is_root());
    let (rank, world) = dist.as_ref().map_or((0, 1), |(_, j)| (j.rank(), j.world()));
    let (test_data, report) = TestData::open(&state.data)?;
    if let (Some(r), true) = (report, root) {
        write_report(&opts.out, &r, true)?;
    }
    let cfg = state.train.clone();
    // Each rank steps on its share of every global batch of `batch_size` images.
    let local_cfg = TrainConfig {
        batch_size: shard::per_rank(cfg.batch_size, world),
        ..cfg.clone()
    };
    let ck_path = opts.out.join(CHECKPOINT_FILE);
    let log_path = opts.out.join(METRICS_FILE);

    let mut trainer = build_trainer(
        backend,
        &state.model,
        &state.partitions,
        &state.backbone,
        state.params.clone(),
        &local_cfg,
    )?;
    trainer.set_optimizer_state(&state.adam_m, &state.adam_v, state.adam_step)?;
    let mut ema = match &state.ema {
        Some((shadow, updates)) => {
            let mut e = Ema::new(cfg.ema.unwrap_or_default(), shadow)?;
            e.updates = *updates;
            Some(e)
        }
        None => None,
    };

    // metrics.jsonl always equals the checkpoint's history (plus what this process adds).
    if root {
        rewrite_log(&log_path, &state.history)?;
        if state.epoch == 0 && state.step == 0 {
            state.save(&ck_path)?;
        }
    }

    if root && opts.augment_on == AugmentOn::Device && matches!(train_data, TrainData::Memory(_)) {
        eprintln!("note: --augment-on device applies to streamed images (--data); these are in memory, already normalized");
    }
    let n = train_data.len();
    let bs = cfg.batch_size;
    // Streamed images that could not be read, each reported once.
    let mut reported: std::collections::HashSet<String> = Default::default();
    let steps_per_epoch = n.div_ceil(bs) as u64;
    let total_steps = steps_per_epoch * cfg.epochs as u64;
    let schedule = OneCycle::new(cfg.lr, total_steps, cfg.warmup_frac);
    let last_epoch = opts.stop_after.map_or(cfg.epochs, |s| s.min(cfg.epochs));
    obs.on_start(total_steps, state.step);

    let (mut images, mut targets) = (Vec::new(), Vec::new());
    let mut train_seconds = 0.0f64;
    let mut images_done = 0usize;
    let mut time = TimeSplit::default();
    let mut final_loss = f64::NAN;
    let mut last_eval = None;
    let result = (|| -> anyhow::Result<()> {
        for epoch in state.epoch..last_epoch {
            let order = data::epoch_order(n, cfg.seed, epoch as u64);
            let epoch_start = Instant::now();
            let mut loss_sum = 0.0f64;
            // This rank's share of every global batch.
            let local = |batch: &[usize]| batch[shard::split(batch.len(), rank, world)].to_vec();
            let batches: Vec<Vec<usize>> = order.chunks(bs).map(local).collect();
            let mut feed = match &train_data {
                TrainData::Stream(l) if opts.augment_on == AugmentOn::Device => Feed::Crops {
                    rx: l.crop_epoch(batches.clone(), epoch as u64),
                    next: None,
                    norm: l.norm.mean_std(),
                },
                TrainData::Stream(l) => Feed::Images(l.epoch(batches.clone(), epoch as u64)),
                TrainData::Memory(_) => Feed::Memory,
            };
            let mut report_skipped = |skipped: Vec<(String, String)>| -> anyhow::Result<()> {
                for (name, why) in skipped {
                    if reported.insert(name.clone()) {
                        append_log(&opts.out.join(DATA_REPORT_FILE), &format!("  skipped (train) {name}: {why}"))?;
                        eprintln!("warning: skipped unreadable training image {name}: {why}");
                    }
                }
                Ok(())
            };
            let nbatches = order.chunks(bs).len();
            for (b, global) in order.chunks(bs).enumerate() {
                let step = state.step;
                let batch = &batches[b][..];
                let mut batch_n = batch.len();
                let waiting = Instant::now();
                let mut staged = None;
                match (&train_data, &mut feed) {
                    (TrainData::Stream(_), Feed::Images(rx)) => {
                        // The last batch's images are done with: the loader writes a later batch into them.
                        rx.recycle(std::mem::take(&mut images));
                        let got = rx.recv().context("the image loader thread stopped")?;
                        report_skipped(got.skipped)?;
                        (images, targets, batch_n) = (got.images, got.targets, got.n);
                    }
                    (TrainData::Stream(_), Feed::Crops { rx, next, norm }) => {
                        // One batch ahead: batch b + 1 is staged before batch b is stepped, so
                        // its copy to the device overlaps batch b's step.
                        let current = match next.take() {
                            Some(c) => c,
                            None => stage_next(&mut trainer, rx, *norm, &mut report_skipped)?,
                        };
                        if b + 1 < nbatches {
                            *next = Some(stage_next(&mut trainer, rx, *norm, &mut report_skipped)?);
                        }
                        batch_n = current.0.as_ref().map_or(0, |s| s.len());
                        (staged, targets) = (current.0, current.1);
                    }
                    (TrainData::Memory(d), _) => d.gather(batch, &mut images, &mut targets),
                    (TrainData::Stream(_), _) => unreachable!("a streamed split always has a loader"),
                }
                if batch_n == 0 && dist.is_none() {
                    // Every image of this batch is unreadable: the step is skipped but
                    // counted, so the schedule and resumption stay aligned.
                    state.step += 1;
                    continue;
                }
                time.data_s += waiting.elapsed().as_secs_f64();
                let stepping = Instant::now();
                if opts.nan_at_step == Some(step) && batch_n > 0 {
                    match staged {
                        // uint8 pixels cannot be NaN: a NaN target makes the loss NaN alike.
                        Some(_) => targets[0] = f32::NAN,
                        None => images[0] = f32::NAN,
                    }
                }
                let lr = schedule.lr(step);
                let stopped = || match root {
                    true => format!(
                        "training stopped at step {step} (epoch {}, batch {}); the last good checkpoint, {} \
                         (epoch {}), is kept (a smaller --lr may help)",
                        epoch + 1,
                        b + 1,
                        ck_path.display(),
                        state.epoch
                    ),
                    // Rank 0 writes the checkpoints; this rank has none to keep.
                    false => format!(
                        "rank {rank}: training stopped at step {step} (epoch {}, batch {}) (a smaller --lr may help)",
                        epoch + 1,
                        b + 1
                    ),
                };
                // The trainer refuses a non-finite loss itself; the check below keeps the
                // promise whatever the backend does.
                let loss = match dist.as_mut() {
                    Some((sync, _)) => {
                        let shard = match staged {
                            Some(s) => Shard::Staged(s),
                            None if batch_n == 0 => Shard::Empty,
                            None => Shard::Images(&images),
                        };
                        let t = if batch_n == 0 { &[][..] } else { &targets[..] };
                        let stepped = trainer.step_shard(shard, t, lr as f32, &mut **sync).map_err(|e| {
                            // The --lr hint fits a non-finite loss, not a failed peer.
                            let why = stopped();
                            match format!("{e:#}").contains("not finite") {
                                true => e.context(why),
                                false => e.context(why.replace(" (a smaller --lr may help)", "")),
                            }
                        })?;
                        match stepped {
                            Some(loss) => loss,
                            None => {
                                // No rank had a readable image: skipped but counted, as above.
                                state.step += 1;
                                continue;
                            }
                        }
                    }
                    None => match staged {
                        Some(s) => trainer.step_staged(s, &targets, lr as f32),
                        None => trainer.step(&images, &targets, lr as f32),
                    }
                    .with_context(stopped)?,
                };
                if !loss.is_finite() {
                    bail!("{}: the loss is {loss}", stopped());
                }
                if let Some(e) = ema.as_mut() {
                    e.update(&trainer.params())?;
                }
                time.step_s += stepping.elapsed().as_secs_f64();
                state.step += 1;
                loss_sum += loss as f64;
                images_done += if dist.is_some() { global.len() } else { batch_n };
                let elapsed = train_seconds + epoch_start.elapsed().as_secs_f64();
                obs.on_step(state.step, loss, images_done as f64 / elapsed.max(1e-9), &time);
            }
            train_seconds += epoch_start.elapsed().as_secs_f64();
            final_loss = loss_sum / order.chunks(bs).len() as f64;

            let (m, em) = match &dist {
                Some((_, job)) => {
                    let after = || match root {
                        true => format!(
                            "after epoch {} (the last good checkpoint, epoch {}, is kept)",
                            epoch + 1,
                            state.epoch
                        ),
                        false => format!("rank {rank}: after epoch {}", epoch + 1),
                    };
                    check_identical(&trainer, job, epoch + 1).with_context(after)?;
                    evaluate_sharded(&mut trainer, &test_data, ema.as_ref().map(|e| &e.shadow), job, cfg.threshold).with_context(after)?
                }
                None => evaluate(&mut trainer, &test_data, ema.as_ref().map(|e| &e.shadow), bs, cfg.threshold)?,
            };
            let record = metrics_record(
                epoch + 1,
                state.step,
                final_loss,
                schedule.lr(state.step - 1),
                &m,
                em.as_ref(),
                &state.class_names,
            );

            state.epoch = epoch + 1;
            state.params = trainer.params();
            let (mm, vv, t) = trainer.optimizer_state();
            state.adam_m = mm;
            state.adam_v = vv;
            state.adam_step = t;
            state.ema = ema.as_ref().map(|e| (e.shadow.clone(), e.updates));
            let line = serde_json::to_string(&record)?;
            state.history.push(line.clone());
            if root {
                state.save(&ck_path)?;
                append_log(&log_path, &line)?;
                obs.on_eval(&record);
            }
            last_eval = Some((m, em));
        }
        Ok(())
    })();
    obs.on_finish();
    result?;

    // A run resumed after its last epoch trained nothing here but still reports its metrics.
    let (metrics, ema_metrics) = match (last_eval, &dist) {
        (Some(both), _) => both,
        (None, Some((_, job))) => evaluate_sharded(&mut trainer, &test_data, ema.as_ref().map(|e| &e.shadow), job, cfg.threshold)?,
        (None, None) => evaluate(&mut trainer, &test_data, ema.as_ref().map(|e| &e.shadow), bs, cfg.threshold)?,
    };
    if final_loss.is_nan() {
        final_loss = state
            .history
            .last()
            .and_then(|r| serde_json::from_str::<serde_json::Value>(r).ok())
            .and_then(|r| r["loss"].as_f64())
            .unwrap_or(f64::NAN);
    }
    Ok(Summary {
        epochs: state.epoch,
        steps: state.step,
        seconds: started.elapsed().as_secs_f64(),
        images_per_s: if train_seconds > 0.0 {
            images_done as f64 / train_seconds
        } else {
            0.0
        },
        time,
        device: trainer.backend().name(),
        final_loss,
        metrics,
        ema_metrics,
        constant_map: test_data.constant_map(),
        checkpoint: ck_path,
        metrics_log: log_path,
        class_names: state.class_names,
    })
}

/// Where an epoch's training batches come from.
enum Feed {
    /// Gathered from the split in memory.
    Memory,
    /// Augmented f32 images from the loader's thread.
    Images(EpochStream),
    /// uint8 crops from the loader's thread, augmented on the backend; `next` is the batch
    /// staged one step ahead (with its targets), `norm` the images' (mean, std).
    Crops {
        rx: Receiver<CropBatch>,
        next: Option<(Option<Staged>, Vec<f32>)>,
        norm: ([f32; 3], [f32; 3]),
    },
}

/// The next crop batch from the loader, staged on the trainer's backend (`None` when every
/// image of it was unreadable), with its targets.
fn stage_next<B: Backend>(
    trainer: &mut Trainer<B>,
    rx: &Receiver<CropBatch>,
    (mean, std): ([f32; 3], [f32; 3]),
    report_skipped: &mut impl FnMut(Vec<(String, String)>) -> anyhow::Result<()>,
) -> anyhow::Result<(Option<Staged>, Vec<f32>)> {
    let got = rx.recv().context("the image loader thread stopped")?;
    report_skipped(got.skipped)?;
    if got.n == 0 {
        return Ok((None, got.targets));
    }
    let staged = trainer.stage(Crops {
        pixels: &got.pixels,
        crops: &got.crops,
        mean,
        std,
    })?;
    Ok((Some(staged), got.targets))
}

/// The metrics (of `Metrics::to_json`) each `metrics.jsonl` record carries.
pub const RECORD_KEYS: [&str; 8] = ["mAP", "mAP_noninterp", "CP", "CR", "CF1", "OP", "OR", "OF1"];

/// One line of `metrics.jsonl`: epoch, step, loss, lr, then the scalar metrics (mAP, CF1, OF1,
/// ...) and, with EMA on, the same metrics of the EMA weights prefixed `ema_`.
pub fn metrics_record(
    epoch: usize,
    step: u64,
    loss: f64,
    lr: f64,
    m: &Metrics,
    ema: Option<&Metrics>,
    class_names: &[String],
) -> serde_json::Value {
    let mut rec = serde_json::Map::new();
    rec.insert("epoch".into(), epoch.into());
    rec.insert("step".into(), step.into());
    rec.insert("loss".into(), loss.into());
    rec.insert("lr".into(), lr.into());
    let mut put = |prefix: &str, m: &Metrics| {
        let j = m.to_json(class_names);
        for key in RECORD_KEYS {
            rec.insert(format!("{prefix}{key}"), j[key].clone());
        }
    };
    put("", m);
    if let Some(e) = ema {
        put("ema_", e);
    }
    serde_json::Value::Object(rec)
}

fn rewrite_log(path: &Path, history: &[String]) -> anyhow::Result<()> {
    let mut text = String::new();
    for r in history {
        text.push_str(r);
        text.push('\n');
    }
    crate::train::checkpoint::write_atomic(path, text.as_bytes())
}

fn append_log(path: &Path, line: &str) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    writeln!(f, "{line}").with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// A checkpoint opened for evaluation or prediction: its state, a trainer holding its
/// weights, and its own test split regenerated from the stored data config (streamed for
/// image files).
pub struct Opened<B: Backend = CpuBackend> {
    pub path: PathBuf,
    pub state: RunState,
    pub trainer: Trainer<B>,
    pub test: TestData,
}

impl Opened<CpuBackend> {
    /// Opens a checkpoint on the CPU backend.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        Self::open_with(path, false)
    }

    /// [`Opened::open`]; with `allow_backbone_mismatch` a backbone file whose SHA-256 differs
    /// from the recorded one is used anyway (with a warning); its shape must still match.
    pub fn open_with(path: &Path, allow_backbone_mismatch: bool) -> anyhow::Result<Self> {
        let (path, state) = Self::load(path, allow_backbone_mismatch)?;
        Self::on(CpuBackend::new(), path, state)
    }

    /// Reads a checkpoint (a file, or a run folder holding one): its path and state. With
    /// `allow_backbone_mismatch` a backbone file whose SHA-256 differs from the recorded one is
    /// accepted (with a warning); its shape must still match.
    pub fn load(path: &Path, allow_backbone_mismatch: bool) -> anyhow::Result<(PathBuf, RunState)> {
        let path = checkpoint_path(path);
        let mut state = RunState::load(&path)?;
        if let (true, BackboneSource::File { path: file, sha256 }) = (allow_backbone_mismatch, &mut state.backbone) {
            let actual = crate::model::timm::sha256_file(file)?;
            if &actual != sha256 {
                eprintln!(
                    "warning: backbone file {} differs from the one this checkpoint was trained with (SHA-256 {actual}, recorded {sha256})",
                    file.display()
                );
                *sha256 = actual;
            }
        }
        Ok((path, state))
    }
}

impl<B: Backend> Opened<B> {
    /// Puts a checkpoint read by [`Opened::load`] on `backend`, with its test split.
    pub fn on(backend: B, path: PathBuf, state: RunState) -> anyhow::Result<Self> {
        let mut o = Self::model_on(backend, path, state)?;
        o.test = TestData::open(&o.state.data)?.0;
        Ok(o)
    }

    /// The checkpoint's model only on `backend`: `test` is left empty (n = 0), for scoring
    /// image files.
    pub fn model_on(backend: B, path: PathBuf, state: RunState) -> anyhow::Result<Self> {
        let trainer = build_trainer(
            backend,
            &state.model,
            &state.partitions,
            &state.backbone,
            state.params.clone(),
            &state.train,
        )?;
        let (k, size) = (state.model.labels, state.model.vit.image_size);
        let test = TestData::Memory(Dataset {
            n: 0,
            k,
            channels: 3,
            image_size: size,
            images: Vec::new(),
            targets: Vec::new(),
        });
        Ok(Self {
            path,
            state,
            trainer,
            test,
        })
    }

    /// Probabilities `[n, K]` of image files, prepared as the checkpoint's test images
    /// (resize, its normalization); unreadable files are returned apart, with why.
    pub fn predict_files(
        &mut self,
        files: &[PathBuf],
        use_ema: bool,
    ) -> anyhow::Result<(Vec<PathBuf>, Vec<f32>, Vec<data::images::Skipped>)> {
        let DataConfig::Images(c) = &self.state.data else {
            bail!("this checkpoint was trained on the procedural demo data, not on images: it cannot score image files");
        };
        let (size, norm) = (c.image_size, c.norm);
        use rayon::prelude::*;
        let loaded: Vec<Result<Vec<f32>, String>> = files
            .par_iter()
            .map(|f| {
                let img = data::images::load_rgb(f, size as u32)?;
                let mut v = vec![0f32; 3 * size * size];
                data::images::normalize_into(&img, norm, &mut v);
                Ok(v)
            })
            .collect();
        let (mut ok, mut skipped) = (Vec::new(), Vec::new());
        let mut d = Dataset {
            n: 0,
            k: self.state.model.labels,
            channels: 3,
            image_size: size,
            images: Vec::new(),
            targets: Vec::new(),
        };
        for (f, r) in files.iter().zip(loaded) {
            match r {
                Ok(v) => {
                    d.images.extend_from_slice(&v);
                    d.n += 1;
                    ok.push(f.clone());
                }
                Err(reason) => skipped.push(data::images::Skipped { path: f.clone(), reason }),
            }
        }
        d.targets = vec![0.0; d.n * d.k];
        if use_ema {
            let (shadow, _) = self
                .state
                .ema
                .as_ref()
                .context("this checkpoint was trained without --ema: it has no EMA weights")?;
            self.trainer.set_params(shadow)?;
        }
        let p = predict_probabilities(&mut self.trainer, &d, self.state.train.batch_size);
        if use_ema {
            self.trainer.set_params(&self.state.params)?;
        }
        Ok((ok, p?, skipped))
    }

    /// Metrics of the weights, and of the EMA weights when the checkpoint has them.
    pub fn evaluate(&mut self) -> anyhow::Result<(Metrics, Option<Metrics>)> {
        let (bs, th) = (self.state.train.batch_size, self.state.train.threshold);
        evaluate(
            &mut self.trainer,
            &self.test,
            self.state.ema.as_ref().map(|(shadow, _)| shadow),
            bs,
            th,
        )
    }

    /// Probabilities `[indices.len(), K]` for test images `indices` (all when empty), from the
    /// EMA weights when `use_ema` (an error if the checkpoint has none).
    pub fn predict(&mut self, indices: &[usize], use_ema: bool) -> anyhow::Result<(Vec<usize>, Vec<f32>)> {
        let n = self.test.len();
        let idx: Vec<usize> = if indices.is_empty() { (0..n).collect() } else { indices.to_vec() };
        if let Some(&bad) = idx.iter().find(|&&i| i >= n) {
            bail!(
                "index {bad} is out of range: the checkpoint's test split has {n} images (0..{})",
                n - 1
            );
        }
        if use_ema {
            let (shadow, _) = self
                .state
                .ema
                .as_ref()
                .context("this checkpoint was trained without --ema: it has no EMA weights")?;
            self.trainer.set_params(shadow)?;
        }
        let p = test_probabilities(&mut self.trainer, &self.test, &idx, self.state.train.batch_size, None);
        if use_ema {
            self.trainer.set_params(&self.state.params)?;
        }
        Ok((idx, p?.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_fraction_is_the_waiting_share() {
        assert_eq!(TimeSplit::default().data_fraction(), 0.0);
        let t = TimeSplit { data_s: 1.0, step_s: 3.0 };
        assert_eq!(t.data_fraction(), 0.25);
        assert_eq!(TimeSplit { data_s: 2.0, step_s: 0.0 }.data_fraction(), 1.0);
    }

    #[test]
    fn train_config_round_trips_with_grouping_names() {
        for (mode, name) in [
            (GroupingMode::Both, "both"),
            (GroupingMode::Co, "co"),
            (GroupingMode::Dc, "dc"),
            (GroupingMode::Random, "random"),
        ] {
            let c = TrainConfig {
                grouping: mode,
                ema: Some(0.99),
                ..TrainConfig::demo(4)
            };
            let j = serde_json::to_string(&c).unwrap();
            assert!(j.contains(&format!("\"grouping\":\"{name}\"")), "{j}");
            assert_eq!(serde_json::from_str::<TrainConfig>(&j).unwrap(), c);
        }
        let bad = serde_json::to_string(&TrainConfig::demo(0))
            .unwrap()
            .replace("\"both\"", "\"nope\"");
        assert!(serde_json::from_str::<TrainConfig>(&bad).unwrap_err().to_string().contains("nope"));
    }

    #[test]
    fn validation_names_the_setting() {
        let ok = TrainConfig::demo(0);
        ok.validate().unwrap();
        for (c, want) in [
            (TrainConfig { epochs: 0, ..ok.clone() }, "epochs"),
            (
                TrainConfig {
                    batch_size: 0,
                    ..ok.clone()
                },
                "batch size",
            ),
            (TrainConfig { lr: -1.0, ..ok.clone() }, "learning rate"),
            (
                TrainConfig {
                    lr: f64::INFINITY,
                    ..ok.clone()
                },
                "learning rate",
            ),
            (
                TrainConfig {
                    warmup_frac: 1.5,
                    ..ok.clone()
                },
                "warm-up",
            ),
            (
                TrainConfig {
                    weight_decay: -0.1,
                    ..ok.clone()
                },
                "weight decay",
            ),
            (
                TrainConfig {
                    ema: Some(1.0),
                    ..ok.clone()
                },
                "EMA decay",
            ),
            (TrainConfig { tau: 0.0, ..ok.clone() }, "tau"),
            (
                TrainConfig {
                    threshold: 1.0,
                    ..ok.clone()
                },
                "threshold",
            ),
        ] {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        let mut spec = RunSpec::demo(0);
        spec.model.labels = 10;
        assert!(spec.validate().unwrap_err().to_string().contains("K = 10"));
        let mut spec = RunSpec::demo(0);
        spec.model.vit.image_size = 64;
        assert!(spec.validate().unwrap_err().to_string().contains("64 px"));
        RunSpec::demo(0).validate().unwrap();
    }
}
