//! `mlvpt predict`: per-label probabilities from a checkpoint, for image files or folders, or
//! for images of the checkpoint's own test split by index.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::Device;
use mlvpt::backend::{Backend, Selected};
use mlvpt::train::run::Opened;

#[derive(Args, Debug)]
pub struct PredictArgs {
    /// A checkpoint file, or a run folder holding checkpoint.safetensors.
    #[arg(long, value_name = "FILE")]
    pub checkpoint: PathBuf,
    /// Image files or folders (their .jpg/.jpeg/.png files) to score.
    #[arg(value_name = "IMAGE_OR_FOLDER", conflicts_with = "index")]
    pub inputs: Vec<PathBuf>,
    /// Test-split images to score [default: all].
    #[arg(long, value_name = "I", num_args = 1..)]
    pub index: Vec<usize>,
    /// Use the EMA weights (checkpoints trained with --ema).
    #[arg(long)]
    pub ema: bool,
    /// Print JSON (one object per image) instead of CSV.
    #[arg(long)]
    pub json: bool,
    /// Use the backbone file even if its SHA-256 differs from the one trained with.
    #[arg(long)]
    pub allow_backbone_mismatch: bool,
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    /// Images per forward pass [default: the batch the checkpoint was trained with, for a
    /// data-parallel run the global one]: smaller fits a smaller device; the scores do not
    /// depend on it beyond float rounding.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: Option<u32>,
}

pub fn run(args: &PredictArgs) -> anyhow::Result<()> {
    // Inputs, then the checkpoint, are checked before any device is opened.
    let files = if args.inputs.is_empty() {
        None
    } else {
        let files = expand(&args.inputs)?;
        anyhow::ensure!(!files.is_empty(), "no .jpg/.jpeg/.png images in {:?}", args.inputs);
        Some(files)
    };
    let (path, mut state) = Opened::load(&args.checkpoint, args.allow_backbone_mismatch)?;
    if let Some(b) = args.batch_size {
        state.train.batch_size = b as usize;
    }
    match mlvpt::backend::select(args.device, &mut |line| eprintln!("{line}"))? {
        Selected::Cpu(be) if files.is_some() => predict_files(args, &files.unwrap_or_default(), Opened::model_on(be, path, state)?),
        Selected::Cpu(be) => run_on(args, Opened::on(be, path, state)?),
        #[cfg(feature = "cuda")]
        Selected::Cuda(be) if files.is_some() => predict_files(args, &files.unwrap_or_default(), Opened::model_on(*be, path, state)?),
        #[cfg(feature = "cuda")]
        Selected::Cuda(be) => run_on(args, Opened::on(*be, path, state)?),
    }
}

fn run_on<B: Backend>(args: &PredictArgs, mut opened: Opened<B>) -> anyhow::Result<()> {
    let (idx, probs) = opened.predict(&args.index, args.ema)?;
    let names = &opened.state.class_names;
    let k = names.len();
    if args.json {
        let rows: Vec<serde_json::Value> = idx
            .iter()
            .zip(probs.chunks_exact(k))
            .map(|(&i, p)| {
                let probabilities: serde_json::Map<String, serde_json::Value> =
                    names.iter().zip(p).map(|(n, &v)| (n.clone(), serde_json::json!(v))).collect();
                let labels: Vec<&String> = names
                    .iter()
                    .zip(opened.test.target(i))
                    .filter(|(_, &t)| t > 0.5)
                    .map(|(n, _)| n)
                    .collect();
                serde_json::json!({ "index": i, "probabilities": probabilities, "labels": labels })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    // CSV: a header of class names, then one row per image.
    println!("index,{}", names.join(","));
    for (&i, p) in idx.iter().zip(probs.chunks_exact(k)) {
        let cells: Vec<String> = p.iter().map(|v| format!("{v:.4}")).collect();
        println!("{i},{}", cells.join(","));
    }
    Ok(())
}

/// Image files named directly or found (sorted) in the named folders.
fn expand(inputs: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for p in inputs {
        if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("cannot list {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| {
                    f.extension()
                        .and_then(|e| e.to_str())
                        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
                })
                .collect();
            found.sort();
            files.extend(found);
        } else if p.is_file() {
            files.push(p.clone());
        } else {
            anyhow::bail!("{} does not exist", p.display());
        }
    }
    Ok(files)
}

/// Scores image files: a table (image, labels over the threshold, one column per class) or
/// JSON lines.
fn predict_files<B: Backend>(args: &PredictArgs, files: &[PathBuf], mut opened: Opened<B>) -> anyhow::Result<()> {
    let (ok, probs, skipped) = opened.predict_files(files, args.ema)?;
    let names = &opened.state.class_names;
    let th = opened.state.train.threshold;
    for s in &skipped {
        eprintln!("warning: skipped {}: {}", s.path.display(), s.reason);
    }
    if !args.json {
        println!("image,labels,{}", names.join(","));
    }
    for (f, p) in ok.iter().zip(probs.chunks_exact(names.len())) {
        let labels: Vec<&String> = names.iter().zip(p).filter(|(_, &v)| v > th).map(|(n, _)| n).collect();
        if args.json {
            let probabilities: serde_json::Map<String, serde_json::Value> =
                names.iter().zip(p).map(|(n, &v)| (n.clone(), serde_json::json!(v))).collect();
            println!(
                "{}",
                serde_json::json!({ "image": f.display().to_string(), "labels": labels, "probabilities": probabilities })
            );
        } else {
            let cells: Vec<String> = p.iter().map(|v| format!("{v:.4}")).collect();
            let l: Vec<&str> = labels.iter().map(|s| s.as_str()).collect();
            println!("{},{},{}", f.display(), l.join(";"), cells.join(","));
        }
    }
    anyhow::ensure!(!ok.is_empty(), "none of the {} images could be read", files.len());
    Ok(())
}
