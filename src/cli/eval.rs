//! `mlvpt eval`: re-evaluates a checkpoint on its own test split (regenerated from the stored
//! data config and seed) and prints the metrics the run reported.

use std::path::PathBuf;

use clap::Args;

use super::Device;
use mlvpt::backend::{Backend, Selected};
use mlvpt::train::run::Opened;

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// A checkpoint file, or a run folder holding checkpoint.safetensors.
    #[arg(long, value_name = "FILE")]
    pub checkpoint: PathBuf,
    /// Print one JSON object instead of a table.
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

pub fn run(args: &EvalArgs) -> anyhow::Result<()> {
    // The checkpoint is read first, so a bad file is reported before any device is opened.
    let (path, mut state) = Opened::load(&args.checkpoint, args.allow_backbone_mismatch)?;
    if let Some(b) = args.batch_size {
        state.train.batch_size = b as usize;
    }
    match mlvpt::backend::select(args.device, &mut |line| eprintln!("{line}"))? {
        Selected::Cpu(be) => run_on(args, Opened::on(be, path, state)?),
        #[cfg(feature = "cuda")]
        Selected::Cuda(be) => run_on(args, Opened::on(*be, path, state)?),
    }
}

fn run_on<B: Backend>(args: &EvalArgs, mut opened: Opened<B>) -> anyhow::Result<()> {
    let (m, ema) = opened.evaluate()?;
    let s = &opened.state;
    let constant = opened.test.constant_map();
    if args.json {
        let out = serde_json::json!({
            "checkpoint": opened.path.display().to_string(),
            "epoch": s.epoch,
            "step": s.step,
            "split": "test",
            "images": opened.test.len(),
            "metrics": m.to_json(&s.class_names),
            "ema": ema.as_ref().map(|e| e.to_json(&s.class_names)),
            "constant_mAP": constant,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{} (epoch {}, step {}): test split, {} images",
        opened.path.display(),
        s.epoch,
        s.step,
        opened.test.len()
    );
    print!("{}", m.to_table(&s.class_names));
    if let Some(e) = &ema {
        println!("\nEMA weights:");
        print!("{}", e.to_table(&s.class_names));
    }
    println!("\nconstant-score mAP {constant:.2} (every image the same score: the floor)");
    Ok(())
}
