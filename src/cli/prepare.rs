//! `mlvpt prepare`: decode and resize a dataset once into a memory-mapped cache file that
//! `mlvpt train --data cache:FILE` reads with no decoding. Re-running finishes an interrupted one.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use mlvpt::data::sources::ImageDataConfig;

#[derive(Args, Debug)]
pub struct PrepareArgs {
    /// The dataset: voc2007:PATH, coco2014:PATH or manifest:FILE[,classes=FILE][,test=FILE].
    #[arg(long, value_name = "SPEC")]
    pub data: String,
    /// The cache file to write (or to finish, if an earlier run was interrupted).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Side of the stored (square) images.
    #[arg(long, default_value_t = 224)]
    pub image_size: usize,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(args: &PrepareArgs) -> anyhow::Result<()> {
    let bar = (!args.quiet && std::io::stderr().is_terminal()).then(|| {
        let b = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        b.set_style(
            ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} images  {per_sec}  [{elapsed_precise} < {eta}]")
                .expect("static template")
                .progress_chars("=> "),
        );
        b
    });
    let started = std::time::Instant::now();
    let s = ImageDataConfig::prepare_cache(&args.data, &args.out, args.image_size, |done, total| {
        if let Some(b) = &bar {
            b.set_length(total as u64);
            b.set_position(done as u64);
        }
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{}: {} images ({} kept from an earlier run, {} written, {} unreadable{})",
        args.out.display(),
        s.total,
        s.reused,
        s.written,
        s.unreadable,
        if s.unreadable > 0 {
            format!(", listed in {}.report.txt", args.out.display())
        } else {
            String::new()
        }
    );
    // Decoding and resizing run on every core: the rate per core says what more cores would buy.
    let threads = rayon::current_num_threads();
    let rate = (s.written + s.unreadable) as f64 / seconds.max(1e-9);
    println!(
        "{} images read in {seconds:.1} s: {rate:.0} images/s on {threads} threads ({:.0} per thread)",
        s.written + s.unreadable,
        rate / threads as f64
    );
    Ok(())
}
