//! `mlvpt predict`: per-label probabilities from a checkpoint. For now the inputs are images
//! of the checkpoint's own test split, by index; image files arrive with a later issue.

use std::path::PathBuf;

use clap::Args;

use super::Device;
use mlvpt::train::run::Opened;

#[derive(Args, Debug)]
pub struct PredictArgs {
    /// A checkpoint file, or a run folder holding checkpoint.safetensors.
    #[arg(long, value_name = "FILE")]
    pub checkpoint: PathBuf,
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
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
}

pub fn run(args: &PredictArgs) -> anyhow::Result<()> {
    let Device::Cpu = args.device;
    let mut opened = Opened::open_with(&args.checkpoint, args.allow_backbone_mismatch)?;
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
                let labels: Vec<&String> =
                    names.iter().zip(opened.test.target(i)).filter(|(_, &t)| t > 0.5).map(|(n, _)| n).collect();
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
