//! The `mlvpt` command line. Each subcommand lives in `src/cli/<name>.rs`.

use clap::{Parser, Subcommand};

mod cli;

#[derive(Parser)]
#[command(name = "mlvpt", version, about = "ML-VPT: multi-label visual prompt tuning of a frozen ViT")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {}

fn main() {
    let cli = Cli::parse();
    let result: anyhow::Result<()> = match cli.command {};
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
