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
    /// Split the labels into correlative and discriminative groups (docs/MODEL.md#label-grouping).
    Group(cli::group::GroupArgs),
    /// mAP, CP/CR/CF1, OP/OR/OF1 of a score file against a target file (docs/MODEL.md#metrics).
    Metrics(cli::metrics::MetricsArgs),
    /// Train ML-VPT (with no data arguments: the embedded procedural demo).
    // Boxed: its many options make it far larger than the other variants.
    Train(Box<cli::train::TrainArgs>),
    /// Re-evaluate a checkpoint on its test split.
    Eval(cli::eval::EvalArgs),
    /// Per-label probabilities from a checkpoint.
    Predict(cli::predict::PredictArgs),
    /// Decode and resize a dataset once into a cache file for `train --data cache:FILE`.
    Prepare(cli::prepare::PrepareArgs),
    /// Time training steps on random weights and inputs: images/s and effective TFLOP/s.
    BenchStep(cli::bench_step::BenchStepArgs),
}

fn main() {
    let cli = Cli::parse();
    // The main thread drives the CPU backend's ops. As worker 0 of rayon's global pool it runs
    // its share of each op's tasks itself; otherwise each op hands all of them to the pool and
    // sleeps until they are done, two thread wake-ups per op (3-5% of a demo step, measured).
    // The thread count is rayon's default (`RAYON_NUM_THREADS`, else one per CPU), this thread
    // included.
    if let Err(e) = rayon::ThreadPoolBuilder::new().use_current_thread().build_global() {
        eprintln!("note: rayon's thread pool was already set up ({e}); the main thread stays out of it");
    }
    let result: anyhow::Result<()> = match cli.command {
        Command::Group(args) => cli::group::run(&args),
        Command::Metrics(a) => cli::metrics::run(&a),
        Command::Train(args) => cli::train::run(&args),
        Command::Eval(args) => cli::eval::run(&args),
        Command::Predict(args) => cli::predict::run(&args),
        Command::Prepare(args) => cli::prepare::run(&args),
        Command::BenchStep(args) => cli::bench_step::run(&args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
