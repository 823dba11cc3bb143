//! How another crate uses mlvpt's CUDA kernels: open a device (which loads the fatbins that
//! build.rs embedded), upload inputs, call a typed launcher, download the result.
//!
//! `cargo run --release --features cuda --example embed_kernels` (needs a GPU; without one it
//! prints why and exits non-zero, without panicking).

use mlvpt::gpu::{bf16, GpuContext, GpuError};
use mlvpt::ops::layernorm::{self, LayerNormShape, Norm, NormStats};

fn run() -> Result<(), GpuError> {
    let gpu = GpuContext::new(0)?;
    println!(
        "device: {} (compute capability {:?}, {} SMs)",
        gpu.device_name(),
        gpu.compute_capability(),
        gpu.sm_count()
    );
    println!(
        "embedded modules: {:?}",
        mlvpt::gpu::FATBINS.iter().map(|(m, _)| *m).collect::<Vec<_>>()
    );

    // LayerNorm of two rows of 8 values (bf16 storage, fp32 statistics).
    let (rows, d) = (2usize, 8usize);
    let x: Vec<bf16> = (0..rows * d).map(|i| bf16::from_f32(i as f32)).collect();
    let x_dev = gpu.upload(&x)?;
    let gamma = gpu.upload(&vec![1.0f32; d])?;
    let beta = gpu.upload(&vec![0.0f32; d])?;
    let mut y = gpu.zeros::<bf16>(rows * d)?;
    let mut mean = gpu.zeros::<f32>(rows)?;
    let mut rstd = gpu.zeros::<f32>(rows)?;
    let stream = gpu.stream().clone();
    layernorm::cuda::forward(
        &gpu,
        &stream,
        &x_dev,
        Norm {
            gamma: &gamma,
            beta: &beta,
        },
        &mut y,
        NormStats {
            mean: &mut mean,
            rstd: &mut rstd,
        },
        &LayerNormShape {
            rows,
            dim: d,
            eps: layernorm::VIT_EPS,
        },
    )?;

    let y = gpu.download(&y)?;
    let mean = gpu.download(&mean)?;
    for r in 0..rows {
        let row: Vec<f32> = y[r * d..(r + 1) * d].iter().map(|v| v.to_f32()).collect();
        println!("row {r}: mean {:.3}, y = {row:.3?}", mean[r]);
    }
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
