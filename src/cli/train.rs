//! `mlvpt train`: with no data arguments, the embedded demo (procedural K = 20 data, a small
//! random frozen ViT); `--resume` continues a saved run exactly.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Args};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use anyhow::{bail, ensure};

use super::{launch, Device, Precision};
use mlvpt::data::{DataConfig, ImageDataConfig, Norm};
use mlvpt::grouping::GroupingMode;
use mlvpt::model::{GateMode, Method, PromptDepth};
use mlvpt::train::preset::{Preset, PRESET_IMAGE_SIZE};
use mlvpt::train::run::{self, AugmentOn, BackboneSource, Observer, RunOptions, RunSpec, Summary, TimeSplit};

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("settings").multiple(true)))]
pub struct TrainArgs {
    /// Output folder for metrics.jsonl and checkpoint.safetensors [default: runs/demo, or the
    /// resumed run's folder].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Continue the run saved in DIR (or in a checkpoint FILE) exactly; its settings come from
    /// the checkpoint.
    #[arg(long, value_name = "DIR_OR_FILE", conflicts_with = "settings")]
    pub resume: Option<PathBuf>,
    /// Stop after this many epochs, as if interrupted; `--resume` continues the same schedule.
    #[arg(long, value_name = "N")]
    pub stop_after: Option<usize>,

    /// Epochs [default: 8].
    #[arg(long, group = "settings")]
    pub epochs: Option<usize>,
    /// Images per step [default: 16].
    #[arg(long, group = "settings")]
    pub batch_size: Option<usize>,
    /// Peak learning rate of the one-cycle schedule [default: 1e-2].
    #[arg(long, group = "settings")]
    pub lr: Option<f64>,
    /// Seed of everything: data, backbone, weights, batch order, grouping [default: 0].
    #[arg(long, group = "settings")]
    pub seed: Option<u64>,
    /// Keep an exponential moving average of the weights with this decay (e.g. 0.99) and
    /// evaluate it too.
    #[arg(long, value_name = "DECAY", group = "settings")]
    pub ema: Option<f64>,

    /// ML-VPT, or plain VPT for comparison [default: mlvpt].
    #[arg(long, value_enum, group = "settings")]
    pub method: Option<Method>,
    /// Which label partitions the model gets [default: both].
    #[arg(long, value_enum, group = "settings")]
    pub grouping: Option<GroupingMode>,
    /// Gate vectors per label or per group [default: label].
    #[arg(long, value_enum, group = "settings")]
    pub gate: Option<GateMode>,
    /// Experts (prompt tokens) per group, E [default: 2].
    #[arg(long, group = "settings")]
    pub experts: Option<usize>,
    /// Groups per partition, T [default: 3].
    #[arg(long, group = "settings")]
    pub groups: Option<usize>,
    /// Prompts at every layer or before the first only [default: deep].
    #[arg(long, value_enum, group = "settings")]
    pub prompt_depth: Option<PromptDepth>,
    /// Smoothing exponent of both label graphs [default: 2].
    #[arg(long, group = "settings")]
    pub tau: Option<f64>,

    /// Labels K of the procedural data [default: 20].
    #[arg(long, group = "settings")]
    pub labels: Option<usize>,
    /// Training images of the procedural data [default: 1024].
    #[arg(long, value_name = "N", group = "settings")]
    pub train_images: Option<usize>,
    /// Test images of the procedural data [default: 512].
    #[arg(long, value_name = "N", group = "settings")]
    pub test_images: Option<usize>,
    /// Image side in pixels (data and backbone) [default: 32].
    #[arg(long, group = "settings")]
    pub image_size: Option<usize>,
    /// Backbone patch size [default: 4].
    #[arg(long, group = "settings")]
    pub patch: Option<usize>,
    /// Backbone width D [default: 96]; the MLP is 4 D wide.
    #[arg(long, group = "settings")]
    pub dim: Option<usize>,
    /// Backbone blocks [default: 4].
    #[arg(long, group = "settings")]
    pub depth: Option<usize>,
    /// Attention heads (must divide the width) [default: 4].
    #[arg(long, group = "settings")]
    pub heads: Option<usize>,

    /// Real data: voc2007:PATH, coco2014:PATH or manifest:FILE[,classes=FILE][,test=FILE]
    /// (the image size is the backbone's; K comes from the classes).
    #[arg(long, value_name = "SPEC", group = "settings", conflicts_with_all = ["labels", "train_images", "test_images"])]
    pub data: Option<String>,
    /// Frozen backbone from a timm-format .safetensors file (shape inferred from it; heads
    /// from --heads or the width; --image-size resamples the position embeddings).
    #[arg(long, value_name = "FILE", group = "settings", conflicts_with_all = ["patch", "dim", "depth"])]
    pub weights: Option<PathBuf>,
    /// The paper's settings for a dataset (T, E, lr, batch 64, 40 epochs, image 224 with
    /// --weights); other options override them.
    #[arg(long, value_enum, group = "settings")]
    pub preset: Option<Preset>,
    /// Normalization constants of the images [default: imagenet].
    #[arg(long, value_enum, group = "settings")]
    pub norm: Option<Norm>,

    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    /// Storage precision on CUDA [default: bf16]: bf16 activations and frozen weights with
    /// fp32 accumulation, parameters, gradients and optimizer state; or f32 everywhere (TF32
    /// GEMMs, for comparisons). The CPU backend always computes in f32: there the option is
    /// ignored with a note.
    #[arg(long, value_enum)]
    pub precision: Option<Precision>,
    /// Where streamed training images (--data, a cache or image files) are resized, flipped
    /// and normalized: by the loader's threads (host), or on the backend from their uint8
    /// crops (device: a kernel on CUDA, with the next batch's copy overlapping the step).
    #[arg(long, value_enum, default_value_t = AugmentOn::Host)]
    pub augment_on: AugmentOn,
    /// Data-parallel training on this machine's GPUs: a count N (GPUs 0..N) or a list of
    /// device numbers (0,2); one process per GPU, gradients summed with NCCL. `--batch-size`
    /// stays the global batch. Under torchrun or SLURM leave it out: each process is one rank.
    #[arg(long, value_name = "N|LIST")]
    pub gpus: Option<String>,
    /// Seconds a data-parallel rank waits for the others, at start-up and in each exchange,
    /// before it gives up with an error.
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    pub dist_timeout: u64,
    /// No progress bar or per-epoch lines (the final summary is still printed).
    #[arg(long)]
    pub quiet: bool,
    /// Test hook: a NaN image at this global step, to check the non-finite-loss stop.
    #[arg(long, hide = true)]
    pub debug_nan_at_step: Option<u64>,
}

impl TrainArgs {
    /// The demo's configs with every given option applied.
    pub fn spec(&self) -> RunSpec {
        let seed = self.seed.unwrap_or(0);
        let mut spec = RunSpec::demo(seed);
        if let Some(p) = self.preset {
            p.apply(&mut spec);
        }
        let (m, t) = (&mut spec.model, &mut spec.train);
        macro_rules! set {
            ($($field:expr => $opt:expr),* $(,)?) => { $( if let Some(v) = $opt { $field = v; } )* };
        }
        if let DataConfig::Synthetic(d) = &mut spec.data {
            set!(d.labels => self.labels, d.train => self.train_images, d.test => self.test_images,
                 d.image_size => self.image_size);
        }
        set!(t.epochs => self.epochs, t.batch_size => self.batch_size, t.lr => self.lr,
             t.grouping => self.grouping, t.tau => self.tau,
             m.method => self.method, m.gate => self.gate, m.experts => self.experts,
             m.groups => self.groups, m.prompt_depth => self.prompt_depth,
             m.labels => self.labels,
             m.vit.image_size => self.image_size,
             m.vit.patch => self.patch, m.vit.depth => self.depth, m.vit.heads => self.heads);
        if let Some(dim) = self.dim {
            m.vit.dim = dim;
            m.vit.mlp_dim = 4 * dim;
        }
        t.ema = self.ema;
        spec
    }

    /// [`TrainArgs::spec`] with `--weights` (the backbone's shape comes from the file) and
    /// `--data` (real images; K from its classes) applied.
    pub fn full_spec(&self) -> anyhow::Result<RunSpec> {
        let mut spec = self.spec();
        if let Some(w) = &self.weights {
            let size = self.image_size.or(self.preset.map(|_| PRESET_IMAGE_SIZE));
            let (vit, source, info) = BackboneSource::from_file(w, self.heads, size)?;
            for note in &info.ignored {
                eprintln!("note: {}: ignoring tensor {note}", w.display());
            }
            if info.resampled {
                eprintln!(
                    "note: position embeddings resampled from {} px to {} px (bicubic)",
                    info.native_image_size, vit.image_size
                );
            }
            spec.model.vit = vit;
            spec.backbone = Some(source);
        }
        if let Some(d) = &self.data {
            let size = spec.model.vit.image_size;
            let c = ImageDataConfig::parse(d, size, self.norm.unwrap_or_default())?;
            spec.model.labels = c.classes.len();
            spec.data = DataConfig::Images(c);
        }
        Ok(spec)
    }
}

pub fn run(args: &TrainArgs) -> anyhow::Result<()> {
    if let Some(0) = args.stop_after {
        anyhow::bail!("--stop-after must be at least 1, got 0");
    }
    ensure!(args.dist_timeout > 0, "--dist-timeout must be at least 1 second");
    let timeout = Duration::from_secs(args.dist_timeout);
    if let Some(g) = &args.gpus {
        let gpus = launch::parse_gpus(g)?;
        if let Some(env) = mlvpt::dist::LaunchEnv::from_env()? {
            bail!(
                "--gpus starts its own ranks, but this process is already rank {} of {} ({}): leave --gpus out",
                env.rank,
                env.world,
                env.launcher
            );
        }
        if args.resume.is_none() {
            // Every setting is checked once, before any process starts.
            args.full_spec()?.validate()?;
        }
        return launch::launch(&gpus, args.device);
    }
    let job = launch::join_job(args.device, timeout)?;
    let result = train_as(args, job.clone());
    if let Some(j) = &job {
        match &result {
            Ok(()) => j.control.finish(),
            Err(e) => j.control.abort(&format!("{e:#}")),
        }
    }
    result
}

fn train_as(args: &TrainArgs, job: Option<std::sync::Arc<mlvpt::dist::Job>>) -> anyhow::Result<()> {
    let root = job.as_ref().is_none_or(|j| j.is_root());
    let mut progress = Progress::new(args.quiet || !root);
    let summary = match &args.resume {
        Some(from) => {
            let out = match &args.out {
                Some(o) => o.clone(),
                None => run::checkpoint_path(from).parent().map(PathBuf::from).unwrap_or_default(),
            };
            let opts = RunOptions {
                out,
                stop_after: args.stop_after,
                nan_at_step: args.debug_nan_at_step,
                device: args.device,
                precision: args.precision,
                augment_on: args.augment_on,
                dist: job.clone(),
            };
            run::resume(from, &opts, &mut progress)?
        }
        None => {
            let spec = args.full_spec()?;
            // Every setting is checked before any work (data, groups, weights).
            spec.validate()?;
            let out = args.out.clone().unwrap_or_else(|| PathBuf::from("runs/demo"));
            let opts = RunOptions {
                out,
                stop_after: args.stop_after,
                nan_at_step: args.debug_nan_at_step,
                device: args.device,
                precision: args.precision,
                augment_on: args.augment_on,
                dist: job.clone(),
            };
            run::train(&spec, &opts, &mut progress)?
        }
    };
    if root {
        print_summary(&summary);
    }
    Ok(())
}

/// The indicatif bar over steps (hidden with --quiet or when stderr is not a terminal), plus
/// one line per epoch.
struct Progress {
    bar: Option<ProgressBar>,
    quiet: bool,
}

impl Progress {
    fn new(quiet: bool) -> Self {
        Self { bar: None, quiet }
    }
}

impl Observer for Progress {
    fn on_start(&mut self, total: u64, done: u64) {
        if self.quiet || !std::io::stderr().is_terminal() {
            return;
        }
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta}]")
                .expect("static template")
                .progress_chars("=> "),
        );
        bar.set_position(done);
        bar.enable_steady_tick(Duration::from_millis(200));
        self.bar = Some(bar);
    }

    fn on_step(&mut self, step: u64, loss: f32, images_per_s: f64, time: &TimeSplit) {
        if let Some(b) = &self.bar {
            b.set_position(step);
            let data = 100.0 * time.data_fraction();
            b.set_message(format!("loss {loss:.4}  {images_per_s:.0} img/s  waiting for data {data:.0}%"));
        }
    }

    fn on_eval(&mut self, r: &serde_json::Value) {
        if self.quiet {
            return;
        }
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        let mut line = format!(
            "epoch {}  step {}  loss {:.4}  mAP {:.2}  CF1 {:.2}  OF1 {:.2}",
            r["epoch"],
            r["step"],
            f("loss"),
            f("mAP"),
            f("CF1"),
            f("OF1")
        );
        if r.get("ema_mAP").is_some() {
            line += &format!("  EMA mAP {:.2}", f("ema_mAP"));
        }
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }

    fn on_finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

fn print_summary(s: &Summary) {
    let row = |k: &str, v: String| println!("  {k:<22}{v}");
    println!("training summary");
    row("epochs", s.epochs.to_string());
    row("steps", s.steps.to_string());
    row("time", format!("{:.1} s", s.seconds));
    row("images/s", format!("{:.1}", s.images_per_s));
    let data = s.time.data_fraction();
    // A loader that holds the step back more than a quarter of the time is worth a user's action.
    let hint = if data > 0.25 {
        "  (the loader is the bottleneck: `mlvpt prepare` a cache, or more cores)"
    } else {
        ""
    };
    let training = s.time.data_s + s.time.step_s;
    row(
        "waiting for data",
        format!("{:.1} s of {training:.1} s training ({:.0}%){hint}", s.time.data_s, 100.0 * data),
    );
    row("device", s.device.clone());
    row("final loss", format!("{:.4}", s.final_loss));
    let m = &s.metrics;
    row("test mAP", format!("{:.2}", m.map));
    row("test CF1 / OF1", format!("{:.2} / {:.2}", m.class.f1, m.overall.f1));
    if let Some(e) = &s.ema_metrics {
        row("EMA test mAP", format!("{:.2}", e.map));
        row("EMA test CF1 / OF1", format!("{:.2} / {:.2}", e.class.f1, e.overall.f1));
    }
    row(
        "constant-score mAP",
        format!("{:.2}  (every image the same score: the floor)", s.constant_map),
    );
    row("checkpoint", s.checkpoint.display().to_string());
    row("metrics", s.metrics_log.display().to_string());
}
