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
enum Command {
    /// Split the labels into correlative and discriminative groups (SPEC 1).
    Group(cli::group::GroupArgs),
}

fn main() {
    let cli = Cli::parse();
    let result: anyhow::Result<()> = match cli.command {
        Command::Group(args) => cli::group::run(&args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
