//! `mlvpt bench-step`: times training steps (forward, ASL, backward, AdamW) on random weights
//! and inputs at a model size and batch, and prints images/s and the effective TFLOP/s against
//! the FLOPs a step needs (`mlvpt::train::flops`).

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::{launch, Device, Precision};
use mlvpt::backend::{Backend, Selected};
use mlvpt::dist::sync::HostSync;
use mlvpt::dist::{Job, LaunchEnv};
use mlvpt::model::{Method, ModelConfig, VitConfig};
use mlvpt::ops::attention::{BwdTiles, FwdTiles, BWD_TILES, FUSED_HEAD_DIMS, FWD_TILES};
use mlvpt::ops::head::HeadKernels;
use mlvpt::train::bench::{self, RandomProblem, StepTimes, BRANCHES};
use mlvpt::train::flops::{self, StepFlops};
use mlvpt::train::peak::{self, Isa};
use mlvpt::train::GradSync;

/// Model sizes `--model` accepts, and their backbones (random weights).
type Backbone = fn() -> VitConfig;
const MODELS: &[(&str, Backbone)] = &[
    ("tiny", VitConfig::demo),
    ("vit-s16", VitConfig::vit_s16),
    ("vit-b16", VitConfig::vit_b16),
    ("vit-l16", VitConfig::vit_l16),
];

/// Default batch on a GPU (issue 8's comparison point) and on the CPU (a step of ViT-B/16 at 8
/// images takes seconds there).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub const DEFAULT_BATCH_CUDA: usize = 128;
pub const DEFAULT_BATCH_CPU: usize = 8;

#[derive(Args, Debug)]
pub struct BenchStepArgs {
    /// Backbone size: tiny (the demo's: 32 px, patch 4, D 96, 4 blocks), vit-s16, vit-b16 (the
    /// paper's setting) or vit-l16; random frozen weights.
    #[arg(long, value_name = "tiny|vit-s16|vit-b16|vit-l16", default_value = "vit-b16")]
    pub model: String,
    /// Image side in pixels [default: the model's, 224; tiny 32].
    #[arg(long, value_name = "PX")]
    pub image_size: Option<usize>,
    /// Images per step [default: 128 on CUDA, 8 on the CPU].
    #[arg(long, value_name = "N")]
    pub batch: Option<usize>,
    /// Labels K.
    #[arg(long, value_name = "K", default_value_t = 80)]
    pub classes: usize,
    /// Groups per label partition, T.
    #[arg(long, value_name = "T", default_value_t = 5)]
    pub groups: usize,
    /// Experts (prompt tokens) per group, E.
    #[arg(long, value_name = "E", default_value_t = 3)]
    pub experts: usize,
    /// ML-VPT (two partitions: P = 2 T E prompts per layer) or plain VPT (10 prompts).
    #[arg(long, value_enum, default_value_t = Method::MlVpt)]
    pub method: Method,
    /// Untimed steps first (allocation, kernel loading, clocks).
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub warmup: usize,
    /// Timed steps.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub steps: usize,
    /// Seed of the random weights and inputs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where the steps run (as for `mlvpt train`).
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    /// Storage precision on CUDA [default: bf16] (as for `mlvpt train`; ignored on the CPU
    /// with a note).
    #[arg(long, value_enum)]
    pub precision: Option<Precision>,
    /// Fused attention kernels to use instead of the defaults on CUDA: a forward and a backward
    /// of `ops::attention::FWD_TILES` / `BWD_TILES` for the model's head dim, comma-separated
    /// (e.g. `attn_fwd_d64_r64p,attn_bwd_d64_split`), to measure the alternatives in a whole step.
    #[arg(long, value_name = "FWD,BWD")]
    pub attention_kernels: Option<String>,
    /// The head's contraction kernels (adapters, MoE) on CUDA: `mma` (tensor cores, the
    /// default) or `fp32` (CUDA cores), to measure both in a whole step.
    #[arg(long, value_name = "mma|fp32")]
    pub head_kernels: Option<String>,
    /// Print one JSON line instead of the table: impl, model, batch, images_per_s, ms_per_step,
    /// tflops, flops_per_step, device, and more.
    #[arg(long)]
    pub json: bool,
    /// Data-parallel scaling: the step on 1 GPU (the first listed), then on these N GPUs (a
    /// count, or a list of device numbers), one process each, `--batch` images per GPU and
    /// the gradients all-reduced with NCCL every step; reports images/s per GPU and the scaling
    /// efficiency (per-GPU rate on N over the rate on 1).
    #[arg(long, value_name = "N|LIST")]
    pub gpus: Option<String>,
    /// Seconds a data-parallel rank waits for the others before it gives up.
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    pub dist_timeout: u64,
}

/// The kernels `--head-kernels` names.
fn head_kernels(name: &str) -> Result<HeadKernels> {
    HeadKernels::from_name(name.trim()).ok_or_else(|| {
        let names: Vec<&str> = HeadKernels::ALL.iter().map(|k| k.name()).collect();
        anyhow::anyhow!("--head-kernels: unknown '{name}' (expected one of {})", names.join(", "))
    })
}

/// The forward and backward kernels `--attention-kernels` names, checked against the compiled
/// ones and the model's head dim.
fn attention_tiles(spec: &str, head_dim: usize) -> Result<(FwdTiles, BwdTiles)> {
    let Some((f, b)) = spec.split_once(',') else {
        bail!("--attention-kernels expects FWD,BWD (two kernel names), got '{spec}'");
    };
    if !FUSED_HEAD_DIMS.contains(&head_dim) {
        bail!("--attention-kernels: the model's head dim {head_dim} has no fused attention kernels (they cover {FUSED_HEAD_DIMS:?})");
    }
    let names = |it: &mut dyn Iterator<Item = (&'static str, usize)>| {
        it.filter(|&(_, dh)| dh == head_dim).map(|(k, _)| k).collect::<Vec<_>>().join(", ")
    };
    let fwd = FWD_TILES
        .iter()
        .find(|t| t.kernel == f.trim() && t.head_dim == head_dim)
        .copied()
        .ok_or_else(|| {
            anyhow::anyhow!(
                "--attention-kernels: no forward '{}' for head dim {head_dim} (compiled: {})",
                f.trim(),
                names(&mut FWD_TILES.iter().map(|t| (t.kernel, t.head_dim)))
            )
        })?;
    let bwd = BWD_TILES
        .iter()
        .find(|t| t.kernel == b.trim() && t.head_dim == head_dim)
        .copied()
        .ok_or_else(|| {
            anyhow::anyhow!(
                "--attention-kernels: no backward '{}' for head dim {head_dim} (compiled: {})",
                b.trim(),
                names(&mut BWD_TILES.iter().map(|t| (t.kernel, t.head_dim)))
            )
        })?;
    Ok((fwd, bwd))
}

impl BenchStepArgs {
    /// The model configuration, checked (before any device is opened).
    pub fn config(&self) -> Result<ModelConfig> {
        let Some((_, vit)) = MODELS.iter().find(|(name, ..)| *name == self.model) else {
            let names: Vec<&str> = MODELS.iter().map(|m| m.0).collect();
            bail!("unknown model '{}' (expected one of {})", self.model, names.join(", "));
        };
        if self.batch == Some(0) {
            bail!("--batch must be at least 1, got 0");
        }
        if self.steps == 0 {
            bail!("--steps must be at least 1, got 0");
        }
        let mut vit = vit();
        if let Some(s) = self.image_size {
            vit.image_size = s;
        }
        let cfg = ModelConfig {
            vit,
            labels: self.classes,
            groups: self.groups,
            experts: self.experts,
            method: self.method,
            ..ModelConfig::demo()
        };
        cfg.validate(BRANCHES).map_err(|e| anyhow::anyhow!("{e}"))?;
        if let Some(spec) = &self.attention_kernels {
            attention_tiles(spec, cfg.vit.dim / cfg.vit.heads)?;
        }
        if let Some(name) = &self.head_kernels {
            head_kernels(name)?;
        }
        Ok(cfg)
    }
}

pub fn run(args: &BenchStepArgs) -> Result<()> {
    if let Some(g) = &args.gpus {
        let gpus = launch::parse_gpus(g)?;
        if let Some(env) = LaunchEnv::from_env()? {
            bail!(
                "--gpus starts its own ranks, but this process is already rank {} of {} ({}): leave --gpus out",
                env.rank,
                env.world,
                env.launcher
            );
        }
        args.config()?;
        return scaling(args, &gpus);
    }
    anyhow::ensure!(args.dist_timeout > 0, "--dist-timeout must be at least 1 second");
    let job = launch::join_job(args.device, Duration::from_secs(args.dist_timeout))?;
    let result = bench(args, job.as_deref());
    if let Some(j) = &job {
        match &result {
            Ok(()) => j.control.finish(),
            Err(e) => j.control.abort(&format!("{e:#}")),
        }
    }
    result
}

/// `--gpus`: the step on the first GPU alone, then on all of them (one child process each,
/// printing JSON), and the scaling between the two.
fn scaling(args: &BenchStepArgs, gpus: &[usize]) -> Result<()> {
    let mut child = launch::child_args();
    if !args.json {
        child.push("--json".into());
    }
    let rate = |on: &[usize]| -> Result<(f64, serde_json::Value)> {
        let out = launch::launch_with(on, args.device, child.clone(), true)?.unwrap_or_default();
        let line = out.lines().rev().find(|l| l.starts_with('{')).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("bench-step on {} GPU(s) printed no result ({e}): {out:?}", on.len()))?;
        let ips = v["images_per_s"]
            .as_f64()
            .ok_or_else(|| anyhow::anyhow!("bench-step printed no images_per_s"))?;
        Ok((ips, v))
    };
    let (one, one_json) = rate(&gpus[..1])?;
    let (all, all_json) = if gpus.len() > 1 { rate(gpus)? } else { (one, one_json.clone()) };
    let n = gpus.len() as f64;
    let efficiency = all / n / one;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "gpus": gpus,
                "images_per_s_1gpu": one,
                "images_per_s": all,
                "images_per_s_per_gpu": all / n,
                "scaling_efficiency": efficiency,
                "one_gpu": one_json,
                "all_gpus": all_json,
            })
        );
    } else {
        let row = |k: &str, v: String| println!("  {k:<22}{v}");
        println!("bench-step, data-parallel");
        row("model", format!("{}, batch {} per GPU", args.model, one_json["batch"]));
        row("device", one_json["device"].as_str().unwrap_or_default().to_string());
        row("1 GPU", format!("{one:.1} images/s (GPU {})", gpus[0]));
        row(
            &format!("{} GPUs", gpus.len()),
            format!("{all:.1} images/s, {:.1} per GPU ({gpus:?})", all / n),
        );
        row("scaling efficiency", format!("{:.1}%", 100.0 * efficiency));
    }
    Ok(())
}

/// One process's measurement: alone, or as a rank of `job`.
fn bench(args: &BenchStepArgs, job: Option<&Job>) -> Result<()> {
    let cfg = args.config()?;
    let root = job.is_none_or(|j| j.is_root());
    let ordinal = job.map_or(0, |j| j.env.device);
    let selected = mlvpt::backend::select_on(args.device, args.precision, ordinal, &mut |line| {
        if root {
            eprintln!("{line}")
        }
    })?;
    let device = selected.describe();
    if selected.is_virtual() && root {
        eprintln!(
            "warning: {device} is the virtual CUDA device (tools/vgpu): these times measure its PTX interpreter on the CPU and say nothing about GPU speed"
        );
    }
    match selected {
        Selected::Cpu(be) => {
            if args.attention_kernels.is_some() {
                eprintln!("note: --attention-kernels applies to CUDA only; the CPU backend ignores it");
            }
            if args.head_kernels.is_some() {
                eprintln!("note: --head-kernels applies to CUDA only; the CPU backend ignores it");
            }
            let batch = args.batch.unwrap_or(DEFAULT_BATCH_CPU);
            match job {
                None => run_on(be, device, batch, args, &cfg, Some(CpuPeak::measure()), None),
                Some(j) => {
                    let mut sync = HostSync { control: &j.control };
                    run_on(be, device, batch, args, &cfg, None, Some((&mut sync, j)))
                }
            }
        }
        #[cfg(feature = "cuda")]
        Selected::Cuda(mut be) => {
            if let Some(spec) = &args.attention_kernels {
                let (f, b) = attention_tiles(spec, cfg.vit.dim / cfg.vit.heads)?;
                be.set_attention_tiles(Some(f), Some(b));
            }
            if let Some(name) = &args.head_kernels {
                be.set_head_kernels(head_kernels(name)?);
            }
            let batch = args.batch.unwrap_or(DEFAULT_BATCH_CUDA);
            match job {
                None => run_on(*be, device, batch, args, &cfg, None, None),
                Some(j) => {
                    let id = j
                        .nccl_id
                        .ok_or_else(|| anyhow::anyhow!("this rank runs on CUDA but rank 0 does not"))?;
                    let nccl = mlvpt::dist::sync::Nccl::init(be.gpu(), &id, j.rank(), j.world())?;
                    let mut sync = mlvpt::dist::sync::NcclSync::new(nccl, &j.control, j.timeout);
                    run_on(*be, device, batch, args, &cfg, None, Some((&mut sync, j)))
                }
            }
        }
    }
}

/// The CPU's FMA peak measured just before the steps (`mlvpt::train::peak`), on the CPU
/// backend's threads, and the instruction set its matrix products run on.
struct CpuPeak {
    threads: usize,
    gemm: Option<Isa>,
    /// FLOP/s per instruction set the CPU has.
    flops: Vec<(Isa, f64)>,
}

impl CpuPeak {
    fn measure() -> Self {
        let threads = rayon::current_num_threads();
        let flops = [Isa::Avx2Fma, Isa::Avx512]
            .into_iter()
            .filter_map(|isa| peak::fma_peak(isa, threads, Duration::from_millis(300)).map(|f| (isa, f)))
            .collect();
        Self {
            threads,
            gemm: peak::gemm_isa(),
            flops,
        }
    }

    /// The peak of the instruction set the products run on.
    fn gemm_peak(&self) -> Option<f64> {
        self.flops.iter().find(|(isa, _)| Some(*isa) == self.gemm).map(|&(_, f)| f)
    }
}

/// A rank's gradient exchange and job.
type Dist<'a, B> = Option<(&'a mut dyn GradSync<B>, &'a Job)>;

fn run_on<B: Backend>(
    be: B,
    device: String,
    batch: usize,
    args: &BenchStepArgs,
    cfg: &ModelConfig,
    peak: Option<CpuPeak>,
    dist: Dist<'_, B>,
) -> Result<()> {
    let backend = be.name();
    let tokens = cfg.tokens(BRANCHES);
    let root = dist.as_ref().is_none_or(|(_, j)| j.is_root());
    let world = dist.as_ref().map_or(1, |(_, j)| j.world());
    if root {
        eprintln!(
            "bench-step: {} at {} px ({tokens} tokens), batch {batch}, {} warm-up + {} timed steps on {device}",
            args.model, cfg.vit.image_size, args.warmup, args.steps
        );
    }
    // Every rank its own images (seeded by rank), the same weights.
    let rank = dist.as_ref().map_or(0, |(_, j)| j.rank());
    let mut problem = RandomProblem::new(cfg, batch, args.seed);
    if rank > 0 {
        let other = RandomProblem::new(cfg, batch, args.seed.wrapping_add(1000 * rank as u64));
        (problem.images, problem.targets) = (other.images, other.targets);
    }
    let mut tr = problem.trainer(be, cfg)?;
    let bar = if root {
        progress_bar((args.warmup + args.steps) as u64)
    } else {
        None
    };
    let sync = dist.map(|(s, _)| s);
    let times = bench::time_steps_with(&mut tr, &problem, args.warmup, args.steps, sync, &mut |done, _| {
        if let Some(b) = &bar {
            b.set_position(done as u64);
        }
    });
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let times = times?;
    if !root {
        return Ok(());
    }
    let fl = flops::step_flops(cfg, BRANCHES, batch);
    // "cuda-f32+bf16 (NVIDIA H100 ...)": the device is reported on its own.
    let backend_short = backend.split(" (").next().unwrap_or(&backend).to_string();
    let attention = args.attention_kernels.as_deref().unwrap_or("default");
    let head = args.head_kernels.as_deref().map(str::trim).unwrap_or("default");
    let r = Report {
        model: &args.model,
        cfg,
        batch,
        tokens,
        device,
        backend: backend_short,
        times,
        flops: fl,
        warmup: args.warmup,
        attention,
        head,
        peak,
        world,
    };
    if args.json {
        println!("{}", r.json());
    } else {
        r.print();
    }
    Ok(())
}

/// An indicatif bar on stderr when it is a terminal (hidden in logs and pipes).
fn progress_bar(total: u64) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} steps  [{elapsed_precise} < {eta}]")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    Some(bar)
}

struct Report<'a> {
    model: &'a str,
    cfg: &'a ModelConfig,
    batch: usize,
    tokens: usize,
    device: String,
    backend: String,
    times: StepTimes,
    flops: StepFlops,
    warmup: usize,
    /// `--attention-kernels` as given, else "default".
    attention: &'a str,
    /// `--head-kernels` as given, else "default".
    head: &'a str,
    /// On the CPU: the machine's FMA peak, measured in the same run.
    peak: Option<CpuPeak>,
    /// Ranks that stepped together (1: a single process); `batch` is per rank.
    world: usize,
}

impl Report<'_> {
    fn tflops(&self) -> f64 {
        self.flops.total() as f64 / self.times.mean() / 1e12
    }

    /// The step's FLOP rate over the measured peak of the products' instruction set.
    fn peak_fraction(&self) -> Option<f64> {
        let p = self.peak.as_ref()?.gemm_peak()?;
        Some(self.flops.total() as f64 / self.times.mean() / p)
    }

    fn json(&self) -> serde_json::Value {
        let t = &self.times;
        let peak = self.peak.as_ref().map(|p| {
            serde_json::json!({
                "threads": p.threads,
                "gemm_isa": p.gemm.map(Isa::name),
                "fma_peak_gflops": p.flops.iter().map(|(isa, f)| (isa.name().to_string(), serde_json::json!(f / 1e9))).collect::<serde_json::Map<_, _>>(),
                "step_fraction_of_gemm_peak": self.peak_fraction(),
            })
        });
        serde_json::json!({
            "cpu_peak": peak,
            "impl": format!("mlvpt-{}", self.backend),
            "model": self.model,
            "batch": self.batch,
            "images_per_s": self.world as f64 * t.images_per_s(),
            "images_per_s_per_gpu": t.images_per_s(),
            "world": self.world,
            "ms_per_step": 1e3 * t.mean(),
            "tflops": self.tflops(),
            "flops_per_step": self.flops.total(),
            "device": self.device,
            "image_size": self.cfg.vit.image_size,
            "tokens": self.tokens,
            "method": self.cfg.method,
            "classes": self.cfg.labels,
            "groups": self.cfg.groups,
            "experts": self.cfg.experts,
            "warmup": self.warmup,
            "steps": t.seconds.len(),
            "ms_per_step_median": 1e3 * t.median(),
            "ms_per_step_min": 1e3 * t.min(),
            "flops": self.flops,
            "loss": t.last_loss,
            "attention_kernels": self.attention,
            "head_kernels": self.head,
        })
    }

    fn print(&self) {
        let (t, c, f) = (&self.times, self.cfg, &self.flops);
        let row = |k: &str, v: String| println!("  {k:<22}{v}");
        let tera = |x: u64| match x as f64 {
            v if v >= 1e12 => format!("{:.3} TFLOP", v / 1e12),
            v => format!("{:.3} GFLOP", v / 1e9),
        };
        println!("bench-step");
        let method = match c.method {
            Method::MlVpt => "ML-VPT",
            Method::Vpt => "VPT",
        };
        row(
            "model",
            format!(
                "{} {} px, {} tokens ({} prompts), K {}, T {}, E {}, {method}",
                self.model,
                c.vit.image_size,
                self.tokens,
                c.prompts_per_layer(BRANCHES),
                c.labels,
                c.groups,
                c.experts
            ),
        );
        row("device", self.device.clone());
        row("backend", self.backend.clone());
        row("batch", self.batch.to_string());
        row("attention kernels", self.attention.to_string());
        row("steps", format!("{} timed after {} warm-up", t.seconds.len(), self.warmup));
        row(
            "ms/step",
            format!(
                "{:.2} mean, {:.2} median, {:.2} min",
                1e3 * t.mean(),
                1e3 * t.median(),
                1e3 * t.min()
            ),
        );
        if self.world > 1 {
            row("ranks", format!("{} ({} images each per step)", self.world, self.batch));
            row(
                "images/s",
                format!("{:.1} ({:.1} per rank)", self.world as f64 * t.images_per_s(), t.images_per_s()),
            );
        } else {
            row("images/s", format!("{:.1}", t.images_per_s()));
        }
        row(
            "FLOP/step",
            format!(
                "{} (backbone forward {}, backward {}, head {})",
                tera(f.total()),
                tera(f.backbone_forward),
                tera(f.backbone_backward),
                tera(f.head_forward + f.head_backward)
            ),
        );
        row("effective TFLOP/s", format!("{:.2}", self.tflops()));
        if let Some(p) = &self.peak {
            let peaks: Vec<String> = p
                .flops
                .iter()
                .map(|(isa, f)| format!("{} {:.1} GFLOP/s", isa.name(), f / 1e9))
                .collect();
            row(
                "FMA peak (measured)",
                format!(
                    "{} on {} threads",
                    if peaks.is_empty() { "none".into() } else { peaks.join(", ") },
                    p.threads
                ),
            );
            row(
                "products on",
                match (p.gemm, self.peak_fraction()) {
                    (Some(isa), Some(frac)) => format!("{} (the step at {:.0}% of its peak)", isa.name(), 100.0 * frac),
                    (Some(isa), None) => isa.name().to_string(),
                    (None, _) => "scalar code".into(),
                },
            );
        }
        row("last loss", format!("{:.4}", t.last_loss));
    }
}
