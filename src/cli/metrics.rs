//! `mlvpt metrics`: mAP and threshold metrics of a score file against a target file.

use std::path::PathBuf;

use anyhow::bail;
use mlvpt::metrics::{evaluate, read_eval_inputs};

#[derive(clap::Args, Debug)]
pub struct MetricsArgs {
    /// CSV of probabilities, one row per image, one column per class (optional header row).
    #[arg(long)]
    pub scores: PathBuf,
    /// CSV of 0/1 targets with the same shape (optional header row of class names).
    #[arg(long)]
    pub targets: PathBuf,
    /// A class is predicted when its score is >= this, strictly between 0 and 1.
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true)]
    pub threshold: f32,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &MetricsArgs) -> anyhow::Result<()> {
    if !(args.threshold > 0.0 && args.threshold < 1.0) {
        bail!("--threshold must be strictly between 0 and 1, got {}", args.threshold);
    }
    let inp = read_eval_inputs(&args.scores, &args.targets)?;
    let m = evaluate(&inp.scores, &inp.targets, inp.n, inp.k, args.threshold);
    for w in m.warnings(&inp.class_names) {
        eprintln!("warning: {w}");
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&m.to_json(&inp.class_names))?);
    } else {
        print!("{}", m.to_table(&inp.class_names));
    }
    Ok(())
}
